//! Export that cannot wedge: a request too large for the backend is split, an item the backend
//! refuses for good (or keeps failing on) goes to the dead-letter store while everything else is
//! delivered, dead letters are replayed by command, and an outage is retried through a circuit
//! breaker that keeps the request rate bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Error traces (always kept); trace `poisoned` gets a span named "poison".
fn traces_with_poison(range: std::ops::Range<u32>, poisoned: u32) -> (Vec<TestTrace>, TestTrace) {
    let mut good = Vec::new();
    let mut bad = None;
    for n in range {
        let mut trace = TestTrace::new(n, Outcome::Error, 2);
        if n == poisoned {
            trace.spans[1].name = "poison".into();
            bad = Some(trace);
        } else {
            good.push(trace);
        }
    }
    (good, bad.unwrap())
}

fn span_keys(spans: &[Span]) -> Vec<([u8; 16], [u8; 8])> {
    spans
        .iter()
        .map(|s| (s.trace_id.as_slice().try_into().unwrap(), s.span_id.as_slice().try_into().unwrap()))
        .collect()
}

/// An item the backend refuses (INVALID_ARGUMENT: permanent; INTERNAL: persistent) is isolated
/// and kept as a dead letter; every other item of the same requests is delivered; after the
/// backend is fixed, `dead-letter replay` delivers it and the store is empty.
fn poisoned_item_is_dead_lettered(code: tonic::Code, reason: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    backend.received.lock().unwrap().poison = Some(("poison".into(), code));
    let timing = Timing { batch_timeout: "1s", exporters_extra: "  dead_letter: { after: 2s }", ..Timing::default() };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let (good, bad) = traces_with_poison(0..20, 7);
    let all: Vec<TestTrace> = good.iter().cloned().chain([bad.clone()]).collect();
    // Sent together, so the poisoned trace shares requests with the others.
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &all, Duration::ZERO, |_| {}));
    // Everything but the one refused span: the other spans of its trace travel in other parts.
    let mut rest_of_bad = bad.clone();
    rest_of_bad.spans.remove(1);
    let expected: Vec<TestTrace> = good.iter().cloned().chain([rest_of_bad]).collect();
    assert_exact_delivery(&backend, &expected, Duration::from_secs(1), false);
    let spans = backend.spans();
    let poison_span = span_keys(&bad.spans[1..2])[0];
    assert!(!spans.contains_key(&poison_span), "the refused span was delivered");
    let listed = tailgate.cli(&["dead-letter", "list"]);
    assert!(listed.starts_with("1 dead letters"), "{listed}");
    assert!(listed.contains("export_traces 1 items") && listed.contains(reason), "{listed}");
    let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
    let kept = status["queue"]["edges"].as_array().unwrap().iter().find(|e| e["edge"] == "kept_spans").unwrap().clone();
    assert_eq!(kept["batches"], 0, "backlog left behind the poison: {kept}");

    // The backend is fixed; the operator replays.
    backend.received.lock().unwrap().poison = None;
    tailgate.cli(&["dead-letter", "replay"]);
    assert!(
        wait_until(Duration::from_secs(20), || backend.spans().contains_key(&poison_span)),
        "replay did not deliver the dead letter\n{}",
        tailgate.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || tailgate.cli(&["dead-letter", "list"]).starts_with("0 dead letters")),
        "delivered dead letters are removed"
    );
}

#[test]
fn an_item_the_backend_refuses_is_dead_lettered_alone() {
    poisoned_item_is_dead_lettered(tonic::Code::InvalidArgument, "permanent_error");
}

#[test]
fn an_item_the_backend_keeps_failing_on_is_dead_lettered_alone() {
    poisoned_item_is_dead_lettered(tonic::Code::Internal, "persistent_error");
}

/// A backend whose message limit is below what export sends: the request is split and every
/// span delivered once; nothing dead-lettered.
#[test]
fn a_request_too_large_for_the_backend_is_split() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve_limited(&runtime, "127.0.0.1:0".parse().unwrap(), 64 * 1024);
    let tailgate = Tailgate::start(backend_addr, &Timing { batch_timeout: "1s", ..Timing::default() });
    // 40 traces of 3 spans with 2 KiB of attributes each: ~250 KiB, sent as one request by
    // default, four times the backend's limit.
    let traces: Vec<TestTrace> = (0..40)
        .map(|n| {
            let mut trace = TestTrace::new(n, Outcome::Error, 2);
            for span in &mut trace.spans {
                span.attributes.push(string_kv("payload", &"p".repeat(2048)));
            }
            trace
        })
        .collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::ZERO, |_| {}));
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), false);
    let largest = backend.received.lock().unwrap().traces.iter().map(prost::Message::encoded_len).max().unwrap();
    assert!(largest <= 64 * 1024, "a request of {largest} bytes got through a 64 KiB limit");
    assert!(tailgate.cli(&["dead-letter", "list"]).starts_with("0 dead letters"));
}

/// During an outage the request rate is bounded: a few backed-off retries, then the circuit
/// opens and one probe goes out per 5 s; the first success closes it and the backlog drains.
#[test]
fn an_outage_opens_the_circuit_and_the_probe_closes_it() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    backend.received.lock().unwrap().fail_next_traces = u32::MAX;
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let traces: Vec<TestTrace> = (0..10).map(|n| TestTrace::new(n, Outcome::Error, 2)).collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::ZERO, |_| {}));
    assert!(wait_until(Duration::from_secs(20), || !backend.received.lock().unwrap().trace_attempts.is_empty()));
    let first = backend.received.lock().unwrap().trace_attempts[0];
    std::thread::sleep(Duration::from_secs(20).saturating_sub(first.elapsed()));
    let attempts: Vec<Instant> = backend.received.lock().unwrap().trace_attempts.clone();
    let window: Vec<Duration> =
        attempts.iter().map(|at| *at - first).filter(|d| *d < Duration::from_secs(20)).collect();
    // Backoff 200 ms .. 1 s for the first failures (test config), then one probe per 5 s.
    let gaps: Vec<Duration> = window.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(window.len() <= 5 + 4 + 1, "{} requests in 20 s of outage: {window:?}", window.len());
    assert!(gaps.iter().skip(5).all(|gap| *gap >= Duration::from_millis(4_900)), "probes closer than 5 s: {gaps:?}");
    assert!(window.len() >= 5 + 2, "the circuit never probed: {window:?}");
    let log = tailgate.log();
    assert_eq!(log.matches("circuit open").count(), 1, "{log}");
    // The backend recovers: the next probe succeeds, the circuit closes, everything arrives.
    backend.received.lock().unwrap().fail_next_traces = 0;
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), false);
    assert!(tailgate.log().contains("circuit closed"));
}
