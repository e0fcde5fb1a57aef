//! Per-stage memory budgets: a stage over its soft budget is asked to shed and gives back what
//! it can without a restart; over its hard budget it is drained and restarted, and nothing
//! queued is lost (its state is rebuilt from the queue); a stage whose rebuilt state alone
//! exceeds the budget makes the supervisor escalate instead of restarting it for ever.
//! tail_sample is made to allocate through the test-only fault points `bloat` (ballast it can
//! give up, or `pinned` ballast it cannot) and `bloat_at_start`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::*;

fn status_of(tailgate: &Tailgate, stage: &str) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
    status["supervisor"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).unwrap().clone()
}

#[test]
fn over_the_soft_budget_a_stage_sheds_and_over_the_hard_one_it_is_restarted_without_loss() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing {
        supervisor_extra: "  stage_memory:\n    tail_sample: {soft_mib: 40, hard_mib: 100}",
        env: vec![("TAILGATE_TEST_FAULT", "bloat")],
        decision_wait: "2s",
        root_grace: "1s",
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let trigger = tailgate.data_dir().join("run").join("fault-bloat");
    let first = tailgate.stage_pid("tail_sample").unwrap();
    let traces = mixed_traces(90);

    // 60 MiB of ballast the stage can give up: over the soft budget, under the hard one.
    std::fs::write(&trigger, "60").unwrap();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces[..30], Duration::from_millis(300), |_| {}));
    assert!(
        wait_until(Duration::from_secs(20), || tailgate.log().contains("shed memory on the supervisor's request")),
        "tail_sample never shed:\n{}",
        tailgate.log()
    );
    assert!(tailgate.log().contains("stage over its soft memory budget; asking it to shed"));
    assert!(
        wait_until(Duration::from_secs(10), || status_of(&tailgate, "tail_sample")["private_bytes"].as_u64().unwrap()
            < 40 << 20),
        "shedding gave nothing back: {:#}",
        status_of(&tailgate, "tail_sample")
    );
    let sampler = status_of(&tailgate, "tail_sample");
    assert_eq!(sampler["pid"].as_u64(), Some(u64::from(first)), "shedding restarted the stage: {sampler:#}");
    assert_eq!(sampler["restarts"], serde_json::json!({}), "{sampler:#}");
    assert!(sampler["shed_requests"].as_u64().unwrap() >= 1, "{sampler:#}");

    // 150 MiB it cannot give up: over the hard budget, drained and restarted.
    std::fs::write(&trigger, "150 pinned").unwrap();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces[30..], Duration::from_millis(300), |_| {}));
    let second = tailgate.wait_for_restart("tail_sample", first);
    assert_ne!(first, second);
    assert!(tailgate.log().contains("stage over its hard memory budget; draining and restarting it"));
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), false);
    let sampler = status_of(&tailgate, "tail_sample");
    assert_eq!(sampler["restarts"], serde_json::json!({ "memory": 1 }), "{sampler:#}");
}

#[test]
fn a_stage_whose_rebuild_exceeds_its_budget_escalates_instead_of_looping() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing {
        supervisor_extra: "  max_restarts: 2\n  stage_memory:\n    tail_sample: {soft_mib: 20, hard_mib: 50}",
        env: vec![("TAILGATE_TEST_FAULT", "bloat_at_start")],
        ..Timing::default()
    };
    let mut tailgate = Tailgate::start(backend_addr, &timing);
    // From now on every tail_sample process holds 80 MiB from its start.
    std::fs::write(tailgate.data_dir().join("run").join("fault-bloat_at_start"), "80").unwrap();
    let first = tailgate.stage_pid("tail_sample").unwrap();
    signal(first, "KILL");
    let exited = wait_until(Duration::from_secs(60), || tailgate.child.try_wait().unwrap().is_some());
    assert!(exited, "the supervisor kept restarting a stage that cannot fit:\n{}", tailgate.log());
    let status = tailgate.child.try_wait().unwrap().unwrap();
    assert!(!status.success(), "escalation must exit non-zero: {status:?}");
    let log = tailgate.log();
    assert!(log.contains("stage over its hard memory budget"), "{log}");
    assert!(log.contains("giving up"), "{log}");
}
