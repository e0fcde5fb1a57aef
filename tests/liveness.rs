//! A stage that neither exits nor works: a stopped process (SIGSTOP, a frozen cgroup) is killed
//! after `supervisor.liveness_timeout` and restarted; nothing accepted is lost or duplicated.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::{
    Backend, Tailgate, Timing, assert_exact_delivery, http_client, mixed_traces, send_in_waves, signal, wait_until,
};

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

/// Another process holds the queue's writer lock for 8 s (what a stage frozen inside a write
/// transaction does): receivers keep answering within `queue.write_timeout` (2 s) with a
/// retryable refusal instead of hanging, nothing refused is stored (no duplicate when the
/// client retries), and once the lock is free everything accepted is delivered exactly.
#[test]
fn a_held_writer_lock_gets_refusals_not_hangs() {
    use common::{TestTrace, trace_request};
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use std::time::Instant;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let queue_dir = tailgate.data_dir().join("queue");
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let options = tailgate_ipc::QueueOptions { max_size_bytes: 256 << 20, ..Default::default() };
        let queue = tailgate_ipc::Queue::open(&queue_dir, &options).unwrap();
        let wtxn = queue.write().unwrap();
        held_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(8));
        drop(wtxn);
    });
    held_rx.recv().unwrap();
    let held_since = Instant::now();
    let grpc = tailgate.grpc;
    let http = tailgate.http;
    let traces: Vec<TestTrace> = (0..12).map(|n| TestTrace::new(n, common::Outcome::Error, 2)).collect();
    let (accepted, refused) = runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        let http_client = http_client().build().unwrap();
        let (mut accepted, mut refused) = (Vec::new(), Vec::new());
        for (i, trace) in traces.iter().enumerate() {
            let started = Instant::now();
            let request = trace_request("held", trace.spans.clone());
            let ok = if i % 2 == 0 {
                let mut call = tonic::Request::new(request);
                call.set_timeout(Duration::from_secs(10));
                match client.export(call).await {
                    Ok(_) => true,
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                        false
                    }
                }
            } else {
                let body = prost::Message::encode_to_vec(&request);
                let response = http_client
                    .post(format!("http://{http}/v1/traces"))
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => true,
                    503 => {
                        assert!(response.headers().contains_key("retry-after"));
                        false
                    }
                    other => panic!("unexpected HTTP {other}"),
                }
            };
            let took = started.elapsed();
            assert!(took < Duration::from_secs(4), "request {i} took {took:?} while the lock was held");
            if ok {
                accepted.push(trace.clone())
            } else {
                refused.push(trace.clone())
            }
            if held_since.elapsed() > Duration::from_secs(6) {
                break;
            }
        }
        (accepted, refused)
    });
    holder.join().unwrap();
    assert!(!refused.is_empty(), "nothing was refused while the writer lock was held");
    // The refused ones are sent again (what a client does) after the lock is free.
    runtime.block_on(send_in_waves(grpc, http, &refused, Duration::ZERO, |_| {}));
    let all: Vec<TestTrace> = accepted.into_iter().chain(refused).collect();
    assert_exact_delivery(&backend, &all, Duration::from_secs(2), false);
}

/// tail_sample stops itself (SIGSTOP, via a test-only fault point) while it holds the queue's
/// writer lock, under load: every other writer waits behind it. Receivers keep answering (OK or
/// a retryable refusal, never a hang past a few seconds), the supervisor kills the stopped stage
/// after `liveness_timeout`, LMDB recovers the lock it held, and after clients retry their
/// refusals the delivered set is exact.
#[test]
fn a_stage_stopped_inside_its_write_transaction_is_replaced() {
    stage_stuck_inside_its_write_transaction("stop_in_write_txn");
}

/// The same with a stage that keeps running but never commits (a deadlock or an I/O stall
/// inside its write transaction): the supervisor finds the lock's owner in `lock.mdb` and
/// kills that stage, never the ones waiting behind it.
#[test]
fn a_stage_hung_inside_its_write_transaction_is_replaced() {
    stage_stuck_inside_its_write_transaction("hang_in_write_txn");
}

