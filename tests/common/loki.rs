//! A Loki push receiver (`POST /loki/api/v1/push`) for the multi-process tests.
//!
//! It decodes the real wire format on its own terms, independently of the product's structs:
//! the prost messages below are transcribed from Loki's `pkg/push/push.proto`, the body must be
//! `Content-Type: application/x-protobuf` and snappy-compressed in the raw block format (not the
//! framed one), and the stream labels are parsed from their selector text.
//!
//! It behaves like a Loki ingester where the tests need it to:
//! - answers 204 when every entry was taken;
//! - can refuse (HTTP 400, with Loki's message text) every entry whose line contains a marker;
//!   like Loki it still STORES the valid entries of such a push;
//! - keeps one copy of an identical entry (same stream, timestamp and line) pushed again;
//! - can answer 503 to the next N requests (storing nothing from them).
//!
//! Anything a real Loki would refuse as malformed (wrong content type, not snappy, not a
//! `PushRequest`, unparsable labels, no timestamp) is answered 4xx and recorded in
//! `protocol_errors`, which tests assert to be empty.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

/// Loki's push messages (`pkg/push/push.proto`, package `logproto`), transcribed by hand.
pub mod wire {
    /// `logproto.PushRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<StreamAdapter>,
    }

    /// `logproto.StreamAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StreamAdapter {
        #[prost(string, tag = "1")]
        pub labels: String,
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<EntryAdapter>,
        #[prost(uint64, tag = "3")]
        pub hash: u64,
    }

    /// `logproto.EntryAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EntryAdapter {
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        #[prost(string, tag = "2")]
        pub line: String,
        #[prost(message, repeated, tag = "3")]
        pub structured_metadata: Vec<LabelPairAdapter>,
    }

    /// `logproto.LabelPairAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPairAdapter {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `google.protobuf.Timestamp`.
    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// A stream's label set (Loki identifies a stream by its labels, whatever their order in the text).
pub type Labels = BTreeMap<String, String>;

/// One entry as pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LokiEntry {
    /// Unix nanoseconds.
    pub unix_nanos: i64,
    pub line: String,
    /// Structured metadata (name, value) in the order sent.
    pub metadata: Vec<(String, String)>,
}

