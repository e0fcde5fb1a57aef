//! OTLP/HTTP JSON bodies as the spec writes them, through `json_to_protobuf`.

use super::*;

const SPEC_TRACES: &str = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"checkout"}}]},"scopeSpans":[{"scope":{"name":"x"},"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"GET /","kind":2,"startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000","status":{"code":2}}]}]}]}"#;

#[test]
fn spec_json_traces_convert() {
    let encoded = json_to_protobuf(Signal::Traces, SPEC_TRACES.as_bytes()).unwrap();
    let expected = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", Value::StringValue("checkout".into()))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope { name: "x".into(), ..Default::default() }),
                spans: vec![Span {
                    trace_id: TRACE.to_vec(),
                    span_id: SPAN.to_vec(),
                    name: "GET /".into(),
                    kind: 2,
                    start_time_unix_nano: 1_544_712_660_000_000_000,
                    end_time_unix_nano: 1_544_712_661_000_000_000,
                    status: Some(Status { code: 2, ..Default::default() }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    assert_eq!(encoded, expected.encode_to_vec());
    let batch = transcode_traces(&encoded, 0, &Limits::NONE).unwrap().batch;
    assert_eq!(batch.resources[0].service_name, "checkout");
    assert_eq!((batch.spans[0].trace_id, batch.spans[0].status_code, batch.spans[0].kind), (TRACE, 2, 2));
    // Upper-case hex, 64-bit integers as JSON numbers and unknown keys are accepted too.
    let variant = SPEC_TRACES
        .replace("5b8efff798038103d269b633813fc60c", "5B8EFFF798038103D269B633813FC60C")
        .replace("\"1544712660000000000\"", "1544712660000000000")
        .replace("\"kind\":2", "\"kind\":2,\"someFutureField\":{\"a\":[1]}");
    assert_eq!(json_to_protobuf(Signal::Traces, variant.as_bytes()).unwrap(), encoded);
}

#[test]
fn json_forms_the_derives_reject_are_normalized() {
    let variant = SPEC_TRACES
        .replace("\"kind\":2", "\"kind\":\"SPAN_KIND_SERVER\",\"parentSpanId\":null,\"droppedAttributesCount\":\"0\"")
        .replace("\"code\":2", "\"code\":\"STATUS_CODE_ERROR\",\"message\":null");
    assert_eq!(
        json_to_protobuf(Signal::Traces, variant.as_bytes()).unwrap(),
        json_to_protobuf(Signal::Traces, SPEC_TRACES.as_bytes()).unwrap()
    );
    let empty_lists = SPEC_TRACES.replace(
        "\"kind\":2",
        r#""kind":2,"attributes":[{"key":"a","value":{"arrayValue":{}}},{"key":"k","value":{"kvlistValue":{"values":null}}}]"#,
    );
    let decoded =
        ExportTraceServiceRequest::decode(json_to_protobuf(Signal::Traces, empty_lists.as_bytes()).unwrap().as_slice())
            .unwrap();
    let attributes = &decoded.resource_spans[0].scope_spans[0].spans[0].attributes;
    assert_eq!(attributes[0].value, some_value(Value::ArrayValue(ArrayValue::default())));
    assert_eq!(attributes[1].value, some_value(Value::KvlistValue(KeyValueList::default())));
}

#[test]
fn spec_json_logs_and_metrics_convert() {
    let logs = r#"{"resourceLogs":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"api"}}]},"scopeLogs":[{"scope":{},"logRecords":[{"timeUnixNano":"1544712660300000000","observedTimeUnixNano":"1544712660300000000","severityNumber":17,"severityText":"Error","traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","body":{"stringValue":"Example log record"},"attributes":[{"key":"int","value":{"intValue":"10"}},{"key":"double","value":{"doubleValue":637.704}},{"key":"bytes","value":{"bytesValue":"aGVsbG8="}}]}]}]}]}"#;
    let batch =
        transcode_logs(&json_to_protobuf(Signal::Logs, logs.as_bytes()).unwrap(), 0, &[], &Limits::NONE).unwrap().batch;
    assert_eq!(batch.resources[0].service_name, "api");
    let entry = &batch.logs[0];
    assert_eq!((entry.trace_id, entry.span_id, entry.severity_number), (TRACE, SPAN, 17));
    assert_eq!(entry.time_unix_nano, 1_544_712_660_300_000_000);
    let record = LogRecord::decode(entry.body.as_slice()).unwrap();
    assert_eq!(record.attributes[0].value, some_value(Value::IntValue(10)));
    assert_eq!(record.attributes[2].value, some_value(Value::BytesValue(b"hello".to_vec())));

    let metrics = r#"{"resourceMetrics":[{"resource":{},"scopeMetrics":[{"scope":{"name":"s"},"metrics":[
        {"name":"c","unit":"1","sum":{"aggregationTemporality":1,"isMonotonic":true,"dataPoints":[{"asDouble":5,"startTimeUnixNano":"1544712660300000000","timeUnixNano":"1544712660300000000"}]}},
        {"name":"g","gauge":{"dataPoints":[{"asInt":"7","timeUnixNano":"1"},{"asInt":8,"timeUnixNano":"2"}]}},
        {"name":"h","histogram":{"aggregationTemporality":1,"dataPoints":[{"count":"3","sum":4.5,"bucketCounts":["1","2"],"explicitBounds":[1.0],"exemplars":[{"asDouble":1.0,"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174"}]}]}},
        {"name":"e","exponentialHistogram":{"aggregationTemporality":2,"dataPoints":[{"count":"3","scale":1,"zeroCount":"1","positive":{"offset":-1,"bucketCounts":["1","1"]},"negative":{}}]}},
        {"name":"s","summary":{"dataPoints":[{"count":"2","sum":3,"quantileValues":[{"quantile":0.5,"value":1},{"quantile":1,"value":"Infinity"}]}]}}
    ]}]}]}"#;
    let encoded = json_to_protobuf(Signal::Metrics, metrics.as_bytes()).unwrap();
    assert_eq!(count_metric_points(&encoded).unwrap(), 6);
    let decoded = ExportMetricsServiceRequest::decode(encoded.as_slice()).unwrap();
    let metrics = &decoded.resource_metrics[0].scope_metrics[0].metrics;
    let Some(Data::Gauge(gauge)) = &metrics[1].data else { panic!("{:?}", metrics[1]) };
    assert_eq!(gauge.data_points[0].value, Some(number_data_point::Value::AsInt(7)));
    assert_eq!(gauge.data_points[1].value, Some(number_data_point::Value::AsInt(8)));
}

