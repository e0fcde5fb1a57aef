//! The supervisor: a ractor actor tree with one [`StageActor`] (in `stage_actor.rs`) per stage
//! process under one [`Supervisor`].
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

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tailgate_config::{Config, SupervisorConfig};

use crate::control::Request;
use tailgate_ipc::{Queue, StageId};

use crate::stage_actor::{Launch, StageActor, StageArgs, StageMsg};

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
        // Self-metrics first: /healthz answers before any stage's listener does, so a probe
        // that waits for the receivers can rely on it (scrapes wait for pre_start to finish).
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
