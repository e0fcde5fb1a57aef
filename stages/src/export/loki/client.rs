//! The HTTP side of the Loki exporter: encoding a push (protobuf + snappy block format, or
//! JSON), sending it, and what each answer means.
//!
//! Answers (Loki's distributor and ingester, `pkg/distributor/http.go`, `pkg/ingester/stream.go`):
//! - 2xx (Loki answers 204): taken.
//! - 400: some entries are invalid (too old, too far behind, out of order, line too long, bad
//!   labels). Loki has already stored the valid entries of the request, so the request is split
//!   and its halves sent again (Loki drops an identical entry it already holds) until the
//!   offending entries stand alone; those are dropped and counted by reason. Never retried as a
//!   whole. 413 (a proxy's size limit) and 422 are handled the same way.
//! - 429 (rate or stream limit) and 5xx: retried with backoff, honouring `Retry-After`.
//! - 401, 403, 404, 407, 408: configuration or transient gateway problems; the backlog is held
//!   and the request retried with backoff, as the OTLP exporter does for auth failures.
//! - other 4xx: permanent.

use std::time::Duration;

use prost::Message;
use tailgate_config::{LokiEncoding, LokiExporter};

use crate::export::http::{self, HttpSetup, HttpSetupError};

use super::entries::{Entry, Stream};
use super::proto::{EntryAdapter, LabelPairAdapter, PushRequest, StreamAdapter, Timestamp};

pub use crate::export::isolate::Attempt as PushOutcome;

/// A Loki push endpoint.
#[derive(Debug, Clone)]
pub struct LokiClient {
    /// Where responses are counted by code.
    pub responses: crate::events::Responses,
    http: reqwest::Client,
    url: String,
    encoding: LokiEncoding,
    headers: reqwest::header::HeaderMap,
}

impl LokiClient {
    /// A client for the configured endpoint; credentials files are read here, once.
    pub fn new(config: &LokiExporter) -> Result<LokiClient, HttpSetupError> {
        let tenant = config.tenant_id.as_deref().map(|tenant| ("x-scope-orgid", tenant));
        let setup = HttpSetup {
            headers: &config.headers,
            auth: config.auth.as_ref(),
            timeout: config.timeout,
            tls: config.tls.as_ref(),
        };
        let (http, headers) = setup.build(tenant)?;
        Ok(LokiClient {
            responses: crate::events::Responses::default(),
            http,
            url: config.endpoint.clone(),
            encoding: config.encoding,
            headers,
        })
    }

    /// Sends `entries` (grouped by stream, each stream oldest first) as one push.
    pub async fn push(&self, streams: &[Stream], entries: &[Entry]) -> PushOutcome {
        let (content_type, body) = match self.encoding {
            LokiEncoding::Protobuf => match http::snappy(&encode_protobuf(streams, entries).encode_to_vec()) {
                Ok(body) => ("application/x-protobuf", body),
                Err(refused) => return refused,
            },
            LokiEncoding::Json => ("application/json", encode_json(streams, entries).into_bytes()),
        };
        let request = self
            .http
            .post(&self.url)
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        match http::send(request, &self.responses).await {
            Ok(answer) if answer.accepted() => PushOutcome::Accepted,
            Ok(answer) => {
                let message = format!("HTTP {}: {}", answer.status, answer.body.trim());
                classify(answer.status, &answer.body, message, answer.after)
            }
            Err(failed) => failed,
        }
    }
}

/// What an answer means for the request that got it.
pub fn classify(status: u16, body: &str, message: String, after: Option<Duration>) -> PushOutcome {
    match status {
        400 | 413 | 422 => PushOutcome::Refused { reason: reason_of(status, body), message },
        401 | 403 | 404 | 407 | 408 | 429 => PushOutcome::Retry { message, after },
        500..=599 => PushOutcome::Retry { message, after },
        _ => PushOutcome::Refused { reason: "rejected", message },
    }
}

