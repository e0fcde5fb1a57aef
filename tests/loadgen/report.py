#!/usr/bin/env python3
"""Turns the outputs of `tests/loadgen/report.sh` (one `bench.sh` output per scenario, peer and
run, named `<scenario>-<peer>-<run>.out`) into the markdown tables BENCHMARKS.md quotes: medians
of the runs, every run's figure, and tailgate/rotel ratios where rotel ran the same load.

Usage: report.py DIR COMMAND  (prints markdown)
"""

import os
import platform
import re
import statistics
import subprocess
import sys
from collections import defaultdict

PROCESSES = re.compile(
    r"processes (\d+): cpu ([\d.]+)% of one core over ([\d.]+) s; private memory ([\d.]+) MiB \(peak ([\d.]+)\); "
    r"pss ([\d.]+) MiB"
)
PER_PROCESS = re.compile(r"(\S+) ([\d.]+)% \(([\d.]+) CPU-s, ([\d.]+) MiB\)")
SINK = re.compile(r"sink received: spans (\d+), log records (\d+), metric data points (\d+), loki entries (\d+)")
SENT = re.compile(
    r"sent for [\d.]+ s: spans accepted (\d+) \(\d+/s\), keep-worthy (\d+), refused (\d+).*generator cpu ([\d.]+)%"
)
PROFILE = re.compile(
    r"profile for [\d.]+ s: .*spans accepted (\d+) .*refused (\d+), keep-worthy (\d+) spans in (\d+) traces, "
    r"log lines (\d+); generator cpu ([\d.]+)%"
)
LATENCY = re.compile(r"request latency \(answered after the commit\): p50 ([\d.]+) ms, p99 ([\d.]+) ms")
DRAIN = re.compile(r"from the first delivery: ([\d]+) spans / (\d+) MB in ([\d.]+) s = (\d+) MB/s")
DRAIN_RSS = re.compile(r"drain t=[\d.]+s kept_spans \d+ export RssAnon (\d+) KiB")
READY = re.compile(r"(\w+): ready (\d+) ms after the signal")
SDK = re.compile(r"sdk \w+: requests (\d+), spans (\d+), failed (\d+)")


def parse(path):
    """The figures of one bench.sh output."""
    text = open(path, errors="replace").read()
    out = {}
    # The first meter line is the load's window (drain and restart print more than one).
    if m := PROCESSES.search(text):
        out["processes"] = int(m[1])
        out["cpu"] = float(m[2])
        out["window"] = float(m[3])
        out["private"] = float(m[4])
        out["private_peak"] = float(m[5])
        out["pss"] = float(m[6])
    for line in text.splitlines():
        if line.startswith("per process:"):
            out["per_process"] = {name: (float(cpu), float(secs), float(mib)) for name, cpu, secs, mib in PER_PROCESS.findall(line)}
            break
    if m := SINK.search(text):
        out["sink_spans"], out["sink_logs"], out["sink_points"], out["loki"] = map(int, m.groups())
    if m := SENT.search(text):
        out["accepted"], out["keep_worthy"], out["refused"] = int(m[1]), int(m[2]), int(m[3])
        out["generator_cpu"] = float(m[4])
    if m := PROFILE.search(text):
        out["accepted"], out["refused"], out["keep_worthy"] = int(m[1]), int(m[2]), int(m[3])
        out["generator_cpu"] = float(m[6])
    if m := SDK.search(text):
        out["requests"], out["accepted"], out["failed"] = int(m[1]), int(m[2]), int(m[3])
    if m := LATENCY.search(text):
        out["p50"], out["p99"] = float(m[1]), float(m[2])
    if m := DRAIN.search(text):
        out["drain_spans"], out["drain_mb"], out["drain_s"], out["drain_mb_s"] = int(m[1]), int(m[2]), float(m[3]), int(m[4])
    rss = [int(v) for v in DRAIN_RSS.findall(text)]
    if rss:
        out["drain_rss_min"], out["drain_rss_max"] = min(rss) / 1024, max(rss) / 1024
    ready = READY.findall(text)
    if ready:
        out["ready"] = [(stage, int(ms)) for stage, ms in ready]
    return out


def load(directory):
    runs = defaultdict(list)  # (scenario, peer) -> [figures]
    for name in sorted(os.listdir(directory)):
        m = re.fullmatch(r"(.+)-(tailgate|rotel)-(\d+)\.out", name)
        if m:
            runs[(m[1], m[2])].append(parse(os.path.join(directory, name)))
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=2, unit=""):
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value >= 1000):
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}f}{unit}"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}x"


