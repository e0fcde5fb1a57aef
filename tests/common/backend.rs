//! The OTLP backend of the multi-process tests: records every request it receives (traces,
//! logs, metrics) and can be told to fail the next ones.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;

use super::*;

/// What the test backend received.
#[derive(Default)]
pub struct Received {
    pub traces: Vec<ExportTraceServiceRequest>,
    pub logs: Vec<ExportLogsServiceRequest>,
    pub metrics: Vec<ExportMetricsServiceRequest>,
    /// Answer the next this-many trace requests with UNAVAILABLE.
    pub fail_next_traces: u32,
    /// When each trace request in `traces` arrived.
    pub trace_arrivals: Vec<Instant>,
    /// When each trace request was answered, taken or not.
    pub trace_attempts: Vec<Instant>,
    /// Refuse every trace request holding a span of this name, with this code.
    pub poison: Option<(String, tonic::Code)>,
}

/// An OTLP/gRPC backend (standing in for Jaeger / a Collector) built from the official
/// generated service definitions, recording every request.
#[derive(Clone, Default)]
pub struct Backend {
    pub received: Arc<Mutex<Received>>,
}

#[tonic::async_trait]
impl TraceService for Backend {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.received.lock().unwrap();
        received.trace_attempts.push(Instant::now());
        if let Some((name, code)) = &received.poison {
            let request = request.get_ref();
            let spans = request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans);
            if spans.clone().any(|span| &span.name == name) {
                return Err(tonic::Status::new(*code, "poisoned request"));
            }
        }
        if received.fail_next_traces > 0 {
            received.fail_next_traces -= 1;
            return Err(tonic::Status::unavailable("backend restarting"));
        }
        received.traces.push(request.into_inner());
        received.trace_arrivals.push(Instant::now());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Backend {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().logs.push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Backend {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.received.lock().unwrap().metrics.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Backend {
    /// Serves the backend on a free loopback port from the given runtime.
    pub fn serve(runtime: &tokio::runtime::Runtime) -> (Backend, SocketAddr) {
        Backend::serve_at(runtime, "127.0.0.1:0".parse().unwrap())
    }

    /// Serves the backend on `addr` (a port chosen earlier, e.g. for a backend that comes up late).
    pub fn serve_at(runtime: &tokio::runtime::Runtime, addr: SocketAddr) -> (Backend, SocketAddr) {
        Backend::serve_limited(runtime, addr, 64 << 20)
    }

    /// Serves the backend refusing trace requests over `max_message_bytes` (tonic answers
    /// OUT_OF_RANGE, as for any server's message size limit).
    pub fn serve_limited(
        runtime: &tokio::runtime::Runtime,
        addr: SocketAddr,
        max_message_bytes: usize,
    ) -> (Backend, SocketAddr) {
        Backend::serve_with(runtime, addr, max_message_bytes, None)
    }

    /// Serves the backend over TLS with this server identity (PEM certificate and key), asking
    /// for a client certificate from `client_ca` when given.
    pub fn serve_tls(
        runtime: &tokio::runtime::Runtime,
        identity: (&str, &str),
        client_ca: Option<&str>,
    ) -> (Backend, SocketAddr) {
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(identity.0, identity.1));
        if let Some(ca) = client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        Backend::serve_with(runtime, "127.0.0.1:0".parse().unwrap(), 64 << 20, Some(tls))
    }

    fn serve_with(
        runtime: &tokio::runtime::Runtime,
        addr: SocketAddr,
        max_message_bytes: usize,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> (Backend, SocketAddr) {
        let backend = Backend::default();
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        let service = backend.clone();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).unwrap();
        }
        runtime.spawn(async move {
            server
                .add_service(
                    TraceServiceServer::new(service.clone())
                        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                        .max_decoding_message_size(max_message_bytes),
                )
                .add_service(LogsServiceServer::new(service.clone()))
                .add_service(MetricsServiceServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        (backend, addr)
    }

    /// Every span received, keyed by (trace id, span id), with how often it arrived.
    /// Every span received, by (trace id, span id), as sent by the client: without the
    /// `tailgate.sampling.policy` attribute tailgate adds (see [`Backend::policies`]); with the
    /// number of times it arrived.
    pub fn spans(&self) -> HashMap<([u8; 16], [u8; 8]), (Span, usize)> {
        let mut out: HashMap<([u8; 16], [u8; 8]), (Span, usize)> = HashMap::new();
        for request in &self.received.lock().unwrap().traces {
            for resource in &request.resource_spans {
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        let key = (span.trace_id.clone().try_into().unwrap(), span.span_id.clone().try_into().unwrap());
                        let mut sent = span.clone();
                        sent.attributes.retain(|kv| kv.key != POLICY_ATTRIBUTE);
                        out.entry(key).or_insert_with(|| (sent, 0)).1 += 1;
                    }
                }
            }
        }
        out
    }

    /// The policy tailgate recorded as the reason each received span's trace was kept.
    pub fn policies(&self) -> HashMap<([u8; 16], [u8; 8]), String> {
        let mut out = HashMap::new();
        for request in &self.received.lock().unwrap().traces {
            for span in request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
                let policy = span.attributes.iter().find(|kv| kv.key == POLICY_ATTRIBUTE).and_then(|kv| {
                    match kv.value.as_ref()?.value.as_ref()? {
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(name) => {
                            Some(name.clone())
                        }
                        _ => None,
                    }
                });
                if let Some(policy) = policy {
                    let key = (span.trace_id.clone().try_into().unwrap(), span.span_id.clone().try_into().unwrap());
                    out.insert(key, policy);
                }
            }
        }
        out
    }
}
