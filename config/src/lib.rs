//! tailgate's configuration: typed, documented, validated.
//!
//! Every field's doc comment is its user documentation. Defaults are the seed's proven values
//! (200 ms latency threshold, batches of 512 items or 5 s, memory limiter 320/400 MiB, retries
//! backing off 1 s to 5 s). Key names follow the OpenTelemetry Collector where the meaning is
//! the same (`endpoint`, `decision_wait`, `send_batch_size`, `retry_on_failure`, ...).
//! The format is YAML, what OTel operators write; it is parsed with serde-saphyr (maintained,
//! pure Rust) because serde_yaml is archived.
//!
//! The same [`Config::load`] / [`Config::validate`] run in `tailgate check-config` and at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod env;
mod exporters;
mod receivers;
mod sampling;
mod supervisor;

pub use exporters::*;
pub use receivers::*;
pub use sampling::*;
pub use supervisor::*;

/// The embedded default configuration: works for a non-root user from a checkout.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("../tailgate.example.yaml");

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the durable queue, wake-up sockets and checkpoints. Relative paths are
    /// resolved against the working directory. `tailgate run --data-dir` overrides it.
    pub data_dir: PathBuf,
    /// Log filter for every process (`tracing` env-filter syntax, e.g. `info,tailgate=debug`).
    /// `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// How log lines are written to stderr: `auto` (journald's form when stderr is the journal,
    /// else text), `text` (timestamped lines), `journald` (no timestamp, the level as a syslog
    /// priority prefix `<3>`..`<7>`), `json` (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Where telemetry comes in.
    pub receivers: Receivers,
    /// The on-disk queue between stages.
    #[serde(default)]
    pub queue: QueueConfig,
    /// Tail-based sampling.
    #[serde(default)]
    pub tail_sample: TailSampleConfig,
    /// Logs following their trace's decision.
    #[serde(default)]
    pub log_mirror: LogMirrorConfig,
    /// RED metrics from kept spans.
    #[serde(default)]
    pub spanmetrics: SpanmetricsConfig,
    /// Where telemetry goes.
    pub exporters: Exporters,
    /// Stage process supervision.
    #[serde(default)]
    pub supervisor: SupervisorConfig,
}

/// See [`Config::log_format`].
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `journald` when stderr is connected to the journal (`JOURNAL_STREAM`), else `text`.
    #[default]
    Auto,
    /// Timestamped human-readable lines.
    Text,
    /// No timestamp (the journal adds its own); the level as a syslog priority prefix.
    Journald,
    /// One JSON object per line.
    Json,
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// The durable queue.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Disk budget of the queue, MiB: the LMDB map size. Intake pushes back (gRPC
    /// RESOURCE_EXHAUSTED, HTTP 503 with Retry-After) once 80% of it is in use.
    pub max_size_mib: u64,
    /// How often committed data is flushed to disk. Commits do not fsync: a process crash loses
    /// nothing, a power loss at most this interval.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// How long a receiver waits to write a request into the queue before it answers a
    /// retryable refusal (RESOURCE_EXHAUSTED / 503 with a retry hint) instead of hanging while
    /// another stage holds the queue's writer lock (a frozen or stalled stage).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { max_size_mib: 1024, sync_interval: Duration::from_secs(1), write_timeout: Duration::from_secs(2) }
    }
}

/// Most `string_attribute` and `numeric_attribute` policies, sub-policies included: tail_sample
/// keeps which of them a pending trace matched in one 64-bit word.
pub const MAX_ATTRIBUTE_POLICIES: usize = 64;

