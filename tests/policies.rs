//! Sampling policies in the OTel `tail_sampling` shape through the real binary: the issue's
//! configuration (errors, slow by trace duration, a route, a 10% probabilistic baseline) keeps
//! exactly the traces each policy matches, every span of them, and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Backend, Tailgate, Timing, http_get, signal, string_kv, trace_request, wait_until};
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

/// Starts tailgate and switches it to [`POLICIES`] by a reload (the harness writes a
/// shorthand-free `tail_sample` section).
fn start_with_policies(backend: std::net::SocketAddr, timing: &Timing, policies: &str) -> Tailgate {
    let tailgate = Tailgate::start(backend, timing);
    let config = std::fs::read_to_string(&tailgate.config_path).unwrap();
    let with_policies = config.replace("  decision_cache_ttl: 2m", &format!("  decision_cache_ttl: 2m\n{policies}"));
    std::fs::write(&tailgate.config_path, with_policies).unwrap();
    let before = tailgate.stage_pid("tail_sample").unwrap();
    assert!(tailgate.cli(&["reload"]).contains("tail_sample"));
    tailgate.wait_for_restart("tail_sample", before);
    tailgate
}

#[test]
fn the_issues_policies_keep_exactly_what_they_match() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing { decision_wait: "2s", root_grace: "1s", ..Timing::default() };
    let tailgate = start_with_policies(backend_addr, &timing, POLICIES);

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

/// The golden replay (`tests/golden/policies.v1.json`: errors on the root or a child, slow by
/// a span or by the trace's spread, just under the threshold, fast, a matching route, a vetoed
/// route, kept by the trace id's randomness, children first, a root that never comes, late
/// spans of a kept and of a dropped trace, a giant trace with and without an error) replayed
/// four times over while tail_sample is SIGKILLed every 1.5 s: the kept set is exact, each span
/// arrives once and names the policy the golden file says kept its trace.
#[test]
fn the_golden_replay_keeps_exactly_its_matches_while_the_sampler_is_killed() {
    let golden: serde_json::Value = serde_json::from_str(GOLDEN).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    // Late spans must find their trace decided (root_grace) yet remembered (decision_cache_ttl).
    let timing = Timing { decision_wait: "4s", root_grace: "1s", ..Timing::default() };
    let tailgate = start_with_policies(backend_addr, &timing, &format!("  max_spans_per_trace: 50\n{POLICIES}"));
    let mut replays: Vec<Replay> = Vec::new();
    let mut expected: std::collections::HashMap<([u8; 16], [u8; 8]), String> = std::collections::HashMap::new();
    for round in 0..4u8 {
        for (index, trace) in golden["traces"].as_array().unwrap().iter().enumerate() {
            let (spans, late, kept_by) = golden_trace(round, index as u8, trace);
            let mut requests: Vec<Vec<Span>> = if trace["giant"].is_u64() {
                spans.chunks(10).map(<[Span]>::to_vec).collect()
            } else {
                spans.iter().map(|span| vec![span.clone()]).collect()
            };
            if trace["order"] == "children_first" {
                requests.reverse();
            }
            if let Some(reason) = &kept_by {
                for span in spans.iter().chain(&late) {
                    expected.insert(key_of(span), reason.clone());
                }
            }
            replays.push((requests, late, kept_by));
        }
    }
    let grpc = tailgate.grpc;
    let mut next_kill = std::time::Instant::now();
    let mut kill = || {
        if std::time::Instant::now() >= next_kill {
            if let Some(pid) = tailgate.stage_pid("tail_sample") {
                signal(pid, "KILL");
            }
            next_kill = std::time::Instant::now() + Duration::from_millis(1500);
        }
    };
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        for (requests, _, _) in &replays {
            for spans in requests {
                client.export(trace_request("shop", spans.clone())).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            kill();
        }
    });
    // Every trace decided and what it kept delivered (late spans aside); then the late spans.
    let on_time: Vec<([u8; 16], [u8; 8])> = replays
        .iter()
        .filter(|(_, _, kept_by)| kept_by.is_some())
        .flat_map(|(requests, _, _)| requests.iter().flatten().map(key_of))
        .collect();
    assert!(
        wait_until(Duration::from_secs(60), || on_time.iter().all(|k| backend.spans().contains_key(k))),
        "the kept traces were not delivered"
    );
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        let late: Vec<Span> = replays.iter().flat_map(|(_, late, _)| late.clone()).collect();
        client.export(trace_request("shop", late)).await.unwrap();
    });
    kill();
    let settled = || {
        let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
        let edge = |name: &str| {
            status["queue"]["edges"].as_array().unwrap().iter().find(|e| e["edge"] == name).unwrap()["batches"].clone()
        };
        edge("spans") == 0 && edge("kept_spans") == 0 && expected.keys().all(|k| backend.spans().contains_key(k))
    };
    assert!(wait_until(Duration::from_secs(60), settled), "the replay did not settle");
    let got = backend.spans();
    let keys: HashSet<([u8; 16], [u8; 8])> = got.keys().copied().collect();
    let wanted: HashSet<([u8; 16], [u8; 8])> = expected.keys().copied().collect();
    let missing: Vec<_> = wanted.difference(&keys).collect();
    let extra: Vec<_> = keys.difference(&wanted).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}\nextra {extra:?}");
    assert!(got.values().all(|(_, times)| *times == 1), "a span arrived twice");
    assert_eq!(backend.policies(), expected);
    let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
    let sampler =
        status["supervisor"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "tail_sample").unwrap();
    assert!(sampler["restarts"]["exited"].as_u64().unwrap_or(0) >= 2, "the sampler was hardly killed: {sampler:#}");
    // The giant traces took the early path (a count published less than 250 ms before a
    // SIGKILL is lost with the process, so not every one of the 8 need be counted).
    assert!(sampler["counters"]["error/trace_decided_early"].as_u64().unwrap_or(0) > 0, "giant traces: {sampler:#}");
}

