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

fn default_log_level() -> String {
    "info".to_owned()
}

/// Receivers (the Collector's `receivers:` section).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Receivers {
    /// The OTLP receiver.
    pub otlp: OtlpReceiver,
}

/// The OTLP receiver, as in the Collector's `otlp` receiver.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpReceiver {
    /// Protocols to serve; omit one to disable it.
    pub protocols: OtlpProtocols,
}

/// OTLP transports.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpProtocols {
    /// OTLP/gRPC (TraceService, LogsService, MetricsService `Export`).
    pub grpc: Option<GrpcServer>,
    /// OTLP/HTTP (`/v1/traces`, `/v1/logs`, `/v1/metrics`; protobuf or JSON; gzip).
    pub http: Option<HttpServer>,
}

/// OTLP/gRPC server settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcServer {
    /// Listen address, `host:port`. Default `127.0.0.1:4317`.
    pub endpoint: String,
    /// Largest accepted message (after decompression), MiB. Larger ones get RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_message_mib")]
    pub max_recv_msg_size_mib: u32,
}

/// OTLP/HTTP server settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpServer {
    /// Listen address, `host:port`. Default `127.0.0.1:4318`.
    pub endpoint: String,
    /// Largest accepted body, MiB, both as sent and after gzip inflation. Larger ones get 413.
    #[serde(default = "default_max_message_mib")]
    pub max_request_body_size_mib: u32,
}

fn default_max_message_mib() -> u32 {
    4
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
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { max_size_mib: 1024, sync_interval: Duration::from_secs(1) }
    }
}

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
    /// Keep every trace with a span in ERROR status.
    pub keep_errors: bool,
    /// Keep every trace with a span lasting longer than this.
    #[serde(with = "humantime_serde")]
    pub latency_threshold: Duration,
    /// How long decisions are remembered so late spans and logs follow their trace.
    #[serde(with = "humantime_serde")]
    pub decision_cache_ttl: Duration,
}

impl Default for TailSampleConfig {
    fn default() -> Self {
        TailSampleConfig {
            decision_wait: Duration::from_secs(10),
            root_grace: Duration::from_secs(2),
            keep_errors: true,
            latency_threshold: Duration::from_millis(200),
            decision_cache_ttl: Duration::from_secs(120),
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

/// Span metrics.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpanmetricsConfig {
    /// How often accumulated metrics are written for export.
    #[serde(with = "humantime_serde")]
    pub metrics_flush_interval: Duration,
}

impl Default for SpanmetricsConfig {
    fn default() -> Self {
        SpanmetricsConfig { metrics_flush_interval: Duration::from_secs(15) }
    }
}

/// Destinations per signal, plus batching and retry shared by all of them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Exporters {
    /// Where kept traces go. Required.
    pub traces: Destination,
    /// Where kept logs go; without one, kept logs are counted as dropped (`no_destination`).
    pub logs: Option<Destination>,
    /// Where metrics go; without one, metrics are counted as dropped (`no_destination`).
    pub metrics: Option<Destination>,
    /// Batching of requests.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Retries of failed requests.
    #[serde(default)]
    pub retry_on_failure: RetryConfig,
}

/// One destination.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// An OTLP/gRPC endpoint (Jaeger, an OpenTelemetry Collector, ...).
    pub otlp: OtlpExporter,
}

/// OTLP/gRPC exporter settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpExporter {
    /// URL of the gRPC endpoint, e.g. `http://jaeger:4317`.
    pub endpoint: String,
    /// Deadline of one export request.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// `none` or `gzip`. gzip costs ~4-5 us per span; use it only on a narrow uplink.
    #[serde(default)]
    pub compression: Compression,
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Request compression.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Uncompressed.
    #[default]
    None,
    /// gzip.
    Gzip,
}

/// Batching, as the Collector's batch processor.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Items (spans, log records, data points) per request.
    pub send_batch_size: u32,
    /// Longest time a partial batch waits before it is sent.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { send_batch_size: 512, timeout: Duration::from_secs(5) }
    }
}

/// Retry backoff, as the Collector's `retry_on_failure`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First wait after a failure.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Longest wait between attempts.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { initial_interval: Duration::from_secs(1), max_interval: Duration::from_secs(5) }
    }
}