#[test]
fn bad_json_is_reported() {
    let err = json_to_protobuf(Signal::Traces, b"{\"resourceSpans\": [").unwrap_err().to_string();
    assert!(err.starts_with("invalid json: EOF while parsing"), "{err}");
    let odd = SPEC_TRACES.replace("eee19b7ec3c1b174", "eee19b7ec3c1b17");
    let err = json_to_protobuf(Signal::Traces, odd.as_bytes()).unwrap_err().to_string();
    assert!(err.starts_with("invalid json: odd number of digits at line 1 column"), "{err}");
    let missing_key = SPEC_TRACES.replace("\"kind\":2", r#""kind":2,"attributes":[{"value":{"stringValue":"v"}}]"#);
    let err = json_to_protobuf(Signal::Traces, missing_key.as_bytes()).unwrap_err().to_string();
    assert!(err.starts_with("invalid json: missing field `key` at line 1 column"), "{err}");
    for not_an_object in [&b"\"x\""[..], b"[]", b" [{}]", b"null", b""] {
        let err = json_to_protobuf(Signal::Logs, not_an_object).unwrap_err().to_string();
        assert_eq!(err, "invalid json: the body must be a JSON object (an Export*ServiceRequest)");
    }
    // null is the default and unknown members are ignored, however deep: empty requests.
    assert!(json_to_protobuf(Signal::Traces, br#"{"resourceSpans": null}"#).unwrap().is_empty());
    let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(50_000), "]".repeat(50_000));
    assert!(json_to_protobuf(Signal::Traces, deep.as_bytes()).unwrap().is_empty());
    // A hex span id of the wrong length parses as JSON; the wire check rejects it.
    let short = SPEC_TRACES.replace("eee19b7ec3c1b174", "eee19b7ec3");
    let encoded = json_to_protobuf(Signal::Traces, short.as_bytes()).unwrap();
    let Transcoded { batch, rejected, .. } = transcode_traces(&encoded, 0, &Limits::NONE).unwrap();
    assert_eq!(batch.spans.len(), 0);
    assert_eq!(
        rejected.first.as_deref(),
        Some("resource_spans[0].scope_spans[0].spans[0].span_id: must be 8 bytes, got 5")
    );
}
