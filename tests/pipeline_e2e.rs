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
    assert!(wait_until(Duration::from_secs(10), || stage_pids(tailgate.pid()).len() == 5));
    let pids = stage_pids(tailgate.pid());
    let mut names: Vec<&str> = pids.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["export", "log_mirror", "receive", "spanmetrics", "tail_sample"]);
    // A stage names itself first thing after exec; a just-started one may not have yet.
    let comm = |pid: &u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let named = || pids.iter().all(|(stage, pid)| comm(pid).trim() == format!("tg-{stage}"));
    assert!(
        wait_until(Duration::from_secs(5), named),
        "{:?}",
        pids.iter().map(|(s, p)| (s, comm(p))).collect::<Vec<_>>()
    );
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The OTLP/JSON form of a span, as the OTLP spec writes it (hex ids, string int64s).
fn span_json(span: &opentelemetry_proto::tonic::trace::v1::Span) -> serde_json::Value {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let attributes: Vec<serde_json::Value> = span
        .attributes
        .iter()
        .map(|kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => serde_json::json!({"key": kv.key, "value": {"stringValue": s}}),
            other => panic!("test spans carry string attributes only, got {other:?}"),
        })
        .collect();
    let mut json = serde_json::json!({
        "traceId": hex(&span.trace_id),
        "spanId": hex(&span.span_id),
        "name": span.name,
        "kind": span.kind,
        "startTimeUnixNano": span.start_time_unix_nano.to_string(),
        "endTimeUnixNano": span.end_time_unix_nano.to_string(),
        "attributes": attributes,
    });
    if !span.parent_span_id.is_empty() {
        json["parentSpanId"] = serde_json::json!(hex(&span.parent_span_id));
    }
    if let Some(status) = &span.status {
        json["status"] = serde_json::json!({"code": status.code, "message": status.message});
    }
    json
}

#[test]
fn json_and_gzip_requests_are_delivered_unaltered() {
    use std::io::Write;

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use prost::Message;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    // Each transport (index % 3) carries one error, one slow and one fast trace.
    let traces: Vec<TestTrace> = (0..9)
        .map(|n| TestTrace::new(300 + n, [Outcome::Error, Outcome::Slow, Outcome::Fast][(n / 3) as usize], 2))
        .collect();
    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    };
    runtime.block_on(async {
        let http = http_client().build().unwrap();
        for (index, trace) in traces.iter().enumerate() {
            match index % 3 {
                // OTLP/HTTP JSON.
                0 => {
                    let spans: Vec<serde_json::Value> = trace.spans.iter().map(span_json).collect();
                    let body = serde_json::json!({"resourceSpans": [{
                        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json"}}]},
                        "scopeSpans": [{"scope": {"name": "tailgate-tests", "version": "1"}, "spans": spans}]
                    }]});
                    let response = http
                        .post(format!("http://{}/v1/traces", tailgate.http))
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    assert_eq!(response.headers()["content-type"], "application/json");
                }
                // OTLP/HTTP protobuf, gzip.
                1 => {
                    let body = gzip(&trace_request("gzip-http", trace.spans.clone()).encode_to_vec());
                    let response = http
                        .post(format!("http://{}/v1/traces", tailgate.http))
                        .header("content-type", "application/x-protobuf")
                        .header("content-encoding", "gzip")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                }
                // OTLP/gRPC, gzip.
                _ => {
                    let mut client = TraceServiceClient::connect(format!("http://{}", tailgate.grpc))
                        .await
                        .unwrap()
                        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
                    client.export(trace_request("gzip-grpc", trace.spans.clone())).await.unwrap();
                }
            }
        }
    });
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), false);
}
