//! Where telemetry comes in: the OTLP receiver and the file tailer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ByteSize, Problems};

/// Receivers (the Collector's `receivers:` section).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Receivers {
    /// The OTLP receiver (gRPC and HTTP). Omit it to take only files.
    pub otlp: Option<OtlpReceiver>,
    /// JSON log lines tailed from files, as the Collector's `filelog` receiver.
    pub filelog: Option<FilelogReceiver>,
}

/// The OTLP receiver, as in the Collector's `otlp` receiver.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OtlpReceiver {
    /// Protocols to serve; omit one to disable it.
    pub protocols: OtlpProtocols,
    /// Caps on what one span or log record may carry, applied as received (the OpenTelemetry
    /// SDK's attribute limits, with its defaults): what is cut is counted in the item's
    /// `dropped_*_count` fields and in `tailgate_errors_total{stage="receive"}`.
    #[serde(default)]
    pub limits: AttributeLimits,
}

/// Per-item caps, named as the OpenTelemetry SDK configuration names them. Spans and log records
/// within every cap are stored as received, byte for byte; one over a cap is cut down to it:
/// the attributes, events or links past the count are dropped (the first ones kept) and counted
/// in `dropped_attributes_count` / `dropped_events_count` / `dropped_links_count`, string and
/// bytes values past the length are cut (strings at a character boundary, also inside arrays
/// and key-value lists).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttributeLimits {
    /// Most attributes per span and per log record (`0`: no cap). Default 128.
    #[serde(default = "default_count_limit")]
    pub attribute_count_limit: u32,
    /// Longest attribute value of a span or log record: characters of a string, bytes of a
    /// bytes value (omitted: no cap, the SDK's default).
    #[serde(default)]
    pub attribute_value_length_limit: Option<u32>,
    /// Most events per span (`0`: no cap). Default 128.
    #[serde(default = "default_count_limit")]
    pub event_count_limit: u32,
    /// Most links per span (`0`: no cap). Default 128.
    #[serde(default = "default_count_limit")]
    pub link_count_limit: u32,
}

impl Default for AttributeLimits {
    fn default() -> Self {
        AttributeLimits {
            attribute_count_limit: default_count_limit(),
            attribute_value_length_limit: None,
            event_count_limit: default_count_limit(),
            link_count_limit: default_count_limit(),
        }
    }
}

fn default_count_limit() -> u32 {
    128
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
    /// TLS on this listener (omitted: plain TCP, for loopback).
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Credentials every client must present in `Authorization` (`basic` with username and
    /// password_file, or `bearer_token_file`); others are refused with UNAUTHENTICATED / 401.
    /// Use with TLS beyond loopback: the header travels in clear text otherwise.
    #[serde(default)]
    pub auth: Option<crate::HttpAuth>,
}

/// A listener's TLS (the Collector's `tls` server settings): its certificate chain and key, and
/// optionally the CA that client certificates must chain to (mutual TLS: clients without one
/// are refused in the handshake). TLS 1.2 and 1.3.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM file: the server certificate, then its intermediates.
    pub cert_file: PathBuf,
    /// PEM file: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file of CA certificates: when set, every client must present a certificate that
    /// chains to one of them.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl ServerTls {
    fn validate(&self, problems: &mut Problems, path: &str) {
        problems.check_pem_file(&self.cert_file, &format!("{path}.cert_file"));
        problems.check_pem_file(&self.key_file, &format!("{path}.key_file"));
        if let Some(file) = &self.client_ca_file {
            problems.check_pem_file(file, &format!("{path}.client_ca_file"));
        }
    }
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
    /// TLS on this listener (omitted: plain TCP, for loopback).
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Credentials every client must present in `Authorization` (`basic` with username and
    /// password_file, or `bearer_token_file`); others are refused with UNAUTHENTICATED / 401.
    /// Use with TLS beyond loopback: the header travels in clear text otherwise.
    #[serde(default)]
    pub auth: Option<crate::HttpAuth>,
}

fn default_max_message_mib() -> u32 {
    4
}

/// Tails JSON log files (one record per line), as the Collector's `filelog` receiver; key names
/// and defaults follow it. The read offset of every file is committed in the same queue
/// transaction as the lines it produced, so a crash neither loses nor repeats a line.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilelogReceiver {
    /// Glob patterns of the files to tail (`*`, `?`, `[...]`, `**` for any depth).
    pub include: Vec<String>,
    /// Glob patterns of files to leave alone even when `include` matches them.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Where to start in a file found at the first start: `end` (only lines written from now on)
    /// or `beginning`. Files that appear later (rotation, new services) are always read from
    /// their beginning, and a file with a checkpoint continues from its checkpoint.
    #[serde(default)]
    pub start_at: StartAt,
    /// How often the files are checked for new lines, new files and rotation.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest line kept; longer lines are cut at this size and counted (`line_truncated`).
    #[serde(default = "default_max_log_size")]
    pub max_log_size: ByteSize,
    /// Text encoding of the files. Only `utf-8`: invalid bytes are replaced with U+FFFD and
    /// counted (`invalid_utf8`).
    #[serde(default)]
    pub encoding: FileEncoding,
    /// A file is identified by device and inode plus a fingerprint of its first bytes (at most
    /// this many), so a renamed file keeps its offset and a reused inode is a new file.
    #[serde(default = "default_fingerprint_size")]
    pub fingerprint_size: ByteSize,
    /// A last line without a newline is emitted once the file has not grown for this long.
    #[serde(default = "default_force_flush_period", with = "humantime_serde")]
    pub force_flush_period: Duration,
    /// Add the file's name as the record attribute `log.file.name`.
    #[serde(default = "default_true")]
    pub include_file_name: bool,
    /// Add the file's path as the record attribute `log.file.path`.
    #[serde(default)]
    pub include_file_path: bool,
    /// Attributes added to every record.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Resource attributes added to every record's resource (e.g. `service.name` for files whose
    /// lines do not name their service).
    #[serde(default)]
    pub resource: BTreeMap<String, String>,
    /// How fields of the JSON lines are found and read.
    #[serde(default)]
    pub fields: FieldAliases,
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(200)
}

