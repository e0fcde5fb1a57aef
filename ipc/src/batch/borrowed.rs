//! Batches written from borrowed parts: a stage that passes spans on (tail_sample's kept spans)
//! serializes straight from the archived input it reads, instead of copying every span into an
//! owned record first. The borrowed types archive *as* the owned types' archived forms
//! ([`ArchivedSpanRecord`], [`ArchivedSpanBatch`]), so the bytes are the same format and
//! readers do not change; the tests pin that the encodings are byte for byte equal.

use std::sync::Arc;

use rkyv::munge::munge;
use rkyv::rancor;
use rkyv::ser::{Positional, Writer};
use rkyv::string::{ArchivedString, StringResolver};
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Place, Serialize};

use super::{ArchivedSpanBatch, ArchivedSpanRecord, BatchError, BatchKind, ResourceBlock, ScopeBlock};

/// The serializer batches are written with (the one [`super::encode`] uses). The borrowed types
/// implement `Serialize` for it alone: generic bounds would hide that their archived types are
/// the owned types' (a where clause on a projection shadows the impl that normalizes it).
type Ser<'x> = rkyv::api::high::HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'x>, rancor::Error>;

/// A span's encoded bytes: a borrowed body, optionally followed by bytes appended to it (an
/// encoded repeated field, which protobuf merges), or a body rewritten in full.
#[derive(Debug, Clone)]
pub enum SpanBody<'a> {
    /// The body as stored, then `tail` if any.
    Borrowed { body: &'a [u8], tail: Option<Arc<[u8]>> },
    /// A rewritten body.
    Owned(Vec<u8>),
}

impl SpanBody<'_> {
    /// Encoded length.
    pub fn len(&self) -> usize {
        match self {
            SpanBody::Borrowed { body, tail } => body.len() + tail.as_ref().map_or(0, |t| t.len()),
            SpanBody::Owned(body) => body.len(),
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, copied.
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            SpanBody::Borrowed { body, tail } => [*body, tail.as_deref().unwrap_or_default()].concat(),
            SpanBody::Owned(body) => body.clone(),
        }
    }

    /// Writes the bytes as the elements of an `ArchivedVec<u8>` (bytes need no alignment: the
    /// parts go back to back where the vector's elements start).
    fn serialize(&self, serializer: &mut Ser<'_>) -> Result<VecResolver, rancor::Error> {
        let pos = serializer.pos();
        match self {
            SpanBody::Borrowed { body, tail } => {
                serializer.write(body)?;
                if let Some(tail) = tail {
                    serializer.write(tail)?;
                }
            }
            SpanBody::Owned(body) => serializer.write(body)?,
        }
        Ok(VecResolver::from_pos(pos))
    }
}

/// A stored span passed on: its archived record, its scope in the new batch and its bytes (as
/// stored, or marked); archives as [`ArchivedSpanRecord`].
#[derive(Clone)]
pub struct SpanRecordRef<'a> {
    /// The span as read.
    pub span: &'a ArchivedSpanRecord,
    /// Index into the new batch's `scopes`.
    pub scope: u32,
    /// Encoded `Span`.
    pub body: SpanBody<'a>,
}

impl std::fmt::Debug for SpanRecordRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanRecordRef")
            .field("span_id", &self.span.span_id)
            .field("scope", &self.scope)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl<'a> SpanRecordRef<'a> {
    /// The archived span `span`, pointing at `scope` of the new batch, with `body` as its bytes.
    pub fn of(span: &'a ArchivedSpanRecord, scope: u32, body: SpanBody<'a>) -> SpanRecordRef<'a> {
        SpanRecordRef { span, scope, body }
    }
}

/// Where a [`SpanRecordRef`]'s out-of-line parts were written.
pub struct SpanRecordRefResolver {
    name: StringResolver,
    body: VecResolver,
}

impl Archive for SpanRecordRef<'_> {
    type Archived = ArchivedSpanRecord;
    type Resolver = SpanRecordRefResolver;

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        munge!(let ArchivedSpanRecord {
            trace_id, span_id, parent_span_id, start_unix_nano, end_unix_nano, status_code, kind, scope, name, body
        } = out);
        let span = self.span;
        span.trace_id.resolve([(); 16], trace_id);
        span.span_id.resolve([(); 8], span_id);
        span.parent_span_id.resolve([(); 8], parent_span_id);
        span.start_unix_nano.to_native().resolve((), start_unix_nano);
        span.end_unix_nano.to_native().resolve((), end_unix_nano);
        span.status_code.resolve((), status_code);
        span.kind.resolve((), kind);
        self.scope.resolve((), scope);
        ArchivedString::resolve_from_str(span.name.as_str(), resolver.name, name);
        ArchivedVec::<u8>::resolve_from_len(self.body.len(), resolver.body, body);
    }
}

impl<'x> Serialize<Ser<'x>> for SpanRecordRef<'_> {
    fn serialize(&self, serializer: &mut Ser<'x>) -> Result<Self::Resolver, rancor::Error> {
        Ok(SpanRecordRefResolver {
            name: ArchivedString::serialize_from_str(self.span.name.as_str(), serializer)?,
            body: self.body.serialize(serializer)?,
        })
    }
}

