//! OTLP protobuf, walked as wire bytes.
//!
//! Decoding a request into owned prost structs costs about 1.3 us per span, the whole CPU budget
//! of receive. Instead receive walks the encoded request once, checks it, and transcodes it
//! straight into the batch format ([`tailgate_ipc::batch`]): every `Span`, `LogRecord`,
//! `Resource` and `InstrumentationScope` is kept as the bytes it arrived as, with the few fields
//! stages decide on lifted out beside them. Export writes requests back out by concatenating those
//! bytes ([`encode_resource_group`]).
//!
//! What is checked, for every nested message a stage forwards (resources and their attributes,
//! scopes, spans with their attributes, events, links and status, log records with body and
//! attributes, metrics down to their data points): the wire format is well formed, known fields
//! carry the wire type of their schema, unknown fields are skipped by wire type (groups are
//! rejected), strings are UTF-8, and messages nest at most [`MAX_DEPTH`] deep: a request that
//! fails any of these is refused whole. Ids are checked per item: a span whose trace or span id
//! is missing, all zero or of the wrong length, or whose parent or link ids have the wrong
//! length, and a log record whose ids have the wrong length, is refused alone and counted
//! ([`Rejected`], answered as OTLP partial success); the rest of the request is accepted. An
//! all-zero `parent_span_id` is read as a root span. Whatever is accepted here decodes with prost
//! too. Nothing panics on any input.

#![forbid(unsafe_code)]

use std::fmt;

use tailgate_ipc::batch::{LogBatch, LogEntry, ResourceBlock, ScopeBlock, SpanBatch, SpanRecord};

mod attributes;
mod encode;
mod json;
mod limits;
mod schema;
#[cfg(test)]
mod tests;
mod wire;

pub use attributes::{
    AttributeValue, LOG_RECORD_ATTRIBUTES, RESOURCE_ATTRIBUTES, SPAN_ATTRIBUTES, SPAN_TRACE_STATE, find_attribute,
    find_attributes, with_string_field,
};
pub use encode::{ScopeItems, encode_resource, encode_resource_group};
pub use json::json_to_protobuf;
pub use limits::{Limits, Truncated};
use wire::Message;
use wire::{Fail, Reader, Val, relocate, walk};

/// Deepest message nesting accepted (the request itself is depth 0).
pub const MAX_DEPTH: u32 = 32;

/// Which OTLP signal a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `ExportTraceServiceRequest`
    Traces,
    /// `ExportLogsServiceRequest`
    Logs,
    /// `ExportMetricsServiceRequest`
    Metrics,
}

/// Dotted path of the offending field, e.g. `resource_spans[0].scope_spans[1].spans[3].name`.
/// Displays with a trailing `": "` (nothing when empty) so it prefixes an error message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(String);

impl FieldPath {
    fn named(name: &str) -> FieldPath {
        FieldPath(name.to_owned())
    }

    /// The path without the trailing separator.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { Ok(()) } else { write!(f, "{}: ", self.0) }
    }
}

