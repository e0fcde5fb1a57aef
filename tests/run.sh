#!/usr/bin/env bash
# The test command: prepares what the tests need that cargo does not build, then runs every test.
#   - a Python virtualenv with the official OpenTelemetry SDK and OTLP exporters
#     (tests/sdk/requirements.txt) for the SDK interop tests, under target/sdk-venv;
#   - Prometheus (Debian's `prometheus` package, 2.42) for the remote-write tests, which start
#     their own instances on loopback ports with temporary data directories;
#   - cargo-nextest, if missing.
# Extra arguments go to `cargo nextest run`.
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

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

exec cargo nextest run --workspace --all-targets "$@"
