//! The Loki destination of the export stage, end to end: logs go into the real binary over OTLP
//! and come out at a Loki push receiver (`common::loki`) that decodes Loki's own wire format
//! (snappy block + `logproto.PushRequest`) with its own message definitions.
//!
//! - streams are labelled `service_name` and `level`, trace context rides as structured metadata;
//! - every stream reaches Loki in timestamp order across requests and exporter batches
//!   (`out_of_order_action: rewrite_timestamp`, the default);
//! - an entry Loki refuses (400) is dropped alone, its neighbours arrive, and the exporter stops;
//! - 503 is retried until Loki takes the push.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::loki::{Labels, LokiEntry, LokiSink};
use common::*;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

/// A base timestamp with a sub-second part, so seconds/nanos splitting is exercised.
const T0: u64 = 1_700_000_000_123_456_789;
/// Severity numbers (OTLP): INFO, WARN, ERROR, ERROR3, FATAL, FATAL4.
const INFO: i32 = 9;
const WARN: i32 = 13;
const ERROR: i32 = 17;
const ERROR3: i32 = 19;
const FATAL: i32 = 21;
const FATAL4: i32 = 24;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Starts tailgate with its logs going to `sink` (traces and metrics to `backend`).
fn start(backend: std::net::SocketAddr, sink: &LokiSink, extra: &str) -> Tailgate {
    Tailgate::start(backend, &Timing { logs_destination: Some(sink.destination(extra)), ..Timing::default() })
}

/// An untraced record.
fn record(line: &str, severity: i32, time: u64) -> LogRecord {
    LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: time + 5_000_000,
        severity_number: severity,
        body: Some(AnyValue { value: Some(any_value::Value::StringValue(line.into())) }),
        ..Default::default()
    }
}

/// A record carrying trace context.
fn traced(line: &str, severity: i32, time: u64, trace_id: &[u8], span_id: &[u8]) -> LogRecord {
    LogRecord { trace_id: trace_id.to_vec(), span_id: span_id.to_vec(), ..record(line, severity, time) }
}