def spans_per_cpu_second(run, process=None):
    per = run.get("per_process", {})
    if process:
        seconds = sum(s for name, (_, s, _) in per.items() if name == process)
    else:
        seconds = sum(s for (_, s, _) in per.values())
    return run["accepted"] / seconds if seconds and "accepted" in run else None


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return f"{os.cpu_count()} vCPU ({cpu}), {mem:.0f} GiB, Linux {platform.release()}"


def git_head():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def delivered(run):
    spans, truth, loki = run.get("sink_spans", 0), run.get("keep_worthy", 0), run.get("loki", 0)
    return f"{spans:,} / {truth:,} spans, {loki:,} Loki entries"


def row(label, values, digits=2, unit=""):
    return f"| {label} | **{fmt(median(values), digits, unit)}** | {', '.join(fmt(v, digits, unit) for v in values)} |"


def main():
    directory, command = sys.argv[1], sys.argv[2]
    runs = load(directory)
    date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
    measured = os.environ.get("PROFILE", "dist")  # the build report.sh measured
    out = [
        f"Written by `{command}` on {date}, commit {git_head()}; machine: {machine()}; tailgate's "
        f"`{measured}` build. Medians of the runs, "
        "every run's figure after it. CPU is utime + stime of every process of the collector (tailgate: "
        "the supervisor and its five stages) as a percentage of one core over the window; memory is "
        "`Anonymous` (private) and `Pss` of `/proc/PID/smaps_rollup`, summed; latency is the client's round "
        "trip of accepted trace requests, which tailgate answers after their commit to the durable queue.",
        "",
    ]

    w1 = runs.get(("w1", "tailgate"), [])
    if w1:
        out += [
            "**W1, the field report's profile** (`bench.sh w1`: users ramp to 500 in a minute over four "
            "endpoints, ~2,300 spans/s and as many JSON log lines/s at the plateau, metered over 60-120 s; "
            "sampling, log mirror, span metrics, OTLP and Loki exporters to local sinks). rotel has no file "
            "input and no sampling, so W2 is the like-for-like comparison.",
            "",
            "| tailgate | median | runs |",
            "|---|---|---|",
            row("CPU, all processes (% of one core)", [r.get("cpu") for r in w1]),
        ]
        names = sorted({name for r in w1 for name in r.get("per_process", {})})
        for name in names:
            out.append(row(f"&nbsp;&nbsp;{name}", [r.get("per_process", {}).get(name, (None,))[0] for r in w1]))
        out += [
            row("private memory (MiB)", [r.get("private") for r in w1], 1),
            row("PSS (MiB)", [r.get("pss") for r in w1], 1),
            row("request p99 (ms)", [r.get("p99") for r in w1]),
            row("generator's CPU (% of one core)", [r.get("generator_cpu") for r in w1]),
            "| delivered / ground truth | | " + "; ".join(delivered(r) for r in w1) + " |",
            "",
        ]

    def side_by_side(scenario, title, extra):
        ours, theirs = runs.get((scenario, "tailgate"), []), runs.get((scenario, "rotel"), [])
        if not ours:
            return []
        lines = [title, "", "| | tailgate (median; runs) | rotel (median; runs) | tailgate / rotel |", "|---|---|---|---|"]

        def line(label, get, digits=2):
            a, b = [get(r) for r in ours], [get(r) for r in theirs]
            ma, mb = median(a), median(b)
            return (
                f"| {label} | **{fmt(ma, digits)}**; {', '.join(fmt(v, digits) for v in a)} | "
                f"**{fmt(mb, digits)}**; {', '.join(fmt(v, digits) for v in b)} | {ratio(ma, mb)} |"
            )

        rows = [
            ("CPU, all processes (% of one core)", lambda r: r.get("cpu"), 2),
            ("private memory (MiB)", lambda r: r.get("private"), 1),
            ("PSS (MiB)", lambda r: r.get("pss"), 1),
            ("request p50 (ms)", lambda r: r.get("p50"), 2),
            ("request p99 (ms)", lambda r: r.get("p99"), 2),
            *extra,
            ("generator's CPU (% of one core)", lambda r: r.get("generator_cpu"), 2),
        ]
        # A figure no run of either peer reports (the SDK client prints no latencies) is left out.
        lines += [line(label, get, digits) for label, get, digits in rows if any(get(r) is not None for r in ours + theirs)]
        lines.append("")
        return lines

    for label, size, rate in [("sdk512", 512, 5), ("sdk50", 50, 50)]:
        out += side_by_side(
            label,
            f"**The OpenTelemetry SDK's exporter, {size}-span requests** (`bench.sh sdk grpc {size} {rate}`, and "
            f"`PEER=rotel`: the official Python SDK's `OTLPSpanExporter` over gRPC, {rate} requests/s of {size} "
            "spans, ~2,500 spans/s for 60 s, traces of 5 spans; tailgate samples with its default configuration "
            "(a fifth of the spans exported), rotel passes everything through; spans only: the client is not "
            "measured, and rotel has no file input).",
            [
                ("requests sent", lambda r: r.get("requests"), 0),
                ("exports that failed", lambda r: r.get("failed"), 0),
                ("spans delivered to the sink", lambda r: r.get("sink_spans"), 0),
            ],
        )
    out += side_by_side(
        "passthrough",
        "**W2, pass-through at 10,000 spans/s** (`bench.sh passthrough 10000`, and `PEER=rotel`: 512-span "
        "requests for 60 s; tailgate keeps every span with one `always_sample` policy, through its durable "
        "queue, and still writes span metrics; rotel in memory).",
        [
            ("spans accepted", lambda r: r.get("accepted"), 0),
            ("spans delivered to the sink", lambda r: r.get("sink_spans"), 0),
        ],
    )
    out += side_by_side(
        "max",
        "**W3, saturation** (`bench.sh max 500000`, and `PEER=rotel`: 500,000 spans/s offered for 20 s in "
        "512-span requests, one stream paced by the generator (a request waits for the previous answer, so "
        "the accepted rate is bounded by the round trip), a 30 s window; tailgate samples, rotel passes through).",
        [
            ("spans accepted", lambda r: r.get("accepted"), 0),
            ("spans refused (retryable)", lambda r: r.get("refused"), 0),
            ("spans per CPU-second, all processes", lambda r: spans_per_cpu_second(r), 0),
            ("spans per receive CPU-second", lambda r: spans_per_cpu_second(r, "tg-receive"), 0),
            ("private memory, peak (MiB)", lambda r: r.get("private_peak"), 1),
            ("delivered / keep-worthy (tailgate); delivered (rotel)", lambda r: r.get("sink_spans"), 0),
        ],
    )

    drain = runs.get(("drain", "tailgate"), [])
    if drain:
        out += [
            "**W4, drain** (`bench.sh drain`: the backend down while 100,000 spans/s of failing traces, all "
            "kept, fill the queue for 36 s; then the backend returns). rotel keeps no backlog on disk.",
            "",
            "| tailgate | median | runs |",
            "|---|---|---|",
            row("drain rate from the first delivery (MB/s)", [r.get("drain_mb_s") for r in drain], 0),
            row("backlog drained (MB)", [r.get("drain_mb") for r in drain], 0),
            row("export's private memory while draining, lowest (MiB)", [r.get("drain_rss_min") for r in drain], 1),
            row("export's private memory while draining, highest (MiB)", [r.get("drain_rss_max") for r in drain], 1),
            "",
        ]

    restart = runs.get(("restart", "tailgate"), [])
    if restart:
        labels = ["tail_sample SIGKILL", "receive SIGKILL", "log_mirror SIGKILL", "tail_sample SIGSTOP", "tail_sample hung"]
        out += [
            "**Stage restarts** (`bench.sh restart`, under the reference load): time from the signal to the "
            "stage ready again (SIGKILL: the supervisor sees the exit; SIGSTOP and a hang: the heartbeat, "
            "`liveness_timeout` 5 s).",
            "",
            "| tailgate | median | runs |",
            "|---|---|---|",
        ]
        for index, label in enumerate(labels):
            values = [r["ready"][index][1] if len(r.get("ready", [])) > index else None for r in restart]
            out.append(row(f"{label} (ms)", values, 0))
        out.append("")

    sizes = [
        f"`{path}` {os.path.getsize(path) / 1e6:.1f} MB ({what}"
        + ("; what was measured)" if profile == measured else ")")
        for path, profile, what in [
            ("target/dist/tailgate", "dist", "dist profile, fat LTO, stripped: what install.sh and the .deb ship"),
            ("target/release/tailgate", "release", "release profile, stripped"),
        ]
        if os.path.exists(path)
    ]
    if sizes:
        out += ["Binary: " + "; ".join(sizes) + ".", ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
