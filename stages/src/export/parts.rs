//! The items of one OTLP export, copied out of the queue so that any part of them can be encoded
//! and sent on its own.
//!
//! - Spans and log records are items under their (resource, scope); a part is encoded with one
//!   `resource_*` entry per distinct resource holding each of its scopes once, whatever batches
//!   the items came from.
//! - Metrics are carried as the requests receive took in; their items are the requests'
//!   top-level `resource_metrics` entries, each a valid request on its own.
//!
//! Parts start as runs of items up to the request size limit ([`Items::parts`]); a part the
//! backend refuses is split further by [`super::isolate`], so a request is never too large
//! twice and one bad item never holds back the rest.

use std::ops::Range;

use tailgate_ipc::batch::{self, ArchivedResourceBlock, ArchivedScopeBlock};
use tailgate_ipc::{Consumer, Edge, Queue, QueueError};

use crate::context::StageError;
use crate::otlp_wire::{self, ScopeItems};

/// One item: which (resource, scope) it belongs to, where its bytes are, what it counts.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    /// Index into the scopes (unused for metrics).
    scope: u32,
    /// Its bytes in [`Items::bytes`].
    start: u32,
    end: u32,
    /// Spans, records or data points it carries.
    pub count: u32,
}

impl Item {
    /// Encoded size of the item.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Whether the item has no bytes.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

#[derive(Debug)]
struct Scope {
    resource: u32,
    scope: Vec<u8>,
    schema_url: String,
}

/// Items of one export and what they need to be encoded.
#[derive(Debug, Default)]
pub struct Items {
    /// (encoded resource, schema URL), each distinct one once.
    resources: Vec<(Vec<u8>, String)>,
    scopes: Vec<Scope>,
    /// Every item, in queue order.
    pub items: Vec<Item>,
    bytes: Vec<u8>,
    /// Metrics: items are whole top-level entries, encoded by concatenation.
    raw: bool,
    /// Cursor the items were read after, and the last sequence number they include.
    pub cursor: u64,
    /// Last sequence number read.
    pub last_seq: u64,
}

impl Items {
    /// Reads batches after `consumer`'s cursor (up to `max_items` and the request limits).
    pub fn read(queue: &Queue, consumer: Consumer, max_items: u64) -> Result<Items, StageError> {
        let rtxn = queue.read()?;
        let mut out = Items { raw: consumer.edge() == Edge::Metrics, ..Items::default() };
        let (cursor, last_seq, _) =
            super::read_batches(queue, &rtxn, consumer, max_items, |seq, value| match consumer.edge() {
                Edge::KeptSpans | Edge::Spans => {
                    let source = batch::access_spans(value)?;
                    let map = out.add_groups(&source.resources, &source.scopes);
                    for span in source.spans.iter() {
                        out.push(map.get(span.scope.to_native() as usize).copied(), span.body.as_slice(), 1);
                    }
                    Ok(source.spans.len() as u64)
                }
                Edge::KeptLogs | Edge::Logs => {
                    let source = batch::access_logs(value)?;
                    let map = out.add_groups(&source.resources, &source.scopes);
                    for log in source.logs.iter() {
                        out.push(map.get(log.scope.to_native() as usize).copied(), log.body.as_slice(), 1);
                    }
                    Ok(source.logs.len() as u64)
                }
                Edge::Metrics => {
                    let source = batch::access_metrics(value)?;
                    for request in source.requests.iter() {
                        let entries = otlp_wire::split_top_level(request.as_slice()).map_err(|err| {
                            StageError::Queue(QueueError::Corrupt {
                                edge: Edge::Metrics,
                                seq,
                                source: batch::BatchError::Archive(format!("stored metrics request: {err}")),
                            })
                        })?;
                        for entry in entries {
                            let points = otlp_wire::count_metric_points(entry).unwrap_or(0);
                            out.push(Some(0), entry, points);
                        }
                    }
                    Ok(u64::from(source.data_points.to_native()))
                }
                Edge::SpanSummaries => Err(StageError::Other("span summaries are not exported".into())),
            })?;
        out.cursor = cursor;
        out.last_seq = last_seq;
        Ok(out)
    }

