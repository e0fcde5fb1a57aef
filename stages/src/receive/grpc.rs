//! OTLP/gRPC: `TraceService`, `LogsService` and `MetricsService` `Export`, served by tonic with a
//! raw-bytes codec so the request is walked once, not decoded into prost structs.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::codec::CompressionEncoding;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Code, Status};

use super::intake::{AcceptError, Accepted, Intake};
use crate::grpc_raw::{RawCodec, status_with_retry_info};
use crate::otlp_wire::Signal;

/// Seconds a client is told to wait before retrying into a full queue.
pub const RETRY_AFTER_SECS: i64 = 1;

/// Ties a gRPC service name to the signal it carries.
pub trait GrpcSignal: Clone + Send + Sync + 'static {
    /// Fully qualified service name.
    const NAME: &'static str;
    /// The signal.
    const SIGNAL: Signal;
    /// Path of the `Export` method.
    const EXPORT_PATH: &'static str;
}

/// `opentelemetry.proto.collector.trace.v1.TraceService`.
#[derive(Debug, Clone, Copy)]
pub struct Traces;
/// `opentelemetry.proto.collector.logs.v1.LogsService`.
#[derive(Debug, Clone, Copy)]
pub struct Logs;
/// `opentelemetry.proto.collector.metrics.v1.MetricsService`.
#[derive(Debug, Clone, Copy)]
pub struct Metrics;

impl GrpcSignal for Traces {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    const SIGNAL: Signal = Signal::Traces;
    const EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
}
impl GrpcSignal for Logs {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const SIGNAL: Signal = Signal::Logs;
    const EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
}
impl GrpcSignal for Metrics {
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const SIGNAL: Signal = Signal::Metrics;
    const EXPORT_PATH: &'static str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
}

/// One OTLP gRPC service.
#[derive(Debug, Clone)]
pub struct OtlpGrpcService<S> {
    intake: Intake,
    max_message_bytes: usize,
    /// The `Authorization` value clients must send, when the receiver has `auth`.
    expected_authorization: Option<std::sync::Arc<str>>,
    signal: PhantomData<S>,
}

impl<S> OtlpGrpcService<S> {
    /// A service feeding `intake`, refusing messages above `max_message_bytes`.
    pub fn new(intake: Intake, max_message_bytes: usize) -> Self {
        OtlpGrpcService { intake, max_message_bytes, expected_authorization: None, signal: PhantomData }
    }

    /// Refuses calls whose `authorization` metadata is not exactly `expected` (UNAUTHENTICATED).
    pub fn with_authorization(mut self, expected: Option<std::sync::Arc<str>>) -> Self {
        self.expected_authorization = expected;
        self
    }
}

impl<S: GrpcSignal> NamedService for OtlpGrpcService<S> {
    const NAME: &'static str = S::NAME;
}

#[derive(Clone)]
struct ExportCall<S> {
    intake: Intake,
    signal: PhantomData<S>,
}

/// The encoded `Export*ServiceResponse` for an accepted request: empty when nothing was refused
/// (the spec: `partial_success` MUST be left unset), else `partial_success` with the refused
/// count (`rejected_spans` / `rejected_log_records` / `rejected_data_points`, field 1 of each)
/// and the message (field 2).
pub fn partial_success_body(signal: Signal, accepted: &Accepted) -> Vec<u8> {
    use prost::encoding::{encode_varint, encoded_len_varint};
    let rejected = &accepted.rejected;
    if rejected.count == 0 {
        return Vec::new();
    }
    let message = rejected.message(items_noun(signal));
    let inner_len =
        1 + encoded_len_varint(rejected.count) + 1 + encoded_len_varint(message.len() as u64) + message.len();
    let mut out = Vec::with_capacity(inner_len + 6);
    encode_varint(1 << 3 | 2, &mut out);
    encode_varint(inner_len as u64, &mut out);
    encode_varint(1 << 3, &mut out);
    encode_varint(rejected.count, &mut out);
    encode_varint(2 << 3 | 2, &mut out);
    encode_varint(message.len() as u64, &mut out);
    out.extend_from_slice(message.as_bytes());
    out
}

