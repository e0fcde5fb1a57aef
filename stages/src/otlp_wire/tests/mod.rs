#![allow(clippy::unwrap_used, clippy::expect_used)]

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value::Value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    self as metrics, Exemplar, ExponentialHistogramDataPoint, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, SummaryDataPoint, exponential_histogram_data_point::Buckets, metric::Data,
    number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
use proptest::prelude::*;
use prost::Message;
use tailgate_ipc::batch::{LogBatch, SpanBatch};

use super::*;

mod json;

const TRACE: [u8; 16] =
    [0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f, 0xc6, 0x0c];
const SPAN: [u8; 8] = [0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74];

fn some_value(value: Value) -> Option<AnyValue> {
    Some(AnyValue { value: Some(value) })
}

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue { key: key.into(), value: some_value(value), ..Default::default() }
}

fn attributes() -> Vec<KeyValue> {
    vec![
        kv("http.method", Value::StringValue("GET".into())),
        kv("retries", Value::IntValue(-3)),
        kv("cached", Value::BoolValue(true)),
        kv("ratio", Value::DoubleValue(0.25)),
        kv("blob", Value::BytesValue(vec![0, 1, 2])),
        kv(
            "nested",
            Value::ArrayValue(ArrayValue {
                values: vec![
                    AnyValue { value: Some(Value::StringValue("a".into())) },
                    AnyValue {
                        value: Some(Value::KvlistValue(KeyValueList { values: vec![kv("inner", Value::IntValue(7))] })),
                    },
                    AnyValue { value: None },
                ],
            }),
        ),
    ]
}

fn resource(service: &str) -> Option<Resource> {
    let mut attributes = attributes();
    attributes.insert(1, kv("service.name", Value::StringValue(service.into())));
    Some(Resource { attributes, dropped_attributes_count: 2, ..Default::default() })
}

fn scope(name: &str) -> Option<InstrumentationScope> {
    Some(InstrumentationScope {
        name: name.into(),
        version: "1.2".into(),
        attributes: attributes(),
        ..Default::default()
    })
}

fn test_span(seed: u8) -> Span {
    let mut trace_id = TRACE.to_vec();
    trace_id[0] = seed;
    Span {
        trace_id,
        span_id: vec![seed, 2, 3, 4, 5, 6, 7, 8],
        parent_span_id: if seed.is_multiple_of(2) { vec![9; 8] } else { vec![] },
        trace_state: "k=v".into(),
        name: format!("GET /{seed}"),
        kind: i32::from(seed % 6),
        start_time_unix_nano: 1_544_712_660_000_000_000 + u64::from(seed),
        end_time_unix_nano: 1_544_712_661_000_000_000,
        attributes: attributes(),
        dropped_attributes_count: 1,
        events: vec![span::Event {
            time_unix_nano: 5,
            name: "ev".into(),
            attributes: attributes(),
            ..Default::default()
        }],
        links: vec![span::Link { trace_id: TRACE.to_vec(), span_id: SPAN.to_vec(), flags: 1, ..Default::default() }],
        status: (!seed.is_multiple_of(3)).then(|| Status { message: "boom".into(), code: i32::from(seed % 3) }),
        flags: 0x301,
        ..Default::default()
    }
}

