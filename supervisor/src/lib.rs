//! The `tailgate` binary's library: the supervisor (a ractor actor tree, one actor per stage
//! process) and the stage process entry point.
#![forbid(unsafe_code)]

pub mod cgroups;
pub mod control;
pub mod demo;
pub mod import_otel;
pub mod logging;
pub mod notify;
mod proc;
pub mod reload;
pub mod report;
pub mod stage_actor;
pub mod stage_process;
mod startup;
pub mod supervisor;
pub mod telemetry;
pub mod workload;

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
pub fn status(config_file: Option<PathBuf>, data_dir: Option<PathBuf>, clear_losses: bool, json: bool) -> ExitCode {
    let result = if clear_losses {
        clear_loss_records(config_file, data_dir)
    } else {
        print_status(config_file, data_dir, json)
    };
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

fn print_status(config_file: Option<PathBuf>, data_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let config = load_config(config_file.as_deref(), data_dir)?;
    let queue = queue_report(&config)?;
    let supervisor = control::ask(&config.data_dir, &control::Request::Status);
    if json {
        let supervisor = match &supervisor {
            Ok(answer) => serde_json::json!({ "running": true, "stages": answer["stages"] }),
            Err(err) => serde_json::json!({ "running": false, "error": err.to_string() }),
        };
        let report = serde_json::json!({ "queue": queue, "supervisor": supervisor });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_queue_report(&queue);
    match supervisor {
        Ok(answer) => {
            let stages: Vec<report::StageStatus> = serde_json::from_value(answer["stages"].clone())?;
            print_stages(&stages);
        }
        Err(err) => println!("supervisor: not answering ({err}); the queue above is read directly"),
    }
    Ok(())
}

/// The queue's state, read-only: never waits behind a stuck writer, never grows the file, and
/// shows the budget the queue was created with.
fn queue_report(config: &Config) -> anyhow::Result<serde_json::Value> {
    use serde_json::json;
    use tailgate_ipc::{Edge, Queue};
    let queue_dir = config.queue_dir();
    if !queue_dir.join("data.mdb").exists() {
        anyhow::bail!("no queue at {}", queue_dir.display());
    }
    let queue = Queue::open_read_only(&queue_dir, &stage_process::queue_options(config))?;
    let txn = queue.read()?;
    let data = std::fs::File::open(queue_dir.join("data.mdb"))?;
    let allocated = std::os::unix::fs::MetadataExt::blocks(&data.metadata()?) * 512;
    let filesystem_free = rustix::fs::fstatvfs(&data).map(|st| st.f_bavail * st.f_frsize)?;
    let writer_lock = queue.writer_lock_owner().map(|tid| {
        let pid = proc::thread_group_of(tid).unwrap_or(tid);
        let stage = std::fs::read(format!("/proc/{pid}/cmdline")).ok().and_then(|cmdline| {
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let at = args.iter().position(|a| a == "stage")?;
            Some(args.get(at + 1)?.clone())
        });
        json!({ "pid": pid, "stage": stage })
    });
    let now = tailgate_ipc::clock::pipeline_now_of(&queue, &txn)?;
    let mut edges = Vec::new();
    for edge in Edge::ALL {
        let depth = queue.depth(&txn, edge)?;
        let oldest = queue.oldest_age_seconds(&txn, edge, now)?;
        edges.push(json!({
            "edge": edge.as_str(),
            "batches": depth.batches,
            "items": depth.items,
            "bytes": depth.bytes,
            "next_seq": depth.next_seq,
            "oldest_age_seconds": oldest,
        }));
    }
    let mut consumers = Vec::new();
    for edge in Edge::ALL {
        for consumer in queue.active_consumers(edge) {
            consumers.push(json!({
                "consumer": consumer.as_str(),
                "edge": edge.as_str(),
                "cursor": queue.cursor(&txn, consumer)?,
            }));
        }
    }
    let losses: Vec<serde_json::Value> = queue
        .losses(&txn)?
        .into_iter()
        .map(|record| {
            json!({
                "at": format_unix_ms(record.at_unix_ms),
                "table": record.table,
                "first_seq": record.first_seq,
                "last_seq": record.last_seq,
                "entries": record.entries,
                "items": record.items,
                "summary": record.to_string(),
            })
        })
        .collect();
    let report = json!({
        "path": queue_dir.display().to_string(),
        "used_bytes": queue.used_bytes(&txn)?,
        "capacity_bytes": queue.capacity_bytes(),
        "intake_open": queue.admits(&txn)?,
        "reserved_bytes": allocated.min(queue.capacity_bytes()),
        "filesystem_free_bytes": filesystem_free,
        "writer_lock": writer_lock,
        "edges": edges,
        "consumers": consumers,
        "decisions": queue.decision_count(&txn)?,
        "route_thresholds_ms": queue.route_thresholds(&txn)?.routes,
        "losses": losses,
    });
    // Incident windows are set and expire on the wall clock, like the operator's watch.
    let now_ms = tailgate_ipc::clock::wall_now() / 1_000_000;
    let incident = tailgate_stages::tail_sample::incident::load(&queue, &txn)?.map(|window| {
        json!({
            "open": window.open_at(now_ms),
            "routes": window.routes,
            "keep_all": window.keep_all,
            "latency_ms": window.latency_ms,
            "until": format_unix_ms(window.until_unix_ms),
            "summary": describe_incident(&window),
        })
    });
    let drift: serde_json::Map<String, serde_json::Value> =
        tailgate_stages::receive::filelog::stored_drift(&queue, &txn)?
            .into_iter()
            .map(|(path, counts)| (path, json!(counts.summary())))
            .collect();
    let mut report = report;
    report["log_schema_drift"] = serde_json::Value::Object(drift);
    report["incident"] = incident.unwrap_or(serde_json::Value::Null);
    Ok(report)
}

fn print_queue_report(q: &serde_json::Value) {
    let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let (used, capacity) = (num(&q["used_bytes"]), num(&q["capacity_bytes"]).max(1));
    println!(
        "queue {}: {:.1} MiB in use of {:.0} MiB ({:.1}%), intake {}",
        q["path"].as_str().unwrap_or(""),
        mib(used),
        mib(capacity),
        used as f64 / capacity as f64 * 100.0,
        if q["intake_open"].as_bool().unwrap_or(false) { "open" } else { "refusing (budget reached)" }
    );
    let reserved = num(&q["reserved_bytes"]);
    println!(
        "disk: {:.0} MiB of the budget reserved on disk{}, {:.0} MiB free on the filesystem",
        mib(reserved),
        if reserved >= capacity { " (all)" } else { " (NOT all: a full filesystem can stop stages)" },
        mib(num(&q["filesystem_free_bytes"]))
    );
    match q["writer_lock"].as_object() {
        None => println!("writer lock: free"),
        Some(holder) => {
            let who = holder
                .get("stage")
                .and_then(|s| s.as_str())
                .map(|s| format!("stage {s}"))
                .unwrap_or_else(|| "not a tailgate stage".to_string());
            println!("writer lock: held by pid {} ({who})", holder.get("pid").map(num).unwrap_or(0));
        }
    }
    println!("{:<14} {:>10} {:>12} {:>14} {:>10} {:>10}", "edge", "batches", "items", "bytes", "next_seq", "oldest");
    for edge in q["edges"].as_array().into_iter().flatten() {
        let oldest = edge["oldest_age_seconds"].as_f64().map(|s| format!("{s:.1}s")).unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:>10} {:>12} {:>14} {:>10} {:>10}",
            edge["edge"].as_str().unwrap_or(""),
            num(&edge["batches"]),
            num(&edge["items"]),
            num(&edge["bytes"]),
            num(&edge["next_seq"]),
            oldest
        );
    }
    println!("{:<16} {:<14} {:>10}", "consumer", "edge", "cursor");
    for consumer in q["consumers"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<14} {:>10}",
            consumer["consumer"].as_str().unwrap_or(""),
            consumer["edge"].as_str().unwrap_or(""),
            num(&consumer["cursor"])
        );
    }
    println!("decisions    {:>10}", num(&q["decisions"]));
    if let Some(routes) = q["route_thresholds_ms"].as_object().filter(|r| !r.is_empty()) {
        let lifted: Vec<String> = routes.iter().map(|(route, ms)| format!("{route} {ms} ms")).collect();
        println!("latency thresholds lifted: {}", lifted.join(", "));
    }
    if let Some(window) = q["incident"].as_object() {
        let state = if window.get("open").and_then(|o| o.as_bool()) == Some(true) { "open" } else { "ended" };
        println!("incident window ({state}): {}", window.get("summary").and_then(|s| s.as_str()).unwrap_or(""));
    }
    let losses = q["losses"].as_array().cloned().unwrap_or_default();
    if !losses.is_empty() {
        println!("damage repaired ({} records; `tailgate status --clear-losses` acknowledges them)", losses.len());
        for record in losses {
            println!("  {} {}", record["at"].as_str().unwrap_or(""), record["summary"].as_str().unwrap_or(""));
        }
    }
    if let Some(drift) = q["log_schema_drift"].as_object().filter(|d| !d.is_empty()) {
        println!("log schema drift (lines per file and kind)");
        for (path, lines) in drift {
            println!("  {path}");
            for line in lines.as_array().into_iter().flatten() {
                println!("    {}", line.as_str().unwrap_or(""));
            }
        }
    }
}