/// Tail-based sampling policies and timing.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TailSampleConfig {
    /// Longest time a trace is buffered after its first span arrived before it is decided.
    #[serde(with = "humantime_serde")]
    pub decision_wait: Duration,
    /// Once a trace's root span has arrived, decide this long after it instead of waiting the
    /// full `decision_wait` (children usually end before their root).
    #[serde(with = "humantime_serde")]
    pub root_grace: Duration,
    /// Shorthand (when `policies` is empty) for a `status_code` policy keeping ERROR traces.
    /// Default true. With `policies`, write that policy instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_errors: Option<bool>,
    /// Shorthand (when `policies` is empty) for a `latency` policy. Default 200ms. With
    /// `policies`, write that policy instead.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub latency_threshold: Option<Duration>,
    /// Sampling policies (OTel `tail_sampling` shape); empty: the shorthand above. At most 64
    /// `string_attribute` and `numeric_attribute` policies, sub-policies included.
    pub policies: Vec<PolicyConfig>,
    /// How long decisions are remembered so late spans and logs follow their trace.
    #[serde(with = "humantime_serde")]
    pub decision_cache_ttl: Duration,
    /// How long keep decisions are remembered (at least `decision_cache_ttl`): a late span or log
    /// of a kept trace within it is kept too, never judged again as a new trace.
    #[serde(with = "humantime_serde")]
    pub kept_decision_ttl: Duration,
    /// A trace with this many spans pending is decided at once on what it has (a giant trace
    /// must not hold the index); its later spans follow that decision.
    pub max_spans_per_trace: u32,
    /// Heap the pending-trace index may use (estimated per trace and per span; span payloads
    /// stay in the queue). Above it the traces due soonest are decided early on what they have.
    pub max_pending_bytes: ByteSize,
}

impl TailSampleConfig {
    /// Whether an ERROR status keeps a trace outright: the shorthand's `keep_errors` (default
    /// true), or a top-level `status_code` policy with ERROR. Records without a trace are judged
    /// by it too.
    pub fn keeps_errors(&self) -> bool {
        if self.policies.is_empty() {
            return self.keep_errors.unwrap_or(true);
        }
        self.policies.iter().any(|p| {
            p.kind == PolicyType::StatusCode
                && p.status_code.as_ref().is_some_and(|s| s.status_codes.contains(&StatusCode::Error))
        })
    }

    /// The lowest latency that keeps a trace outright: the shorthand's `latency_threshold`
    /// (default 200ms), or the lowest top-level `latency` policy, if any.
    pub fn latency_keeps_from(&self) -> Option<Duration> {
        if self.policies.is_empty() {
            return Some(self.latency_threshold.unwrap_or(Duration::from_millis(200)));
        }
        self.policies
            .iter()
            .filter(|p| p.kind == PolicyType::Latency)
            .filter_map(|p| p.latency.as_ref().map(|l| Duration::from_millis(l.threshold_ms)))
            .min()
    }
}

impl Default for TailSampleConfig {
    fn default() -> Self {
        TailSampleConfig {
            decision_wait: Duration::from_secs(10),
            root_grace: Duration::from_secs(2),
            keep_errors: None,
            latency_threshold: None,
            policies: Vec::new(),
            decision_cache_ttl: Duration::from_secs(120),
            kept_decision_ttl: Duration::from_secs(30 * 60),
            max_spans_per_trace: 10_000,
            max_pending_bytes: ByteSize(64 << 20),
        }
    }
}

/// Log correlation.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogMirrorConfig {
    /// Longest time a log record with a trace id waits for its trace's decision; after it the
    /// record is judged on its own (kept at ERROR severity or above) and counted.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for LogMirrorConfig {
    fn default() -> Self {
        LogMirrorConfig { max_wait: Duration::from_secs(30) }
    }
}

/// Span metrics, as the Collector's spanmetrics connector: `traces.span.metrics.calls` (sum) and
/// `traces.span.metrics.duration` (histogram, ms) per service, span name, kind, status code and
/// the configured dimensions.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpanmetricsConfig {
    /// Which spans are counted: `all` (every decided span, kept or dropped: rates and latencies
    /// describe the real traffic) or `kept` (only spans of kept traces).
    pub source: SpanmetricsSource,
    /// How often accumulated metrics are written for export.
    #[serde(with = "humantime_serde")]
    pub metrics_flush_interval: Duration,
    /// The duration histogram.
    pub histogram: HistogramConfig,
    /// Extra dimensions: span attributes, else resource attributes, else `default` (a dimension
    /// without value and default is left out of the series).
    pub dimensions: Vec<DimensionConfig>,
    /// Most series kept; spans of further series are counted in one overflow series with the
    /// attribute `otel.metric.overflow: true`.
    pub aggregation_cardinality_limit: u32,
    /// A series not updated for this long is forgotten (its state deleted); `0s` keeps series
    /// for ever (up to the cardinality limit).
    #[serde(with = "humantime_serde")]
    pub metrics_expiration: Duration,
    /// Exemplars on the histogram: trace_id and span_id of spans of kept traces only.
    pub exemplars: ExemplarsConfig,
}

