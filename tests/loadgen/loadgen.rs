//! `tailgate-loadgen`: a bounded OTLP load generator, a counting OTLP sink, and a process meter,
//! used by the benchmarks in BENCHMARKS.md.
//!
//! - `send`: OTLP/gRPC traces (and one correlated log record per span) at a fixed rate, or as fast
//!   as the receiver accepts (`--rate 0`), for a bounded duration. A configurable share of traces
//!   has an error span or a slow root, so the expected kept set is known. Prints what was
//!   accepted and refused.
//!   With `--log-file`, the correlated log records are appended to a file as JSON lines instead
//!   (what a service writes for the file input).
//! - `lines`: writes a file of uncorrelated JSON log lines (a share at ERROR), for the file
//!   input's throughput.
//! - `sink`: an OTLP/gRPC endpoint that counts spans, log records and metric data points (and,
//!   with `--loki-listen`, a Loki push endpoint that counts entries), and prints the counts when it
//!   gets SIGINT/SIGTERM or after `--duration`.
//! - `meter`: samples a process tree (a supervisor pid and its children) for CPU time and
//!   private memory (smaps_rollup `Anonymous`) over a window.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};

mod profile;
mod sink;
use profile::{ProfileOptions, profile};
use sink::sink;

/// Longest run any subcommand allows: every load loop is bounded.
const MAX_DURATION_SECS: u64 = 600;

