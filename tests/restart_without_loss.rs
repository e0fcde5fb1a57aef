//! SIGKILL a stage in the middle of the flow: the supervisor restarts it, it rebuilds its state
//! from the queue, and the delivered set is still exact.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::*;

fn kill_mid_flow(stage: &str, allow_resend: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let traces = mixed_traces(150);
    let mut killed = None;
    // Three chunks sent back to back, each spread over five waves. The kill lands in the middle
    // chunk: by then the first chunk's traces are decided and delivered, the middle chunk's are
    // partly decided (their batches still behind the cursor) and partly pending.
    for (chunk_index, chunk) in traces.chunks(50).enumerate() {
        runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, chunk, Duration::from_millis(400), |wave| {
            if chunk_index == 1 && wave == 4 {
                let pid = tailgate.stage_pid(stage).expect("stage running");
                signal(pid, "KILL");
                killed = Some(pid);
            }
        }));
    }
    let old = killed.expect("killed during the flow");
    let new = tailgate.wait_for_restart(stage, old);
    assert_ne!(old, new);
    assert_exact_delivery(&backend, &traces, Duration::from_secs(3), allow_resend);
}

#[test]
fn tail_sample_killed_mid_flow_loses_and_duplicates_nothing() {
    kill_mid_flow("tail_sample", false);
}

/// The export boundary is at-least-once: a request the backend acknowledged just before the
/// kill, but whose cursor move was not committed, is sent again (identical). The set must be
/// exact; any repeat must be an identical span (checked by `assert_exact_delivery`).
#[test]
fn export_killed_mid_flow_delivers_the_exact_set() {
    kill_mid_flow("export", true);
}

#[test]
fn receive_killed_mid_flow_keeps_acknowledged_data() {
    // A client that got its answer has its data in the queue; kill receive between waves and
    // everything acknowledged still comes out. (Waves after the kill wait for the restart.)
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let traces = mixed_traces(60);
    let first: Vec<TestTrace> = traces[..30].to_vec();
    let second: Vec<TestTrace> = traces[30..].to_vec();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &first, Duration::from_millis(100), |_| {}));
    let old = tailgate.stage_pid("receive").unwrap();
    signal(old, "KILL");
    tailgate.wait_for_restart("receive", old);
    assert!(wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(tailgate.grpc).is_ok()));
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &second, Duration::from_millis(100), |_| {}));
    assert_exact_delivery(&backend, &traces, Duration::from_secs(3), false);
}
