//! OTLP/HTTP: `POST /v1/traces`, `/v1/logs`, `/v1/metrics` with protobuf or JSON bodies,
//! optionally gzip-compressed. Answers follow the OTLP/HTTP spec: 200 with an empty
//! `Export*ServiceResponse` in the request's encoding; errors carry a `google.rpc.Status`
//! body in the request's encoding (400 malformed, 413 too large, 415 unsupported type,
//! 503 + Retry-After when the queue is full).

use std::io::Read;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::grpc::{RETRY_AFTER_SECS, items_noun, partial_success_body};
use super::intake::{AcceptError, Accepted, Intake};
use crate::grpc_raw::status_body;
use crate::otlp_wire::{self, Signal};

#[derive(Clone)]
struct HttpState {
    intake: Intake,
    max_body_bytes: usize,
    /// The `Authorization` value clients must send, when the receiver has `auth`.
    expected_authorization: Option<std::sync::Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

/// The OTLP/HTTP routes.
pub fn router(intake: Intake, max_body_bytes: usize, expected_authorization: Option<std::sync::Arc<str>>) -> Router {
    let state = HttpState { intake, max_body_bytes, expected_authorization };
    Router::new()
        .route("/v1/traces", post(|s, h, b| handle(s, h, b, Signal::Traces)))
        .route("/v1/logs", post(|s, h, b| handle(s, h, b, Signal::Logs)))
        .route("/v1/metrics", post(|s, h, b| handle(s, h, b, Signal::Metrics)))
        // A body larger than this as sent is not read: the handler answers 413.
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn handle(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    signal: Signal,
) -> Response {
    let encoding = match content_type(&headers) {
        Some(encoding) => encoding,
        None => {
            let message = "content-type must be application/x-protobuf or application/json";
            return error(Encoding::Protobuf, StatusCode::UNSUPPORTED_MEDIA_TYPE, 3, message);
        }
    };
    let expected = state.expected_authorization.as_deref();
    if !crate::credentials::authorized(&headers, expected) {
        state.intake.refused_unauthenticated();
        let mut response = error(encoding, StatusCode::UNAUTHORIZED, 16, "missing or wrong credentials");
        let basic = expected.is_some_and(|expected| expected.starts_with("Basic "));
        let scheme = if basic { "Basic realm=\"tailgate\"" } else { "Bearer" };
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
        return response;
    }
    // Over the limit as sent (or cut off): answered with a Status body like every other error.
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let message = format!("request body exceeds {} bytes", state.max_body_bytes);
            return error(encoding, StatusCode::PAYLOAD_TOO_LARGE, 8, &message);
        }
        Err(rejection) => {
            let message = format!("cannot read the request body: {}", rejection.body_text());
            return error(encoding, StatusCode::BAD_REQUEST, 3, &message);
        }
    };
    let inflated = match content_encoding(&headers) {
        Ok(false) => body.to_vec(),
        Ok(true) => match inflate(&body, state.max_body_bytes) {
            Ok(bytes) => bytes,
            Err(Inflate::TooLarge) => {
                let message = format!("inflated body exceeds {} bytes", state.max_body_bytes);
                return error(encoding, StatusCode::PAYLOAD_TOO_LARGE, 8, &message);
            }
            Err(Inflate::Corrupt(reason)) => {
                return error(encoding, StatusCode::BAD_REQUEST, 3, &format!("gzip body does not inflate: {reason}"));
            }
        },
        Err(other) => {
            let message = format!("unsupported content-encoding {other:?}; use gzip or none");
            return error(encoding, StatusCode::UNSUPPORTED_MEDIA_TYPE, 3, &message);
        }
    };
    let protobuf = match encoding {
        Encoding::Protobuf => inflated,
        Encoding::Json => match otlp_wire::json_to_protobuf(signal, &inflated) {
            Ok(bytes) => bytes,
            Err(err) => return error(encoding, StatusCode::BAD_REQUEST, 3, &err.to_string()),
        },
    };
    match state.intake.accept(signal, &protobuf).await {
        Ok(accepted) => success(encoding, signal, &accepted),
        Err(AcceptError::Invalid(message)) => error(encoding, StatusCode::BAD_REQUEST, 3, &message),
        Err(err @ (AcceptError::Full | AcceptError::Busy)) => {
            let mut response = error(encoding, StatusCode::SERVICE_UNAVAILABLE, 8, &err.to_string());
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            response
        }
        Err(err @ AcceptError::Draining) => {
            let mut response = error(encoding, StatusCode::SERVICE_UNAVAILABLE, 14, &err.to_string());
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            response
        }
        Err(err @ AcceptError::Unavailable(_)) => {
            error(encoding, StatusCode::SERVICE_UNAVAILABLE, 14, &err.to_string())
        }
    }
}

fn content_type(headers: &HeaderMap) -> Option<Encoding> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/x-protobuf" | "application/protobuf" => Some(Encoding::Protobuf),
        "application/json" => Some(Encoding::Json),
        _ => None,
    }
}

/// Ok(true) for gzip, Ok(false) for none/identity, Err(value) for anything else.
fn content_encoding(headers: &HeaderMap) -> Result<bool, String> {
    match headers.get(header::CONTENT_ENCODING) {
        None => Ok(false),
        Some(value) => match value.to_str().map(|v| v.trim().to_ascii_lowercase()) {
            Ok(v) if v == "gzip" => Ok(true),
            Ok(v) if v.is_empty() || v == "identity" => Ok(false),
            Ok(v) => Err(v),
            Err(_) => Err("<non-ascii>".into()),
        },
    }
}

enum Inflate {
    TooLarge,
    Corrupt(String),
}

/// Inflates a gzip body, refusing to produce more than `limit` bytes (gzip bombs).
fn inflate(body: &[u8], limit: usize) -> Result<Vec<u8>, Inflate> {
    let decoder = flate2::read::GzDecoder::new(body);
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let read = decoder.take(limit as u64 + 1).read_to_end(&mut out).map_err(|err| Inflate::Corrupt(err.to_string()))?;
    if read > limit {
        return Err(Inflate::TooLarge);
    }
    Ok(out)
}

/// 200 with the `Export*ServiceResponse`: empty when everything was accepted, else a partial
/// success (in JSON, `partialSuccess` with the signal's `rejected*` count as a decimal string,
/// the protobuf JSON mapping of an int64).
fn success(encoding: Encoding, signal: Signal, accepted: &Accepted) -> Response {
    match encoding {
        Encoding::Protobuf => {
            ([(header::CONTENT_TYPE, "application/x-protobuf")], partial_success_body(signal, accepted)).into_response()
        }
        Encoding::Json if accepted.rejected.count == 0 => {
            ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
        }
        Encoding::Json => {
            let field = match signal {
                Signal::Traces => "rejectedSpans",
                Signal::Logs => "rejectedLogRecords",
                Signal::Metrics => "rejectedDataPoints",
            };
            let rejected = &accepted.rejected;
            let body = serde_json::json!({ "partialSuccess": {
                field: rejected.count.to_string(),
                "errorMessage": rejected.message(items_noun(signal)),
            }})
            .to_string();
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}

/// An error answer with a `google.rpc.Status` body (`code` is the gRPC code number).
fn error(encoding: Encoding, status: StatusCode, code: i32, message: &str) -> Response {
    match encoding {
        Encoding::Protobuf => {
            (status, [(header::CONTENT_TYPE, "application/x-protobuf")], status_body(code, message)).into_response()
        }
        Encoding::Json => {
            let body = serde_json::json!({ "code": code, "message": message }).to_string();
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}
