#!/usr/bin/env bash
# The bench command: runs the workloads of BENCHMARKS.md's report (W1 the field report's
# profile; the official Python SDK exporter over gRPC at ~2,500 spans/s in SDK-sized and in
# 50-span requests; W2 pass-through at 10,000 spans/s; W3 saturation; W4 drain; stage
# restarts), the SDK loads, W2 and W3 side by side with rotel, RUNS times each (default 3;
# restarts once), alternating tailgate and rotel so a drifting machine hits both alike; then
# writes the tables (tests/loadgen/report.py: medians, every run, tailgate/rotel ratios,
# command, machine, date).
#   tests/loadgen/report.sh                 # the tables go to target/bench-report/<stamp>/report.md
#   WRITE=1 tests/loadgen/report.sh         # ... and replace the report section of BENCHMARKS.md
#   SCENARIOS="w1 passthrough" RUNS=1 tests/loadgen/report.sh   # a subset
# About 45 minutes for everything with RUNS=3 on two cores, plus ~6 minutes for a dist build.
# Every load is bounded (bench.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${RUNS:-3}
scenarios=${SCENARIOS:-w1 sdk passthrough max drain restart}
dir=target/bench-report/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$dir"
# The shipped build (fat LTO, one codegen unit: what install.sh and the .deb install) unless
# PROFILE says otherwise (PROFILE=release is faster to rebuild while iterating).
export PROFILE=${PROFILE:-dist}
[ -n "${NO_BUILD:-}" ] || cargo build --profile "$PROFILE" --bins --quiet
export NO_BUILD=1

bench() {  # label peer run bench.sh-arguments...
  local label=$1 peer=$2 run=$3
  shift 3
  local out="$dir/$label-$peer-$run.out"
  echo "$(date -u +%H:%M:%S) $label ($peer, run $run)"
  if [ "$peer" = rotel ]; then
    PEER=rotel tests/loadgen/bench.sh "$@" > "$out" 2>&1
  else
    tests/loadgen/bench.sh "$@" > "$out" 2>&1
  fi
}

for run in $(seq "$runs"); do
  for scenario in $scenarios; do
    case "$scenario" in
      w1) bench w1 tailgate "$run" w1 ;;
      sdk)
        # The official Python SDK exporter over gRPC at ~2,500 spans/s: SDK-sized requests (512
        # spans, 5 a second) and 50-span requests (50 a second).
        for peer in tailgate rotel; do
          bench sdk512 "$peer" "$run" sdk grpc 512 5
          bench sdk50 "$peer" "$run" sdk grpc 50 50
        done ;;
      passthrough)
        bench passthrough tailgate "$run" passthrough 10000
        bench passthrough rotel "$run" passthrough 10000 ;;
      max)
        bench max tailgate "$run" max 500000
        bench max rotel "$run" max 500000 ;;
      drain) bench drain tailgate "$run" drain ;;
      restart) [ "$run" = 1 ] && bench restart tailgate "$run" restart ;;
      *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
  done
done

command="tests/loadgen/report.sh"
[ "$runs" = 3 ] || command="RUNS=$runs $command"
[ "$scenarios" = "w1 sdk passthrough max drain restart" ] || command="SCENARIOS=\"$scenarios\" $command"
python3 tests/loadgen/report.py "$dir" "$command" > "$dir/report.md"
echo "report: $dir/report.md"
if [ -n "${WRITE:-}" ]; then
  # Replace what lies between the report markers in BENCHMARKS.md.
  python3 - "$dir/report.md" <<'PY'
import sys
begin, end = "<!-- bench-report:begin -->", "<!-- bench-report:end -->"
text = open("BENCHMARKS.md").read()
report = open(sys.argv[1]).read().strip()
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
open("BENCHMARKS.md", "w").write(f"{head}{begin}\n{report}\n{end}{tail}")
PY
  echo "BENCHMARKS.md updated"
fi