impl Default for SpanmetricsConfig {
    fn default() -> Self {
        SpanmetricsConfig {
            source: SpanmetricsSource::All,
            metrics_flush_interval: Duration::from_secs(15),
            histogram: HistogramConfig::default(),
            dimensions: Vec::new(),
            aggregation_cardinality_limit: 2000,
            metrics_expiration: Duration::from_secs(300),
            exemplars: ExemplarsConfig::default(),
        }
    }
}

/// Which spans spanmetrics counts.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SpanmetricsSource {
    /// Every decided span.
    All,
    /// Spans of kept traces only.
    Kept,
}

/// The duration histogram's buckets.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistogramConfig {
    /// Unit of the histogram: `ms` (the connector's default).
    pub unit: String,
    /// Explicit bucket bounds.
    pub explicit: ExplicitBuckets,
}

impl HistogramConfig {
    /// The bucket bounds in milliseconds, what span durations are bucketed by.
    pub fn bounds_ms(&self) -> Vec<f64> {
        self.explicit.buckets.iter().map(|b| b.0.as_secs_f64() * 1000.0).collect()
    }
}

impl Default for HistogramConfig {
    fn default() -> Self {
        HistogramConfig { unit: "ms".into(), explicit: ExplicitBuckets::default() }
    }
}

/// Explicit histogram bounds.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExplicitBuckets {
    /// Upper bounds, strictly increasing, as durations (`2ms`, `1s`). Default: the connector's
    /// 2, 4, 6, 8, 10, 50, 100, 200, 400, 800 ms, 1, 1.4, 2, 5, 10, 15 s.
    pub buckets: Vec<BucketBound>,
}

/// A histogram bound, written as a duration (`2ms`, `1.5s`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
pub struct BucketBound(#[serde(with = "humantime_serde")] pub Duration);

impl Default for ExplicitBuckets {
    fn default() -> Self {
        let ms = [2u64, 4, 6, 8, 10, 50, 100, 200, 400, 800, 1000, 1400, 2000, 5000, 10_000, 15_000];
        ExplicitBuckets { buckets: ms.iter().map(|ms| BucketBound(Duration::from_millis(*ms))).collect() }
    }
}

/// One extra dimension.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DimensionConfig {
    /// Attribute name, e.g. `http.method`.
    pub name: String,
    /// Value when neither the span nor its resource has the attribute.
    #[serde(default)]
    pub default: Option<String>,
}

/// Exemplars.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExemplarsConfig {
    /// Attach exemplars.
    pub enabled: bool,
    /// Most exemplars per data point per flush.
    pub max_per_data_point: u32,
}

impl Default for ExemplarsConfig {
    fn default() -> Self {
        ExemplarsConfig { enabled: false, max_per_data_point: 5 }
    }
}

impl SpanmetricsConfig {
    fn validate(&self, problems: &mut Problems) {
        if self.metrics_flush_interval.is_zero() {
            problems.add("spanmetrics.metrics_flush_interval", "must be above zero");
        }
        if self.histogram.unit != "ms" {
            problems.add("spanmetrics.histogram.unit", "only ms is supported");
        }
        let buckets = &self.histogram.explicit.buckets;
        if buckets.is_empty() || buckets.windows(2).any(|pair| pair[0] >= pair[1]) {
            problems.add("spanmetrics.histogram.explicit.buckets", "must be non-empty and strictly increasing");
        }
        if self.aggregation_cardinality_limit == 0 {
            problems.add("spanmetrics.aggregation_cardinality_limit", "must be above zero");
        }
        if self.dimensions.len() > 16 {
            problems.add("spanmetrics.dimensions", "at most 16 dimensions");
        }
    }
}

/// One problem found in a configuration, with the path of the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `receivers.otlp.protocols.grpc.endpoint`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Loading a configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML does not parse or does not match the schema (unknown key, wrong type).
    #[error("{0}")]
    Parse(String),
    /// The values are inconsistent; every problem is listed.
    #[error("{} problem(s):\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

