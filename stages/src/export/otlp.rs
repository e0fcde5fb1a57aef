//! OTLP/gRPC client sending pre-assembled request bytes (no prost encode on the way out), and
//! the OTLP retry rules: which answers are retried, which are final.
//!
//! Dead connections: a request that times out is never retried on the connection it went out
//! on. Over a link that silently drops packets, its bytes still sit in the TCP send queue, and a
//! retry on the same connection would queue behind them: when the link returns both copies
//! arrive (duplicates), and only after TCP's retransmission backoff (tens of seconds). So on a
//! timeout or transport failure the client aborts every connection it opened (the socket closes
//! with zero linger: a reset that discards the unsent copy) and the retry opens a fresh one.
//! HTTP/2 keepalive pings find a dead link while nothing is being sent.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use tailgate_config::{Compression, OtlpExporter};
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};

use crate::grpc_raw::{RawCodec, retry_delay, retry_info};
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
    /// Worth another attempt later (unavailable, deadline, throttled...), after the delay the
    /// server asked for in a `RetryInfo`, if it did.
    Retryable(String, Option<Duration>),
    /// The backend answered with an error that may come from this request's content
    /// (INTERNAL, UNKNOWN, DATA_LOSS answered by the server, not by the transport).
    Failed(String),
    /// The backend will never take this request (invalid argument, too large...): drop it.
    Permanent(String),
}

/// TLS of an `https://` endpoint: the configured CA (else the system's), the client
/// certificate for mutual TLS, the expected server name.
fn client_tls(tls: Option<&tailgate_config::ClientTls>) -> Result<tonic::transport::ClientTlsConfig, String> {
    use crate::tls_files::read;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let Some(tls) = tls else { return Ok(ClientTlsConfig::new().with_native_roots()) };
    let mut config = match &tls.ca_file {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "CA")?)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        config = config.identity(Identity::from_pem(read(cert, "certificate")?, read(key, "key")?));
    }
    if let Some(name) = &tls.server_name_override {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

/// An OTLP/gRPC destination.
#[derive(Debug)]
pub struct OtlpClient {
    /// Where responses are counted by code.
    pub responses: crate::events::Responses,
    endpoint: Endpoint,
    channel: Channel,
    /// The connections the current channel opened, to abort them on a timeout.
    connections: Arc<Mutex<Vec<Weak<AbortSwitch>>>>,
    path: PathAndQuery,
    timeout: Duration,
    timeout_per_mib: Duration,
    gzip: bool,
    /// The destination's policy at the disk budget.
    pub when_full: tailgate_config::WhenFull,
}

impl OtlpClient {
    /// A lazily connecting client for `signal` at the configured endpoint.
    pub fn new(config: &OtlpExporter, signal: Signal) -> Result<OtlpClient, String> {
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|err| format!("bad endpoint {}: {err}", config.endpoint))?
            .connect_timeout(config.timeout)
            .http2_keep_alive_interval(config.keepalive.time)
            .keep_alive_timeout(config.keepalive.timeout)
            .keep_alive_while_idle(config.keepalive.permit_without_stream);
        let endpoint = match config.endpoint.starts_with("https://") {
            true => endpoint
                .tls_config(client_tls(config.tls.as_ref())?)
                .map_err(|err| format!("TLS for {}: {err}", config.endpoint))?,
            false => endpoint,
        };
        let path = match signal {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        };
        let connections = Arc::new(Mutex::new(Vec::new()));
        Ok(OtlpClient {
            responses: crate::events::Responses::default(),
            channel: endpoint.connect_with_connector_lazy(Connector { connections: connections.clone() }),
            endpoint,
            connections,
            path: PathAndQuery::from_static(path),
            timeout: config.timeout,
            timeout_per_mib: config.timeout_per_mib,
            when_full: config.when_full,
            gzip: config.compression == Compression::Gzip,
        })
    }

    /// The deadline of a request of `bytes`: the configured timeout plus `timeout_per_mib` for
    /// every MiB, so a large request over a slow uplink can finish.
    pub fn timeout_for(&self, bytes: usize) -> Duration {
        self.timeout + self.timeout_per_mib.mul_f64(bytes as f64 / (1024.0 * 1024.0))
    }

    /// Aborts every connection of this client and starts a new channel: the next request goes
    /// out on a fresh connection, and nothing queued on the old ones is ever sent.
    pub fn reconnect(&mut self) {
        let old = std::mem::take(&mut *self.connections.lock().unwrap_or_else(|e| e.into_inner()));
        for switch in old.iter().filter_map(Weak::upgrade) {
            switch.abort();
        }
        self.channel = self.endpoint.connect_with_connector_lazy(Connector { connections: self.connections.clone() });
    }

    /// Sends one encoded `Export*ServiceRequest`. After a timeout or a transport failure the
    /// connection is dropped (see the module docs).
    pub async fn send(&mut self, request: Bytes) -> SendOutcome {
        let outcome = self.send_once(request).await;
        self.responses.record(&outcome.code());
        if matches!(&outcome, SendOutcome::Retryable(..)) {
            self.reconnect();
        }
        outcome
    }

    async fn send_once(&self, request: Bytes) -> SendOutcome {
        let timeout = self.timeout_for(request.len());
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if self.gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        grpc = grpc.accept_compressed(CompressionEncoding::Gzip);
        let attempt = async {
            if let Err(err) = grpc.ready().await {
                return SendOutcome::Retryable(format!("connect: {err}"), None);
            }
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout);
            match grpc.unary(request, self.path.clone(), RawCodec).await {
                Ok(response) => match otlp_wire::parse_partial_success(response.get_ref()) {
                    Ok((rejected, message)) => SendOutcome::Accepted { rejected: rejected.max(0) as u64, message },
                    // The data was accepted; only the optional detail is unreadable.
                    Err(_) => SendOutcome::Accepted { rejected: 0, message: String::new() },
                },
                Err(status) => classify(&status),
            }
        };
        // The grpc-timeout header tells the server; this bounds the wait here (connect included).
        match tokio::time::timeout(timeout + Duration::from_millis(100), attempt).await {
            Ok(outcome) => outcome,
            Err(_) => SendOutcome::Retryable(format!("DeadlineExceeded: no answer within {timeout:?}"), None),
        }
    }
}

