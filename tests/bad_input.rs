//! Bad input on both receivers gets the right status and message, and the receiver keeps
//! serving: nothing accepted before or after is affected, and the process is not restarted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use prost::Message;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A valid trace request whose span carries an attribute nested `depth` kvlists deep.
fn deeply_nested_request(depth: usize) -> Vec<u8> {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, KeyValueList, any_value};
    let mut value = AnyValue { value: Some(any_value::Value::StringValue("leaf".into())) };
    for _ in 0..depth {
        let pair = KeyValue { key: "k".into(), value: Some(value), ..Default::default() };
        value = AnyValue { value: Some(any_value::Value::KvlistValue(KeyValueList { values: vec![pair] })) };
    }
    let mut spans = TestTrace::new(7, Outcome::Error, 1).spans;
    spans[0].attributes.push(KeyValue { key: "deep".into(), value: Some(value), ..Default::default() });
    trace_request("checkout", spans).encode_to_vec()
}

/// A trace request whose root span name is not UTF-8.
fn invalid_utf8_request() -> Vec<u8> {
    let mut spans = TestTrace::new(8, Outcome::Error, 1).spans;
    spans[0].name = "NAME".into();
    let mut encoded = trace_request("checkout", spans).encode_to_vec();
    let at = encoded.windows(4).position(|w| w == b"NAME").unwrap();
    encoded[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0x80, 0x41]);
    encoded
}

fn valid_request(n: u32) -> Vec<u8> {
    trace_request("checkout", TestTrace::new(n, Outcome::Error, 2).spans).encode_to_vec()
}

/// Decoded `google.rpc.Status` message of an OTLP/HTTP protobuf error body.
fn status_message(body: &[u8]) -> String {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        message: String,
    }
    RpcStatus::decode(body).expect("error body is a google.rpc.Status").message
}

struct Case {
    name: &'static str,
    content_type: &'static str,
    encoding: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
}

#[test]
fn http_receiver_rejects_bad_input_and_keeps_serving() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let receive_pid = tailgate.stage_pid("receive").unwrap();
    let valid = valid_request(1);
    let cases = [
        Case {
            name: "garbage",
            content_type: "application/x-protobuf",
            encoding: None,
            body: b"\xff\xff\xff\xffnot protobuf".to_vec(),
            status: 400,
        },
        Case {
            name: "truncated",
            content_type: "application/x-protobuf",
            encoding: None,
            body: valid[..valid.len() - 7].to_vec(),
            status: 400,
        },
        Case {
            name: "wrong content type",
            content_type: "text/plain",
            encoding: None,
            body: valid.clone(),
            status: 415,
        },
        Case {
            name: "oversize",
            content_type: "application/x-protobuf",
            encoding: None,
            body: vec![0u8; 5 * 1024 * 1024],
            status: 413,
        },
        Case {
            name: "gzip that does not inflate",
            content_type: "application/x-protobuf",
            encoding: Some("gzip"),
            body: b"\x1f\x8b\x08\x00garbage-not-deflate".to_vec(),
            status: 400,
        },
        Case {
            name: "gzip bomb",
            content_type: "application/x-protobuf",
            encoding: Some("gzip"),
            body: gzip(&vec![0u8; 64 * 1024 * 1024]),
            status: 413,
        },
        Case {
            name: "malformed json",
            content_type: "application/json",
            encoding: None,
            body: b"{\"resourceSpans\": [".to_vec(),
            status: 400,
        },
        Case {
            name: "json that is not an object",
            content_type: "application/json",
            encoding: None,
            body: b"[]".to_vec(),
            status: 400,
        },
        Case {
            name: "nesting deeper than 32",
            content_type: "application/x-protobuf",
            encoding: None,
            body: deeply_nested_request(40),
            status: 400,
        },
        Case {
            name: "invalid utf-8",
            content_type: "application/x-protobuf",
            encoding: None,
            body: invalid_utf8_request(),
            status: 400,
        },
    ];
    // A server that answers 413 before reading the body closes that connection; use a fresh
    // connection per request so the follow-up checks the server, not connection reuse.
    let client = http_client().pool_max_idle_per_host(0).build().unwrap();
    runtime.block_on(async {
        for (index, case) in cases.iter().enumerate() {
            let mut request = client
                .post(format!("http://{}/v1/traces", tailgate.http))
                .header("content-type", case.content_type)
                .body(case.body.clone());
            if let Some(encoding) = case.encoding {
                request = request.header("content-encoding", encoding);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), case.status, "{}", case.name);
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            let body = response.bytes().await.unwrap();
            {
                let message = if case.content_type == "application/json" {
                    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    value["message"].as_str().unwrap().to_owned()
                } else {
                    assert_eq!(content_type.as_deref(), Some("application/x-protobuf"), "{}", case.name);
                    status_message(&body)
                };
                assert!(!message.is_empty(), "{}: empty error message", case.name);
            }
            // A good request right after is accepted.
            let ok = client
                .post(format!("http://{}/v1/traces", tailgate.http))
                .header("content-type", "application/x-protobuf")
                .body(valid_request(100 + index as u32))
                .send()
                .await
                .unwrap();
            assert_eq!(ok.status(), 200, "valid request after {}", case.name);
        }
    });
    assert_eq!(tailgate.stage_pid("receive"), Some(receive_pid), "receive restarted");
    // Every valid request that got 200 is delivered (all are error traces, so all are kept).
    let traces: Vec<TestTrace> = (0..cases.len() as u32).map(|i| TestTrace::new(100 + i, Outcome::Error, 2)).collect();
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), false);
}

