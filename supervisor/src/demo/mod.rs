//! `tailgate demo`: the whole product on one machine with no external services. It starts
//! local sinks for OTLP traces, Loki push and remote write ([`sinks`]), writes a configuration
//! that points tailgate at them on free loopback ports, runs `tailgate run` as a child process,
//! drives it with the field report's load ([`generator`]: OTLP/gRPC traces plus the services'
//! JSON log lines in a tailed file), shows a live view ([`view`]), can cut the sinks off and
//! kill a stage on a schedule or a key press, and ends with a summary checked against the
//! generator's ground truth: the cut, lost and duplicated items, exemplars that resolve.

pub mod generator;
pub mod sinks;
pub mod view;

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use generator::{Counts, Load, Truth};
use sinks::Sinks;
use view::{Frame, Metrics, STAGES};

/// The demo's settings (`tailgate demo --help`).
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the load runs.
    pub duration: Duration,
    /// Users over time (`30s:100,45s:250,60s:500`).
    pub ramp: crate::workload::Ramp,
    /// Print the summary as JSON (and no live view).
    pub json: bool,
    /// Cut the sinks off at this time for `cut_for`.
    pub cut_at: Option<Duration>,
    pub cut_for: Duration,
    /// SIGKILL this stage at `kill_at`.
    pub kill_at: Option<Duration>,
    pub kill_stage: String,
    /// Keep the demo's directory (config, data, log file, tailgate's log) afterwards.
    pub dir: Option<PathBuf>,
    /// Longest wait after the load for the pipeline to deliver everything.
    pub settle: Duration,
    pub seed: u64,
}