fn traces(scopes_per_resource: usize) -> ExportTraceServiceRequest {
    let mut seed = 1;
    let resource_spans = (0..2)
        .map(|r| ResourceSpans {
            resource: resource(&format!("svc{r}")),
            schema_url: format!("https://schema/r{r}"),
            scope_spans: (0..scopes_per_resource)
                .map(|s| ScopeSpans {
                    scope: scope(&format!("lib{s}")),
                    schema_url: if s == 0 { String::new() } else { "https://schema/s".into() },
                    spans: (0..3)
                        .map(|_| {
                            seed += 1;
                            test_span(seed)
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

fn test_log(seed: u8) -> LogRecord {
    LogRecord {
        time_unix_nano: if seed.is_multiple_of(2) { 0 } else { 100 + u64::from(seed) },
        observed_time_unix_nano: 200,
        severity_number: [9, 17, 300, -1][usize::from(seed % 4)],
        severity_text: "INFO".into(),
        body: some_value(Value::KvlistValue(KeyValueList { values: attributes() })),
        attributes: attributes(),
        flags: 1,
        trace_id: if seed.is_multiple_of(3) { vec![] } else { TRACE.to_vec() },
        span_id: if seed.is_multiple_of(3) { vec![] } else { SPAN.to_vec() },
        event_name: "e".into(),
        ..Default::default()
    }
}

fn logs() -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource("logsvc"),
            scope_logs: vec![ScopeLogs {
                scope: scope("logger"),
                log_records: (0..4).map(test_log).collect(),
                schema_url: "u".into(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn number(value: number_data_point::Value) -> NumberDataPoint {
    NumberDataPoint { attributes: attributes(), time_unix_nano: 9, value: Some(value), ..Default::default() }
}

fn metrics_request() -> ExportMetricsServiceRequest {
    let exemplar = Exemplar { trace_id: TRACE.to_vec(), span_id: SPAN.to_vec(), ..Default::default() };
    let data = vec![
        Data::Gauge(metrics::Gauge { data_points: vec![number(number_data_point::Value::AsInt(1)); 2] }),
        Data::Sum(metrics::Sum {
            data_points: vec![number(number_data_point::Value::AsDouble(1.5)); 3],
            aggregation_temporality: 2,
            is_monotonic: true,
        }),
        Data::Histogram(metrics::Histogram {
            data_points: vec![HistogramDataPoint {
                count: 3,
                bucket_counts: vec![1, 2],
                explicit_bounds: vec![1.0],
                exemplars: vec![exemplar],
                min: Some(0.5),
                ..Default::default()
            }],
            aggregation_temporality: 1,
        }),
        Data::ExponentialHistogram(metrics::ExponentialHistogram {
            data_points: vec![ExponentialHistogramDataPoint {
                scale: -2,
                positive: Some(Buckets { offset: -1, bucket_counts: vec![1, 300] }),
                ..Default::default()
            }],
            aggregation_temporality: 1,
        }),
        Data::Summary(metrics::Summary { data_points: vec![SummaryDataPoint { count: 1, ..Default::default() }; 2] }),
    ];
    let metrics = data
        .into_iter()
        .map(|d| Metric { name: "m".into(), unit: "1".into(), data: Some(d), ..Default::default() })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: resource("m"),
            scope_metrics: vec![ScopeMetrics { scope: scope("meter"), metrics, schema_url: String::new() }],
            schema_url: String::new(),
        }],
    }
}

/// Rebuilds an export request from a batch, one resource group per scope block.
fn rebuild(resources: &[ResourceBlock], scopes: &[ScopeBlock], items: &[(u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, scope) in scopes.iter().enumerate() {
        let resource = &resources[scope.resource as usize];
        let mut bodies = items.iter().filter(|(s, _)| *s as usize == index).map(|(_, body)| *body);
        encode_resource_group(
            &mut out,
            &resource.resource,
            &resource.schema_url,
            &scope.scope,
            &scope.schema_url,
            &mut bodies,
        );
    }
    out
}

fn rebuild_traces(batch: &SpanBatch) -> Vec<u8> {
    let items: Vec<(u32, &[u8])> = batch.spans.iter().map(|s| (s.scope, s.body.as_slice())).collect();
    rebuild(&batch.resources, &batch.scopes, &items)
}

fn rebuild_logs(batch: &LogBatch) -> Vec<u8> {
    let items: Vec<(u32, &[u8])> = batch.logs.iter().map(|l| (l.scope, l.body.as_slice())).collect();
    rebuild(&batch.resources, &batch.scopes, &items)
}

#[test]
fn traces_are_transcoded_like_prost_decodes_them() {
    let request = traces(2);
    let batch = transcode_traces(&request.encode_to_vec(), 42, &Limits::NONE).unwrap().batch;
    assert_eq!(batch.received_unix_nano, 42);
    assert_eq!((batch.resources.len(), batch.scopes.len(), batch.spans.len()), (2, 4, 12));
    let mut spans = batch.spans.iter();
    for (r, rs) in request.resource_spans.iter().enumerate() {
        let block = &batch.resources[r];
        assert_eq!(block.resource, rs.resource.as_ref().unwrap().encode_to_vec());
        assert_eq!(block.schema_url, rs.schema_url);
        assert_eq!(block.service_name, format!("svc{r}"));
        for (s, ss) in rs.scope_spans.iter().enumerate() {
            let index = r * 2 + s;
            let scope_block = &batch.scopes[index];
            assert_eq!(scope_block.resource as usize, r);
            assert_eq!(scope_block.scope, ss.scope.as_ref().unwrap().encode_to_vec());
            assert_eq!(scope_block.schema_url, ss.schema_url);
            for span in &ss.spans {
                let record = spans.next().unwrap();
                assert_eq!(record.trace_id.as_slice(), span.trace_id.as_slice());
                assert_eq!(record.span_id.as_slice(), span.span_id.as_slice());
                let parent = if span.parent_span_id.is_empty() { vec![0; 8] } else { span.parent_span_id.clone() };
                assert_eq!(record.parent_span_id.to_vec(), parent);
                assert_eq!(record.start_unix_nano, span.start_time_unix_nano);
                assert_eq!(record.end_unix_nano, span.end_time_unix_nano);
                assert_eq!(i32::from(record.status_code), span.status.as_ref().map_or(0, |s| s.code));
                assert_eq!(i32::from(record.kind), span.kind);
                assert_eq!(record.scope as usize, index);
                assert_eq!(record.name, span.name);
                assert_eq!(record.body, span.encode_to_vec());
                assert_eq!(Span::decode(record.body.as_slice()).unwrap(), *span);
            }
        }
    }
}

#[test]
fn rebuilt_trace_requests_equal_the_original() {
    // One scope per resource: byte-identical.
    let request = traces(1);
    let encoded = request.encode_to_vec();
    let rebuilt = rebuild_traces(&transcode_traces(&encoded, 0, &Limits::NONE).unwrap().batch);
    assert_eq!(rebuilt, encoded);
    assert_eq!(ExportTraceServiceRequest::decode(rebuilt.as_slice()).unwrap(), request);

    // Several scopes per resource come back as one resource group per scope.
    let request = traces(3);
    let rebuilt = rebuild_traces(&transcode_traces(&request.encode_to_vec(), 0, &Limits::NONE).unwrap().batch);
    let split: Vec<ResourceSpans> = request
        .resource_spans
        .iter()
        .flat_map(|rs| rs.scope_spans.iter().map(|ss| ResourceSpans { scope_spans: vec![ss.clone()], ..rs.clone() }))
        .collect();
    let decoded = ExportTraceServiceRequest::decode(rebuilt.as_slice()).unwrap();
    assert_eq!(decoded, ExportTraceServiceRequest { resource_spans: split });
}

#[test]
fn encode_resource_group_omits_empty_fields() {
    let spans = [test_span(1).encode_to_vec(), test_span(2).encode_to_vec()];
    let mut out = vec![0xaa];
    encode_resource_group(&mut out, &[], "", &[], "", &mut spans.iter().map(Vec::as_slice));
    let expected = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans: vec![test_span(1), test_span(2)], ..Default::default() }],
            ..Default::default()
        }],
    };
    assert_eq!(out[0], 0xaa);
    assert_eq!(out[1..], expected.encode_to_vec());
    // Large groups need multi-byte lengths at every level.
    let big = vec![test_span(3).encode_to_vec(); 200];
    let mut out = Vec::new();
    encode_resource_group(&mut out, b"\x10\x01", "r", b"\x0a\x01x", "s", &mut big.iter().map(Vec::as_slice));
    let decoded = ExportTraceServiceRequest::decode(out.as_slice()).unwrap();
    assert_eq!(decoded.resource_spans[0].scope_spans[0].spans.len(), 200);
    assert_eq!(decoded.resource_spans[0].schema_url, "r");
    assert_eq!(decoded.resource_spans[0].scope_spans[0].scope.as_ref().unwrap().name, "x");
}

#[test]
fn logs_are_transcoded_like_prost_decodes_them() {
    let request = logs();
    let encoded = request.encode_to_vec();
    let batch = transcode_logs(&encoded, 7, &[], &Limits::NONE).unwrap().batch;
    assert_eq!(batch.resources[0].service_name, "logsvc");
    assert_eq!(batch.scopes[0].schema_url, "u");
    let records = &request.resource_logs[0].scope_logs[0].log_records;
    assert_eq!(batch.logs.len(), records.len());
    for (entry, record) in batch.logs.iter().zip(records) {
        let trace = if record.trace_id.is_empty() { vec![0; 16] } else { record.trace_id.clone() };
        assert_eq!(entry.trace_id.to_vec(), trace);
        assert_eq!(entry.span_id.iter().any(|b| *b != 0), !record.span_id.is_empty());
        let time = if record.time_unix_nano == 0 { record.observed_time_unix_nano } else { record.time_unix_nano };
        assert_eq!(entry.time_unix_nano, time);
        assert_eq!(i32::from(entry.severity_number), record.severity_number.clamp(0, 255));
        assert_eq!(entry.body, record.encode_to_vec());
    }
    let rebuilt = rebuild_logs(&batch);
    assert_eq!(rebuilt, encoded);
    assert_eq!(ExportLogsServiceRequest::decode(rebuilt.as_slice()).unwrap(), request);
}

#[test]
fn metric_points_are_counted() {
    assert_eq!(count_metric_points(&metrics_request().encode_to_vec()).unwrap(), 9);
    assert_eq!(count_metric_points(&[]).unwrap(), 0);
    let mut bad = metrics_request();
    bad.resource_metrics[0].scope_metrics[0].metrics[2].data = Some(Data::Histogram(metrics::Histogram {
        data_points: vec![HistogramDataPoint {
            exemplars: vec![Exemplar { trace_id: vec![1; 5], ..Default::default() }],
            ..Default::default()
        }],
        aggregation_temporality: 1,
    }));
    assert_eq!(
        count_metric_points(&bad.encode_to_vec()).unwrap_err().to_string(),
        "resource_metrics[0].scope_metrics[0].metrics[2].histogram.data_points[0].exemplars[0].trace_id: must be empty or 16 bytes, got 5"
    );
    // bucket_counts unpacked (one 64-bit field per count) is as valid as packed.
    let point: Vec<u8> = [&[6u8 << 3 | 1][..], &[1u8; 8][..], &[6u8 << 3 | 1][..], &[2u8; 8][..]].concat();
    let request = ld(1, &ld(2, &ld(2, &ld(9, &ld(1, &point)))));
    assert_eq!(count_metric_points(&request).unwrap(), 1);
    let decoded = ExportMetricsServiceRequest::decode(request.as_slice()).unwrap();
    let Some(Data::Histogram(h)) = &decoded.resource_metrics[0].scope_metrics[0].metrics[0].data else { panic!() };
    assert_eq!(h.data_points[0].bucket_counts.len(), 2);
    let packed_odd = ld(1, &ld(2, &ld(2, &ld(9, &ld(1, &ld(6, &[0; 9]))))));
    assert!(
        count_metric_points(&packed_odd)
            .unwrap_err()
            .to_string()
            .ends_with("bucket_counts: packed length 9 is not a multiple of 8")
    );
}

#[test]
fn partial_success_is_read() {
    let response = ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess { rejected_spans: 5, error_message: "bad span".into() }),
    };
    assert_eq!(parse_partial_success(&response.encode_to_vec()).unwrap(), (5, "bad span".into()));
    let response = ExportLogsServiceResponse {
        partial_success: Some(ExportLogsPartialSuccess { rejected_log_records: -1, error_message: String::new() }),
    };
    assert_eq!(parse_partial_success(&response.encode_to_vec()).unwrap(), (-1, String::new()));
    let response = ExportMetricsServiceResponse {
        partial_success: Some(ExportMetricsPartialSuccess { rejected_data_points: 3, error_message: "x".into() }),
    };
    assert_eq!(parse_partial_success(&response.encode_to_vec()).unwrap(), (3, "x".into()));
    assert_eq!(parse_partial_success(&[]).unwrap(), (0, String::new()));
    assert!(parse_partial_success(&[0x0a, 0x05, 0x08]).is_err());
}

fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
    out
}

