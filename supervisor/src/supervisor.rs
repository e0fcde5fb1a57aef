//! The supervisor: a ractor actor tree with one [`StageActor`] per stage process under one
//! [`Supervisor`].
//!
//! - Each stage actor starts its process by re-executing this binary (`tailgate stage <name>`),
//!   watches it, and restarts it after a crash with capped exponential backoff (reset once the
//!   process has run for a while). More than `max_restarts` within `restart_window` fails the
//!   actor; the supervisor then shuts everything down and exits non-zero so systemd restarts the
//!   unit (escalation).
//! - After every child death the supervisor clears stale LMDB reader slots (a killed reader pins
//!   pages until then).
//! - The supervisor owns the periodic fsync of the queue (`queue.sync_interval`), skipped when no
//!   transaction committed since the last one.
//! - Shutdown (SIGTERM/SIGINT) runs in stage order: receive first (intake stops), then
//!   tail_sample, log_mirror, spanmetrics, export. Each gets SIGTERM and `shutdown_timeout` to
//!   drain before SIGKILL. Whatever is still queued stays on disk for the next start.
//! - A marker file `RUNNING` in the data dir is removed only by a clean shutdown; if it is there
//!   at start, the last run ended uncleanly (power loss, OS crash, SIGKILL of the supervisor,
//!   escalation) and every table of the queue is checked before any stage starts
//!   ([`Queue::repair`]): damaged entries are quarantined one by one and recorded, everything
//!   intact stays. Only an environment LMDB cannot open at all is moved aside (`startup.rs`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tailgate_config::{Config, SupervisorConfig};
use tailgate_ipc::heartbeat::{BEAT_INTERVAL, Heartbeat};

use crate::control::Request;
use crate::report::StageStatus;
use tailgate_ipc::wake::socket_dir;
use tailgate_ipc::{Queue, StageId};
use tailgate_stages::limits::REBUILD_ALLOWANCE;

/// A stage process that ran at least this long resets its restart backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

/// How to launch a stage process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// This binary.
    pub exe: PathBuf,
    /// `--config` to pass on: the active snapshot of the operator's file, if one was given.
    pub config_file: Option<PathBuf>,
    /// The operator's file, read again on reload.
    pub source_config: Option<PathBuf>,
    /// Absolute data directory every process uses.
    pub data_dir: PathBuf,
    /// The per-stage cgroups, where the host allows.
    pub cgroups: Option<crate::cgroups::Cgroups>,
}

/// Messages of a stage actor.
#[derive(Debug)]
pub enum StageMsg {
    /// Start the process (initially and after backoff).
    Start,
    /// The process of `generation` exited.
    Exited {
        /// Which start this was.
        generation: u64,
        /// How it ended.
        status: String,
    },
    /// Stop the process (SIGTERM, then SIGKILL after the timeout) and the actor.
    Stop(RpcReplyPort<()>),
    /// The drain time of `generation` ran out.
    StopTimeout(u64),
    /// Report the running process id.
    Pid(RpcReplyPort<Option<u32>>),
    /// Check the process's private memory against the hard limit; reply with it (bytes).
    CheckMemory(RpcReplyPort<Option<u64>>),
    /// A child changed state (SIGCHLD): see whether the process was stopped, and if so, check
    /// again exactly when `liveness_timeout` has passed.
    CheckStopped,
    /// The process `pid` has held the queue's writer lock without committing for this long:
    /// kill it (if it is still the running process) so it restarts and the lock is released.
    KillLockHolder(u32, Duration),
    /// Pause or resume intake in the stage's slot (receive, for a drain).
    PauseIntake(bool, RpcReplyPort<()>),
    /// Ask the stage to shed now (an operator's request); replies whether it could be asked.
    Shed(RpcReplyPort<bool>),
    /// The heartbeat was late on the tick: check again when the liveness timeout is up.
    CheckHeartbeat,
    /// Describe the stage for `tailgate status`.
    Describe(RpcReplyPort<StageStatus>),
    /// Drain (SIGTERM, SIGKILL after the shutdown timeout) and start again at once, on an
    /// operator's request (false) or for a reload (true); replies with the pid being restarted.
    Restart(bool, RpcReplyPort<Result<u32, String>>),
    /// The supervisor's section changed on reload.
    SetPolicy(SupervisorConfig),
}

/// Watches one stage process.
#[derive(Debug)]
pub struct StageActor;

/// A stage actor's state.
#[derive(Debug)]
pub struct StageState {
    stage: StageId,
    launch: Arc<Launch>,
    queue: Queue,
    policy: SupervisorConfig,
    pid: Option<u32>,
    /// A pidfd of the running process: signals sent through it can never reach another
    /// process that reused the pid after ours was reaped.
    pidfd: Option<std::os::fd::OwnedFd>,
    /// Why the supervisor ended the running process, if it did (one ending per process).
    kill_reason: Option<KillReason>,
    /// Since when the running process has been seen stopped (SIGSTOP, frozen cgroup).
    stopped_since: Option<Instant>,
    generation: u64,
    started_at: Instant,
    backoff: Duration,
    restarts: VecDeque<Instant>,
    stopping: Option<RpcReplyPort<()>>,
    /// The stage's heartbeat slot, mapped once the first process created it.
    heartbeat: Option<Heartbeat>,
    /// Restarts since the supervisor started, by reason.
    restarts_by_reason: std::collections::BTreeMap<&'static str, u64>,
    /// When the stage was last asked to shed.
    last_shed_request: Option<Instant>,
    /// A precise heartbeat check is scheduled.
    heartbeat_check_pending: bool,
    /// Ticks seen, for sampling every other one.
    sample_tick: u64,
    /// (when, items received, items sent, CPU seconds of the supervisor's view) on recent ticks,
    /// for rates over the last [`RATE_WINDOW`].
    samples: VecDeque<(Instant, u64, u64, f64)>,
    /// CPU seconds of the stage's finished processes (as last seen on a tick).
    cpu_base: f64,
    /// CPU seconds of the running process as last seen.
    cpu_last: f64,
    /// Event counters of the stage's finished processes (read from the slot at each exit), so
    /// the exposed counters never go back at a restart.
    counter_base: std::collections::BTreeMap<String, u64>,
}

