//! What a start after an unclean end does: a second supervisor on the same data dir is refused;
//! after SIGKILL of the whole tree the queue is checked and its backlog delivered; damage to one
//! batch, a cursor or `meta` costs exactly what is damaged, is reported, and service goes on.

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

/// Sends error traces (always kept) while the backend refuses traces, so they stay queued.
fn queue_undeliverable_traces(
    runtime: &tokio::runtime::Runtime,
    backend: &Backend,
    tailgate: &Tailgate,
) -> Vec<TestTrace> {
    backend.received.lock().unwrap().fail_next_traces = u32::MAX;
    let traces: Vec<TestTrace> = (0..20).map(|n| TestTrace::new(n, Outcome::Error, 2)).collect();
    // Waves further apart than tail_sample's step interval (500 ms): the traces are decided in
    // several steps, so the kept spans lie in several batches (one of which gets damaged).
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(600), |_| {}));
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
    let log = tailgate.log();
    assert!(log.contains("previous run did not shut down cleanly"), "{log}");
    assert!(log.contains("queue checked"), "{log}");
}

/// Flips the byte `offset` bytes after every occurrence of `needle` in the queue's data file
/// (the live page and any stale copies alike); returns how many were found.
fn flip_after(tailgate: &Tailgate, needle: &[u8], offset: usize) -> usize {
    let file = tailgate.data_dir().join("queue").join("data.mdb");
    let mut bytes = std::fs::read(&file).unwrap();
    let mut hits = 0;
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
        let start = at + found;
        bytes[start + needle.len() + offset] ^= 0x5a;
        at = start + needle.len();
        hits += 1;
    }
    std::fs::write(&file, bytes).unwrap();
    hits
}

/// Flips byte `at` of the stored value of `key` in table `table`, through LMDB so that exactly
/// the live value is damaged (a search of the file for the key also finds stale copies in the
/// free space of pages, and a flip there can land in a neighbouring live value).
fn flip_value(tailgate: &Tailgate, table: &str, key: &[u8], at: usize) {
    let dir = tailgate.data_dir().join("queue");
    let size = std::fs::metadata(dir.join("data.mdb")).unwrap().len();
    let options = tailgate_ipc::QueueOptions { max_size_bytes: size, ..Default::default() };
    let queue = tailgate_ipc::Queue::open(&dir, &options).unwrap();
    assert!(queue.flip_stored_byte(table, key, at).unwrap(), "{table}/{} not stored", String::from_utf8_lossy(key));
}

fn span_key(span: &opentelemetry_proto::tonic::trace::v1::Span) -> ([u8; 16], [u8; 8]) {
    (span.trace_id.as_slice().try_into().unwrap(), span.span_id.as_slice().try_into().unwrap())
}

/// Items the `status` damage records say were lost on `table`.
fn reported_lost_items(status: &str, table: &str) -> u64 {
    status
        .lines()
        .filter(|line| line.contains(&format!(" {table}: quarantined")))
        .map(|line| {
            let (_, rest) = line.split_once("), ").expect("items in the record");
            rest.split_whitespace().next().unwrap().parse::<u64>().unwrap()
        })
        .sum()
}

/// One damaged batch in the backlog: with an unclean end (the check at start) or a clean one
/// (the check on read), exactly that batch is quarantined, every other trace is delivered, and
/// `status` reports the loss with its item count.
fn one_damaged_batch(clean_stop: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let mut tailgate = Tailgate::start(backend_addr, &Timing::default());
    let traces = queue_undeliverable_traces(&runtime, &backend, &tailgate);
    if clean_stop {
        assert!(tailgate.stop().success());
    } else {
        kill_tree(&mut tailgate);
    }
    // One payload byte of the span record of trace 7 (its trace id is unique to it): rkyv still
    // validates the archive, only the batch checksum can tell.
    let damaged = &traces[7];
    assert!(flip_after(&tailgate, &damaged.trace_id, 0) > 0, "trace 7 not found in the queue file");

    backend.received.lock().unwrap().fail_next_traces = 0;
    tailgate.child = spawn_tailgate(&tailgate.config_path, tailgate.dir.path());
    let delivered_traces = |backend: &Backend| {
        let spans = backend.spans();
        traces.iter().filter(|t| t.spans.iter().all(|s| spans.contains_key(&span_key(s)))).count()
    };
    let lost_reported = || reported_lost_items(&tailgate.status(), "kept_spans");
    assert!(
        wait_until(Duration::from_secs(20), || lost_reported() > 0 && {
            let lost = traces.len() - delivered_traces(&backend);
            lost_reported() == 3 * lost as u64
        }),
        "delivered {} of {} traces; status:\n{}\nlog:\n{}",
        delivered_traces(&backend),
        traces.len(),
        tailgate.status(),
        tailgate.log()
    );
    let spans = backend.spans();
    assert!(!damaged.spans.iter().any(|s| spans.contains_key(&span_key(s))), "the damaged batch was sent");
    assert!(delivered_traces(&backend) >= traces.len() / 2, "intact batches must be delivered");
    let log = tailgate.log();
    assert!(log.contains("queue damage repaired"), "{log}");
    assert!(!log.contains("moved aside"), "{log}");
    if !clean_stop {
        assert!(log.contains("previous run did not shut down cleanly"), "{log}");
    }
    // Service goes on: new data flows through the same queue.
    backend.received.lock().unwrap().traces.clear();
    let fresh: Vec<TestTrace> = (500..510).map(|n| TestTrace::new(n, Outcome::Error, 2)).collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &fresh, Duration::from_millis(50), |_| {}));
    assert_exact_delivery(&backend, &fresh, Duration::from_secs(1), false);
    // No stage restarted for it: the damage was repaired inside the stage process.
    assert!(!log.contains("restarting"), "{log}");
}

#[test]
fn a_damaged_batch_found_at_start_is_quarantined_alone() {
    one_damaged_batch(false);
}

#[test]
fn a_damaged_batch_found_on_read_is_quarantined_alone() {
    one_damaged_batch(true);
}

/// A damaged cursor and damaged `meta` values (an edge depth, tail_sample's read position):
/// the cursor is reset so nothing intact is skipped, the depth recomputed, the position
/// dropped; the whole backlog is delivered (a redelivery is allowed, a loss is not).
#[test]
fn a_damaged_cursor_and_meta_keep_the_backlog() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let mut tailgate = Tailgate::start(backend_addr, &Timing::default());
    // A first delivery, so export_traces has a stored cursor.
    let first: Vec<TestTrace> = (100..103).map(|n| TestTrace::new(n, Outcome::Error, 2)).collect();
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &first, Duration::from_millis(50), |_| {}));
    assert_exact_delivery(&backend, &first, Duration::ZERO, false);
    backend.received.lock().unwrap().traces.clear();
    let traces = queue_undeliverable_traces(&runtime, &backend, &tailgate);
    assert!(tailgate.stop().success());
    flip_value(&tailgate, "cursors", b"export_traces", 7);
    flip_value(&tailgate, "meta", b"depth/kept_spans", 3);
    flip_value(&tailgate, "meta", b"tail_sample/read_pos", 7);
    backend.received.lock().unwrap().fail_next_traces = 0;
    tailgate.child = spawn_tailgate(&tailgate.config_path, tailgate.dir.path());
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), true);
    let status = tailgate.status();
    assert!(status.contains("cursors: reset"), "{status}");
    assert!(status.contains("cursor of export_traces was damaged"), "{status}");
    let log = tailgate.log();
    assert!(log.contains("queue damage repaired"), "{log}");
}
