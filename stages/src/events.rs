//! The core events every stage emits alike: items received, sent, dropped (with a named
//! reason) and errors. Each event bumps a counter; the counters are published to the stage's
//! shared slot a few times a second ([`StageEvents::publish`]), from where the supervisor
//! exposes them as `tailgate_items_received_total{stage}`, `tailgate_items_sent_total{stage}`,
//! `tailgate_items_dropped_total{stage,reason}` and `tailgate_errors_total{stage,kind}`, and
//! logged when a stage stops.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tailgate_ipc::StageId;
use tailgate_ipc::heartbeat::{self, Heartbeat};

/// Records a destination's responses into the stage's events (a no-op until attached).
#[derive(Debug, Clone, Default)]
pub struct Responses(Option<(std::sync::Arc<StageEvents>, &'static str)>);

impl Responses {
    /// Records into `events` under `destination`.
    pub fn to(events: std::sync::Arc<StageEvents>, destination: &'static str) -> Responses {
        Responses(Some((events, destination)))
    }

    /// One response with `code`.
    pub fn record(&self, code: &str) {
        if let Some((events, destination)) = &self.0 {
            events.response(destination, code);
        }
    }
}

/// Counters of one stage process.
#[derive(Debug)]
pub struct StageEvents {
    stage: StageId,
    received: AtomicU64,
    sent: AtomicU64,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Backend responses by destination and code (`unavailable`, `http_429`, `transport`...).
    responses: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// When the counters were last published (monotonic nanoseconds).
    published_at: AtomicU64,
    /// Events counted so far, and as of the last publication: an idle stage publishes nothing.
    changes: AtomicU64,
    published_changes: AtomicU64,
    /// The slot counters are published to, once the process has claimed it.
    slot: std::sync::OnceLock<std::sync::Arc<Heartbeat>>,
    /// One publisher at a time (export runs on several threads).
    publishing: Mutex<()>,
}

/// Counters are published at most this often.
const PUBLISH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

impl StageEvents {
    /// Fresh counters for `stage`.
    pub fn new(stage: StageId) -> StageEvents {
        StageEvents {
            stage,
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            responses: Mutex::new(BTreeMap::new()),
            published_at: AtomicU64::new(0),
            changes: AtomicU64::new(1),
            published_changes: AtomicU64::new(0),
            slot: std::sync::OnceLock::new(),
            publishing: Mutex::new(()),
        }
    }

    /// Publishes to `slot` from now on: as events happen (at most every 250 ms), so counts are
    /// fresh while the stage works and no wake-up is spent on them while it idles.
    pub fn attach(&self, slot: std::sync::Arc<Heartbeat>) {
        let _ = self.slot.set(slot);
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slot.get() {
            self.publish(slot);
        }
    }

    /// Items taken in (from a client or an input edge).
    pub fn received(&self, items: u64) {
        if items == 0 {
            return;
        }
        self.received.fetch_add(items, Ordering::Relaxed);
        self.changed();
    }

    /// Items handed on (to an output edge or a backend that acknowledged them).
    pub fn sent(&self, items: u64) {
        if items == 0 {
            return;
        }
        self.sent.fetch_add(items, Ordering::Relaxed);
        self.changed();
    }

    /// Items deliberately not handed on, with the reason (`sampled_out`, `rejected`, ...).
    pub fn dropped(&self, reason: &'static str, items: u64) {
        if items == 0 {
            return;
        }
        if let Ok(mut map) = self.dropped.lock() {
            *map.entry(reason).or_default() += items;
        }
        self.changed();
    }

    /// `n` errors of the named kind at once.
    pub fn errors(&self, kind: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut map) = self.errors.lock() {
            *map.entry(kind).or_default() += n;
        }
        self.changed();
    }

    /// An error of the named kind; logged by the caller once where handled.
    pub fn error(&self, kind: &'static str) {
        if let Ok(mut map) = self.errors.lock() {
            *map.entry(kind).or_default() += 1;
        }
        self.changed();
    }

    /// Publishes the counters to the stage's slot (`received`, `sent`, `dropped/<reason>`,
    /// `error/<kind>`) if they changed, at most every 250 ms; a publication under way elsewhere
    /// in the process makes this one a no-op.
    pub fn publish(&self, slot: &Heartbeat) {
        let Ok(_one) = self.publishing.try_lock() else { return };
        let changes = self.changes.load(Ordering::Relaxed);
        if changes == self.published_changes.load(Ordering::Relaxed) {
            return;
        }
        let now = heartbeat::monotonic_now().as_nanos() as u64;
        let last = self.published_at.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < PUBLISH_INTERVAL.as_nanos() as u64 {
            return;
        }
        self.published_at.store(now, Ordering::Relaxed);
        self.published_changes.store(changes, Ordering::Relaxed);
        let mut counters: Vec<(String, u64)> = vec![
            ("received".to_string(), self.received.load(Ordering::Relaxed)),
            ("sent".to_string(), self.sent.load(Ordering::Relaxed)),
        ];
        if let Ok(map) = self.dropped.lock() {
            counters.extend(map.iter().map(|(reason, n)| (format!("dropped/{reason}"), *n)));
        }
        if let Ok(map) = self.errors.lock() {
            counters.extend(map.iter().map(|(kind, n)| (format!("error/{kind}"), *n)));
        }
        if let Ok(map) = self.responses.lock() {
            counters.extend(map.iter().map(|((destination, code), n)| (format!("response/{destination}/{code}"), *n)));
        }
        slot.publish_counters(counters.iter().map(|(name, n)| (name.as_str(), *n)));
    }

    /// Publishes the counters now, whatever the interval (at the stage's exit).
    pub fn publish_final(&self, slot: &Heartbeat) {
        self.published_at.store(0, Ordering::Relaxed);
        self.published_changes.store(0, Ordering::Relaxed);
        self.publish(slot);
    }

    /// A backend's response to one request of `destination` (a consumer name), by `code`.
    pub fn response(&self, destination: &'static str, code: &str) {
        if let Ok(mut map) = self.responses.lock() {
            *map.entry((destination, code.to_string())).or_default() += 1;
        }
        self.changed();
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
