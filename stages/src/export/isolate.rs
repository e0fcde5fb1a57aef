//! Delivering a request whose backend refuses it because of some of its items: Loki (400 for an
//! entry too old, out of order, too long) and Prometheus remote write (400 or 500 "too old
//! sample" for one sample; Prometheus then stores none of the request) answer for the request,
//! not per item. The request is split in halves and each half sent again until the refused
//! items stand alone; those are dropped and counted by reason, everything else delivered. Each
//! item takes part in at most log2(n) + 1 requests: no retry loop. Retryable failures (429,
//! 5xx, transport) resend the same part with backoff, through the destination's circuit
//! breaker. OTLP uses the same path: a request too large for the backend is split the same
//! way, and an error the backend keeps answering for one part ends with the item that causes
//! it refused (and dead-lettered by the caller) instead of blocking the queue behind it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

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
    /// Try the same part again later (the backend is unreachable, overloaded or throttling).
    Retry {
        /// What failed.
        message: String,
        /// The backend's `Retry-After`, if any.
        after: Option<Duration>,
    },
    /// The backend answered with an error that may be caused by this part's content (gRPC
    /// INTERNAL, UNKNOWN, DATA_LOSS): retried like [`Attempt::Retry`], and under
    /// [`Policy::persistent_after`] isolated and dead-lettered when it does not go away.
    Failed {
        /// The backend's answer.
        message: String,
    },
}

/// How a destination treats failures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Give a part up after this many retryable failures (counted as refused
    /// `backend_unavailable`: the drop-during-outage policy).
    pub retry_limit: Option<u32>,
    /// A part answered with [`Attempt::Failed`] for this long is split to find the items that
    /// cause it; a single item that keeps failing while other parts get through is refused
    /// (`persistent_error`), for the caller to dead-letter.
    pub persistent_after: Option<Duration>,
    /// Give up the attempt (interrupted, nothing committed) when a retry would wait while the
    /// queue refuses intake: the destination drops its oldest data instead (`drop_oldest`).
    pub yield_when_full: bool,
}

/// The outcome of delivering all items.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Items the backend took.
    pub accepted: usize,
    /// Items refused, per reason.
    pub refused: BTreeMap<&'static str, usize>,
    /// Each refused item: (index in the items, reason, the backend's message).
    pub refused_items: Vec<(usize, &'static str, String)>,
    /// Whether delivery was interrupted by shutdown (nothing must be committed then).
    pub interrupted: bool,
}

/// After this many consecutive failures the circuit opens: one probe per [`OPEN_FOR`], and one
/// log line for the whole outage instead of one per attempt.
pub const OPEN_AFTER_FAILURES: u32 = 5;

/// How long an open circuit holds before its half-open probe.
pub const OPEN_FOR: Duration = Duration::from_secs(5);

/// Failures of a part already suspected (a half of a persistently failing part) before it is
/// split again.
const SUSPECT_FAILURES: u32 = 2;

/// A destination's circuit: closed (requests flow, failures back off from `initial_interval`
/// to `max_interval`), open after [`OPEN_AFTER_FAILURES`] consecutive failures (one half-open
/// probe every [`OPEN_FOR`]); the first success closes it.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: u32,
    opened_at: Option<Instant>,
}

impl Breaker {
    /// Records a failure; returns how long to wait before the next attempt.
    pub fn failed(&mut self, consumer: &str, message: &str, initial: Duration, max: Duration) -> Duration {
        self.failures += 1;
        if self.failures < OPEN_AFTER_FAILURES {
            let wait = initial.saturating_mul(1 << (self.failures - 1).min(16)).min(max);
            tracing::warn!(consumer, retry_in = ?wait, message, "export failed; will retry");
            return wait;
        }
        if self.opened_at.is_none() {
            self.opened_at = Some(Instant::now());
            tracing::warn!(consumer, failures = self.failures, message, probe_every = ?OPEN_FOR, "destination failing; circuit open");
        } else {
            tracing::debug!(consumer, message, "half-open probe failed; circuit stays open");
        }
        OPEN_FOR
    }

    /// Records a success (closes an open circuit).
    pub fn succeeded(&mut self, consumer: &str) {
        if let Some(opened) = self.opened_at.take() {
            tracing::info!(consumer, failures = self.failures, open_for = ?opened.elapsed(), "destination answers again; circuit closed");
        }
        self.failures = 0;
    }
}

/// One range still to send, and how far its failure has got.
struct Part {
    range: Range<usize>,
    /// A half of a part that failed persistently.
    suspect: bool,
    /// When it began to fail (kept when it is put back behind other parts).
    since: Option<Instant>,
}

