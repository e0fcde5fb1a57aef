//! The batch format: what one queue entry holds.
//!
//! Design constraints:
//! - A batch is written once (by the stage that produces it) and read many times, in place, from
//!   LMDB's memory map by the stages that consume it. Readers use checked access
//!   ([`rkyv::access`]), so a torn or corrupted page is an error, never undefined behaviour.
//! - LMDB does not promise aligned values, so the archive uses rkyv's `unaligned` format (fixed
//!   by the workspace features `unaligned`, `little_endian`, `pointer_width_32`).
//! - OTLP payloads are carried as their protobuf wire bytes (the encoded `Span`, `LogRecord`,
//!   `Resource`, `InstrumentationScope`): receive transcodes once from the wire into this format,
//!   export writes the bytes back out without decoding them. Only the fields a stage decides on
//!   (ids, times, status, severity, names) are lifted out beside the bytes.
//!
//! Layout of a stored value: a 12-byte [`BatchHeader`] (format version, kind, item count, CRC-32
//! of the archive) followed by the rkyv archive. The header lets the queue count items without
//! touching the archive. rkyv's validation catches broken structure (pointers, lengths) but not a
//! flipped byte inside a payload; the checksum catches those, and every checked access tests it,
//! so a damaged batch is found by the stage that reads it (and quarantined), never sent on.
//! Version 2 values (8-byte header, no checksum) written by earlier builds stay readable.

use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};

mod borrowed;
pub use borrowed::{SpanBatchRef, SpanBody, SpanRecordRef, encode_span_refs};

/// Format version written into every header; a reader rejects any other.
pub const BATCH_FORMAT_VERSION: u16 = 3;

/// Size of the header that precedes every archive in the queue.
pub const HEADER_LEN: usize = 12;

/// Header size of format version 2 (no checksum), still accepted on read.
const V2_HEADER_LEN: usize = 8;

/// What kind of batch follows the header; lets tools and the verifier check an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum BatchKind {
    /// [`SpanBatch`]
    Spans = 1,
    /// [`LogBatch`]
    Logs = 2,
    /// [`MetricBatch`]
    Metrics = 3,
    /// [`SummaryBatch`] (written before span metrics were counted per series in tail_sample;
    /// still read)
    Summaries = 4,
    /// [`SeriesDeltaBatch`]
    SeriesDeltas = 5,
}

impl BatchKind {
    fn from_u16(value: u16) -> Option<BatchKind> {
        match value {
            1 => Some(BatchKind::Spans),
            2 => Some(BatchKind::Logs),
            3 => Some(BatchKind::Metrics),
            4 => Some(BatchKind::Summaries),
            5 => Some(BatchKind::SeriesDeltas),
            _ => None,
        }
    }
}

/// The fixed prefix of every stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Which archive type follows.
    pub kind: BatchKind,
    /// Number of items (spans, log records, metric data points) in the batch.
    pub items: u32,
}

/// A stored value could not be read as a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The value is shorter than a header or carries an unknown version or kind.
    #[error("batch header invalid: {0}")]
    Header(&'static str),
    /// The header names another kind than the caller expected.
    #[error("expected a {expected:?} batch, found {found:?}")]
    WrongKind {
        /// What the caller asked for.
        expected: BatchKind,
        /// What the header says.
        found: BatchKind,
    },
    /// rkyv's validation rejected the archive (torn write, corruption, wrong type).
    #[error("batch archive invalid: {0}")]
    Archive(String),
    /// The archive's bytes do not match the checksum in the header.
    #[error("batch checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        /// CRC-32 in the header.
        stored: u32,
        /// CRC-32 of the bytes found.
        computed: u32,
    },
}

impl BatchHeader {
    /// Reads and checks the header of a stored value.
    pub fn parse(value: &[u8]) -> Result<BatchHeader, BatchError> {
        let Some(head) = value.get(..V2_HEADER_LEN) else {
            return Err(BatchError::Header("value shorter than the header"));
        };
        let version = u16::from_le_bytes([head[0], head[1]]);
        let header_len = match version {
            BATCH_FORMAT_VERSION => HEADER_LEN,
            2 => V2_HEADER_LEN,
            _ => return Err(BatchError::Header("unknown format version")),
        };
        if value.len() < header_len {
            return Err(BatchError::Header("value shorter than the header"));
        }
        let kind = BatchKind::from_u16(u16::from_le_bytes([head[2], head[3]]))
            .ok_or(BatchError::Header("unknown batch kind"))?;
        let items = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        Ok(BatchHeader { kind, items })
    }

