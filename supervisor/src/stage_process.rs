//! `tailgate stage <name>`: one stage in its own process. It opens the shared queue, binds its
//! wake-up socket, takes its single-instance lock, and runs until SIGTERM/SIGINT (drain, exit 0)
//! or failure (exit 1; the supervisor restarts it and the queue restores its state).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tailgate_config::Config;
use tailgate_ipc::heartbeat::Heartbeat;
use tailgate_ipc::wake::{WakeListener, Waker, socket_dir};
use tailgate_ipc::{Queue, QueueOptions, StageId};
use tailgate_stages::events::StageEvents;
use tailgate_stages::limits::REBUILD_ALLOWANCE;
use tailgate_stages::{StageContext, StageError, run_stage};
use tracing::Instrument;

/// Environment variable that tells a stage process its supervisor's pid.
pub const SUPERVISOR_PID_ENV: &str = "TAILGATE_SUPERVISOR_PID";

/// Options every process opens the queue with.
pub fn queue_options(config: &Config) -> QueueOptions {
    QueueOptions {
        max_size_bytes: config.queue.max_size_mib * 1024 * 1024,
        inactive_consumers: tailgate_stages::export::inactive_consumers(config),
        ..QueueOptions::default()
    }
}

/// Entry point of a stage process.
pub fn main(name: &str, config_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> ExitCode {
    let Some(stage) = StageId::parse(name) else {
        eprintln!("unknown stage {name:?}; expected one of receive, tail_sample, log_mirror, spanmetrics, export");
        return ExitCode::FAILURE;
    };
    name_process(stage);
    // If the supervisor dies without stopping us, stop too (SIGTERM: drain as usual). The signal
    // is only armed from now on: a supervisor that died before this line left us orphaned
    // already, which the parent pid tells.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    let supervisor = std::env::var(SUPERVISOR_PID_ENV).ok().and_then(|pid| pid.parse::<i32>().ok());
    let parent = rustix::process::getppid().map(|pid| pid.as_raw_nonzero().get());
    if let Some(expected) = supervisor
        && parent != Some(expected)
    {
        eprintln!("stage {stage}: supervisor {expected} is gone; not starting");
        return ExitCode::FAILURE;
    }
    let config = match crate::load_config(config_file.as_deref(), data_dir) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("stage {stage}: {err}");
            return ExitCode::FAILURE;
        }
    };
    crate::logging::init(&config.log_level, config.log_format);
    tailgate_ipc::memory::tune_allocator();
    tailgate_ipc::memory::spawn_trimmer();
    let runtime = match stage {
        StageId::Export => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build(),
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("stage {stage}: cannot start runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let span = tracing::info_span!("stage", name = %stage);
    match runtime.block_on(run(stage, config).instrument(span)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(stage = %stage, error = %err, "stage exited");
            ExitCode::FAILURE
        }
    }
}

/// Sets the kernel's process name (`comm`, shown by `ps -o comm` and `top`) to `tg-<stage>`;
/// the full command line (`ps -f`) reads `tailgate stage <stage>`.
fn name_process(stage: StageId) {
    let name = format!("tg-{}", stage.as_str());
    if let Ok(name) = std::ffi::CString::new(name) {
        let _ = rustix::thread::set_name(&name);
    }
}

async fn run(stage: StageId, config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let run_dir = socket_dir(&data_dir);
    std::fs::create_dir_all(&run_dir)?;
    let lock = std::fs::File::create(run_dir.join(format!("{}.lock", stage.as_str())))?;
    if lock.try_lock().is_err() {
        anyhow::bail!("another {stage} process holds {}", run_dir.display());
    }
    // Claimed before the queue is opened: the supervisor judges this process by it from now on.
    let heartbeat = Arc::new(Heartbeat::claim(&run_dir, stage, REBUILD_ALLOWANCE)?);
    let queue = Queue::open(&config.queue_dir(), &queue_options(&config))?;
    // Receive stamps, due times and decision stamps are on the queue's pipeline clock.
    tailgate_ipc::clock::establish(&queue)?;
    tailgate_stages::fault::watch_clock_step(&run_dir);
    let waker = Arc::new(Waker::new(&run_dir)?);
    let wake = WakeListener::bind(&run_dir, stage)?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::wait_for_stop_signal().await;
        tracing::info!("stop requested; draining");
        let _ = stop.send(true);
    });
    let config = Arc::new(config);
    let events = Arc::new(StageEvents::new(stage));
    events.attach(heartbeat.clone());
    let mut wake = Some(wake);
    loop {
        let ctx = StageContext {
            stage,
            config: config.clone(),
            queue: queue.clone(),
            waker: waker.clone(),
            wake: match wake.take() {
                Some(wake) => wake,
                None => WakeListener::bind(&run_dir, stage)?,
            },
            shutdown: shutdown.clone(),
            events: events.clone(),
            heartbeat: heartbeat.clone(),
        };
        tracing::debug!("stage started");
        match run_stage(ctx).await {
            Ok(()) => break,
            // Damage found while reading: repair exactly that entry, record it, and start the
            // stage over from its durable state (what a restart would do, without one).
            Err(StageError::Queue(err)) if err.is_damage() => match queue.repair_damage(&err)? {
                Some(record) => {
                    tracing::error!(repair = %record, "queue damage repaired; stage starts over");
                    heartbeat.beat_within(REBUILD_ALLOWANCE);
                }
                None => return Err(err.into()),
            },
            Err(err) => return Err(err.into()),
        }
    }
    events.publish_final(&heartbeat);
    drop(lock);
    Ok(())
}