/// A length-delimited field.
fn ld(number: u64, payload: &[u8]) -> Vec<u8> {
    [varint(number << 3 | 2), varint(payload.len() as u64), payload.to_vec()].concat()
}

/// A request with the given encoded span in resource_spans[0].scope_spans[1].spans[3].
fn with_span(span: &[u8]) -> Vec<u8> {
    let good = test_span(1).encode_to_vec();
    let second_scope = [ld(2, &good), ld(2, &good), ld(2, &good), ld(2, span)].concat();
    ld(1, &[ld(2, &ld(2, &good)), ld(2, &second_scope)].concat())
}

/// The refusal of the one bad span; the request's four other spans are accepted.
fn span_error(span: Span) -> String {
    let Transcoded { batch, rejected, .. } =
        transcode_traces(&with_span(&span.encode_to_vec()), 0, &Limits::NONE).unwrap();
    assert_eq!((batch.spans.len(), rejected.count), (4, 1), "only the bad span is refused");
    rejected.first.unwrap()
}

#[test]
fn a_span_with_bad_ids_is_refused_alone_with_its_path() {
    let path = "resource_spans[0].scope_spans[1].spans[3]";
    assert_eq!(
        span_error(Span { trace_id: vec![1; 5], ..test_span(1) }),
        format!("{path}.trace_id: must be 16 bytes, got 5")
    );
    assert_eq!(
        span_error(Span { trace_id: vec![], ..test_span(1) }),
        format!("{path}.trace_id: must be 16 bytes, got 0")
    );
    assert_eq!(
        span_error(Span { trace_id: vec![0; 16], ..test_span(1) }),
        format!("{path}.trace_id: must not be all zero")
    );
    assert_eq!(
        span_error(Span { span_id: vec![1; 9], ..test_span(1) }),
        format!("{path}.span_id: must be 8 bytes, got 9")
    );
    assert_eq!(
        span_error(Span { span_id: vec![0; 8], ..test_span(1) }),
        format!("{path}.span_id: must not be all zero")
    );
    assert_eq!(
        span_error(Span { parent_span_id: vec![1; 3], ..test_span(1) }),
        format!("{path}.parent_span_id: must be empty or 8 bytes, got 3")
    );
    let link = span::Link { trace_id: vec![1; 4], ..Default::default() };
    assert_eq!(
        span_error(Span { links: vec![span::Link::default(), link], ..test_span(1) }),
        format!("{path}.links[1].trace_id: must be empty or 16 bytes, got 4")
    );
    let mut request = logs();
    let records = request.resource_logs[0].scope_logs[0].log_records.len();
    request.resource_logs[0].scope_logs[0].log_records[2].span_id = vec![1; 7];
    let Transcoded { batch, rejected, .. } = transcode_logs(&request.encode_to_vec(), 0, &[], &Limits::NONE).unwrap();
    assert_eq!((batch.logs.len(), rejected.count), (records - 1, 1));
    assert_eq!(
        rejected.first.as_deref(),
        Some("resource_logs[0].scope_logs[0].log_records[2].span_id: must be empty or 8 bytes, got 7")
    );
    assert_eq!(
        rejected.message("log records"),
        format!("1 log records rejected; the first: {}", rejected.first.unwrap())
    );
    // Every span of a scope refused: the scope (and its resource) leave no empty block behind.
    let bad = Span { trace_id: vec![0; 16], ..test_span(1) }.encode_to_vec();
    let Transcoded { batch, rejected, .. } =
        transcode_traces(&ld(1, &ld(2, &[ld(2, &bad), ld(2, &bad)].concat())), 0, &Limits::NONE).unwrap();
    assert_eq!((batch.spans.len(), batch.scopes.len(), batch.resources.len(), rejected.count), (0, 0, 0, 2));
}