    /// Writes the header with a zero checksum; [`seal`] fills it in once the archive follows.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&BATCH_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.kind as u16).to_le_bytes());
        out.extend_from_slice(&self.items.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
}

/// Stores the CRC-32 of the archive in the header of a freshly encoded value.
fn seal(mut value: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&value[HEADER_LEN..]);
    value[V2_HEADER_LEN..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    value
}

/// The archive bytes of a stored value, after checking the header's checksum (format 3).
fn checked_body(value: &[u8]) -> Result<&[u8], BatchError> {
    if u16::from_le_bytes([value[0], value[1]]) != BATCH_FORMAT_VERSION {
        return Ok(&value[V2_HEADER_LEN..]);
    }
    let stored = u32::from_le_bytes([value[8], value[9], value[10], value[11]]);
    let body = &value[HEADER_LEN..];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(BatchError::Checksum { stored, computed });
    }
    Ok(body)
}

/// An OTLP `Resource` as its wire bytes, plus what stages look up without decoding it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceBlock {
    /// Encoded `opentelemetry.proto.resource.v1.Resource` (may be empty: no resource).
    pub resource: Vec<u8>,
    /// `schema_url` of the enclosing `ResourceSpans` / `ResourceLogs`.
    pub schema_url: String,
    /// The `service.name` attribute, empty when absent.
    pub service_name: String,
}

/// An OTLP `InstrumentationScope` as its wire bytes, tied to its resource.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeBlock {
    /// Index into the batch's `resources`.
    pub resource: u32,
    /// Encoded `opentelemetry.proto.common.v1.InstrumentationScope` (may be empty).
    pub scope: Vec<u8>,
    /// `schema_url` of the enclosing `ScopeSpans` / `ScopeLogs`.
    pub schema_url: String,
}

/// One span: the fields sampling and spanmetrics decide on, and the encoded `Span`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SpanRecord {
    /// 16-byte trace id.
    pub trace_id: [u8; 16],
    /// 8-byte span id.
    pub span_id: [u8; 8],
    /// Parent span id; all zero for a root span.
    pub parent_span_id: [u8; 8],
    /// Start time, Unix nanoseconds.
    pub start_unix_nano: u64,
    /// End time, Unix nanoseconds.
    pub end_unix_nano: u64,
    /// OTLP `Status.code`: 0 unset, 1 ok, 2 error.
    pub status_code: u8,
    /// OTLP `SpanKind` (0 unspecified .. 5 consumer).
    pub kind: u8,
    /// Index into the batch's `scopes`.
    pub scope: u32,
    /// Span name.
    pub name: String,
    /// Encoded `opentelemetry.proto.trace.v1.Span`.
    pub body: Vec<u8>,
}

/// Status code value of an error span in OTLP.
pub const STATUS_CODE_ERROR: u8 = 2;

/// A span's duration from its OTLP times: 0 (unknown) when the start time is missing (0) or the
/// end precedes the start, so a client that leaves the start unset cannot make a span look
/// decades long (slow to the sampler, an outlier in the latency histograms).
pub fn span_duration(start_unix_nano: u64, end_unix_nano: u64) -> u64 {
    if start_unix_nano == 0 { 0 } else { end_unix_nano.saturating_sub(start_unix_nano) }
}

/// A batch of spans as received (edge `spans`) or as kept (edge `kept_spans`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SpanBatch {
    /// When receive accepted the data, Unix nanoseconds: the clock `decision_wait` runs on.
    pub received_unix_nano: u64,
    /// Resources the scopes point into.
    pub resources: Vec<ResourceBlock>,
    /// Scopes the spans point into.
    pub scopes: Vec<ScopeBlock>,
    /// The spans.
    pub spans: Vec<SpanRecord>,
}

