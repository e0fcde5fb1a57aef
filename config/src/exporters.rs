//! Where telemetry goes: one destination (or several) per signal, batching and retries.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Problems;

/// Destinations per signal, plus batching and retry shared by all of them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Exporters {
    /// Where kept traces go. Required.
    pub traces: Destination,
    /// Where kept logs go: OTLP, Loki, or both (each its own consumer with its own cursor).
    /// Without any, kept logs are counted as dropped (`no_destination`).
    pub logs: Option<LogsDestination>,
    /// Where metrics go (span metrics and received OTLP metrics): OTLP, Prometheus remote write,
    /// or both (each its own consumer). Without any, metrics are counted as dropped
    /// (`no_destination`).
    pub metrics: Option<MetricsDestination>,
    /// Batching of requests.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Retries of failed requests.
    #[serde(default)]
    pub retry_on_failure: RetryConfig,
    /// OTLP items the backend keeps refusing go to the dead-letter store instead of blocking
    /// the queue (`tailgate dead-letter` lists, replays and drops them).
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
}

/// When an OTLP item counts as poison.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// How long a request may keep failing with an error the backend answers (INTERNAL,
    /// UNKNOWN, DATA_LOSS) before it is split to find the items that cause it; such an item is
    /// dead-lettered once other requests get through. Outages (unreachable, timeouts,
    /// UNAVAILABLE) never dead-letter anything.
    #[serde(with = "humantime_serde")]
    pub after: Duration,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig { after: Duration::from_secs(300) }
    }
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
    /// Added to `timeout` per MiB of request, so a large request over a slow uplink is not cut
    /// off (and resent) for ever: the default 10s per MiB covers a 1 Mbit/s link.
    #[serde(default = "default_timeout_per_mib", with = "humantime_serde")]
    pub timeout_per_mib: Duration,
    /// HTTP/2 keepalive pings, as the Collector's gRPC client `keepalive`.
    #[serde(default)]
    pub keepalive: KeepaliveConfig,
    /// When the queue reaches its disk budget while this destination's backlog is in it:
    /// `push_back` (receive answers RESOURCE_EXHAUSTED / 503 until space frees up) or
    /// `drop_oldest` (this destination gives up its oldest batches, counted as `budget_full`,
    /// so intake goes on and the newest data is what is kept).
    #[serde(default)]
    pub when_full: WhenFull,
    /// TLS of an `https://` endpoint (the Collector's client `tls` settings): without it, the
    /// server is verified against the system's CA certificates.
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

/// An exporter's TLS: whom to trust, and the client certificate for mutual TLS.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM file of CA certificates to verify the server with, instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file: the client certificate (then intermediates), for servers that require one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file: the client certificate's key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when it differs from the endpoint's host.
    #[serde(default)]
    pub server_name_override: Option<String>,
}

impl ClientTls {
    /// For the HTTP exporters (Loki, remote write).
    fn validate_http(&self, endpoint: &str, path: &str, problems: &mut Problems) {
        if !endpoint.starts_with("https://") {
            problems.add(path, "TLS needs an https:// endpoint");
        }
        if self.server_name_override.is_some() {
            problems.add(&format!("{path}.server_name_override"), "is supported by the otlp exporter only");
        }
        self.validate(path, problems);
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.add(path, "cert_file and key_file go together");
        }
        for (key, file) in [("ca_file", &self.ca_file), ("cert_file", &self.cert_file), ("key_file", &self.key_file)] {
            if let Some(file) = file {
                problems.check_pem_file(file, &format!("{path}.{key}"));
            }
        }
    }
}

/// A destination's policy at the disk budget.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Stop intake until space frees up; nothing accepted is dropped.
    #[default]
    PushBack,
    /// Drop this destination's oldest batches (counted) to make room for new data.
    DropOldest,
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout_per_mib() -> Duration {
    Duration::from_secs(10)
}

/// HTTP/2 keepalive of a gRPC connection: a ping every `time` while idle or busy, and the
/// connection is dropped when the answer does not come within `timeout` (a dead link is found
/// in seconds, not after TCP's retransmission backoff).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    /// Interval between pings.
    #[serde(with = "humantime_serde")]
    pub time: Duration,
    /// How long to wait for the ping's answer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Ping also while no request is in flight.
    pub permit_without_stream: bool,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig { time: Duration::from_secs(10), timeout: Duration::from_secs(5), permit_without_stream: true }
    }
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

/// Destinations of kept logs. Each configured one reads the `kept_logs` edge with its own cursor,
/// so a Loki outage does not hold back OTLP delivery (and the edge's depth per consumer is each
/// destination's true backlog).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogsDestination {
    /// An OTLP/gRPC endpoint.
    pub otlp: Option<OtlpExporter>,
    /// A Loki push endpoint.
    pub loki: Option<LokiExporter>,
}

