//! Fuzz harnesses for the decoders that take bytes from outside the node: the OTLP protobuf
//! walker (gRPC and OTLP/HTTP protobuf), OTLP/HTTP JSON, JSON log lines from files, and the
//! exporters' readers of backend answers (OTLP partial success, gRPC `RetryInfo`, `Retry-After`,
//! Loki and Prometheus error answers).
//!
//! Each harness takes arbitrary bytes and checks properties, not just "no panic": what the
//! walker accepts decodes with prost and its span and log fields agree with prost's reading;
//! what the JSON path accepts is valid protobuf that the walker accepts too; a JSON line always
//! becomes a log record whose encoding decodes to the line; a backend answer always maps to a
//! defined outcome. A failed property panics, which libFuzzer reports as a crash with the input.
//!
//! `tests/fuzz/run.sh` runs them under libFuzzer (coverage-guided, stable toolchain);
//! `tests/corpus.rs` replays the committed corpus and every past crash through them in the
//! normal test run.

use std::time::{Duration, Instant, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tailgate_config::FilelogReceiver;
use tailgate_stages::export::{http, loki, prometheus};
use tailgate_stages::grpc_raw;
use tailgate_stages::otlp_wire::{self, Limits, Signal, Transcoded};
use tailgate_stages::receive::filelog::drift::Drift;
use tailgate_stages::receive::filelog::fields::LineParser;

/// Small caps, so that inputs reach the truncation path (decode, cut, encode again).
const SMALL_LIMITS: Limits = Limits { attributes: 2, value_length: Some(4), events: 1, links: 1 };

/// Which caps a protobuf input is read under: chosen by the input's length so every input runs
/// one path and the corpus still covers both.
fn limits_for(data: &[u8]) -> Limits {
    if data.len().is_multiple_of(2) { Limits::NONE } else { SMALL_LIMITS }
}

/// An encoded `Export{Trace,Logs,Metrics}ServiceRequest` (any of the three: the bytes are tried
/// as each) through the receivers' walker.
pub fn otlp_protobuf(data: &[u8]) {
    let limits = limits_for(data);
    if let Ok(Transcoded { batch, .. }) = otlp_wire::transcode_traces(data, 0, &limits) {
        let request = ExportTraceServiceRequest::decode(data);
        assert!(request.is_ok(), "the walker accepted traces prost refuses: {request:?}");
        for record in &batch.spans {
            let span = match Span::decode(record.body.as_slice()) {
                Ok(span) => span,
                Err(err) => panic!("a stored span does not decode: {err}"),
            };
            assert_eq!(span.trace_id.as_slice(), record.trace_id, "trace_id");
            assert_eq!(span.span_id.as_slice(), record.span_id, "span_id");
            if span.parent_span_id.iter().any(|b| *b != 0) {
                assert_eq!(span.parent_span_id.as_slice(), record.parent_span_id, "parent_span_id");
            } else {
                assert_eq!(record.parent_span_id, [0; 8], "a root span has no parent");
            }
            assert_eq!(
                (span.start_time_unix_nano, span.end_time_unix_nano),
                (record.start_unix_nano, record.end_unix_nano)
            );
            if limits.attributes > 0 {
                assert!(span.attributes.len() <= limits.attributes, "attribute cap");
                assert!(span.events.len() <= limits.events && span.links.len() <= limits.links, "event and link caps");
            }
        }
        for scope in &batch.scopes {
            assert!((scope.resource as usize) < batch.resources.len(), "scope points past its resources");
        }
    }
    if let Ok(Transcoded { batch, .. }) = otlp_wire::transcode_logs(data, 0, &[], &limits) {
        let request = ExportLogsServiceRequest::decode(data);
        assert!(request.is_ok(), "the walker accepted logs prost refuses: {request:?}");
        for entry in &batch.logs {
            let record = match LogRecord::decode(entry.body.as_slice()) {
                Ok(record) => record,
                Err(err) => panic!("a stored log record does not decode: {err}"),
            };
            if record.trace_id.len() == 16 {
                assert_eq!(record.trace_id.as_slice(), entry.trace_id, "trace_id");
            }
            if limits.attributes > 0 {
                assert!(record.attributes.len() <= limits.attributes, "attribute cap");
            }
        }
    }
    if otlp_wire::count_metric_points(data).is_ok() {
        let request = ExportMetricsServiceRequest::decode(data);
        assert!(request.is_ok(), "the walker accepted metrics prost refuses: {request:?}");
    }
}

/// An OTLP/HTTP JSON body; the first byte picks the signal, the rest is the body.
pub fn otlp_json(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    let signal = match selector % 3 {
        0 => Signal::Traces,
        1 => Signal::Logs,
        _ => Signal::Metrics,
    };
    let Ok(protobuf) = otlp_wire::json_to_protobuf(signal, body) else { return };
    // What the JSON path produced goes through the same walker as protobuf requests: it must be
    // well-formed there too (item-level refusals such as a bad id are fine, nesting beyond the
    // walker's depth limit is the one whole-request refusal JSON can cause).
    let walked = match signal {
        Signal::Traces => otlp_wire::transcode_traces(&protobuf, 0, &Limits::NONE).map(|_| ()),
        Signal::Logs => otlp_wire::transcode_logs(&protobuf, 0, &[], &Limits::NONE).map(|_| ()),
        Signal::Metrics => otlp_wire::count_metric_points(&protobuf).map(|_| ()),
    };
    if let Err(err) = walked {
        assert!(err.to_string().contains("nesting"), "JSON converted to protobuf the walker refuses: {err}");
    }
}

fn parsers() -> [LineParser; 2] {
    let plain: FilelogReceiver = serde_json::from_value(serde_json::json!({ "include": ["/x/*.log"] }))
        .unwrap_or_else(|err| panic!("default file input config: {err}"));
    let tuned: FilelogReceiver = serde_json::from_value(serde_json::json!({
        "include": ["/x/*.log"],
        "include_file_name": true,
        "include_file_path": true,
        "attributes": { "env": "edge" },
        "fields": {
            "trace_id": ["tid", "traceId"],
            "level": ["lvl", "severity"],
            "duration": [{ "name": "took", "unit": "ms" }],
            "levels": { "crit": "fatal", "notice": "info" }
        }
    }))
    .unwrap_or_else(|err| panic!("tuned file input config: {err}"));
    [LineParser::new(&plain), LineParser::new(&tuned)]
}

/// Lines of a log file (split on newlines, invalid UTF-8 replaced the way the file input does).
pub fn json_lines(data: &[u8]) {
    let parsers = parsers();
    for line in data.split(|b| *b == b'\n') {
        let text = String::from_utf8_lossy(line);
        for parser in &parsers {
            let mut drift = Drift::default();
            let parsed = parser.parse(&text, "/x/app.log", 7, &mut drift);
            let record = match LogRecord::decode(parsed.record.as_slice()) {
                Ok(record) => record,
                Err(err) => panic!("the encoded record does not decode: {err}"),
            };
            let body = record.body.and_then(|body| body.value);
            assert!(matches!(&body, Some(Value::StringValue(s)) if *s == text), "the body is the line: {body:?}");
            assert_eq!(record.observed_time_unix_nano, 7);
            assert_eq!(record.time_unix_nano, parsed.time_unix_nano);
            assert_eq!(record.severity_number, i32::from(parsed.severity_number));
            if parsed.trace_id == [0; 16] {
                assert!(record.trace_id.is_empty(), "no trace id written for an untraced line");
            } else {
                assert_eq!(record.trace_id.as_slice(), parsed.trace_id);
            }
        }
    }
}

/// A backend's answer; the first byte picks the reader:
/// 0: an OTLP `Export*ServiceResponse` (partial success), checked against prost;
/// 1: a gRPC `grpc-status-details-bin` value (`RetryInfo`);
/// 2: a `Retry-After` header value;
/// 3: a Loki or Prometheus error answer: two bytes of HTTP status, then the body.
pub fn export_answers(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 4 {
        0 => {
            let Ok((rejected, message)) = otlp_wire::parse_partial_success(rest) else { return };
            let traces = ExportTraceServiceResponse::decode(rest);
            let logs = ExportLogsServiceResponse::decode(rest);
            let metrics = ExportMetricsServiceResponse::decode(rest);
            match (traces, logs, metrics) {
                (Ok(traces), Ok(_), Ok(_)) => {
                    let partial = traces.partial_success.unwrap_or_default();
                    assert_eq!((rejected, message), (partial.rejected_spans, partial.error_message));
                }
                other => panic!("a response prost refuses was read: {other:?}"),
            }
        }
        1 => {
            // Against prost's reading of the same status.
            let expected = grpc_raw::RpcStatus::decode(rest).ok().and_then(|status| {
                let detail = status.details.iter().find(|d| d.type_url.ends_with("/google.rpc.RetryInfo"))?;
                let delay = grpc_raw::RetryInfo::decode(detail.value.as_slice()).ok().and_then(|i| i.retry_delay);
                let delay = delay.and_then(|d| {
                    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
                    Some(Duration::new(u64::try_from(d.seconds).ok()?, nanos))
                });
                Some(delay)
            });
            let read = grpc_raw::retry_info(rest);
            if expected.is_some() {
                assert_eq!(read, expected, "a status prost reads");
            }
        }
        2 => {
            let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            if let Some(wait) = http::retry_after(rest, now) {
                let text = String::from_utf8_lossy(rest);
                let seconds = text.trim().parse::<u64>();
                assert!(seconds.is_err() || seconds == Ok(wait.as_secs()), "{text:?} -> {wait:?}");
                // The exporters cap a wait at 30 s before adding it to a clock reading.
                assert!(Instant::now().checked_add(wait.min(Duration::from_secs(30))).is_some());
            }
        }
        _ => {
            let [high, low, body @ ..] = rest else { return };
            let status = u16::from_be_bytes([*high, *low]) % 1000;
            let body = String::from_utf8_lossy(body);
            let after = Some(Duration::from_secs(1));
            let loki = loki::client::classify(status, &body, format!("HTTP {status}"), after);
            let remote_write = prometheus::classify(status, &body, after);
            if status == 429 || status == 503 {
                assert!(matches!(loki, loki::client::PushOutcome::Retry { .. }), "Loki {status}: {loki:?}");
                assert!(
                    matches!(remote_write, tailgate_stages::export::isolate::Attempt::Retry { .. }),
                    "remote write {status}"
                );
            }
            if (400..500).contains(&status) && ![401, 403, 404, 407, 408, 429].contains(&status) {
                assert!(!matches!(loki, loki::client::PushOutcome::Retry { .. }), "Loki {status} retried");
                assert!(
                    !matches!(remote_write, tailgate_stages::export::isolate::Attempt::Retry { .. }),
                    "remote write {status} retried"
                );
            }
        }
    }
}