#[derive(Debug, Parser)]
#[command(name = "tailgate-loadgen", about = "bounded OTLP load generator, sink and process meter")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send traces (and correlated logs) over OTLP/gRPC.
    Send {
        /// Receiver address.
        #[arg(long, default_value = "127.0.0.1:4317")]
        endpoint: String,
        /// Spans per second; 0 sends as fast as the receiver accepts.
        #[arg(long, default_value_t = 2500)]
        rate: u64,
        /// How long to send, seconds (at most 600).
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Spans per trace.
        #[arg(long, default_value_t = 5)]
        spans_per_trace: u32,
        /// Spans per request.
        #[arg(long, default_value_t = 100)]
        batch: u32,
        /// Percent of traces with an error span.
        #[arg(long, default_value_t = 10)]
        error_percent: u32,
        /// Percent of traces with a slow (350 ms) root.
        #[arg(long, default_value_t = 10)]
        slow_percent: u32,
        /// Also send one correlated log record per span.
        #[arg(long)]
        logs: bool,
        /// Concurrent requests in flight (for --rate 0).
        #[arg(long, default_value_t = 4)]
        concurrency: u32,
        /// Append the correlated log records to this file as JSON lines (instead of OTLP).
        #[arg(long)]
        log_file: Option<std::path::PathBuf>,
        /// Give root spans this many distinct names (`GET /api/orders/<k>`), cycling; 0: one name.
        #[arg(long, default_value_t = 0)]
        span_names: u32,
    },
    /// The field report's load profile (`tailgate::workload`): virtual users ramping up to a
    /// plateau, four endpoints, OTLP/gRPC traces, correlated JSON log lines to a file and the
    /// ground truth of the traces the default sampling must keep.
    Profile {
        /// Receiver address.
        #[arg(long, default_value = "127.0.0.1:4317")]
        endpoint: String,
        /// How long to run, seconds (at most 600).
        #[arg(long, default_value_t = 90)]
        duration: u64,
        /// Users over time: `TIME:USERS,...` (each user finishes about one trace a second).
        #[arg(long, default_value = "30s:100,45s:250,60s:500")]
        ramp: tailgate::workload::Ramp,
        /// One export every this many milliseconds (what an SDK's batch processor does).
        #[arg(long, default_value_t = 200)]
        tick_ms: u64,
        /// Most spans per request (larger ticks are split).
        #[arg(long, default_value_t = 512)]
        batch: usize,
        /// Append the services' JSON log lines (one per span) to this file.
        #[arg(long)]
        log_file: Option<std::path::PathBuf>,
        /// Write the traces the default sampling must keep (accepted ones), one JSON line each.
        #[arg(long)]
        truth_file: Option<std::path::PathBuf>,
        /// Seed of the run's draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Write JSON log lines without trace ids to a file.
    Lines {
        /// The file (appended to).
        #[arg(long)]
        file: std::path::PathBuf,
        /// How many lines (at most 50 million).
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Percent of lines at ERROR level (the rest INFO).
        #[arg(long, default_value_t = 14)]
        error_percent: u32,
    },
    /// Count what arrives over OTLP/gRPC.
    Sink {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:14317")]
        listen: String,
        /// Stop after this many seconds (at most 600) or at SIGINT/SIGTERM.
        #[arg(long, default_value_t = 600)]
        duration: u64,
        /// Also accept Loki pushes (`/loki/api/v1/push`, protobuf + snappy) on this address.
        #[arg(long)]
        loki_listen: Option<String>,
    },
    /// Measure CPU and private memory of a process and its children over a window.
    Meter {
        /// The supervisor's pid.
        #[arg(long)]
        pid: u32,
        /// Window, seconds (at most 600).
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Also write one CSV row per process per second (`t,process,cpu_percent,private_mib`)
        /// to this file, for plots (tests/loadgen/plot.py).
        #[arg(long)]
        series: Option<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.command {
        Command::Send {
            endpoint,
            rate,
            duration,
            spans_per_trace,
            batch,
            error_percent,
            slow_percent,
            logs,
            concurrency,
            log_file,
            span_names,
        } => {
            let plan = Plan {
                spans_per_trace: spans_per_trace.max(1),
                batch: batch.max(1),
                error_percent,
                slow_percent,
                logs: logs || log_file.is_some(),
                span_names,
            };
            let lines = log_file.map(LineWriter::open).transpose()?;
            runtime.block_on(send(&endpoint, rate, duration.min(MAX_DURATION_SECS), concurrency.max(1), plan, lines))
        }
        Command::Profile { endpoint, duration, ramp, tick_ms, batch, log_file, truth_file, seed } => {
            let options = ProfileOptions {
                duration: Duration::from_secs(duration.min(MAX_DURATION_SECS)),
                ramp,
                tick: Duration::from_millis(tick_ms.clamp(10, 10_000)),
                batch: batch.max(1),
                seed,
            };
            runtime.block_on(profile(&endpoint, options, log_file, truth_file))
        }
        Command::Lines { file, count, error_percent } => write_lines(&file, count.min(50_000_000), error_percent),
        Command::Sink { listen, duration, loki_listen } => {
            runtime.block_on(sink(&listen, duration.min(MAX_DURATION_SECS), loki_listen))
        }
        Command::Meter { pid, duration, series } => meter(pid, duration.min(MAX_DURATION_SECS), series),
    }
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    spans_per_trace: u32,
    batch: u32,
    error_percent: u32,
    slow_percent: u32,
    logs: bool,
    /// Distinct root span names (0: one).
    span_names: u32,
}

#[derive(Default)]
struct SendStats {
    spans_accepted: AtomicU64,
    spans_keep_worthy: AtomicU64,
    spans_refused: AtomicU64,
    logs_accepted: AtomicU64,
    requests_failed: AtomicU64,
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

/// Builds request number `sequence`: whole traces, `plan.batch` spans, plus correlated logs.
/// Returns (traces request, logs request, spans of kept traces).
fn build(sequence: u64, plan: Plan, run_id: u64) -> (ExportTraceServiceRequest, ExportLogsServiceRequest, u64) {
    build_variant(sequence, plan, run_id, 0)
}

/// Like `build`, with the root span names of template `variant` (see `Plan::span_names`).
fn build_variant(
    sequence: u64,
    plan: Plan,
    run_id: u64,
    variant: u32,
) -> (ExportTraceServiceRequest, ExportLogsServiceRequest, u64) {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let traces = (plan.batch / plan.spans_per_trace).max(1);
    let mut spans = Vec::with_capacity(plan.batch as usize);
    let mut logs = Vec::new();
    let mut keep_worthy = 0;
    for t in 0..traces {
        let trace_number = sequence * u64::from(traces) + u64::from(t);
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&run_id.to_be_bytes());
        trace_id[8..].copy_from_slice(&trace_number.to_be_bytes());
        // Spread outcomes over the positions of the request, so every request has the mix.
        let bucket = (u64::from(t) * 100 / u64::from(traces)) as u32;
        let error = bucket < plan.error_percent;
        let slow = !error && bucket < plan.error_percent + plan.slow_percent;
        if error || slow {
            keep_worthy += u64::from(plan.spans_per_trace);
        }
        let root_len = if slow { 350_000_000 } else { 40_000_000 };
        for s in 0..plan.spans_per_trace {
            let mut span_id = [0u8; 8];
            span_id[..4].copy_from_slice(&(trace_number as u32).to_be_bytes());
            span_id[4..].copy_from_slice(&(s + 1).to_be_bytes());
            let mut parent = Vec::new();
            if s > 0 {
                let mut root = span_id;
                root[4..].copy_from_slice(&1u32.to_be_bytes());
                parent = root.to_vec();
            }
            let failed = error && s + 1 == plan.spans_per_trace;
            let (start, end) =
                if s == 0 { (now - root_len, now) } else { (now - root_len + 1_000_000, now - root_len + 6_000_000) };
            spans.push(Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                parent_span_id: parent,
                name: match (s, plan.span_names) {
                    (0, 0) => "GET /api/orders".into(),
                    (0, names) => format!("GET /api/orders/{}", (variant * traces + t) % names),
                    _ => format!("SELECT orders {s}"),
                },
                kind: if s == 0 { span::SpanKind::Server as i32 } else { span::SpanKind::Client as i32 },
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                attributes: vec![kv("http.route", "/api/orders"), kv("db.system", "postgresql")],
                status: Some(Status {
                    code: if failed { status::StatusCode::Error as i32 } else { status::StatusCode::Unset as i32 },
                    message: if failed { "deadline exceeded".into() } else { String::new() },
                }),
                ..Default::default()
            });
            if plan.logs {
                logs.push(LogRecord {
                    time_unix_nano: end,
                    severity_number: if failed { 17 } else { 9 },
                    severity_text: if failed { "ERROR".into() } else { "INFO".into() },
                    body: Some(AnyValue { value: Some(any_value::Value::StringValue(format!("handled step {s}"))) }),
                    trace_id: trace_id.to_vec(),
                    span_id: span_id.to_vec(),
                    ..Default::default()
                });
            }
        }
    }
    let resource = Some(Resource {
        attributes: vec![kv("service.name", "orders"), kv("host.name", "edge-1")],
        ..Default::default()
    });
    let scope = Some(InstrumentationScope { name: "tailgate-loadgen".into(), ..Default::default() });
    let traces = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: resource.clone(),
            scope_spans: vec![ScopeSpans { scope: scope.clone(), spans, ..Default::default() }],
            ..Default::default()
        }],
    };
    let logs = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource,
            scope_logs: vec![ScopeLogs { scope, log_records: logs, ..Default::default() }],
            ..Default::default()
        }],
    };
    (traces, logs, keep_worthy)
}

