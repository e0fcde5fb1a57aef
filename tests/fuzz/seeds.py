#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/seed-*).

Protobuf seeds are encoded by the official OpenTelemetry Python protobuf classes (what the SDK
exporters send) and googleapis' google.rpc messages; JSON seeds follow the OTLP/HTTP JSON
encoding (hex ids, lowerCamelCase keys, 64-bit integers as strings). Run with the tests' SDK
virtualenv: `target/sdk-venv/bin/python3 tests/fuzz/seeds.py`. The seeds are committed; the
fuzzer's finds are merged next to them by `tests/fuzz/run.sh --merge`.
"""

import json
import os
import struct

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(ROOT, target, "seed-" + name), "wb") as f:
        f.write(data)


def kv(key, value):
    if isinstance(value, bool):
        any_value = common_pb2.AnyValue(bool_value=value)
    elif isinstance(value, int):
        any_value = common_pb2.AnyValue(int_value=value)
    elif isinstance(value, float):
        any_value = common_pb2.AnyValue(double_value=value)
    elif isinstance(value, bytes):
        any_value = common_pb2.AnyValue(bytes_value=value)
    elif isinstance(value, list):
        any_value = common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[kv("x", v).value for v in value]))
    elif isinstance(value, dict):
        any_value = common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(values=[kv(k, v) for k, v in value.items()]))
    else:
        any_value = common_pb2.AnyValue(string_value=value)
    return common_pb2.KeyValue(key=key, value=any_value)


def resource(service):
    return resource_pb2.Resource(attributes=[kv("service.name", service), kv("host.name", "edge-1")])


def scope():
    return common_pb2.InstrumentationScope(name="checkout", version="1.2.0", attributes=[kv("lib", "x")])


TRACE = bytes(range(1, 17))


def span(n, parent=b"", error=False, events=0, links=0, attrs=3):
    s = trace_pb2.Span(
        trace_id=TRACE,
        span_id=bytes([n]) * 8,
        parent_span_id=parent,
        name=f"GET /route/{n}",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1_700_000_000_000_000_000 + n,
        end_time_unix_nano=1_700_000_000_250_000_000 + n,
        attributes=[kv("http.route", "/checkout"), kv("http.status_code", 500 if error else 200), kv("ratio", 0.5)][:attrs]
        + [kv(f"extra.{i}", "v" * i) for i in range(max(0, attrs - 3))],
        trace_state="th=8",
        flags=1,
    )
    for e in range(events):
        s.events.add(time_unix_nano=1_700_000_000_100_000_000, name=f"event {e}", attributes=[kv("exception.type", "Timeout")])
    for l in range(links):
        s.links.add(trace_id=bytes(range(17, 33)), span_id=b"\x09" * 8, attributes=[kv("why", "batch")])
    if error:
        s.status.code = trace_pb2.Status.STATUS_CODE_ERROR
        s.status.message = "upstream timed out"
    return s


def traces():
    small = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource("checkout"), scope_spans=[trace_pb2.ScopeSpans(scope=scope(), spans=[span(1)])])])
    write("otlp_protobuf", "traces-one-span", small.SerializeToString())
    rich = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[
        trace_pb2.ResourceSpans(resource=resource("checkout"), schema_url="https://opentelemetry.io/schemas/1.21.0",
                                scope_spans=[trace_pb2.ScopeSpans(scope=scope(), spans=[
                                    span(1), span(2, parent=b"\x01" * 8, error=True, events=2, links=2, attrs=6),
                                    span(3, parent=b"\x00" * 8)])]),
        trace_pb2.ResourceSpans(resource=resource("payments"), scope_spans=[trace_pb2.ScopeSpans(spans=[span(4)])]),
    ])
    write("otlp_protobuf", "traces-rich", rich.SerializeToString())
    nested = {"a": [1, {"b": [True, 2.5, {"c": b"\x00\xff"}]}]}
    deep = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        scope_spans=[trace_pb2.ScopeSpans(spans=[trace_pb2.Span(trace_id=TRACE, span_id=b"\x02" * 8,
                                                                  attributes=[kv("nested", nested)])])])])
    write("otlp_protobuf", "traces-nested-values", deep.SerializeToString())


def logs():
    records = [
        logs_pb2.LogRecord(time_unix_nano=1_700_000_000_000_000_000, observed_time_unix_nano=1_700_000_000_000_000_001,
                           severity_number=logs_pb2.SEVERITY_NUMBER_ERROR, severity_text="ERROR",
                           body=common_pb2.AnyValue(string_value="db timeout"), trace_id=TRACE, span_id=b"\x01" * 8,
                           attributes=[kv("duration_ms", 350), kv("code.function", "pay")], flags=1),
        logs_pb2.LogRecord(body=common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(values=[kv("msg", "structured")])),
                           event_name="checkout.done"),
    ]
    request = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource=resource("checkout"), scope_logs=[logs_pb2.ScopeLogs(scope=scope(), log_records=records)])])
    write("otlp_protobuf", "logs", request.SerializeToString())


def metrics():
    point = metrics_pb2.NumberDataPoint(time_unix_nano=1_700_000_000_000_000_000, as_double=1.5, attributes=[kv("route", "/a")])
    histogram = metrics_pb2.HistogramDataPoint(count=3, sum=0.6, bucket_counts=[1, 2, 0], explicit_bounds=[0.1, 0.5],
                                               exemplars=[metrics_pb2.Exemplar(trace_id=TRACE, span_id=b"\x01" * 8, as_double=0.3)])
    exponential = metrics_pb2.ExponentialHistogramDataPoint(count=2, scale=3, positive=metrics_pb2.ExponentialHistogramDataPoint.Buckets(offset=1, bucket_counts=[1, 1]))
    summary = metrics_pb2.SummaryDataPoint(count=4, sum=2.0, quantile_values=[metrics_pb2.SummaryDataPoint.ValueAtQuantile(quantile=0.99, value=1.9)])
    request = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
        resource=resource("checkout"), scope_metrics=[metrics_pb2.ScopeMetrics(scope=scope(), metrics=[
            metrics_pb2.Metric(name="g", gauge=metrics_pb2.Gauge(data_points=[point])),
            metrics_pb2.Metric(name="s", sum=metrics_pb2.Sum(data_points=[point, point], is_monotonic=True, aggregation_temporality=2)),
            metrics_pb2.Metric(name="h", histogram=metrics_pb2.Histogram(data_points=[histogram], aggregation_temporality=2)),
            metrics_pb2.Metric(name="e", exponential_histogram=metrics_pb2.ExponentialHistogram(data_points=[exponential])),
            metrics_pb2.Metric(name="q", summary=metrics_pb2.Summary(data_points=[summary])),
        ])])])
    write("otlp_protobuf", "metrics", request.SerializeToString())


def json_bodies():
    trace_id = TRACE.hex()
    traces_body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "checkout"}}]},
        "scopeSpans": [{"scope": {"name": "s"}, "spans": [{
            "traceId": trace_id, "spanId": "0101010101010101", "parentSpanId": "",
            "name": "GET /checkout", "kind": 2, "startTimeUnixNano": "1700000000000000000",
            "endTimeUnixNano": "1700000000250000000",
            "attributes": [{"key": "http.route", "value": {"stringValue": "/checkout"}},
                           {"key": "n", "value": {"intValue": "42"}},
                           {"key": "list", "value": {"arrayValue": {"values": [{"boolValue": True}, {"doubleValue": 1.5}]}}},
                           {"key": "map", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"bytesValue": "AAE="}}]}}}],
            "events": [{"timeUnixNano": "1700000000100000000", "name": "exception"}],
            "links": [{"traceId": trace_id, "spanId": "0202020202020202"}],
            "status": {"code": 2, "message": "boom"}}]}]}]}
    write("otlp_json", "traces", b"\x00" + json.dumps(traces_body).encode())
    protojson = json.dumps(traces_body).replace('"kind": 2', '"kind": "SPAN_KIND_SERVER"').replace(
        '"parentSpanId": ""', '"parentSpanId": null').replace('"code": 2', '"code": "STATUS_CODE_ERROR"')
    write("otlp_json", "traces-protojson-forms", b"\x00" + protojson.encode())
    logs_body = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{
        "timeUnixNano": "1700000000000000000", "severityNumber": 17, "severityText": "ERROR",
        "body": {"stringValue": "db timeout"}, "traceId": trace_id, "spanId": "0101010101010101",
        "attributes": [{"key": "duration_ms", "value": {"intValue": 350}}]}]}]}]}
    write("otlp_json", "logs", b"\x01" + json.dumps(logs_body).encode())
    metrics_body = {"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "g", "gauge": {"dataPoints": [{"asDouble": 1.5, "timeUnixNano": "1"}]}},
        {"name": "h", "histogram": {"aggregationTemporality": 2, "dataPoints": [{"count": "3", "sum": 0.6,
                                    "bucketCounts": ["1", "2"], "explicitBounds": [0.1]}]}},
        {"name": "q", "summary": {"dataPoints": [{"count": "1", "quantileValues": [{"quantile": 0.5, "value": "NaN"}]}]}}]}]}]}
    write("otlp_json", "metrics", b"\x02" + json.dumps(metrics_body).encode())
    write("otlp_json", "empty-forms", b"\x00" + b'{"resourceSpans": null, "unknown": {"a": [[[{}]]]}}')


def json_lines():
    lines = [
        '{"ts":"2024-05-01T12:00:00.123Z","level":"error","msg":"db timeout","trace_id":"0102030405060708090a0b0c0d0e0f10","span_id":"0101010101010101","duration_ms":350,"service":"checkout"}',
        '{"time":1714564800123,"lvl":"WARN","message":"slow","traceId":"0102030405060708090A0B0C0D0E0F10","took":"250"}',
        '{"timestamp":"1714564800.5","severity":30,"msg":"pino style","tid":"0102030405060708090a0b0c0d0e0f10","elapsed_ms":1.5e2}',
        '{"@timestamp":"2024-05-01T12:00:00+02:00","level":"crit","msg":"escaped \\"quote\\" \\u00e9","trace_id":123}',
        'plain text line, not JSON',
        '{"level":["not","a","string"],"msg":{"nested":true},"trace_id":"xyz","duration":-5}',
        '{"msg":"unterminated',
    ]
    write("json_lines", "field-report", "\n".join(lines) + "\n")


def answers():
    for name, response in [
        ("partial-traces", trace_service_pb2.ExportTraceServiceResponse(
            partial_success=trace_service_pb2.ExportTracePartialSuccess(rejected_spans=4, error_message="bad ids"))),
        ("partial-none", trace_service_pb2.ExportTraceServiceResponse()),
        ("partial-logs", logs_service_pb2.ExportLogsServiceResponse(
            partial_success=logs_service_pb2.ExportLogsPartialSuccess(rejected_log_records=1, error_message="x"))),
    ]:
        write("export_answers", name, b"\x00" + response.SerializeToString())
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3, nanos=500_000_000))
    status = status_pb2.Status(code=8, message="slow down")
    status.details.add().Pack(info)
    status.details.add().Pack(error_details_pb2.DebugInfo(detail="trace"))
    write("export_answers", "retry-info", b"\x01" + status.SerializeToString())
    write("export_answers", "retry-after-seconds", b"\x02" + b"120")
    write("export_answers", "retry-after-date", b"\x02" + b"Wed, 21 Oct 2015 07:28:00 GMT")
    for name, status_code, body in [
        ("loki-out-of-order", 400, "entry with timestamp 2024-05-01 for stream {app=\"x\"} out of order"),
        ("loki-rate-limited", 429, "ingestion rate limit exceeded"),
        ("prometheus-too-old", 500, "too old sample"),
        ("prometheus-bad-labels", 400, "invalid label name"),
    ]:
        write("export_answers", name, b"\x03" + struct.pack(">H", status_code) + body.encode())


if __name__ == "__main__":
    traces()
    logs()
    metrics()
    json_bodies()
    json_lines()
    answers()
