//! The load generator's backend: an OTLP/gRPC sink (traces, logs, metrics) and a Loki push
//! endpoint that count what they receive, cheaply enough not to be the bottleneck of what they
//! measure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::metrics::v1::metric;

#[derive(Clone, Default)]
struct Counts {
    spans: Arc<AtomicU64>,
    logs: Arc<AtomicU64>,
    points: Arc<AtomicU64>,
    loki_entries: Arc<AtomicU64>,
}

/// The count-only view of `ExportTraceServiceRequest` / `ExportLogsServiceRequest`: prost skips
/// every other field and keeps each span or record as a slice of the request, so counting costs
/// a walk of the framing, not a decode of every attribute (a full decode made the sink, not
/// tailgate, the bottleneck of the drain).
#[derive(Clone, PartialEq, prost::Message)]
struct CountRequest {
    #[prost(message, repeated, tag = "1")]
    resources: Vec<CountResource>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CountResource {
    /// `scope_spans` / `scope_logs`.
    #[prost(message, repeated, tag = "2")]
    scopes: Vec<CountScope>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CountScope {
    /// `spans` / `log_records`.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    items: Vec<bytes::Bytes>,
}

/// A signal the sink counts from the wire.
trait Counted: Send + Sync + 'static {
    const NAME: &'static str;
    fn counter(counts: &Counts) -> &AtomicU64;
}

struct CountedSpans;
impl Counted for CountedSpans {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    fn counter(counts: &Counts) -> &AtomicU64 {
        &counts.spans
    }
}

struct CountedLogs;
impl Counted for CountedLogs {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    fn counter(counts: &Counts) -> &AtomicU64 {
        &counts.logs
    }
}

/// The sink's trace or logs service: answers an empty `Export*ServiceResponse` (everything
/// accepted) after counting the items.
struct CountingService<S> {
    counts: Counts,
    signal: std::marker::PhantomData<fn() -> S>,
}

impl<S> Clone for CountingService<S> {
    fn clone(&self) -> Self {
        CountingService { counts: self.counts.clone(), signal: std::marker::PhantomData }
    }
}

impl<S: Counted> tonic::server::NamedService for CountingService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S: Counted> tonic::server::UnaryService<bytes::Bytes> for CountingService<S> {
    type Response = bytes::Bytes;
    type Future = std::future::Ready<Result<tonic::Response<bytes::Bytes>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<bytes::Bytes>) -> Self::Future {
        use prost::Message;
        std::future::ready(match CountRequest::decode(request.into_inner()) {
            Ok(parsed) => {
                let n: usize = parsed.resources.iter().flat_map(|r| &r.scopes).map(|s| s.items.len()).sum();
                S::counter(&self.counts).fetch_add(n as u64, Ordering::Relaxed);
                Ok(tonic::Response::new(bytes::Bytes::new()))
            }
            Err(err) => Err(tonic::Status::invalid_argument(err.to_string())),
        })
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for CountingService<S>
where
    S: Counted,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tailgate_stages::grpc_raw::RawCodec)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(64 << 20);
            Ok(grpc.unary(service, request).await)
        })
    }
}

#[tonic::async_trait]
impl MetricsService for Counts {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| match &m.data {
                Some(metric::Data::Sum(sum)) => sum.data_points.len(),
                Some(metric::Data::Gauge(gauge)) => gauge.data_points.len(),
                Some(metric::Data::Histogram(h)) => h.data_points.len(),
                Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
                Some(metric::Data::Summary(s)) => s.data_points.len(),
                None => 0,
            })
            .sum();
        self.points.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Counts the entries of Loki pushes (protobuf + snappy) and answers 204.
async fn loki_push(axum::extract::State(counts): axum::extract::State<Counts>, body: bytes::Bytes) -> http::StatusCode {
    use prost::Message;
    let Ok(raw) = snap::raw::Decoder::new().decompress_vec(&body) else { return http::StatusCode::BAD_REQUEST };
    let Ok(push) = tailgate_stages::export::loki::proto::PushRequest::decode(raw.as_slice()) else {
        return http::StatusCode::BAD_REQUEST;
    };
    let entries: usize = push.streams.iter().map(|s| s.entries.len()).sum();
    counts.loki_entries.fetch_add(entries as u64, Ordering::Relaxed);
    http::StatusCode::NO_CONTENT
}

pub(crate) async fn sink(listen: &str, duration: u64, loki_listen: Option<String>) -> anyhow::Result<()> {
    let counts = Counts::default();
    if let Some(loki) = loki_listen {
        let listener = tokio::net::TcpListener::bind(&loki).await?;
        let app = axum::Router::new()
            .route("/loki/api/v1/push", axum::routing::post(loki_push))
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(counts.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    let addr = listen.parse()?;
    let stop = async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(duration)) => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(CountingService::<CountedSpans> { counts: counts.clone(), signal: std::marker::PhantomData })
        .add_service(CountingService::<CountedLogs> { counts: counts.clone(), signal: std::marker::PhantomData })
        .add_service(
            MetricsServiceServer::new(counts.clone())
                .max_decoding_message_size(64 << 20)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        )
        .serve_with_shutdown(addr, stop)
        .await?;
    println!(
        "sink received: spans {}, log records {}, metric data points {}, loki entries {}",
        counts.spans.load(Ordering::Relaxed),
        counts.logs.load(Ordering::Relaxed),
        counts.points.load(Ordering::Relaxed),
        counts.loki_entries.load(Ordering::Relaxed)
    );
    Ok(())
}