const GOLDEN: &str = include_str!("golden/policies.v1.json");

/// One golden trace to send: its requests in sending order, its late spans, the policy that
/// keeps it.
type Replay = (Vec<Vec<Span>>, Vec<Span>, Option<String>);

fn key_of(span: &Span) -> ([u8; 16], [u8; 8]) {
    (span.trace_id.as_slice().try_into().unwrap(), span.span_id.as_slice().try_into().unwrap())
}

/// The spans of one golden trace (on-time ones, then late ones) and the policy that keeps it.
fn golden_trace(round: u8, index: u8, trace: &serde_json::Value) -> (Vec<Span>, Vec<Span>, Option<String>) {
    let mut trace_id = [0u8; 16];
    trace_id[0] = 0x60 | round;
    trace_id[1] = index;
    let randomness: u64 = if trace["randomness"] == "high" { (1 << 56) - 1 } else { 1 };
    trace_id[8..].copy_from_slice(&randomness.to_be_bytes());
    let span_id = |id: u64| {
        let mut out = [0u8; 8];
        out[0] = 0x60 | round;
        out[1] = index;
        out[4..].copy_from_slice(&(id as u32).to_be_bytes());
        out
    };
    let route = trace["route"].as_str().unwrap();
    let start = 1_700_000_000_000_000_000u64 + (u64::from(round) * 64 + u64::from(index)) * 1_000_000_000;
    let ms = 1_000_000u64;
    let mut spans = Vec::new();
    let mut late = Vec::new();
    let make = |id: u64, parent: Option<u64>, start_ms: u64, len_ms: u64, error: bool| Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id(id).to_vec(),
        parent_span_id: parent.map(|p| span_id(p).to_vec()).unwrap_or_default(),
        name: if parent.is_none() { format!("GET {route}") } else { format!("step {id}") },
        start_time_unix_nano: start + start_ms * ms,
        end_time_unix_nano: start + (start_ms + len_ms) * ms,
        attributes: vec![string_kv("http.route", route)],
        status: error.then(|| Status { code: status::StatusCode::Error as i32, message: "failed".into() }),
        ..Default::default()
    };
    for span in trace["spans"].as_array().unwrap() {
        let built = make(
            span["id"].as_u64().unwrap(),
            span["parent"].as_u64(),
            span["start_ms"].as_u64().unwrap(),
            span["ms"].as_u64().unwrap(),
            span["error"].as_bool().unwrap_or(false),
        );
        if span["late"].as_bool().unwrap_or(false) { late.push(built) } else { spans.push(built) }
    }
    if let Some(giant) = trace["giant"].as_u64() {
        let error_at = trace["error_at"].as_u64().unwrap_or(0);
        for child in 1..=giant {
            spans.push(make(100 + child, Some(1), child, 5, child == error_at));
        }
    }
    (spans, late, trace["kept_by"].as_str().map(str::to_owned))
}

