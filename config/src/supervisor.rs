//! The supervisor's section: memory budgets per stage, cgroup caps, restart policy, and its
//! own telemetry endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Supervision of the stage processes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Memory limiter, soft, for all stages together (MiB of private, anonymous resident
    /// memory). Split into per-stage soft budgets by [`STAGE_MEMORY_SHARES`] unless
    /// `stage_memory` sets a stage's own. A stage over its soft budget is told to shed (it
    /// decides pending work early, drops caches, shrinks its buffers and returns free heap to
    /// the system) and logs what it shed; above the total the supervisor warns.
    pub memory_soft_limit_mib: u64,
    /// Memory limiter, hard, for all stages together, split like the soft limit. A stage over its
    /// hard budget is drained (SIGTERM, SIGKILL after `shutdown_timeout`) and restarted; its
    /// state is rebuilt from the queue, so no backlog is lost. Such restarts count towards
    /// `max_restarts`: a stage whose rebuilt state alone exceeds its budget escalates instead
    /// of looping. Checked every `queue.sync_interval`.
    pub memory_hard_limit_mib: u64,
    /// Per-stage budgets overriding the split, e.g. `tail_sample: {soft_mib: 200, hard_mib: 250}`.
    pub stage_memory: std::collections::BTreeMap<String, StageMemory>,
    /// Self-metrics over HTTP (`/metrics`, `/healthz`, `/readyz`).
    pub telemetry: TelemetryConfig,
    /// Kernel caps per stage (one cgroup per stage where the host allows).
    pub cgroups: CgroupsConfig,
    /// First wait before restarting a crashed stage; doubles per crash up to `restart_backoff_max`.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_initial: Duration,
    /// Longest wait before restarting a crashed stage.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// More restarts of one stage than this within `restart_window` make the supervisor exit
    /// non-zero (so systemd restarts the whole unit). Must be reachable with the backoff above:
    /// `check-config` reports a value a crash loop could never exceed.
    pub max_restarts: u32,
    /// Window for `max_restarts`.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// How long each stage gets to drain on shutdown before it is killed.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A stage process that stays stopped (SIGSTOP, a frozen cgroup, a tracer) this long is
    /// killed and restarted: a stopped process may hold the queue's single writer lock and stall
    /// every stage, and its reader slot pins pages. Checked every `queue.sync_interval`.
    #[serde(with = "humantime_serde")]
    pub liveness_timeout: Duration,
}

/// One cgroup per stage process: cgroup v2 in a delegated subtree, or v1 where that is what the
/// host has and it is writable; without either, stages run uncapped (said once at start).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupsConfig {
    /// Make the per-stage groups (they also give per-stage accounting without caps).
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Caps per stage name, e.g. `tail_sample: {memory_max_mib: 512, cpu_max_percent: 50}`.
    /// Memory caps are unset by default: a stage's group is also charged for the queue map's
    /// page cache it touches, so only an operator who sized them should set them.
    pub stages: std::collections::BTreeMap<String, StageCaps>,
}

fn enabled() -> bool {
    true
}

/// Kernel caps of one stage.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StageCaps {
    /// `memory.high` (v2) / `memory.soft_limit_in_bytes` (v1): reclaim pressure above this.
    pub memory_high_mib: Option<u64>,
    /// `memory.max` (v2) / `memory.limit_in_bytes` (v1): the kernel's hard cap.
    pub memory_max_mib: Option<u64>,
    /// `cpu.max` (v2) / CFS quota (v1), in percent of one core.
    pub cpu_max_percent: Option<u32>,
}

/// The supervisor's own HTTP endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Serve the endpoint.
    pub enabled: bool,
    /// Address to listen on; loopback by default (the Collector's own telemetry port).
    pub endpoint: SocketAddr,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { enabled: true, endpoint: SocketAddr::from(([127, 0, 0, 1], 8888)) }
    }
}

/// One stage's memory budget (MiB of private memory).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StageMemory {
    /// Over this the stage is told to shed.
    pub soft_mib: u64,
    /// Over this the stage is drained and restarted.
    pub hard_mib: u64,
}

/// Each stage's share, in percent, of `memory_soft_limit_mib` / `memory_hard_limit_mib` when
/// `stage_memory` does not set its budget: tail_sample holds the trace window, receive
/// in-flight requests, log_mirror waiting records, export one request per destination,
/// spanmetrics its series.
pub const STAGE_MEMORY_SHARES: [(&str, u64); 5] =
    [("receive", 20), ("tail_sample", 40), ("log_mirror", 15), ("spanmetrics", 10), ("export", 15)];

impl SupervisorConfig {
    /// The memory budget of `stage`: its own from `stage_memory`, or its share of the limits.
    pub fn stage_memory(&self, stage: &str) -> StageMemory {
        if let Some(own) = self.stage_memory.get(stage) {
            return *own;
        }
        let share = STAGE_MEMORY_SHARES.iter().find(|(name, _)| *name == stage).map_or(20, |(_, share)| *share);
        StageMemory {
            soft_mib: (self.memory_soft_limit_mib * share / 100).max(1),
            hard_mib: (self.memory_hard_limit_mib * share / 100).max(2),
        }
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            memory_soft_limit_mib: 320,
            memory_hard_limit_mib: 400,
            stage_memory: std::collections::BTreeMap::new(),
            telemetry: TelemetryConfig::default(),
            cgroups: CgroupsConfig { enabled: true, stages: std::collections::BTreeMap::new() },
            restart_backoff_initial: Duration::from_millis(50),
            restart_backoff_max: Duration::from_secs(5),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            liveness_timeout: Duration::from_secs(5),
        }
    }
}

impl SupervisorConfig {
    /// How many times a stage that crashes immediately exits within `restart_window`, given the
    /// restart backoff (initial, doubling, capped): escalation needs `max_restarts` below this.
    pub fn crash_loop_exits_per_window(&self) -> u32 {
        let mut elapsed = Duration::ZERO;
        let mut delay = self.restart_backoff_initial.max(Duration::from_millis(1));
        let mut exits = 1;
        while exits < 100_000 {
            elapsed = elapsed.saturating_add(delay);
            if elapsed > self.restart_window {
                break;
            }
            exits += 1;
            delay = delay.saturating_mul(2).min(self.restart_backoff_max.max(Duration::from_millis(1)));
        }
        exits
    }
}
