//! Synthetic traces with a known sampling outcome, sending them in waves over both receivers,
//! and the exact-delivery check against what the backend received.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};

use super::*;

/// The span attribute naming the sampling policy that kept a span's trace.
pub const POLICY_ATTRIBUTE: &str = "tailgate.sampling.policy";

/// How a synthetic trace should come out of sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A child span in ERROR status: kept.
    Error,
    /// The root lasts 350 ms: kept.
    Slow,
    /// Everything under 200 ms and OK: dropped.
    Fast,
}

/// A synthetic trace: a root and `children` child spans.
#[derive(Debug, Clone)]
pub struct TestTrace {
    pub trace_id: [u8; 16],
    pub outcome: Outcome,
    pub spans: Vec<Span>,
}

impl TestTrace {
    /// Builds trace number `n` with the given outcome and `children` child spans.
    pub fn new(n: u32, outcome: Outcome, children: u32) -> TestTrace {
        let mut trace_id = [0u8; 16];
        trace_id[..4].copy_from_slice(&n.to_be_bytes());
        trace_id[15] = 0x7a;
        let start = 1_700_000_000_000_000_000u64 + u64::from(n) * 1_000_000_000;
        let root_id = span_id(n, 0);
        let root_len = if outcome == Outcome::Slow { 350_000_000 } else { 120_000_000 };
        let mut spans = vec![Span {
            trace_id: trace_id.to_vec(),
            span_id: root_id.to_vec(),
            name: format!("GET /item/{}", n % 5),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + root_len,
            attributes: vec![string_kv("http.route", "/item/{id}")],
            status: Some(Status { code: status::StatusCode::Ok as i32, message: String::new() }),
            ..Default::default()
        }];
        for c in 1..=children {
            let failed = outcome == Outcome::Error && c == children;
            spans.push(Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id(n, c).to_vec(),
                parent_span_id: root_id.to_vec(),
                name: format!("db.query {c}"),
                kind: span::SpanKind::Client as i32,
                start_time_unix_nano: start + u64::from(c) * 1_000_000,
                end_time_unix_nano: start + u64::from(c) * 1_000_000 + 20_000_000,
                status: failed.then(|| Status { code: status::StatusCode::Error as i32, message: "timeout".into() }),
                ..Default::default()
            });
        }
        TestTrace { trace_id, outcome, spans }
    }

    /// Whether sampling must keep it.
    pub fn kept(&self) -> bool {
        self.outcome != Outcome::Fast
    }
}

fn span_id(n: u32, c: u32) -> [u8; 8] {
    let mut id = [0u8; 8];
    id[..4].copy_from_slice(&n.to_be_bytes());
    id[4..].copy_from_slice(&(c + 1).to_be_bytes());
    id
}

pub fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

/// An OTLP request holding `spans` for service `service`.
pub fn trace_request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource { attributes: vec![string_kv("service.name", service)], ..Default::default() }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tailgate-tests".into(),
                    version: "1".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Sends the traces' spans in `waves` requests per trace spread over time: every span of a