/// Sends one raw gRPC frame over HTTP/2 and returns the grpc-status and grpc-message headers
/// (errors before any response message come back as a trailers-only response).
async fn grpc_raw(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    payload: &[u8],
    compressed: bool,
) -> (String, String) {
    let mut frame = vec![u8::from(compressed)];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    let mut request = client
        .post(format!("http://{addr}/opentelemetry.proto.collector.trace.v1.TraceService/Export"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(frame);
    if compressed {
        request = request.header("grpc-encoding", "gzip");
    }
    let response = request.send().await.unwrap();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (header("grpc-status"), header("grpc-message"))
}

#[test]
fn grpc_receiver_rejects_bad_input_and_keeps_serving() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let receive_pid = tailgate.stage_pid("receive").unwrap();
    let valid = valid_request(1);
    // (name, payload, compressed, expected grpc-status)
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("garbage", b"\xff\xff\xff\xffnot protobuf".to_vec(), false, "3"),
        ("truncated", valid[..valid.len() - 7].to_vec(), false, "3"),
        ("oversize", vec![0u8; 5 * 1024 * 1024], false, "8"),
        ("gzip that does not inflate", b"\x1f\x8b\x08\x00garbage-not-deflate".to_vec(), true, "3"),
        ("gzip bomb", gzip(&vec![0u8; 64 * 1024 * 1024]), true, "8"),
        ("nesting deeper than 32", deeply_nested_request(40), false, "3"),
        ("invalid utf-8", invalid_utf8_request(), false, "3"),
    ];
    let raw = http_client().http2_prior_knowledge().build().unwrap();
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        for (index, (name, payload, compressed, expected)) in cases.iter().enumerate() {
            let (status, message) = grpc_raw(&raw, tailgate.grpc, payload, *compressed).await;
            assert_eq!(&status, expected, "{name}: {message}");
            assert!(!message.is_empty(), "{name}: empty grpc-message");
            let request = trace_request("checkout", TestTrace::new(200 + index as u32, Outcome::Error, 2).spans);
            client.export(request).await.unwrap_or_else(|err| panic!("valid request after {name}: {err}"));
        }
    });
    assert_eq!(tailgate.stage_pid("receive"), Some(receive_pid), "receive restarted");
    let traces: Vec<TestTrace> = (0..cases.len() as u32).map(|i| TestTrace::new(200 + i, Outcome::Error, 2)).collect();
    assert_exact_delivery(&backend, &traces, Duration::from_secs(1), false);
}

/// Responses go uncompressed even to a client that accepts gzip (the OTLP export response is a
/// few bytes; compressing it cost a deflate state per request): the compressed request is
/// still read.
#[test]
fn grpc_responses_are_not_compressed() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let trace = TestTrace::new(300, Outcome::Error, 2);
    let payload = gzip(&prost::Message::encode_to_vec(&trace_request("checkout", trace.spans.clone())));
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    let raw = http_client().http2_prior_knowledge().build().unwrap();
    let (encoding, body) = runtime.block_on(async {
        let response = raw
            .post(format!("http://{}/opentelemetry.proto.collector.trace.v1.TraceService/Export", tailgate.grpc))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-encoding", "gzip")
            .header("grpc-accept-encoding", "gzip,identity")
            .body(frame)
            .send()
            .await
            .unwrap();
        let encoding = response.headers().get("grpc-encoding").map(|v| v.to_str().unwrap().to_owned());
        (encoding, response.bytes().await.unwrap())
    });
    assert_eq!(encoding, None, "the response was compressed");
    assert_eq!(body.first(), Some(&0u8), "the response frame is flagged compressed");
    assert_exact_delivery(&backend, &[trace], Duration::from_secs(1), false);
}