fn default_max_log_size() -> ByteSize {
    ByteSize(1024 * 1024)
}

fn default_fingerprint_size() -> ByteSize {
    ByteSize(1000)
}

fn default_force_flush_period() -> Duration {
    Duration::from_millis(500)
}

fn default_true() -> bool {
    true
}

/// Where reading starts in a file found at the first start.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// Only lines written after tailgate found the file.
    #[default]
    End,
    /// The whole file.
    Beginning,
}

/// Text encodings of tailed files.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub enum FileEncoding {
    /// UTF-8; invalid bytes are replaced and counted.
    #[default]
    #[serde(rename = "utf-8", alias = "utf8")]
    Utf8,
}

/// Field names of the JSON lines, each a list of aliases tried in order. The first alias is the
/// expected name: a field found under another alias is counted as schema drift. A dotted name
/// matches a top-level key with dots (`"trace.id": ...`) or a nested object (`{"trace": {"id":
/// ...}}`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FieldAliases {
    /// The trace id (32 hex digits).
    pub trace_id: Vec<String>,
    /// The span id (16 hex digits).
    pub span_id: Vec<String>,
    /// The level (text such as `ERR`, `warning`, `fatal`, or a number: see `level_numbers`).
    pub level: Vec<String>,
    /// The duration, each alias with its unit (`ms`, `us`, `ns` or `s`).
    pub duration: Vec<DurationField>,
    /// The event time (RFC 3339 text, or Unix seconds / milliseconds / nanoseconds by size);
    /// without it a record carries the time it was read.
    pub time: Vec<String>,
    /// The service name, put into the record's resource as `service.name`.
    pub service: Vec<String>,
    /// How numeric levels read: `syslog` (0 emergency .. 7 debug), `otel` (severity numbers
    /// 1..24) or `pino` (10 trace .. 60 fatal).
    pub level_numbers: LevelNumbers,
    /// Extra level words and their meaning (`trace`, `debug`, `info`, `warn`, `error`, `fatal`),
    /// on top of the built-in ones. Matching ignores case.
    pub levels: BTreeMap<String, LevelName>,
}

impl Default for FieldAliases {
    fn default() -> Self {
        let names = |list: &[&str]| list.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>();
        let duration = |name: &str, unit| DurationField { name: name.to_owned(), unit };
        FieldAliases {
            trace_id: names(&["trace_id", "traceId", "trace.id", "traceid"]),
            span_id: names(&["span_id", "spanId", "span.id"]),
            level: names(&["level", "severity", "lvl", "log.level"]),
            duration: vec![
                duration("duration_ms", DurationUnit::Ms),
                duration("duration", DurationUnit::Ms),
                duration("elapsed_ms", DurationUnit::Ms),
                duration("latency_ms", DurationUnit::Ms),
                duration("duration_us", DurationUnit::Us),
            ],
            time: names(&["time", "timestamp", "ts", "@timestamp"]),
            service: names(&["service.name", "service", "service_name"]),
            level_numbers: LevelNumbers::Syslog,
            levels: BTreeMap::new(),
        }
    }
}

/// A duration field and its unit.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DurationField {
    /// The field name.
    pub name: String,
    /// What one unit of its value is.
    pub unit: DurationUnit,
}