/// `tailgate incident start|end`: while a window is open, the traces of its routes are kept
/// (every one, or those of at least N ms), naming `incident`; other routes are sampled as
/// before; the window survives a restart of tail_sample, shows in `status`, ends on request
/// and by itself.
#[test]
fn an_incident_window_keeps_its_routes_until_it_ends() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing { decision_wait: "2s", root_grace: "1s", ..Timing::default() };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let grpc = tailgate.grpc;
    let mut decided = 0;
    // Sends the traces and waits until they are decided and what was kept has been exported.
    let mut send = |cases: &[&Case]| {
        runtime.block_on(async {
            let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
            for case in cases {
                client.export(trace_request("shop", case.spans.clone())).await.unwrap();
            }
        });
        decided += cases.len();
        let settled = || {
            let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
            let edge = |name: &str| {
                status["queue"]["edges"].as_array().unwrap().iter().find(|e| e["edge"] == name).unwrap()["batches"]
                    .clone()
            };
            status["queue"]["decisions"] == decided && edge("spans") == 0 && edge("kept_spans") == 0
        };
        assert!(wait_until(Duration::from_secs(30), settled), "traces not decided");
    };
    let kept = |case: &Case| {
        let policies = backend.policies();
        let reasons: Vec<Option<&String>> = case
            .spans
            .iter()
            .map(|s| policies.get(&(case.trace_id, s.span_id.as_slice().try_into().unwrap())))
            .collect();
        match reasons[0] {
            Some(reason) if reasons.iter().all(|r| *r == Some(reason)) => Some(reason.clone()),
            None if reasons.iter().all(Option::is_none) => None,
            _ => panic!("a trace delivered in part: {reasons:?}"),
        }
    };
    let fast = |n: u8, route: &str| case(n, route, false, 0, 1, false);

    let before = fast(1, "/checkout");
    send(&[&before]);
    assert_eq!(kept(&before), None);

    let said = tailgate.cli(&["incident", "start", "--route", "/checkout", "--keep-all", "--for", "10m"]);
    assert!(said.contains("incident window open"), "{said}");
    assert!(tailgate.status().contains("incident window (open): keep every trace on /checkout"));
    let (during, other) = (fast(2, "/checkout"), fast(3, "/other"));
    send(&[&during, &other]);
    assert_eq!(kept(&during).as_deref(), Some("incident"));
    assert_eq!(kept(&other), None, "a route outside the window was kept");

    // The window is in the queue: a restarted sampler keeps applying it.
    let pid = tailgate.stage_pid("tail_sample").unwrap();
    signal(pid, "KILL");
    tailgate.wait_for_restart("tail_sample", pid);
    let after_restart = fast(4, "/checkout");
    send(&[&after_restart]);
    assert_eq!(kept(&after_restart).as_deref(), Some("incident"));

    // A latency window on another route: 110 ms traces kept, 10 ms ones not.
    tailgate.cli(&["incident", "start", "--route", "/b", "--latency-ms", "100", "--for", "10m"]);
    let (slowish, quick) = (case(5, "/b", false, 100, 1, false), fast(6, "/b"));
    send(&[&slowish, &quick]);
    assert_eq!(kept(&slowish).as_deref(), Some("incident"));
    assert_eq!(kept(&quick), None);

    tailgate.cli(&["incident", "end"]);
    let ended = fast(7, "/b");
    send(&[&ended]);
    assert_eq!(kept(&ended), None, "kept after the window ended");

    // A window ends by itself.
    tailgate.cli(&["incident", "start", "--keep-all", "--for", "1s"]);
    assert!(wait_until(Duration::from_secs(10), || tailgate.status().contains("incident window (ended)")));
    let expired = fast(8, "/checkout");
    send(&[&expired]);
    assert_eq!(kept(&expired), None, "kept after the window expired");
}

