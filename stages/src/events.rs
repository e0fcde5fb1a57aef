//! The core events every stage emits alike: items received, sent, dropped (with a named
//! reason) and errors. Each event bumps a counter; the counters are logged when a stage stops
//! and are what tests and the supervisor read.
//!
//! Metric names (for the exposition added with the telemetry endpoint):
//! `tailgate_items_received_total{stage}`, `tailgate_items_sent_total{stage}`,
//! `tailgate_items_dropped_total{stage,reason}`, `tailgate_errors_total{stage,kind}`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tailgate_ipc::StageId;

/// Counters of one stage process.
#[derive(Debug)]
pub struct StageEvents {
    stage: StageId,
    received: AtomicU64,
    sent: AtomicU64,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl StageEvents {
    /// Fresh counters for `stage`.
    pub fn new(stage: StageId) -> StageEvents {
        StageEvents {
            stage,
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Items taken in (from a client or an input edge).
    pub fn received(&self, items: u64) {
        self.received.fetch_add(items, Ordering::Relaxed);
    }

    /// Items handed on (to an output edge or a backend that acknowledged them).
    pub fn sent(&self, items: u64) {
        self.sent.fetch_add(items, Ordering::Relaxed);
    }

    /// Items deliberately not handed on, with the reason (`sampled_out`, `rejected`, ...).
    pub fn dropped(&self, reason: &'static str, items: u64) {
        if items == 0 {
            return;
        }
        if let Ok(mut map) = self.dropped.lock() {
            *map.entry(reason).or_default() += items;
        }
    }

    /// An error of the named kind; logged by the caller once where handled.
    pub fn error(&self, kind: &'static str) {
        if let Ok(mut map) = self.errors.lock() {
            *map.entry(kind).or_default() += 1;
        }
    }

    /// Total dropped for `reason`.
    pub fn dropped_count(&self, reason: &str) -> u64 {
        self.dropped.lock().ok().and_then(|map| map.get(reason).copied()).unwrap_or(0)
    }

    /// Logs the counters (at stage exit).
    pub fn log_summary(&self) {
        let dropped = self.dropped.lock().map(|m| format!("{m:?}")).unwrap_or_default();
        let errors = self.errors.lock().map(|m| format!("{m:?}")).unwrap_or_default();
        tracing::info!(
            stage = %self.stage,
            received = self.received.load(Ordering::Relaxed),
            sent = self.sent.load(Ordering::Relaxed),
            dropped = %dropped,
            errors = %errors,
            "stage counters"
        );
    }
}
