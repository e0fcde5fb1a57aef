//! What a start after an unclean end does: a second supervisor on the same data dir is refused;
//! after SIGKILL of the whole tree the queue is verified and its backlog delivered; a queue with
//! a corrupted batch is moved aside and tailgate starts serving again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::*;

fn kill_tree(tailgate: &mut Tailgate) {
    let stages: Vec<u32> = stage_pids(tailgate.pid()).values().copied().collect();
    signal(tailgate.pid(), "KILL");
    for pid in &stages {
        signal(*pid, "KILL");
    }
    tailgate.child.wait().unwrap();
    // The stages were re-parented when the supervisor died; wait until they are really gone
    // (or zombies), so the next start does not find their locks held.
    let alive = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };
    assert!(wait_until(Duration::from_secs(10), || !stages.iter().any(alive)), "stage processes outlived SIGKILL");
}

fn log_of(tailgate: &Tailgate) -> String {
    std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap()
}

/// Sends error traces (always kept) while the backend refuses traces, so they stay queued.
fn queue_undeliverable_traces(
    runtime: &tokio::runtime::Runtime,
    backend: &Backend,
    tailgate: &Tailgate,
) -> Vec<TestTrace> {
    backend.received.lock().unwrap().fail_next_traces = u32::MAX;
    let traces: Vec<TestTrace> = (0..20).map(|n| TestTrace::new(n, Outcome::Error, 2)).collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(50), |_| {}));
    // Let tail_sample decide (root_grace 3 s) and export fail at least once.
    std::thread::sleep(Duration::from_secs(5));
    traces
}

#[test]
fn a_second_supervisor_on_the_same_data_dir_is_refused() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    assert!(wait_until(Duration::from_secs(10), || stage_pids(tailgate.pid()).len() == 5));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .env("RUST_LOG", "info")
        .arg("run")
        .arg("--config")
        .arg(&tailgate.config_path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("another tailgate is running"));
    // The first one is untouched.
    assert_eq!(stage_pids(tailgate.pid()).len(), 5);
}

#[test]
fn sigkill_of_the_whole_tree_keeps_the_backlog() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let mut tailgate = Tailgate::start(backend_addr, &Timing::default());
    let traces = queue_undeliverable_traces(&runtime, &backend, &tailgate);
    assert!(backend.spans().is_empty());
    // `tailgate status` reads the live queue: the undelivered backlog is there, exactly.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .arg("status")
        .arg("--config")
        .arg(&tailgate.config_path)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let report = String::from_utf8(status.stdout).unwrap();
    let kept_line = report.lines().find(|l| l.starts_with("kept_spans ")).expect("kept_spans line");
    let items: u64 = kept_line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(items, traces.iter().map(|t| t.spans.len() as u64).sum::<u64>(), "{report}");
    kill_tree(&mut tailgate);
    // Restart on the same data dir with a backend that accepts again.
    backend.received.lock().unwrap().fail_next_traces = 0;
    tailgate.child = spawn_tailgate(&tailgate.config_path, tailgate.dir.path());
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), true);
    let log = log_of(&tailgate);
    assert!(log.contains("previous run did not shut down cleanly"), "{log}");
    assert!(log.contains("queue verified"), "{log}");
}

#[test]
fn a_corrupted_batch_moves_the_queue_aside_and_service_resumes() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let mut tailgate = Tailgate::start(backend_addr, &Timing::default());
    queue_undeliverable_traces(&runtime, &backend, &tailgate);
    kill_tree(&mut tailgate);
    // Overwrite every stored span name ("GET /item/...") with bytes that are not UTF-8: the
    // B-tree stays intact, the batches no longer pass checked access.
    let file = tailgate.data_dir().join("queue").join("data.mdb");
    let mut bytes = std::fs::read(&file).unwrap();
    let needle = b"GET /item/";
    let mut hits = 0;
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
        let start = at + found;
        bytes[start..start + needle.len()].fill(0xff);
        at = start + needle.len();
        hits += 1;
    }
    assert!(hits > 0, "no stored span names found to corrupt");
    std::fs::write(&file, bytes).unwrap();

    backend.received.lock().unwrap().fail_next_traces = 0;
    tailgate.child = spawn_tailgate(&tailgate.config_path, tailgate.dir.path());
    assert!(wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(tailgate.grpc).is_ok()));
    let log = log_of(&tailgate);
    assert!(log.contains("damaged queue moved aside"), "{log}");
    let aside = std::fs::read_dir(tailgate.data_dir())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("queue.corrupt-"));
    assert!(aside, "no queue.corrupt-* directory kept for inspection");
    // New data flows through the fresh queue.
    let fresh: Vec<TestTrace> = (500..510).map(|n| TestTrace::new(n, Outcome::Error, 2)).collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &fresh, Duration::from_millis(50), |_| {}));
    assert_exact_delivery(&backend, &fresh, Duration::from_secs(1), false);
}