#[test]
fn an_all_zero_parent_is_a_root_span() {
    let Transcoded { batch, rejected, .. } = transcode_traces(
        &with_span(&Span { parent_span_id: vec![0; 8], ..test_span(1) }.encode_to_vec()),
        0,
        &Limits::NONE,
    )
    .unwrap();
    assert_eq!((batch.spans.len(), rejected.count), (5, 0));
    assert_eq!(batch.spans[4].parent_span_id, [0; 8]);
}

#[test]
fn a_bad_id_does_not_excuse_malformed_bytes_after_it() {
    // A link with an invalid trace id, then a status message that is not UTF-8: the request is
    // malformed, refused whole.
    let link = span::Link { trace_id: vec![1; 4], ..Default::default() };
    let status = Some(Status { message: "NAME".into(), ..Default::default() });
    let mut encoded = with_span(&Span { links: vec![link], status, ..test_span(1) }.encode_to_vec());
    let at = encoded.windows(4).position(|w| w == b"NAME").unwrap();
    encoded[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0x80, 0x41]);
    let err = transcode_traces(&encoded, 0, &Limits::NONE).unwrap_err().to_string();
    assert!(err.contains("malformed item after an invalid id"), "{err}");
}

#[test]
fn invalid_utf8_is_rejected() {
    let mut encoded = with_span(&Span { name: "NAME".into(), ..test_span(1) }.encode_to_vec());
    let at = encoded.windows(4).position(|w| w == b"NAME").unwrap();
    encoded[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0x80, 0x41]);
    assert!(ExportTraceServiceRequest::decode(encoded.as_slice()).is_err());
    assert_eq!(
        transcode_traces(&encoded, 0, &Limits::NONE).unwrap_err().to_string(),
        "resource_spans[0].scope_spans[1].spans[3].name: string is not valid UTF-8"
    );
    let mut encoded = with_span(
        &Span { attributes: vec![kv("k", Value::StringValue("VALUE".into()))], ..test_span(1) }.encode_to_vec(),
    );
    let at = encoded.windows(5).position(|w| w == b"VALUE").unwrap();
    encoded[at] = 0xc0;
    assert_eq!(
        transcode_traces(&encoded, 0, &Limits::NONE).unwrap_err().to_string(),
        "resource_spans[0].scope_spans[1].spans[3].attributes[0].value.string_value: string is not valid UTF-8"
    );
}

