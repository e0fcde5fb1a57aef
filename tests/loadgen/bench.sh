#!/usr/bin/env bash
# Runs one benchmark scenario against a build (PROFILE, default release) and prints the figures
# BENCHMARKS.md quotes. Usage:
#   tests/loadgen/bench.sh reference [BATCH]  # 2,500 spans/s + one log per span for 60 s,
#                                             # BATCH spans per request (default 50: 100 requests/s)
#   tests/loadgen/bench.sh w1                      # the field report's profile (users ramp to
#                                                  # 500 in 60 s, four endpoints, logs to a tailed
#                                                  # file, ground truth), metered over 60-120 s
#   tests/loadgen/bench.sh passthrough [RATE]      # RATE spans/s (10,000) in 512-span requests,
#                                                  # always_sample: like for like with PEER=rotel
#   tests/loadgen/bench.sh max [RATE]  # RATE spans/s (0: as fast as accepted) for 20 s, batches of 512
#   tests/loadgen/bench.sh spans [BATCH]           # the reference spans without logs (60 s)
#   tests/loadgen/bench.sh logs-reference [BATCH]  # the reference spans + one JSON line per span
#                                                  # written to a tailed file, logs to Loki (60 s)
#   tests/loadgen/bench.sh logs-max [LINES]        # LINES untraced JSON lines (14% ERROR, default
#                                                  # 2,000,000) tailed from a file into Loki
#   tests/loadgen/bench.sh cardinality [NAMES]     # the reference spans with NAMES distinct root
#                                                  # span names (default 2,000), exemplars on (60 s)
#   tests/loadgen/bench.sh drain [SECONDS]         # backend down: 100,000 spans/s, every trace
#                                                  # kept, for SECONDS (default 36: 3.6 M kept
#                                                  # spans, two hours of the reference's kept
#                                                  # rate); then the backend returns and the
#                                                  # backlog drains (rate, memory over time)
#   tests/loadgen/bench.sh sdk [grpc|http] [BATCH] [RPS]  # the OpenTelemetry Python SDK
#                                                  # exporter, RPS requests/s (100) of BATCH spans
#                                                  # (50), 60 s
#   tests/loadgen/bench.sh burst                   # reference spans for 150 s, 500,000 spans/s
#                                                  # from 40 s to 60 s: tail_sample's memory
#   tests/loadgen/bench.sh restart                 # the reference load (50-span requests) while
#                                                  # tail_sample, receive and log_mirror are
#                                                  # SIGKILLed, tail_sample SIGSTOPped and hung once:
#                                                  # time from the signal to the stage ready again;
#                                                  # then the supervisor's CPU while idle
# Everything runs on loopback; every loop is bounded by --duration.
# PROFILE=dist benches the build that ships (fat LTO, one codegen unit: what install.sh and the
# .deb install; report.sh uses it); the default is the release build (faster to rebuild).
# NO_BUILD=1 skips the build (to bench a binary put in target/$PROFILE by hand, e.g. a profiling
# build).
# POLICIES=1 runs the spans scenarios with the sampling policies of issue 9 (see below).
# PLOTS=DIR writes PNG plots there (w1: CPU and memory per process over the run; drain: the
# backlog and export's memory while the queue drains), with matplotlib from a virtualenv
# (target/bench-venv, created on first use).
# PEER=rotel runs the same scenario against rotel (a Rust OTLP collector; installed with pip
# into a virtualenv, $ROTEL_VENV or /tmp/tailgate-rotel-venv, on first use) as a pass-through
# OTLP gRPC receiver -> OTLP gRPC exporter, for comparison.
set -euo pipefail
cd "$(dirname "$0")/../.."
scenario=${1:-reference}
profile=${PROFILE:-release}
bin=target/$profile
work=$(mktemp -d /tmp/tailgate-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

[ -n "${NO_BUILD:-}" ] || cargo build --profile "$profile" --bins --quiet

plot() {  # plot KIND CSV PNG TITLE
  [ -n "${PLOTS:-}" ] || return 0
  local venv=target/bench-venv
  if ! "$venv/bin/python3" -c 'import matplotlib' 2>/dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check matplotlib
  fi
  mkdir -p "$PLOTS"
  "$venv/bin/python3" tests/loadgen/plot.py "$@" && echo "plot: $3"
}

# Backend stand-in on the default export endpoint (127.0.0.1:14317), and a Loki push endpoint.
"$bin/tailgate-loadgen" sink --listen 127.0.0.1:14317 --loki-listen 127.0.0.1:13100 --duration 600 > "$work/sink.out" &
sink=$!
# The log scenarios tail files under $work/logs and push kept logs to Loki.
mkdir -p "$work/logs"
cat > "$work/logs.yaml" <<YAML
data_dir: $work/data
receivers:
  otlp:
    protocols:
      grpc: { endpoint: 127.0.0.1:4317 }
      http: { endpoint: 127.0.0.1:4318 }
  filelog:
    include: ["$work/logs/*.jsonl"]
    start_at: beginning
exporters:
  traces: { otlp: { endpoint: http://127.0.0.1:14317 } }
  logs: { loki: { endpoint: http://127.0.0.1:13100/loki/api/v1/push } }
  metrics: { otlp: { endpoint: http://127.0.0.1:14317 } }
YAML
cat > "$work/cardinality.yaml" <<YAML
data_dir: $work/data
receivers:
  otlp:
    protocols:
      grpc: { endpoint: 127.0.0.1:4317 }
spanmetrics:
  metrics_flush_interval: 5s
  exemplars: { enabled: true }
exporters:
  traces: { otlp: { endpoint: http://127.0.0.1:14317 } }
  metrics: { otlp: { endpoint: http://127.0.0.1:14317 } }
YAML
cat > "$work/drain.yaml" <<YAML
data_dir: $work/data
receivers:
  otlp:
    protocols:
      grpc: { endpoint: 127.0.0.1:4317 }
queue:
  max_size_mib: 4096
exporters:
  traces: { otlp: { endpoint: http://127.0.0.1:14317 } }
  metrics: { otlp: { endpoint: http://127.0.0.1:14317 } }
YAML
# A spans-only configuration with sampling policies (YAML list items, one per line on stdin).
policy_config() {
  {
    printf 'data_dir: %s\nreceivers:\n  otlp:\n    protocols:\n      grpc: { endpoint: 127.0.0.1:4317 }\n' "$work/data"
    printf 'tail_sample:\n  policies:\n'
    sed 's/^/    /'
    printf 'exporters:\n  traces: { otlp: { endpoint: http://127.0.0.1:14317 } }\n'
    printf '  metrics: { otlp: { endpoint: http://127.0.0.1:14317 } }\n'
  } > "$1"
}
# POLICIES=1: the issue's sampling policies instead of the shorthand (attribute policies make
# the sampler decode span attributes of every decided trace).
policy_config "$work/policies.yaml" <<'YAML'
- {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
- {name: slow, type: latency, latency: {threshold_ms: 200}}
- {name: checkout, type: string_attribute, string_attribute: {key: http.route, values: [/checkout]}}
- {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}
- {name: no-health, type: drop, drop: {drop_sub_policy: [{name: health, type: string_attribute, string_attribute: {key: http.route, values: [/healthz]}}]}}
YAML
# passthrough: keep everything (like for like with a pass-through collector).
policy_config "$work/passthrough.yaml" <<'YAML'
- {name: everything, type: always_sample}
YAML
config=()
[ -n "${POLICIES:-}" ] && config=(--config "$work/policies.yaml")
case "$scenario" in
  drain) config=(--config "$work/drain.yaml") ;;
  logs-* | w1) config=(--config "$work/logs.yaml") ;;
  passthrough) config=(--config "$work/passthrough.yaml") ;;
  cardinality) config=(--config "$work/cardinality.yaml") ;;
esac
if [ "$scenario" = logs-max ]; then
  "$bin/tailgate-loadgen" lines --file "$work/logs/app.jsonl" --count "${2:-2000000}"
  ls -l "$work/logs/app.jsonl"
fi
if [ "${PEER:-}" = rotel ]; then
  # rotel from the Python package registry, in a virtualenv of its own (kept between runs).
  venv=${ROTEL_VENV:-/tmp/tailgate-rotel-venv}
  if ! "$venv/bin/python" -c 'import rotel' 2>/dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install --quiet rotel==0.0.1a15
  fi
  rotel_agent="$("$venv/bin/python" -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')"
  "$rotel_agent" start --otlp-grpc-endpoint 127.0.0.1:4317 --otlp-http-endpoint 127.0.0.1:4318 \
    --exporter otlp --otlp-exporter-endpoint http://127.0.0.1:14317 --otlp-exporter-protocol grpc \
    --otlp-exporter-compression none --batch-max-size 512 --batch-timeout 5s > "$work/tailgate.log" 2>&1 &
else
  # restart: the test-only fault point `hang_in_step` lets the run hang tail_sample on cue.
  fault=()
  [ "$scenario" = restart ] && fault=(env TAILGATE_TEST_FAULT=hang_in_step)
  "${fault[@]}" "$bin/tailgate" run "${config[@]}" --data-dir "$work/data" 2> "$work/tailgate.log" &
fi
tailgate=$!
for _ in $(seq 100); do
  (echo > /dev/tcp/127.0.0.1/4317) 2>/dev/null && break
  sleep 0.1
done

case "$scenario" in
  w1)
    # The field report's profile (tailgate::workload): users ramp to 500 in a minute, then stay;
    # traces over OTLP/gRPC, the services' log lines to a tailed file, ground truth of the kept
    # traces. Metered over the plateau (the second minute).
    ( sleep 60; "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 60 > "$work/meter.out" ) &
    meter=$!
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 120 --series "$work/w1.csv" > /dev/null &
    series=$!
    "$bin/tailgate-loadgen" profile --duration 120 --log-file "$work/logs/app.jsonl" --truth-file "$work/truth.jsonl"
    wait "$meter"; wait "$series"
    echo "ground truth: $(wc -l < "$work/truth.jsonl") traces must be kept"
    plot processes "$work/w1.csv" "${PLOTS:-.}/w1-processes.png" "W1: the field report's profile (users ramp to 500 over 60 s)"
    [ -z "${PLOTS:-}" ] || cp "$work/w1.csv" "$PLOTS/w1-processes.csv"
    ;;
  passthrough)
    # W2: 10k spans/s (SDK-sized requests), everything kept and exported.
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 60 > "$work/meter.out" &
    meter=$!
    "$bin/tailgate-loadgen" send --rate "${2:-10000}" --duration 60 --batch 512 --error-percent 0 --slow-percent 0
    wait "$meter"
    ;;
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
  spans)
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 60 > "$work/meter.out" &
    meter=$!
    "$bin/tailgate-loadgen" send --rate 2500 --duration 60 --batch "${2:-50}"
    wait "$meter"
    ;;
  logs-reference)
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 60 > "$work/meter.out" &
    meter=$!
    "$bin/tailgate-loadgen" send --rate 2500 --duration 60 --batch "${2:-50}" --log-file "$work/logs/app.jsonl"
    wait "$meter"
    ;;
  cardinality)
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 60 > "$work/meter.out" &
    meter=$!
    "$bin/tailgate-loadgen" send --rate 2500 --duration 60 --batch 50 --span-names "${2:-2000}"
    wait "$meter"
    du -k "$work/data/queue/data.mdb" || true   # blocks in use (the file is sparse)
    ;;
  drain)
    kill -TERM "$sink"; wait "$sink" || true
    export_pid=""
    for _ in $(seq 50); do
      export_pid=$(pgrep -P "$tailgate" -f 'stage export' || true)
      [ -n "$export_pid" ] && break
      sleep 0.1
    done
    rss() { awk '/^RssAnon/ {print $2}' "/proc/$export_pid/status" 2>/dev/null || echo 0; }
    items() { "$bin/tailgate" status --config "$work/drain.yaml" | awk -v e="$1" '$1 == e {print $3}'; }
    bytes() { "$bin/tailgate" status --config "$work/drain.yaml" | awk -v e="$1" '$1 == e {print $4}'; }
    fill=${2:-36}
    echo "fill: backend down, $fill s at 100,000 spans/s, every trace kept"
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration "$((fill + 15))" > "$work/meter.out" &
    meter=$!
    ( for i in $(seq "$((fill + 15))"); do echo "fill t=${i}s export RssAnon $(rss) KiB"; sleep 1; done ) > "$work/rss-fill.out" &
    sampler=$!
    "$bin/tailgate-loadgen" send --rate 100000 --duration "$fill" --batch 512 --error-percent 100 --slow-percent 0
    wait "$meter"; wait "$sampler"
    cat "$work/meter.out"
    echo "stored after the fill (decisions done): kept_spans $(items kept_spans) spans, $(bytes kept_spans) bytes"
    awk 'NR % 10 == 0' "$work/rss-fill.out"
    backlog_bytes=$(bytes kept_spans); backlog_items=$(items kept_spans)
    "$bin/tailgate-loadgen" sink --listen 127.0.0.1:14317 --duration 600 > "$work/sink.out" &
    sink=$!
    # Times from bash's clock: a python3 or date per sample costs the machine the drain is using.
    start=$EPOCHREALTIME
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 20 > "$work/meter-drain.out" &
    meter=$!
    first=""; first_left=""
    echo "t,kept_spans,export_private_kib" > "$work/drain.csv"
    for i in $(seq 1200); do
      left=$(items kept_spans)
      now=$EPOCHREALTIME; at=$(( ${now/./} / 100000 - ${start/./} / 100000 )); at=$((at / 10)).$((at % 10))
      memory=$(rss)
      echo "drain t=${at}s kept_spans $left export RssAnon $memory KiB" >> "$work/rss-drain.out"
      echo "$at,$left,$memory" >> "$work/drain.csv"
      if [ -z "$first" ] && [ "$left" != "$backlog_items" ]; then first=$EPOCHREALTIME; first_left=$left; fi
      [ "$left" = 0 ] && break
      sleep 0.25
    done
    end=$EPOCHREALTIME
    awk 'NR % 4 == 1' "$work/rss-drain.out"
    # From the sink's start (includes waiting for the circuit's next probe, up to 5 s), and from
    # the first delivered batch (the drain proper: what was left then, over the time it took).
    python3 -c "import sys; s,f,e=map(float,sys.argv[1:4]); b=int(sys.argv[4]); n=int(sys.argv[5]); l=int(sys.argv[6]); print(f'drained {n} spans / {b/1e6:.0f} MB in {e-s:.1f} s after the backend returned ({b/1e6/(e-s):.0f} MB/s); from the first delivery: {l} spans / {b*l/n/1e6:.0f} MB in {e-f:.1f} s = {b*l/n/1e6/(e-f):.0f} MB/s, {l/(e-f):,.0f} spans/s')" "$start" "$first" "$end" "$backlog_bytes" "$backlog_items" "$first_left"
    wait "$meter" || true
    echo "drain window (first 20 s):"; cat "$work/meter-drain.out"
    plot drain "$work/drain.csv" "${PLOTS:-.}/w4-drain.png" "W4: the backlog of a ${fill} s outage at 100,000 spans/s drains"
    [ -z "${PLOTS:-}" ] || cp "$work/drain.csv" "$PLOTS/w4-drain.csv"
    ;;
  restart)
    "$bin/tailgate-loadgen" send --rate 2500 --duration 50 --batch 50 --logs > "$work/send.out" &
    load=$!
    ready_after() {  # stage, unix time: seconds from then to the stage's next "ready" log line
      python3 - "$work/tailgate.log" "$1" "$2" <<'PY'
import datetime, re, sys
log, stage, t0 = sys.argv[1], sys.argv[2], float(sys.argv[3])
ready = {"tail_sample": "tail_sample started", "receive": "otlp grpc receiver listening", "log_mirror": "log_mirror started"}[stage]
for line in open(log, errors="replace"):
    line = re.sub(r"\[[0-9;]*m", "", line)
    if ready not in line:
        continue
    stamp = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
    if stamp > t0:
        print(f"{stage}: ready {1000 * (stamp - t0):.0f} ms after the signal")
        break
else:
    print(f"{stage}: not ready again")
PY
    }
    for stage in tail_sample receive log_mirror; do
      sleep 8
      pid=$(pgrep -P "$tailgate" -f "stage $stage")
      t0=$(date +%s.%N); kill -KILL "$pid"
      sleep 2; ready_after "$stage" "$t0"
    done
    sleep 5
    pid=$(pgrep -P "$tailgate" -f "stage tail_sample")
    t0=$(date +%s.%N); kill -STOP "$pid"
    sleep 8; echo "SIGSTOP (liveness_timeout 5 s):"; ready_after tail_sample "$t0"
    # A hang outside any transaction (its loop awaits for ever): found by its heartbeat.
    t0=$(date +%s.%N); touch "$work/data/run/fault-hang_in_step"
    sleep 8; echo "hang (heartbeat, liveness_timeout 5 s):"; ready_after tail_sample "$t0"
    wait "$load"; cat "$work/send.out"
    sleep 20
    echo "idle (load over, decisions and exports done):"
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 60 > "$work/meter.out"
    ;;
  sdk)
    # The official OpenTelemetry Python SDK's OTLP exporter (tests/sdk/load.py, in the test
    # virtualenv) at RPS requests/s (default 100) of BATCH spans (default 50) for 60 s, over
    # PROTOCOL (grpc or http): what an instrumented service sends, which costs the server more
    # than the generator's pre-encoded requests.
    protocol=${2:-grpc}
    endpoint=127.0.0.1:4317
    [ "$protocol" = http ] && endpoint=http://127.0.0.1:4318/v1/traces
    python=target/sdk-venv/bin/python3
    [ -x "$python" ] || { python3 -m venv target/sdk-venv && "$python" -m pip install --quiet -r tests/sdk/requirements.txt; }
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration 60 > "$work/meter.out" &
    meter=$!
    "$python" tests/sdk/load.py "$protocol" "$endpoint" "${4:-100}" "${3:-50}" 60
    wait "$meter"
    ;;
  burst)
    # The reference spans (2,500/s, 50-span requests) for 150 s with a burst of 500,000 spans/s
    # (512-span requests) from t=40 s to t=60 s: tail_sample's private memory every 5 s, its
    # steady state before the burst against the figure a minute after it.
    "$bin/tailgate-loadgen" send --rate 2500 --duration 150 --batch 50 > "$work/send.out" &
    load=$!
    sampler_pid=""
    for _ in $(seq 50); do
      sampler_pid=$(pgrep -P "$tailgate" -f 'stage tail_sample' || true)
      [ -n "$sampler_pid" ] && break
      sleep 0.1
    done
    anon() { awk '/^RssAnon/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
    every() {  # RssAnon of every stage process, KiB
      for stage in receive tail_sample log_mirror spanmetrics export; do
        pid=$(pgrep -P "$tailgate" -f "stage $stage" || true)
        printf ' %s %s' "$stage" "$([ -n "$pid" ] && anon "$pid" || echo 0)"
      done
    }
    ( for i in $(seq 0 5 145); do echo "t=${i}s tail_sample RssAnon $(anon "$sampler_pid") KiB; all (KiB):$(every)"; sleep 5; done ) > "$work/burst-rss.out" &
    watcher=$!
    sleep 40
    "$bin/tailgate-loadgen" send --rate 500000 --duration 20 --batch 512 --concurrency 4 > "$work/burst.out"
    wait "$load"; wait "$watcher"
    cat "$work/burst.out" "$work/send.out" "$work/burst-rss.out"
    : > "$work/meter.out"
    ;;
  logs-max)
    # The window covers reading, mirroring and pushing every line (lines per CPU-second =
    # lines / (cpu% x window)); the sink's Loki count tells when all kept lines arrived.
    "$bin/tailgate-loadgen" meter --pid "$tailgate" --duration "${WINDOW:-60}" > "$work/meter.out"
    ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
cat "$work/meter.out"
# Let decisions (decision_wait 10 s), waiting logs (max_wait 30 s after the last spans) and the
# export batch timeout (5 s) run out, then stop.
case "$scenario" in
  logs-* | w1) sleep 35 ;;
  *) sleep 17 ;;
esac
kill -TERM "$tailgate"; wait "$tailgate" || true
kill -TERM "$sink"; wait "$sink" || true
cat "$work/sink.out"