/// Runs the demo; exit 0 when nothing was lost or duplicated and every exemplar resolves.
pub fn main(options: Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tailgate demo: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(summary) if summary.passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("tailgate demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The demo's directory: removed at the end unless the operator named it.
struct Workspace {
    path: PathBuf,
    keep: bool,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A port on loopback that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Ports {
    grpc: SocketAddr,
    http: SocketAddr,
    telemetry: SocketAddr,
}

fn config_text(dir: &Path, ports: &Ports, sinks: &Sinks) -> String {
    format!(
        r#"# Written by `tailgate demo`: tailgate on free loopback ports, exporting to the demo's sinks.
data_dir: {data}
log_level: warn
log_format: text
receivers:
  otlp:
    protocols:
      grpc: {{ endpoint: "{grpc}" }}
      http: {{ endpoint: "{http}" }}
  filelog:
    include: ["{logs}/*.log"]
    start_at: beginning
queue:
  max_size_mib: 256
tail_sample:
  decision_wait: 5s
  root_grace: 1s
  keep_errors: true
  latency_threshold: 200ms
log_mirror:
  max_wait: 15s
spanmetrics:
  metrics_flush_interval: 2s
  exemplars: {{ enabled: true }}
exporters:
  traces:
    otlp: {{ endpoint: "http://{otlp}", timeout: 5s }}
  logs:
    loki: {{ endpoint: "http://{loki}/loki/api/v1/push", timeout: 5s }}
  metrics:
    prometheusremotewrite: {{ endpoint: "http://{remote_write}/api/v1/write", timeout: 5s, max_sample_age: 0s }}
  batch:
    send_batch_size: 512
    timeout: 1s
  retry_on_failure:
    initial_interval: 500ms
    max_interval: 2s
supervisor:
  cgroups: {{ enabled: false }}
  telemetry: {{ enabled: true, endpoint: "{telemetry}" }}
"#,
        data = dir.join("data").display(),
        grpc = ports.grpc,
        http = ports.http,
        logs = dir.join("logs").display(),
        otlp = sinks.otlp,
        loki = sinks.loki,
        remote_write = sinks.remote_write,
        telemetry = ports.telemetry,
    )
}

/// The running `tailgate run` child.
struct Pipeline {
    child: tokio::process::Child,
    pid: u32,
    telemetry: SocketAddr,
}

impl Pipeline {
    async fn start(config: &Path, dir: &Path, telemetry: SocketAddr) -> anyhow::Result<Pipeline> {
        let exe = std::env::current_exe()?;
        let log = std::fs::File::create(dir.join("tailgate.log"))?;
        let child = tokio::process::Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C reaches the demo, which stops tailgate in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or_else(|| anyhow::anyhow!("tailgate exited at once"))?;
        let mut pipeline = Pipeline { child, pid, telemetry };
        let started = Instant::now();
        loop {
            if let Some(metrics) = Metrics::scrape(telemetry).await
                && metrics.sum("tailgate_stage_up", "") >= STAGES.len() as f64
            {
                return Ok(pipeline);
            }
            if let Ok(Some(status)) = pipeline.child.try_wait() {
                anyhow::bail!("tailgate exited ({status}); see {}", dir.join("tailgate.log").display());
            }
            if started.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("tailgate not up after 30 s; see {}", dir.join("tailgate.log").display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The pid of a stage process (its `tg-<stage>` child).
    fn stage_pid(&self, stage: &str) -> Option<u32> {
        crate::proc::stage_children(self.pid).into_iter().find(|(name, _)| name == stage).map(|(_, pid)| pid)
    }

    fn kill_stage(&self, stage: &str) -> Option<u32> {
        let pid = self.stage_pid(stage)?;
        let pid_t = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
        rustix::process::kill_process(pid_t, rustix::process::Signal::KILL).ok()?;
        Some(pid)
    }

    /// SIGTERM (the ordered stop), SIGKILL after 30 s.
    async fn stop(mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Key presses on a terminal (cbreak mode: keys arrive unbuffered, Ctrl-C still signals).
struct Keys {
    saved: Option<rustix::termios::Termios>,
    receiver: tokio::sync::mpsc::UnboundedReceiver<u8>,
}

impl Keys {
    fn open() -> Option<Keys> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut cbreak = saved.clone();
        cbreak.local_modes.remove(rustix::termios::LocalModes::ICANON | rustix::termios::LocalModes::ECHO);
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &cbreak).ok()?;
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut byte = [0u8; 1];
            while std::io::stdin().read_exact(&mut byte).is_ok() && sender.send(byte[0]).is_ok() {}
        });
        Some(Keys { saved: Some(saved), receiver })
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if let Some(saved) = self.saved.take() {
            let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &saved);
        }
    }
}

/// The result of a run, checked against the ground truth.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub duration_seconds: f64,
    pub spans: ItemSummary,
    pub log_lines: ItemSummary,
    pub exemplars: ExemplarSummary,
    /// Spans the span metrics counted (sum of `calls`), against every span sent.
    pub span_metrics_spans_counted: u64,
    pub span_metrics_count_every_span: bool,
    pub queue_peak_items: u64,
    pub queue_peak_mib: f64,
    pub restarts: BTreeMap<String, u64>,
    pub sinks_cut_seconds: f64,
    pub killed: Vec<String>,
    /// Delivered everything it must within the settle time.
    pub settled: bool,
    pub directory: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ItemSummary {
    /// Items that went in (spans accepted by the receiver, lines written to the file).
    pub sent: u64,
    /// Items of traces the default sampling must keep (the ground truth).
    pub expected: u64,
    /// Distinct items delivered.
    pub delivered: u64,
    /// Expected but never delivered.
    pub lost: u64,
    /// Delivered more than once.
    pub duplicated: u64,
    /// Delivered although their trace was to be dropped.
    pub unexpected: u64,
    /// Share of what went in that stayed on the node, percent.
    pub dropped_percent: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExemplarSummary {
    pub received: u64,
    pub resolving: u64,
    pub resolving_percent: f64,
}

impl Summary {
    /// Nothing lost, duplicated or delivered that should not be; every exemplar resolves; the
    /// span metrics counted every span.
    pub fn passed(&self) -> bool {
        let clean = |items: &ItemSummary| items.lost == 0 && items.duplicated == 0 && items.unexpected == 0;
        clean(&self.spans)
            && clean(&self.log_lines)
            && self.exemplars.received == self.exemplars.resolving
            && self.span_metrics_count_every_span
    }

    fn print(&self) {
        let items = |name: &str, s: &ItemSummary| {
            println!(
                "{name:<10} in {:>8}, kept {:>7} ({:.1}% stayed on the node), delivered {:>7}",
                s.sent, s.expected, s.dropped_percent, s.delivered
            );
            println!(
                "{:<10} lost {}, duplicated {}, delivered but not kept {}",
                "", s.lost, s.duplicated, s.unexpected
            );
        };
        println!("\ntailgate demo summary ({:.0} s of load)", self.duration_seconds);
        items("spans", &self.spans);
        items("log lines", &self.log_lines);
        println!(
            "exemplars  {} received, {} resolve to a delivered trace ({:.1}%)",
            self.exemplars.received, self.exemplars.resolving, self.exemplars.resolving_percent
        );
        println!(
            "span metrics counted {} of {} spans{}",
            self.span_metrics_spans_counted,
            self.spans.sent,
            if self.span_metrics_count_every_span { " (every span)" } else { "" }
        );
        println!("queue peak {} items, {:.1} MiB", self.queue_peak_items, self.queue_peak_mib);
        if self.sinks_cut_seconds > 0.0 {
            println!("sinks cut off for {:.0} s", self.sinks_cut_seconds);
        }
        for killed in &self.killed {
            println!("killed {killed}");
        }
        let restarts: Vec<String> =
            self.restarts.iter().filter(|(_, n)| **n > 0).map(|(stage, n)| format!("{stage} {n}")).collect();
        if !restarts.is_empty() {
            println!("restarts: {}", restarts.join(", "));
        }
        println!(
            "{}",
            if self.passed() { "result: nothing lost, nothing duplicated" } else { "result: FAILED (see above)" }
        );
        if let Some(dir) = &self.directory {
            println!("kept: {dir} (config, data, logs, tailgate.log)");
        }
    }
}

fn items_summary(sent: u64, truth: &Truth, delivered: &std::collections::HashMap<sinks::ItemId, u32>) -> ItemSummary {
    let expected: std::collections::HashSet<sinks::ItemId> = truth.kept_ids().collect();
    let lost = expected.iter().filter(|id| !delivered.contains_key(*id)).count() as u64;
    let unexpected = delivered.keys().filter(|id| !expected.contains(*id)).count() as u64;
    let duplicated = delivered.values().filter(|times| **times > 1).count() as u64;
    ItemSummary {
        sent,
        expected: expected.len() as u64,
        delivered: delivered.len() as u64,
        lost,
        duplicated,
        unexpected,
        dropped_percent: if sent == 0 { 0.0 } else { 100.0 * (1.0 - expected.len() as f64 / sent as f64) },
    }
}

/// Runs the demo and returns its summary (printed as JSON or text).
pub async fn run(options: Options) -> anyhow::Result<Summary> {
    let keep = options.dir.is_some();
    let path = options
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("tailgate-demo-{}", std::process::id())));
    std::fs::create_dir_all(path.join("logs"))?;
    let workspace = Workspace { path: path.canonicalize()?, keep };
    let dir = workspace.path.clone();

    let sinks = Sinks::start().await?;
    let ports = Ports {
        grpc: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        http: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        telemetry: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
    };
    let config = dir.join("tailgate.yaml");
    std::fs::write(&config, config_text(&dir, &ports, &sinks))?;
    // Ctrl-C from here on stops tailgate before the demo ends (during start-up the child is
    // dropped, which kills it; its stages follow their parent).
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let pipeline = tokio::select! {
        pipeline = Pipeline::start(&config, &dir, ports.telemetry) => pipeline?,
        _ = interrupt.recv() => anyhow::bail!("interrupted while tailgate started"),
    };

    let live = !options.json && std::io::stdout().is_terminal();
    let mut keys = if live { Keys::open() } else { None };
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load = Load {
        receiver: ports.grpc,
        log_file: dir.join("logs").join("shop.log"),
        ramp: options.ramp.clone(),
        duration: options.duration,
        seed: options.seed,
    };
    let mut generator = tokio::spawn(generator::run(load, counts.clone(), stop.clone()));

    let started = Instant::now();
    let mut frame = Frame::default();
    let mut last_cpu = (Instant::now(), view::processes(pipeline.pid));
    let (mut cut_since, mut cut_total) = (None::<Instant>, Duration::ZERO);
    let mut killed = Vec::new();
    let (mut peak_items, mut peak_bytes) = (0f64, 0f64);
    let mut truth = None;
    let mut settle_started = None::<Instant>;
    let mut settled = false;
    // The first `q` / Ctrl-C ends the load and waits for delivery; the second ends at once.
    let mut stop_requests = 0u32;
    let mut expected_ids: Option<std::collections::HashSet<sinks::ItemId>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut drawn_lines = 0usize;
    loop {
        let key = async {
            match keys.as_mut() {
                Some(keys) => keys.receiver.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            Some(key) = key => match key {
                b'c' | b'C' => toggle_cut(&sinks, &mut cut_since, &mut cut_total, &mut frame, started),
                b'k' | b'K' => kill(&pipeline, &options.kill_stage, &mut killed, &mut frame, started),
                b'q' | b'Q' => {
                    stop.store(true, Ordering::Relaxed);
                    stop_requests += 1;
                }
                _ => {}
            },
            _ = interrupt.recv() => {
                stop.store(true, Ordering::Relaxed);
                stop_requests += 1;
            }
            result = &mut generator, if truth.is_none() => {
                truth = Some(result??);
                settle_started = Some(Instant::now());
                expected_ids = truth.as_ref().map(|t| t.kept_ids().collect());
                if sinks.is_cut() {
                    toggle_cut(&sinks, &mut cut_since, &mut cut_total, &mut frame, started);
                }
            }
        }
        let elapsed = started.elapsed();
        if truth.is_none() {
            if let Some(at) = options.cut_at {
                let want_cut = elapsed >= at && elapsed < at + options.cut_for;
                if want_cut != sinks.is_cut() && (want_cut || cut_since.is_some()) {
                    toggle_cut(&sinks, &mut cut_since, &mut cut_total, &mut frame, started);
                }
            }
            if options.kill_at.is_some_and(|at| elapsed >= at) && killed.is_empty() {
                kill(&pipeline, &options.kill_stage, &mut killed, &mut frame, started);
            }
        }
        let metrics = Metrics::scrape(pipeline.telemetry).await.unwrap_or_default();
        let queue_items = metrics.sum("tailgate_queue_items", "");
        let queue_bytes = metrics.sum("tailgate_queue_used_bytes", "");
        peak_items = peak_items.max(queue_items);
        peak_bytes = peak_bytes.max(queue_bytes);
        let now_cpu = (Instant::now(), view::processes(pipeline.pid));
        let interval = now_cpu.0.duration_since(last_cpu.0).as_secs_f64().max(0.001);
        frame.stages = std::iter::once("supervisor")
            .chain(STAGES)
            .map(|name| {
                let (seconds, private) = now_cpu.1.get(name).copied().unwrap_or_default();
                // A restarted stage is a new process: its CPU time starts again from zero.
                let before = last_cpu.1.get(name).map_or(0.0, |(s, _)| *s);
                let used = if seconds >= before { seconds - before } else { seconds };
                let restarts = (name != "supervisor")
                    .then(|| metrics.sum("tailgate_stage_restarts_total", &format!("stage=\"{name}\"")));
                (name.to_owned(), 100.0 * used / interval, private as f64 / 1_048_576.0, restarts)
            })
            .collect();
        last_cpu = now_cpu;
        let kept_ids: std::collections::HashSet<[u8; 16]> = sinks.with_received(|r| r.trace_ids());
        sinks.with_received(|received| {
            frame.spans_delivered = received.spans.len() as u64;
            frame.lines_delivered = received.log_lines.len() as u64;
            frame.exemplars = received.exemplars.values().sum();
            frame.exemplars_resolving =
                received.exemplars.iter().filter(|(trace, _)| kept_ids.contains(*trace)).map(|(_, n)| n).sum();
            frame.spans_counted = received.spans_counted();
        });
        frame.elapsed = elapsed;
        frame.users = if truth.is_none() { options.ramp.users_at(elapsed) } else { 0.0 };
        frame.spans_in = counts.spans.load(Ordering::Relaxed);
        frame.lines_in = counts.lines.load(Ordering::Relaxed);
        frame.keep_worthy_spans = counts.keep_worthy_spans.load(Ordering::Relaxed);
        frame.queue_items = queue_items;
        frame.queue_bytes = queue_bytes;
        frame.cut = sinks.is_cut();
        frame.phase = if truth.is_none() { "load".into() } else { "delivering the rest".into() };
        if live {
            let text = frame.render(keys.is_some().then_some(options.kill_stage.as_str()));
            // Up to the previous frame's first line, then clear below and draw.
            if drawn_lines > 0 {
                print!("\x1b[{drawn_lines}A\r");
            }
            print!("\x1b[J{text}");
            drawn_lines = text.lines().count();
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        }
        if stop_requests >= 2 {
            break;
        }
        if let (Some(truth), Some(since), Some(expected)) = (&truth, settle_started, &expected_ids) {
            let done = sinks.with_received(|received| {
                expected.iter().all(|id| received.spans.contains_key(id) && received.log_lines.contains_key(id))
            }) && frame.spans_counted >= truth.spans_sent as f64
                && queue_items == 0.0;
            if done {
                settled = true;
                break;
            }
            if since.elapsed() > options.settle {
                break;
            }
        }
    }
    drop(keys);
    let truth = truth.unwrap_or_default();
    let metrics = Metrics::scrape(pipeline.telemetry).await.unwrap_or_default();
    let restarts = STAGES
        .iter()
        .map(|stage| {
            (stage.to_string(), metrics.sum("tailgate_stage_restarts_total", &format!("stage=\"{stage}\"")) as u64)
        })
        .collect();
    pipeline.stop().await;
    let delivered_traces = sinks.with_received(|r| r.trace_ids());
    let summary = sinks.with_received(|received| {
        let exemplars: u64 = received.exemplars.values().sum();
        let resolving: u64 =
            received.exemplars.iter().filter(|(trace, _)| delivered_traces.contains(*trace)).map(|(_, n)| n).sum();
        let counted = received.spans_counted();
        Summary {
            duration_seconds: options.duration.as_secs_f64(),
            spans: items_summary(truth.spans_sent, &truth, &received.spans),
            log_lines: items_summary(truth.lines_written, &truth, &received.log_lines),
            exemplars: ExemplarSummary {
                received: exemplars,
                resolving,
                resolving_percent: if exemplars == 0 { 100.0 } else { 100.0 * resolving as f64 / exemplars as f64 },
            },
            span_metrics_spans_counted: counted as u64,
            span_metrics_count_every_span: counted == truth.spans_sent as f64,
            queue_peak_items: peak_items as u64,
            queue_peak_mib: peak_bytes / 1_048_576.0,
            restarts,
            sinks_cut_seconds: cut_total.as_secs_f64(),
            killed,
            settled,
            directory: keep.then(|| dir.display().to_string()),
        }
    });
    if options.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        summary.print();
    }
    drop(workspace);
    Ok(summary)
}

fn toggle_cut(
    sinks: &Sinks,
    cut_since: &mut Option<Instant>,
    cut_total: &mut Duration,
    frame: &mut Frame,
    started: Instant,
) {
    let at = started.elapsed().as_secs();
    if let Some(since) = cut_since.take() {
        *cut_total += since.elapsed();
        sinks.set_cut(false);
        frame.events.push(format!("{at}s: sinks back: the backlog drains"));
    } else {
        *cut_since = Some(Instant::now());
        sinks.set_cut(true);
        frame.events.push(format!("{at}s: sinks cut off: the backlog waits on disk"));
    }
}

fn kill(pipeline: &Pipeline, stage: &str, killed: &mut Vec<String>, frame: &mut Frame, started: Instant) {
    let at = started.elapsed().as_secs();
    match pipeline.kill_stage(stage) {
        Some(pid) => {
            killed.push(format!("{stage} at {at}s"));
            frame.events.push(format!("{at}s: {stage} (pid {pid}) SIGKILLed: the supervisor restarts it"));
        }
        None => frame.events.push(format!("{at}s: no running {stage} to kill")),
    }
}