    /// Registers a batch's resources and scopes (deduplicated by content); returns the index of
    /// each of the batch's scopes in `self.scopes`.
    fn add_groups(
        &mut self,
        resources: &rkyv::vec::ArchivedVec<ArchivedResourceBlock>,
        scopes: &rkyv::vec::ArchivedVec<ArchivedScopeBlock>,
    ) -> Vec<u32> {
        scopes
            .iter()
            .map(|scope| {
                let (resource, schema) = resources
                    .get(scope.resource.to_native() as usize)
                    .map(|r| (r.resource.as_slice(), r.schema_url.as_str()))
                    .unwrap_or((&[], ""));
                let resource_index = match self.resources.iter().position(|(r, s)| r == resource && s == schema) {
                    Some(index) => index,
                    None => {
                        self.resources.push((resource.to_vec(), schema.to_string()));
                        self.resources.len() - 1
                    }
                } as u32;
                let (bytes, schema) = (scope.scope.as_slice(), scope.schema_url.as_str());
                let found = self
                    .scopes
                    .iter()
                    .position(|s| s.resource == resource_index && s.scope == bytes && s.schema_url == schema);
                match found {
                    Some(index) => index as u32,
                    None => {
                        self.scopes.push(Scope {
                            resource: resource_index,
                            scope: bytes.to_vec(),
                            schema_url: schema.to_string(),
                        });
                        (self.scopes.len() - 1) as u32
                    }
                }
            })
            .collect()
    }

    /// Adds an item; one whose scope index is out of range is dropped (the batch was validated,
    /// so that cannot happen short of a bug; it must not take the request down).
    fn push(&mut self, scope: Option<u32>, bytes: &[u8], count: u32) {
        let Some(scope) = scope else { return };
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(bytes);
        self.items.push(Item { scope, start, end: self.bytes.len() as u32, count });
    }

    /// Items read.
    pub fn count(&self) -> u64 {
        self.items.iter().map(|item| u64::from(item.count)).sum()
    }

    /// Runs of items whose encoded size stays within `max_bytes` (an item larger than that
    /// forms a part alone).
    pub fn parts(&self, max_bytes: usize) -> Vec<Range<usize>> {
        let mut parts = Vec::new();
        let (mut start, mut size) = (0, 0usize);
        for (index, item) in self.items.iter().enumerate() {
            // Per item: its bytes, its field header, and a share of group headers.
            let cost = item.len() + 16;
            if index > start && size + cost > max_bytes {
                parts.push(start..index);
                start = index;
                size = 0;
            }
            size += cost;
        }
        if start < self.items.len() {
            parts.push(start..self.items.len());
        }
        parts
    }

    /// Encodes the items of `part` as one export request.
    pub fn encode(&self, part: &[Item]) -> Vec<u8> {
        let mut out = Vec::with_capacity(part.iter().map(|item| item.len() + 8).sum::<usize>() + 256);
        if self.raw {
            for item in part {
                out.extend_from_slice(&self.bytes[item.start as usize..item.end as usize]);
            }
            return out;
        }
        // Resources in order of first appearance, each with its scopes in that order.
        let mut resources: Vec<(u32, Vec<ScopeItems<'_>>, Vec<u32>)> = Vec::new();
        for item in part {
            let scope = &self.scopes[item.scope as usize];
            let body = &self.bytes[item.start as usize..item.end as usize];
            let index = match resources.iter().position(|(r, _, _)| *r == scope.resource) {
                Some(index) => index,
                None => {
                    resources.push((scope.resource, Vec::new(), Vec::new()));
                    resources.len() - 1
                }
            };
            let entry = &mut resources[index];
            match entry.2.iter().position(|s| *s == item.scope) {
                Some(index) => entry.1[index].items.push(body),
                None => {
                    entry.2.push(item.scope);
                    entry.1.push(ScopeItems { scope: &scope.scope, schema_url: &scope.schema_url, items: vec![body] });
                }
            }
        }
        for (resource, scopes, _) in &resources {
            let (bytes, schema) = &self.resources[*resource as usize];
            otlp_wire::encode_resource(&mut out, bytes, schema, scopes);
        }
        out
    }
}