/// One log record: its correlation fields and the encoded `LogRecord`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct LogEntry {
    /// Trace id; all zero when the record carries none.
    pub trace_id: [u8; 16],
    /// Span id; all zero when the record carries none.
    pub span_id: [u8; 8],
    /// `time_unix_nano` (or `observed_time_unix_nano` when the former is 0).
    pub time_unix_nano: u64,
    /// OTLP `SeverityNumber` (0 unspecified, 17..=20 error, 21..=24 fatal).
    pub severity_number: u8,
    /// Duration the record reports (a request's latency), nanoseconds; 0 when it names none.
    /// Records without a trace id are judged on it like spans (the latency threshold).
    pub duration_nanos: u64,
    /// Index into the batch's `scopes`.
    pub scope: u32,
    /// Encoded `opentelemetry.proto.logs.v1.LogRecord`.
    pub body: Vec<u8>,
}

/// First OTLP severity number of the ERROR range.
pub const SEVERITY_NUMBER_ERROR: u8 = 17;

/// A batch of log records (edges `logs` and `kept_logs`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct LogBatch {
    /// When receive accepted the data, Unix nanoseconds.
    pub received_unix_nano: u64,
    /// Resources the scopes point into.
    pub resources: Vec<ResourceBlock>,
    /// Scopes the records point into.
    pub scopes: Vec<ScopeBlock>,
    /// The log records.
    pub logs: Vec<LogEntry>,
}

/// A batch of metrics (edge `metrics`): whole encoded `ExportMetricsServiceRequest`s.
///
/// Concatenated protobuf encodings of the same message merge their repeated fields, so export
/// builds one request from many by concatenating these bytes.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricBatch {
    /// When the data was accepted or produced, Unix nanoseconds.
    pub received_unix_nano: u64,
    /// Encoded `ExportMetricsServiceRequest` messages.
    pub requests: Vec<Vec<u8>>,
    /// Number of data points across all requests.
    pub data_points: u32,
}

/// What spanmetrics needs of one decided span (compact: no attributes, no payload).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SpanSummary {
    /// 16-byte trace id (the exemplar's link when the trace was kept).
    pub trace_id: [u8; 16],
    /// 8-byte span id.
    pub span_id: [u8; 8],
    /// End time, Unix nanoseconds.
    pub end_unix_nano: u64,
    /// End minus start, nanoseconds (0 when the end precedes the start).
    pub duration_nanos: u64,
    /// OTLP `SpanKind`.
    pub kind: u8,
    /// OTLP `Status.code`.
    pub status_code: u8,
    /// Whether the span's trace was kept (decided keep, durable in the same transaction).
    pub kept: bool,
    /// Index into the batch's `services`.
    pub service: u32,
    /// Span name.
    pub name: String,
    /// Values of the configured spanmetrics dimensions, in configuration order (empty: absent).
    pub dimensions: Vec<String>,
}

/// A batch of span summaries (edge `span_summaries`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SummaryBatch {
    /// When tail_sample decided these spans, Unix nanoseconds.
    pub decided_unix_nano: u64,
    /// Service names the summaries point into.
    pub services: Vec<String>,
    /// The summaries.
    pub summaries: Vec<SpanSummary>,
}

/// An exemplar of a span metric: a kept span (its keep decision is durable in the transaction
/// that writes it, so it always resolves to a trace that was exported).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct SpanExemplar {
    /// 16-byte trace id.
    pub trace_id: [u8; 16],
    /// 8-byte span id.
    pub span_id: [u8; 8],
    /// The span's duration, milliseconds.
    pub value_ms: f64,
    /// The span's end time, Unix nanoseconds.
    pub time_unix_nano: u64,
}

/// What the spans of one series decided in one tail_sample step add to span metrics.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct SeriesDelta {
    /// `service.name` of the spans' resource.
    pub service: String,
    /// Span name.
    pub name: String,
    /// OTLP `SpanKind`.
    pub kind: u8,
    /// OTLP `Status.code`.
    pub status_code: u8,
    /// Values of the configured spanmetrics dimensions, in configuration order (empty: absent).
    pub dimensions: Vec<String>,
    /// Spans counted.
    pub calls: u64,
    /// Sum of their durations, milliseconds.
    pub sum_ms: f64,
    /// Spans per histogram bucket ([`SeriesDeltaBatch::bounds_ms`], then +Inf).
    pub buckets: Vec<u64>,
    /// The first kept spans of the series in the step (at most the configured exemplars per
    /// data point; none when exemplars are off).
    pub exemplars: Vec<SpanExemplar>,
}

