//! The demo's stand-in backends on loopback: an OTLP/gRPC endpoint (traces, logs, metrics), a
//! Loki push endpoint (snappy protobuf `PushRequest`) and a Prometheus remote-write endpoint
//! (snappy `WriteRequest`). Each keeps what it needs to check a run against the generator's
//! ground truth: every span and log line by id with how often it arrived, the latest value of
//! every span-metrics `calls` series, and the trace id of every exemplar. A switch cuts them all
//! off (gRPC UNAVAILABLE, HTTP 503), as an uplink outage looks to the exporters.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use tailgate_stages::export::loki::proto::PushRequest;
use tailgate_stages::export::prometheus::proto::WriteRequest;

/// A span or log line's identity: (trace id, span id).
pub type ItemId = ([u8; 16], [u8; 8]);

/// The span-metrics counter whose series sum to the spans counted.
const CALLS: &str = "traces_span_metrics_calls_total";

/// What the sinks received.
#[derive(Debug, Default)]
pub struct Received {
    /// Spans by id, with how many times each arrived.
    pub spans: HashMap<ItemId, u32>,
    /// Log lines (Loki entries) by the trace and span they name, with arrivals.
    pub log_lines: HashMap<ItemId, u32>,
    /// Loki entries that named no trace.
    pub untraced_lines: u64,
    /// Newest sample (timestamp, value) of each `calls` series (by its label set).
    pub calls: HashMap<String, (i64, f64)>,
    /// Exemplars received: (trace id, how many).
    pub exemplars: HashMap<[u8; 16], u64>,
    /// Requests answered with an error while cut off.
    pub refused_while_cut: u64,
}

impl Received {
    /// Trace ids of the received spans.
    pub fn trace_ids(&self) -> HashSet<[u8; 16]> {
        self.spans.keys().map(|(trace, _)| *trace).collect()
    }

    /// Spans counted by the span metrics so far.
    pub fn spans_counted(&self) -> f64 {
        self.calls.values().fold(0.0, |sum, (_, calls)| sum + calls)
    }
}

#[derive(Debug, Default)]
struct Shared {
    cut: AtomicBool,
    requests: AtomicU64,
    received: Mutex<Received>,
}

impl Shared {
    fn received(&self) -> MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the sinks are cut off; counts the refusal.
    fn refuse(&self) -> bool {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let cut = self.cut.load(Ordering::Relaxed);
        if cut {
            self.received().refused_while_cut += 1;
        }
        cut
    }
}

/// The running sinks.
#[derive(Debug, Clone)]
pub struct Sinks {
    shared: Arc<Shared>,
    /// OTLP/gRPC address (traces, logs, metrics).
    pub otlp: SocketAddr,
    /// Loki push address (`/loki/api/v1/push`).
    pub loki: SocketAddr,
    /// Remote-write address (`/api/v1/write`).
    pub remote_write: SocketAddr,
}

impl Sinks {
    /// Binds the three endpoints on loopback ports the system picks and serves them.
    pub async fn start() -> std::io::Result<Sinks> {
        let shared = Arc::new(Shared::default());
        let otlp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let loki_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let loki_app: axum::Router<Arc<Shared>> =
            axum::Router::new().route("/loki/api/v1/push", axum::routing::post(loki_push));
        let write_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let write_app: axum::Router<Arc<Shared>> =
            axum::Router::new().route("/api/v1/write", axum::routing::post(remote_write));
        let sinks = Sinks {
            shared: shared.clone(),
            otlp: otlp_listener.local_addr()?,
            loki: loki_listener.local_addr()?,
            remote_write: write_listener.local_addr()?,
        };
        for (listener, app) in [(loki_listener, loki_app), (write_listener, write_app)] {
            let app = app.layer(axum::extract::DefaultBodyLimit::max(64 << 20)).with_state(shared.clone());
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        let service = Otlp(shared);
        let incoming = tonic::transport::server::TcpIncoming::from(otlp_listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service.clone()).max_decoding_message_size(64 << 20))
                .add_service(LogsServiceServer::new(service.clone()).max_decoding_message_size(64 << 20))
                .add_service(MetricsServiceServer::new(service).max_decoding_message_size(64 << 20))
                .serve_with_incoming(incoming),
        );
        Ok(sinks)
    }

    /// Cuts the sinks off (every request refused) or brings them back.
    pub fn set_cut(&self, cut: bool) {
        self.shared.cut.store(cut, Ordering::Relaxed);
    }

    /// Whether they are cut off.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::Relaxed)
    }

    /// Requests they got, answered or refused.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Reads what arrived so far.
    pub fn with_received<T>(&self, read: impl FnOnce(&Received) -> T) -> T {
        read(&self.shared.received())
    }
}

