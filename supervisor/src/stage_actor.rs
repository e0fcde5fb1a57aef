//! One stage process under the supervisor: its actor starts the process by re-executing this
//! binary (`tailgate stage <name>`), watches it (exit, heartbeat, memory), drains and restarts
//! it with capped exponential backoff, and describes it for `status` and `/metrics`.

use crate::report::StageStatus;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tailgate_config::SupervisorConfig;
use tailgate_ipc::heartbeat::{BEAT_INTERVAL, Heartbeat};
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
    /// The running process's PSS as last read: (pid, when, bytes).
    pss: Option<(u32, Instant, u64)>,
}

/// Rates in `status` are over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// `status` reads a stage's PSS at most this often (see [`StageActor::pss`]).
const PSS_REFRESH: Duration = Duration::from_secs(5);

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
    pub(crate) stage: StageId,
    pub(crate) launch: Arc<Launch>,
    pub(crate) queue: Queue,
    pub(crate) policy: SupervisorConfig,
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

    /// The running process's PSS, read at most every [`PSS_REFRESH`]: `smaps_rollup` walks
    /// every page the process maps, the whole queue included (a GiB of backlog makes one read
    /// milliseconds), and a status poller asking every second must not cost percents of a core.
    fn pss(state: &mut StageState) -> Option<u64> {
        let pid = state.pid?;
        if let Some((seen_pid, at, bytes)) = state.pss
            && seen_pid == pid
            && at.elapsed() < PSS_REFRESH
        {
            return Some(bytes);
        }
        let bytes = crate::proc::pss_bytes(pid)?;
        state.pss = Some((pid, Instant::now(), bytes));
        Some(bytes)
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
        let started = state.pid.is_some_and(|pid| state.heartbeat.as_ref().is_some_and(|slot| slot.started_by(pid)));
        StageStatus {
            started,
            stage: state.stage.as_str().to_string(),
            pid: state.pid,
            state: run_state.to_string(),
            uptime_seconds: if state.pid.is_some() { state.started_at.elapsed().as_secs_f64() } else { 0.0 },
            private_bytes: state.pid.and_then(crate::proc::private_memory_bytes),
            pss_bytes: StageActor::pss(state),
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
            pss: None,
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
