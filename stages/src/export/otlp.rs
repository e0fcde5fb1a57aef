//! OTLP/gRPC client sending pre-assembled request bytes (no prost encode on the way out), and
//! the OTLP retry rules: which answers are retried, which are final.

use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use tailgate_config::{Compression, OtlpExporter};
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use crate::grpc_raw::RawCodec;
use crate::otlp_wire::{self, Signal};

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The backend took the request; `rejected` items were refused by it (partial success).
    Accepted {
        /// Items the backend reported as rejected.
        rejected: u64,
        /// Its explanation, if any.
        message: String,
    },
    /// Worth another attempt later (unavailable, deadline, throttled...).
    Retryable(String),
    /// The backend will never take this request (invalid argument, too large...): drop it.
    Permanent(String),
}

/// An OTLP/gRPC destination.
#[derive(Debug, Clone)]
pub struct OtlpClient {
    channel: Channel,
    path: PathAndQuery,
    timeout: Duration,
    gzip: bool,
}

impl OtlpClient {
    /// A lazily connecting client for `signal` at the configured endpoint.
    pub fn new(config: &OtlpExporter, signal: Signal) -> Result<OtlpClient, String> {
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|err| format!("bad endpoint {}: {err}", config.endpoint))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .tcp_nodelay(true);
        let path = match signal {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        };
        Ok(OtlpClient {
            channel: endpoint.connect_lazy(),
            path: PathAndQuery::from_static(path),
            timeout: config.timeout,
            gzip: config.compression == Compression::Gzip,
        })
    }

    /// Sends one encoded `Export*ServiceRequest`.
    pub async fn send(&self, request: Bytes) -> SendOutcome {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if self.gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc = grpc.accept_compressed(CompressionEncoding::Gzip);
        if let Err(err) = grpc.ready().await {
            return SendOutcome::Retryable(format!("connect: {err}"));
        }
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.timeout);
        match grpc.unary(request, self.path.clone(), RawCodec).await {
            Ok(response) => match otlp_wire::parse_partial_success(response.get_ref()) {
                Ok((rejected, message)) => SendOutcome::Accepted { rejected: rejected.max(0) as u64, message },
                // The data was accepted; only the optional detail is unreadable.
                Err(_) => SendOutcome::Accepted { rejected: 0, message: String::new() },
            },
            Err(status) => classify(&status),
        }
    }
}

/// OTLP/gRPC retry rules: these codes are transient; every other one is final.
/// RESOURCE_EXHAUSTED is transient only when the server says when to retry (RetryInfo).
pub fn classify(status: &tonic::Status) -> SendOutcome {
    let message = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => SendOutcome::Retryable(message),
        Code::ResourceExhausted if !status.details().is_empty() => SendOutcome::Retryable(message),
        _ => SendOutcome::Permanent(message),
    }
}
