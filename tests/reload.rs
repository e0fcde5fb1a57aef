//! Reload (`tailgate reload`, SIGHUP): a changed sampling threshold takes effect and only the
//! stages that read it restart; a file with problems changes nothing; nothing queued is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::{Backend, Outcome, Tailgate, TestTrace, Timing, send_in_waves, signal, wait_until};

#[test]
fn a_reload_applies_a_new_threshold_restarting_only_the_stages_that_read_it() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing { decision_wait: "2s", root_grace: "1s", ..Timing::default() };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let delivered = |trace: &TestTrace| {
        let got = backend.spans();
        trace
            .spans
            .iter()
            .all(|s| got.contains_key(&(s.trace_id.clone().try_into().unwrap(), s.span_id.clone().try_into().unwrap())))
    };
    let none_delivered = |trace: &TestTrace| {
        let got = backend.spans();
        !trace
            .spans
            .iter()
            .any(|s| got.contains_key(&(s.trace_id.clone().try_into().unwrap(), s.span_id.clone().try_into().unwrap())))
    };

    // Before: 120 ms traces are fast (threshold 200 ms) and dropped; errors kept.
    let before: Vec<TestTrace> =
        (0..20).map(|n| TestTrace::new(n, if n % 2 == 0 { Outcome::Fast } else { Outcome::Error }, 2)).collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &before, Duration::from_millis(200), |_| {}));
    assert!(wait_until(Duration::from_secs(30), || before.iter().filter(|t| t.kept()).all(delivered)));

    let original = std::fs::read_to_string(&tailgate.config_path).unwrap();
    let pids = common::stage_pids(tailgate.pid());

    // A file with a problem: the CLI refuses it, SIGHUP logs it; nothing restarts.
    std::fs::write(&tailgate.config_path, original.replace("decision_cache_ttl: 2m", "decision_cache_ttl: soon"))
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["reload", "--data-dir"])
        .arg(tailgate.data_dir())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("decision_cache_ttl"), "{said}");
    signal(tailgate.pid(), "HUP");
    assert!(wait_until(Duration::from_secs(10), || tailgate.log().contains("configuration not reloaded")));
    assert_eq!(common::stage_pids(tailgate.pid()), pids, "a refused reload restarted a stage");

    // A valid change: the threshold drops to 100 ms.
    std::fs::write(
        &tailgate.config_path,
        original.replace("decision_cache_ttl: 2m", "decision_cache_ttl: 2m\n  latency_threshold: 100ms"),
    )
    .unwrap();
    let said = tailgate.cli(&["reload"]);
    assert!(said.contains("restarted tail_sample, log_mirror"), "{said}");
    let sampler = tailgate.wait_for_restart("tail_sample", pids["tail_sample"]);
    let mirror = tailgate.wait_for_restart("log_mirror", pids["log_mirror"]);
    assert_ne!(sampler, pids["tail_sample"]);
    assert_ne!(mirror, pids["log_mirror"]);
    let now = common::stage_pids(tailgate.pid());
    for stage in ["receive", "spanmetrics", "export"] {
        assert_eq!(now[stage], pids[stage], "{stage} restarted although its configuration did not change");
    }

    // After: the same 120 ms traces are slow now, and kept.
    let after: Vec<TestTrace> = (100..110).map(|n| TestTrace::new(n, Outcome::Fast, 2)).collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &after, Duration::from_millis(200), |_| {}));
    assert!(
        wait_until(Duration::from_secs(30), || after.iter().all(delivered)),
        "the new threshold did not take effect"
    );
    assert!(before.iter().filter(|t| !t.kept()).all(none_delivered), "a trace dropped before the reload was delivered");
    let status: serde_json::Value = serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap();
    let restarts = status["supervisor"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "tail_sample")
        .unwrap()["restarts"]
        .clone();
    assert_eq!(restarts, serde_json::json!({ "reload": 1 }));
}
