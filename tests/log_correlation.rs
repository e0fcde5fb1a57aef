//! Logs follow their trace's decision, 1:1 on trace_id, replayed from the versioned golden set
//! (`tests/golden/correlation.v1.json`) through the real binary: logs over OTLP, logs tailed from
//! a JSON-lines file, the file while tail_sample is SIGKILLed again and again, and the file while
//! tail_sample is stopped for longer than `log_mirror.max_wait`.
//!
//! Each replay asserts: the delivered spans are exactly the spans of kept traces; the delivered
//! log lines are exactly the lines the golden set marks kept, each once; and the trace ids of
//! the delivered logs equal the trace ids of the delivered traces that have logs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use common::{Backend, Tailgate, Timing, signal, string_kv, trace_request, wait_until};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{Span, Status, status};
use serde_json::Value;

const GOLDEN: &str = include_str!("golden/correlation.v1.json");

/// One thing to send at a time offset.
enum Event {
    Span(Box<Span>),
    Log { line: String, trace_id: Option<[u8; 16]>, severity: i32, duration_ms: Option<u64> },
}

/// The golden set turned into a schedule and its expected outcome.
struct Replay {
    events: BTreeMap<u64, Vec<Event>>,
    /// (trace id, span id) of every span that must arrive.
    kept_spans: BTreeSet<([u8; 16], [u8; 8])>,
    /// `msg` of every log line that must arrive.
    kept_logs: BTreeSet<String>,
    /// Trace id of every log line that must arrive, for kept traces.
    kept_log_traces: BTreeSet<[u8; 16]>,
}

fn trace_id_of(salt: u64, index: usize) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&salt.to_be_bytes());
    id[8..12].copy_from_slice(&(index as u32 + 1).to_be_bytes());
    id[15] = 0x42;
    id
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn severity_of(level: &str) -> i32 {
    match level.to_ascii_lowercase().as_str() {
        "debug" => 5,
        "info" => 9,
        "warn" => 13,
        "error" | "err" => 17,
        _ => 0,
    }
}

fn replay(via_file: bool) -> Replay {
    let golden: Value = serde_json::from_str(GOLDEN).unwrap();
    assert_eq!(golden["version"], 1);
    let salt = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let base = salt - salt % 1_000_000_000;
    let mut out = Replay {
        events: BTreeMap::new(),
        kept_spans: BTreeSet::new(),
        kept_logs: BTreeSet::new(),
        kept_log_traces: BTreeSet::new(),
    };
    for (index, trace) in golden["traces"].as_array().unwrap().iter().enumerate() {
        let name = trace["name"].as_str().unwrap();
        let trace_id = trace_id_of(salt, index);
        let kept = trace["kept"].as_bool();
        for span in trace["spans"].as_array().unwrap() {
            let id = span["id"].as_u64().unwrap();
            let mut span_id = [0u8; 8];
            span_id[..4].copy_from_slice(&(index as u32 + 1).to_be_bytes());
            span_id[7] = id as u8;
            let parent = span["parent"].as_u64().map(|p| {
                let mut parent_id = span_id;
                parent_id[7] = p as u8;
                parent_id.to_vec()
            });
            let at = span["at"].as_u64().unwrap();
            let start = base + at * 1_000_000;
            let error = span["error"].as_bool().unwrap_or(false);
            let span = Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                parent_span_id: parent.unwrap_or_default(),
                name: format!("{name} {id}"),
                start_time_unix_nano: start,
                end_time_unix_nano: start + span["ms"].as_u64().unwrap() * 1_000_000,
                status: error.then(|| Status { code: status::StatusCode::Error as i32, message: "failed".into() }),
                ..Default::default()
            };
            if kept == Some(true) {
                out.kept_spans.insert((trace_id, span_id));
            }
            out.events.entry(at).or_default().push(Event::Span(Box::new(span)));
        }
        for (number, log) in trace["logs"].as_array().unwrap().iter().enumerate() {
            let msg = format!("golden-{name}-{number}");
            let level = log["level"].as_str().unwrap();
            let line = serde_json::json!({
                "msg": msg, "level": level, "trace_id": hex(&trace_id), "service": "golden"
            })
            .to_string();
            let log_kept = log["kept"].as_bool().or(kept).unwrap();
            if log_kept {
                out.kept_logs.insert(msg);
                if kept == Some(true) {
                    out.kept_log_traces.insert(trace_id);
                }
            }
            let at = log["at"].as_u64().unwrap();
            out.events.entry(at).or_default().push(Event::Log {
                line,
                trace_id: Some(trace_id),
                severity: severity_of(level),
                duration_ms: None,
            });
        }
    }
    for (number, log) in golden["untraced"].as_array().unwrap().iter().enumerate() {
        if log["file_only"].as_bool() == Some(true) && !via_file {
            continue;
        }
        let msg = format!("golden-untraced-{number}");
        let (line, severity) = match log["text"].as_str() {
            Some(text) => (format!("{text} {msg}"), 0),
            None => {
                let level = log["level"].as_str().unwrap();
                let mut fields = serde_json::json!({ "msg": msg, "level": level });
                if let Some(duration) = log["duration_ms"].as_u64() {
                    fields["duration_ms"] = duration.into();
                }
                (fields.to_string(), severity_of(level))
            }
        };
        if log["kept"].as_bool().unwrap() {
            out.kept_logs.insert(msg);
        }
        let at = log["at"].as_u64().unwrap();
        let duration_ms = log["duration_ms"].as_u64();
        out.events.entry(at).or_default().push(Event::Log { line, trace_id: None, severity, duration_ms });
    }
    out
}