/// Rates in `status` are over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A stage that stays over its soft budget is asked to shed again this often.
const SHED_REPEAT: Duration = Duration::from_secs(10);

/// Why the supervisor ended a stage process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    /// Over its hard memory budget (counted towards escalation: a stage whose rebuilt state
    /// alone exceeds the budget must not loop for ever).
    Memory,
    /// Its heartbeat was overdue.
    Hung,
    /// Stopped (SIGSTOP, a frozen cgroup) for the liveness timeout.
    Stopped,
    /// Held the writer lock without committing.
    WriterLock,
    /// An operator asked (`tailgate restart-stage`): restarted at once, not counted.
    Requested,
    /// Its configuration changed on reload: restarted at once, not counted.
    Reload,
}

impl KillReason {
    fn as_str(self) -> &'static str {
        match self {
            KillReason::Memory => "memory",
            KillReason::Hung => "hung",
            KillReason::Stopped => "stopped",
            KillReason::WriterLock => "writer_lock",
            KillReason::Requested => "requested",
            KillReason::Reload => "reload",
        }
    }
}

/// What a stage actor starts with.
#[derive(Debug)]
pub struct StageArgs {
    stage: StageId,
    launch: Arc<Launch>,
    queue: Queue,
    policy: SupervisorConfig,
}

impl StageActor {
    /// Kills a stage process that has been stopped for `liveness_timeout` (its exit restarts it).
    /// A stopped process ignores SIGTERM and may hold the queue's writer lock, which would stall
    /// every other stage; LMDB's robust lock is released when the holder dies.
    fn check_liveness(myself: &ActorRef<StageMsg>, state: &mut StageState) {
        let stopped = state.pid.and_then(crate::proc::process_state).is_some_and(|code| code == 'T' || code == 't');
        if !stopped {
            state.stopped_since = None;
            return;
        }
        let since = match state.stopped_since {
            Some(since) => since,
            None => {
                // Seen stopped for the first time: come back exactly when the timeout is up.
                let now = Instant::now();
                state.stopped_since = Some(now);
                myself.send_after(state.policy.liveness_timeout, || StageMsg::CheckStopped);
                now
            }
        };
        if since.elapsed() >= state.policy.liveness_timeout && state.stopping.is_none() {
            tracing::error!(
                stage = %state.stage,
                stopped_for = ?since.elapsed(),
                "stage process is stopped (SIGSTOP or a frozen cgroup); killing it so it restarts"
            );
            state.stopped_since = None;
            state.kill_reason = Some(KillReason::Stopped);
            StageActor::signal(state, rustix::process::Signal::KILL);
        }
    }

    /// Kills a stage process whose heartbeat promise is more than `liveness_timeout` overdue:
    /// it is running (a stopped one is handled above) but stuck, in a deadlock, an await that
    /// never completes, a blocked runtime or an endless loop. A process that never claimed its
    /// slot is judged from its start, with the allowance a stage has to open the queue.
    fn check_heartbeat(myself: &ActorRef<StageMsg>, state: &mut StageState) {
        let Some(pid) = state.pid else { return };
        if state.stopping.is_some() || state.stopped_since.is_some() || state.kill_reason.is_some() {
            return;
        }
        StageActor::open_slot(state);
        let overdue = match state.heartbeat.as_ref().and_then(|slot| slot.overdue(pid)) {
            Some(overdue) => overdue,
            None => state.started_at.elapsed().saturating_sub(REBUILD_ALLOWANCE),
        };
        if overdue < state.policy.liveness_timeout {
            // Late by more than a beat interval (a step never takes that long): come back
            // exactly when the timeout is up rather than at the next tick.
            if overdue > BEAT_INTERVAL && !state.heartbeat_check_pending {
                state.heartbeat_check_pending = true;
                let wait = state.policy.liveness_timeout - overdue + Duration::from_millis(1);
                myself.send_after(wait, || StageMsg::CheckHeartbeat);
            }
            return;
        }
        // Hung inside a write transaction: the writer-lock check names that (and kills it).
        let holds_lock = state.queue.writer_lock_owner().and_then(crate::proc::thread_group_of) == Some(pid);
        if holds_lock {
            return;
        }
        tracing::error!(
            stage = %state.stage,
            pid,
            overdue = ?overdue,
            "stage made no progress (heartbeat overdue): hung; killing it so it restarts"
        );
        state.kill_reason = Some(KillReason::Hung);
        StageActor::signal(state, rustix::process::Signal::KILL);
    }

    /// Holds the stage to its memory budget ([`SupervisorConfig::stage_memory`]): over the soft
    /// budget it is asked to shed (through its heartbeat slot, again every [`SHED_REPEAT`] while
    /// it stays over); over the hard budget it is drained (SIGTERM, SIGKILL after the shutdown
    /// timeout) and restarted, and that restart counts towards escalation.
    fn check_budget(myself: &ActorRef<StageMsg>, state: &mut StageState, private: u64) {
        if state.stopping.is_some() || state.kill_reason.is_some() {
            return;
        }
        let budget = state.policy.stage_memory(state.stage.as_str());
        let mib = |v: u64| v * 1024 * 1024;
        if private > mib(budget.hard_mib) {
            tracing::error!(
                stage = %state.stage,
                private_mib = private / (1024 * 1024),
                hard_budget_mib = budget.hard_mib,
                "stage over its hard memory budget; draining and restarting it (its state is in the queue)"
            );
            state.kill_reason = Some(KillReason::Memory);
            StageActor::drain(myself, state);
            return;
        }
        if private <= mib(budget.soft_mib) {
            return;
        }
        if state.last_shed_request.is_some_and(|at| at.elapsed() < SHED_REPEAT) {
            return;
        }
        StageActor::open_slot(state);
        if let Some(slot) = &state.heartbeat {
            tracing::warn!(
                stage = %state.stage,
                private_mib = private / (1024 * 1024),
                soft_budget_mib = budget.soft_mib,
                "stage over its soft memory budget; asking it to shed"
            );
            slot.request_shed();
            state.last_shed_request = Some(Instant::now());
        }
    }

