//! At the disk budget: receive pushes back, every stage keeps making progress, and once the
//! backend returns the whole accepted backlog is delivered (no deadlock at the limit).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Backend, Tailgate, Timing, free_port, string_kv, trace_request, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::trace::v1::{Span, Status, status};

/// A trace of `spans` error spans, each carrying `padding` bytes of attribute.
fn heavy_trace(n: u32, spans: u32, padding: usize) -> Vec<Span> {
    let mut trace_id = [0u8; 16];
    trace_id[..4].copy_from_slice(&n.to_be_bytes());
    trace_id[15] = 0x5b;
    let start = 1_700_000_000_000_000_000u64 + u64::from(n) * 1_000_000;
    (0..spans)
        .map(|s| {
            let mut span_id = [0u8; 8];
            span_id[..4].copy_from_slice(&n.to_be_bytes());
            span_id[4..].copy_from_slice(&(s + 1).to_be_bytes());
            let parent = if s == 0 { Vec::new() } else { [&n.to_be_bytes()[..], &1u32.to_be_bytes()[..]].concat() };
            Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                parent_span_id: parent,
                name: format!("work {s}"),
                start_time_unix_nano: start,
                end_time_unix_nano: start + 5_000_000,
                attributes: vec![string_kv("payload", &"x".repeat(padding))],
                status: Some(Status { code: status::StatusCode::Error as i32, message: "failed".into() }),
                ..Default::default()
            }
        })
        .collect()
}

#[test]
fn at_the_disk_budget_every_stage_progresses_and_the_backlog_drains() {
    let timing = Timing {
        decision_wait: "2s",
        root_grace: "1s",
        log_max_wait: "4s",
        queue_max_size_mib: 16,
        ..Timing::default()
    };
    fill_then_drain(&timing, |_| {});
}

