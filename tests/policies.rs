//! Sampling policies in the OTel `tail_sampling` shape through the real binary: the issue's
//! configuration (errors, slow by trace duration, a route, a 10% probabilistic baseline) keeps
//! exactly the traces each policy matches, every span of them, and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Backend, Tailgate, Timing, signal, string_kv, trace_request, wait_until};
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

/// A replay of every kind of trace the policies tell apart — errors on the root or a child,
/// slow by the trace's span, fast, a matching route, a vetoed route, kept or not by the trace
/// id's randomness, children before their root, a root that never comes, a late span of a kept
/// and of a dropped trace — while tail_sample is SIGKILLed every 1.5 s: the kept set is exact,
/// each span arrives once and names the policy that kept its trace.
#[test]
fn a_replay_of_every_kind_keeps_exactly_the_matches_while_the_sampler_is_killed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    // Late spans must find their trace decided (root_grace) yet remembered (decision_cache_ttl).
    let timing = Timing { decision_wait: "4s", root_grace: "1s", ..Timing::default() };
    let tailgate = start_with_policies(backend_addr, &timing, POLICIES);
    let (low, high) = (1u64, (1u64 << 56) - 1);
    // (case, reason it is kept, children first, drop the root, late span)
    let mut cases: Vec<(Case, Option<&str>, bool, bool)> = Vec::new();
    for round in 0..6u8 {
        let n = |k: u8| round * 16 + k + 10;
        cases.push((case(n(0), "/a", true, 0, low, true), Some("errors"), false, false));
        cases.push((case(n(1), "/a", false, 300, low, true), Some("slow"), false, false));
        cases.push((case(n(2), "/a", false, 0, low, false), None, false, false));
        cases.push((case(n(3), "/checkout", false, 0, low, true), Some("checkout"), false, false));
        cases.push((case(n(4), "/healthz", true, 0, high, false), None, false, false));
        cases.push((case(n(5), "/a", false, 0, high, true), Some("baseline"), false, false));
        cases.push((case(n(6), "/a", true, 0, low, true), Some("errors"), true, false));
        cases.push((case(n(7), "/a", true, 0, low, true), Some("errors"), false, true));
        cases.push((case(n(8), "/a", false, 0, low, false), None, true, true));
        cases.push((case(n(9), "/checkout", false, 0, low, true), Some("checkout"), false, false));
    }
    // Late spans: one for a kept trace, one for a dropped one, sent after their decisions.
    let late_kept = case(250, "/checkout", false, 0, low, true);
    let late_dropped = case(251, "/a", false, 0, low, false);
    let late = |c: &Case| {
        let mut span = c.spans[1].clone();
        span.span_id[7] = 9;
        span
    };
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
        for c in [&late_kept, &late_dropped] {
            client.export(trace_request("shop", c.spans.clone())).await.unwrap();
        }
        for (case, _, children_first, no_root) in &cases {
            let mut spans = case.spans.clone();
            if *no_root {
                spans.remove(0);
            } else if *children_first {
                spans.reverse();
            }
            for span in spans {
                client.export(trace_request("shop", vec![span])).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
            kill();
        }
    });
    // The late pair's decisions are made by now (root_grace 1 s, plus restarts); send their
    // late spans, still killing.
    assert!(wait_until(Duration::from_secs(30), || backend
        .spans()
        .contains_key(&(late_kept.trace_id, [250, 0, 0, 0, 0, 0, 0, 1]))));
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        client.export(trace_request("shop", vec![late(&late_kept), late(&late_dropped)])).await.unwrap();
    });
    kill();
    let mut expected: HashSet<([u8; 16], [u8; 8])> = HashSet::new();
    let mut reasons = std::collections::HashMap::new();
    for (case, reason, _, no_root) in &cases {
        let Some(reason) = reason else { continue };
        for span in case.spans.iter().skip(usize::from(*no_root)) {
            let key = (case.trace_id, span.span_id.as_slice().try_into().unwrap());
            expected.insert(key);
            reasons.insert(key, reason.to_string());
        }
    }
    for span in late_kept.spans.iter().chain([&late(&late_kept)]) {
        let key = (late_kept.trace_id, span.span_id.as_slice().try_into().unwrap());
        expected.insert(key);
        reasons.insert(key, "checkout".to_string());
    }
    let settled = || {
        let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
        let edge = |name: &str| {
            status["queue"]["edges"].as_array().unwrap().iter().find(|e| e["edge"] == name).unwrap()["batches"].clone()
        };
        edge("spans") == 0 && edge("kept_spans") == 0 && expected.iter().all(|k| backend.spans().contains_key(k))
    };
    assert!(wait_until(Duration::from_secs(60), settled), "the replay did not settle");
    let got = backend.spans();
    let keys: HashSet<([u8; 16], [u8; 8])> = got.keys().copied().collect();
    let missing: Vec<_> = expected.difference(&keys).collect();
    let extra: Vec<_> = keys.difference(&expected).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}\nextra {extra:?}");
    assert!(got.values().all(|(_, times)| *times == 1), "a span arrived twice");
    assert_eq!(backend.policies(), reasons);
    let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
    let sampler =
        status["supervisor"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "tail_sample").unwrap();
    assert!(sampler["restarts"]["exited"].as_u64().unwrap_or(0) >= 2, "the sampler was hardly killed: {sampler:#}");
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
    let metrics = runtime.block_on(async {
        reqwest::get(format!("http://{}/metrics", tailgate.telemetry)).await.unwrap().text().await.unwrap()
    });
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