impl Config {
    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG_YAML)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Config::parse(&text)
    }

    /// Parses and validates YAML text, after expanding its `${env:NAME}` references from the
    /// process environment (see the `env` module).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, &|name| std::env::var(name).ok())
    }

    /// [`Config::parse`] with `lookup` as the environment. Messages never carry an expanded
    /// value: they show the reference instead.
    pub fn parse_with_env(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let expanded = env::expand(text, lookup).map_err(|problems| {
            let problem = |message| ConfigProblem { path: "(environment references)".to_owned(), message };
            ConfigError::Invalid(problems.into_iter().map(problem).collect())
        })?;
        let mut options = serde_saphyr::Options::default();
        // A parse error normally quotes the lines around it, cropped: a cropped secret would
        // escape redaction, so with environment values in the text only the location is given.
        options.with_snippet = !expanded.has_values();
        let config: Config = serde_saphyr::from_str_with_options(&expanded.text, options)
            .map_err(|err| ConfigError::Parse(expanded.redact(&err.to_string())))?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            let redact = |p: ConfigProblem| ConfigProblem { message: expanded.redact(&p.message), ..p };
            Err(ConfigError::Invalid(problems.into_iter().map(redact).collect()))
        }
    }

    /// Every problem at once, each with its path. Empty when the configuration is usable.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut problems = Problems::default();
        self.receivers.validate(&mut problems);
        if self.queue.max_size_mib < 16 {
            problems.add("queue.max_size_mib", &format!("{} is below the minimum of 16", self.queue.max_size_mib));
        }
        if self.queue.sync_interval.is_zero() {
            problems.add("queue.sync_interval", "must be above zero");
        }
        let sampling = &self.tail_sample;
        if sampling.decision_wait.is_zero() {
            problems.add("tail_sample.decision_wait", "must be above zero");
        }
        if sampling.root_grace > sampling.decision_wait {
            problems.add("tail_sample.root_grace", "must not exceed decision_wait");
        }
        if sampling.decision_cache_ttl < sampling.decision_wait {
            problems.add("tail_sample.decision_cache_ttl", "must be at least decision_wait");
        }
        if sampling.kept_decision_ttl < sampling.decision_cache_ttl {
            problems.add("tail_sample.kept_decision_ttl", "must be at least decision_cache_ttl");
        }
        if !sampling.policies.is_empty() {
            if sampling.keep_errors.is_some() {
                problems.add(
                    "tail_sample.keep_errors",
                    "with policies, write a policy instead: {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}",
                );
            }
            if let Some(threshold) = sampling.latency_threshold {
                problems.add(
                    "tail_sample.latency_threshold",
                    &format!(
                        "with policies, write a policy instead: {{name: slow, type: latency, latency: {{threshold_ms: {}}}}}",
                        threshold.as_millis()
                    ),
                );
            }
            let mut names = std::collections::HashSet::new();
            for (i, policy) in sampling.policies.iter().enumerate() {
                let path = format!("tail_sample.policies[{i}]");
                if !names.insert(policy.name.as_str()) {
                    problems.add(&path, &format!("policy name {:?} is used twice", policy.name));
                }
                policy.validate(&path, &mut problems);
            }
            let adaptive =
                sampling.policies.iter().filter(|p| p.latency.as_ref().is_some_and(|l| l.adaptive.is_some()));
            if adaptive.count() > 1 {
                problems.add("tail_sample.policies", "at most one latency policy can be adaptive");
            }
            let tests: usize = sampling.policies.iter().map(PolicyConfig::attribute_tests).sum();
            if tests > MAX_ATTRIBUTE_POLICIES {
                problems.add(
                    "tail_sample.policies",
                    &format!(
                        "{tests} string_attribute/numeric_attribute policies (sub-policies included): at most \
                         {MAX_ATTRIBUTE_POLICIES}; match several values in one policy (`values`, or a regex)"
                    ),
                );
            }
        }
        if sampling.max_spans_per_trace == 0 {
            problems.add("tail_sample.max_spans_per_trace", "must be above zero");
        }
        if sampling.max_pending_bytes.0 < 1 << 20 {
            problems.add("tail_sample.max_pending_bytes", "must be at least 1MiB");
        }
        if self.log_mirror.max_wait <= sampling.decision_wait {
            problems.add(
                "log_mirror.max_wait",
                &format!(
                    "{:?} must be larger than tail_sample.decision_wait ({:?}): a record would give up on its \
                     trace before the sampler could have decided it",
                    self.log_mirror.max_wait, sampling.decision_wait
                ),
            );
        }
        self.spanmetrics.validate(&mut problems);
        self.exporters.validate(&mut problems);
        let supervisor = &self.supervisor;
        if supervisor.memory_soft_limit_mib >= supervisor.memory_hard_limit_mib {
            problems.add("supervisor.memory_soft_limit_mib", "must be below memory_hard_limit_mib");
        }
        if supervisor.memory_hard_limit_mib == 0 {
            problems.add("supervisor.memory_hard_limit_mib", "must be above zero");
        }
        for (stage, caps) in &supervisor.cgroups.stages {
            let path = format!("supervisor.cgroups.stages.{stage}");
            if !STAGE_MEMORY_SHARES.iter().any(|(name, _)| name == stage) {
                problems.add(&path, "unknown stage (receive, tail_sample, log_mirror, spanmetrics, export)");
            }
            if caps.cpu_max_percent == Some(0) || caps.memory_max_mib == Some(0) || caps.memory_high_mib == Some(0) {
                problems.add(&path, "caps must be above zero (leave a cap out to not set it)");
            }
        }
        for (stage, budget) in &supervisor.stage_memory {
            let path = format!("supervisor.stage_memory.{stage}");
            if !STAGE_MEMORY_SHARES.iter().any(|(name, _)| name == stage) {
                problems.add(&path, "unknown stage (receive, tail_sample, log_mirror, spanmetrics, export)");
            } else if budget.soft_mib == 0 || budget.soft_mib >= budget.hard_mib {
                problems.add(&path, "soft_mib must be above zero and below hard_mib");
            }
        }
        if supervisor.restart_backoff_initial > supervisor.restart_backoff_max {
            problems.add("supervisor.restart_backoff_initial", "must not exceed restart_backoff_max");
        }
        if supervisor.liveness_timeout.is_zero() {
            problems.add("supervisor.liveness_timeout", "must be above zero");
        }
        if supervisor.max_restarts == 0 {
            problems.add("supervisor.max_restarts", "must be above zero");
        }
        let reachable = supervisor.crash_loop_exits_per_window();
        if supervisor.max_restarts >= reachable {
            problems.add(
                "supervisor.max_restarts",
                &format!(
                    "{} can never be exceeded: with this backoff a stage crashing at once exits at most {reachable} \
                     times within restart_window, so a crash loop would never escalate",
                    supervisor.max_restarts
                ),
            );
        }
        problems.0
    }

    /// The queue's directory.
    pub fn queue_dir(&self) -> PathBuf {
        self.data_dir.join("queue")
    }
}