    /// The stage's event counters since the supervisor started: finished processes' plus the
    /// running one's.
    fn counters(state: &StageState) -> std::collections::BTreeMap<String, u64> {
        let mut counters = state.counter_base.clone();
        if let (Some(pid), Some(slot)) = (state.pid, &state.heartbeat)
            && slot.read().0 == pid
        {
            for (name, value) in slot.counters() {
                *counters.entry(name).or_default() += value;
            }
        }
        counters
    }

    /// Records this tick's totals for the rates (CPU seconds summed over the stage's processes:
    /// the running one's plus what finished ones used, kept in `cpu_base`).
    fn sample(state: &mut StageState) {
        // Every other tick is enough for 10 s rates (each sample reads /proc/PID/stat).
        state.sample_tick = state.sample_tick.wrapping_add(1);
        if state.sample_tick.is_multiple_of(2) {
            return;
        }
        let counters = StageActor::counters(state);
        if let Some(seconds) = state.pid.and_then(crate::proc::cpu_seconds) {
            state.cpu_last = seconds;
        }
        let cpu = state.cpu_base + state.cpu_last;
        let now = Instant::now();
        state.samples.push_back((
            now,
            counters.get("received").copied().unwrap_or(0),
            counters.get("sent").copied().unwrap_or(0),
            cpu,
        ));
        while state.samples.len() > 2
            && state.samples.get(1).is_some_and(|(at, ..)| now.duration_since(*at) >= RATE_WINDOW)
        {
            state.samples.pop_front();
        }
    }

    /// (received/s, sent/s, CPU % of one core) over the samples kept.
    fn rates(state: &StageState) -> Option<(f64, f64, f64)> {
        let (first, last) = (state.samples.front()?, state.samples.back()?);
        let seconds = last.0.duration_since(first.0).as_secs_f64();
        if seconds < 0.5 {
            return None;
        }
        Some((
            last.1.saturating_sub(first.1) as f64 / seconds,
            last.2.saturating_sub(first.2) as f64 / seconds,
            ((last.3 - first.3) / seconds * 100.0).max(0.0),
        ))
    }

    fn describe(state: &mut StageState) -> StageStatus {
        StageActor::open_slot(state);
        let process_state = state.pid.and_then(crate::proc::process_state);
        let run_state = match (state.pid, process_state) {
            _ if state.stopping.is_some() => "stopping",
            (None, _) => "restarting",
            (Some(_), Some('T' | 't')) => "stopped",
            (Some(_), _) => "running",
        };
        let heartbeat_overdue_ms = state
            .pid
            .and_then(|pid| state.heartbeat.as_ref().and_then(|slot| slot.overdue(pid)))
            .map(|overdue| overdue.as_millis() as u64);
        StageStatus {
            stage: state.stage.as_str().to_string(),
            pid: state.pid,
            state: run_state.to_string(),
            uptime_seconds: if state.pid.is_some() { state.started_at.elapsed().as_secs_f64() } else { 0.0 },
            private_bytes: state.pid.and_then(crate::proc::private_memory_bytes),
            pss_bytes: state.pid.and_then(crate::proc::pss_bytes),
            cpu_seconds: state.pid.and_then(crate::proc::cpu_seconds),
            memory_soft_budget_bytes: state.policy.stage_memory(state.stage.as_str()).soft_mib * 1024 * 1024,
            memory_hard_budget_bytes: state.policy.stage_memory(state.stage.as_str()).hard_mib * 1024 * 1024,
            shed_requests: state.heartbeat.as_ref().map_or(0, |slot| slot.shed_counts().0),
            counters: StageActor::counters(state),
            rates: StageActor::rates(state).map(|(received, sent, cpu)| crate::report::Rates {
                received_per_second: received,
                sent_per_second: sent,
                cpu_percent: cpu,
            }),
            restarts: state.restarts_by_reason.iter().map(|(reason, n)| (reason.to_string(), *n)).collect(),
            restarts_in_window: state.restarts.len(),
            heartbeat_overdue_ms,
        }
    }

