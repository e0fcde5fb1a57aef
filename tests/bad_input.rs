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
    ];
    // A server that answers 413 before reading the body closes that connection; use a fresh
    // connection per request so the follow-up checks the server, not connection reuse.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
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
            if case.status != 413 || case.encoding.is_some() {
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
    ];
    let raw = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
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
    let raw = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
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