/// An encoded request whose trace ids are patched per send, so generating load costs a copy,
/// not a protobuf encode (the generator must not be the bottleneck on a 2-core machine).
struct Template {
    bytes: Vec<u8>,
    /// (offset of a trace id's trace-number half, trace position in the request)
    id_offsets: Vec<(usize, u64)>,
    traces: u64,
    items: u64,
}

impl Template {
    fn new(bytes: Vec<u8>, run_id: u64, traces: u64, items: u64) -> Template {
        let mut id_offsets = Vec::new();
        for t in 0..traces {
            let mut trace_id = [0u8; 16];
            trace_id[..8].copy_from_slice(&run_id.to_be_bytes());
            trace_id[8..].copy_from_slice(&t.to_be_bytes());
            let mut from = 0;
            while let Some(at) = bytes[from..].windows(16).position(|w| w == trace_id) {
                id_offsets.push((from + at + 8, t));
                from += at + 16;
            }
        }
        Template { bytes, id_offsets, traces, items }
    }

    /// Request `sequence`: the template with trace numbers `sequence * traces + t`.
    fn render(&self, sequence: u64) -> bytes::Bytes {
        let mut out = self.bytes.clone();
        for (offset, t) in &self.id_offsets {
            out[*offset..*offset + 8].copy_from_slice(&(sequence * self.traces + t).to_be_bytes());
        }
        bytes::Bytes::from(out)
    }
}

