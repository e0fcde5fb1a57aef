//! The OTLP message layouts the walker checks: per message, its known fields (number, name for
//! error paths, wire-level type). Field numbers follow opentelemetry-proto 0.33 (OTLP 1.9), see
//! its generated `opentelemetry.proto.*.v1.rs`. Fields not listed are skipped by wire type.
//!
//! Each message is a type whose `field` is a `match` on the field number, so the walker is
//! monomorphized per message and the type dispatch folds into direct code per field (a shared
//! table interpreter spends most of its time in mispredicted indirect jumps).

use super::wire::{Field, Message, Ty, many, msg, one};

macro_rules! messages {
    ($(
        $(#[$doc:meta])*
        $name:ident = [$($kind:ident($num:literal, $field:literal, $ty:expr)),* $(,)?];
    )*) => {$(
        $(#[$doc])*
        pub(super) struct $name;
        impl Message for $name {
            #[inline(always)]
            fn field(number: u32) -> Option<Field> {
                match number {
                    $($num => Some($kind($num, $field, $ty)),)*
                    _ => None,
                }
            }
        }
    )*};
}

use Ty::{Bytes, Custom, Fixed32, Fixed64, Id, PackedFixed64, PackedVarint, Str, Varint};

messages! {
    // common.v1
    AnyValue = [
        one(1, "string_value", Str),
        one(2, "bool_value", Varint),
        one(3, "int_value", Varint),
        one(4, "double_value", Fixed64),
        one(5, "array_value", msg::<ArrayValue>()),
        one(6, "kvlist_value", msg::<KeyValueList>()),
        one(7, "bytes_value", Bytes),
        one(8, "string_value_strindex", Varint),
    ];
    ArrayValue = [many(1, "values", msg::<AnyValue>())];
    KeyValueList = [many(1, "values", msg::<KeyValue>())];
    KeyValue = [one(1, "key", Str), one(2, "value", msg::<AnyValue>()), one(3, "key_strindex", Varint)];
    Scope = [
        one(1, "name", Str),
        one(2, "version", Str),
        many(3, "attributes", msg::<KeyValue>()),
        one(4, "dropped_attributes_count", Varint),
    ];
    EntityRef = [
        one(1, "schema_url", Str),
        one(2, "type", Str),
        many(3, "id_keys", Str),
        many(4, "description_keys", Str),
    ];
    // resource.v1
    Resource = [
        many(1, "attributes", msg::<KeyValue>()),
        one(2, "dropped_attributes_count", Varint),
        many(3, "entity_refs", msg::<EntityRef>()),
    ];

    // trace.v1 and collector.trace.v1
    TracesRequest = [many(1, "resource_spans", Custom)];
    ResourceSpans = [
        one(1, "resource", msg::<Resource>()),
        many(2, "scope_spans", Custom),
        one(3, "schema_url", Str),
    ];
    ScopeSpans = [one(1, "scope", msg::<Scope>()), many(2, "spans", Custom), one(3, "schema_url", Str)];
    Span = [
        one(1, "trace_id", Bytes),
        one(2, "span_id", Bytes),
        one(3, "trace_state", Str),
        one(4, "parent_span_id", Bytes),
        one(5, "name", Str),
        one(6, "kind", Varint),
        one(7, "start_time_unix_nano", Fixed64),
        one(8, "end_time_unix_nano", Fixed64),
        many(9, "attributes", msg::<KeyValue>()),
        one(10, "dropped_attributes_count", Varint),
        many(11, "events", msg::<Event>()),
        one(12, "dropped_events_count", Varint),
        many(13, "links", msg::<Link>()),
        one(14, "dropped_links_count", Varint),
        one(15, "status", msg::<Status>()),
        one(16, "flags", Fixed32),
    ];
    Event = [
        one(1, "time_unix_nano", Fixed64),
        one(2, "name", Str),
        many(3, "attributes", msg::<KeyValue>()),
        one(4, "dropped_attributes_count", Varint),
    ];
    Link = [
        one(1, "trace_id", Id(16)),
        one(2, "span_id", Id(8)),
        one(3, "trace_state", Str),
        many(4, "attributes", msg::<KeyValue>()),
        one(5, "dropped_attributes_count", Varint),
        one(6, "flags", Fixed32),
    ];
    Status = [one(2, "message", Str), one(3, "code", Varint)];

    // logs.v1 and collector.logs.v1
    LogsRequest = [many(1, "resource_logs", Custom)];
    ResourceLogs = [
        one(1, "resource", msg::<Resource>()),
        many(2, "scope_logs", Custom),
        one(3, "schema_url", Str),
    ];
    ScopeLogs = [one(1, "scope", msg::<Scope>()), many(2, "log_records", Custom), one(3, "schema_url", Str)];
    LogRecord = [
        one(1, "time_unix_nano", Fixed64),
        one(2, "severity_number", Varint),
        one(3, "severity_text", Str),
        one(5, "body", msg::<AnyValue>()),
        many(6, "attributes", msg::<KeyValue>()),
        one(7, "dropped_attributes_count", Varint),
        one(8, "flags", Fixed32),
        one(9, "trace_id", Id(16)),
        one(10, "span_id", Id(8)),
        one(11, "observed_time_unix_nano", Fixed64),
        one(12, "event_name", Str),
    ];

    // metrics.v1 and collector.metrics.v1
    MetricsRequest = [many(1, "resource_metrics", Custom)];
    ResourceMetrics = [
        one(1, "resource", msg::<Resource>()),
        many(2, "scope_metrics", Custom),
        one(3, "schema_url", Str),
    ];
    ScopeMetrics = [one(1, "scope", msg::<Scope>()), many(2, "metrics", Custom), one(3, "schema_url", Str)];
    Metric = [
        one(1, "name", Str),
        one(2, "description", Str),
        one(3, "unit", Str),
        one(5, "gauge", Custom),
        one(7, "sum", Custom),
        one(9, "histogram", Custom),
        one(10, "exponential_histogram", Custom),
        one(11, "summary", Custom),
        many(12, "metadata", msg::<KeyValue>()),
    ];
    /// Data-point containers: field 1 is always the repeated data points.
    Gauge = [many(1, "data_points", msg::<NumberPoint>())];
    Sum = [
        many(1, "data_points", msg::<NumberPoint>()),
        one(2, "aggregation_temporality", Varint),
        one(3, "is_monotonic", Varint),
    ];
    Histogram = [many(1, "data_points", msg::<HistogramPoint>()), one(2, "aggregation_temporality", Varint)];
    ExpHistogram = [
        many(1, "data_points", msg::<ExpHistogramPoint>()),
        one(2, "aggregation_temporality", Varint),
    ];
    Summary = [many(1, "data_points", msg::<SummaryPoint>())];
    NumberPoint = [
        many(7, "attributes", msg::<KeyValue>()),
        one(2, "start_time_unix_nano", Fixed64),
        one(3, "time_unix_nano", Fixed64),
        one(4, "as_double", Fixed64),
        many(5, "exemplars", msg::<Exemplar>()),
        one(6, "as_int", Fixed64),
        one(8, "flags", Varint),
    ];
    HistogramPoint = [
        many(9, "attributes", msg::<KeyValue>()),
        one(2, "start_time_unix_nano", Fixed64),
        one(3, "time_unix_nano", Fixed64),
        one(4, "count", Fixed64),
        one(5, "sum", Fixed64),
        one(6, "bucket_counts", PackedFixed64),
        one(7, "explicit_bounds", PackedFixed64),
        many(8, "exemplars", msg::<Exemplar>()),
        one(10, "flags", Varint),
        one(11, "min", Fixed64),
        one(12, "max", Fixed64),
    ];
    ExpHistogramPoint = [
        many(1, "attributes", msg::<KeyValue>()),
        one(2, "start_time_unix_nano", Fixed64),
        one(3, "time_unix_nano", Fixed64),
        one(4, "count", Fixed64),
        one(5, "sum", Fixed64),
        one(6, "scale", Varint),
        one(7, "zero_count", Fixed64),
        one(8, "positive", msg::<Buckets>()),
        one(9, "negative", msg::<Buckets>()),
        one(10, "flags", Varint),
        many(11, "exemplars", msg::<Exemplar>()),
        one(12, "min", Fixed64),
        one(13, "max", Fixed64),
        one(14, "zero_threshold", Fixed64),
    ];
    Buckets = [one(1, "offset", Varint), one(2, "bucket_counts", PackedVarint)];
    SummaryPoint = [
        many(7, "attributes", msg::<KeyValue>()),
        one(2, "start_time_unix_nano", Fixed64),
        one(3, "time_unix_nano", Fixed64),
        one(4, "count", Fixed64),
        one(5, "sum", Fixed64),
        many(6, "quantile_values", msg::<Quantile>()),
        one(8, "flags", Varint),
    ];
    Quantile = [one(1, "quantile", Fixed64), one(2, "value", Fixed64)];
    Exemplar = [
        many(7, "filtered_attributes", msg::<KeyValue>()),
        one(2, "time_unix_nano", Fixed64),
        one(3, "as_double", Fixed64),
        one(4, "span_id", Id(8)),
        one(5, "trace_id", Id(16)),
        one(6, "as_int", Fixed64),
    ];

    // collector.*.v1 Export*ServiceResponse
    Response = [one(1, "partial_success", Custom)];
    PartialSuccess = [one(1, "rejected", Varint), one(2, "error_message", Str)];
}