impl LokiEntry {
    /// The value of structured metadata `name`.
    pub fn meta(&self, name: &str) -> Option<&str> {
        self.metadata.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One stream of a push, as decoded.
#[derive(Debug, Clone)]
pub struct PushedStream {
    /// The `labels` text as sent.
    pub selector: String,
    pub labels: Labels,
    pub entries: Vec<LokiEntry>,
}

/// One HTTP request the sink got.
#[derive(Debug, Clone)]
pub struct PushRecord {
    /// What the sink answered.
    pub status: u16,
    /// `X-Scope-OrgID`.
    pub tenant: Option<String>,
    /// The decoded push (empty if it did not decode).
    pub streams: Vec<PushedStream>,
}

/// Everything the sink saw and stored, and how it is told to behave.
#[derive(Debug, Default)]
pub struct LokiState {
    /// Every request, in arrival order.
    pub requests: Vec<PushRecord>,
    /// What Loki would hold: per stream, the entries in the order they were stored (identical
    /// entries kept once).
    pub stored: BTreeMap<Labels, Vec<LokiEntry>>,
    /// (stream, timestamp, line) of every stored entry, for the dedup.
    seen: HashSet<(Labels, i64, String)>,
    /// Entries pushed again after they were stored (dropped by the dedup).
    pub duplicates: u64,
    /// Entries refused because of the marker.
    pub refused: Vec<(Labels, LokiEntry)>,
    /// Malformed requests: what was wrong with them.
    pub protocol_errors: Vec<String>,
    /// Refuse (400) entries whose line contains this.
    pub refuse_marker: Option<String>,
    /// Answer 503 to this many more requests.
    pub fail_next: u32,
}

/// A running Loki push receiver.
#[derive(Clone)]
pub struct LokiSink {
    pub state: Arc<Mutex<LokiState>>,
    pub addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
}

impl LokiSink {
    /// Serves the sink on a free loopback port from the given runtime.
    pub fn serve(runtime: &tokio::runtime::Runtime) -> LokiSink {
        LokiSink::serve_with(runtime, None)
    }

    /// Serves the sink over TLS (tailgate's own TLS listener) with this certificate and key.
    pub fn serve_tls(
        runtime: &tokio::runtime::Runtime,
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
    ) -> LokiSink {
        let tls = tailgate_config::ServerTls {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            client_ca_file: None,
        };
        LokiSink::serve_with(runtime, Some(tls))
    }

    fn serve_with(runtime: &tokio::runtime::Runtime, tls: Option<tailgate_config::ServerTls>) -> LokiSink {
        use tailgate_stages::receive::tls;
        let state = Arc::new(Mutex::new(LokiState::default()));
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/loki/api/v1/push", post(push))
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(state.clone());
        let scheme = if tls.is_some() { "https" } else { "http" };
        match tls {
            None => {
                runtime.spawn(async move {
                    axum::serve(listener, app).await.unwrap();
                });
            }
            Some(settings) => {
                let config = tls::server_config(&settings, &[b"h2", b"http/1.1"]).unwrap();
                let _guard = runtime.enter();
                let events = Arc::new(tailgate_stages::events::StageEvents::new(tailgate_ipc::StageId::Export));
                let listener = tls::TlsListener::new(tls::accept(listener, config, events), addr);
                runtime.spawn(async move {
                    axum::serve(listener, app).await.unwrap();
                });
            }
        }
        LokiSink { state, addr, scheme }
    }

    /// The push URL.
    pub fn endpoint(&self) -> String {
        format!("{}://{}/loki/api/v1/push", self.scheme, self.addr)
    }

    /// The `exporters.logs` destination (YAML flow mapping) pointing at this sink, with extra
    /// `loki:` keys (e.g. `tenant_id: "a"`), comma-separated.
    pub fn destination(&self, extra: &str) -> String {
        if extra.is_empty() {
            format!("{{ loki: {{ endpoint: \"{}\" }} }}", self.endpoint())
        } else {
            format!("{{ loki: {{ endpoint: \"{}\", {extra} }} }}", self.endpoint())
        }
    }

    /// Refuse with 400 every entry whose line contains `marker` (the rest of its push is stored).
    pub fn refuse_lines_containing(&self, marker: &str) {
        self.state.lock().unwrap().refuse_marker = Some(marker.to_owned());
    }

    /// Answer 503 to the next `n` requests.
    pub fn fail_next(&self, n: u32) {
        self.state.lock().unwrap().fail_next = n;
    }

    /// Stored streams and their entries.
    pub fn stored(&self) -> BTreeMap<Labels, Vec<LokiEntry>> {
        self.state.lock().unwrap().stored.clone()
    }

    /// Lines of every stored entry.
    pub fn stored_lines(&self) -> Vec<String> {
        self.state.lock().unwrap().stored.values().flatten().map(|e| e.line.clone()).collect()
    }

    /// Requests received so far.
    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<PushRecord> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Malformed requests seen so far.
    pub fn protocol_errors(&self) -> Vec<String> {
        self.state.lock().unwrap().protocol_errors.clone()
    }
}

async fn push(State(state): State<Arc<Mutex<LokiState>>>, headers: HeaderMap, body: Bytes) -> Response {
    let tenant = headers.get("x-scope-orgid").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut state = state.lock().unwrap();
    let decoded = decode(&headers, &body);
    let streams = match decoded {
        Ok(streams) => streams,
        Err((status, message)) => {
            state.protocol_errors.push(message.clone());
            state.requests.push(PushRecord { status: status.as_u16(), tenant, streams: Vec::new() });
            return (status, message).into_response();
        }
    };
    if state.fail_next > 0 {
        state.fail_next -= 1;
        state.requests.push(PushRecord { status: 503, tenant, streams });
        return (StatusCode::SERVICE_UNAVAILABLE, "at least 1 live replicas required, could only find 0")
            .into_response();
    }
    // Like Loki's ingester: validate entry by entry, store the valid ones (an identical entry
    // already held is skipped silently), and report the invalid ones in one 400.
    let mut report = String::new();
    let (mut ignored, mut total) = (0usize, 0usize);
    let mut last_stream = String::new();
    for stream in &streams {
        for entry in &stream.entries {
            total += 1;
            let refuse = state.refuse_marker.as_deref().is_some_and(|marker| entry.line.contains(marker));
            if refuse {
                ignored += 1;
                let ts = format_time(entry.unix_nanos);
                report.push_str(&format!(
                    "entry with timestamp {ts} ignored, reason: 'entry too far behind, entry timestamp is: {ts}, \
                     oldest acceptable timestamp is: {}',\n",
                    format_time(entry.unix_nanos + 3_600_000_000_000)
                ));
                last_stream = stream.selector.clone();
                state.refused.push((stream.labels.clone(), entry.clone()));
                continue;
            }
            let key = (stream.labels.clone(), entry.unix_nanos, entry.line.clone());
            if state.seen.insert(key) {
                state.stored.entry(stream.labels.clone()).or_default().push(entry.clone());
            } else {
                state.duplicates += 1;
            }
        }
    }
    if ignored > 0 {
        state.requests.push(PushRecord { status: 400, tenant, streams });
        report.push_str(&format!("user 'fake', total ignored: {ignored} out of {total} for stream: {last_stream}"));
        return (StatusCode::BAD_REQUEST, report).into_response();
    }
    state.requests.push(PushRecord { status: 204, tenant, streams });
    StatusCode::NO_CONTENT.into_response()
}

/// Checks the headers and decodes the body the way Loki's distributor does for protobuf pushes.
fn decode(headers: &HeaderMap, body: &[u8]) -> Result<Vec<PushedStream>, (StatusCode, String)> {
    let bad = |message: String| (StatusCode::BAD_REQUEST, message);
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.split(';').next().unwrap_or("").trim() != "application/x-protobuf" {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-type must be application/x-protobuf, got {content_type:?}"),
        ));
    }
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
        return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("unexpected content-encoding {encoding:?}")));
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|err| bad(format!("body is not snappy block format: {err}")))?;
    let request = <wire::PushRequest as prost::Message>::decode(raw.as_slice())
        .map_err(|err| bad(format!("body is not a PushRequest: {err}")))?;
    let mut out = Vec::new();
    for stream in request.streams {
        let labels = parse_selector(&stream.labels)
            .map_err(|err| bad(format!("error parsing labels {:?}: {err}", stream.labels)))?;
        let mut entries = Vec::new();
        for entry in stream.entries {
            let Some(ts) = entry.timestamp else {
                return Err(bad(format!("entry {:?} of {} has no timestamp", entry.line, stream.labels)));
            };
            if !(0..1_000_000_000).contains(&ts.nanos) {
                return Err(bad(format!("entry {:?} has nanos {} out of range", entry.line, ts.nanos)));
            }
            entries.push(LokiEntry {
                unix_nanos: ts.seconds * 1_000_000_000 + i64::from(ts.nanos),
                line: entry.line,
                metadata: entry.structured_metadata.into_iter().map(|p| (p.name, p.value)).collect(),
            });
        }
        out.push(PushedStream { selector: stream.labels, labels, entries });
    }
    Ok(out)
}

