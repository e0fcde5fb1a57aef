//! What spanmetrics learns of every decided span: a compact summary (service, name, kind,
//! status, duration, ids, kept or not, configured dimension values), written to the
//! `span_summaries` edge in the transaction that records the span's decision. So spanmetrics
//! counts every span exactly once (a crash before the commit writes neither), and a summary
//! marked kept is backed by a durable keep decision: an exemplar taken from it always resolves.

use crate::fast_map::FastMap;

use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tailgate_ipc::batch::{
    ArchivedSpanBatch, BatchError, SpanSummaryRef, SummaryBatchRef, encode_summary_refs, span_duration,
};

/// Summaries sealed into batches of at most this many.
const MAX_SUMMARIES_PER_BATCH: usize = 16_384;

/// Summaries of one step, borrowing the names from the spans read in the step's transaction.
#[derive(Debug, Default)]
pub struct Summaries<'t> {
    services: FastMap<&'t str, u32>,
    current: SummaryBatchRef<'t>,
    full: Vec<SummaryBatchRef<'t>>,
}

impl<'t> Summaries<'t> {
    /// Summarizes span `index` of `source`; `dimensions` are the configured attribute names.
    pub fn add(&mut self, source: &'t ArchivedSpanBatch, index: u32, kept: bool, dimensions: &[String]) {
        let Some(span) = source.spans.get(index as usize) else { return };
        if self.current.summaries.len() >= MAX_SUMMARIES_PER_BATCH {
            self.seal();
        }
        let resource = source
            .scopes
            .get(span.scope.to_native() as usize)
            .and_then(|scope| source.resources.get(scope.resource.to_native() as usize));
        let service_name = resource.map(|r| r.service_name.as_str()).unwrap_or("");
        let service = match self.services.get(service_name) {
            Some(service) => *service,
            None => {
                let next = self.current.services.len() as u32;
                self.current.services.push(service_name.to_owned());
                self.services.insert(service_name, next);
                next
            }
        };
        let dimensions = if dimensions.is_empty() {
            Vec::new()
        } else {
            let span_attributes = Span::decode(span.body.as_slice()).map(|s| s.attributes).unwrap_or_default();
            let resource_attributes = resource
                .and_then(|r| Resource::decode(r.resource.as_slice()).ok())
                .map(|r| r.attributes)
                .unwrap_or_default();
            dimensions
                .iter()
                .map(|name| {
                    attribute_text(&span_attributes, name)
                        .or_else(|| attribute_text(&resource_attributes, name))
                        .unwrap_or_default()
                })
                .collect()
        };
        let (start, end) = (span.start_unix_nano.to_native(), span.end_unix_nano.to_native());
        self.current.summaries.push(SpanSummaryRef {
            trace_id: span.trace_id,
            span_id: span.span_id,
            end_unix_nano: end,
            duration_nanos: span_duration(start, end),
            kind: span.kind,
            status_code: span.status_code,
            kept,
            service,
            name: span.name.as_str(),
            dimensions,
        });
    }

    fn seal(&mut self) {
        if self.current.summaries.is_empty() {
            return;
        }
        self.services.clear();
        self.full.push(std::mem::take(&mut self.current));
    }

    /// The batches to append, stamped with the decision time and encoded, and how many
    /// summaries they hold.
    pub fn finish(mut self, decided_unix_nano: u64) -> Result<(Vec<Vec<u8>>, u64), BatchError> {
        self.seal();
        let count = self.full.iter().map(|batch| batch.summaries.len() as u64).sum();
        let encoded = self
            .full
            .iter_mut()
            .map(|batch| {
                batch.decided_unix_nano = decided_unix_nano;
                encode_summary_refs(batch)
            })
            .collect::<Result<_, _>>()?;
        Ok((encoded, count))
    }
}

/// An attribute's value as text (what a metric label holds).
fn attribute_text(attributes: &[KeyValue], name: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == name)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        any_value::Value::StringValue(text) => text.clone(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        _ => return None,
    })
}