/// Span metrics of the spans one tail_sample step decided, counted per series (edge
/// `span_summaries`): written in the transaction of the decisions, so every span is counted
/// exactly once.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct SeriesDeltaBatch {
    /// When tail_sample decided these spans, Unix nanoseconds.
    pub decided_unix_nano: u64,
    /// Upper bounds of the histogram buckets the counts are in, milliseconds (the last bucket,
    /// beyond them, is +Inf).
    pub bounds_ms: Vec<f64>,
    /// The series.
    pub series: Vec<SeriesDelta>,
}

/// The histogram bucket of a value: the first bound at or above it, or the +Inf bucket.
pub fn bucket_of(bounds_ms: &[f64], value_ms: f64) -> usize {
    bounds_ms.iter().position(|bound| value_ms <= *bound).unwrap_or(bounds_ms.len())
}

/// Serializes a series delta batch with its header; the item count is the spans counted.
pub fn encode_series_deltas(batch: &SeriesDeltaBatch) -> Result<Vec<u8>, BatchError> {
    let spans = batch.series.iter().map(|s| s.calls).sum::<u64>().min(u64::from(u32::MAX)) as usize;
    let size = HEADER_LEN
        + 64
        + batch.bounds_ms.len() * 8
        + batch
            .series
            .iter()
            .map(|s| {
                128 + s.service.len()
                    + s.name.len()
                    + s.dimensions.iter().map(|d| d.len() + 8).sum::<usize>()
                    + s.buckets.len() * 8
                    + s.exemplars.len() * 48
            })
            .sum::<usize>();
    encode(BatchKind::SeriesDeltas, spans, batch, size)
}

/// Checked, zero-copy view of a stored series delta batch.
pub fn access_series_deltas(value: &[u8]) -> Result<&ArchivedSeriesDeltaBatch, BatchError> {
    rkyv::access::<ArchivedSeriesDeltaBatch, rancor::Error>(body_of(value, BatchKind::SeriesDeltas)?)
        .map_err(|err| BatchError::Archive(err.to_string()))
}

/// Serializes a summary batch with its header.
pub fn encode_summaries(batch: &SummaryBatch) -> Result<Vec<u8>, BatchError> {
    let size = batch.summaries.iter().map(|s| summary_payload(&s.name, &s.dimensions));
    encode(BatchKind::Summaries, batch.summaries.len(), batch, summaries_size(size, &batch.services))
}

/// Checked, zero-copy view of a stored summary batch.
pub fn access_summaries(value: &[u8]) -> Result<&ArchivedSummaryBatch, BatchError> {
    rkyv::access::<ArchivedSummaryBatch, rancor::Error>(body_of(value, BatchKind::Summaries)?)
        .map_err(|err| BatchError::Archive(err.to_string()))
}

/// Serializes a batch with its header, ready to append to an edge.
pub fn encode_spans(batch: &SpanBatch) -> Result<Vec<u8>, BatchError> {
    let size = batch.spans.iter().map(|span| span.name.len() + span.body.len());
    encode(BatchKind::Spans, batch.spans.len(), batch, spans_size(size, &batch.resources, &batch.scopes))
}

/// Serializes a log batch with its header.
pub fn encode_logs(batch: &LogBatch) -> Result<Vec<u8>, BatchError> {
    encode(BatchKind::Logs, batch.logs.len(), batch, 1024)
}

/// Serializes a metric batch with its header.
pub fn encode_metrics(batch: &MetricBatch) -> Result<Vec<u8>, BatchError> {
    encode(BatchKind::Metrics, batch.data_points as usize, batch, 1024)
}

/// Archive bytes of one span record besides its name and body (ids, times, the name's and the
/// body's relative pointers), rounded up.
const SPAN_RECORD_SIZE: usize = 72;

/// Archive bytes of one span summary besides its name and dimensions.
const SUMMARY_SIZE: usize = 64;