/// The counter reason for a refusal, from Loki's message texts (`pkg/validation/validate.go`,
/// `pkg/chunkenc`).
pub fn reason_of(status: u16, body: &str) -> &'static str {
    let body = body.to_ascii_lowercase();
    if status == 413 {
        "request_too_large"
    } else if body.contains("too far behind") {
        "too_far_behind"
    } else if body.contains("out of order") {
        "out_of_order"
    } else if body.contains("timestamp too old") {
        "too_old"
    } else if body.contains("timestamp too new") {
        "too_new"
    } else if body.contains("max entry size") || body.contains("line too long") {
        "line_too_long"
    } else if body.contains("stream limit") {
        "stream_limit"
    } else if body.contains("label") {
        "invalid_labels"
    } else if body.contains("structured metadata") {
        "structured_metadata_rejected"
    } else {
        "bad_request"
    }
}

/// The `PushRequest` of `entries`.
pub fn encode_protobuf(streams: &[Stream], entries: &[Entry]) -> PushRequest {
    let mut request = PushRequest { streams: Vec::new() };
    for entry in entries {
        let open_new =
            request.streams.last().is_none_or(|s: &StreamAdapter| s.labels != streams[entry.stream].selector);
        if open_new {
            request.streams.push(StreamAdapter { labels: streams[entry.stream].selector.clone(), entries: Vec::new() });
        }
        if let Some(stream) = request.streams.last_mut() {
            stream.entries.push(EntryAdapter {
                timestamp: Some(Timestamp::from_unix_nanos(entry.unix_nanos)),
                line: entry.line.clone(),
                structured_metadata: entry
                    .metadata
                    .iter()
                    .map(|(name, value)| LabelPairAdapter { name: name.clone(), value: value.clone() })
                    .collect(),
            });
        }
    }
    request
}

/// The JSON push body of `entries`: `{"streams": [{"stream": {...}, "values": [[ts, line, {md}]]}]}`.
pub fn encode_json(streams: &[Stream], entries: &[Entry]) -> String {
    use serde_json::{Map, Value, json};
    let mut out: Vec<Value> = Vec::new();
    let mut current: Option<(usize, Vec<Value>)> = None;
    let close = |current: &mut Option<(usize, Vec<Value>)>, out: &mut Vec<Value>| {
        if let Some((stream, values)) = current.take() {
            let labels: Map<String, Value> =
                streams[stream].labels.iter().map(|(n, v)| (n.clone(), Value::String(v.clone()))).collect();
            out.push(json!({ "stream": labels, "values": values }));
        }
    };
    for entry in entries {
        if current.as_ref().is_none_or(|(stream, _)| *stream != entry.stream) {
            close(&mut current, &mut out);
            current = Some((entry.stream, Vec::new()));
        }
        if let Some((_, values)) = current.as_mut() {
            let mut value = vec![Value::String(entry.unix_nanos.to_string()), Value::String(entry.line.clone())];
            if !entry.metadata.is_empty() {
                let metadata: Map<String, Value> =
                    entry.metadata.iter().map(|(n, v)| (n.clone(), Value::String(v.clone()))).collect();
                value.push(Value::Object(metadata));
            }
            values.push(Value::Array(value));
        }
    }
    close(&mut current, &mut out);
    json!({ "streams": out }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_classified_by_status_and_message() {
        let invalid = |status, body: &str| match classify(status, body, String::new(), None) {
            PushOutcome::Refused { reason, .. } => Some(reason),
            _ => None,
        };
        assert_eq!(
            invalid(
                400,
                "entry with timestamp 2024-01-01 ignored, reason: 'entry too far behind, entry timestamp is: x"
            ),
            Some("too_far_behind")
        );
        assert_eq!(invalid(400, "entry out of order"), Some("out_of_order"));
        assert_eq!(invalid(400, "entry for stream '{a=\"b\"}' has timestamp too old: x"), Some("too_old"));
        assert_eq!(invalid(400, "Max entry size '256' bytes exceeded for stream"), Some("line_too_long"));
        assert_eq!(invalid(413, ""), Some("request_too_large"));
        for status in [429, 500, 502, 503, 401, 404] {
            assert!(matches!(classify(status, "", String::new(), None), PushOutcome::Retry { .. }), "{status}");
        }
    }
}
