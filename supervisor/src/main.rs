//! The `tailgate` binary: `run` starts the supervisor, which re-executes this binary as
//! `tailgate stage <name>` once per pipeline stage.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// tailgate: an edge observability pipeline. Tail-based sampling, logs that follow their
/// trace's decision, span metrics, and durable export through an on-disk queue.
#[derive(Debug, Parser)]
#[command(name = "tailgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the supervisor and the five stage processes.
    Run {
        /// Configuration file (YAML). Without it, the embedded default configuration is used.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Directory of the durable queue; overrides `data_dir` from the configuration.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Print the queue's true backlog: per edge batches, items and bytes; per consumer cursors;
    /// disk budget use; repaired damage; log schema drift. Works while tailgate runs.
    Status {
        /// Configuration file, as given to `run`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Acknowledge the recorded damage repairs (they stop being listed).
        #[arg(long)]
        clear_losses: bool,
        /// Print one JSON document (queue and, when the supervisor answers, its stages).
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration file the running tailgate was started with and apply it
    /// (also on SIGHUP): only stages whose configuration changed restart; a file with problems
    /// changes nothing.
    Reload {
        /// Configuration file, as given to `run` (locates the data directory).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Ask a stage (or every stage) to shed memory now, as when over its soft budget.
    Shed {
        /// receive, tail_sample, log_mirror, spanmetrics or export; every stage when absent.
        name: Option<String>,
        /// Configuration file, as given to `run`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Pause intake (receivers answer UNAVAILABLE / 503 with a retry hint, files wait) and wait
    /// until the queue is empty: before a stop or an upgrade. Exit 1 if it did not empty in time.
    Drain {
        /// Seconds to wait for the queue to empty.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Configuration file, as given to `run`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Open an incident window (sampling keeps every trace, or every trace of at least N ms, on
    /// the given routes, or all) for a while, or end it. Stored in the queue: survives restarts.
    Incident {
        /// `start` or `end`.
        #[arg(value_parser = ["start", "end"])]
        action: String,
        /// A route (`http.route` of the root span, or its name); repeat for several; none: all.
        #[arg(long = "route", value_name = "ROUTE")]
        routes: Vec<String>,
        /// Keep every trace of the routes.
        #[arg(long)]
        keep_all: bool,
        /// Keep traces of the routes lasting at least this many milliseconds.
        #[arg(long, value_name = "MS")]
        latency_ms: Option<u64>,
        /// How long the window stays open (e.g. 30m); it closes by itself.
        #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Configuration file, as given to `run`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Resume intake after `drain`.
    Resume {
        /// Configuration file, as given to `run`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Stop the running tailgate as SIGTERM does (stages drain in order).
    Shutdown {
        /// Configuration file, as given to `run`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Drain one stage and start it again (through the running supervisor's control socket);
    /// its backlog stays in the queue. Not counted towards the stage's crash escalation.
    RestartStage {
        /// receive, tail_sample, log_mirror, spanmetrics or export.
        name: String,
        /// Configuration file, as given to `run`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// OTLP items a backend kept refusing (see `exporters.dead_letter`): list them, ask the
    /// running export stage to send them again, or delete them.
    DeadLetter {
        /// `list`, `replay` or `drop`.
        #[arg(value_parser = ["list", "replay", "drop"])]
        action: String,
        /// Only this destination's items (e.g. `export_traces`).
        #[arg(long)]
        consumer: Option<String>,
        /// Configuration file, as given to `run`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as given to `run`.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Validate a configuration file and print every problem with its path (exit 1 on error).
    CheckConfig {
        /// The configuration file to check.
        file: PathBuf,
    },
    /// Translate an OpenTelemetry Collector configuration (receivers, tail_sampling,
    /// spanmetrics, memory_limiter, batch, exporters with sending_queue and file_storage,
    /// pipelines) into a tailgate configuration; names every key it could not map.
    ImportOtelConfig {
        /// The Collector's configuration file.
        file: PathBuf,
        /// Write the tailgate configuration here instead of to stdout.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Run the whole pipeline on this machine with no external services: local sinks for OTLP
    /// traces, Loki and remote write, the field report's load (OTLP traces and JSON log lines),
    /// a live view, and a summary checked against the load's ground truth (exit 1 on any loss).
    /// Keys while it runs: c cuts the sinks off and back, k kills a stage, q finishes.
    Demo {
        /// How long the load runs.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Virtual users over time, TIME:USERS points (the field report's ramp by default).
        #[arg(long, default_value = "30s:100,45s:250,60s:500")]
        ramp: tailgate::workload::Ramp,
        /// Print the summary as JSON, without the live view.
        #[arg(long)]
        json: bool,
        /// Cut the sinks off at this time (an uplink outage: the backlog waits on disk).
        #[arg(long, value_parser = humantime::parse_duration)]
        cut_at: Option<std::time::Duration>,
        /// How long the sinks stay cut off.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        cut_for: std::time::Duration,
        /// SIGKILL a stage at this time (the supervisor restarts it; nothing is lost).
        #[arg(long, value_parser = humantime::parse_duration)]
        kill_at: Option<std::time::Duration>,
        /// The stage `--kill-at` and the `k` key kill. Killing receive loses the answers to requests
        /// in flight: the load generator resends them, as OTLP clients do, which can show as
        /// duplicates.
        #[arg(long, default_value = "tail_sample", value_parser = ["receive", "tail_sample", "log_mirror", "spanmetrics", "export"])]
        kill_stage: String,
        /// Keep the demo's files (config, queue, log file, tailgate's log) in this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Longest wait after the load for everything kept to arrive.
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        settle: std::time::Duration,
        /// Seed of the generated load.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Internal: run one stage process (the supervisor starts these).
    #[command(hide = true)]
    Stage {
        /// Stage name: receive, tail_sample, log_mirror, spanmetrics or export.
        name: String,
        /// Configuration file, as given to `run`.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory, as resolved by the supervisor.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, data_dir } => tailgate::supervisor::main(config, data_dir),
        Command::CheckConfig { file } => tailgate::check_config(&file),
        Command::ImportOtelConfig { file, output } => tailgate::import_otel::main(&file, output.as_deref()),
        Command::Demo { duration, ramp, json, cut_at, cut_for, kill_at, kill_stage, dir, settle, seed } => {
            tailgate::demo::main(tailgate::demo::Options {
                duration,
                ramp,
                json,
                cut_at,
                cut_for,
                kill_at,
                kill_stage,
                dir,
                settle,
                seed,
            })
        }
        Command::DeadLetter { action, consumer, config, data_dir } => {
            tailgate::dead_letter(&action, consumer.as_deref(), config, data_dir)
        }
        Command::Status { config, data_dir, clear_losses, json } => {
            tailgate::status(config, data_dir, clear_losses, json)
        }
        Command::Reload { config, data_dir } => tailgate::reload(config, data_dir),
        Command::Shed { name, config, data_dir } => {
            tailgate::control_command(tailgate::control::Request::Shed { stage: name }, config, data_dir)
        }
        Command::Drain { timeout, config, data_dir } => tailgate::drain(timeout, config, data_dir),
        Command::Incident { action, routes, keep_all, latency_ms, duration, config, data_dir } => {
            tailgate::incident(&action, routes, keep_all, latency_ms, duration, config, data_dir)
        }
        Command::Resume { config, data_dir } => {
            tailgate::control_command(tailgate::control::Request::Resume, config, data_dir)
        }
        Command::Shutdown { config, data_dir } => {
            tailgate::control_command(tailgate::control::Request::Shutdown, config, data_dir)
        }
        Command::RestartStage { name, config, data_dir } => tailgate::restart_stage(&name, config, data_dir),
        Command::Stage { name, config, data_dir } => tailgate::stage_process::main(&name, config, data_dir),
    }
}