/// trace goes out in a different wave than its neighbours (children first, root later, the
/// last child after the root), alternating gRPC and OTLP/HTTP protobuf clients. `between(w)`
/// runs after wave `w`.
pub async fn send_in_waves(
    grpc: SocketAddr,
    http: SocketAddr,
    traces: &[TestTrace],
    gap: Duration,
    mut between: impl FnMut(usize),
) {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use prost::Message;
    let http_client = http_client().build().unwrap();
    // Wave of each span: children 0..k-1 in wave i % 3, root one wave later, last child after it.
    let waves = 5;
    for wave in 0..waves {
        let mut grpc_spans = Vec::new();
        let mut http_spans = Vec::new();
        for (index, trace) in traces.iter().enumerate() {
            // Decoupled from the outcome (n % 3) so every wave mixes kept and dropped traces.
            let base = (index / 2) % 3;
            let count = trace.spans.len();
            for (position, span) in trace.spans.iter().enumerate() {
                let span_wave = match position {
                    0 => base + 1,
                    p if p == count - 1 && count > 2 => base + 2,
                    _ => base,
                };
                if span_wave == wave {
                    if index % 2 == 0 { grpc_spans.push(span.clone()) } else { http_spans.push(span.clone()) }
                }
            }
        }
        if !grpc_spans.is_empty() {
            let request = trace_request("checkout", grpc_spans);
            retry_send(|| {
                let request = request.clone();
                async move {
                    let mut client =
                        TraceServiceClient::connect(format!("http://{grpc}")).await.map_err(|e| e.to_string())?;
                    client.export(request).await.map(|_| ()).map_err(|e| e.to_string())
                }
            })
            .await;
        }
        if !http_spans.is_empty() {
            let body = trace_request("payments", http_spans).encode_to_vec();
            retry_send(|| {
                let request = http_client
                    .post(format!("http://{http}/v1/traces"))
                    .header("content-type", "application/x-protobuf")
                    .body(body.clone());
                async move {
                    let response = request.send().await.map_err(|e| e.to_string())?;
                    if response.status() == 200 { Ok(()) } else { Err(format!("status {}", response.status())) }
                }
            })
            .await;
        }
        between(wave);
        tokio::time::sleep(gap).await;
    }
}

/// Retries a send the way an OTLP exporter does while the receiver restarts (connection refused,
/// UNAVAILABLE): up to 100 times, 200 ms apart. Tests that require exactly-once delivery never
/// kill receive in the middle of a request, so a retry there cannot duplicate.
async fn retry_send<F, Fut>(mut send: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut last = String::new();
    for _ in 0..100 {
        match send().await {
            Ok(()) => return,
            Err(err) => last = err,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("send kept failing: {last}");
}

/// (trace id, span id) of every span of the traces sampling must keep.
pub fn expected_spans(traces: &[TestTrace]) -> HashMap<([u8; 16], [u8; 8]), Span> {
    traces
        .iter()
        .filter(|t| t.kept())
        .flat_map(|t| t.spans.iter())
        .map(|s| ((s.trace_id.clone().try_into().unwrap(), s.span_id.clone().try_into().unwrap()), s.clone()))
        .collect()
}

/// A mix of error, slow and fast traces with 2..=4 children each.
pub fn mixed_traces(count: u32) -> Vec<TestTrace> {
    (0..count)
        .map(|n| {
            let outcome = match n % 3 {
                0 => Outcome::Error,
                1 => Outcome::Slow,
                _ => Outcome::Fast,
            };
            TestTrace::new(n, outcome, 2 + n % 3)
        })
        .collect()
}

/// Waits for the backend to hold every expected span, then long enough for any extra or
/// duplicate delivery to show, and asserts the delivered set is exact.
pub fn assert_exact_delivery(backend: &Backend, traces: &[TestTrace], settle: Duration, allow_resend: bool) {
    let expected = expected_spans(traces);
    let arrived = wait_until(Duration::from_secs(60), || {
        let got = backend.spans();
        expected.keys().all(|k| got.contains_key(k))
    });
    std::thread::sleep(settle);
    let got = backend.spans();
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        arrived && missing.is_empty(),
        "{} of {} kept spans missing: {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(extra.is_empty(), "{} spans of dropped traces delivered: {:?}", extra.len(), &extra[..extra.len().min(5)]);
    // Every kept span says why: errors for an error trace, slow for a slow one.
    let policies = backend.policies();
    for trace in traces.iter().filter(|t| t.kept()) {
        let reason = if trace.outcome == Outcome::Error { "errors" } else { "slow" };
        for span in &trace.spans {
            let key = (trace.trace_id, span.span_id.clone().try_into().unwrap());
            assert_eq!(
                policies.get(&key).map(String::as_str),
                Some(reason),
                "span {key:?}: wrong or no policy recorded"
            );
        }
    }
    for (key, (span, times)) in &got {
        assert_eq!(span, &expected[key], "span delivered altered");
        if !allow_resend {
            assert_eq!(*times, 1, "span {key:?} delivered {times} times");
        }
    }
}
