"""Drives tailgate with the official OpenTelemetry Python SDK's OTLP exporter (gRPC or
HTTP/protobuf), as an instrumented service would: traces of 5 spans (10% with an error span,
10% with a slow root), exported in requests of BATCH spans at RATE requests per second for
DURATION seconds. The spans are made by the SDK once per request (new trace ids each time).

Usage: load.py grpc|http ENDPOINT RATE BATCH DURATION
Prints one line: requests sent, spans sent, failed exports.
"""
import sys
import time

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import Status, StatusCode, SpanKind


def exporter(protocol, endpoint):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint, insecure=True)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(endpoint=endpoint)


def main():
    protocol, endpoint = sys.argv[1], sys.argv[2]
    rate, batch, duration = float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "orders", "host.name": "edge-1"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tailgate-load")
    out = exporter(protocol, endpoint)
    n = 0
    requests = spans_sent = failed = 0
    start = time.monotonic()
    while time.monotonic() - start < duration:
        due = start + requests / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        memory.clear()
        while len(memory.get_finished_spans()) < batch:
            n += 1
            with tracer.start_as_current_span("GET /api/orders", kind=SpanKind.SERVER,
                                              attributes={"http.route": "/api/orders"}) as root:
                for s in range(4):
                    with tracer.start_as_current_span(f"SELECT orders {s}", kind=SpanKind.CLIENT,
                                                      attributes={"db.system": "postgresql"}) as child:
                        if n % 10 == 0 and s == 3:
                            child.set_status(Status(StatusCode.ERROR, "deadline exceeded"))
                root.set_attribute("slow", n % 10 == 5)
        spans = list(memory.get_finished_spans())[:batch]
        if out.export(spans) != SpanExportResult.SUCCESS:
            failed += 1
        requests += 1
        spans_sent += len(spans)
    print(f"sdk {protocol}: requests {requests}, spans {spans_sent}, failed {failed}, "
          f"{requests / (time.monotonic() - start):.1f} requests/s")


if __name__ == "__main__":
    main()