/// Loki's push API (`/loki/api/v1/push`): protobuf + snappy (or JSON), one stream per label set.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LokiExporter {
    /// The push URL, e.g. `http://loki:3100/loki/api/v1/push`.
    pub endpoint: String,
    /// Body format: `protobuf` (snappy-compressed `PushRequest`, what promtail sends) or `json`.
    #[serde(default)]
    pub encoding: LokiEncoding,
    /// Tenant, sent as `X-Scope-OrgID`.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Extra HTTP headers on every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Credentials: `basic` (username and password or password_file) or `bearer_token_file`.
    #[serde(default)]
    pub auth: Option<HttpAuth>,
    /// TLS of an `https://` endpoint: `ca_file` instead of the system's CAs, `cert_file` and
    /// `key_file` for mutual TLS (`server_name_override` is for the OTLP exporter only).
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// Stream labels. `service.name` always becomes `service_name` and the severity becomes
    /// `level`; these add more.
    #[serde(default)]
    pub labels: LokiLabels,
    /// Most distinct streams (label sets) this exporter creates. A record that would open a
    /// stream past the bound goes to its service's stream with `level` only, its other label
    /// values moved to structured metadata, and is counted (`label_overflow`).
    #[serde(default = "default_max_streams")]
    pub max_streams: u32,
    /// Where trace_id and span_id go: `structured_metadata` (Loki 3) or `line` (appended as
    /// ` trace_id=... span_id=...`).
    #[serde(default)]
    pub trace_context: TraceContextPlacement,
    /// What to do with an entry older than the newest one already sent on its stream (also
    /// across restarts): `accept` (send as is; Loki with `unordered_writes` takes entries up to
    /// about an hour behind), `rewrite_timestamp` (send it with the stream's newest timestamp),
    /// or `drop` (count it as `out_of_order`).
    #[serde(default)]
    pub out_of_order_action: OutOfOrderAction,
    /// Entries older than this are dropped before sending and counted (`stale`): Loki refuses
    /// entries older than its `reject_old_samples_max_age` (a week by default) and, per stream,
    /// those more than about an hour (`max_chunk_age` / 2) behind the newest it holds. `0s`
    /// (the default) sends everything and counts what Loki refuses (`too_old`).
    #[serde(default, with = "humantime_serde")]
    pub max_entry_age: Duration,
    /// When the queue reaches its disk budget while this destination's backlog is in it:
    /// `push_back` (receive answers RESOURCE_EXHAUSTED / 503 until space frees up) or
    /// `drop_oldest` (this destination gives up its oldest batches, counted as `budget_full`,
    /// so intake goes on and the newest data is what is kept).
    #[serde(default)]
    pub when_full: WhenFull,
    /// Deadline of one push request.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_max_streams() -> u32 {
    1000
}

/// Loki request bodies.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LokiEncoding {
    /// Snappy-compressed protobuf `PushRequest`.
    #[default]
    Protobuf,
    /// JSON `{"streams": [...]}`.
    Json,
}

/// Credentials for an HTTP backend (or a gateway in front of it).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum HttpAuth {
    /// HTTP basic auth.
    Basic {
        /// User name.
        username: String,
        /// Password, read from this file at start (trailing newline removed). Never logged.
        password_file: PathBuf,
    },
    /// `Authorization: Bearer <token>`, the token read from this file at start. Never logged.
    BearerTokenFile(PathBuf),
}

impl HttpAuth {
    /// The secret's file must be readable (the receivers read it at start).
    pub(crate) fn validate(&self, problems: &mut Problems, path: &str) {
        let (key, file) = match self {
            HttpAuth::Basic { password_file, .. } => ("basic.password_file", password_file),
            HttpAuth::BearerTokenFile(file) => ("bearer_token_file", file),
        };
        if let Err(err) = std::fs::metadata(file).and_then(|_| std::fs::File::open(file)) {
            problems.add(&format!("{path}.{key}"), &format!("cannot read {}: {err}", file.display()));
        }
    }
}

/// Label sources of Loki streams.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LokiLabels {
    /// Resource attributes that become labels (dots become underscores: `k8s.pod.name` ->
    /// `k8s_pod_name`).
    pub resource: Vec<String>,
    /// Record attributes that become labels.
    pub attributes: Vec<String>,
}

/// Where trace context goes in a Loki entry.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TraceContextPlacement {
    /// Structured metadata `trace_id` / `span_id` (Loki 3; needs `allow_structured_metadata`).
    #[default]
    StructuredMetadata,
    /// Appended to the line.
    Line,
}

/// Handling of entries older than their stream's newest.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutOfOrderAction {
    /// Send as is.
    Accept,
    /// Send with the stream's newest timestamp, so every stream is sent in timestamp order.
    #[default]
    RewriteTimestamp,
    /// Drop and count.
    Drop,
}

/// Destinations of metrics.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsDestination {
    /// An OTLP/gRPC endpoint.
    pub otlp: Option<OtlpExporter>,
    /// A Prometheus remote-write endpoint (Prometheus, Mimir, Thanos receive, VictoriaMetrics).
    pub prometheusremotewrite: Option<RemoteWriteExporter>,
}