fn print_stages(stages: &[report::StageStatus]) {
    let mib = |bytes: Option<u64>| bytes.map(|b| format!("{:.1}", b as f64 / (1024.0 * 1024.0))).unwrap_or("-".into());
    println!(
        "{:<12} {:>8} {:<10} {:>9} {:>9} {:>8} {:>7} {:>10} {:>10} {:>9} {:>9}  restarts",
        "stage", "pid", "state", "uptime", "priv MiB", "PSS MiB", "CPU %", "budget MiB", "heartbeat", "in/s", "out/s"
    );
    for stage in stages {
        let restarts: Vec<String> = stage.restarts.iter().map(|(reason, n)| format!("{reason}={n}")).collect();
        println!(
            "{:<12} {:>8} {:<10} {:>8.0}s {:>9} {:>8} {:>7} {:>10} {:>10} {:>9} {:>9}  {}",
            stage.stage,
            stage.pid.map(|p| p.to_string()).unwrap_or("-".into()),
            stage.state,
            stage.uptime_seconds,
            mib(stage.private_bytes),
            mib(stage.pss_bytes),
            stage.rates.map(|r| format!("{:.2}", r.cpu_percent)).unwrap_or("-".into()),
            format!("{}/{}", stage.memory_soft_budget_bytes >> 20, stage.memory_hard_budget_bytes >> 20),
            match stage.heartbeat_overdue_ms {
                None => "-".to_string(),
                Some(0) => "ok".to_string(),
                Some(ms) => format!("{:.1}s late", ms as f64 / 1000.0),
            },
            stage.rates.map(|r| format!("{:.0}", r.received_per_second)).unwrap_or("-".into()),
            stage.rates.map(|r| format!("{:.0}", r.sent_per_second)).unwrap_or("-".into()),
            if restarts.is_empty() { "none".to_string() } else { restarts.join(" ") }
        );
    }
}