/// One OTLP logs request with a resource (`service.name`) per group.
fn logs_request(groups: Vec<(&str, Vec<LogRecord>)>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: groups
            .into_iter()
            .map(|(service, records)| ResourceLogs {
                resource: Some(Resource { attributes: vec![string_kv("service.name", service)], ..Default::default() }),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope { name: "loki-tests".into(), ..Default::default() }),
                    log_records: records,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

async fn send_grpc(tailgate: &Tailgate, request: ExportLogsServiceRequest) {
    let mut client = LogsServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
    client.export(request).await.unwrap();
}

async fn send_http(tailgate: &Tailgate, request: ExportLogsServiceRequest) {
    let response = http_client()
        .build()
        .unwrap()
        .post(format!("http://{}/v1/logs", tailgate.http))
        .header("content-type", "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "OTLP/HTTP logs request refused");
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

fn stream(service: &str, level: &str) -> Labels {
    labels(&[("service_name", service), ("level", level)])
}

/// Lower-case hex, computed here rather than by the product's helper.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until every expected line is stored, then a while longer for duplicates or extras to
/// show; fails with what is missing.
fn wait_for_lines<'a>(sink: &LokiSink, expected: impl IntoIterator<Item = &'a String> + Clone) {
    let arrived = wait_until(Duration::from_secs(90), || {
        let stored: BTreeSet<String> = sink.stored_lines().into_iter().collect();
        expected.clone().into_iter().all(|line| stored.contains(line))
    });
    std::thread::sleep(Duration::from_secs(2));
    if !arrived {
        let stored: BTreeSet<String> = sink.stored_lines().into_iter().collect();
        let missing: Vec<&String> = expected.into_iter().filter(|l| !stored.contains(*l)).collect();
        panic!(
            "{} lines never reached Loki, e.g. {:?}; {} requests, protocol errors {:?}",
            missing.len(),
            &missing[..missing.len().min(5)],
            sink.request_count(),
            sink.protocol_errors()
        );
    }
}

/// Every stored line is in `expected` and stored once, and every expected line is stored.
fn assert_exactly_once(sink: &LokiSink, expected: &BTreeSet<String>) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in sink.stored_lines() {
        *counts.entry(line).or_default() += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "lines stored more than once (distinct timestamps): {repeated:?}");
    let stored: BTreeSet<String> = counts.into_keys().collect();
    let extra: Vec<_> = stored.difference(expected).collect();
    let missing: Vec<_> = expected.difference(&stored).collect();
    assert!(extra.is_empty(), "lines that must not reach Loki did: {extra:?}");
    assert!(missing.is_empty(), "lines missing: {missing:?}");
}

/// Each stream's stored entries are in non-decreasing timestamp order.
fn assert_streams_ordered(stored: &BTreeMap<Labels, Vec<LokiEntry>>) {
    for (labels, entries) in stored {
        for pair in entries.windows(2) {
            assert!(
                pair[0].unix_nanos <= pair[1].unix_nanos,
                "stream {labels:?} went back in time: {:?} ({}) then {:?} ({})",
                pair[0].line,
                pair[0].unix_nanos,
                pair[1].line,
                pair[1].unix_nanos
            );
        }
    }
}

/// Each stream's entries, as pushed in the requests Loki took (204), concatenated in arrival
/// order, are in non-decreasing timestamp order: what a Loki without `unordered_writes` needs.
fn assert_pushes_ordered(sink: &LokiSink) {
    let mut newest: BTreeMap<Labels, (i64, String)> = BTreeMap::new();
    for (index, request) in sink.requests().iter().enumerate().filter(|(_, r)| r.status == 204) {
        for pushed in &request.streams {
            for entry in &pushed.entries {
                let last = newest.entry(pushed.labels.clone()).or_insert((i64::MIN, String::new()));
                assert!(
                    last.0 <= entry.unix_nanos,
                    "push #{index}: {} went back in time: {:?} ({}) after {:?} ({})",
                    pushed.selector,
                    entry.line,
                    entry.unix_nanos,
                    last.1,
                    last.0
                );
                *last = (entry.unix_nanos, entry.line.clone());
            }
        }
    }
}

fn assert_no_protocol_errors(sink: &LokiSink) {
    let errors = sink.protocol_errors();
    assert!(errors.is_empty(), "malformed Loki pushes: {errors:?}");
}

/// A line's stream, timestamp and (trace_id, span_id) metadata.
type Expected = (Labels, i64, Option<(String, String)>);

#[test]
fn streams_are_labelled_by_service_and_level_and_carry_trace_context() {
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let sink = LokiSink::serve(&runtime);
    let tailgate = start(backend_addr, &sink, "tenant_id: \"edge-7\"");

    // line -> (stream, timestamp, (trace_id, span_id) metadata expected)
    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    let mut clock = 0u64;
    let mut next_time = || {
        clock += 1;
        T0 + clock * 1_000_003
    };
    let mut untraced = |service: &str, severity: i32, level: &str, n: usize, records: &mut Vec<LogRecord>| {
        for i in 0..n {
            let line = format!("{service} sev {severity} #{i}");
            let time = next_time();
            expected.insert(line.clone(), (stream(service, level), time as i64, None));
            records.push(record(&line, severity, time));
        }
    };
    let mut checkout = Vec::new();
    let mut payments = Vec::new();
    untraced("checkout", ERROR, "error", 3, &mut checkout);
    untraced("checkout", ERROR3, "error", 1, &mut checkout);
    untraced("checkout", FATAL, "fatal", 2, &mut checkout);
    untraced("payments", ERROR, "error", 2, &mut payments);
    untraced("payments", FATAL4, "fatal", 1, &mut payments);
    // An untraced INFO record is dropped by log_mirror.
    checkout.push(record("checkout untraced info", INFO, T0 + 999_000_000));

    // A kept trace (error span) and a dropped one (fast, OK), each with logs. The ids have
    // leading zero bytes and hex letters, to catch padding and case mistakes.
    let kept = TestTrace::new(0xA1B2, Outcome::Error, 2);
    let dropped = TestTrace::new(0xA1B3, Outcome::Fast, 1);
    let mut traced_expect = |line: &str, severity: i32, level: &str, span: usize, records: &mut Vec<LogRecord>| {
        let time = T0 + 2_000_000_000 + (span as u64) * 1_000 + u64::from(severity.unsigned_abs());
        let (trace_id, span_id) = (&kept.spans[span].trace_id, &kept.spans[span].span_id);
        expected.insert(line.to_owned(), (stream("checkout", level), time as i64, Some((hex(trace_id), hex(span_id)))));
        records.push(traced(line, severity, time, trace_id, span_id));
    };
    traced_expect("kept trace, child span, info", INFO, "info", 1, &mut checkout);
    traced_expect("kept trace, root span, warn", WARN, "warn", 0, &mut checkout);
    traced_expect("kept trace, failed span, error", ERROR, "error", 2, &mut checkout);
    checkout.push(traced(
        "dropped trace, info",
        INFO,
        T0 + 3_000_000_000,
        &dropped.trace_id,
        &dropped.spans[0].span_id,
    ));

    runtime.block_on(async {
        send_grpc(&tailgate, logs_request(vec![("checkout", checkout), ("payments", payments)])).await;
        let mut spans = TraceServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        for trace in [&kept, &dropped] {
            spans.export(trace_request("checkout", trace.spans.clone())).await.unwrap();
        }
    });

    wait_for_lines(&sink, expected.keys());
    assert_no_protocol_errors(&sink);
    assert_exactly_once(&sink, &expected.keys().cloned().collect());

    let requests = sink.requests();
    for request in &requests {
        assert_eq!(request.tenant.as_deref(), Some("edge-7"), "X-Scope-OrgID missing or wrong");
        for pushed in &request.streams {
            assert!(!pushed.entries.is_empty(), "empty stream {} in a push", pushed.selector);
        }
    }
    let stored = sink.stored();
    let expected_streams: BTreeSet<&Labels> = expected.values().map(|(labels, _, _)| labels).collect();
    assert_eq!(stored.keys().collect::<BTreeSet<_>>(), expected_streams, "stream label sets");
    for (labels, entries) in &stored {
        for entry in entries {
            let (want_labels, want_time, want_trace) = &expected[&entry.line];
            assert_eq!(labels, want_labels, "stream of {:?}", entry.line);
            assert_eq!(entry.unix_nanos, *want_time, "timestamp of {:?}", entry.line);
            match want_trace {
                Some((trace_id, span_id)) => {
                    assert_eq!(entry.meta("trace_id"), Some(trace_id.as_str()), "trace_id of {:?}", entry.line);
                    assert_eq!(entry.meta("span_id"), Some(span_id.as_str()), "span_id of {:?}", entry.line);
                    assert_eq!(trace_id.len(), 32);
                    assert_eq!(span_id.len(), 16);
                }
                None => {
                    assert_eq!(entry.meta("trace_id"), None, "untraced {:?} got a trace_id", entry.line);
                    assert_eq!(entry.meta("span_id"), None, "untraced {:?} got a span_id", entry.line);
                }
            }
            assert!(!entry.line.contains("trace_id="), "trace context went into the line: {:?}", entry.line);
        }
    }
    assert_streams_ordered(&stored);
}

#[test]
fn every_stream_stays_in_timestamp_order_across_requests_and_batches() {
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let sink = LokiSink::serve(&runtime);
    let tailgate = start(backend_addr, &sink, "");

    // Six rounds, each older or newer than the last in no particular order; inside a round the
    // records are shuffled too. Two streams (orders/error, billing/fatal) interleaved.
    let bases_secs = [30u64, 10, 50, 0, 40, 20];
    let per_round = 15u64;
    let mut original: BTreeMap<String, i64> = BTreeMap::new();
    runtime.block_on(async {
        for (round, base) in bases_secs.iter().enumerate() {
            let mut orders = Vec::new();
            let mut billing = Vec::new();
            for i in 0..per_round {
                // 7 is coprime to 15: a permutation of the offsets.
                let slot = (i * 7) % per_round;
                let time = T0 + base * 1_000_000_000 + slot * 10_000_000;
                let line = format!("orders round {round} record {i}");
                original.insert(line.clone(), time as i64);
                orders.push(record(&line, ERROR, time));
                let time = time + 1_000_000; // billing a millisecond later
                let line = format!("billing round {round} record {i}");
                original.insert(line.clone(), time as i64);
                billing.push(record(&line, FATAL, time));
            }
            // Each round in two requests (the second half first), over gRPC or OTLP/HTTP.
            let (orders_a, orders_b) = orders.split_at(orders.len() / 2);
            let (billing_a, billing_b) = billing.split_at(billing.len() / 2);
            let second = logs_request(vec![("orders", orders_b.to_vec()), ("billing", billing_b.to_vec())]);
            let first = logs_request(vec![("billing", billing_a.to_vec()), ("orders", orders_a.to_vec())]);
            for request in [second, first] {
                if round % 2 == 0 {
                    send_grpc(&tailgate, request).await;
                } else {
                    send_http(&tailgate, request).await;
                }
            }
            // Longer than the batch timeout (200 ms) plus log_mirror's pacing: the next round
            // goes out in a later push.
            tokio::time::sleep(Duration::from_millis(900)).await;
        }
    });

    let expected: BTreeSet<String> = original.keys().cloned().collect();
    wait_for_lines(&sink, &expected);
    assert_no_protocol_errors(&sink);
    assert_exactly_once(&sink, &expected);

    let stored = sink.stored();
    assert_eq!(
        stored.keys().collect::<BTreeSet<_>>(),
        [stream("orders", "error"), stream("billing", "fatal")].iter().collect::<BTreeSet<_>>()
    );
    // The premise: the streams really were spread over several pushes.
    let pushes = sink.requests().iter().filter(|r| r.status == 204 && !r.streams.is_empty()).count();
    assert!(pushes >= 3, "expected the rounds to be exported in several pushes, got {pushes}");
    assert_streams_ordered(&stored);
    assert_pushes_ordered(&sink);
    // rewrite_timestamp: an entry older than its stream's newest sent is sent with that newest
    // timestamp, anything else as it was logged.
    let mut rewritten = 0;
    for (labels, entries) in &stored {
        let mut newest = i64::MIN;
        for entry in entries {
            let want = original[&entry.line].max(newest);
            assert_eq!(
                entry.unix_nanos, want,
                "{labels:?}: {:?} logged at {} sent at {}, stream's newest before it {newest}",
                entry.line, original[&entry.line], entry.unix_nanos
            );
            if entry.unix_nanos != original[&entry.line] {
                rewritten += 1;
            }
            newest = newest.max(entry.unix_nanos);
        }
    }
    assert!(rewritten > 0, "no entry arrived out of order: the test did not exercise the rewrite");
}

#[test]
fn an_entry_loki_refuses_is_dropped_alone_and_the_exporter_moves_on() {
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let sink = LokiSink::serve(&runtime);
    sink.refuse_lines_containing("POISON");
    let tailgate = start(backend_addr, &sink, "");

    // 50 records in one request over two streams; one of them is refused by Loki.
    let mut expected = BTreeSet::new();
    let mut checkout = Vec::new();
    let mut payments = Vec::new();
    for i in 0..50u64 {
        let time = T0 + i * 1_000_000;
        let (service, records) = if i % 3 == 0 { ("payments", &mut payments) } else { ("checkout", &mut checkout) };
        let line = if i == 23 { format!("{service} record {i} POISON") } else { format!("{service} record {i}") };
        if i != 23 {
            expected.insert(line.clone());
        }
        records.push(record(&line, ERROR, time));
    }
    runtime.block_on(send_grpc(&tailgate, logs_request(vec![("checkout", checkout), ("payments", payments)])));

    wait_for_lines(&sink, &expected);
    // Long enough for a looping exporter to show.
    std::thread::sleep(Duration::from_secs(3));
    let requests_then = sink.request_count();
    assert_no_protocol_errors(&sink);
    assert_exactly_once(&sink, &expected);
    let state_refused = sink.state.lock().unwrap().refused.len();
    assert!(state_refused >= 1, "the POISON entry never reached Loki: the test proves nothing");
    assert!(sink.stored_lines().iter().all(|line| !line.contains("POISON")), "the refused entry was stored");
    assert!(requests_then < 60, "{requests_then} pushes for 50 records with one refused: the exporter loops");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sink.request_count(), requests_then, "the exporter keeps pushing after everything was stored");

    // The exporter moved on: later records arrive, once.
    let later: Vec<LogRecord> =
        (0..10u64).map(|i| record(&format!("checkout later {i}"), ERROR, T0 + 60_000_000_000 + i)).collect();
    for record in &later {
        if let Some(any_value::Value::StringValue(line)) = record.body.as_ref().and_then(|b| b.value.as_ref()) {
            expected.insert(line.clone());
        }
    }
    runtime.block_on(send_grpc(&tailgate, logs_request(vec![("checkout", later)])));
    wait_for_lines(&sink, &expected);
    assert_exactly_once(&sink, &expected);
    assert_streams_ordered(&sink.stored());
    assert_no_protocol_errors(&sink);
}

#[test]
fn unavailable_loki_is_retried_until_it_takes_the_push() {
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let sink = LokiSink::serve(&runtime);
    sink.fail_next(3);
    let tailgate = start(backend_addr, &sink, "");

    let mut expected = BTreeSet::new();
    let mut groups = Vec::new();
    for service in ["checkout", "payments"] {
        let mut records = Vec::new();
        for i in 0..10u64 {
            let line = format!("{service} during outage {i}");
            expected.insert(line.clone());
            records.push(record(&line, ERROR, T0 + i * 1_000_000));
        }
        groups.push((service, records));
    }
    runtime.block_on(send_grpc(&tailgate, logs_request(groups)));

    wait_for_lines(&sink, &expected);
    assert_no_protocol_errors(&sink);
    assert_exactly_once(&sink, &expected);
    let requests = sink.requests();
    let refused = requests.iter().filter(|r| r.status == 503).count();
    assert_eq!(refused, 3, "the sink was to refuse exactly three pushes");
    assert!(requests.len() >= 4, "only {} pushes: the refused entries were never retried", requests.len());
    // What was refused is what was later taken (the retry resends the entries, not nothing).
    let stored: BTreeSet<String> = sink.stored_lines().into_iter().collect();
    for request in requests.iter().filter(|r| r.status == 503) {
        for pushed in &request.streams {
            for entry in &pushed.entries {
                assert!(stored.contains(&entry.line), "{:?} was refused with 503 and never stored", entry.line);
            }
        }
    }
    assert_eq!(sink.state.lock().unwrap().duplicates, 0, "entries pushed again after Loki took them");
    assert_streams_ordered(&sink.stored());
    assert_pushes_ordered(&sink);
}

/// Loki behind TLS: the exporter trusts the CA given in `tls.ca_file` and pushes over https.
#[test]
fn logs_reach_loki_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    common::pki::pki(certs.path());
    let runtime = runtime();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let sink = LokiSink::serve_tls(&runtime, &certs.path().join("server.pem"), &certs.path().join("server.key"));
    let tls = format!("tls: {{ ca_file: \"{}\" }}", certs.path().join("ca.pem").display());
    let tailgate = start(backend_addr, &sink, &tls);
    let lines: Vec<String> = (0..5).map(|i| format!("over tls #{i}")).collect();
    let records = lines.iter().enumerate().map(|(i, line)| record(line, ERROR, T0 + i as u64)).collect();
    runtime.block_on(async {
        let mut client = LogsServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        client.export(logs_request(vec![("checkout", records)])).await.unwrap();
    });
    let expected: BTreeSet<String> = lines.into_iter().collect();
    wait_for_lines(&sink, &expected);
    assert_exactly_once(&sink, &expected);
}