/// Prometheus remote write 1.0 (protobuf + snappy), with exemplars.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteExporter {
    /// The write URL, e.g. `http://prometheus:9090/api/v1/write`.
    pub endpoint: String,
    /// Extra HTTP headers on every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Credentials: `basic` (username and password_file) or `bearer_token_file`.
    #[serde(default)]
    pub auth: Option<HttpAuth>,
    /// TLS of an `https://` endpoint: `ca_file` instead of the system's CAs, `cert_file` and
    /// `key_file` for mutual TLS (`server_name_override` is for the OTLP exporter only).
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// Deadline of one request.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Samples older than this are dropped before sending and counted (`stale`): Prometheus
    /// refuses samples behind its head block (about an hour) unless an out-of-order window is
    /// configured. `0s` sends everything.
    #[serde(default = "default_max_sample_age", with = "humantime_serde")]
    pub max_sample_age: Duration,
    /// Most samples in one request (Prometheus' own `max_samples_per_send`).
    #[serde(default = "default_max_samples_per_send")]
    pub max_samples_per_send: u32,
    /// While the backend is unreachable: `durable` keeps the backlog on disk and retries (the
    /// queue holds hours); `drop_during_outage` drops what cannot be sent after a few quick
    /// retries (counted as `backend_unavailable`), so only fresh samples go out after the outage.
    #[serde(default)]
    pub outage_policy: OutagePolicy,
    /// When the queue reaches its disk budget while this destination's backlog is in it:
    /// `push_back` (receive answers RESOURCE_EXHAUSTED / 503 until space frees up) or
    /// `drop_oldest` (this destination gives up its oldest batches, counted as `budget_full`,
    /// so intake goes on and the newest data is what is kept).
    #[serde(default)]
    pub when_full: WhenFull,
}

fn default_max_sample_age() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_samples_per_send() -> u32 {
    2000
}

/// What a destination does while its backend is down.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutagePolicy {
    /// Hold the backlog on disk and retry.
    #[default]
    Durable,
    /// Drop after a few retries (counted).
    DropDuringOutage,
}

impl Exporters {
    pub(crate) fn validate(&self, problems: &mut Problems) {
        self.traces.otlp.validate("exporters.traces.otlp", problems);
        if let Some(metrics) = &self.metrics {
            if metrics.otlp.is_none() && metrics.prometheusremotewrite.is_none() {
                problems
                    .add("exporters.metrics", "configure otlp, prometheusremotewrite or both (or remove the section)");
            }
            if let Some(otlp) = &metrics.otlp {
                otlp.validate("exporters.metrics.otlp", problems);
            }
            if let Some(remote) = &metrics.prometheusremotewrite {
                problems.check_url(&remote.endpoint, "exporters.metrics.prometheusremotewrite.endpoint");
                if let Some(tls) = &remote.tls {
                    tls.validate_http(&remote.endpoint, "exporters.metrics.prometheusremotewrite.tls", problems);
                }
                if remote.timeout.is_zero() {
                    problems.add("exporters.metrics.prometheusremotewrite.timeout", "must be above zero");
                }
                if remote.max_samples_per_send == 0 {
                    problems.add("exporters.metrics.prometheusremotewrite.max_samples_per_send", "must be above zero");
                }
            }
        }
        if let Some(logs) = &self.logs {
            if logs.otlp.is_none() && logs.loki.is_none() {
                problems.add("exporters.logs", "configure otlp, loki or both (or remove the section)");
            }
            if let Some(otlp) = &logs.otlp {
                otlp.validate("exporters.logs.otlp", problems);
            }
            if let Some(loki) = &logs.loki {
                problems.check_url(&loki.endpoint, "exporters.logs.loki.endpoint");
                if let Some(tls) = &loki.tls {
                    tls.validate_http(&loki.endpoint, "exporters.logs.loki.tls", problems);
                }
                if loki.timeout.is_zero() {
                    problems.add("exporters.logs.loki.timeout", "must be above zero");
                }
                if loki.max_streams == 0 {
                    problems.add("exporters.logs.loki.max_streams", "must be above zero");
                }
            }
        }
        if self.batch.send_batch_size == 0 {
            problems.add("exporters.batch.send_batch_size", "must be above zero");
        }
        if self.batch.timeout.is_zero() {
            problems.add("exporters.batch.timeout", "must be above zero");
        }
        let retry = &self.retry_on_failure;
        if retry.initial_interval.is_zero() || retry.initial_interval > retry.max_interval {
            problems.add("exporters.retry_on_failure.initial_interval", "must be above zero and at most max_interval");
        }
    }
}

impl OtlpExporter {
    fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check_url(&self.endpoint, &format!("{path}.endpoint"));
        if self.timeout.is_zero() {
            problems.add(&format!("{path}.timeout"), "must be above zero");
        }
        if let Some(tls) = &self.tls {
            if !self.endpoint.starts_with("https://") {
                problems.add(&format!("{path}.tls"), "TLS needs an https:// endpoint");
            }
            tls.validate(&format!("{path}.tls"), problems);
        }
    }
}
