//! What the supervisor reports about its stages: the vocabulary shared by the control socket
//! (`tailgate status`) and the self-metrics endpoint.

use serde::{Deserialize, Serialize};

/// One stage as the supervisor sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageStatus {
    /// Stage name.
    pub stage: String,
    /// Running process, if any.
    pub pid: Option<u32>,
    /// `running`, `stopped` (SIGSTOP or frozen), `stopping`, or `restarting` (no process now).
    pub state: String,
    /// Seconds since the running process started.
    pub uptime_seconds: f64,
    /// Private (anonymous resident) memory of the process.
    pub private_bytes: Option<u64>,
    /// Proportional set size (its share of shared pages, the queue map included).
    pub pss_bytes: Option<u64>,
    /// CPU time the process has used (user + system).
    pub cpu_seconds: Option<f64>,
    /// The stage's soft memory budget: over it, the stage is asked to shed.
    pub memory_soft_budget_bytes: u64,
    /// The stage's hard memory budget: over it, the stage is drained and restarted.
    pub memory_hard_budget_bytes: u64,
    /// Times the stage was asked to shed since the slot was created.
    pub shed_requests: u64,
    /// Event counters since the supervisor started (`received`, `sent`, `dropped/<reason>`,
    /// `error/<kind>`), summed over the stage's processes.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Rates over the last ten seconds (absent right after the start).
    pub rates: Option<Rates>,
    /// Restarts since the supervisor started, by reason (`exited`, `memory`, `hung`,
    /// `stopped`, `writer_lock`, `requested`).
    pub restarts: std::collections::BTreeMap<String, u64>,
    /// Restarts counting towards escalation within `restart_window`.
    pub restarts_in_window: usize,
    /// How late the stage's heartbeat is (0 while its promise holds); `None` before its first.
    pub heartbeat_overdue_ms: Option<u64>,
    /// Whether the stage has stamped from its work (past its startup; receive: listening).
    #[serde(default)]
    pub started: bool,
}

/// A stage's recent rates.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Rates {
    /// Items taken in per second.
    pub received_per_second: f64,
    /// Items handed on per second.
    pub sent_per_second: f64,
    /// CPU, percent of one core.
    pub cpu_percent: f64,
}