/// A span batch of borrowed spans; archives as [`ArchivedSpanBatch`].
#[derive(Debug, Clone, Default)]
pub struct SpanBatchRef<'a> {
    /// When the data was accepted, Unix nanoseconds.
    pub received_unix_nano: u64,
    /// Resources the scopes point into.
    pub resources: Vec<ResourceBlock>,
    /// Scopes the spans point into.
    pub scopes: Vec<ScopeBlock>,
    /// The spans.
    pub spans: Vec<SpanRecordRef<'a>>,
}

/// Where a [`SpanBatchRef`]'s vectors were written.
pub struct SpanBatchRefResolver {
    resources: VecResolver,
    scopes: VecResolver,
    spans: VecResolver,
}

impl Archive for SpanBatchRef<'_> {
    type Archived = ArchivedSpanBatch;
    type Resolver = SpanBatchRefResolver;

    fn resolve(&self, resolver: Self::Resolver, out: Place<Self::Archived>) {
        munge!(let ArchivedSpanBatch { received_unix_nano, resources, scopes, spans } = out);
        self.received_unix_nano.resolve((), received_unix_nano);
        ArchivedVec::resolve_from_slice(&self.resources, resolver.resources, resources);
        ArchivedVec::resolve_from_slice(&self.scopes, resolver.scopes, scopes);
        ArchivedVec::resolve_from_slice(&self.spans, resolver.spans, spans);
    }
}

impl<'x> Serialize<Ser<'x>> for SpanBatchRef<'_> {
    fn serialize(&self, serializer: &mut Ser<'x>) -> Result<Self::Resolver, rancor::Error> {
        Ok(SpanBatchRefResolver {
            resources: ArchivedVec::serialize_from_slice(&self.resources, serializer)?,
            scopes: ArchivedVec::serialize_from_slice(&self.scopes, serializer)?,
            spans: ArchivedVec::serialize_from_slice(&self.spans, serializer)?,
        })
    }
}

/// Serializes a borrowed span batch with its header: the same bytes as
/// [`super::encode_spans`] of the owned batch.
pub fn encode_span_refs(batch: &SpanBatchRef<'_>) -> Result<Vec<u8>, BatchError> {
    let size = batch.spans.iter().map(|span| span.span.name.len() + span.body.len());
    super::encode(BatchKind::Spans, batch.spans.len(), batch, super::spans_size(size, &batch.resources, &batch.scopes))
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn owned_batch() -> SpanBatch {
        let span = |n: u8, name: &str, body: Vec<u8>| SpanRecord {
            trace_id: [n; 16],
            span_id: [n + 1; 8],
            parent_span_id: [0; 8],
            start_unix_nano: 1_000 + u64::from(n),
            end_unix_nano: 9_000_000 + u64::from(n),
            status_code: n % 3,
            kind: 2,
            scope: 0,
            name: name.to_string(),
            body,
        };
        SpanBatch {
            received_unix_nano: 42,
            resources: vec![ResourceBlock {
                resource: vec![1, 2, 3],
                schema_url: String::new(),
                service_name: "orders".into(),
            }],
            scopes: vec![ScopeBlock { resource: 0, scope: vec![9], schema_url: String::new() }],
            spans: vec![
                // Names inline (up to 8 bytes) and out of line; bodies empty, odd-sized, large.
                span(1, "GET", vec![]),
                span(2, "SELECT orders by customer", vec![7; 33]),
                span(3, "12345678", (0..=255).collect()),
            ],
        }
    }

    #[test]
    fn borrowed_spans_encode_to_the_owned_bytes() {
        let owned = owned_batch();
        let stored = encode_spans(&owned).unwrap();
        let source = access_spans(&stored).unwrap();
        let tail: Arc<[u8]> = Arc::from(&[0x4a, 0x02, 0x0a, 0x00][..]);
        let borrowed = SpanBatchRef {
            received_unix_nano: 42,
            resources: owned.resources.clone(),
            scopes: owned.scopes.clone(),
            spans: source
                .spans
                .iter()
                .enumerate()
                .map(|(i, span)| {
                    let body = match i {
                        0 => SpanBody::Borrowed { body: span.body.as_slice(), tail: None },
                        1 => SpanBody::Borrowed { body: span.body.as_slice(), tail: Some(tail.clone()) },
                        _ => SpanBody::Owned(span.body.as_slice().to_vec()),
                    };
                    SpanRecordRef::of(span, span.scope.to_native(), body)
                })
                .collect(),
        };
        let mut expected = owned.clone();
        expected.spans[1].body.extend_from_slice(&tail);
        assert_eq!(encode_span_refs(&borrowed).unwrap(), encode_spans(&expected).unwrap());
        // The reserved size covers the archive, so the buffer is never regrown while it fills.
        let payload = expected.spans.iter().map(|span| span.name.len() + span.body.len());
        assert!(encode_spans(&expected).unwrap().len() <= spans_size(payload, &expected.resources, &expected.scopes));
        let read = access_spans(&encode_span_refs(&borrowed).unwrap()).unwrap().spans[1].body.as_slice().to_vec();
        assert_eq!(read, expected.spans[1].body);
    }
}
