#!/usr/bin/env bash
# The test command: prepares what the tests need that cargo does not build, then runs every test.
#   - a Python virtualenv with the official OpenTelemetry SDK and OTLP exporters
#     (tests/sdk/requirements.txt) for the SDK interop tests, under target/sdk-venv;
#   - Prometheus (Debian's `prometheus` package, 2.42) for the remote-write tests, which start
#     their own instances on loopback ports with temporary data directories;
#   - iptables and conntrack (Debian packages) for the chaos drill (tests/chaos_drill.rs), which
#     cuts a link between two network namespaces it creates; it and the full-filesystem test
#     (a tmpfs mount) need root, as CI runs them;
#   - g++ for the fuzz targets (libFuzzer is built from source), if missing;
#   - cargo-nextest, if missing.
# Then every test (extra arguments go to `cargo nextest run`), then the fuzz targets for a bounded
# time each (tests/fuzz/run.sh; TAILGATE_FUZZ_SECONDS per target, default 30, 0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/sdk-venv
if ! "$venv/bin/python3" -c 'import opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.proto.http' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
fi
export TAILGATE_SDK_PYTHON="$PWD/$venv/bin/python3"

if ! command -v prometheus >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }
fi

missing=()
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
# systemd-analyze (tests/systemd.rs verifies the unit; no running systemd needed).
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# A C++ compiler: the fuzz targets build libFuzzer from source (libfuzzer-sys).
command -v c++ >/dev/null 2>&1 || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
    || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; }
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo nextest run --workspace --all-targets "$@"

fuzz_seconds=${TAILGATE_FUZZ_SECONDS:-30}
if [ "$fuzz_seconds" -gt 0 ]; then
  tests/fuzz/run.sh "$fuzz_seconds"
fi