/// Sends `items` through `push`, starting with the `initial` ranges (in order), and isolates
/// refused items by splitting.
pub async fn deliver<T>(
    ctx: &StageContext,
    consumer: &str,
    items: &[T],
    initial: Vec<Range<usize>>,
    policy: Policy,
    breaker: &mut Breaker,
    mut push: impl AsyncFnMut(&[T]) -> Attempt,
) -> Delivered {
    let retry = &ctx.config.exporters.retry_on_failure;
    let mut delivered = Delivered::default();
    // Ranges still to push, the next one last.
    let mut pending: Vec<Part> =
        initial.into_iter().rev().map(|range| Part { range, suspect: false, since: None }).collect();
    let mut last_success: Option<Instant> = None;
    while let Some(part) = pending.pop() {
        let range = part.range.clone();
        if range.is_empty() {
            continue;
        }
        let mut failures = 0u32;
        let mut failing_since = part.since;
        loop {
            let attempt = push(&items[range.clone()]).await;
            let (message, after, answered) = match attempt {
                Attempt::Accepted => {
                    breaker.succeeded(consumer);
                    last_success = Some(Instant::now());
                    delivered.accepted += range.len();
                    break;
                }
                Attempt::Refused { reason, message } => {
                    breaker.succeeded(consumer);
                    last_success = Some(Instant::now());
                    refuse_or_split(&mut pending, &mut delivered, range, reason, message, false);
                    break;
                }
                Attempt::Retry { message, after } => (message, after, false),
                Attempt::Failed { message } => (message, None, true),
            };
            ctx.events.error("export_retry");
            failures += 1;
            if retry_limit_reached(policy, failures) {
                tracing::warn!(consumer, items = range.len(), %message, "backend unavailable; dropping (drop_during_outage)");
                *delivered.refused.entry("backend_unavailable").or_default() += range.len();
                break;
            }
            if answered && let Some(limit) = policy.persistent_after {
                let since = *failing_since.get_or_insert_with(Instant::now);
                let persistent = if part.suspect { failures >= SUSPECT_FAILURES } else { since.elapsed() >= limit };
                if persistent && range.len() > 1 {
                    tracing::warn!(consumer, items = range.len(), %message, "backend keeps failing this request; splitting it to find the items it refuses");
                    refuse_or_split(&mut pending, &mut delivered, range, "persistent_error", message, true);
                    break;
                }
                // A single item: refused only once other parts got through since it began to
                // fail (the backend works; this item does not). Otherwise, others go first.
                if persistent && last_success.is_some_and(|at| at > since) {
                    refuse_or_split(&mut pending, &mut delivered, range, "persistent_error", message, true);
                    break;
                }
                if persistent && !pending.is_empty() {
                    pending.insert(0, Part { range, suspect: true, since: Some(since) });
                    break;
                }
            }
            if policy.yield_when_full && !super::queue_admits(ctx) {
                delivered.interrupted = true;
                return delivered;
            }
            let wait = breaker.failed(consumer, &message, retry.initial_interval, retry.max_interval);
            let wait = wait.max(after.unwrap_or_default()).min(Duration::from_secs(30));
            if !wait_or_yield(ctx, wait, policy.yield_when_full).await {
                delivered.interrupted = true;
                return delivered;
            }
        }
    }
    delivered
}

/// Waits `wait`; false when stopping, or (with `yield_when_full`) as soon as the queue refuses
/// intake, so the destination can drop its oldest data at once rather than after the wait.
async fn wait_or_yield(ctx: &StageContext, wait: Duration, yield_when_full: bool) -> bool {
    if !yield_when_full {
        return super::pause(ctx, wait).await;
    }
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        if !super::pause(ctx, left.min(Duration::from_millis(250))).await || !super::queue_admits(ctx) {
            return false;
        }
    }
}

fn retry_limit_reached(policy: Policy, failures: u32) -> bool {
    policy.retry_limit.is_some_and(|limit| failures > limit)
}

/// Refuses a single item, or splits a range in halves (left first, keeping the order of what
/// goes out); halves of a persistently failing range are suspects.
fn refuse_or_split(
    pending: &mut Vec<Part>,
    delivered: &mut Delivered,
    range: Range<usize>,
    reason: &'static str,
    message: String,
    suspect: bool,
) {
    if range.len() == 1 {
        tracing::debug!(reason, %message, "backend refused an item");
        *delivered.refused.entry(reason).or_default() += 1;
        delivered.refused_items.push((range.start, reason, message));
    } else {
        let middle = range.start + range.len() / 2;
        pending.push(Part { range: middle..range.end, suspect, since: None });
        pending.push(Part { range: range.start..middle, suspect, since: None });
    }
}