/// The golden message a delivered line carries.
fn msg_of(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(value) => value["msg"].as_str().unwrap_or_default().to_owned(),
        Err(_) => body.rsplit(' ').next().unwrap_or_default().to_owned(),
    }
}

/// Delivered log lines: msg -> (times, trace id).
fn delivered_logs(backend: &Backend) -> BTreeMap<String, (usize, Option<[u8; 16]>)> {
    let mut out: BTreeMap<String, (usize, Option<[u8; 16]>)> = BTreeMap::new();
    for request in &backend.received.lock().unwrap().logs {
        for resource in &request.resource_logs {
            for scope in &resource.scope_logs {
                for record in &scope.log_records {
                    let Some(any_value::Value::StringValue(body)) = record.body.as_ref().and_then(|b| b.value.clone())
                    else {
                        continue;
                    };
                    let trace = <[u8; 16]>::try_from(record.trace_id.as_slice()).ok();
                    out.entry(msg_of(&body)).or_insert((0, trace)).0 += 1;
                }
            }
        }
    }
    out
}

enum Disturbance {
    None,
    /// SIGKILL tail_sample every this often while the replay runs and drains.
    KillSampler(Duration),
    /// SIGSTOP tail_sample after the first events for this long.
    StopSampler(Duration),
}

fn run_replay(via_file: bool, disturbance: Disturbance) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let logs_dir = tempfile::tempdir().unwrap();
    let log_path = logs_dir.path().join("golden.jsonl");
    let filelog = format!(
        "{{ include: [\"{}/*.jsonl\"], start_at: beginning, poll_interval: 100ms }}",
        logs_dir.path().display()
    );
    let timing = Timing {
        decision_wait: "6s",
        root_grace: "3s",
        log_max_wait: "8s",
        filelog: via_file.then_some(filelog),
        // The frozen sampler must stay frozen for the whole drill, not be killed by the
        // supervisor's liveness check after its default 5 s.
        supervisor_extra: "  liveness_timeout: 60s",
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let replay = replay(via_file);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
    let started = Instant::now();
    let mut next_kill = started;
    let mut stopped: Option<(u32, Instant)> = None;
    let grpc = tailgate.grpc;
    for (at, events) in &replay.events {
        let due = started + Duration::from_millis(*at);
        while Instant::now() < due {
            disturb(&tailgate, &disturbance, &mut next_kill, &mut stopped);
            std::thread::sleep(Duration::from_millis(20));
        }
        let spans: Vec<Span> =
            events.iter().filter_map(|e| if let Event::Span(s) = e { Some((**s).clone()) } else { None }).collect();
        let mut records = Vec::new();
        for event in events {
            if let Event::Log { line, trace_id, severity, duration_ms } = event {
                if via_file {
                    writeln!(file, "{line}").unwrap();
                } else {
                    records.push(LogRecord {
                        time_unix_nano: 1_700_000_000_000_000_000 + at * 1_000_000,
                        severity_number: *severity,
                        body: Some(AnyValue { value: Some(any_value::Value::StringValue(line.clone())) }),
                        trace_id: trace_id.map(|t| t.to_vec()).unwrap_or_default(),
                        // Over OTLP a record's fields are its attributes.
                        attributes: duration_ms
                            .map(|ms| {
                                let mut kv = string_kv("duration_ms", "");
                                kv.value = Some(AnyValue { value: Some(any_value::Value::IntValue(ms as i64)) });
                                vec![kv]
                            })
                            .unwrap_or_default(),
                        ..Default::default()
                    });
                }
            }
        }
        runtime.block_on(async {
            if !spans.is_empty() {
                let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
                client.export(trace_request("golden", spans)).await.unwrap();
            }
            if !records.is_empty() {
                let request = ExportLogsServiceRequest {
                    resource_logs: vec![ResourceLogs {
                        resource: Some(Resource {
                            attributes: vec![string_kv("service.name", "golden")],
                            ..Default::default()
                        }),
                        scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
                        ..Default::default()
                    }],
                };
                let mut client = LogsServiceClient::connect(format!("http://{grpc}")).await.unwrap();
                client.export(request).await.unwrap();
            }
        });
    }
    let complete = wait_until(Duration::from_secs(90), || {
        disturb(&tailgate, &disturbance, &mut next_kill, &mut stopped);
        let spans = backend.spans();
        let logs = delivered_logs(&backend);
        replay.kept_spans.iter().all(|key| spans.contains_key(key))
            && replay.kept_logs.iter().all(|msg| logs.contains_key(msg))
            && stopped.is_none()
    });
    // Time for anything that should not arrive (dropped traces' logs, duplicates) to show.
    std::thread::sleep(Duration::from_secs(3));
    let spans = backend.spans();
    let logs = delivered_logs(&backend);
    let got_spans: BTreeSet<_> = spans.keys().copied().collect();
    let got_logs: BTreeSet<String> = logs.keys().cloned().collect();
    assert!(
        complete,
        "not everything arrived: missing spans {:?}, missing logs {:?}",
        replay.kept_spans.difference(&got_spans).collect::<Vec<_>>(),
        replay.kept_logs.difference(&got_logs).collect::<Vec<_>>()
    );
    assert_eq!(got_spans, replay.kept_spans, "delivered spans differ from the kept traces' spans");
    assert_eq!(got_logs, replay.kept_logs, "delivered log lines differ from the golden outcome");
    for (msg, (times, _)) in &logs {
        assert_eq!(*times, 1, "{msg} delivered {times} times");
    }
    for (key, (_, times)) in &spans {
        assert_eq!(*times, 1, "span {key:?} delivered {times} times");
    }
    let kept_traces: BTreeSet<[u8; 16]> = got_spans.iter().map(|(trace, _)| *trace).collect();
    let log_traces: BTreeSet<[u8; 16]> =
        logs.values().filter_map(|(_, trace)| *trace).filter(|trace| kept_traces.contains(trace)).collect();
    assert_eq!(log_traces, replay.kept_log_traces, "kept logs and kept traces are not 1:1 on trace_id");
    let orphans: Vec<_> = logs
        .iter()
        .filter(|(msg, (_, trace))| trace.is_some_and(|t| !kept_traces.contains(&t)) && !msg.contains("unknown-trace"))
        .collect();
    assert!(orphans.is_empty(), "logs of dropped traces survived: {orphans:?}");
}

