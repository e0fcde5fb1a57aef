//! Sampling policies in the OTel `tail_sampling` shape through the real binary: the issue's
//! configuration (errors, slow by trace duration, a route, a 10% probabilistic baseline) keeps
//! exactly the traces each policy matches, every span of them, and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Backend, Tailgate, Timing, string_kv, trace_request, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::trace::v1::{Span, Status, status};

const POLICIES: &str = "  policies:
    - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
    - {name: slow, type: latency, latency: {threshold_ms: 200}}
    - {name: checkout, type: string_attribute, string_attribute: {key: http.route, values: [/checkout]}}
    - {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}
    - {name: no-health, type: drop, drop: {drop_sub_policy: [{name: health, type: string_attribute, string_attribute: {key: http.route, values: [/healthz]}}]}}";

struct Case {
    trace_id: [u8; 16],
    spans: Vec<Span>,
    kept: bool,
}

/// Trace `n`: a root on `route` and a child; `error` on the child, the child starting
/// `child_at_ms` after the root (the trace lasts until the child's end), randomness `random`.
fn case(n: u8, route: &str, error: bool, child_at_ms: u64, random: u64, kept: bool) -> Case {
    let mut trace_id = [0u8; 16];
    trace_id[0] = n;
    trace_id[8..].copy_from_slice(&random.to_be_bytes());
    let start = 1_700_000_000_000_000_000u64 + u64::from(n) * 1_000_000_000;
    let root = Span {
        trace_id: trace_id.to_vec(),
        span_id: vec![n, 0, 0, 0, 0, 0, 0, 1],
        name: format!("GET {route}"),
        start_time_unix_nano: start,
        end_time_unix_nano: start + 50_000_000,
        attributes: vec![string_kv("http.route", route)],
        ..Default::default()
    };
    let child = Span {
        trace_id: trace_id.to_vec(),
        span_id: vec![n, 0, 0, 0, 0, 0, 0, 2],
        parent_span_id: root.span_id.clone(),
        name: "db".into(),
        start_time_unix_nano: start + child_at_ms * 1_000_000,
        end_time_unix_nano: start + child_at_ms * 1_000_000 + 10_000_000,
        status: error.then(|| Status { code: status::StatusCode::Error as i32, message: "failed".into() }),
        ..Default::default()
    };
    Case { trace_id, spans: vec![root, child], kept }
}

#[test]
fn the_issues_policies_keep_exactly_what_they_match() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing { decision_wait: "2s", root_grace: "1s", ..Timing::default() };
    let tailgate = Tailgate::start(backend_addr, &timing);
    // The harness writes the shorthand-free tail_sample section; add the policies to it.
    let config = std::fs::read_to_string(&tailgate.config_path).unwrap();
    std::fs::write(
        &tailgate.config_path,
        config.replace("  decision_cache_ttl: 2m", &format!("  decision_cache_ttl: 2m\n{POLICIES}")),
    )
    .unwrap();
    let before = tailgate.stage_pid("tail_sample").unwrap();
    assert!(tailgate.cli(&["reload"]).contains("tail_sample"));
    tailgate.wait_for_restart("tail_sample", before);

    let low = 1u64; // randomness far below the 10% threshold (kept when >= 0.9 x 2^56)
    let high = (1u64 << 56) - 1;
    let cases = [
        case(1, "/a", true, 0, low, true),         // errors
        case(2, "/a", false, 300, low, true),      // slow: the trace lasts 310 ms, no span over 50
        case(3, "/checkout", false, 0, low, true), // checkout
        case(4, "/a", false, 0, high, true),       // baseline (probabilistic, by the trace id)
        case(5, "/a", false, 0, low, false),       // nothing matches
        case(6, "/healthz", true, 0, high, false), // the drop policy vetoes an error
        case(7, "/b", false, 100, low, false),     // 110 ms: not slow
    ];
    let grpc = tailgate.grpc;
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        for case in &cases {
            client.export(trace_request("shop", case.spans.clone())).await.unwrap();
        }
    });
    let expected: HashSet<([u8; 16], [u8; 8])> = cases
        .iter()
        .filter(|c| c.kept)
        .flat_map(|c| c.spans.iter().map(|s| (c.trace_id, s.span_id.as_slice().try_into().unwrap())))
        .collect();
    assert!(
        wait_until(Duration::from_secs(30), || expected.iter().all(|k| backend.spans().contains_key(k))),
        "kept traces missing"
    );
    // Every trace decided and nothing left to export: whatever else was kept has arrived.
    let settled = || {
        let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
        let edge = |name: &str| {
            status["queue"]["edges"].as_array().unwrap().iter().find(|e| e["edge"] == name).unwrap()["batches"].clone()
        };
        status["queue"]["decisions"] == 7 && edge("spans") == 0 && edge("kept_spans") == 0
    };
    assert!(wait_until(Duration::from_secs(30), settled), "the traces were not all decided and exported");
    let got: HashSet<([u8; 16], [u8; 8])> = backend.spans().keys().copied().collect();
    assert_eq!(got, expected);
    // Each kept span says which policy kept its trace; the probabilistic keep also carries
    // OpenTelemetry's sampling threshold (10%: th = (1 - 0.1) x 2^56) for weighted counts.
    let policies = backend.policies();
    let spans = backend.received.lock().unwrap().traces.clone();
    for (case, reason) in cases.iter().zip(["errors", "slow", "checkout", "baseline"]) {
        for span in &case.spans {
            let key = (case.trace_id, span.span_id.as_slice().try_into().unwrap());
            assert_eq!(policies.get(&key).map(String::as_str), Some(reason));
            let delivered = spans
                .iter()
                .flat_map(|r| &r.resource_spans)
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
                .find(|s| s.span_id == span.span_id && s.trace_id == span.trace_id)
                .unwrap();
            let threshold = if reason == "baseline" { "ot=th:e6666666666666" } else { "" };
            assert_eq!(delivered.trace_state, threshold, "{reason}");
        }
    }
}