/// `tailgate reload`: asks the running supervisor to validate and apply its configuration file.
pub fn reload(config_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> ExitCode {
    // The file given here only locates the data directory; the supervisor validates the file it
    // was started with. A file that does not load here has problems the supervisor would refuse.
    let result = load_config(config_file.as_deref(), data_dir)
        .map_err(|err| anyhow::anyhow!("{err}; nothing was reloaded"))
        .and_then(|config| control::ask(&config.data_dir, &control::Request::Reload));
    match result {
        Ok(answer) => {
            let restarted: Vec<&str> =
                answer["restarted"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
            if restarted.is_empty() {
                println!("reloaded; no stage's configuration changed");
            } else {
                println!("reloaded; restarted {}", restarted.join(", "));
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tailgate reload: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `tailgate shed [NAME]` and `tailgate shutdown`: one request to the running supervisor, its
/// answer printed as JSON.
pub fn control_command(request: control::Request, config_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> ExitCode {
    let result = load_config(config_file.as_deref(), data_dir)
        .map_err(anyhow::Error::from)
        .and_then(|config| control::ask(&config.data_dir, &request));
    match result {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tailgate: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `tailgate incident start|end`: opens (or replaces) or closes the incident window, written
/// into the queue directly (tailgate need not run; tail_sample applies it at its next step).
pub fn incident(
    action: &str,
    routes: Vec<String>,
    keep_all: bool,
    latency_ms: Option<u64>,
    duration: Option<std::time::Duration>,
    config_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> ExitCode {
    use tailgate_stages::tail_sample::incident::{self, Incident};
    let run = || -> anyhow::Result<String> {
        let config = load_config(config_file.as_deref(), data_dir)?;
        let queue = tailgate_ipc::Queue::open(&config.queue_dir(), &stage_process::queue_options(&config))?;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
        let said = if action == "start" {
            if keep_all == latency_ms.is_some() {
                anyhow::bail!("say what the window does: --keep-all or --latency-ms N (one of them)");
            }
            let Some(duration) = duration else { anyhow::bail!("say how long: --for 30m") };
            let window = Incident {
                routes,
                keep_all,
                latency_ms,
                started_unix_ms: now_ms,
                until_unix_ms: now_ms + duration.as_millis() as u64,
            };
            incident::store(&queue, Some(&window))?;
            format!("incident window open for {}: {}", humantime::format_duration(duration), describe_incident(&window))
        } else {
            incident::store(&queue, None)?;
            "incident window closed".to_string()
        };
        // Applied at tail_sample's next step; wake it so that is now.
        if let Ok(waker) = tailgate_ipc::wake::Waker::new(&tailgate_ipc::wake::socket_dir(&config.data_dir)) {
            waker.wake(tailgate_ipc::StageId::TailSample);
        }
        Ok(said)
    };
    match run() {
        Ok(said) => {
            println!("{said}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tailgate incident: {err}");
            ExitCode::FAILURE
        }
    }
}

fn describe_incident(window: &tailgate_stages::tail_sample::incident::Incident) -> String {
    let routes = if window.routes.is_empty() { "every route".to_string() } else { window.routes.join(", ") };
    let what = match window.latency_ms {
        Some(ms) if !window.keep_all => format!("keep traces of {ms} ms or more"),
        _ => "keep every trace".to_string(),
    };
    format!("{what} on {routes}, until {}", format_unix_ms(window.until_unix_ms))
}

/// `tailgate drain [--timeout SECONDS]`: pauses intake and waits for the queue to empty.
pub fn drain(timeout_seconds: u64, config_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> ExitCode {
    let request = control::Request::Drain { timeout_seconds: Some(timeout_seconds) };
    let wait = std::time::Duration::from_secs(timeout_seconds + 10);
    let result = load_config(config_file.as_deref(), data_dir)
        .map_err(anyhow::Error::from)
        .and_then(|config| control::ask_within(&config.data_dir, &request, wait));
    match result {
        Ok(answer) if answer["drained"] == true => {
            println!("drained: the queue is empty; intake stays paused (`tailgate resume`, or stop tailgate now)");
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            println!("not drained within {timeout_seconds} s; still queued: {}", answer["remaining"]);
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("tailgate drain: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `tailgate restart-stage NAME`: asks the running supervisor to drain and restart one stage.
pub fn restart_stage(stage: &str, config_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> ExitCode {
    let result = load_config(config_file.as_deref(), data_dir).map_err(anyhow::Error::from).and_then(|config| {
        control::ask(&config.data_dir, &control::Request::RestartStage { stage: stage.to_string() })
    });
    match result {
        Ok(answer) => {
            println!("restarting {stage} (was pid {})", answer["pid"]);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tailgate restart-stage: {err}");
            ExitCode::FAILURE
        }
    }
}

/// RFC 3339 (UTC, seconds) for a Unix millisecond time.
fn format_unix_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
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