/// Parses a stream selector `{a="x", b="y"}` (Prometheus label syntax, values with `\\`, `\"`,
/// `\n`, `\t` escapes). Refuses empty sets, invalid names and repeated names, as Loki does.
pub fn parse_selector(text: &str) -> Result<Labels, String> {
    let mut chars = text.chars().peekable();
    let skip_spaces = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
    };
    skip_spaces(&mut chars);
    if chars.next() != Some('{') {
        return Err("expected '{'".into());
    }
    let mut labels = Labels::new();
    loop {
        skip_spaces(&mut chars);
        if chars.peek() == Some(&'}') && labels.is_empty() {
            return Err("no labels".into());
        }
        let mut name = String::new();
        while let Some(c) = chars.peek().copied() {
            let valid = c == '_' || c.is_ascii_alphabetic() || (!name.is_empty() && c.is_ascii_digit());
            if !valid {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            return Err(format!("expected a label name, found {:?}", chars.peek()));
        }
        skip_spaces(&mut chars);
        if chars.next() != Some('=') {
            return Err(format!("expected '=' after {name}"));
        }
        skip_spaces(&mut chars);
        if chars.next() != Some('"') {
            return Err(format!("expected '\"' to open the value of {name}"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                None => return Err(format!("unterminated value of {name}")),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    Some('t') => value.push('\t'),
                    other => return Err(format!("bad escape {other:?} in the value of {name}")),
                },
                Some(c) => value.push(c),
            }
        }
        if labels.insert(name.clone(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        skip_spaces(&mut chars);
        match chars.next() {
            Some(',') => continue,
            Some('}') => break,
            other => return Err(format!("expected ',' or '}}' after the value of {name}, found {other:?}")),
        }
    }
    skip_spaces(&mut chars);
    if let Some(rest) = chars.next() {
        return Err(format!("trailing text from {rest:?}"));
    }
    Ok(labels)
}

/// A timestamp the way Loki prints one in its messages (close enough: UTC seconds.nanos).
fn format_time(unix_nanos: i64) -> String {
    format!("{}.{:09} +0000 UTC", unix_nanos.div_euclid(1_000_000_000), unix_nanos.rem_euclid(1_000_000_000))
}