/// The filesystem fills up (another writer takes every free block) while the backend is down:
/// the budget was reserved at start, so the queue still takes data up to its budget, pushes back
/// there, no stage dies (no SIGBUS through the memory map), and the backlog drains.
#[test]
fn a_full_filesystem_is_pushback_not_a_crash() {
    let timing = Timing {
        decision_wait: "2s",
        root_grace: "1s",
        log_max_wait: "4s",
        queue_max_size_mib: 16,
        data_tmpfs_mib: Some(40),
        ..Timing::default()
    };
    fill_then_drain(&timing, |tailgate| {
        // LMDB's lock file (the reader table every process maps) is backed whole, so a process
        // taking a reader slot on a page not used before cannot fault a hole once the
        // filesystem is full.
        let lock = std::fs::metadata(tailgate.data_dir().join("queue/lock.mdb")).unwrap();
        let allocated = std::os::unix::fs::MetadataExt::blocks(&lock) * 512;
        assert!(allocated >= lock.len(), "lock.mdb: {allocated} of {} bytes allocated", lock.len());
        // Take every block the queue did not reserve.
        let filler = tailgate.data_dir().join("filler");
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=64"])
            .arg(format!("of={}", filler.display()))
            .stderr(std::process::Stdio::null())
            .status();
        let free = std::process::Command::new("df").arg("--output=avail").arg(tailgate.data_dir()).output().unwrap();
        let avail: u64 = String::from_utf8_lossy(&free.stdout).lines().nth(1).unwrap().trim().parse().unwrap();
        assert!(avail < 1024, "the filesystem still has {avail} KiB free");
    });
    // The supervisor refuses a budget the filesystem cannot hold, with the numbers.
    let dir = tempfile::tempdir().unwrap();
    common::mount_tmpfs(&dir.path().join("data"), 20);
    let config = dir.path().join("tailgate.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: {}\nqueue: {{ max_size_mib: 32 }}\nreceivers: {{ otlp: {{ protocols: {{ grpc: {{ endpoint: \"127.0.0.1:{}\" }} }} }} }}\nexporters: {{ traces: {{ otlp: {{ endpoint: \"http://127.0.0.1:9\" }} }} }}\n",
            dir.path().join("data").display(),
            free_port()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let _ = std::process::Command::new("umount").arg("-l").arg(dir.path().join("data")).status();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cannot hold the queue's disk budget") && stderr.contains("needs 32 MiB"), "{stderr}");
}

fn fill_then_drain(timing: &Timing, before_load: impl FnOnce(&Tailgate)) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The backend is down: nothing listens on its port yet.
    let backend_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tailgate = Tailgate::start(backend_addr, timing);
    let stages_before = common::stage_pids(tailgate.pid());
    before_load(&tailgate);
    let grpc = tailgate.grpc;
    // Fill the budget: every trace is kept, so kept spans pile up while the backend is down.
    let mut accepted: Vec<u32> = Vec::new();
    let mut refused_in_a_row = 0;
    let mut refused_total = 0;
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        for request in 0..4000u32 {
            let traces: Vec<u32> = (0..4).map(|t| request * 4 + t).collect();
            let spans = traces.iter().flat_map(|n| heavy_trace(*n, 5, 1500)).collect();
            match client.export(trace_request("budget", spans)).await {
                Ok(_) => {
                    accepted.extend(traces);
                    refused_in_a_row = 0;
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    refused_total += 1;
                    refused_in_a_row += 1;
                    if refused_in_a_row >= 30 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    assert!(refused_total > 0, "the budget was never reached");
    // Give the stages time to work at the limit while the backend is still down.
    std::thread::sleep(Duration::from_secs(5));
    let (backend, _) = Backend::serve_at(&runtime, backend_addr);
    let expected: HashSet<([u8; 16], [u8; 8])> = accepted
        .iter()
        .flat_map(|n| heavy_trace(*n, 5, 0))
        .map(|s| (s.trace_id.try_into().unwrap(), s.span_id.try_into().unwrap()))
        .collect();
    let delivered = wait_until(Duration::from_secs(120), || {
        let got = backend.spans();
        expected.iter().all(|key| got.contains_key(key))
    });
    let got = backend.spans();
    let missing = expected.iter().filter(|key| !got.contains_key(*key)).count();
    let status = tailgate.status();
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap_or_default();
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && !l.contains("will retry"))
        .take(20)
        .collect();
    assert!(
        delivered,
        "{missing} of {} accepted spans never delivered after the backend returned\nstatus:\n{status}\nlog:\n{}",
        expected.len(),
        notable.join("\n")
    );
    assert_eq!(common::stage_pids(tailgate.pid()), stages_before, "a stage died at the limit:\n{}", notable.join("\n"));
}

/// `when_full: drop_oldest`: with the backend down, the destination gives up its oldest data
/// at the budget instead of pushing back; intake goes on, and once the backend returns every
/// accepted span is either delivered or counted as dropped, the newest delivered.
// Under CPU contention (the full suite on two cores) intake can fill the budget with undecided
// `spans` faster than tail_sample decides; with `kept_spans` then empty there is nothing to drop,
// and tail_sample must get through on scattered free pages with smaller steps (a stall here was
// a step size that grew back while the sampler re-read its window after each failed step).
#[test]
fn drop_oldest_keeps_intake_open_and_counts_what_it_drops() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let backend_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let timing = Timing {
        decision_wait: "2s",
        root_grace: "1s",
        log_max_wait: "4s",
        queue_max_size_mib: 16,
        otlp_extra: ", timeout: 10s, when_full: drop_oldest",
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let grpc = tailgate.grpc;
    let mut accepted: Vec<u32> = Vec::new();
    let mut refused = 0;
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        // About three budgets' worth of kept spans.
        for request in 0..1500u32 {
            let traces: Vec<u32> = (0..4).map(|t| request * 4 + t).collect();
            let spans = traces.iter().flat_map(|n| heavy_trace(*n, 5, 1500)).collect();
            match client.export(trace_request("budget", spans)).await {
                Ok(_) => accepted.extend(traces),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let log_path = tailgate.dir.path().join("tailgate.log");
    let dropped = || -> u64 {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("dropped this destination's oldest data") && l.contains("export_traces"))
            .filter_map(|l| l.split("items=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(dropped() > 0, "nothing was dropped at the budget");
    // Intake took far more than the budget holds: dropping made room. (It still pushes back
    // while the budget is filled by spans the sampler has not decided yet: those are no
    // destination's backlog, so there is nothing to drop.)
    let status = tailgate.status();
    let accepted_bytes = accepted.len() as u64 * 5 * 1500;
    assert!(
        accepted_bytes > 24 << 20,
        "only {accepted_bytes} bytes of spans accepted into a 16 MiB budget ({refused} refusals)\n{status}"
    );
    let (backend, _) = Backend::serve_at(&runtime, backend_addr);
    let spans_of = |n: &u32| heavy_trace(*n, 5, 0).into_iter().map(|s| (s.trace_id, s.span_id));
    let total = accepted.len() as u64 * 5;
    let done = wait_until(Duration::from_secs(90), || backend.spans().len() as u64 + dropped() == total);
    let status_now = tailgate.status();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let notable: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).rev().take(15).collect();
    assert!(
        done,
        "delivered {} + dropped {} != accepted {total}\n{status_now}\n{}",
        backend.spans().len(),
        dropped(),
        notable.join("\n")
    );
    let got = backend.spans();
    assert!(got.values().all(|(_, times)| *times == 1), "a span was delivered twice");
    // The newest traces are the ones kept.
    let newest = accepted.last().unwrap();
    let delivered_of = |n: &u32| {
        spans_of(n)
            .filter(|(t, s)| got.contains_key(&(t.clone().try_into().unwrap(), s.clone().try_into().unwrap())))
            .count()
    };
    let first_delivered = accepted.iter().position(|n| delivered_of(n) > 0);
    assert_eq!(
        delivered_of(newest),
        5,
        "newest trace not delivered; delivered {} dropped {} of {total}; first delivered trace index {first_delivered:?} of {}",
        got.len(),
        dropped(),
        accepted.len()
    );
    let oldest = accepted.first().unwrap();
    assert!(!spans_of(oldest).any(|(t, s)| got.contains_key(&(t.try_into().unwrap(), s.try_into().unwrap()))));
}
