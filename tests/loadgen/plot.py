#!/usr/bin/env python3
"""Plots for BENCHMARKS.md from the series the bench writes (tests/loadgen/bench.sh, PLOTS=DIR).

  plot.py processes SERIES.csv OUT.png TITLE   # `tailgate-loadgen meter --series`: CPU and
                                               # private memory per process over time
  plot.py drain DRAIN.csv OUT.png TITLE        # t,kept_spans,export_private_kib: the backlog
                                               # and export's memory while the queue drains

Needs matplotlib (bench.sh installs it into target/bench-venv).
"""

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["tailgate", "tg-receive", "tg-tail_sample", "tg-log_mirror", "tg-spanmetrics", "tg-export"]


def smooth(values, window=5):
    """Moving average over `window` samples: CPU time is counted in 10 ms ticks, so a
    one-second sample of a process using 1-3% of a core is quantised to whole percents."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def processes(path, out, title):
    cpu = defaultdict(dict)
    mem = defaultdict(dict)
    times = set()
    with open(path) as f:
        for row in csv.DictReader(f):
            t = float(row["t"])
            times.add(t)
            name = row["process"]
            cpu[name][t] = cpu[name].get(t, 0.0) + float(row["cpu_percent"])
            mem[name][t] = mem[name].get(t, 0.0) + float(row["private_mib"])
    times = sorted(times)
    names = [n for n in ORDER if n in cpu] + sorted(n for n in cpu if n not in ORDER)
    label = {n: ("supervisor" if n == "tailgate" else n.removeprefix("tg-")) for n in names}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.stackplot(times, [smooth([cpu[n].get(t, 0.0) for t in times]) for n in names], labels=[label[n] for n in names])
    top.set_ylabel("CPU, % of one core (5 s mean)")
    top.set_title(title)
    top.legend(loc="upper left", fontsize="small", ncol=3)
    bottom.stackplot(times, [[mem[n].get(t, 0.0) for t in times] for n in names], labels=[label[n] for n in names])
    bottom.set_ylabel("private memory, MiB")
    bottom.set_xlabel("seconds")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def drain(path, out, title):
    t, left, rss = [], [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            t.append(float(row["t"]))
            left.append(int(row["kept_spans"]) / 1e6)
            rss.append(int(row["export_private_kib"]) / 1024)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, left)
    top.set_ylabel("backlog, million spans")
    top.set_title(title)
    bottom.plot(t, rss, color="tab:orange")
    bottom.set_ylabel("export private memory, MiB")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds after the backend returned")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    kind, source, target, title = sys.argv[1:5]
    {"processes": processes, "drain": drain}[kind](source, target, title)
