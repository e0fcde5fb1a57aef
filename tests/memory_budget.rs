//! A stage over its memory hard limit is killed and restarted by the supervisor, and nothing
//! queued is lost: its state is rebuilt from the queue.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::*;

#[test]
fn stage_over_hard_limit_is_restarted_without_loss() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    // Every stage process holds more than 1 MiB of heap once it has served traffic.
    let timing = Timing {
        supervisor_extra: "  memory_soft_limit_mib: 0\n  memory_hard_limit_mib: 1",
        // Stages restart every second or so here; give traces room to complete across them.
        decision_wait: "12s",
        root_grace: "6s",
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let traces = mixed_traces(60);
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(300), |_| {}));
    let log_path = tailgate.dir.path().join("tailgate.log");
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&log_path).unwrap().contains("over its memory hard limit")
        }),
        "no stage was restarted for memory"
    );
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), true);
}
