#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on the stable toolchain (LLVM's SanitizerCoverage through
# stable `-C` flags, the instrumentation cargo-fuzz uses without a sanitizer) and runs each for a
# bounded time on the committed corpus.
#
#   tests/fuzz/run.sh [--merge] [SECONDS_PER_TARGET] [TARGET...]
#
# New inputs go to target/fuzz/corpus/<target> (the committed corpus is only read); a crash
# leaves its input in target/fuzz/artifacts/<target>/ and fails the run: copy it to
# tests/fuzz/regressions/<target>/, where tests/corpus.rs replays it in every test run, and fix
# the cause. `--merge` then folds the new inputs that add coverage into tests/fuzz/corpus.
set -euo pipefail
cd "$(dirname "$0")/../.."

merge=false
if [ "${1:-}" = "--merge" ]; then
  merge=true
  shift
fi
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(otlp_protobuf otlp_json json_lines export_answers)

host=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the instrumentation off build scripts and proc macros.
export CARGO_TARGET_DIR=target/fuzz
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --quiet --release --locked --target "$host" -p tailgate-fuzz --features libfuzzer --bins
bin=target/fuzz/$host/release

status=0
for target in "${targets[@]}"; do
  found=target/fuzz/corpus/$target
  artifacts=target/fuzz/artifacts/$target
  mkdir -p "$found" "$artifacts"
  echo "fuzz: $target for ${seconds}s"
  # -rss_limit_mb: a decoder that balloons on a small input is a finding too.
  if ! "$bin/$target" "$found" "tests/fuzz/corpus/$target" -max_total_time="$seconds" -max_len=65536 \
      -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 -artifact_prefix="$artifacts/" \
      >"target/fuzz/$target.log" 2>&1; then
    status=1
    echo "fuzz: $target FAILED; input(s): $(ls "$artifacts")"
    grep -E "panicked|ERROR: libFuzzer|SUMMARY" "target/fuzz/$target.log" | head -5 || true
  fi
  grep -E "stat::(number_of_executed_units|new_units_added|peak_rss_mb)" "target/fuzz/$target.log" \
    | sed "s/^/fuzz: $target /" || true
  if $merge; then
    "$bin/$target" -merge=1 "tests/fuzz/corpus/$target" "$found" >"target/fuzz/$target.merge.log" 2>&1
  fi
done
exit $status