/// Spans of one request: trace `n` (an error, kept), two traces whose every span has an invalid
/// trace id (all zero; 8 bytes), and a fast trace whose root has no start time and an all-zero
/// parent id (accepted as a root, and not slow).
fn partly_invalid_spans(n: u32) -> (Vec<opentelemetry_proto::tonic::trace::v1::Span>, [TestTrace; 2]) {
    let kept = TestTrace::new(n, Outcome::Error, 2);
    let mut zero = TestTrace::new(n + 1, Outcome::Error, 1);
    let mut short = TestTrace::new(n + 2, Outcome::Error, 1);
    for span in &mut zero.spans {
        span.trace_id = vec![0; 16];
    }
    for span in &mut short.spans {
        span.trace_id = vec![1; 8];
    }
    let mut unset = TestTrace::new(n + 3, Outcome::Fast, 1);
    unset.spans[0].start_time_unix_nano = 0;
    unset.spans[0].parent_span_id = vec![0; 8];
    let spans = [&kept.spans, &zero.spans, &short.spans, &unset.spans].into_iter().flatten().cloned().collect();
    (spans, [kept, unset])
}

/// The partial success every transport must answer for [`partly_invalid_spans`]: the four spans
/// with invalid trace ids refused, named by the first one's path.
fn assert_partial(rejected: i64, message: &str, transport: &str) {
    assert_eq!(rejected, 4, "{transport}: {message}");
    let first = "4 spans rejected; the first: resource_spans[0].scope_spans[0].spans[3].trace_id: must not be all zero";
    assert_eq!(message, first, "{transport}");
}

#[test]
fn invalid_items_are_refused_alone_as_a_partial_success() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let receive_pid = tailgate.stage_pid("receive").unwrap();
    let mut expected = Vec::new();
    let http = http_client().build().unwrap();
    runtime.block_on(async {
        // gRPC.
        let (spans, traces) = partly_invalid_spans(300);
        expected.extend(traces);
        let mut client = TraceServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        let response = client.export(trace_request("checkout", spans)).await.unwrap().into_inner();
        let partial = response.partial_success.expect("gRPC: partial_success set");
        assert_partial(partial.rejected_spans, &partial.error_message, "gRPC");
        // A fully valid request: partial_success left unset, as the spec requires.
        let response = client.export(trace_request("checkout", TestTrace::new(310, Outcome::Error, 1).spans)).await;
        assert_eq!(response.unwrap().into_inner().partial_success, None);
        expected.push(TestTrace::new(310, Outcome::Error, 1));

        // OTLP/HTTP protobuf.
        let (spans, traces) = partly_invalid_spans(320);
        expected.extend(traces);
        let response = http
            .post(format!("http://{}/v1/traces", tailgate.http))
            .header("content-type", "application/x-protobuf")
            .body(trace_request("checkout", spans).encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = ExportTraceServiceResponse::decode(response.bytes().await.unwrap()).unwrap();
        let partial = body.partial_success.expect("HTTP protobuf: partial_success set");
        assert_partial(partial.rejected_spans, &partial.error_message, "HTTP protobuf");

        // OTLP/HTTP JSON.
        let (spans, traces) = partly_invalid_spans(340);
        expected.extend(traces);
        let response = http
            .post(format!("http://{}/v1/traces", tailgate.http))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&trace_request("checkout", spans)).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        let partial = &body["partialSuccess"];
        let rejected: i64 = partial["rejectedSpans"].as_str().expect("int64 as a string").parse().unwrap();
        assert_partial(rejected, partial["errorMessage"].as_str().unwrap(), "HTTP JSON");
    });
    assert_eq!(tailgate.stage_pid("receive"), Some(receive_pid), "receive restarted");
    // The valid spans of every request arrive; the fast trace without a start time is dropped.
    assert_exact_delivery(&backend, &expected, Duration::from_secs(2), false);
    let metrics = http_get(tailgate.telemetry, "/metrics").1;
    assert!(
        metrics.contains("tailgate_items_dropped_total{stage=\"receive\",reason=\"invalid_item\"} 12"),
        "refused spans are counted:\n{metrics}"
    );
}