/// About the encoded size of a span batch whose spans' names and bodies take `payload`: what
/// [`encode`] reserves, so the output buffer is not regrown (and copied) while it fills.
fn spans_size(
    payload: impl ExactSizeIterator<Item = usize>,
    resources: &[ResourceBlock],
    scopes: &[ScopeBlock],
) -> usize {
    let blocks =
        resources.iter().map(|r| r.resource.len() + r.schema_url.len() + r.service_name.len() + 32).sum::<usize>()
            + scopes.iter().map(|s| s.scope.len() + s.schema_url.len() + 24).sum::<usize>();
    HEADER_LEN + 64 + blocks + payload.len() * SPAN_RECORD_SIZE + payload.sum::<usize>()
}

/// Bytes of a summary's name and dimension values (each with its string header).
fn summary_payload(name: &str, dimensions: &[String]) -> usize {
    name.len() + dimensions.iter().map(|d| d.len() + 8).sum::<usize>()
}

/// About the encoded size of a summary batch (see [`spans_size`]).
fn summaries_size(payload: impl ExactSizeIterator<Item = usize>, services: &[String]) -> usize {
    HEADER_LEN
        + 64
        + services.iter().map(|s| s.len() + 8).sum::<usize>()
        + payload.len() * SUMMARY_SIZE
        + payload.sum::<usize>()
}

fn encode<T>(kind: BatchKind, items: usize, value: &T, size: usize) -> Result<Vec<u8>, BatchError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    let items = u32::try_from(items).map_err(|_| BatchError::Header("more than u32::MAX items"))?;
    let mut out = Vec::with_capacity(size);
    BatchHeader { kind, items }.write(&mut out);
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, out)
        .map(seal)
        .map_err(|err| BatchError::Archive(err.to_string()))
}

fn body_of(value: &[u8], expected: BatchKind) -> Result<&[u8], BatchError> {
    let header = BatchHeader::parse(value)?;
    if header.kind != expected {
        return Err(BatchError::WrongKind { expected, found: header.kind });
    }
    checked_body(value)
}

/// Checked, zero-copy view of a stored span batch.
pub fn access_spans(value: &[u8]) -> Result<&ArchivedSpanBatch, BatchError> {
    rkyv::access::<ArchivedSpanBatch, rancor::Error>(body_of(value, BatchKind::Spans)?)
        .map_err(|err| BatchError::Archive(err.to_string()))
}

/// What identifies a stored span batch this process has checked in full: its length and its
/// header (kind, items and the checksum of the archive). Only [`access_spans_seen`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenBatch {
    len: usize,
    header: [u8; HEADER_LEN],
}

impl SeenBatch {
    fn of(value: &[u8]) -> Option<SeenBatch> {
        Some(SeenBatch { len: value.len(), header: value.get(..HEADER_LEN)?.try_into().ok()? })
    }
}

/// [`access_spans`], plus what lets [`access_spans_again`] skip the checks when the same
/// stored batch is read again.
pub fn access_spans_seen(value: &[u8]) -> Result<(&ArchivedSpanBatch, Option<SeenBatch>), BatchError> {
    let batch = access_spans(value)?;
    let seen = (u16::from_le_bytes([value[0], value[1]]) == BATCH_FORMAT_VERSION).then(|| SeenBatch::of(value));
    Ok((batch, seen.flatten()))
}

/// A stored span batch read again (a later step deciding traces whose spans it holds): when it
/// is the batch `seen` was taken from — same length, same header, so the same checksum over
/// the same archive — the checksum and the archive's validation, both done when it was first
/// read, are not repeated; anything else is checked in full. LMDB never changes a committed
/// value, and a batch stays in the queue, at its sequence number, until every consumer has
/// passed it.
pub fn access_spans_again<'v>(value: &'v [u8], seen: &SeenBatch) -> Result<&'v ArchivedSpanBatch, BatchError> {
    if SeenBatch::of(value).as_ref() != Some(seen) {
        return access_spans(value);
    }
    let body = &value[HEADER_LEN..];
    // SAFETY: `seen` exists only for a value that passed `access_spans` (checksum and rkyv
    // validation, alignment included) in this process; this value has that value's length
    // and header, so its checksum covers the same archive bytes. A stored value is immutable
    // while it is in the queue.
    #[allow(unsafe_code)]
    let batch = unsafe { rkyv::access_unchecked::<ArchivedSpanBatch>(body) };
    Ok(batch)
}

