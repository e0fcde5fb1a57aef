#!/usr/bin/env bash
# Runs one benchmark scenario against a release build and prints the figures BENCHMARKS.md
# quotes. Usage:
#   tests/loadgen/bench.sh reference [BATCH]  # 2,500 spans/s + one log per span for 60 s,
#                                             # BATCH spans per request (default 50: 100 requests/s)
#   tests/loadgen/bench.sh max [RATE]  # RATE spans/s (0: as fast as accepted) for 20 s, batches of 512
# Everything runs on loopback; every loop is bounded by --duration.
# PEER=rotel runs the same scenario against rotel (a Rust OTLP collector; `pip install
# rotel==0.0.1a15`) as a pass-through OTLP gRPC receiver -> OTLP gRPC exporter, for comparison.
set -euo pipefail
cd "$(dirname "$0")/../.."
scenario=${1:-reference}
bin=target/release
work=$(mktemp -d /tmp/tailgate-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

cargo build --release --bins --quiet

# Backend stand-in on the default export endpoint (127.0.0.1:14317).
"$bin/tailgate-loadgen" sink --listen 127.0.0.1:14317 --duration 600 > "$work/sink.out" &
sink=$!
if [ "${PEER:-}" = rotel ]; then
  rotel_agent="$(python3 -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')"
  "$rotel_agent" start --otlp-grpc-endpoint 127.0.0.1:4317 --otlp-http-endpoint 127.0.0.1:4318 \
    --exporter otlp --otlp-exporter-endpoint http://127.0.0.1:14317 --otlp-exporter-protocol grpc \
    --otlp-exporter-compression none --batch-max-size 512 --batch-timeout 5s > "$work/tailgate.log" 2>&1 &
else
  "$bin/tailgate" run --data-dir "$work/data" 2> "$work/tailgate.log" &
fi
tailgate=$!
for _ in $(seq 100); do
  (echo > /dev/tcp/127.0.0.1/4317) 2>/dev/null && break
  sleep 0.1
done

case "$scenario" in
  reference)
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 60 > "$work/meter.out" &
    meter=$!
    "$bin/tailgate-loadgen" send --rate 2500 --duration 60 --batch "${2:-50}" --logs
    wait "$meter"
    ;;
  max)
    # The window runs 10 s past the load so the CPU of finishing the work (decisions after
    # root_grace, the last export batches) is counted: spans per CPU-second = accepted spans /
    # (cpu% x 30 s).
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 30 > "$work/meter.out" &
    meter=$!
    "$bin/tailgate-loadgen" send --rate "${2:-0}" --duration 20 --batch 512 --concurrency 4
    wait "$meter"
    ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
cat "$work/meter.out"
# Let decisions (decision_wait 10 s) and the export batch timeout (5 s) run out, then stop.
sleep 17
kill -TERM "$tailgate"; wait "$tailgate" || true
kill -TERM "$sink"; wait "$sink" || true
cat "$work/sink.out"
