//! Incident windows: an operator's temporary override of sampling, stored in the queue's `state`
//! table (`tail_sample/incident`) so it survives restarts and any process on the host can set
//! it (`tailgate incident start|end` writes it directly; tail_sample reads it at every step).
//! While a window is open, traces whose route is one of its routes (every trace when it names
//! none) are kept outright (`--keep-all`) or when they last at least `--latency-ms`; a `drop`
//! policy still vetoes (health checks stay out). Kept traces name `incident` as their reason.
//! The window closes by itself at its end time, or on `tailgate incident end`.

use serde::{Deserialize, Serialize};
use tailgate_ipc::{Queue, QueueError, ReadTxn};

use crate::context::StageError;

/// The state key of the incident window.
pub const INCIDENT_KEY: &[u8] = b"tail_sample/incident";

/// The reason a trace kept by an incident window names.
pub const INCIDENT_REASON: &str = "incident";

/// One incident window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// Routes it applies to (`http.route` of the root span, or the root span's name); every
    /// trace when empty.
    pub routes: Vec<String>,
    /// Keep every matching trace.
    pub keep_all: bool,
    /// Otherwise keep matching traces lasting at least this long (first start to last end).
    pub latency_ms: Option<u64>,
    /// When it was opened, Unix milliseconds.
    pub started_unix_ms: u64,
    /// When it closes by itself, Unix milliseconds.
    pub until_unix_ms: u64,
}

impl Incident {
    /// Whether the window is open at `now_unix_ms`.
    pub fn open_at(&self, now_unix_ms: u64) -> bool {
        now_unix_ms < self.until_unix_ms
    }

    /// Whether the window applies to a trace of `route` (`None`: the trace has none).
    pub fn covers(&self, route: Option<&str>) -> bool {
        self.routes.is_empty() || route.is_some_and(|route| self.routes.iter().any(|r| r == route))
    }
}

/// The stored window, if any (open or not).
pub fn load(queue: &Queue, txn: &ReadTxn<'_>) -> Result<Option<Incident>, QueueError> {
    Ok(queue.state_get(txn, INCIDENT_KEY)?.and_then(|raw| serde_json::from_slice(raw).ok()))
}

/// Stores `incident` (replacing any earlier one), or removes it with `None`.
pub fn store(queue: &Queue, incident: Option<&Incident>) -> Result<(), StageError> {
    let mut wtxn = queue.write()?;
    match incident {
        Some(incident) => {
            let value = serde_json::to_vec(incident).map_err(|err| StageError::Other(err.to_string()))?;
            queue.state_put(&mut wtxn, INCIDENT_KEY, &value)?;
        }
        None => queue.state_delete(&mut wtxn, INCIDENT_KEY)?,
    }
    Ok(queue.commit(wtxn)?)
}