/// What a signal's items are called in messages.
pub fn items_noun(signal: Signal) -> &'static str {
    match signal {
        Signal::Traces => "spans",
        Signal::Logs => "log records",
        Signal::Metrics => "data points",
    }
}

/// Maps an intake refusal to the gRPC status OTLP clients act on.
pub fn status_of(err: &AcceptError) -> Status {
    match err {
        AcceptError::Invalid(message) => Status::invalid_argument(message.clone()),
        AcceptError::Full | AcceptError::Busy => {
            let message = err.to_string();
            let details = status_with_retry_info(Code::ResourceExhausted as i32, &message, RETRY_AFTER_SECS);
            Status::with_details(Code::ResourceExhausted, message, details)
        }
        AcceptError::Draining => {
            let message = err.to_string();
            let details = status_with_retry_info(Code::Unavailable as i32, &message, RETRY_AFTER_SECS);
            Status::with_details(Code::Unavailable, message, details)
        }
        AcceptError::Unavailable(message) => Status::unavailable(message.clone()),
    }
}

impl<S: GrpcSignal> UnaryService<Bytes> for ExportCall<S> {
    type Response = Bytes;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<tonic::Response<Bytes>, Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let intake = self.intake.clone();
        Box::pin(async move {
            let body = request.into_inner();
            match intake.accept(S::SIGNAL, &body).await {
                // An empty Export*ServiceResponse when everything was accepted, else a partial
                // success naming what was refused.
                Ok(accepted) => Ok(tonic::Response::new(Bytes::from(partial_success_body(S::SIGNAL, &accepted)))),
                Err(err) => Err(status_of(&err)),
            }
        })
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for OtlpGrpcService<S>
where
    S: GrpcSignal,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = ExportCall::<S> { intake: self.intake.clone(), signal: PhantomData };
        let max = self.max_message_bytes;
        if request.uri().path() != S::EXPORT_PATH {
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("unknown method {}", request.uri().path())).into_http())
            });
        }
        if !crate::credentials::authorized(request.headers(), self.expected_authorization.as_deref()) {
            let intake = self.intake.clone();
            return Box::pin(async move {
                intake.refused_unauthenticated();
                Ok(Status::unauthenticated("missing or wrong credentials").into_http())
            });
        }
        Box::pin(async move {
            // Requests may be gzip-compressed; responses are a few bytes and go uncompressed (a
            // deflate state per response cost ~300 KiB zeroed and most of a request's CPU).
            let mut grpc =
                Grpc::new(RawCodec).accept_compressed(CompressionEncoding::Gzip).max_decoding_message_size(max);
            let mut response = grpc.unary(call, request).await;
            map_framing_errors(&mut response);
            Ok(response)
        })
    }
}

/// Maps tonic's framing errors to the codes OTLP clients act on. tonic answers a frame above
/// the size limit with OUT_OF_RANGE, where gRPC servers and OTLP clients expect
/// RESOURCE_EXHAUSTED (not retried without RetryInfo); and a compressed frame that does not
/// inflate with INTERNAL, which is the client's fault (INVALID_ARGUMENT, not retried). Our own
/// handler answers neither code, so the rewrite is unambiguous.
fn map_framing_errors(response: &mut http::Response<tonic::body::Body>) {
    let headers = response.headers_mut();
    let Some(code) = headers.get(Status::GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    let mapped = match Code::from_i32(code) {
        Code::OutOfRange => Code::ResourceExhausted,
        Code::Internal => Code::InvalidArgument,
        _ => return,
    };
    headers.insert(Status::GRPC_STATUS, http::HeaderValue::from(mapped as i32));
}