    fn spawn_process(myself: &ActorRef<StageMsg>, state: &mut StageState) -> Result<(), ActorProcessingErr> {
        let mut command = tokio::process::Command::new(&state.launch.exe);
        command.arg("stage").arg(state.stage.as_str()).arg("--data-dir").arg(&state.launch.data_dir);
        if let Some(file) = &state.launch.config_file {
            command.arg("--config").arg(file);
        }
        // Its own process group: a signal to the supervisor's group (Ctrl-C in a terminal,
        // `timeout`, `kill -- -PGID`) reaches the supervisor alone, which then stops the stages
        // in order. The stages learn of the supervisor's death through the parent-death signal.
        command.process_group(0);
        command.env(crate::stage_process::SUPERVISOR_PID_ENV, std::process::id().to_string());
        // Only the main process speaks to the service manager.
        for var in crate::notify::NOTIFY_ENV {
            command.env_remove(var);
        }
        command.stdin(std::process::Stdio::null()).kill_on_drop(false);
        let mut child = command.spawn()?;
        state.generation += 1;
        state.pid = child.id();
        state.pidfd = state
            .pid
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
            .and_then(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok());
        state.kill_reason = None;
        state.started_at = Instant::now();
        if let (Some(cgroups), Some(pid)) = (&state.launch.cgroups, state.pid) {
            cgroups.place(state.stage, pid);
        }
        tracing::info!(stage = %state.stage, pid = ?state.pid, "stage process started");
        let generation = state.generation;
        let actor = myself.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(err) => format!("wait failed: {err}"),
            };
            let _ = actor.send_message(StageMsg::Exited { generation, status });
        });
        Ok(())
    }

    /// Maps the stage's heartbeat slot once a process of the stage has created it.
    fn open_slot(state: &mut StageState) {
        if state.heartbeat.is_none() {
            state.heartbeat = Heartbeat::open(&socket_dir(&state.launch.data_dir), state.stage);
        }
    }

    /// Asks the running process to drain (SIGTERM) and kills it if it has not exited after the
    /// shutdown timeout.
    fn drain(myself: &ActorRef<StageMsg>, state: &StageState) {
        StageActor::signal(state, rustix::process::Signal::TERM);
        let generation = state.generation;
        myself.send_after(state.policy.shutdown_timeout, move || StageMsg::StopTimeout(generation));
    }

    fn signal(state: &StageState, signal: rustix::process::Signal) {
        if let Some(pidfd) = &state.pidfd {
            let _ = rustix::process::pidfd_send_signal(pidfd, signal);
        } else if let Some(pid) = state.pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    fn on_exit(myself: &ActorRef<StageMsg>, state: &mut StageState, status: String) -> Result<(), ActorProcessingErr> {
        // The slot outlives the process: its final counts join the base before the next
        // process resets them.
        if let (Some(pid), Some(slot)) = (state.pid, &state.heartbeat)
            && slot.read().0 == pid
        {
            for (name, value) in slot.counters() {
                *state.counter_base.entry(name).or_default() += value;
            }
        }
        state.pid = None;
        state.pidfd = None;
        state.cpu_base += std::mem::take(&mut state.cpu_last);
        match state.queue.clear_stale_readers() {
            Ok(cleared) if cleared > 0 => tracing::info!(stage = %state.stage, cleared, "cleared stale reader slots"),
            Ok(_) => {}
            Err(err) => tracing::warn!(stage = %state.stage, error = %err, "cannot clear stale reader slots"),
        }
        if let Some(reply) = state.stopping.take() {
            tracing::info!(stage = %state.stage, %status, "stage process stopped");
            let _ = reply.send(());
            myself.stop(None);
            return Ok(());
        }
        let now = Instant::now();
        if now.duration_since(state.started_at) >= BACKOFF_RESET_AFTER {
            state.backoff = state.policy.restart_backoff_initial;
        }
        let reason = state.kill_reason.take();
        *state.restarts_by_reason.entry(reason.map_or("exited", KillReason::as_str)).or_default() += 1;
        if matches!(reason, Some(KillReason::Requested | KillReason::Reload)) {
            tracing::info!(stage = %state.stage, %status, "stage process stopped on request; starting it again");
            myself.send_message(StageMsg::Start)?;
            return Ok(());
        }
        state.restarts.push_back(now);
        while state.restarts.front().is_some_and(|t| now.duration_since(*t) > state.policy.restart_window) {
            state.restarts.pop_front();
        }
        if state.restarts.len() > state.policy.max_restarts as usize {
            return Err(format!(
                "stage {} exited {} times within {:?}; giving up",
                state.stage,
                state.restarts.len(),
                state.policy.restart_window
            )
            .into());
        }
        tracing::warn!(stage = %state.stage, %status, restart_in = ?state.backoff, "stage process exited; restarting");
        myself.send_after(state.backoff, || StageMsg::Start);
        state.backoff = state.backoff.saturating_mul(2).min(state.policy.restart_backoff_max);
        Ok(())
    }
}

impl Actor for StageActor {
    type Msg = StageMsg;
    type State = StageState;
    type Arguments = StageArgs;

