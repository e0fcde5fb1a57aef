"""Sends traces with known outcomes through the official OpenTelemetry Python SDK and its OTLP
exporter (gRPC or HTTP/protobuf), then prints what it sent as JSON for tests/sdk_interop.rs.

Usage: send_traces.py grpc|http ENDPOINT COUNT
"""
import json
import sys
import time

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode


def exporter(protocol, endpoint):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(endpoint=endpoint)


def main():
    protocol, endpoint, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    provider = TracerProvider(resource=Resource.create({"service.name": f"sdk-{protocol}"}))
    provider.add_span_processor(BatchSpanProcessor(exporter(protocol, endpoint), schedule_delay_millis=200))
    tracer = provider.get_tracer("tailgate-interop")
    sent = []
    for i in range(count):
        outcome = ("error", "slow", "fast")[i % 3]
        start = time.time_ns()
        root = tracer.start_span(f"GET /sdk/{i % 4}", start_time=start, kind=trace.SpanKind.SERVER)
        ctx = trace.set_span_in_context(root)
        span_ids = [root.get_span_context().span_id]
        for c in range(2):
            child = tracer.start_span(f"query {c}", context=ctx, start_time=start + 1_000_000)
            if outcome == "error" and c == 1:
                child.set_status(Status(StatusCode.ERROR, "timeout"))
            child.end(end_time=start + 20_000_000)
            span_ids.append(child.get_span_context().span_id)
        root.end(end_time=start + (350_000_000 if outcome == "slow" else 50_000_000))
        sent.append({
            "trace_id": format(root.get_span_context().trace_id, "032x"),
            "span_ids": [format(s, "016x") for s in span_ids],
            "keep": outcome != "fast",
        })
    if not provider.force_flush(timeout_millis=20_000):
        sys.exit("force_flush timed out")
    provider.shutdown()
    json.dump(sent, sys.stdout)


if __name__ == "__main__":
    main()