/// A trace of one root span on `route` lasting `ms`.
fn route_trace(n: u32, route: &str, ms: u64) -> Case {
    let mut trace_id = [0xad; 16];
    trace_id[..4].copy_from_slice(&n.to_be_bytes());
    let start = 1_700_000_000_000_000_000u64 + u64::from(n) * 1_000_000;
    let root = Span {
        trace_id: trace_id.to_vec(),
        span_id: [n.to_be_bytes(), [0, 0, 0, 1]].concat(),
        name: format!("GET {route}"),
        start_time_unix_nano: start,
        end_time_unix_nano: start + ms * 1_000_000,
        attributes: vec![string_kv("http.route", route)],
        ..Default::default()
    };
    Case { trace_id, spans: vec![root], kept: ms >= 200 }
}

#[test]
fn the_adaptive_threshold_rises_in_steps_and_returns_after_recovery() {
    const ADAPTIVE: &str = "  policies:
    - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
    - {name: slow, type: latency, latency: {threshold_ms: 200, adaptive: {window: 4s, step_ms: 25, margin_ms: 25, max_threshold_ms: 250, min_samples: 10}}}";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing { decision_wait: "1s", root_grace: "100ms", ..Timing::default() };
    let tailgate = start_with_policies(backend_addr, &timing, ADAPTIVE);
    let grpc = tailgate.grpc;
    let client = runtime.block_on(TraceServiceClient::connect(format!("http://{grpc}"))).unwrap();
    let mut n = 0u32;
    // Sends a round of 10 traces on /checkout, `slow` of them lasting `ms`, the rest 20 ms.
    let mut round = |slow: u32, ms: u64| {
        let spans: Vec<Span> = (0..10)
            .flat_map(|i| {
                n += 1;
                route_trace(n, "/checkout", if i < slow { ms } else { 20 }).spans
            })
            .collect();
        runtime.block_on(client.clone().export(trace_request("shop", spans))).unwrap();
    };
    let lifted = || -> Option<u64> {
        let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).ok()?;
        status["queue"]["route_thresholds_ms"]["/checkout"].as_u64()
    };
    // The p95 of /checkout drifts to 240 ms (20% of its traces): lifted one step per half
    // window (2 s) up to the maximum, never past it.
    let mut seen = Vec::new();
    for _ in 0..120 {
        round(2, 240);
        if let Some(ms) = lifted()
            && seen.last() != Some(&ms)
        {
            seen.push(ms);
        }
        if seen.last() == Some(&250) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200)); // the load's pace
    }
    assert_eq!(seen, vec![225, 250], "threshold steps");
    let metrics = http_get(tailgate.telemetry, "/metrics").1;
    assert!(metrics.contains("tailgate_sampling_latency_threshold_ms{route=\"/checkout\"} 250"), "{metrics}");
    // While lifted: a 230 ms /checkout trace is dropped, a 230 ms trace of another route kept.
    let (checkout, other) = (route_trace(1_000_001, "/checkout", 230), route_trace(1_000_002, "/other", 230));
    runtime
        .block_on(client.clone().export(trace_request("shop", [checkout.spans.clone(), other.spans.clone()].concat())))
        .unwrap();
    let key = |case: &Case| (case.trace_id, <[u8; 8]>::try_from(case.spans[0].span_id.as_slice()).unwrap());
    assert!(wait_until(Duration::from_secs(20), || backend.spans().contains_key(&key(&other))));
    // Recovery: fast traces only; the threshold steps back to the configured one.
    let mut back = Vec::new();
    for _ in 0..150 {
        round(0, 20);
        let now = lifted().unwrap_or(200);
        if back.last() != Some(&now) {
            back.push(now);
        }
        if now == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(back, vec![250, 225, 200], "steps back");
    assert!(!backend.spans().contains_key(&key(&checkout)), "a 230 ms /checkout trace was kept at 250 ms");
    let log = tailgate.log();
    for (from, to) in [(200, 225), (225, 250)] {
        assert!(
            log.contains(&format!("adaptive latency threshold lifted route=/checkout from_ms={from} to_ms={to}")),
            "{from}->{to}"
        );
    }
    assert!(log.contains("adaptive latency threshold stepped back route=/checkout from_ms=225 to_ms=200"));
}