async fn export_raw(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
    body: bytes::Bytes,
) -> Result<(), tonic::Status> {
    grpc.ready().await.map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, tailgate_stages::grpc_raw::RawCodec).await.map(|_| ())
}

/// Appends the log lines of sent requests to a file, as a service writing JSON logs would.
struct LineWriter {
    file: std::sync::Mutex<std::io::BufWriter<std::fs::File>>,
}

impl LineWriter {
    fn open(path: std::path::PathBuf) -> anyhow::Result<Arc<LineWriter>> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Arc::new(LineWriter { file: std::sync::Mutex::new(std::io::BufWriter::new(file)) }))
    }

    /// The lines of request `sequence`: one per span, with the same ids and outcomes as `build`.
    fn write_request(&self, sequence: u64, plan: Plan, run_id: u64) -> std::io::Result<u64> {
        use std::io::Write;
        let traces = (plan.batch / plan.spans_per_trace).max(1);
        let Ok(mut file) = self.file.lock() else { return Ok(0) };
        let mut lines = 0;
        for t in 0..traces {
            let trace_number = sequence * u64::from(traces) + u64::from(t);
            let bucket = (u64::from(t) * 100 / u64::from(traces)) as u32;
            let error = bucket < plan.error_percent;
            let slow = !error && bucket < plan.error_percent + plan.slow_percent;
            for s in 0..plan.spans_per_trace {
                let failed = error && s + 1 == plan.spans_per_trace;
                let duration_ms = if s == 0 { if slow { 350 } else { 40 } } else { 5 };
                writeln!(
                    file,
                    r#"{{"time":{},"level":"{}","msg":"handled step {s}","trace_id":"{run_id:016x}{trace_number:016x}","span_id":"{:08x}{:08x}","service":"orders","duration_ms":{duration_ms}}}"#,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0),
                    if failed { "ERROR" } else { "INFO" },
                    trace_number as u32,
                    s + 1,
                )?;
                lines += 1;
            }
        }
        file.flush()?;
        Ok(lines)
    }
}

fn write_lines(path: &std::path::Path, count: u64, error_percent: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut errors = 0;
    for n in 0..count {
        let error = n % 100 < u64::from(error_percent);
        errors += u64::from(error);
        writeln!(
            out,
            r#"{{"time":"2026-12-01T08:00:00.{:06}Z","level":"{}","msg":"request {n} handled by the orders service","service":"orders","http.route":"/api/orders","duration_ms":{}}}"#,
            n % 1_000_000,
            if error { "error" } else { "info" },
            n % 150,
        )?;
    }
    out.flush()?;
    println!("wrote {count} lines ({errors} at ERROR) to {}", path.display());
    Ok(())
}