    async fn pre_start(&self, myself: ActorRef<StageMsg>, args: StageArgs) -> Result<StageState, ActorProcessingErr> {
        let mut state = StageState {
            stage: args.stage,
            launch: args.launch,
            queue: args.queue,
            backoff: args.policy.restart_backoff_initial,
            policy: args.policy,
            pid: None,
            pidfd: None,
            kill_reason: None,
            stopped_since: None,
            generation: 0,
            started_at: Instant::now(),
            restarts: VecDeque::new(),
            stopping: None,
            heartbeat: None,
            restarts_by_reason: Default::default(),
            last_shed_request: None,
            heartbeat_check_pending: false,
            sample_tick: 0,
            samples: VecDeque::new(),
            counter_base: Default::default(),
            cpu_base: 0.0,
            cpu_last: 0.0,
        };
        StageActor::spawn_process(&myself, &mut state)?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<StageMsg>,
        message: StageMsg,
        state: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            StageMsg::Start => {
                if state.pid.is_none() && state.stopping.is_none() {
                    StageActor::spawn_process(&myself, state)?;
                }
            }
            StageMsg::Exited { generation, status } => {
                if generation == state.generation {
                    StageActor::on_exit(&myself, state, status)?;
                }
            }
            StageMsg::Stop(reply) => {
                if state.pid.is_none() {
                    let _ = reply.send(());
                    myself.stop(None);
                } else {
                    state.stopping = Some(reply);
                    StageActor::drain(&myself, state);
                }
            }
            StageMsg::StopTimeout(generation) => {
                if generation == state.generation && state.pid.is_some() {
                    tracing::warn!(stage = %state.stage, "stage did not drain in time; killing it");
                    StageActor::signal(state, rustix::process::Signal::KILL);
                }
            }
            StageMsg::Pid(reply) => {
                let _ = reply.send(state.pid);
            }
            StageMsg::CheckStopped => StageActor::check_liveness(&myself, state),
            StageMsg::PauseIntake(paused, reply) => {
                StageActor::open_slot(state);
                if let Some(slot) = &state.heartbeat {
                    slot.set_intake_paused(paused);
                }
                let _ = reply.send(());
            }
            StageMsg::Shed(reply) => {
                StageActor::open_slot(state);
                let asked = match (&state.heartbeat, state.pid) {
                    (Some(slot), Some(_)) => {
                        tracing::info!(stage = %state.stage, "shed requested on the control socket");
                        slot.request_shed();
                        true
                    }
                    _ => false,
                };
                let _ = reply.send(asked);
            }
            StageMsg::CheckHeartbeat => {
                state.heartbeat_check_pending = false;
                StageActor::check_heartbeat(&myself, state);
            }
            StageMsg::Describe(reply) => {
                let _ = reply.send(StageActor::describe(state));
            }
            StageMsg::SetPolicy(policy) => {
                state.policy = policy;
            }
            StageMsg::Restart(reload, reply) => {
                let answer = match state.pid {
                    _ if state.stopping.is_some() => Err(format!("stage {} is stopping", state.stage)),
                    None => Err(format!("stage {} has no process now (a restart is pending)", state.stage)),
                    Some(_) if state.kill_reason.is_some() => {
                        Err(format!("stage {} is being restarted already", state.stage))
                    }
                    Some(pid) => {
                        tracing::info!(stage = %state.stage, pid, reload, "restart requested; draining the stage");
                        state.kill_reason = Some(if reload { KillReason::Reload } else { KillReason::Requested });
                        StageActor::drain(&myself, state);
                        Ok(pid)
                    }
                };
                let _ = reply.send(answer);
            }
            StageMsg::KillLockHolder(pid, held) => {
                if state.pid == Some(pid) && state.stopping.is_none() {
                    tracing::error!(
                        stage = %state.stage,
                        pid,
                        held_for = ?held,
                        "stage holds the queue's writer lock without progress (hung inside a write transaction); killing it so it restarts"
                    );
                    state.kill_reason = Some(KillReason::WriterLock);
                    StageActor::signal(state, rustix::process::Signal::KILL);
                }
            }
            StageMsg::CheckMemory(reply) => {
                let private = state.pid.and_then(crate::proc::private_memory_bytes);
                if let Some(bytes) = private {
                    StageActor::check_budget(&myself, state, bytes);
                }
                StageActor::check_liveness(&myself, state);
                StageActor::check_heartbeat(&myself, state);
                StageActor::sample(state);
                let _ = reply.send(private);
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<StageMsg>, state: &mut StageState) -> Result<(), ActorProcessingErr> {
        // Never leave an orphan behind, whatever stopped the actor.
        StageActor::signal(state, rustix::process::Signal::KILL);
        Ok(())
    }
}

/// Messages of the supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Stop every stage in order, then the supervisor.
    Shutdown(RpcReplyPort<()>),
    /// Periodic fsync of the queue.
    Sync,
    /// A child changed state (SIGCHLD: exited, stopped, continued).
    ChildSignal,
    /// A request on the control socket.
    Control(Request, RpcReplyPort<serde_json::Value>),
    /// Reload the configuration (SIGHUP: no reply; `tailgate reload`: the restarted stages or
    /// why nothing changed).
    Reload(Option<RpcReplyPort<Result<Vec<String>, String>>>),
    /// Pause (true) or resume intake; replies when receive's slot holds it.
    PauseIntake(bool, RpcReplyPort<()>),
    /// Items still queued per edge (edges with anything left only).
    Backlog(RpcReplyPort<std::collections::BTreeMap<String, u64>>),
    /// What the telemetry endpoint serves: every stage and the queue.
    Telemetry(RpcReplyPort<crate::telemetry::Snapshot>),
}

/// The root actor.
#[derive(Debug)]
pub struct Supervisor;

/// What the supervisor starts with.
#[derive(Debug)]
pub struct SupervisorArgs {
    launch: Arc<Launch>,
    config: Config,
    queue: Queue,
    policy: SupervisorConfig,
    sync_interval: Duration,
    escalated: Arc<AtomicBool>,
}

/// The supervisor's state.
#[derive(Debug)]
pub struct SupervisorState {
    stages: Vec<(StageId, ActorRef<StageMsg>)>,
    /// How the stages were started, and the operator's file for reloads.
    launch: Arc<Launch>,
    /// The active configuration.
    config: Config,
    queue: Queue,
    last_synced_txn: u64,
    escalated: Arc<AtomicBool>,
    shutting_down: bool,
    memory_soft_limit_bytes: u64,
    over_soft_limit: bool,
    /// Whether `lock.mdb` can be read for the writer lock's owner on this LMDB build.
    lock_watch_enabled: bool,
    /// The writer lock's owner (TID) and the last committed transaction when it was first seen
    /// holding it, and since when.
    lock_watch: Option<(u32, u64, Instant)>,
    liveness_timeout: Duration,
}

impl SupervisorState {
    /// The actor of `stage`.
    fn actor(&self, stage: StageId) -> Option<&ActorRef<StageMsg>> {
        self.stages.iter().find(|(id, _)| *id == stage).map(|(_, actor)| actor)
    }
}

/// A stage that holds the queue's writer lock and does not commit (a deadlock or a stall inside
/// a write transaction; a stopped holder is handled by the stopped-state check) stalls every
/// other writer. Seen on the same owner with no commit for `liveness_timeout`, the holding stage
/// is killed; LMDB's robust lock is released when its holder dies. Stages waiting for the lock
/// are never blamed: only the owner is.
async fn check_writer_lock(state: &mut SupervisorState) {
    if !state.lock_watch_enabled {
        return;
    }
    let Some(owner) = state.queue.writer_lock_owner() else {
        state.lock_watch = None;
        return;
    };
    let txn = state.queue.last_txn_id();
    let since = match state.lock_watch {
        Some((seen, seen_txn, since)) if seen == owner && seen_txn == txn => since,
        _ => {
            state.lock_watch = Some((owner, txn, Instant::now()));
            return;
        }
    };
    let held = since.elapsed();
    if held < state.liveness_timeout {
        return;
    }
    let Some(pid) = crate::proc::thread_group_of(owner) else { return };
    let mut ours = false;
    for (_, actor) in &state.stages {
        if let Ok(Some(stage_pid)) = ractor::call!(actor, StageMsg::Pid)
            && stage_pid == pid
        {
            ours = true;
            let _ = actor.cast(StageMsg::KillLockHolder(pid, held));
        }
    }
    if !ours {
        tracing::warn!(pid, held_for = ?held, "a process that is not a stage holds the queue's writer lock; writers wait");
    }
    // Judge the next owner (or this one again) afresh.
    state.lock_watch = None;
}