fn stage_stuck_inside_its_write_transaction(fault: &'static str) {
    use common::{TestTrace, trace_request};
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use std::time::Instant;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing {
        decision_wait: "20s",
        root_grace: "1s",
        supervisor_extra: "  liveness_timeout: 2s",
        env: vec![("TAILGATE_TEST_FAULT", fault)],
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let first = tailgate.stage_pid("tail_sample").unwrap();
    let trigger = tailgate.data_dir().join("run").join(format!("fault-{fault}"));
    let grpc = tailgate.grpc;
    let traces: Vec<TestTrace> = (0..40).map(|n| TestTrace::new(n, common::Outcome::Error, 2)).collect();
    let refusals = runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        let mut refusals = 0;
        for (i, trace) in traces.iter().enumerate() {
            if i == 10 {
                std::fs::write(&trigger, b"").unwrap();
            }
            // A client that retries refusals, as OTLP exporters do (bounded: 60 attempts).
            for attempt in 0.. {
                assert!(attempt < 60, "trace {i} still refused after 60 attempts: the stall never ended");
                let started = Instant::now();
                let mut call = tonic::Request::new(trace_request("frozen", trace.spans.clone()));
                call.set_timeout(Duration::from_secs(10));
                let outcome = client.export(call).await;
                assert!(started.elapsed() < Duration::from_secs(4), "a request hung for {:?}", started.elapsed());
                match outcome {
                    Ok(_) => break,
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                        refusals += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        refusals
    });
    assert!(!trigger.exists(), "the fault point was never reached");
    let second = tailgate.wait_for_restart("tail_sample", first);
    assert_ne!(first, second);
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), false);
    let log = std::fs::read_to_string(tailgate.dir.path().join("tailgate.log")).unwrap();
    assert!(log.contains("test fault point hit"), "{log}");
    if fault == "hang_in_write_txn" {
        assert!(log.contains("holds the queue's writer lock without progress"), "{log}");
    }
    eprintln!("{refusals} refusals while tail_sample held the lock ({fault})");
}

/// A stage that runs but does nothing (its loop awaits something that never completes, outside
/// any transaction: no lock held, the process is not stopped, its runtime answers) misses its
/// heartbeat and is killed after `liveness_timeout`, then restarted; intake never stalls,
/// nothing is lost or duplicated, and the idle stages beside it, whose heartbeats come from
/// their waits, are left alone.
#[test]
fn a_stage_hung_outside_any_transaction_is_replaced() {
    use common::{TestTrace, trace_request};
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing {
        decision_wait: "1s",
        root_grace: "1s",
        supervisor_extra: "  liveness_timeout: 2s",
        env: vec![("TAILGATE_TEST_FAULT", "hang_in_step")],
        ..Timing::default()
    };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let before = common::stage_pids(tailgate.pid());
    let first = before["tail_sample"];
    let trigger = tailgate.data_dir().join("run").join("fault-hang_in_step");
    let grpc = tailgate.grpc;
    let traces: Vec<TestTrace> = (0..40).map(|n| TestTrace::new(n, common::Outcome::Error, 2)).collect();
    let log_path = tailgate.dir.path().join("tailgate.log");
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        for (i, trace) in traces.iter().enumerate() {
            if i == 10 {
                std::fs::write(&trigger, b"").unwrap();
            }
            client.export(trace_request("hung", trace.spans.clone())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let second = tailgate.wait_for_restart("tail_sample", first);
    assert_ne!(first, second);
    assert!(!trigger.exists(), "the fault point was never reached");
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), false);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("test fault point hit"), "{log}");
    assert!(log.contains("heartbeat overdue"), "tail_sample was not killed for its heartbeat:\n{log}");
    let after = common::stage_pids(tailgate.pid());
    for (stage, pid) in &before {
        if stage != "tail_sample" {
            assert_eq!(after.get(stage), Some(pid), "{stage} was restarted although it was only idle:\n{log}");
        }
    }
}
