//! OTLP/HTTP JSON bodies, converted to the protobuf encoding (the slow path).
//!
//! opentelemetry-proto's `with-serde` derives accept the OTLP JSON encoding as the spec writes
//! it: lowerCamelCase keys, trace/span ids as hex strings (either case), enums as integers,
//! 64-bit integers as decimal strings or numbers, unknown keys ignored. A few forms proto3 JSON
//! allows are rejected by the derives; when the direct parse fails, the body is normalised for
//! them and parsed again:
//! - `null` values (the field's default),
//! - `{"arrayValue": {}}` / `{"kvlistValue": {}}`, the way protojson writes empty lists (the
//!   derives require `values`),
//! - enum names (`"kind": "SPAN_KIND_SERVER"`) and 32-bit integers as strings.
//!
//! Bodies that are not a JSON object (`[]`, `"text"`) are refused; `null` members are defaults, so
//! `{"resourceSpans": null}` is an empty request (accepted, nothing queued); unknown members are
//! ignored at any depth (the spec: receivers MUST ignore unknown fields), within the body limit.
//!
//! Not handled: `"NaN"` / `"Infinity"` in double fields other than summary quantiles (a
//! `serde_json::Value` cannot hold them); snake_case keys, which the OTLP spec rules out and
//! which are ignored like any unknown key; a malformed `asInt`/`asDouble` in a data point or
//! exemplar, which the derives (a flattened `Option`) turn into "no value" instead of an error.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::logs::v1::SeverityNumber;
use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use serde_json::{Map, Value};

use super::{Signal, WireError};

/// Converts an OTLP/HTTP JSON request body into the protobuf encoding of the same
/// `Export*ServiceRequest`.
pub fn json_to_protobuf(signal: Signal, json: &[u8]) -> Result<Vec<u8>, WireError> {
    // A message is a JSON object in the protobuf JSON mapping; serde would also take an array
    // (as the fields in order), which no OTLP client sends.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(WireError::Json("the body must be a JSON object (an Export*ServiceRequest)".into()));
    }
    macro_rules! convert {
        ($request:ty) => {{
            let request: $request = match serde_json::from_slice::<$request>(json) {
                Ok(request) => request,
                Err(direct) => {
                    let mut value: Value =
                        serde_json::from_slice(json).map_err(|err| WireError::Json(err.to_string()))?;
                    normalize(&mut value);
                    serde_json::from_value::<$request>(value).map_err(|err| json_error(&direct, &err))?
                }
            };
            Ok(prost::Message::encode_to_vec(&request))
        }};
    }
    match signal {
        Signal::Traces => convert!(ExportTraceServiceRequest),
        Signal::Logs => convert!(ExportLogsServiceRequest),
        Signal::Metrics => convert!(ExportMetricsServiceRequest),
    }
}

/// The error to report when the normalised body fails too: the direct parse's message when it is
/// the same problem (it carries line and column), else the remaining problem.
fn json_error(direct: &serde_json::Error, normalized: &serde_json::Error) -> WireError {
    let direct = direct.to_string();
    let normalized = normalized.to_string();
    if direct.starts_with(&normalized) { WireError::Json(direct) } else { WireError::Json(normalized) }
}

/// Keys of 32-bit integer and enum fields anywhere in OTLP. Attribute keys are JSON values, not
/// keys, so user data never matches.
fn int32_key(key: &str) -> bool {
    matches!(
        key,
        "kind"
            | "code"
            | "severityNumber"
            | "aggregationTemporality"
            | "droppedAttributesCount"
            | "droppedEventsCount"
            | "droppedLinksCount"
            | "flags"
            | "scale"
            | "offset"
            | "keyStrindex"
            | "stringValueStrindex"
    )
}

fn enum_value(key: &str, name: &str) -> Option<i32> {
    match key {
        "kind" => SpanKind::from_str_name(name).map(|v| v as i32),
        "code" => StatusCode::from_str_name(name).map(|v| v as i32),
        "severityNumber" => SeverityNumber::from_str_name(name).map(|v| v as i32),
        "aggregationTemporality" => AggregationTemporality::from_str_name(name).map(|v| v as i32),
        _ => None,
    }
    .or_else(|| name.parse().ok())
}

fn normalize(value: &mut Value) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(normalize),
        Value::Object(map) => normalize_object(map),
        _ => {}
    }
}

fn normalize_object(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
    for (key, value) in map.iter_mut() {
        normalize(value);
        match value {
            Value::String(s) if int32_key(key) => {
                if let Some(number) = enum_value(key, s) {
                    *value = Value::from(number);
                }
            }
            Value::Object(inner) if key == "arrayValue" || key == "kvlistValue" => {
                inner.entry("values").or_insert_with(|| Value::Array(Vec::new()));
            }
            _ => {}
        }
    }
}