/// A request that cannot be accepted; the message tells the client what and where.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    /// A field or length runs past the end of its enclosing message.
    #[error("{path}truncated message at byte {offset}")]
    Truncated { path: FieldPath, offset: usize },
    /// A varint longer than 10 bytes or overflowing 64 bits.
    #[error("{path}malformed varint at byte {offset}")]
    Varint { path: FieldPath, offset: usize },
    /// A field key with field number 0 or beyond 32 bits.
    #[error("{path}invalid field key at byte {offset}")]
    InvalidKey { path: FieldPath, offset: usize },
    /// Wire type 6 or 7.
    #[error("{path}invalid wire type {wire_type} at byte {offset}")]
    InvalidWireType { path: FieldPath, wire_type: u8, offset: usize },
    /// Wire types 3 and 4 (proto2 groups) do not occur in OTLP.
    #[error("{path}group (wire type {wire_type}) at byte {offset} is not supported")]
    Group { path: FieldPath, wire_type: u8, offset: usize },
    /// A known field arrived with another wire type than its schema's.
    #[error("{path}wire type {wire_type} at byte {offset} does not match the field (expected {expected})")]
    WireTypeMismatch { path: FieldPath, wire_type: u8, expected: &'static str, offset: usize },
    /// A packed repeated 64-bit field whose length is not a multiple of 8.
    #[error("{path}packed length {len} is not a multiple of 8")]
    PackedLength { path: FieldPath, len: usize },
    /// A string field that is not UTF-8.
    #[error("{path}string is not valid UTF-8")]
    Utf8 { path: FieldPath },
    /// A trace or span id of the wrong length.
    #[error("{path}must be {expected}, got {got}")]
    IdLength { path: FieldPath, expected: &'static str, got: usize },
    /// A span's trace or span id that is all zero (invalid in OTLP).
    #[error("{path}must not be all zero")]
    ZeroId { path: FieldPath },
    /// Messages nested deeper than [`MAX_DEPTH`].
    #[error("{path}nesting deeper than 32")]
    TooDeep { path: FieldPath },
    /// More items than a batch can index.
    #[error("more than 4294967295 {what} in one request")]
    TooMany { what: &'static str },
    /// An OTLP/HTTP JSON body that does not parse as the request.
    #[error("invalid json: {0}")]
    Json(String),
    /// Anything else (used by callers, e.g. when a batch cannot be encoded).
    #[error("{0}")]
    Other(String),
}

impl WireError {
    /// The offending field's path, when the error has one.
    pub fn path(&self) -> Option<&FieldPath> {
        match self {
            WireError::Truncated { path, .. }
            | WireError::Varint { path, .. }
            | WireError::InvalidKey { path, .. }
            | WireError::InvalidWireType { path, .. }
            | WireError::Group { path, .. }
            | WireError::WireTypeMismatch { path, .. }
            | WireError::PackedLength { path, .. }
            | WireError::Utf8 { path }
            | WireError::IdLength { path, .. }
            | WireError::ZeroId { path }
            | WireError::TooDeep { path } => Some(path),
            WireError::TooMany { .. } | WireError::Json(_) | WireError::Other(_) => None,
        }
    }

    /// Prefixes the path with the enclosing field (`name` or `name[index]`). Error path only.
    #[cold]
    fn within(mut self: Box<Self>, name: &str, index: Option<u32>) -> Box<Self> {
        let inner = match &mut *self {
            WireError::Truncated { path, .. }
            | WireError::Varint { path, .. }
            | WireError::InvalidKey { path, .. }
            | WireError::InvalidWireType { path, .. }
            | WireError::Group { path, .. }
            | WireError::WireTypeMismatch { path, .. }
            | WireError::PackedLength { path, .. }
            | WireError::Utf8 { path }
            | WireError::IdLength { path, .. }
            | WireError::ZeroId { path }
            | WireError::TooDeep { path } => path,
            WireError::TooMany { .. } | WireError::Json(_) | WireError::Other(_) => return self,
        };
        let mut outer = String::with_capacity(name.len() + 12 + inner.0.len());
        outer.push_str(name);
        if let Some(index) = index {
            outer.push('[');
            outer.push_str(&index.to_string());
            outer.push(']');
        }
        if !inner.0.is_empty() {
            outer.push('.');
            outer.push_str(&inner.0);
        }
        inner.0 = outer;
        self
    }
}

/// A string field's value (checked UTF-8 by the walker).
fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// Clamps an OTLP enum (an int32 on the wire) into a byte.
fn enum_u8(value: u64) -> u8 {
    (value as i32).clamp(0, 255) as u8
}

fn index_u32(len: usize, what: &'static str) -> Result<u32, WireError> {
    u32::try_from(len).map_err(|_| WireError::TooMany { what })
}

/// Per-item callback of [`resource_group`]: (scope block index, item message, depth of the
/// item, its position: index of its scope group in the resource group and of the item in the
/// scope group). Returns whether the item was accepted (see [`Rejected`]).
type ItemFn<'a, 'f> = dyn FnMut(u32, &'a [u8], u32, [u32; 2]) -> Result<bool, Fail> + 'f;

/// Walks a `ResourceSpans` / `ResourceLogs`, appending its resource and scope blocks; items go
/// to `item`. Groups that end up holding no item leave no block behind.
fn resource_group<'a, G: Message, S: Message>(
    group: &'a [u8],
    depth: u32,
    resources: &mut Vec<ResourceBlock>,
    scopes: &mut Vec<ScopeBlock>,
    item: &mut ItemFn<'a, '_>,
) -> Result<(), Fail> {
    let resource = index_u32(resources.len(), "resources")?;
    let first_scope = scopes.len();
    resources.push(ResourceBlock::default());
    let mut scope_groups = 0u32;
    walk::<G, _>(group, depth, &mut |number, value| {
        match (number, value) {
            (1, Val::Bytes(r)) => {
                if let Some(block) = resources.last_mut() {
                    // A repeated message field merges; so do concatenated encodings.
                    block.resource.extend_from_slice(r);
                    if block.service_name.is_empty()
                        && let Some(name) = service_name(r)
                    {
                        block.service_name = name.to_owned();
                    }
                }
            }
            (2, Val::Bytes(r)) => {
                scope_group::<S>(r, depth + 1, resource, scope_groups, scopes, item)?;
                scope_groups = scope_groups.saturating_add(1);
            }
            (3, Val::Str(url)) => {
                if let Some(block) = resources.last_mut() {
                    text(url).clone_into(&mut block.schema_url);
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    if scopes.len() == first_scope {
        resources.pop();
    }
    Ok(())
}

fn scope_group<'a, S: Message>(
    group: &'a [u8],
    depth: u32,
    resource: u32,
    position: u32,
    scopes: &mut Vec<ScopeBlock>,
    item: &mut ItemFn<'a, '_>,
) -> Result<(), Fail> {
    let scope = index_u32(scopes.len(), "scopes")?;
    scopes.push(ScopeBlock { resource, ..ScopeBlock::default() });
    let mut items = 0u32;
    let mut accepted = 0usize;
    walk::<S, _>(group, depth, &mut |number, value| {
        match (number, value) {
            (1, Val::Bytes(r)) => {
                if let Some(block) = scopes.last_mut() {
                    block.scope.extend_from_slice(r);
                }
            }
            (2, Val::Bytes(r)) => {
                accepted += usize::from(item(scope, r, depth + 1, [position, items])?);
                items = items.saturating_add(1);
            }
            (3, Val::Str(url)) => {
                if let Some(block) = scopes.last_mut() {
                    text(url).clone_into(&mut block.schema_url);
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    if accepted == 0 {
        scopes.pop();
    }
    Ok(())
}

/// The string value of the first `service.name` attribute of an (already checked) `Resource`.
fn service_name(resource: &[u8]) -> Option<&str> {
    let mut resource = Reader::new(resource);
    while !resource.is_done() {
        let (number, wire_type, at) = resource.key().ok()?;
        if number != 1 || wire_type != 2 {
            resource.skip(wire_type, at).ok()?;
            continue;
        }
        let mut pair = Reader::new(resource.len_delimited(at).ok()?);
        let (mut key, mut value): (&[u8], Option<&str>) = (&[], None);
        while !pair.is_done() {
            let (number, wire_type, at) = pair.key().ok()?;
            match (number, wire_type) {
                (1, 2) => key = pair.len_delimited(at).ok()?,
                (2, 2) => value = any_value_string(pair.len_delimited(at).ok()?, value),
                _ => pair.skip(wire_type, at).ok()?,
            }
        }
        if key == b"service.name" {
            return value;
        }
    }
    None
}

/// Applies one (checked) `AnyValue` encoding to `current`: its string, unless another oneof
/// member is set after it.
fn any_value_string<'a>(value: &'a [u8], mut current: Option<&'a str>) -> Option<&'a str> {
    let mut value = Reader::new(value);
    while !value.is_done() {
        let (number, wire_type, at) = value.key().ok()?;
        if number == 1 && wire_type == 2 {
            current = std::str::from_utf8(value.len_delimited(at).ok()?).ok();
        } else {
            if (2..=8).contains(&number) {
                current = None;
            }
            value.skip(wire_type, at).ok()?;
        }
    }
    current
}

/// The last `code` of a (checked) `Status`, if it carries one.
fn status_code(status: &[u8]) -> Option<u8> {
    let mut status = Reader::new(status);
    let mut code = None;
    while !status.is_done() {
        let (number, wire_type, at) = status.key().ok()?;
        if number == 3 && wire_type == 0 {
            code = Some(enum_u8(status.varint().ok()?));
        } else {
            status.skip(wire_type, at).ok()?;
        }
    }
    code
}

fn exact_id<const N: usize>(id: &[u8], name: &'static str) -> Result<[u8; N], Fail> {
    let Ok(id) = <[u8; N]>::try_from(id) else {
        let expected = if N == 16 { "16 bytes" } else { "8 bytes" };
        return Err(WireError::IdLength { path: FieldPath::named(name), expected, got: id.len() }.into());
    };
    if id.iter().all(|b| *b == 0) {
        return Err(WireError::ZeroId { path: FieldPath::named(name) }.into());
    }
    Ok(id)
}

/// An item (span, log record) whose own fields are invalid while the request around it is well
/// formed: it alone is refused and the rest of the request accepted (OTLP partial success).
/// Malformed wire bytes, invalid UTF-8 and excess nesting refuse the whole request.
fn item_fault(fail: &WireError) -> bool {
    matches!(fail, WireError::IdLength { .. } | WireError::ZeroId { .. })
}

/// Refuses one item for `fail`, once the rest of it is known to be well formed: the walk stopped
/// at the fault, and a request with malformed bytes after it is refused whole (what is accepted
/// always decodes).
#[cold]
fn refuse_item<M: prost::Message + Default, T>(item: &[u8], fail: Fail) -> Result<Result<T, Fail>, Fail> {
    match M::decode(item) {
        Ok(_) => Ok(Err(fail)),
        Err(err) => Err(WireError::Other(format!("malformed item after an invalid id ({fail}): {err}")).into()),
    }
}

/// A span's record, or (inner `Err`) why this span alone is refused.
fn span_record(span: &[u8], depth: u32, scope: u32, caps: &mut Caps<'_>) -> Result<Result<SpanRecord, Fail>, Fail> {
    let (mut trace_id, mut span_id, mut parent): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
    let mut name = "";
    let (mut kind, mut start, mut end, mut status) = (0, 0, 0, 0);
    let (mut attributes, mut longest, mut events, mut links) = (0usize, 0usize, 0usize, 0usize);
    let walked = walk::<schema::Span, _>(span, depth, &mut |number, value| {
        match (number, value) {
            (9, Val::Bytes(b)) => {
                attributes += 1;
                longest = longest.max(b.len());
            }
            (11, _) => events += 1,
            (13, _) => links += 1,
            (1, Val::Bytes(b)) => trace_id = b,
            (2, Val::Bytes(b)) => span_id = b,
            (4, Val::Bytes(b)) => parent = b,
            (5, Val::Str(s)) => name = text(s),
            (6, Val::Int(v)) => kind = enum_u8(v),
            (7, Val::Int(v)) => start = v,
            (8, Val::Int(v)) => end = v,
            (15, Val::Bytes(b)) => status = status_code(b).unwrap_or(status),
            _ => {}
        }
        Ok(())
    });
    match walked {
        Err(fail) if item_fault(&fail) => {
            return refuse_item::<opentelemetry_proto::tonic::trace::v1::Span, _>(span, fail);
        }
        other => other?,
    }
    let ids =
        (|| Ok::<_, Fail>((exact_id(trace_id, "trace_id")?, exact_id(span_id, "span_id")?, parent_id(parent)?)))();
    let (trace_id, span_id, parent_span_id) = match ids {
        Ok(ids) => ids,
        Err(fail) => return Ok(Err(fail)),
    };
    let body = if caps.limits.exceeded(attributes, longest, events, links) {
        limits::limit_span(span, caps.limits, &mut caps.truncated)
    } else {
        span.to_vec()
    };
    Ok(Ok(SpanRecord {
        trace_id,
        span_id,
        parent_span_id,
        start_unix_nano: start,
        end_unix_nano: end,
        status_code: status,
        kind,
        scope,
        name: name.to_owned(),
        body,
    }))
}

/// A span's parent: empty for a root; an all-zero id also means a root (what converters from
/// formats with numeric ids write; documented normalization); any other length is invalid.
fn parent_id(parent: &[u8]) -> Result<[u8; 8], Fail> {
    match <[u8; 8]>::try_from(parent) {
        Ok(id) => Ok(id),
        Err(_) if parent.is_empty() => Ok([0; 8]),
        Err(_) => Err(WireError::IdLength {
            path: FieldPath::named("parent_span_id"),
            expected: "empty or 8 bytes",
            got: parent.len(),
        }
        .into()),
    }
}

/// Attribute names that carry a duration, each with nanoseconds per unit (the filelog
/// receiver's `fields.duration` aliases): records without a trace id are judged on them.
pub type DurationKeys = [(String, f64)];

/// A log record's entry, or (inner `Err`) why this record alone is refused. Ids are optional on
/// log records: an all-zero trace id means no trace.
fn log_entry(
    record: &[u8],
    depth: u32,
    scope: u32,
    durations: &DurationKeys,
    caps: &mut Caps<'_>,
) -> Result<Result<LogEntry, Fail>, Fail> {
    let (mut trace_id, mut span_id): (&[u8], &[u8]) = (&[], &[]);
    let (mut time, mut observed, mut severity) = (0, 0, 0);
    let mut attributes: Vec<&[u8]> = Vec::new();
    let walked = walk::<schema::LogRecord, _>(record, depth, &mut |number, value| {
        match (number, value) {
            (1, Val::Int(v)) => time = v,
            (11, Val::Int(v)) => observed = v,
            (2, Val::Int(v)) => severity = enum_u8(v),
            (6, Val::Bytes(b)) => attributes.push(b),
            (9, Val::Bytes(b)) => trace_id = b,
            (10, Val::Bytes(b)) => span_id = b,
            _ => {}
        }
        Ok(())
    });
    match walked {
        Err(fail) if item_fault(&fail) => {
            return refuse_item::<opentelemetry_proto::tonic::logs::v1::LogRecord, _>(record, fail);
        }
        other => other?,
    }
    let trace_id = <[u8; 16]>::try_from(trace_id).unwrap_or_default();
    // Only a record without a trace is judged on its own fields; the others skip the look.
    let duration_nanos = if trace_id == [0u8; 16] { attribute_duration(&attributes, durations) } else { 0 };
    let longest = attributes.iter().map(|a| a.len()).max().unwrap_or(0);
    let body = if caps.limits.exceeded(attributes.len(), longest, 0, 0) {
        limits::limit_log_record(record, caps.limits, &mut caps.truncated)
    } else {
        record.to_vec()
    };
    Ok(Ok(LogEntry {
        trace_id,
        span_id: <[u8; 8]>::try_from(span_id).unwrap_or_default(),
        time_unix_nano: if time != 0 { time } else { observed },
        severity_number: severity,
        duration_nanos,
        scope,
        body,
    }))
}

/// The first duration attribute (by alias order) of a record, in nanoseconds; 0 when none.
fn attribute_duration(attributes: &[&[u8]], durations: &DurationKeys) -> u64 {
    use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value::Value};
    use prost::Message;
    if attributes.is_empty() || durations.is_empty() {
        return 0;
    }
    let decoded: Vec<KeyValue> = attributes.iter().filter_map(|kv| KeyValue::decode(*kv).ok()).collect();
    for (name, nanos_per_unit) in durations {
        let Some(value) = decoded.iter().find(|kv| kv.key == *name).and_then(|kv| kv.value.as_ref()?.value.as_ref())
        else {
            continue;
        };
        let units = match value {
            Value::IntValue(v) => *v as f64,
            Value::DoubleValue(v) => *v,
            Value::StringValue(v) => v.trim().parse().unwrap_or(0.0),
            _ => 0.0,
        };
        return if units > 0.0 { (units * nanos_per_unit) as u64 } else { 0 };
    }
    0
}

/// Items of a request refused one by one (OTLP partial success): how many, and the first
/// reason with the item's path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejected {
    /// Items refused.
    pub count: u64,
    /// The first refusal, e.g. `resource_spans[0].scope_spans[0].spans[2].trace_id: must be 16
    /// bytes, got 8`.
    pub first: Option<String>,
}

impl Rejected {
    #[cold]
    fn add(&mut self, fail: Fail, at: [&str; 3], position: [u32; 3]) {
        self.count += 1;
        if self.first.is_none() {
            let fail =
                fail.within(at[2], Some(position[2])).within(at[1], Some(position[1])).within(at[0], Some(position[0]));
            self.first = Some(fail.to_string());
        }
    }

    /// The partial-success message: the count and the first reason.
    pub fn message(&self, items: &str) -> String {
        match &self.first {
            Some(first) => format!("{} {items} rejected; the first: {first}", self.count),
            None => String::new(),
        }
    }
}

/// A transcoded request: its batch, the items refused alone, and what the caps cut.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcoded<B> {
    /// The accepted items.
    pub batch: B,
    /// Items refused one by one.
    pub rejected: Rejected,
    /// What [`Limits`] cut from accepted items.
    pub truncated: Truncated,
}

/// The caps of one request's walk and what they cut.
struct Caps<'l> {
    limits: &'l Limits,
    truncated: Truncated,
}

/// Walks an export request (`R`) of resource groups (`G`) of scope groups (`S`): blocks go to
/// `resources` / `scopes`, each item to `item` (the item's own fields, or why it alone is
/// refused, which is counted in `rejected` under its path `names[0][r].names[1][s].names[2][i]`).
fn transcode_request<'a, R: Message, G: Message, S: Message, T>(
    request: &'a [u8],
    names: [&str; 3],
    resources: &mut Vec<ResourceBlock>,
    scopes: &mut Vec<ScopeBlock>,
    items: &mut Vec<T>,
    rejected: &mut Rejected,
    item: &mut dyn FnMut(u32, &'a [u8], u32) -> Result<Result<T, Fail>, Fail>,
) -> Result<(), WireError> {
    let mut group_index = 0u32;
    walk::<R, _>(request, 0, &mut |_, value| match value {
        Val::Bytes(group) => {
            let at = group_index;
            group_index = group_index.saturating_add(1);
            resource_group::<G, S>(group, 1, resources, scopes, &mut |scope, bytes, depth, [s, i]| match item(
                scope, bytes, depth,
            )? {
                Ok(one) => {
                    items.push(one);
                    Ok(true)
                }
                Err(fail) => {
                    rejected.add(fail, names, [at, s, i]);
                    Ok(false)
                }
            })
        }
        _ => Ok(()),
    })
    .map_err(|err| relocate(*err, request))
}

/// Checks an encoded `ExportTraceServiceRequest` and transcodes it into a span batch: one
/// resource block per `ResourceSpans` and one scope block per `ScopeSpans` that hold spans,
/// every span as its received bytes. Spans with invalid ids are left out and counted in
/// [`Rejected`]; spans over a cap are cut down to it ([`Limits`]); a malformed request is an
/// error.
pub fn transcode_traces(
    request: &[u8],
    received_unix_nano: u64,
    limits: &Limits,
) -> Result<Transcoded<SpanBatch>, WireError> {
    let mut batch = SpanBatch { received_unix_nano, ..SpanBatch::default() };
    let mut rejected = Rejected::default();
    let mut caps = Caps { limits, truncated: Truncated::default() };
    let SpanBatch { resources, scopes, spans, .. } = &mut batch;
    transcode_request::<schema::TracesRequest, schema::ResourceSpans, schema::ScopeSpans, _>(
        request,
        ["resource_spans", "scope_spans", "spans"],
        resources,
        scopes,
        spans,
        &mut rejected,
        &mut |scope, span, depth| span_record(span, depth, scope, &mut caps),
    )?;
    Ok(Transcoded { batch, rejected, truncated: caps.truncated })
}

/// Checks an encoded `ExportLogsServiceRequest` and transcodes it into a log batch; records with
/// ids of the wrong length are left out and counted in [`Rejected`]; records over a cap are cut
/// down to it.
pub fn transcode_logs(
    request: &[u8],
    received_unix_nano: u64,
    durations: &DurationKeys,
    limits: &Limits,
) -> Result<Transcoded<LogBatch>, WireError> {
    let mut batch = LogBatch { received_unix_nano, ..LogBatch::default() };
    let mut rejected = Rejected::default();
    let mut caps = Caps { limits, truncated: Truncated::default() };
    let LogBatch { resources, scopes, logs, .. } = &mut batch;
    transcode_request::<schema::LogsRequest, schema::ResourceLogs, schema::ScopeLogs, _>(
        request,
        ["resource_logs", "scope_logs", "log_records"],
        resources,
        scopes,
        logs,
        &mut rejected,
        &mut |scope, record, depth| log_entry(record, depth, scope, durations, &mut caps),
    )?;
    Ok(Transcoded { batch, rejected, truncated: caps.truncated })
}

/// Checks an encoded `ExportMetricsServiceRequest` down to its data points and counts them
/// (gauge, sum, histogram, exponential histogram and summary points).
pub fn count_metric_points(request: &[u8]) -> Result<u32, WireError> {
    let mut points = 0u32;
    walk::<schema::MetricsRequest, _>(request, 0, &mut |_, value| {
        let Val::Bytes(resource_metrics) = value else { return Ok(()) };
        walk::<schema::ResourceMetrics, _>(resource_metrics, 1, &mut |number, value| {
            let (2, Val::Bytes(scope_metrics)) = (number, value) else { return Ok(()) };
            walk::<schema::ScopeMetrics, _>(scope_metrics, 2, &mut |number, value| {
                let (2, Val::Bytes(metric)) = (number, value) else { return Ok(()) };
                count_points(metric, 3, &mut points)
            })
        })
    })
    .map_err(|err| relocate(*err, request))?;
    Ok(points)
}

fn count_points(metric: &[u8], depth: u32, points: &mut u32) -> Result<(), Fail> {
    walk::<schema::Metric, _>(metric, depth, &mut |number, value| {
        let Val::Bytes(data) = value else { return Ok(()) };
        let depth = depth + 1;
        match number {
            5 => count_in::<schema::Gauge>(data, depth, points),
            7 => count_in::<schema::Sum>(data, depth, points),
            9 => count_in::<schema::Histogram>(data, depth, points),
            10 => count_in::<schema::ExpHistogram>(data, depth, points),
            11 => count_in::<schema::Summary>(data, depth, points),
            _ => Ok(()),
        }
    })
}

/// Checks a data-point container and counts its points (field 1).
fn count_in<M: Message>(data: &[u8], depth: u32, points: &mut u32) -> Result<(), Fail> {
    walk::<M, _>(data, depth, &mut |number, _| {
        if number == 1 {
            *points = points.checked_add(1).ok_or(WireError::TooMany { what: "data points" })?;
        }
        Ok(())
    })
}

/// Splits an encoded export request into its top-level entries (each `resource_*` field with
/// its key and length), each of which is a valid request of the same type on its own: what a
/// request too large for the backend is split along. Fails on anything but length-delimited
/// top-level fields.
pub fn split_top_level(request: &[u8]) -> Result<Vec<&[u8]>, WireError> {
    fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *bytes.get(*at)?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < request.len() {
        let start = at;
        let bad = |what| WireError::Other(format!("cannot split request at byte {start}: {what}"));
        let key = varint(request, &mut at).ok_or_else(|| bad("truncated key"))?;
        if key & 7 != 2 {
            return Err(bad("not a length-delimited field"));
        }
        let len = varint(request, &mut at).ok_or_else(|| bad("truncated length"))?;
        let end = usize::try_from(len).ok().and_then(|len| at.checked_add(len)).filter(|end| *end <= request.len());
        let end = end.ok_or_else(|| bad("length past the end"))?;
        out.push(&request[start..end]);
        at = end;
    }
    Ok(out)
}

/// Reads `partial_success` from an encoded `Export{Trace,Logs,Metrics}ServiceResponse`:
/// (rejected items, error message); `(0, "")` when absent.
pub fn parse_partial_success(response: &[u8]) -> Result<(i64, String), WireError> {
    let (mut rejected, mut message) = (0i64, "");
    walk::<schema::Response, _>(response, 0, &mut |_, value| {
        let Val::Bytes(partial) = value else { return Ok(()) };
        walk::<schema::PartialSuccess, _>(partial, 1, &mut |number, value| {
            match (number, value) {
                (1, Val::Int(v)) => rejected = v as i64,
                (2, Val::Str(s)) => message = text(s),
                _ => {}
            }
            Ok(())
        })
    })
    .map_err(|err| relocate(*err, response))?;
    Ok((rejected, message.to_owned()))
}
