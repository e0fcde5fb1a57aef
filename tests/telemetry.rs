//! The supervisor's self-metrics endpoint: `/metrics` counts what each stage did (summed over
//! its processes, so counters never go back when a stage restarts), its restarts by reason and
//! the queue's depth; `/healthz` answers while the supervisor runs; `/readyz` says which stage
//! keeps the pipeline from being ready.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::{
    Backend, Tailgate, Timing, assert_exact_delivery, http_get, mixed_traces, send_in_waves, signal, stop_and_wait,
    wait_until,
};

fn get(tailgate: &Tailgate, path: &str) -> (u16, String) {
    http_get(tailgate.telemetry, path)
}

/// The value of the sample `series` (name and labels exactly as exposed), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn metrics_count_every_stage_across_restarts_and_readiness_names_the_stage() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    // Waves cross the kill and restart: late spans must still find their trace undecided.
    let timing = Timing { decision_wait: "10s", root_grace: "6s", ..Timing::default() };
    let tailgate = Tailgate::start(backend_addr, &timing);
    assert_eq!(get(&tailgate, "/healthz").0, 200);
    assert!(wait_until(Duration::from_secs(10), || get(&tailgate, "/readyz").0 == 200));

    let traces = mixed_traces(60);
    let spans: usize = traces.iter().map(|t| t.spans.len()).sum();
    let mut before_kill = 0.0;
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(400), |wave| {
        if wave == 2 {
            // Let the stage publish what it counted, then kill it: the count must not go back.
            std::thread::sleep(Duration::from_millis(600));
            let text = get(&tailgate, "/metrics").1;
            before_kill = sample(&text, "tailgate_items_received_total{stage=\"tail_sample\"}");
            signal(tailgate.stage_pid("tail_sample").unwrap(), "KILL");
        }
    }));
    assert!(before_kill > 0.0, "tail_sample published nothing before the kill");
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), false);

    let text = get(&tailgate, "/metrics").1;
    let received = |stage: &str| sample(&text, &format!("tailgate_items_received_total{{stage=\"{stage}\"}}"));
    assert_eq!(received("receive"), spans as f64, "{text}");
    assert!(received("tail_sample") >= before_kill, "tail_sample's count went back after its restart:\n{text}");
    assert_eq!(sample(&text, "tailgate_stage_restarts_total{stage=\"tail_sample\",reason=\"exited\"}"), 1.0, "{text}");
    assert_eq!(sample(&text, "tailgate_stage_up{stage=\"export\"}"), 1.0, "{text}");
    assert!(
        sample(&text, "tailgate_items_dropped_total{stage=\"tail_sample\",reason=\"sampled_out\"}") > 0.0,
        "{text}"
    );
    assert!(sample(&text, "tailgate_queue_capacity_bytes") > 0.0, "{text}");
    assert!(
        sample(&text, "tailgate_exporter_responses_total{destination=\"export_traces\",code=\"ok\"}") > 0.0,
        "{text}"
    );
    assert!(text.contains("tailgate_queue_items{edge=\"spans\"}"), "{text}");
    assert!(text.contains("tailgate_queue_consumer_backlog_batches{consumer=\"export_traces\"}"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "not OpenMetrics text");

    // A stopped stage makes the pipeline not ready, by name; it is ready again once it runs.
    let pid = tailgate.stage_pid("log_mirror").unwrap();
    stop_and_wait(pid);
    let (code, body) = get(&tailgate, "/readyz");
    signal(pid, "CONT");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("log_mirror is stopped"), "{body}");
    assert!(wait_until(Duration::from_secs(10), || get(&tailgate, "/readyz").0 == 200));
}
