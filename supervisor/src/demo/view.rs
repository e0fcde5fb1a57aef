//! What the demo shows while it runs: a snapshot of the generator's counts, the sinks' arrivals,
//! tailgate's self-metrics (queue depth, stage memory, restarts) and each stage's CPU from
//! `/proc`, drawn as a block of lines redrawn in place on a terminal (or appended as plain
//! lines when the output is not one).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Samples of tailgate's self-metrics: `name{labels}` -> value.
#[derive(Debug, Default, Clone)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    /// Scrapes `/metrics` (plain HTTP/1.0 on loopback).
    pub async fn scrape(addr: SocketAddr) -> Option<Metrics> {
        let fetch = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: tailgate\r\n\r\n").await.ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            Some(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(2), fetch).await.ok()??;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1).is_none_or(|code| code != "200") {
            return None;
        }
        let mut samples = BTreeMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            if let Some((series, value)) = line.rsplit_once(' ')
                && let Ok(value) = value.parse::<f64>()
            {
                samples.insert(series.to_owned(), value);
            }
        }
        Some(Metrics(samples))
    }

    /// Sum of the samples of `name` whose labels contain `matching` (e.g. `stage="export"`).
    pub fn sum(&self, name: &str, matching: &str) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                series.split_once('{').map_or(series.as_str(), |(n, _)| n) == name && series.contains(matching)
            })
            .map(|(_, value)| *value)
            .fold(0.0, |sum, value| sum + value)
    }
}

/// The five stages, in pipeline order.
pub const STAGES: [&str; 5] = ["receive", "tail_sample", "log_mirror", "spanmetrics", "export"];

/// CPU time used (seconds) and private memory (bytes) of the supervisor and of each stage
/// process, by name.
pub fn processes(supervisor: u32) -> BTreeMap<String, (f64, u64)> {
    let usage = |pid: u32| Some((crate::proc::cpu_seconds(pid)?, crate::proc::private_memory_bytes(pid).unwrap_or(0)));
    let mut out = BTreeMap::new();
    if let Some(own) = usage(supervisor) {
        out.insert("supervisor".to_owned(), own);
    }
    for (stage, pid) in crate::proc::stage_children(supervisor) {
        if let Some(stage_usage) = usage(pid) {
            out.insert(stage, stage_usage);
        }
    }
    out
}

/// One frame of the live view.
#[derive(Debug, Default)]
pub struct Frame {
    pub elapsed: Duration,
    pub phase: String,
    pub users: f64,
    pub spans_in: u64,
    pub spans_delivered: u64,
    pub keep_worthy_spans: u64,
    pub lines_in: u64,
    pub lines_delivered: u64,
    pub exemplars: u64,
    pub exemplars_resolving: u64,
    pub spans_counted: f64,
    pub queue_items: f64,
    pub queue_bytes: f64,
    pub cut: bool,
    /// Process -> (CPU % of one core over the last interval, private MiB, restarts; `None`
    /// for the supervisor).
    pub stages: Vec<(String, f64, f64, Option<f64>)>,
    pub events: Vec<String>,
}

fn percent(part: f64, whole: f64) -> String {
    if whole > 0.0 { format!("{:5.1}%", 100.0 * part / whole) } else { "    -".to_owned() }
}

impl Frame {
    /// The frame as lines of text; with `kill` (the stage the `k` key kills), the keys line.
    pub fn render(&self, kill: Option<&str>) -> String {
        let mut out = String::new();
        let secs = self.elapsed.as_secs();
        let _ = writeln!(
            out,
            "tailgate demo  {:02}:{:02}  {}  {:.0} users{}",
            secs / 60,
            secs % 60,
            self.phase,
            self.users,
            if self.cut { "  [SINKS CUT OFF]" } else { "" }
        );
        let dropped = self.spans_in.saturating_sub(self.keep_worthy_spans) as f64;
        let _ = writeln!(
            out,
            "spans      in {:>9}   kept {:>8} delivered {:>8}   dropped {}",
            self.spans_in,
            self.keep_worthy_spans,
            self.spans_delivered,
            percent(dropped, self.spans_in as f64)
        );
        let _ = writeln!(
            out,
            "log lines  in {:>9}   delivered {:>8}   kept {}",
            self.lines_in,
            self.lines_delivered,
            percent(self.lines_delivered as f64, self.lines_in as f64)
        );
        let _ = writeln!(
            out,
            "exemplars  {:>9}   resolving {}   span metrics counted {:.0} of {} spans",
            self.exemplars,
            percent(self.exemplars_resolving as f64, self.exemplars as f64),
            self.spans_counted,
            self.spans_in
        );
        let _ = writeln!(
            out,
            "queue      {:>9.0} items  {:>8.1} MiB on disk",
            self.queue_items,
            self.queue_bytes / 1_048_576.0
        );
        let _ = writeln!(out, "process       cpu   memory  restarts");
        for (stage, cpu, mib, restarts) in &self.stages {
            let restarts = restarts.map_or("-".to_owned(), |n| format!("{n:.0}"));
            let _ = writeln!(out, "{stage:<12} {cpu:5.1}% {mib:6.1} MiB {restarts:>6}");
        }
        for event in self.events.iter().rev().take(3).rev() {
            let _ = writeln!(out, "  * {event}");
        }
        if let Some(stage) = kill {
            let _ = writeln!(out, "keys: c cut/restore the sinks, k kill {stage} (SIGKILL), q finish (twice: now)");
        }
        out
    }
}