#[test]
fn truncated_and_garbage_input_is_rejected() {
    let encoded = traces(1).encode_to_vec();
    let last = traces(1).resource_spans[1].encoded_len();
    assert_eq!(
        transcode_traces(&encoded[..encoded.len() - 1], 0, &Limits::NONE).unwrap_err().to_string(),
        format!(
            "resource_spans[1]: truncated message at byte {}",
            encoded.len() - prost::length_delimiter_len(last) - last - 1
        )
    );
    let mut rejected = 0;
    for cut in 1..encoded.len() {
        if let Err(err) = transcode_traces(&encoded[..cut], 0, &Limits::NONE) {
            assert!(err.to_string().contains("truncated message at byte"), "{err}");
            rejected += 1;
        }
    }
    // Only the cut between the two resource groups leaves a valid (shorter) request.
    assert_eq!(rejected, encoded.len() - 2);
    let garbage: &[(&[u8], &str)] = &[
        (b"\x0f", "invalid wire type 7 at byte 0"),
        (b"\x0b\x0c", "group (wire type 3) at byte 0 is not supported"),
        (b"\x00", "invalid field key at byte 0"),
        (b"\x10", "truncated message at byte 1"),
        (b"\x11\x01\x02", "truncated message at byte 1"),
        (b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x02", "malformed varint at byte 1"),
        (b"\x0a\x80\x01\x00", "resource_spans[0]: truncated message at byte 0"),
        (b"\x08\x01", "resource_spans[0]: wire type 0 at byte 0 does not match the field (expected length-delimited)"),
        (b"{\"resourceSpans\":[]}", "group (wire type 3) at byte 0 is not supported"),
    ];
    for (bytes, message) in garbage {
        assert_eq!(transcode_traces(bytes, 0, &Limits::NONE).unwrap_err().to_string(), *message, "{bytes:?}");
    }
    let span = [ld(1, &TRACE), ld(2, &SPAN), varint(5 << 3), varint(1)].concat();
    assert_eq!(
        transcode_traces(&with_span(&span), 0, &Limits::NONE).unwrap_err().to_string(),
        format!(
            "resource_spans[0].scope_spans[1].spans[3].name: wire type 0 at byte {} does not match the field (expected length-delimited)",
            with_span(&span).len() - 2
        )
    );
}

#[test]
fn unknown_fields_are_skipped_and_kept() {
    let unknown = [
        varint(100 << 3),
        varint(300),
        varint(101 << 3 | 1),
        vec![0; 8],
        ld(102, b"xyz"),
        varint(103 << 3 | 5),
        vec![0; 4],
    ]
    .concat();
    let span = [test_span(1).encode_to_vec(), unknown.clone()].concat();
    let request = [with_span(&span), unknown.clone()].concat();
    let batch = transcode_traces(&request, 0, &Limits::NONE).unwrap().batch;
    assert_eq!(batch.spans[4].body, span);
    assert_eq!(batch.spans[4].name, "GET /1");
    let with_group = [test_span(1).encode_to_vec(), varint(104 << 3 | 3), varint(104 << 3 | 4)].concat();
    assert!(
        transcode_traces(&with_span(&with_group), 0, &Limits::NONE)
            .unwrap_err()
            .to_string()
            .contains("group (wire type 3)")
    );
}

#[test]
fn service_name_and_empty_groups() {
    let mut request = traces(1);
    request.resource_spans[0].resource =
        Some(Resource { attributes: vec![kv("service.name", Value::IntValue(1))], ..Default::default() });
    request.resource_spans[1].resource = None;
    request.resource_spans.push(ResourceSpans { resource: resource("empty"), ..Default::default() });
    request.resource_spans.push(ResourceSpans { scope_spans: vec![ScopeSpans::default()], ..Default::default() });
    let batch = transcode_traces(&request.encode_to_vec(), 0, &Limits::NONE).unwrap().batch;
    assert_eq!(batch.resources.len(), 2);
    assert_eq!(batch.resources[0].service_name, "");
    assert_eq!(batch.resources[1].service_name, "");
    assert!(batch.resources[1].resource.is_empty());
    assert_eq!(batch.scopes.len(), 2);
    assert_eq!(batch.spans.len(), 6);
}

fn nested(levels: usize) -> Value {
    let mut value = Value::StringValue("leaf".into());
    for _ in 0..levels {
        value = Value::ArrayValue(ArrayValue { values: vec![AnyValue { value: Some(value) }] });
    }
    value
}

#[test]
fn nesting_is_limited() {
    // The deepest AnyValue sits at depth 5 + 2 * levels (request = 0, span = 3).
    let ok = with_span(&Span { attributes: vec![kv("deep", nested(13))], ..test_span(1) }.encode_to_vec());
    assert!(transcode_traces(&ok, 0, &Limits::NONE).is_ok());
    let deep = with_span(&Span { attributes: vec![kv("deep", nested(14))], ..test_span(1) }.encode_to_vec());
    assert!(ExportTraceServiceRequest::decode(deep.as_slice()).is_ok());
    let err = transcode_traces(&deep, 0, &Limits::NONE).unwrap_err().to_string();
    assert!(
        err.starts_with("resource_spans[0].scope_spans[1].spans[3].attributes[0].value.array_value.values[0]"),
        "{err}"
    );
    assert!(err.ends_with("nesting deeper than 32"), "{err}");
}

fn samples() -> Vec<Vec<u8>> {
    let response = ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess { rejected_spans: 5, error_message: "bad".into() }),
    };
    let small = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", Value::StringValue("s".into()))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    attributes: vec![kv("a", nested(2))],
                    status: Some(Status { code: 2, ..Default::default() }),
                    ..test_span(2)
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    vec![
        small.encode_to_vec(),
        traces(2).encode_to_vec(),
        logs().encode_to_vec(),
        metrics_request().encode_to_vec(),
        response.encode_to_vec(),
    ]
}