/// Supervision of the stage processes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Memory limiter, soft: when the stages' private (anonymous resident) memory together is
    /// above this many MiB, the supervisor logs a warning. (Telling stages to shed comes with the
    /// control socket.)
    pub memory_soft_limit_mib: u64,
    /// Memory limiter, hard: a stage process whose private memory is above this many MiB is
    /// killed and restarted; its state is rebuilt from the queue, so no backlog is lost. Checked
    /// every `queue.sync_interval`.
    pub memory_hard_limit_mib: u64,
    /// First wait before restarting a crashed stage; doubles per crash up to `restart_backoff_max`.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_initial: Duration,
    /// Longest wait before restarting a crashed stage.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// More restarts of one stage than this within `restart_window` make the supervisor exit
    /// non-zero (so systemd restarts the whole unit). Must be reachable with the backoff above:
    /// `check-config` reports a value a crash loop could never exceed.
    pub max_restarts: u32,
    /// Window for `max_restarts`.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// How long each stage gets to drain on shutdown before it is killed.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            memory_soft_limit_mib: 320,
            memory_hard_limit_mib: 400,
            restart_backoff_initial: Duration::from_millis(50),
            restart_backoff_max: Duration::from_secs(5),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl SupervisorConfig {
    /// How many times a stage that crashes immediately exits within `restart_window`, given the
    /// restart backoff (initial, doubling, capped): escalation needs `max_restarts` below this.
    pub fn crash_loop_exits_per_window(&self) -> u32 {
        let mut elapsed = Duration::ZERO;
        let mut delay = self.restart_backoff_initial.max(Duration::from_millis(1));
        let mut exits = 1;
        while exits < 100_000 {
            elapsed = elapsed.saturating_add(delay);
            if elapsed > self.restart_window {
                break;
            }
            exits += 1;
            delay = delay.saturating_mul(2).min(self.restart_backoff_max.max(Duration::from_millis(1)));
        }
        exits
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

    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_saphyr::from_str(text).map_err(|err| ConfigError::Parse(err.to_string()))?;
        let problems = config.validate();
        if problems.is_empty() { Ok(config) } else { Err(ConfigError::Invalid(problems)) }
    }

    /// Every problem at once, each with its path. Empty when the configuration is usable.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem = |path: &str, message: String| {
            problems.push(ConfigProblem { path: path.to_owned(), message });
        };
        let protocols = &self.receivers.otlp.protocols;
        if protocols.grpc.is_none() && protocols.http.is_none() {
            problem("receivers.otlp.protocols", "enable at least one of grpc, http".into());
        }
        if let Some(grpc) = &protocols.grpc {
            check_listen(&grpc.endpoint, "receivers.otlp.protocols.grpc.endpoint", &mut problem);
            check_size(grpc.max_recv_msg_size_mib, "receivers.otlp.protocols.grpc.max_recv_msg_size_mib", &mut problem);
        }
        if let Some(http) = &protocols.http {
            check_listen(&http.endpoint, "receivers.otlp.protocols.http.endpoint", &mut problem);
            check_size(
                http.max_request_body_size_mib,
                "receivers.otlp.protocols.http.max_request_body_size_mib",
                &mut problem,
            );
        }
        if self.queue.max_size_mib < 16 {
            problem("queue.max_size_mib", format!("{} is below the minimum of 16", self.queue.max_size_mib));
        }
        if self.queue.sync_interval.is_zero() {
            problem("queue.sync_interval", "must be above zero".into());
        }
        let sampling = &self.tail_sample;
        if sampling.decision_wait.is_zero() {
            problem("tail_sample.decision_wait", "must be above zero".into());
        }
        if sampling.root_grace > sampling.decision_wait {
            problem("tail_sample.root_grace", "must not exceed decision_wait".into());
        }
        if sampling.decision_cache_ttl < sampling.decision_wait {
            problem("tail_sample.decision_cache_ttl", "must be at least decision_wait".into());
        }
        if self.spanmetrics.metrics_flush_interval.is_zero() {
            problem("spanmetrics.metrics_flush_interval", "must be above zero".into());
        }
        let destinations = [
            ("exporters.traces", Some(&self.exporters.traces)),
            ("exporters.logs", self.exporters.logs.as_ref()),
            ("exporters.metrics", self.exporters.metrics.as_ref()),
        ];
        for (path, destination) in destinations {
            if let Some(destination) = destination {
                check_url(&destination.otlp.endpoint, &format!("{path}.otlp.endpoint"), &mut problem);
                if destination.otlp.timeout.is_zero() {
                    problem(&format!("{path}.otlp.timeout"), "must be above zero".into());
                }
            }
        }
        let exporters = &self.exporters;
        if exporters.batch.send_batch_size == 0 {
            problem("exporters.batch.send_batch_size", "must be above zero".into());
        }
        if exporters.batch.timeout.is_zero() {
            problem("exporters.batch.timeout", "must be above zero".into());
        }
        let retry = &exporters.retry_on_failure;
        if retry.initial_interval.is_zero() || retry.initial_interval > retry.max_interval {
            problem(
                "exporters.retry_on_failure.initial_interval",
                "must be above zero and at most max_interval".into(),
            );
        }
        let supervisor = &self.supervisor;
        if supervisor.memory_soft_limit_mib >= supervisor.memory_hard_limit_mib {
            problem("supervisor.memory_soft_limit_mib", "must be below memory_hard_limit_mib".into());
        }
        if supervisor.memory_hard_limit_mib == 0 {
            problem("supervisor.memory_hard_limit_mib", "must be above zero".into());
        }
        if supervisor.restart_backoff_initial > supervisor.restart_backoff_max {
            problem("supervisor.restart_backoff_initial", "must not exceed restart_backoff_max".into());
        }
        if supervisor.max_restarts == 0 {
            problem("supervisor.max_restarts", "must be above zero".into());
        }
        let reachable = supervisor.crash_loop_exits_per_window();
        if supervisor.max_restarts >= reachable {
            problem(
                "supervisor.max_restarts",
                format!(
                    "{} can never be exceeded: with this backoff a stage crashing at once exits at most {reachable} \
                     times within restart_window, so a crash loop would never escalate",
                    supervisor.max_restarts
                ),
            );
        }
        problems
    }

    /// The queue's directory.
    pub fn queue_dir(&self) -> PathBuf {
        self.data_dir.join("queue")
    }
}