/// Units of a duration field.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DurationUnit {
    /// Seconds.
    S,
    /// Milliseconds.
    Ms,
    /// Microseconds.
    Us,
    /// Nanoseconds.
    Ns,
}

impl DurationUnit {
    /// Nanoseconds in one unit.
    pub fn nanos(self) -> f64 {
        match self {
            DurationUnit::S => 1e9,
            DurationUnit::Ms => 1e6,
            DurationUnit::Us => 1e3,
            DurationUnit::Ns => 1.0,
        }
    }
}

/// Scales of numeric levels.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LevelNumbers {
    /// RFC 5424 syslog: 0 emergency, 1 alert, 2 critical, 3 error, 4 warning, 5 notice, 6 info,
    /// 7 debug.
    Syslog,
    /// OpenTelemetry severity numbers 1..=24.
    Otel,
    /// pino / bunyan: 10 trace, 20 debug, 30 info, 40 warn, 50 error, 60 fatal.
    Pino,
}

/// The level words a configured level maps to.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LevelName {
    /// OTel severity TRACE (1).
    Trace,
    /// OTel severity DEBUG (5).
    Debug,
    /// OTel severity INFO (9).
    Info,
    /// OTel severity WARN (13).
    Warn,
    /// OTel severity ERROR (17).
    Error,
    /// OTel severity FATAL (21).
    Fatal,
}

impl LevelName {
    /// The OTel severity number of the level.
    pub fn severity_number(self) -> u8 {
        match self {
            LevelName::Trace => 1,
            LevelName::Debug => 5,
            LevelName::Info => 9,
            LevelName::Warn => 13,
            LevelName::Error => 17,
            LevelName::Fatal => 21,
        }
    }
}

impl Receivers {
    pub(crate) fn validate(&self, problems: &mut Problems) {
        if self.otlp.is_none() && self.filelog.is_none() {
            problems.add("receivers", "configure at least one of otlp, filelog");
        }
        if let Some(otlp) = &self.otlp {
            let protocols = &otlp.protocols;
            if protocols.grpc.is_none() && protocols.http.is_none() {
                problems.add("receivers.otlp.protocols", "enable at least one of grpc, http");
            }
            if let Some(grpc) = &protocols.grpc {
                problems.check_listen(&grpc.endpoint, "receivers.otlp.protocols.grpc.endpoint");
                problems.check_mib(grpc.max_recv_msg_size_mib, "receivers.otlp.protocols.grpc.max_recv_msg_size_mib");
                if let Some(tls) = &grpc.tls {
                    tls.validate(problems, "receivers.otlp.protocols.grpc.tls");
                }
                if let Some(auth) = &grpc.auth {
                    auth.validate(problems, "receivers.otlp.protocols.grpc.auth");
                }
            }
            if let Some(http) = &protocols.http {
                problems.check_listen(&http.endpoint, "receivers.otlp.protocols.http.endpoint");
                problems.check_mib(
                    http.max_request_body_size_mib,
                    "receivers.otlp.protocols.http.max_request_body_size_mib",
                );
                if let Some(tls) = &http.tls {
                    tls.validate(problems, "receivers.otlp.protocols.http.tls");
                }
                if let Some(auth) = &http.auth {
                    auth.validate(problems, "receivers.otlp.protocols.http.auth");
                }
            }
        }
        if let Some(filelog) = &self.filelog {
            filelog.validate(problems);
        }
    }
}

impl FilelogReceiver {
    fn validate(&self, problems: &mut Problems) {
        if self.include.is_empty() {
            problems.add("receivers.filelog.include", "name at least one glob pattern");
        }
        for (index, pattern) in self.include.iter().enumerate() {
            if !pattern.starts_with('/') {
                problems.add(
                    &format!("receivers.filelog.include[{index}]"),
                    &format!("{pattern:?} is not an absolute path"),
                );
            }
        }
        if self.poll_interval.is_zero() {
            problems.add("receivers.filelog.poll_interval", "must be above zero");
        }
        if self.max_log_size.0 < 64 || self.max_log_size.0 > 64 * 1024 * 1024 {
            problems.add("receivers.filelog.max_log_size", "must be between 64 B and 64 MiB");
        }
        if self.fingerprint_size.0 < 16 || self.fingerprint_size.0 > 64 * 1024 {
            problems.add("receivers.filelog.fingerprint_size", "must be between 16 B and 64 KiB");
        }
        let fields = &self.fields;
        let lists = [
            ("trace_id", fields.trace_id.len()),
            ("span_id", fields.span_id.len()),
            ("level", fields.level.len()),
            ("duration", fields.duration.len()),
        ];
        for (name, len) in lists {
            if len == 0 {
                problems.add(&format!("receivers.filelog.fields.{name}"), "name at least one field");
            }
        }
    }
}