fn disturb(
    tailgate: &Tailgate,
    disturbance: &Disturbance,
    next_kill: &mut Instant,
    stopped: &mut Option<(u32, Instant)>,
) {
    match disturbance {
        Disturbance::None => {}
        Disturbance::KillSampler(every) => {
            if Instant::now() >= *next_kill {
                if let Some(pid) = tailgate.stage_pid("tail_sample") {
                    signal(pid, "KILL");
                }
                *next_kill = Instant::now() + *every;
            }
        }
        Disturbance::StopSampler(for_how_long) => match stopped {
            None if next_kill.elapsed() < Duration::from_secs(3600)
                && next_kill.elapsed() >= Duration::from_millis(500) =>
            {
                if let Some(pid) = tailgate.stage_pid("tail_sample") {
                    signal(pid, "STOP");
                    *stopped = Some((pid, Instant::now()));
                    // Stop only once.
                    *next_kill -= Duration::from_secs(7200);
                }
            }
            Some((pid, since)) if since.elapsed() >= *for_how_long => {
                signal(*pid, "CONT");
                *stopped = None;
            }
            _ => {}
        },
    }
}

#[test]
fn golden_set_over_otlp_logs() {
    run_replay(false, Disturbance::None);
}

#[test]
fn golden_set_from_a_file() {
    run_replay(true, Disturbance::None);
}

#[test]
fn golden_set_from_a_file_while_tail_sample_is_killed_again_and_again() {
    run_replay(true, Disturbance::KillSampler(Duration::from_millis(1500)));
}

#[test]
fn golden_set_while_tail_sample_is_stopped_longer_than_max_wait() {
    // max_wait is 8 s: the sampler is frozen for 14 s right after the replay begins, so every
    // log waits through a sampler outage longer than max_wait.
    run_replay(true, Disturbance::StopSampler(Duration::from_secs(14)));
}