/// Collects [`ConfigProblem`]s while validating.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<ConfigProblem>);

impl Problems {
    pub(crate) fn add(&mut self, path: &str, message: &str) {
        self.0.push(ConfigProblem { path: path.to_owned(), message: message.to_owned() });
    }

    pub(crate) fn check_listen(&mut self, endpoint: &str, path: &str) {
        if endpoint.parse::<SocketAddr>().is_err() {
            self.add(path, &format!("{endpoint:?} is not a host:port socket address"));
        }
    }

    pub(crate) fn check_mib(&mut self, mib: u32, path: &str) {
        if mib == 0 || mib > 256 {
            self.add(path, &format!("{mib} is outside 1..=256"));
        }
    }

    /// A certificate or key file must be readable and hold PEM (whether it parses is checked
    /// when the listener or client is built, with the same message).
    pub(crate) fn check_pem_file(&mut self, file: &std::path::Path, path: &str) {
        match std::fs::read_to_string(file) {
            Ok(text) if text.contains("-----BEGIN ") => {}
            Ok(_) => self.add(path, &format!("{} holds no PEM block", file.display())),
            Err(err) => self.add(path, &format!("cannot read {}: {err}", file.display())),
        }
    }

    pub(crate) fn check_url(&mut self, endpoint: &str, path: &str) {
        let rest = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"));
        match rest {
            Some(authority) if !authority.trim_end_matches('/').is_empty() && !authority.contains(' ') => {}
            _ => self.add(path, &format!("{endpoint:?} is not an http:// or https:// URL")),
        }
    }
}