/// One span with 100,000 attributes (the request well within the size limit): accepted, cut to
/// the default cap of 128 with the rest counted in `dropped_attributes_count`, delivered, and
/// the cut counted in the receive stage's metrics.
#[test]
fn a_span_with_100k_attributes_is_cut_to_the_cap() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let mut trace = TestTrace::new(400, Outcome::Error, 1);
    let mut spans = trace.spans.clone();
    spans[0].attributes = (0..100_000)
        .map(|i| KeyValue {
            key: format!("a{i}"),
            value: Some(AnyValue { value: Some(any_value::Value::IntValue(i)) }),
            ..Default::default()
        })
        .collect();
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        let response = client.export(trace_request("checkout", spans.clone())).await.unwrap().into_inner();
        assert_eq!(response.partial_success, None, "cut, not refused");
    });
    // Delivered as cut: the first 128 attributes, the rest counted as dropped.
    trace.spans[0].attributes = spans[0].attributes[..128].to_vec();
    trace.spans[0].dropped_attributes_count = 100_000 - 128;
    trace.spans[1] = spans[1].clone();
    assert_exact_delivery(&backend, std::slice::from_ref(&trace), Duration::from_secs(1), false);
    let counted = wait_until(Duration::from_secs(10), || {
        http_get(tailgate.telemetry, "/metrics")
            .1
            .contains("tailgate_errors_total{stage=\"receive\",kind=\"attributes_dropped\"} 99872")
    });
    assert!(counted, "the cut is counted:\n{}", http_get(tailgate.telemetry, "/metrics").1);
}

/// Log records refused alone: a record whose span id has the wrong length is counted in
/// `rejected_log_records` with its path, over gRPC and OTLP/HTTP JSON; its neighbours are taken.
#[test]
fn a_log_record_with_a_bad_id_is_refused_alone() {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (_backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let record = |line: &str, span_id: Vec<u8>| LogRecord {
        time_unix_nano: 1_700_000_000_000_000_000,
        severity_number: 17,
        body: Some(AnyValue { value: Some(any_value::Value::StringValue(line.into())) }),
        span_id,
        ..Default::default()
    };
    let request = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: vec![
                    record("fine", Vec::new()),
                    record("bad id", vec![1; 7]),
                    record("fine too", vec![2; 8]),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let expected = "1 log records rejected; the first: resource_logs[0].scope_logs[0].log_records[1].span_id: must be empty or 8 bytes, got 7";
    runtime.block_on(async {
        let mut client = LogsServiceClient::connect(format!("http://{}", tailgate.grpc)).await.unwrap();
        let partial = client.export(request.clone()).await.unwrap().into_inner().partial_success.unwrap();
        assert_eq!((partial.rejected_log_records, partial.error_message.as_str()), (1, expected));
        let response = http_client()
            .build()
            .unwrap()
            .post(format!("http://{}/v1/logs", tailgate.http))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&request).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["partialSuccess"]["rejectedLogRecords"], "1");
        assert_eq!(body["partialSuccess"]["errorMessage"], expected);
    });
    let taken = wait_until(Duration::from_secs(10), || {
        http_get(tailgate.telemetry, "/metrics")
            .1
            .lines()
            .any(|l| l == "tailgate_items_received_total{stage=\"receive\"} 4")
    });
    assert!(taken, "the two good records of each request are taken:\n{}", http_get(tailgate.telemetry, "/metrics").1);
}

/// Span times far in the past (1970) or far in the future (year 2508): kept as sent, judged by
/// their duration (slow and error traces kept, fast ones dropped), due by receive time, so none
/// waits for a wall clock to reach it or is decided before its spans arrive.
#[test]
fn timestamps_far_in_the_past_or_future_are_kept_as_sent_and_judged_by_duration() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (backend, backend_addr) = Backend::serve(&runtime);
    let tailgate = Tailgate::start(backend_addr, &Timing::default());
    let receive_pid = tailgate.stage_pid("receive").unwrap();
    let mut traces = Vec::new();
    for (n, outcome) in [Outcome::Slow, Outcome::Fast, Outcome::Error].into_iter().enumerate() {
        let n = n as u32;
        for (era, new_origin) in [(0, 1_000_000_000u64), (1, 17_000_000_000_000_000_000)] {
            let mut trace = TestTrace::new(500 + 10 * era + n, outcome, 2);
            let origin = trace.spans.iter().map(|s| s.start_time_unix_nano).min().unwrap();
            for span in &mut trace.spans {
                span.start_time_unix_nano = span.start_time_unix_nano - origin + new_origin;
                span.end_time_unix_nano = span.end_time_unix_nano - origin + new_origin;
            }
            traces.push(trace);
        }
    }
    runtime.block_on(send_in_waves(tailgate.grpc, tailgate.http, &traces, Duration::from_millis(100), |_| {}));
    assert_eq!(tailgate.stage_pid("receive"), Some(receive_pid), "receive restarted");
    assert_exact_delivery(&backend, &traces, Duration::from_secs(2), false);
}
