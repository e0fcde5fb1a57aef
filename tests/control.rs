//! The supervisor's control socket through the CLI: `tailgate status --json` describes every
//! stage (process, health, restarts by reason) and every queue edge; `tailgate restart-stage`
//! drains one stage and starts it again without loss and without counting it as a crash; with
//! the supervisor gone, `status` still reports the queue and says the supervisor is down.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::{Backend, Tailgate, Timing, assert_exact_delivery, mixed_traces, send_in_waves, wait_until};

fn status_json(tailgate: &Tailgate) -> serde_json::Value {
    serde_json::from_str(&tailgate.cli(&["status", "--json"])).unwrap()
}

fn stage<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["supervisor"]["stages"].as_array().unwrap().iter().find(|s| s["stage"] == name).unwrap()
}

#[test]
fn status_json_and_restart_stage_through_the_control_socket() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing { decision_wait: "2s", root_grace: "1s", ..Timing::default() };
    let mut tailgate = Tailgate::start(backend_addr, &timing);
    let pids = common::stage_pids(tailgate.pid());

    // Every stage has claimed its heartbeat slot once it is up.
    let mut status = status_json(&tailgate);
    assert!(wait_until(Duration::from_secs(10), || {
        status = status_json(&tailgate);
        status["supervisor"]["stages"].as_array().is_some_and(|s| s.iter().all(|s| s["heartbeat_overdue_ms"].is_u64()))
    }));
    assert_eq!(status["supervisor"]["running"], true, "{status:#}");
    let stages = status["supervisor"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 5, "{status:#}");
    for entry in stages {
        let name = entry["stage"].as_str().unwrap();
        assert_eq!(entry["pid"].as_u64(), Some(u64::from(pids[name])), "{name}: {entry:#}");
        assert_eq!(entry["state"], "running", "{entry:#}");
        assert!(entry["private_bytes"].as_u64().unwrap() > 0, "{entry:#}");
        assert!(entry["pss_bytes"].as_u64().unwrap() >= entry["private_bytes"].as_u64().unwrap() / 2, "{entry:#}");
        assert!(entry["cpu_seconds"].as_f64().is_some(), "{entry:#}");
        assert_eq!(entry["heartbeat_overdue_ms"], 0, "a healthy stage's heartbeat is late: {entry:#}");
        assert_eq!(entry["restarts"], serde_json::json!({}), "{entry:#}");
    }
    let edges = status["queue"]["edges"].as_array().unwrap();
    assert!(edges.iter().any(|e| e["edge"] == "spans"), "{status:#}");
    assert!(status["queue"]["capacity_bytes"].as_u64().unwrap() > 0);
    assert_eq!(status["queue"]["intake_open"], true);

    // Restart tail_sample between two waves of traffic: drained, started again, nothing lost.
    let traces = mixed_traces(40);
    let old = pids["tail_sample"];
    let mut new = None;
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(500), |wave| {
        if wave == 1 {
            let said = tailgate.cli(&["restart-stage", "tail_sample"]);
            assert!(said.contains(&old.to_string()), "{said}");
            new = Some(tailgate.wait_for_restart("tail_sample", old));
        }
    }));
    let new = new.unwrap();
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), false);
    let status = status_json(&tailgate);
    let sampler = stage(&status, "tail_sample");
    assert_eq!(sampler["pid"].as_u64(), Some(u64::from(new)), "{sampler:#}");
    assert_eq!(sampler["restarts"], serde_json::json!({ "requested": 1 }), "{sampler:#}");
    assert_eq!(sampler["restarts_in_window"], 0, "an operator's restart counted as a crash: {sampler:#}");
    assert!(tailgate.log().contains("restart requested; draining the stage"));

    // Unknown stage: a clear error, exit 1.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["restart-stage", "sampler", "--config"])
        .arg(&tailgate.config_path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown stage \"sampler\""), "{output:?}");

    // Shed on request: the stage is asked and says what it shed.
    let said = tailgate.cli(&["shed", "log_mirror"]);
    assert!(said.contains("log_mirror"), "{said}");
    assert!(wait_until(Duration::from_secs(10), || tailgate.log().contains("shed memory on the supervisor's request")));
    assert!(stage(&status_json(&tailgate), "log_mirror")["shed_requests"].as_u64().unwrap() >= 1);
    let sampler = stage(&status_json(&tailgate), "tail_sample").clone();
    assert!(sampler["rates"]["received_per_second"].as_f64().is_some(), "{sampler:#}");

    // Shutdown on request: the ordered stop, exit 0; status still reads the queue, and says
    // the supervisor is down.
    let pid = tailgate.pid();
    assert!(tailgate.cli(&["shutdown"]).contains("stopping"));
    assert!(wait_until(Duration::from_secs(20), || tailgate.child.try_wait().unwrap().is_some()));
    assert!(tailgate.child.try_wait().unwrap().unwrap().success());
    assert!(common::stage_pids(pid).is_empty());
    assert!(tailgate.log().contains("tailgate stopped cleanly"));
    let status = status_json(&tailgate);
    assert_eq!(status["supervisor"]["running"], false, "{status:#}");
    assert!(status["supervisor"]["error"].as_str().unwrap().contains("no supervisor answers"), "{status:#}");
    assert!(status["queue"]["edges"].as_array().unwrap().len() >= 6, "{status:#}");
    let text = tailgate.status();
    assert!(text.contains("supervisor: not answering"), "{text}");
}

/// `tailgate drain` pauses intake (gRPC UNAVAILABLE with a retry hint, HTTP 503 + Retry-After)
/// and returns once the queue is empty, everything accepted delivered; `tailgate resume` opens
/// intake again.
#[test]
fn drain_pauses_intake_until_the_queue_is_empty_and_resume_reopens_it() {
    use common::trace_request;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let timing = Timing { decision_wait: "2s", root_grace: "1s", ..Timing::default() };
    let tailgate = Tailgate::start(backend_addr, &timing);
    let traces = mixed_traces(30);
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::ZERO, |_| {}));
    let said = tailgate.cli(&["drain", "--timeout", "60"]);
    assert!(said.contains("drained"), "{said}");
    // Drained means delivered: nothing left to wait for.
    assert_exact_delivery(&backend, &traces, Duration::ZERO, false);
    let status = status_json(&tailgate);
    for edge in status["queue"]["edges"].as_array().unwrap() {
        assert_eq!(edge["batches"], 0, "{edge}");
    }
    let late = mixed_traces(31).pop().unwrap();
    let grpc = tailgate.grpc;
    let refused = runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        client.export(trace_request("late", late.spans.clone())).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let http = runtime.block_on(async {
        common::http_client()
            .build()
            .unwrap()
            .post(format!("http://{}/v1/traces", tailgate.http))
            .header("content-type", "application/x-protobuf")
            .body(prost::Message::encode_to_vec(&trace_request("late", late.spans.clone())))
            .send()
            .await
            .unwrap()
    });
    assert_eq!(http.status().as_u16(), 503);
    assert!(http.headers().contains_key("retry-after"));
    assert!(tailgate.cli(&["resume"]).contains("resumed"));
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        client.export(trace_request("late", late.spans.clone())).await.unwrap();
    });
}