async fn send(
    endpoint: &str,
    rate: u64,
    duration: u64,
    concurrency: u32,
    plan: Plan,
    lines: Option<Arc<LineWriter>>,
) -> anyhow::Result<()> {
    use prost::Message;
    let url = format!("http://{endpoint}");
    let channel = tonic::transport::Endpoint::from_shared(url)?.connect().await?;
    let stats = Arc::new(SendStats::default());
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let (traces, logs, keep_worthy) = build(0, plan, run_id);
    let traces_per_request = u64::from((plan.batch / plan.spans_per_trace).max(1));
    let spans_per_request = traces_per_request * u64::from(plan.spans_per_trace);
    let trace_template = Arc::new(Template::new(traces.encode_to_vec(), run_id, traces_per_request, spans_per_request));
    // One template per group of root names, so that `span_names` distinct names go out.
    let variants = plan.span_names.div_ceil(traces_per_request as u32).max(1);
    let trace_templates: Arc<Vec<Template>> = Arc::new(
        (0..variants)
            .map(|variant| {
                let (traces, _, _) = build_variant(0, plan, run_id, variant);
                Template::new(traces.encode_to_vec(), run_id, traces_per_request, spans_per_request)
            })
            .collect(),
    );
    let log_template = Arc::new(Template::new(logs.encode_to_vec(), run_id, traces_per_request, spans_per_request));
    let cpu_before = cpu_ticks(std::process::id()).unwrap_or(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(duration);
    let sequence = Arc::new(AtomicU64::new(0));
    let workers = if rate == 0 { concurrency } else { 1 };
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let channel = channel.clone();
        let stats = stats.clone();
        let sequence = sequence.clone();
        let (trace_template, log_template) = (trace_template.clone(), log_template.clone());
        let trace_templates = trace_templates.clone();
        let lines = lines.clone();
        tasks.push(tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let mut tick = (rate > 0).then(|| {
                let per_second = (rate as f64 / spans_per_request as f64).max(0.001);
                let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                interval
            });
            let mut latencies = Latencies::default();
            while Instant::now() < deadline {
                if let Some(tick) = tick.as_mut() {
                    tick.tick().await;
                }
                let n = sequence.fetch_add(1, Ordering::Relaxed);
                let body = trace_templates[(n % trace_templates.len() as u64) as usize].render(n);
                let sent_at = Instant::now();
                match export_raw(&mut grpc, "/opentelemetry.proto.collector.trace.v1.TraceService/Export", body).await {
                    Ok(()) => {
                        latencies.add(sent_at.elapsed());
                        stats.spans_accepted.fetch_add(trace_template.items, Ordering::Relaxed);
                        stats.spans_keep_worthy.fetch_add(keep_worthy, Ordering::Relaxed);
                    }
                    Err(_) => {
                        stats.spans_refused.fetch_add(trace_template.items, Ordering::Relaxed);
                        stats.requests_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(writer) = &lines {
                    if let Ok(written) = writer.write_request(n, plan, run_id) {
                        stats.logs_accepted.fetch_add(written, Ordering::Relaxed);
                    }
                } else if plan.logs {
                    let body = log_template.render(n);
                    match export_raw(&mut grpc, "/opentelemetry.proto.collector.logs.v1.LogsService/Export", body).await
                    {
                        Ok(()) => {
                            stats.logs_accepted.fetch_add(log_template.items, Ordering::Relaxed);
                        }
                        Err(_) => {
                            stats.requests_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Latencies::default();
    for task in tasks {
        latencies.merge(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_ticks(std::process::id()).unwrap_or(0).saturating_sub(cpu_before);
    let accepted = stats.spans_accepted.load(Ordering::Relaxed);
    println!(
        "sent for {elapsed:.1} s: spans accepted {accepted} ({:.0}/s), keep-worthy {}, refused {}, logs accepted {}, failed requests {}; generator cpu {:.2}% of one core",
        accepted as f64 / elapsed,
        stats.spans_keep_worthy.load(Ordering::Relaxed),
        stats.spans_refused.load(Ordering::Relaxed),
        stats.logs_accepted.load(Ordering::Relaxed),
        stats.requests_failed.load(Ordering::Relaxed),
        cpu as f64 / elapsed,
    );
    latencies.print();
    Ok(())
}

/// Round trips of accepted trace requests: the receiver answers after the request's commit to
/// the durable queue, so this is the receive-to-durable latency as a client sees it.
#[derive(Default)]
pub(crate) struct Latencies(Vec<u32>);

impl Latencies {
    pub(crate) fn add(&mut self, elapsed: Duration) {
        self.0.push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
    }

    fn merge(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// `request latency (answered after the commit): p50 X ms, p99 Y ms, max Z ms over N requests`.
    pub(crate) fn print(mut self) {
        if self.0.is_empty() {
            return;
        }
        self.0.sort_unstable();
        let at = |q: f64| f64::from(self.0[((self.0.len() - 1) as f64 * q).round() as usize]) / 1000.0;
        println!(
            "request latency (answered after the commit): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} requests",
            at(0.5),
            at(0.99),
            at(1.0),
            self.0.len()
        );
    }
}

/// CPU ticks (utime + stime) of a process.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ppid(1) ... utime(11) stime(12)
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// (anonymous kB, pss kB) from smaps_rollup. Anonymous memory is the process's own heap;
/// `Private_*` would also count queue-map pages that only this process touched, which are page
/// cache shared through the file, not memory the process owns.
fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((field("Anonymous:"), field("Pss:")))
}

fn tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{root}/task/{root}/children")) {
        pids.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    pids
}

fn meter(root: u32, duration: u64, series: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let start_pids = tree(root);
    let start: HashMap<u32, u64> = start_pids.iter().filter_map(|p| Some((*p, cpu_ticks(*p)?))).collect();
    let started = Instant::now();
    let mut peak_private = 0u64;
    let mut peak_pss = 0u64;
    let mut csv = match &series {
        Some(path) => {
            let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
            writeln!(file, "t,process,cpu_percent,private_mib")?;
            Some(file)
        }
        None => None,
    };
    let mut last: HashMap<u32, u64> = start.clone();
    let mut last_at = Instant::now();
    while started.elapsed() < Duration::from_secs(duration) {
        std::thread::sleep(Duration::from_secs(1));
        let pids = tree(root);
        let (private, pss) =
            pids.iter().filter_map(|p| memory_kb(*p)).fold((0, 0), |acc, m| (acc.0 + m.0, acc.1 + m.1));
        peak_private = peak_private.max(private);
        peak_pss = peak_pss.max(pss);
        if let Some(file) = csv.as_mut() {
            let interval = last_at.elapsed().as_secs_f64();
            last_at = Instant::now();
            let t = started.elapsed().as_secs_f64();
            for pid in &pids {
                let ticks = cpu_ticks(*pid).unwrap_or(0);
                // A process new since the last sample (a restarted stage) counts from zero.
                let used = ticks.saturating_sub(last.get(pid).copied().unwrap_or(0));
                last.insert(*pid, ticks);
                let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let private_mib = memory_kb(*pid).map_or(0.0, |(private, _)| private as f64 / 1024.0);
                let cpu = used as f64 / ticks_per_second / interval * 100.0;
                writeln!(file, "{t:.1},{},{cpu:.2},{private_mib:.2}", name.trim())?;
            }
        }
    }
    if let Some(mut file) = csv {
        file.flush()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let end_pids = tree(root);
    let mut used = 0u64;
    let mut per_process = Vec::new();
    for pid in &end_pids {
        let now = cpu_ticks(*pid).unwrap_or(0);
        let delta = now.saturating_sub(start.get(pid).copied().unwrap_or(0));
        used += delta;
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let private_mib = memory_kb(*pid).map_or(0.0, |(private, _)| private as f64 / 1024.0);
        let seconds = delta as f64 / ticks_per_second;
        per_process.push(format!(
            "{} {:.2}% ({seconds:.2} CPU-s, {private_mib:.1} MiB)",
            name.trim(),
            seconds / elapsed * 100.0
        ));
    }
    let (private, pss) =
        end_pids.iter().filter_map(|p| memory_kb(*p)).fold((0, 0), |acc, m| (acc.0 + m.0, acc.1 + m.1));
    println!(
        "processes {}: cpu {:.2}% of one core over {elapsed:.1} s; private memory {:.1} MiB (peak {:.1}); pss {:.1} MiB (peak {:.1})",
        end_pids.len(),
        used as f64 / ticks_per_second / elapsed * 100.0,
        private as f64 / 1024.0,
        peak_private as f64 / 1024.0,
        pss as f64 / 1024.0,
        peak_pss as f64 / 1024.0,
    );
    println!("per process: {}", per_process.join(", "));
    Ok(())
}