/// Opens TCP connections for the channel, each with an [`AbortSwitch`] the client keeps.
#[derive(Clone)]
struct Connector {
    connections: Arc<Mutex<Vec<Weak<AbortSwitch>>>>,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = AbortableIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<AbortableIo, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connections = self.connections.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(80);
            let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            // Closing never waits to deliver what is still queued: a reset discards it.
            stream.set_zero_linger()?;
            let switch = Arc::new(AbortSwitch::default());
            let mut held = connections.lock().unwrap_or_else(|e| e.into_inner());
            held.retain(|weak| weak.strong_count() > 0);
            held.push(Arc::downgrade(&switch));
            Ok(AbortableIo { io: hyper_util::rt::TokioIo::new(stream), switch })
        })
    }
}

/// Lets the client fail a connection's I/O from outside, so its driver drops the socket.
#[derive(Debug, Default)]
struct AbortSwitch {
    aborted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl AbortSwitch {
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            waker.wake();
        }
    }

    /// Registers the polling task, then tells whether the connection was aborted.
    fn check(&self, cx: &Context<'_>) -> Result<(), std::io::Error> {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        if self.aborted.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection dropped after a timeout",
            ));
        }
        Ok(())
    }
}

/// A TCP connection whose reads and writes fail once its [`AbortSwitch`] is thrown.
struct AbortableIo {
    io: hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    switch: Arc<AbortSwitch>,
}

impl hyper::rt::Read for AbortableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for AbortableIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.switch.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl SendOutcome {
    /// The response's code for the self-metrics: `ok`, a gRPC code in snake case
    /// (`unavailable`, `resource_exhausted`...), `connect` or `deadline_exceeded` for a request
    /// that got no answer.
    pub fn code(&self) -> String {
        let message = match self {
            SendOutcome::Accepted { .. } => return "ok".to_string(),
            SendOutcome::Retryable(m, _) | SendOutcome::Failed(m) | SendOutcome::Permanent(m) => m,
        };
        // Every message here starts with its code (`Unavailable: ...`, `connect: ...`).
        let name = message.split(':').next().unwrap_or("unknown");
        let mut code = String::with_capacity(name.len() + 4);
        for (i, c) in name.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                code.push('_');
            }
            code.push(c.to_ascii_lowercase());
        }
        code
    }
}