/// A size in bytes, written as a number of bytes or with a unit (`1000`, `16KiB`, `1MiB`, `1kb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `1024`, `64KiB`, `1MiB`, `1kb`, `2MB` (KB/MB are decimal, KiB/MiB binary).
    pub fn parse(text: &str) -> Option<ByteSize> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" => 1024,
            "mb" => 1_000_000,
            "mib" => 1024 * 1024,
            "gb" => 1_000_000_000,
            "gib" => 1024 * 1024 * 1024,
            _ => return None,
        };
        number.checked_mul(factor).map(ByteSize)
    }

    /// The size as a usize (saturating).
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as 1048576, 64KiB or 1MiB")
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(value))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<ByteSize, E> {
                u64::try_from(value).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<ByteSize, E> {
                ByteSize::parse(value)
                    .ok_or_else(|| E::custom(format!("{value:?} is not a size such as 64KiB or 1MiB")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_carries_seed_values() {
        let config = Config::embedded_default().unwrap();
        assert_eq!(config.tail_sample.latency_keeps_from(), Some(Duration::from_millis(200)));
        assert_eq!(config.exporters.batch.send_batch_size, 512);
        assert_eq!(config.exporters.batch.timeout, Duration::from_secs(5));
        assert_eq!(config.supervisor.memory_soft_limit_mib, 320);
        assert_eq!(config.supervisor.memory_hard_limit_mib, 400);
        assert_eq!(config.exporters.retry_on_failure.initial_interval, Duration::from_secs(1));
        assert_eq!(config.exporters.retry_on_failure.max_interval, Duration::from_secs(5));
    }

    #[test]
    fn environment_references_fill_values_and_never_show_in_messages() {
        let env = |name: &str| match name {
            "BACKEND" => Some("https://jaeger.example:4317".to_owned()),
            "TIMEOUT" => Some("hunter2".to_owned()),
            _ => None,
        };
        let text = DEFAULT_CONFIG_YAML.replacen("endpoint: http://127.0.0.1:14317", "endpoint: \"${env:BACKEND}\"", 1);
        let config = Config::parse_with_env(&text, &env).unwrap();
        assert_eq!(config.exporters.traces.otlp.endpoint, "https://jaeger.example:4317");
        // A value that does not parse: the message names the reference, not the value.
        let bad = text.replacen("timeout: 10s", "timeout: ${env:TIMEOUT}", 1);
        let message = Config::parse_with_env(&bad, &env).unwrap_err().to_string();
        assert!(!message.contains("hunter2") && message.contains("${env:TIMEOUT}"), "{message}");
        let unset = text.replacen("timeout: 10s", "timeout: ${env:UNSET_TIMEOUT}", 1);
        let message = Config::parse_with_env(&unset, &env).unwrap_err().to_string();
        assert!(message.contains("the environment variable UNSET_TIMEOUT is not set"), "{message}");
    }

    #[test]
    fn escalation_must_be_reachable() {
        let mut config = Config::embedded_default().unwrap();
        // 50 ms doubling to 5 s within 60 s: 7 fast restarts, then one every 5 s.
        assert_eq!(config.supervisor.crash_loop_exits_per_window(), 18);
        config.supervisor.max_restarts = 20;
        let paths: Vec<String> = config.validate().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, vec!["supervisor.max_restarts"]);
    }

    #[test]
    fn more_attribute_policies_than_a_trace_can_track_are_refused() {
        let policy = |i: usize| {
            format!("    - {{name: p{i}, type: string_attribute, string_attribute: {{key: k, values: [v{i}]}}}}\n")
        };
        let nested = "    - {name: n, type: drop, drop: {drop_sub_policy: [{name: a, type: numeric_attribute, numeric_attribute: {key: n, min_value: 1, max_value: 2}}]}}\n";
        let yaml = |count: usize| {
            let mut policies = String::from("  policies:\n");
            (0..count).for_each(|i| policies.push_str(&policy(i)));
            policies.push_str(nested);
            let start = DEFAULT_CONFIG_YAML.find("  # Shorthand:").unwrap();
            let end = DEFAULT_CONFIG_YAML.find("  decision_cache_ttl").unwrap();
            format!("{}{policies}{}", &DEFAULT_CONFIG_YAML[..start], &DEFAULT_CONFIG_YAML[end..])
        };
        Config::parse(&yaml(MAX_ATTRIBUTE_POLICIES - 1)).unwrap();
        let err = Config::parse(&yaml(MAX_ATTRIBUTE_POLICIES)).unwrap_err().to_string();
        assert!(err.contains("tail_sample.policies") && err.contains("at most 64"), "{err}");
    }

    #[test]
    fn policies_parse_in_the_collectors_shape_and_problems_name_the_fix() {
        let policies = "  policies:\n    - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}\n    - {name: slow, type: latency, latency: {threshold_ms: 200}}\n    - {name: checkout, type: string_attribute, string_attribute: {key: http.route, values: [/checkout]}}\n    - {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}\n";
        let start = DEFAULT_CONFIG_YAML.find("  # Shorthand:").unwrap();
        let end = DEFAULT_CONFIG_YAML.find("  decision_cache_ttl").unwrap();
        let with = |block: &str| format!("{}{block}{}", &DEFAULT_CONFIG_YAML[..start], &DEFAULT_CONFIG_YAML[end..]);
        let config = Config::parse(&with(policies)).unwrap();
        assert_eq!(config.tail_sample.policies.len(), 4);
        assert!(config.tail_sample.keeps_errors());
        assert_eq!(config.tail_sample.latency_keeps_from(), Some(Duration::from_millis(200)));
        // Without policies the shorthand stands for the same two.
        let shorthand = Config::parse(&with("  keep_errors: true\n  latency_threshold: 150ms\n")).unwrap();
        assert!(shorthand.tail_sample.keeps_errors());
        assert_eq!(shorthand.tail_sample.latency_keeps_from(), Some(Duration::from_millis(150)));
        // Both: check-config spells out the replacement.
        let err = Config::parse(&with(&format!("  keep_errors: true\n{policies}"))).unwrap_err().to_string();
        assert!(err.contains("tail_sample.keep_errors") && err.contains("type: status_code"), "{err}");
        let missing = "  policies:\n    - {name: slow, type: latency}\n";
        let err = Config::parse(&with(missing)).unwrap_err().to_string();
        assert!(err.contains("tail_sample.policies[0]") && err.contains("needs its section `latency:`"), "{err}");
        let regex = "  policies:\n    - {name: r, type: string_attribute, string_attribute: {key: k, values: ['(unclosed'], enabled_regex_matching: true}}\n";
        let err = Config::parse(&with(regex)).unwrap_err().to_string();
        assert!(err.contains("string_attribute.values[0]"), "{err}");
        let twice = "  policies:\n    - {name: a, type: always_sample}\n    - {name: a, type: always_sample}\n";
        assert!(Config::parse(&with(twice)).unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = DEFAULT_CONFIG_YAML.replace("tail_sample:", "tail_sample:\n  decision_wiat: 3s");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("decision_wiat"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut config = Config::embedded_default().unwrap();
        config.receivers.otlp.as_mut().unwrap().protocols.grpc.as_mut().unwrap().endpoint = "nowhere".into();
        config.exporters.traces.otlp.endpoint = "jaeger:4317".into();
        config.supervisor.memory_soft_limit_mib = 500;
        let paths: Vec<String> = config.validate().into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            vec![
                "receivers.otlp.protocols.grpc.endpoint",
                "exporters.traces.otlp.endpoint",
                "supervisor.memory_soft_limit_mib",
            ]
        );
    }

    #[test]
    fn log_wait_must_outlast_the_decision_wait() {
        let mut config = Config::embedded_default().unwrap();
        config.log_mirror.max_wait = config.tail_sample.decision_wait;
        let paths: Vec<String> = config.validate().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, vec!["log_mirror.max_wait"]);
    }

    #[test]
    fn filelog_and_loki_keys_parse_with_their_defaults() {
        let text = DEFAULT_CONFIG_YAML.replace(
            "receivers:\n",
            "receivers:\n  filelog:\n    include: [/var/log/app/*.jsonl]\n    start_at: beginning\n    max_log_size: 64KiB\n",
        );
        let text = text.replace(
            "  logs:\n    otlp:\n      endpoint: http://127.0.0.1:14317\n",
            "  logs:\n    loki:\n      endpoint: http://127.0.0.1:3100/loki/api/v1/push\n",
        );
        let config = Config::parse(&text).unwrap();
        let filelog = config.receivers.filelog.unwrap();
        assert_eq!(filelog.start_at, StartAt::Beginning);
        assert_eq!(filelog.max_log_size, ByteSize(64 * 1024));
        assert_eq!(filelog.poll_interval, Duration::from_millis(200));
        assert_eq!(filelog.fields.duration[0].name, "duration_ms");
        let logs = config.exporters.logs.unwrap();
        assert!(logs.otlp.is_none());
        let loki = logs.loki.unwrap();
        assert_eq!(loki.out_of_order_action, OutOfOrderAction::RewriteTimestamp);
        assert_eq!(loki.max_streams, 1000);
        assert_eq!(ByteSize::parse("1kb"), Some(ByteSize(1000)));
        assert_eq!(ByteSize::parse("2 MiB"), Some(ByteSize(2 << 20)));
        assert_eq!(ByteSize::parse("lots"), None);
    }
}
