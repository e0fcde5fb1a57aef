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

/// Which answers are final. OTLP names INVALID_ARGUMENT-like codes as permanent; everything
/// else is retried with backoff and the batch stays queued:
/// - UNKNOWN and INTERNAL are what tonic reports for transport failures (connection reset,
///   broken pipe, a stream cut without grpc-status), and what storage backends answer for
///   transient faults: dropping on them would empty the queue over a flaky link;
/// - UNAUTHENTICATED and PERMISSION_DENIED are configuration mistakes: hold the backlog and
///   log, rather than discard it until an operator fixes the credentials;
/// - RESOURCE_EXHAUSTED is final only without RetryInfo (a size or quota refusal).
pub fn classify(status: &tonic::Status) -> SendOutcome {
    let message = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::Unimplemented => SendOutcome::Permanent(message),
        Code::ResourceExhausted if status.details().is_empty() => SendOutcome::Permanent(message),
        _ => SendOutcome::Retryable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_and_auth_problems_are_retried() {
        for code in [Code::Unknown, Code::Internal, Code::Unavailable, Code::DeadlineExceeded, Code::Unauthenticated] {
            assert!(matches!(classify(&tonic::Status::new(code, "x")), SendOutcome::Retryable(_)), "{code:?}");
        }
        for code in [Code::InvalidArgument, Code::Unimplemented, Code::ResourceExhausted] {
            assert!(matches!(classify(&tonic::Status::new(code, "x")), SendOutcome::Permanent(_)), "{code:?}");
        }
        let throttled =
            tonic::Status::with_details(Code::ResourceExhausted, "slow down", bytes::Bytes::from_static(b"x"));
        assert!(matches!(classify(&throttled), SendOutcome::Retryable(_)));
    }
}