/// Runs every entry point; whatever is accepted must decode with prost as well, and so must the
/// requests rebuilt from the batches.
fn exercise(bytes: &[u8]) {
    if let Ok(Transcoded { batch, .. }) = transcode_traces(bytes, 0, &Limits::NONE) {
        assert!(ExportTraceServiceRequest::decode(bytes).is_ok(), "{bytes:?}");
        assert!(ExportTraceServiceRequest::decode(rebuild_traces(&batch).as_slice()).is_ok(), "{bytes:?}");
    }
    if let Ok(Transcoded { batch, .. }) = transcode_logs(bytes, 0, &[], &Limits::NONE) {
        assert!(ExportLogsServiceRequest::decode(bytes).is_ok(), "{bytes:?}");
        assert!(ExportLogsServiceRequest::decode(rebuild_logs(&batch).as_slice()).is_ok(), "{bytes:?}");
    }
    if count_metric_points(bytes).is_ok() {
        assert!(ExportMetricsServiceRequest::decode(bytes).is_ok(), "{bytes:?}");
    }
    if parse_partial_success(bytes).is_ok() {
        assert!(ExportTraceServiceResponse::decode(bytes).is_ok(), "{bytes:?}");
    }
}

#[test]
fn every_truncation_and_byte_flip_is_handled() {
    for sample in samples() {
        for cut in 0..sample.len() {
            exercise(&sample[..cut]);
        }
        for index in 0..sample.len() {
            for mask in [0x01, 0x07, 0x80, 0xff] {
                let mut damaged = sample.clone();
                damaged[index] ^= mask;
                exercise(&damaged);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_requests_never_panic(
        which in 0usize..5,
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = samples().swap_remove(which);
        for (index, mask) in flips {
            let index = index.index(bytes.len());
            bytes[index] ^= mask;
        }
        let cut = cut.index(bytes.len() + 1);
        bytes.truncate(cut);
        exercise(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        exercise(&bytes);
    }
}

#[test]
fn untraced_log_records_carry_their_duration_attribute() {
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    let attribute = |key: &str, value: any_value::Value| KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    };
    let record = |trace: bool, attributes| LogRecord {
        trace_id: if trace { vec![7; 16] } else { Vec::new() },
        attributes,
        ..Default::default()
    };
    let request = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs {
                log_records: vec![
                    record(false, vec![attribute("duration_ms", any_value::Value::IntValue(350))]),
                    record(false, vec![attribute("elapsed_ms", any_value::Value::StringValue("12.5".into()))]),
                    record(false, vec![attribute("duration_us", any_value::Value::DoubleValue(40.0))]),
                    record(true, vec![attribute("duration_ms", any_value::Value::IntValue(350))]),
                    record(false, vec![attribute("other", any_value::Value::IntValue(350))]),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let keys = vec![("duration_ms".to_owned(), 1e6), ("elapsed_ms".to_owned(), 1e6), ("duration_us".to_owned(), 1e3)];
    let batch = transcode_logs(&request.encode_to_vec(), 0, &keys, &Limits::NONE).unwrap().batch;
    let durations: Vec<u64> = batch.logs.iter().map(|log| log.duration_nanos).collect();
    // A traced record follows its trace: its duration is never looked at.
    assert_eq!(durations, vec![350_000_000, 12_500_000, 40_000, 0, 0]);
}

#[test]
fn items_over_a_cap_are_cut_down_and_counted_and_the_others_kept_byte_for_byte() {
    let limits = Limits { attributes: 128, value_length: Some(8), events: 128, links: 128 };
    let within = test_span(1);
    let mut over = test_span(3);
    over.attributes = (0..200).map(|i| kv(&format!("k{i}"), Value::IntValue(i))).collect();
    over.attributes[0] = kv("long", Value::StringValue("ééééééééééé".into()));
    over.attributes[1] = kv(
        "list",
        Value::ArrayValue(ArrayValue { values: vec![some_value(Value::StringValue("x".repeat(20))).unwrap()] }),
    );
    over.events = (0..150).map(|_| span::Event { name: "ev".into(), ..Default::default() }).collect();
    over.links = (0..130)
        .map(|_| span::Link { trace_id: TRACE.to_vec(), span_id: SPAN.to_vec(), ..Default::default() })
        .collect();
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: resource("svc"),
            scope_spans: vec![ScopeSpans {
                scope: scope("lib"),
                spans: vec![within.clone(), over],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec();
    let Transcoded { batch, rejected, truncated } = transcode_traces(&request, 0, &limits).unwrap();
    assert_eq!(rejected.count, 0);
    assert_eq!(truncated, Truncated { attributes: 72, values: 2, events: 22, links: 2 });
    assert_eq!(batch.spans[0].body, within.encode_to_vec(), "a span within the caps is kept as sent");
    let cut = Span::decode(batch.spans[1].body.as_slice()).unwrap();
    assert_eq!((cut.attributes.len(), cut.dropped_attributes_count), (128, 1 + 72));
    assert_eq!(cut.attributes[0].value, some_value(Value::StringValue("éééééééé".into())), "8 characters, not bytes");
    assert_eq!(
        cut.attributes[1].value,
        some_value(Value::ArrayValue(ArrayValue {
            values: vec![some_value(Value::StringValue("x".repeat(8))).unwrap()]
        }))
    );
    assert_eq!((cut.events.len(), cut.dropped_events_count), (128, 22));
    assert_eq!((cut.links.len(), cut.dropped_links_count), (128, 2));
    assert_eq!(batch.spans[1].name, "GET /3", "the lifted fields are the span's");
    // Without caps the same request is kept as sent.
    let Transcoded { batch, truncated, .. } = transcode_traces(&request, 0, &Limits::NONE).unwrap();
    assert!(!truncated.any());
    assert_eq!(Span::decode(batch.spans[1].body.as_slice()).unwrap().attributes.len(), 200);
    // Log records: the attribute caps.
    let mut request = logs();
    let record = &mut request.resource_logs[0].scope_logs[0].log_records[0];
    record.attributes = (0..130).map(|i| kv(&format!("k{i}"), Value::IntValue(i))).collect();
    let Transcoded { batch, truncated, .. } = transcode_logs(&request.encode_to_vec(), 0, &[], &limits).unwrap();
    assert_eq!(truncated.attributes, 2);
    let cut = LogRecord::decode(batch.logs[0].body.as_slice()).unwrap();
    assert_eq!((cut.attributes.len(), cut.dropped_attributes_count), (128, 2));
}