/// Which answers are final. OTLP names INVALID_ARGUMENT-like codes as permanent; everything
/// else is retried with backoff and the batch stays queued:
/// - UNKNOWN and INTERNAL are what tonic reports for transport failures (connection reset,
///   broken pipe, a stream cut without grpc-status), and what storage backends answer for
///   transient faults: dropping on them would empty the queue over a flaky link;
/// - UNAUTHENTICATED and PERMISSION_DENIED are configuration mistakes: hold the backlog and
///   log, rather than discard it until an operator fixes the credentials;
/// - RESOURCE_EXHAUSTED is final only without RetryInfo (a size or quota refusal: grpc-go's
///   answer to a message over its limit), as is OUT_OF_RANGE (tonic's); the caller splits the
///   request rather than dropping it;
/// - a `RetryInfo` delay in the answer's details (`grpc-status-details-bin`) is honoured: the next
///   attempt waits at least that long (within the exporters' 30 s cap on any one wait);
/// - INTERNAL, UNKNOWN and DATA_LOSS that the server itself answered (no transport error behind
///   them) may be caused by the request's content: [`SendOutcome::Failed`].
pub fn classify(status: &tonic::Status) -> SendOutcome {
    let message = format!("{:?}: {}", status.code(), status.message());
    let from_server = std::error::Error::source(status).is_none();
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented => SendOutcome::Permanent(message),
        Code::ResourceExhausted => match retry_info(status.details()) {
            Some(after) => SendOutcome::Retryable(message, after),
            None => SendOutcome::Permanent(message),
        },
        Code::Internal | Code::Unknown | Code::DataLoss if from_server => SendOutcome::Failed(message),
        _ => SendOutcome::Retryable(message, retry_delay(status.details())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_codes_for_the_self_metrics() {
        assert_eq!(SendOutcome::Accepted { rejected: 0, message: String::new() }.code(), "ok");
        assert_eq!(classify(&tonic::Status::new(Code::Unavailable, "down")).code(), "unavailable");
        assert_eq!(classify(&tonic::Status::new(Code::ResourceExhausted, "big")).code(), "resource_exhausted");
        assert_eq!(
            SendOutcome::Retryable("DeadlineExceeded: no answer within 10s".into(), None).code(),
            "deadline_exceeded"
        );
        assert_eq!(SendOutcome::Retryable("connect: refused".into(), None).code(), "connect");
    }

    #[test]
    fn transport_failures_and_auth_problems_are_retried() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Unauthenticated] {
            assert!(matches!(classify(&tonic::Status::new(code, "x")), SendOutcome::Retryable(..)), "{code:?}");
        }
        // Answered by the server: possibly the content's fault.
        for code in [Code::Unknown, Code::Internal, Code::DataLoss] {
            assert!(matches!(classify(&tonic::Status::new(code, "x")), SendOutcome::Failed(_)), "{code:?}");
        }
        // The same codes from a broken transport are an outage.
        let cut = tonic::Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(matches!(classify(&cut), SendOutcome::Retryable(..)), "{cut:?}");
        for code in [Code::InvalidArgument, Code::Unimplemented, Code::ResourceExhausted, Code::OutOfRange] {
            assert!(matches!(classify(&tonic::Status::new(code, "x")), SendOutcome::Permanent(_)), "{code:?}");
        }
        // Throttling: RESOURCE_EXHAUSTED with RetryInfo is retried after the delay it names.
        let details = crate::grpc_raw::status_with_retry_info(Code::ResourceExhausted as i32, "slow down", 7);
        let throttled = tonic::Status::with_details(Code::ResourceExhausted, "slow down", details);
        assert!(matches!(classify(&throttled), SendOutcome::Retryable(_, Some(d)) if d == Duration::from_secs(7)));
        // Details that are not a RetryInfo do not make a quota refusal retryable.
        let other = tonic::Status::with_details(Code::ResourceExhausted, "too big", bytes::Bytes::from_static(b"x"));
        assert!(matches!(classify(&other), SendOutcome::Permanent(_)), "{other:?}");
    }
}
