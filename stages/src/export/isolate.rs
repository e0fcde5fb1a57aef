//! Delivering a request whose backend refuses it because of some of its items: Loki (400 for an
//! entry too old, out of order, too long) and Prometheus remote write (400 or 500 "too old
//! sample" for one sample; Prometheus then stores none of the request) answer for the request,
//! not per item. The request is split in halves and each half sent again until the refused
//! items stand alone; those are dropped and counted by reason, everything else delivered. Each
//! item takes part in at most log2(n) + 1 requests: no retry loop. Retryable failures (429,
//! 5xx, transport) resend the same part with backoff.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::context::StageContext;

/// What one attempt at a part came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The backend took the part.
    Accepted,
    /// Some item of the part is refused for good.
    Refused {
        /// Counter reason (`too_old`, `out_of_order`, ...).
        reason: &'static str,
        /// The backend's message.
        message: String,
    },
    /// Try the same part again later.
    Retry {
        /// What failed.
        message: String,
        /// The backend's `Retry-After`, if any.
        after: Option<Duration>,
    },
}

/// The outcome of delivering all items.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Items the backend took.
    pub accepted: usize,
    /// Items refused, per reason.
    pub refused: BTreeMap<&'static str, usize>,
    /// Whether delivery was interrupted by shutdown (nothing must be committed then).
    pub interrupted: bool,
}

/// Sends `items` through `push`, isolating refused items by splitting; `retry_limit`, when set,
/// gives up a part after that many retryable failures (counted as refused `backend_unavailable`:
/// the drop-during-outage policy).
pub async fn deliver<T>(
    ctx: &StageContext,
    consumer: &str,
    items: &[T],
    retry_limit: Option<u32>,
    mut push: impl AsyncFnMut(&[T]) -> Attempt,
) -> Delivered {
    let retry = &ctx.config.exporters.retry_on_failure;
    let mut delivered = Delivered::default();
    // Ranges still to push, the next one last.
    let mut pending = Vec::with_capacity(8);
    pending.push(0..items.len());
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        let mut delay = retry.initial_interval;
        let mut failures = 0u32;
        loop {
            match push(&items[range.clone()]).await {
                Attempt::Accepted => {
                    delivered.accepted += range.len();
                    break;
                }
                Attempt::Refused { reason, message } => {
                    if range.len() == 1 {
                        tracing::debug!(consumer, reason, %message, "backend refused an item");
                        *delivered.refused.entry(reason).or_default() += 1;
                    } else {
                        // Left half first keeps the order of what goes out.
                        let middle = range.start + range.len() / 2;
                        pending.push(middle..range.end);
                        pending.push(range.start..middle);
                    }
                    break;
                }
                Attempt::Retry { message, after } => {
                    ctx.events.error("export_retry");
                    failures += 1;
                    if retry_limit.is_some_and(|limit| failures > limit) {
                        tracing::warn!(consumer, items = range.len(), %message, "backend unavailable; dropping (drop_during_outage)");
                        *delivered.refused.entry("backend_unavailable").or_default() += range.len();
                        break;
                    }
                    let wait = delay.max(after.unwrap_or_default()).min(Duration::from_secs(30));
                    tracing::warn!(consumer, retry_in = ?wait, %message, "export failed; will retry");
                    if !super::pause(ctx, wait).await {
                        delivered.interrupted = true;
                        return delivered;
                    }
                    delay = (delay * 2).min(retry.max_interval);
                }
            }
        }
    }
    delivered
}