/// Restarts stages over the hard limit (in their actors) and warns once per crossing when all
/// stages together are over the soft limit.
async fn check_memory(state: &mut SupervisorState) {
    let mut total = 0u64;
    for (_, actor) in &state.stages {
        if let Ok(Some(bytes)) = ractor::call!(actor, StageMsg::CheckMemory) {
            total += bytes;
        }
    }
    let over = total > state.memory_soft_limit_bytes;
    if over && !state.over_soft_limit {
        tracing::warn!(private_mib = total / (1024 * 1024), "stages together are over the memory soft limit");
    }
    state.over_soft_limit = over;
}

/// Pauses intake and waits until every queue edge is empty or `timeout` passes. Runs in the
/// control connection's task, asking the supervisor actor between waits, so the actor keeps
/// supervising meanwhile.
async fn drain(supervisor: &ActorRef<SupervisorMsg>, timeout: Duration) -> serde_json::Value {
    if let Err(err) = ractor::call!(supervisor, SupervisorMsg::PauseIntake, true) {
        return serde_json::json!({ "error": format!("supervisor did not answer: {err}") });
    }
    tracing::info!(?timeout, "draining: intake paused, waiting for the queue to empty");
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = match ractor::call!(supervisor, SupervisorMsg::Backlog) {
            Ok(remaining) => remaining,
            Err(err) => return serde_json::json!({ "error": format!("supervisor did not answer: {err}") }),
        };
        let drained = remaining.is_empty();
        if drained || Instant::now() >= deadline {
            tracing::info!(drained, ?remaining, "drain finished; intake stays paused until resume");
            return serde_json::json!({ "drained": drained, "remaining": remaining });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Validates the operator's file, makes it the active snapshot, hands the supervisor's section
/// to every stage actor and restarts the stages whose configuration changed.
async fn reload(state: &mut SupervisorState) -> Result<Vec<String>, String> {
    let Some(source) = state.launch.source_config.clone() else {
        return Err("tailgate was started without --config: there is no file to reload".to_string());
    };
    let (config, text) = crate::reload::load(&source, &state.config.data_dir)?;
    let stages = crate::reload::changed_stages(&state.config, &config)?;
    crate::reload::write_snapshot(&state.config.data_dir, &text)
        .map_err(|err| format!("cannot write the active configuration: {err}"))?;
    for (_, actor) in &state.stages {
        let _ = actor.cast(StageMsg::SetPolicy(config.supervisor.clone()));
    }
    let mut restarted = Vec::new();
    for (stage, actor) in &state.stages {
        if !stages.contains(stage) {
            continue;
        }
        match ractor::call!(actor, StageMsg::Restart, true) {
            Ok(Ok(_)) => restarted.push(stage.as_str().to_string()),
            // No process right now (a restart is pending): it starts with the new snapshot.
            Ok(Err(message)) => tracing::info!(stage = %stage, %message, "not restarted for the reload"),
            Err(err) => return Err(format!("stage actor {stage} did not answer: {err}")),
        }
    }
    state.liveness_timeout = config.supervisor.liveness_timeout;
    state.memory_soft_limit_bytes = config.supervisor.memory_soft_limit_mib * 1024 * 1024;
    state.config = config;
    Ok(restarted)
}

/// Answers a control socket request.
async fn control_answer(state: &mut SupervisorState, request: Request) -> serde_json::Value {
    match request {
        Request::Status => {
            let mut stages = Vec::new();
            for (_, actor) in &state.stages {
                if let Ok(status) = ractor::call!(actor, StageMsg::Describe) {
                    stages.push(status);
                }
            }
            serde_json::json!({ "stages": stages })
        }
        Request::Shutdown | Request::Drain { .. } => serde_json::json!({ "error": "handled before the actor" }),
        Request::Resume => {
            if let Some(receive) = state.actor(StageId::Receive) {
                let _ = ractor::call!(receive, StageMsg::PauseIntake, false);
            }
            tracing::info!("intake resumed");
            serde_json::json!({ "resumed": true })
        }
        Request::Shed { stage } => {
            let wanted = match stage.as_deref().map(StageId::parse) {
                None => None,
                Some(Some(id)) => Some(id),
                Some(None) => {
                    return serde_json::json!({ "error": format!("unknown stage {:?}", stage.unwrap_or_default()) });
                }
            };
            let mut shed = Vec::new();
            for (id, actor) in &state.stages {
                if wanted.is_none_or(|w| w == *id) && ractor::call!(actor, StageMsg::Shed).unwrap_or(false) {
                    shed.push(id.as_str());
                }
            }
            serde_json::json!({ "shed": shed })
        }
        Request::Reload => match reload(state).await {
            Ok(stages) => {
                tracing::info!(restarted = ?stages, "configuration reloaded");
                serde_json::json!({ "reloaded": true, "restarted": stages })
            }
            Err(message) => {
                tracing::error!(error = %message, "configuration not reloaded; nothing changed");
                serde_json::json!({ "error": message })
            }
        },
        Request::RestartStage { stage } => {
            let Some(id) = StageId::parse(&stage) else {
                return serde_json::json!({ "error": format!("unknown stage {stage:?}") });
            };
            let Some(actor) = state.actor(id) else {
                return serde_json::json!({ "error": format!("stage {stage} is not supervised") });
            };
            match ractor::call!(actor, StageMsg::Restart, false) {
                Ok(Ok(pid)) => serde_json::json!({ "restarted": stage, "pid": pid }),
                Ok(Err(message)) => serde_json::json!({ "error": message }),
                Err(err) => serde_json::json!({ "error": format!("stage actor did not answer: {err}") }),
            }
        }
    }
}

async fn stop_stages(stages: &[(StageId, ActorRef<StageMsg>)]) {
    for (stage, actor) in stages {
        if let Err(err) = ractor::call!(actor, StageMsg::Stop) {
            tracing::debug!(stage = %stage, error = %err, "stage actor already gone");
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut stages = Vec::new();
        for stage in StageId::ALL {
            let stage_args = StageArgs {
                stage,
                launch: args.launch.clone(),
                queue: args.queue.clone(),
                policy: args.policy.clone(),
            };
            let (actor, _handle) =
                Actor::spawn_linked(Some(format!("stage-{stage}")), StageActor, stage_args, myself.get_cell()).await?;
            stages.push((stage, actor));
        }
        myself.send_interval(args.sync_interval, || SupervisorMsg::Sync);
        let telemetry = &args.policy.telemetry;
        let source: crate::telemetry::Source = {
            let supervisor = myself.clone();
            std::sync::Arc::new(move || {
                let supervisor = supervisor.clone();
                Box::pin(async move {
                    let timeout = crate::telemetry::SCRAPE_TIMEOUT.as_millis() as u64;
                    ractor::call_t!(supervisor, SupervisorMsg::Telemetry, timeout)
                        .map_err(|err| format!("supervisor did not answer: {err}"))
                })
            })
        };
        if telemetry.enabled
            && let Err(err) = crate::telemetry::serve(telemetry.endpoint, source)
        {
            tracing::error!(endpoint = %telemetry.endpoint, error = %err, "cannot serve self-metrics; the pipeline runs without them");
        }
        let handler: crate::control::Handler = {
            let supervisor = myself.clone();
            std::sync::Arc::new(move |request| {
                let supervisor = supervisor.clone();
                Box::pin(async move {
                    if let Request::Drain { timeout_seconds } = request {
                        let timeout = Duration::from_secs(timeout_seconds.unwrap_or(60));
                        return drain(&supervisor, timeout).await;
                    }
                    match ractor::call!(supervisor, SupervisorMsg::Control, request) {
                        Ok(reply) => reply,
                        Err(err) => serde_json::json!({ "error": format!("supervisor did not answer: {err}") }),
                    }
                })
            })
        };
        if let Err(err) = crate::control::serve(&args.launch.data_dir, handler) {
            tracing::warn!(error = %err, "cannot open the control socket; status shows the queue only, restart-stage is unavailable");
        }
        // A stopped child raises SIGCHLD at once: the liveness clock starts when the stage stops,
        // not at the next tick. (The tick still catches stops that raise no SIGCHLD.)
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(mut children) => {
                let supervisor = myself.clone();
                tokio::spawn(async move {
                    while children.recv().await.is_some() {
                        if supervisor.cast(SupervisorMsg::ChildSignal).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(err) => tracing::warn!(error = %err, "no SIGCHLD stream; stopped stages are noticed on the tick"),
        }
        let lock_watch_enabled = args.queue.writer_lock_layout_ok();
        if !lock_watch_enabled {
            tracing::warn!(
                "cannot read the queue's writer lock owner on this LMDB build; a stage hung inside a write transaction is not detected"
            );
        }
        Ok(SupervisorState {
            lock_watch_enabled,
            lock_watch: None,
            liveness_timeout: args.policy.liveness_timeout,
            memory_soft_limit_bytes: args.policy.memory_soft_limit_mib * 1024 * 1024,
            over_soft_limit: false,
            stages,
            launch: args.launch.clone(),
            config: args.config,
            last_synced_txn: args.queue.last_txn_id(),
            queue: args.queue,
            escalated: args.escalated,
            shutting_down: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Sync => {
                let txn = state.queue.last_txn_id();
                if txn != state.last_synced_txn {
                    if let Err(err) = state.queue.force_sync() {
                        tracing::error!(error = %err, "queue fsync failed");
                    }
                    state.last_synced_txn = txn;
                }
                if !state.shutting_down {
                    check_memory(state).await;
                    check_writer_lock(state).await;
                }
            }
            SupervisorMsg::PauseIntake(paused, reply) => {
                if let Some(receive) = state.actor(StageId::Receive) {
                    let _ = ractor::call!(receive, StageMsg::PauseIntake, paused);
                }
                let _ = reply.send(());
            }
            SupervisorMsg::Backlog(reply) => {
                let mut remaining = std::collections::BTreeMap::new();
                if let Ok(txn) = state.queue.read() {
                    for edge in tailgate_ipc::Edge::ALL {
                        if let Ok(depth) = state.queue.depth(&txn, edge)
                            && (depth.batches > 0 || depth.items > 0)
                        {
                            remaining.insert(edge.as_str().to_string(), depth.items.max(depth.batches));
                        }
                    }
                }
                let _ = reply.send(remaining);
            }
            SupervisorMsg::Reload(reply) => {
                let outcome = reload(state).await;
                match &outcome {
                    Ok(stages) => tracing::info!(restarted = ?stages, "configuration reloaded"),
                    Err(err) => tracing::error!(error = %err, "configuration not reloaded; nothing changed"),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }
            SupervisorMsg::Telemetry(reply) => {
                let mut stages = Vec::new();
                for (_, actor) in &state.stages {
                    if let Ok(status) = ractor::call!(actor, StageMsg::Describe) {
                        stages.push(status);
                    }
                }
                let _ = reply.send(crate::telemetry::Snapshot::take(&state.queue, stages));
            }
            SupervisorMsg::Control(Request::Shutdown, reply) => {
                tracing::info!("shutdown requested on the control socket");
                let _ = reply.send(serde_json::json!({ "stopping": true }));
                let (done, _) = ractor::concurrency::oneshot();
                myself.cast(SupervisorMsg::Shutdown(done.into()))?;
            }
            SupervisorMsg::Control(request, reply) => {
                let _ = reply.send(control_answer(state, request).await);
            }
            SupervisorMsg::ChildSignal => {
                for (_, actor) in &state.stages {
                    let _ = actor.cast(StageMsg::CheckStopped);
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                state.shutting_down = true;
                stop_stages(&state.stages).await;
                let _ = std::fs::remove_file(crate::control::socket_path(&state.launch.data_dir));
                if let Err(err) = state.queue.force_sync() {
                    tracing::error!(error = %err, "final queue fsync failed");
                }
                let _ = reply.send(());
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = event {
            if state.shutting_down {
                return Ok(());
            }
            tracing::error!(actor = ?cell.get_name(), error = %err, "stage supervision failed; shutting down to escalate");
            state.shutting_down = true;
            state.escalated.store(true, Ordering::SeqCst);
            stop_stages(&state.stages).await;
            myself.stop(Some("escalated".into()));
        }
        Ok(())
    }
}

/// `tailgate run`.
pub fn main(config_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> ExitCode {
    let config = match crate::load_config(config_file.as_deref(), data_dir) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tailgate: {err}");
            return ExitCode::FAILURE;
        }
    };
    crate::logging::init(&config.log_level, config.log_format);
    tailgate_ipc::memory::tune_allocator();
    tailgate_ipc::memory::spawn_trimmer();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tailgate: cannot start runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervise(config, config_file)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = %err, "supervisor failed");
            ExitCode::FAILURE
        }
    }
}

fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    if path.is_absolute() { Ok(path.to_path_buf()) } else { Ok(std::env::current_dir()?.join(path)) }
}

/// Tells the service manager how the tree is (see [`crate::notify`]): every tick (half the
/// watchdog timeout, else 2 s) asks the supervisor actor for a snapshot; an answer in time
/// means healthy (a watchdog ping); READY once every stage is up; STATUS when it changes.
async fn notify_loop(notifier: Arc<crate::notify::Notifier>, supervisor: ActorRef<SupervisorMsg>) {
    let interval =
        notifier.watchdog.unwrap_or(Duration::from_secs(2)).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let mut ready = false;
    let mut last_status = String::new();
    loop {
        let timeout = interval.as_millis() as u64;
        let snapshot = ractor::call_t!(supervisor, SupervisorMsg::Telemetry, timeout);
        match snapshot {
            Ok(snapshot) if snapshot.queue_readable() => {
                if notifier.watchdog.is_some() {
                    notifier.send("WATCHDOG=1");
                }
                let status = crate::notify::status_line(&snapshot);
                if !ready && snapshot.stages_ready() {
                    ready = true;
                    notifier.send(&format!("READY=1\nSTATUS={status}"));
                    last_status = status;
                } else if status != last_status {
                    notifier.send(&format!("STATUS={status}"));
                    last_status = status;
                }
            }
            Ok(_) => tracing::warn!("queue unreadable: no watchdog ping"),
            Err(err) => tracing::warn!(error = %err, "supervisor did not answer in time: no watchdog ping"),
        }
        tokio::time::sleep(interval).await;
    }
}

async fn supervise(mut config: Config, config_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    config.data_dir = absolute(&config.data_dir)?;
    std::fs::create_dir_all(&config.data_dir)?;
    // One supervisor per data directory: a second one would misread the RUNNING marker and
    // start a second set of stages on the same queue.
    let instance_lock = std::fs::File::create(config.data_dir.join("supervisor.lock"))?;
    if instance_lock.try_lock().is_err() {
        anyhow::bail!("another tailgate is running with data dir {}", config.data_dir.display());
    }
    crate::startup::end_orphaned_stages(&config.data_dir, config.supervisor.shutdown_timeout);
    let queue = crate::startup::open_queue(&config)?;
    // Stages read the validated snapshot, never the operator's file directly: an edit takes
    // effect on reload, after validation, not at the next crash restart.
    let source_config = config_file.map(|f| absolute(&f)).transpose()?;
    let active_config = match &source_config {
        Some(source) => {
            let (_, text) = crate::reload::load(source, &config.data_dir).map_err(|err| anyhow::anyhow!(err))?;
            Some(crate::reload::write_snapshot(&config.data_dir, &text)?)
        }
        None => None,
    };
    let launch = Arc::new(Launch {
        exe: std::env::current_exe()?,
        config_file: active_config,
        source_config,
        data_dir: config.data_dir.clone(),
        cgroups: crate::cgroups::setup(&config.supervisor.cgroups),
    });
    let escalated = Arc::new(AtomicBool::new(false));
    let launch_cgroups = launch.clone();
    let args = SupervisorArgs {
        launch,
        config: config.clone(),
        queue,
        policy: config.supervisor.clone(),
        sync_interval: config.queue.sync_interval,
        escalated: escalated.clone(),
    };
    let (supervisor, handle) = Actor::spawn(Some("supervisor".into()), Supervisor, args).await?;
    tracing::info!(data_dir = %config.data_dir.display(), version = env!("CARGO_PKG_VERSION"), "tailgate started");
    let notifier = crate::notify::Notifier::from_env().map(Arc::new);
    let notifying = notifier.clone().map(|notifier| tokio::spawn(notify_loop(notifier, supervisor.clone())));
    tokio::pin!(handle);
    let stop = crate::wait_for_stop_signal();
    tokio::pin!(stop);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = &mut stop => {
                tracing::info!("shutting down: stopping intake, draining stages");
                if let Some(notifier) = &notifier {
                    notifier.send("STOPPING=1\nSTATUS=stopping: draining stages");
                }
                if let Err(err) = ractor::call!(supervisor, SupervisorMsg::Shutdown) {
                    tracing::warn!(error = %err, "supervisor already stopped");
                }
                let _ = (&mut handle).await;
                break;
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                match &notifier {
                    Some(notifier) => {
                        notifier.reloading();
                        // The manager waits for READY=1 to end the reload (valid or not: a
                        // refused file leaves the running configuration in place).
                        let _ = ractor::call!(supervisor, |reply| SupervisorMsg::Reload(Some(reply)));
                        notifier.send("READY=1");
                    }
                    None => {
                        let _ = supervisor.cast(SupervisorMsg::Reload(None));
                    }
                }
            }
            _ = &mut handle => break,
        }
    }
    if let Some(task) = notifying {
        task.abort();
    }
    if escalated.load(Ordering::SeqCst) {
        tracing::error!("exiting non-zero so the service manager restarts tailgate");
        return Ok(ExitCode::FAILURE);
    }
    if let Some(cgroups) = &launch_cgroups.cgroups {
        cgroups.remove();
    }
    crate::startup::clear_running_marker(&config.data_dir);
    tracing::info!("tailgate stopped cleanly");
    drop(instance_lock);
    Ok(ExitCode::SUCCESS)
}