/// Checked, zero-copy view of a stored log batch.
pub fn access_logs(value: &[u8]) -> Result<&ArchivedLogBatch, BatchError> {
    rkyv::access::<ArchivedLogBatch, rancor::Error>(body_of(value, BatchKind::Logs)?)
        .map_err(|err| BatchError::Archive(err.to_string()))
}

/// Checked, zero-copy view of a stored metric batch.
pub fn access_metrics(value: &[u8]) -> Result<&ArchivedMetricBatch, BatchError> {
    rkyv::access::<ArchivedMetricBatch, rancor::Error>(body_of(value, BatchKind::Metrics)?)
        .map_err(|err| BatchError::Archive(err.to_string()))
}

/// Validates any stored value by its header's kind (used by the unclean-shutdown check).
pub fn verify(value: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(value)?;
    match header.kind {
        BatchKind::Spans => access_spans(value).map(|_| ())?,
        BatchKind::Logs => access_logs(value).map(|_| ())?,
        BatchKind::Metrics => access_metrics(value).map(|_| ())?,
        BatchKind::Summaries => access_summaries(value).map(|_| ())?,
        BatchKind::SeriesDeltas => access_series_deltas(value).map(|_| ())?,
    }
    Ok(header)
}

/// When the data in a stored value was accepted (or produced), Unix nanoseconds; `None` when
/// the value does not pass its checks.
pub fn received_unix_nano(value: &[u8]) -> Option<u64> {
    Some(match BatchHeader::parse(value).ok()?.kind {
        BatchKind::Spans => access_spans(value).ok()?.received_unix_nano.to_native(),
        BatchKind::Logs => access_logs(value).ok()?.received_unix_nano.to_native(),
        BatchKind::Metrics => access_metrics(value).ok()?.received_unix_nano.to_native(),
        BatchKind::Summaries => access_summaries(value).ok()?.decided_unix_nano.to_native(),
        BatchKind::SeriesDeltas => access_series_deltas(value).ok()?.decided_unix_nano.to_native(),
    })
}

/// Builds an owned batch out of records picked from archived batches, copying each referenced
/// resource and scope once.
///
/// Used where a stage forwards a subset (tail_sample's kept spans, log_mirror's kept logs).
#[derive(Debug, Default)]
pub struct SubsetBuilder {
    resources: Vec<ResourceBlock>,
    scopes: Vec<ScopeBlock>,
    /// (source seq, source scope index) -> index in `scopes`.
    scope_index: std::collections::HashMap<(u64, u32), u32>,
    /// (source seq, source resource index) -> index in `resources`.
    resource_index: std::collections::HashMap<(u64, u32), u32>,
}

impl SubsetBuilder {
    /// Returns the index in the new batch of scope `scope` of the source batch `seq`.
    pub fn scope(
        &mut self,
        seq: u64,
        scope: u32,
        source_resources: &rkyv::vec::ArchivedVec<ArchivedResourceBlock>,
        source_scopes: &rkyv::vec::ArchivedVec<ArchivedScopeBlock>,
    ) -> u32 {
        if let Some(index) = self.scope_index.get(&(seq, scope)) {
            return *index;
        }
        let source_scope = source_scopes.get(scope as usize);
        let source_resource_index = source_scope.map(|s| s.resource.to_native()).unwrap_or(0);
        let resource = match self.resource_index.get(&(seq, source_resource_index)) {
            Some(index) => *index,
            None => {
                let block = source_resources
                    .get(source_resource_index as usize)
                    .map(|r| ResourceBlock {
                        resource: r.resource.as_slice().to_vec(),
                        schema_url: r.schema_url.as_str().to_owned(),
                        service_name: r.service_name.as_str().to_owned(),
                    })
                    .unwrap_or_default();
                let index = self.resources.len() as u32;
                self.resources.push(block);
                self.resource_index.insert((seq, source_resource_index), index);
                index
            }
        };
        let block = ScopeBlock {
            resource,
            scope: source_scope.map(|s| s.scope.as_slice().to_vec()).unwrap_or_default(),
            schema_url: source_scope.map(|s| s.schema_url.as_str().to_owned()).unwrap_or_default(),
        };
        let index = self.scopes.len() as u32;
        self.scopes.push(block);
        self.scope_index.insert((seq, scope), index);
        index
    }

