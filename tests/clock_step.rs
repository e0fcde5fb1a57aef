//! The wall clock steps (NTP on a box that booted without a real-time clock, an operator setting
//! it back) while traces are pending: decisions stay due by the pipeline's monotonic clock, so a
//! step forward decides nothing early on partial spans and a step back delays nothing.
//!
//! The step is the test-only `clock_step` fault point: every stage process shifts its wall clock
//! by the seconds in `<data>/run/fault-clock_step`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Backend, Outcome, Tailgate, TestTrace, Timing, signal, trace_request, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::trace::v1::Span;

const STAGES: usize = 5;

/// Steps every stage's wall clock by `seconds` and waits until all of them applied it.
fn step_clock(tailgate: &Tailgate, seconds: i64) {
    let applied_before = tailgate.log().matches("wall clock stepped").count();
    std::fs::write(tailgate.data_dir().join("run/fault-clock_step"), seconds.to_string()).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || tailgate.log().matches("wall clock stepped").count()
            >= applied_before + STAGES),
        "the stages did not step their clocks"
    );
}

/// Waits until tail_sample has taken in `spans` spans (its `received` counter).
fn wait_ingested(tailgate: &Tailgate, spans: u64) {
    let ingested = || {
        let Ok(status) = serde_json::from_str::<serde_json::Value>(&tailgate.cli(&["status", "--json"])) else {
            return false;
        };
        status["supervisor"]["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["stage"] == "tail_sample")
            .and_then(|s| s["counters"]["received"].as_u64())
            .unwrap_or(0)
            >= spans
    };
    assert!(wait_until(Duration::from_secs(20), ingested), "tail_sample did not take the spans in");
}

fn send(runtime: &tokio::runtime::Runtime, tailgate: &Tailgate, spans: Vec<Span>) {
    let grpc = tailgate.grpc;
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        client.export(trace_request("shop", spans)).await.unwrap();
    });
}

fn keys(traces: &[TestTrace]) -> HashSet<([u8; 16], [u8; 8])> {
    traces.iter().flat_map(|t| t.spans.iter().map(|s| (t.trace_id, s.span_id.as_slice().try_into().unwrap()))).collect()
}

#[test]
fn a_clock_stepped_forward_decides_nothing_early() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing {
        decision_wait: "12s",
        root_grace: "10s",
        env: vec![("TAILGATE_TEST_FAULT", "clock_step")],
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    // Ten error traces whose failing span comes last: judged on the spans before it, each
    // would be a fast success and be dropped, and the error span would follow that verdict.
    let traces: Vec<TestTrace> = (1..=10).map(|n| TestTrace::new(n, Outcome::Error, 3)).collect();
    let early: Vec<Span> = traces.iter().flat_map(|t| t.spans[..3].to_vec()).collect();
    let late: Vec<Span> = traces.iter().map(|t| t.spans[3].clone()).collect();
    send(&runtime, &tailgate, early);
    wait_ingested(&tailgate, 30);
    // NTP steps the clock an hour ahead while the traces are pending, and tail_sample restarts
    // after it (its clock must come back from the queue, not from the stepped wall clock).
    step_clock(&tailgate, 3600);
    let sampler = tailgate.stage_pid("tail_sample").unwrap();
    signal(sampler, "KILL");
    tailgate.wait_for_restart("tail_sample", sampler);
    send(&runtime, &tailgate, late);
    let expected = keys(&traces);
    assert!(
        wait_until(Duration::from_secs(40), || expected.iter().all(|k| backend.spans().contains_key(k))),
        "traces were decided on partial spans when the clock stepped: {} of {} spans kept",
        backend.spans().len(),
        expected.len()
    );
    let got: HashSet<([u8; 16], [u8; 8])> = backend.spans().keys().copied().collect();
    assert_eq!(got, expected);
}

#[test]
fn a_clock_stepped_back_delays_nothing() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing {
        decision_wait: "5s",
        root_grace: "4s",
        env: vec![("TAILGATE_TEST_FAULT", "clock_step")],
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let before: Vec<TestTrace> = (1..=5).map(|n| TestTrace::new(n, Outcome::Error, 2)).collect();
    send(&runtime, &tailgate, before.iter().flat_map(|t| t.spans.clone()).collect());
    wait_ingested(&tailgate, 15);
    // Set back by an hour while they are pending (due 4 s after they were received).
    step_clock(&tailgate, -3600);
    let after: Vec<TestTrace> = (6..=10).map(|n| TestTrace::new(n, Outcome::Slow, 2)).collect();
    send(&runtime, &tailgate, after.iter().flat_map(|t| t.spans.clone()).collect());
    let expected: HashSet<_> = keys(&before).union(&keys(&after)).copied().collect();
    assert!(
        wait_until(Duration::from_secs(30), || expected.iter().all(|k| backend.spans().contains_key(k))),
        "decisions waited for the wall clock to catch up: {} of {} spans kept",
        backend.spans().len(),
        expected.len()
    );
    let got: HashSet<([u8; 16], [u8; 8])> = backend.spans().keys().copied().collect();
    assert_eq!(got, expected);
}
