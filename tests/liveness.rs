//! A stage that neither exits nor works: a stopped process (SIGSTOP, a frozen cgroup) is killed
//! after `supervisor.liveness_timeout` and restarted; nothing accepted is lost or duplicated.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::{Backend, Tailgate, Timing, assert_exact_delivery, mixed_traces, send_in_waves, signal, wait_until};

#[test]
fn stopped_stages_are_killed_and_restarted_without_loss() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    // A frozen receive holds back the next wave's spans by the liveness timeout and a restart:
    // the root grace must outlast that, or the late error spans would meet a decided trace.
    let timing = Timing {
        decision_wait: "20s",
        root_grace: "12s",
        supervisor_extra: "  liveness_timeout: 2s",
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    assert!(wait_until(Duration::from_secs(10), || tailgate.stage_pid("tail_sample").is_some()));
    let traces = mixed_traces(60);
    let mut stopped = Vec::new();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(700), |wave| {
        // Between waves (no request in flight): freeze tail_sample, later receive, and leave
        // them frozen; the supervisor must notice on its own.
        let stage = match wave {
            0 => "tail_sample",
            2 => "receive",
            _ => return,
        };
        let pid = tailgate.stage_pid(stage).unwrap();
        signal(pid, "STOP");
        stopped.push((stage, pid));
    }));
    for (stage, pid) in &stopped {
        let new_pid = tailgate.wait_for_restart(stage, *pid);
        assert_ne!(new_pid, *pid);
    }
    assert_exact_delivery(&backend, &traces, Duration::from_secs(3), false);
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap();
    assert!(log.contains("stage process is stopped"), "the kill was not logged");
}