    /// Hands out the collected resources and scopes and resets the builder.
    pub fn take(&mut self) -> (Vec<ResourceBlock>, Vec<ScopeBlock>) {
        self.scope_index.clear();
        self.resource_index.clear();
        (std::mem::take(&mut self.resources), std::mem::take(&mut self.scopes))
    }
}

/// Copies an archived log entry into an owned one, pointing at `scope` of the new batch.
pub fn own_log(log: &ArchivedLogEntry, scope: u32) -> LogEntry {
    LogEntry {
        trace_id: log.trace_id,
        span_id: log.span_id,
        time_unix_nano: log.time_unix_nano.to_native(),
        severity_number: log.severity_number,
        duration_nanos: log.duration_nanos.to_native(),
        scope,
        body: log.body.as_slice().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SpanBatch {
        SpanBatch {
            received_unix_nano: 7,
            resources: vec![ResourceBlock {
                resource: vec![1, 2],
                schema_url: String::new(),
                service_name: "checkout".into(),
            }],
            scopes: vec![ScopeBlock { resource: 0, scope: vec![], schema_url: String::new() }],
            spans: vec![SpanRecord {
                trace_id: [9; 16],
                span_id: [3; 8],
                name: "GET /".into(),
                status_code: STATUS_CODE_ERROR,
                body: vec![0x0a, 0x00],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn round_trip_at_any_alignment() {
        let bytes = encode_spans(&sample()).unwrap();
        for shift in 0..8 {
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(&bytes);
            let view = access_spans(&shifted[shift..]).unwrap();
            assert_eq!(view.spans[0].name.as_str(), "GET /");
            assert_eq!(view.resources[0].service_name.as_str(), "checkout");
            assert_eq!(view.received_unix_nano.to_native(), 7);
        }
        assert_eq!(BatchHeader::parse(&bytes).unwrap().items, 1);
    }

    #[test]
    fn corruption_is_an_error_not_ub() {
        let bytes = encode_spans(&sample()).unwrap();
        let mut rejected = 0;
        for index in HEADER_LEN..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0xff;
            if access_spans(&damaged).is_err() {
                rejected += 1;
            }
        }
        // The checksum catches a flip anywhere, payload bytes included.
        assert_eq!(rejected, bytes.len() - HEADER_LEN);
        let mut header_flip = bytes.clone();
        header_flip[9] ^= 1;
        assert!(matches!(access_spans(&header_flip), Err(BatchError::Checksum { .. })));
        let truncated = &bytes[..bytes.len() - 3];
        assert!(access_spans(truncated).is_err());
    }

    #[test]
    fn a_batch_read_again_is_checked_unless_it_is_the_one_seen() {
        let bytes = encode_spans(&sample()).unwrap();
        let (_, seen) = access_spans_seen(&bytes).unwrap();
        let seen = seen.unwrap();
        assert_eq!(access_spans_again(&bytes, &seen).unwrap().spans[0].name.as_str(), "GET /");
        // Any other value (another header or length) is checked in full.
        let other = encode_spans(&SpanBatch { received_unix_nano: 8, ..sample() }).unwrap();
        assert_eq!(access_spans_again(&other, &seen).unwrap().received_unix_nano.to_native(), 8);
        let mut damaged = other.clone();
        damaged[HEADER_LEN + 3] ^= 0xff;
        assert!(matches!(access_spans_again(&damaged, &seen), Err(BatchError::Checksum { .. })));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(access_spans_again(&longer, &seen).is_err());
        // A damaged value never passes the first read, so nothing vouches for it.
        let mut damaged = bytes.clone();
        damaged[HEADER_LEN] ^= 1;
        assert!(access_spans_seen(&damaged).is_err());
    }

    #[test]
    fn wrong_kind_is_rejected() {
        let bytes = encode_spans(&sample()).unwrap();
        assert!(matches!(access_logs(&bytes), Err(BatchError::WrongKind { .. })));
        assert!(verify(&bytes).is_ok());
    }
}