fn id_of(trace_id: &[u8], span_id: &[u8]) -> Option<ItemId> {
    Some((trace_id.try_into().ok()?, span_id.try_into().ok()?))
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * index..2 * index + 2)?, 16).ok()?;
    }
    Some(out)
}

#[derive(Debug, Clone)]
struct Otlp(Arc<Shared>);

fn unavailable() -> tonic::Status {
    tonic::Status::unavailable("demo sink cut off")
}

#[tonic::async_trait]
impl TraceService for Otlp {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.refuse() {
            return Err(unavailable());
        }
        let mut received = self.0.received();
        for span in request.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
            if let Some(id) = id_of(&span.trace_id, &span.span_id) {
                *received.spans.entry(id).or_default() += 1;
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Otlp {
    async fn export(
        &self,
        _request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        // The demo sends logs to the Loki sink; OTLP logs are taken and not checked.
        if self.0.refuse() {
            return Err(unavailable());
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Otlp {
    async fn export(
        &self,
        _request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        if self.0.refuse() {
            return Err(unavailable());
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Loki's push API: snappy-compressed `logproto.PushRequest`.
async fn loki_push(State(shared): State<Arc<Shared>>, body: bytes::Bytes) -> (StatusCode, String) {
    if shared.refuse() {
        return (StatusCode::SERVICE_UNAVAILABLE, "demo sink cut off".into());
    }
    let push = match snap::raw::Decoder::new().decompress_vec(&body).map(|raw| PushRequest::decode(raw.as_slice())) {
        Ok(Ok(push)) => push,
        _ => return (StatusCode::BAD_REQUEST, "not a snappy-compressed PushRequest".into()),
    };
    let mut received = shared.received();
    for entry in push.streams.iter().flat_map(|stream| &stream.entries) {
        let metadata = |name: &str| entry.structured_metadata.iter().find(|m| m.name == name).map(|m| m.value.as_str());
        let id = match (metadata("trace_id"), metadata("span_id")) {
            (Some(trace), Some(span)) => unhex::<16>(trace).zip(unhex::<8>(span)),
            _ => None,
        };
        match id {
            Some(id) => *received.log_lines.entry(id).or_default() += 1,
            None => received.untraced_lines += 1,
        }
    }
    (StatusCode::NO_CONTENT, String::new())
}

/// Prometheus remote write 1.0: snappy-compressed `prometheus.WriteRequest`.
async fn remote_write(State(shared): State<Arc<Shared>>, body: bytes::Bytes) -> (StatusCode, String) {
    if shared.refuse() {
        return (StatusCode::SERVICE_UNAVAILABLE, "demo sink cut off".into());
    }
    let write = match snap::raw::Decoder::new().decompress_vec(&body).map(|raw| WriteRequest::decode(raw.as_slice())) {
        Ok(Ok(write)) => write,
        _ => return (StatusCode::BAD_REQUEST, "not a snappy-compressed WriteRequest".into()),
    };
    let mut received = shared.received();
    for series in &write.timeseries {
        let name = series.labels.iter().find(|l| l.name == "__name__").map(|l| l.value.as_str());
        if name == Some(CALLS)
            && let Some(latest) = series.samples.iter().max_by_key(|s| s.timestamp)
        {
            let key: Vec<String> = series.labels.iter().map(|l| format!("{}={}", l.name, l.value)).collect();
            // Requests may arrive out of order (retries): an older sample never replaces a newer.
            let slot = received.calls.entry(key.join(",")).or_insert((i64::MIN, 0.0));
            if latest.timestamp >= slot.0 {
                *slot = (latest.timestamp, latest.value);
            }
        }
        for exemplar in &series.exemplars {
            if let Some(trace) =
                exemplar.labels.iter().find(|l| l.name == "trace_id").and_then(|l| unhex::<16>(&l.value))
            {
                *received.exemplars.entry(trace).or_default() += 1;
            }
        }
    }
    (StatusCode::NO_CONTENT, String::new())
}

#[cfg(test)]
mod tests {
    use super::unhex;

    #[test]
    fn hex_ids_are_read_exactly() {
        assert_eq!(unhex::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(unhex::<2>("0aF"), None);
        assert_eq!(unhex::<2>("zz00"), None);
    }
}