fn check_listen(endpoint: &str, path: &str, problem: &mut impl FnMut(&str, String)) {
    if endpoint.parse::<SocketAddr>().is_err() {
        problem(path, format!("{endpoint:?} is not a host:port socket address"));
    }
}

fn check_size(mib: u32, path: &str, problem: &mut impl FnMut(&str, String)) {
    if mib == 0 || mib > 256 {
        problem(path, format!("{mib} is outside 1..=256"));
    }
}

fn check_url(endpoint: &str, path: &str, problem: &mut impl FnMut(&str, String)) {
    let rest = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"));
    match rest {
        Some(authority) if !authority.trim_end_matches('/').is_empty() && !authority.contains(' ') => {}
        _ => problem(path, format!("{endpoint:?} is not an http:// or https:// URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_carries_seed_values() {
        let config = Config::embedded_default().unwrap();
        assert_eq!(config.tail_sample.latency_threshold, Duration::from_millis(200));
        assert_eq!(config.exporters.batch.send_batch_size, 512);
        assert_eq!(config.exporters.batch.timeout, Duration::from_secs(5));
        assert_eq!(config.supervisor.memory_soft_limit_mib, 320);
        assert_eq!(config.supervisor.memory_hard_limit_mib, 400);
        assert_eq!(config.exporters.retry_on_failure.initial_interval, Duration::from_secs(1));
        assert_eq!(config.exporters.retry_on_failure.max_interval, Duration::from_secs(5));
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
    fn unknown_keys_are_rejected() {
        let text = DEFAULT_CONFIG_YAML.replace("tail_sample:", "tail_sample:\n  decision_wiat: 3s");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("decision_wiat"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut config = Config::embedded_default().unwrap();
        config.receivers.otlp.protocols.grpc.as_mut().unwrap().endpoint = "nowhere".into();
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
}
