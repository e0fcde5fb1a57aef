//! The `tailgate` binary's library: the supervisor (a ractor actor tree, one actor per stage
//! process) and the stage process entry point.
#![forbid(unsafe_code)]

mod proc;
pub mod stage_process;
mod startup;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tailgate_config::{Config, ConfigError};

/// Loads the configuration from `file`, or the embedded default, and applies `data_dir`.
pub fn load_config(file: Option<&Path>, data_dir: Option<PathBuf>) -> Result<Config, ConfigError> {
    let mut config = match file {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default()?,
    };
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    Ok(config)
}

/// `tailgate check-config FILE`.
pub fn check_config(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{}: {err}", file.display());
            ExitCode::FAILURE
        }
    }
}

/// `tailgate status`: the queue's depth per edge and consumer, read from the live environment.
pub fn status(config_file: Option<PathBuf>, data_dir: Option<PathBuf>, clear_losses: bool) -> ExitCode {
    let result =
        if clear_losses { clear_loss_records(config_file, data_dir) } else { print_status(config_file, data_dir) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tailgate status: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `tailgate dead-letter list|replay|drop [--consumer C]`.
pub fn dead_letter(
    action: &str,
    consumer: Option<&str>,
    config_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> ExitCode {
    match run_dead_letter(action, consumer, config_file, data_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tailgate dead-letter: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run_dead_letter(
    action: &str,
    consumer: Option<&str>,
    config_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    use tailgate_stages::export::dead_letter;
    let config = load_config(config_file.as_deref(), data_dir)?;
    let queue_dir = config.queue_dir();
    if !queue_dir.join("data.mdb").exists() {
        anyhow::bail!("no queue at {}", queue_dir.display());
    }
    let consumer = match consumer {
        None => None,
        Some(name) => Some(
            tailgate_ipc::Consumer::ALL
                .into_iter()
                .find(|c| c.as_str() == name)
                .ok_or_else(|| anyhow::anyhow!("unknown consumer {name:?}"))?,
        ),
    };
    let options = stage_process::queue_options(&config);
    match action {
        "list" => {
            let queue = tailgate_ipc::Queue::open_read_only(&queue_dir, &options)?;
            let txn = queue.read()?;
            let letters = dead_letter::list(&queue, &txn, consumer)?;
            println!("{} dead letters", letters.len());
            for letter in letters {
                println!(
                    "  {} {} {} items, {} bytes, {}: {}",
                    format_unix_ms(letter.at_unix_ms),
                    letter.consumer,
                    letter.items,
                    letter.request.len(),
                    letter.reason,
                    letter.message
                );
            }
        }
        "replay" => {
            let queue = tailgate_ipc::Queue::open(&queue_dir, &options)?;
            dead_letter::request_replay(&queue)?;
            // Wake export, which may be idle.
            if let Ok(waker) = tailgate_ipc::wake::Waker::new(&tailgate_ipc::wake::socket_dir(&config.data_dir)) {
                waker.wake(tailgate_ipc::StageId::Export);
            }
            println!("replay requested; the export stage sends the dead letters again (see `dead-letter list`)");
        }
        _ => {
            let queue = tailgate_ipc::Queue::open(&queue_dir, &options)?;
            println!("{} dead letters dropped", dead_letter::drop_all(&queue, consumer)?);
        }
    }
    Ok(())
}

fn clear_loss_records(config_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load_config(config_file.as_deref(), data_dir)?;
    let queue_dir = config.queue_dir();
    if !queue_dir.join("data.mdb").exists() {
        anyhow::bail!("no queue at {}", queue_dir.display());
    }
    let queue = tailgate_ipc::Queue::open(&queue_dir, &stage_process::queue_options(&config))?;
    println!("{} damage records acknowledged", queue.clear_losses()?);
    Ok(())
}

fn print_status(config_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use tailgate_ipc::{Edge, Queue};
    let config = load_config(config_file.as_deref(), data_dir)?;
    let queue_dir = config.queue_dir();
    if !queue_dir.join("data.mdb").exists() {
        anyhow::bail!("no queue at {}", queue_dir.display());
    }
    // Read-only: never waits behind a stuck writer, never grows the file, shows the budget the
    // queue was created with.
    let queue = Queue::open_read_only(&queue_dir, &stage_process::queue_options(&config))?;
    let txn = queue.read()?;
    let used = queue.used_bytes(&txn)?;
    let capacity = queue.capacity_bytes();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!(
        "queue {}: {:.1} MiB in use of {:.0} MiB ({:.1}%), intake {}",
        queue_dir.display(),
        mib(used),
        mib(capacity),
        used as f64 / capacity as f64 * 100.0,
        if queue.admits(&txn)? { "open" } else { "refusing (budget reached)" }
    );
    let data = std::fs::File::open(queue_dir.join("data.mdb"))?;
    let allocated = std::os::unix::fs::MetadataExt::blocks(&data.metadata()?) * 512;
    let free = rustix::fs::fstatvfs(&data).map(|st| st.f_bavail * st.f_frsize)?;
    println!(
        "disk: {:.0} MiB of the budget reserved on disk{}, {:.0} MiB free on the filesystem",
        mib(allocated.min(capacity)),
        if allocated >= capacity { " (all)" } else { " (NOT all: a full filesystem can stop stages)" },
        mib(free)
    );
    match queue.writer_lock_owner() {
        None => println!("writer lock: free"),
        Some(tid) => {
            let pid = proc::thread_group_of(tid).unwrap_or(tid);
            let who = std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .and_then(|cmdline| {
                    let args: Vec<String> =
                        cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                    let at = args.iter().position(|a| a == "stage")?;
                    Some(format!("stage {}", args.get(at + 1)?))
                })
                .unwrap_or_else(|| "not a tailgate stage".to_string());
            println!("writer lock: held by pid {pid} ({who})");
        }
    }
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    println!("{:<12} {:>10} {:>12} {:>14} {:>10} {:>10}", "edge", "batches", "items", "bytes", "next_seq", "oldest");
    for edge in Edge::ALL {
        let depth = queue.depth(&txn, edge)?;
        // Age of the oldest stored batch (when it was accepted or produced).
        let oldest = queue
            .entries_after(&txn, edge, 0)?
            .next()
            .and_then(|entry| entry.ok())
            .and_then(|(_, value)| tailgate_ipc::batch::received_unix_nano(value))
            .map(|at| format!("{:.1}s", now.saturating_sub(at) as f64 / 1e9))
            .unwrap_or_else(|| "-".to_string());
        println!(
            "{:<12} {:>10} {:>12} {:>14} {:>10} {:>10}",
            edge.as_str(),
            depth.batches,
            depth.items,
            depth.bytes,
            depth.next_seq,
            oldest
        );
    }
    println!("{:<16} {:<12} {:>10}", "consumer", "edge", "cursor");
    for edge in Edge::ALL {
        for consumer in queue.active_consumers(edge) {
            println!("{:<16} {:<12} {:>10}", consumer.as_str(), edge.as_str(), queue.cursor(&txn, consumer)?);
        }
    }
    println!("decisions    {:>10}", queue.decision_count(&txn)?);
    let losses = queue.losses(&txn)?;
    if !losses.is_empty() {
        println!("damage repaired ({} records; `tailgate status --clear-losses` acknowledges them)", losses.len());
        for record in losses {
            println!("  {} {record}", format_unix_ms(record.at_unix_ms));
        }
    }
    drop(txn);
    let drift = tailgate_stages::receive::filelog::stored_drift(&queue)?;
    if !drift.is_empty() {
        println!("log schema drift (lines per file and kind)");
        for (path, counts) in drift {
            println!("  {path}");
            for line in counts.summary() {
                println!("    {line}");
            }
        }
    }
    Ok(())
}

/// RFC 3339 (UTC, seconds) for a Unix millisecond time.
fn format_unix_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// Sets up logging to stderr (journald picks it up under systemd). `RUST_LOG` overrides the
/// configured filter.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _already_set =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// Resolves at the first SIGTERM or SIGINT. If the handlers cannot be installed it never
/// resolves, and the default action (terminate) applies; the queue keeps state safe either way.
pub async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
