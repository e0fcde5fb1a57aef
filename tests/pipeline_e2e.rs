//! End to end through the real binary: OTLP traces with known outcomes (errors, slow, fast
//! successes; several spans each, spread over several requests and over time, over gRPC and
//! HTTP) go in; exactly the spans of the error and slow traces come out at the OTLP backend,
//! complete, unaltered and each once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::time::Duration;

use common::*;

#[test]
fn delivers_exactly_the_kept_traces() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let traces = mixed_traces(90);
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(300), |_| {}));
    assert_exact_delivery(&backend, &traces, Duration::from_secs(3), false);
    // Resource and scope travel with the spans.
    let received = backend.received.lock().unwrap();
    let services: std::collections::BTreeSet<String> = received
        .traces
        .iter()
        .flat_map(|r| r.resource_spans.iter())
        .filter_map(|rs| rs.resource.as_ref())
        .flat_map(|r| r.attributes.iter())
        .filter(|kv| kv.key == "service.name")
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(services, ["checkout".to_string(), "payments".to_string()].into_iter().collect());
}

#[test]
fn six_named_processes_serve_both_ports() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let mut tailgate = Tailgate::start(backend_addr, &Timing::default());
    let pids = stage_pids(tailgate.pid());
    let mut names: Vec<&str> = pids.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["export", "log_mirror", "receive", "spanmetrics", "tail_sample"]);
    for (stage, pid) in &pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim(), format!("tg-{stage}"));
    }
    let status = tailgate.stop();
    assert!(status.success(), "supervisor exit: {status:?}");
    for pid in pids.values() {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap().is_empty(),
            "stage {pid} outlived the supervisor"
        );
    }
}
