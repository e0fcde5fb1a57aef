//! What spanmetrics learns of the spans, counted here per series (service, span name, kind,
//! status, configured dimension values): calls, the sum and the histogram of durations, and the
//! first kept spans as exemplars. One [`SeriesDeltaBatch`] per step goes to the `span_summaries`
//! edge in the transaction that ingests the spans it counts ([`Counting`]) and records the
//! decisions of its exemplars, so spanmetrics counts every span exactly once (a crash before
//! the commit writes neither), and every exemplar is a kept span whose keep decision is
//! durable: it always resolves. (A summary of
//! every span, ~86 bytes each, went there before and was counted by spanmetrics; it still reads
//! such batches.)

use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tailgate_ipc::batch::{
    ArchivedSpanBatch, BatchError, SeriesDelta, SeriesDeltaBatch, SpanExemplar, bucket_of, encode_series_deltas,
    span_duration,
};

/// How tail_sample counts spans for spanmetrics (from the `spanmetrics` configuration).
#[derive(Debug, Clone, Default)]
pub struct SeriesSettings {
    /// Histogram bucket bounds, milliseconds.
    pub bounds_ms: Vec<f64>,
    /// Count only the spans of kept traces (`source: kept`).
    pub kept_only: bool,
    /// Exemplars per series per step (0: exemplars off).
    pub exemplars: usize,
    /// Attribute names of the extra dimensions.
    pub dimensions: Vec<String>,
}

impl SeriesSettings {
    /// The settings of `config.spanmetrics`.
    pub fn from_config(config: &tailgate_config::Config) -> SeriesSettings {
        let spanmetrics = &config.spanmetrics;
        SeriesSettings {
            bounds_ms: spanmetrics.histogram.bounds_ms(),
            kept_only: spanmetrics.source == tailgate_config::SpanmetricsSource::Kept,
            exemplars: if spanmetrics.exemplars.enabled {
                spanmetrics.exemplars.max_per_data_point as usize
            } else {
                0
            },
            dimensions: spanmetrics.dimensions.iter().map(|d| d.name.clone()).collect(),
        }
    }
}

/// Meta key of [`Counting`]: where tail_sample counts the spans of which batches.
pub const COUNTING_KEY: &str = "tail_sample/span_counting";

/// Where tail_sample counts a span for spanmetrics. With `source: all` a span is counted when
/// it is ingested (its bytes are in the cache then, and a trace that is dropped is not read
/// again when it is decided); with `source: kept` only the spans of kept traces count, when
/// their trace is decided. Exemplars always come from kept traces, when they are decided.
/// Either way a span is counted in the transaction that ingests or decides it: once.
///
/// Spans ingested before a change of rule (a new `source`, or an upgrade from a version that
/// counted every span when it was decided) may still be pending when it takes effect: the
/// batches up to `boundary` (the ingestion position at the change) keep the rule they were
/// ingested under, so none of their spans is counted twice or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counting {
    /// Spans of batches after `boundary` are counted when ingested.
    pub at_ingest: bool,
    /// The last batch ingested under the previous rule.
    pub boundary: u64,
    /// Spans of batches up to `boundary` were counted when ingested.
    pub before_at_ingest: bool,
}

impl Counting {
    const AT_INGEST: u64 = 1 << 63;
    const BEFORE_AT_INGEST: u64 = 1 << 62;

    /// The rule for `settings`, given the one stored (`None`: spans were counted when decided)
    /// and the ingestion position `read_pos` at which a new rule would take effect.
    pub fn resume(settings: &SeriesSettings, stored: Option<u64>, read_pos: u64) -> Counting {
        let at_ingest = !settings.kept_only;
        match stored.map(Counting::decode) {
            Some(stored) if stored.at_ingest == at_ingest => stored,
            stored => Counting { at_ingest, boundary: read_pos, before_at_ingest: stored.is_some_and(|s| s.at_ingest) },
        }
    }

    /// Whether the spans of batch `seq` are (or were) counted when ingested.
    pub fn counted_at_ingest(&self, seq: u64) -> bool {
        if seq > self.boundary { self.at_ingest } else { self.before_at_ingest }
    }

    /// As stored under [`COUNTING_KEY`].
    pub fn encode(&self) -> u64 {
        let flag = |set: bool, bit: u64| if set { bit } else { 0 };
        (self.boundary & (Self::BEFORE_AT_INGEST - 1))
            | flag(self.at_ingest, Self::AT_INGEST)
            | flag(self.before_at_ingest, Self::BEFORE_AT_INGEST)
    }

    fn decode(raw: u64) -> Counting {
        Counting {
            at_ingest: raw & Self::AT_INGEST != 0,
            boundary: raw & (Self::BEFORE_AT_INGEST - 1),
            before_at_ingest: raw & Self::BEFORE_AT_INGEST != 0,
        }
    }
}

/// A series, borrowing its names from the spans read in the step's transaction.
#[derive(Debug, Hash, PartialEq, Eq)]
struct SeriesKey<'t> {
    service: &'t str,
    name: &'t str,
    kind: u8,
    status_code: u8,
    dimensions: Vec<String>,
}

/// What a series gained in the step.
#[derive(Debug)]
struct Counts {
    calls: u64,
    sum_ms: f64,
    buckets: Vec<u64>,
    exemplars: Vec<SpanExemplar>,
}

/// The span metrics of one step, per series in the order the series first appeared.
#[derive(Debug, Default)]
pub struct Summaries<'t> {
    series: indexmap::IndexMap<SeriesKey<'t>, Counts, foldhash::fast::RandomState>,
}

/// Stored size of a series besides its names (counts, buckets, framing), for the step's
/// output bound.
pub const SERIES_OVERHEAD_BYTES: usize = 256;

impl<'t> Summaries<'t> {
    /// Counts span `index` of `source` in its series when `count`, and offers it as an
    /// exemplar when it is `kept`; returns the stored bytes it added (a new series), for the
    /// step's output bound.
    pub fn add(
        &mut self,
        settings: &SeriesSettings,
        source: &'t ArchivedSpanBatch,
        index: u32,
        count: bool,
        kept: bool,
    ) -> usize {
        let exemplar = kept && settings.exemplars > 0;
        if !count && !exemplar {
            return 0;
        }
        let Some(span) = source.spans.get(index as usize) else { return 0 };
        let resource = source
            .scopes
            .get(span.scope.to_native() as usize)
            .and_then(|scope| source.resources.get(scope.resource.to_native() as usize));
        let dimensions = if settings.dimensions.is_empty() {
            Vec::new()
        } else {
            let span_attributes = Span::decode(span.body.as_slice()).map(|s| s.attributes).unwrap_or_default();
            let resource_attributes = resource
                .and_then(|r| Resource::decode(r.resource.as_slice()).ok())
                .map(|r| r.attributes)
                .unwrap_or_default();
            settings
                .dimensions
                .iter()
                .map(|name| {
                    attribute_text(&span_attributes, name)
                        .or_else(|| attribute_text(&resource_attributes, name))
                        .unwrap_or_default()
                })
                .collect()
        };
        let key = SeriesKey {
            service: resource.map(|r| r.service_name.as_str()).unwrap_or(""),
            name: span.name.as_str(),
            kind: span.kind,
            status_code: span.status_code,
            dimensions,
        };
        let entry = self.series.entry(key);
        let added = match &entry {
            indexmap::map::Entry::Occupied(_) => 0,
            indexmap::map::Entry::Vacant(new) => {
                let key = new.key();
                SERIES_OVERHEAD_BYTES
                    + key.service.len()
                    + key.name.len()
                    + key.dimensions.iter().map(String::len).sum::<usize>()
            }
        };
        let counts = entry.or_insert_with(|| Counts {
            calls: 0,
            sum_ms: 0.0,
            buckets: vec![0; settings.bounds_ms.len() + 1],
            exemplars: Vec::new(),
        });
        let end = span.end_unix_nano.to_native();
        let value_ms = span_duration(span.start_unix_nano.to_native(), end) as f64 / 1e6;
        if count {
            counts.calls += 1;
            counts.sum_ms += value_ms;
            counts.buckets[bucket_of(&settings.bounds_ms, value_ms)] += 1;
        }
        if exemplar && counts.exemplars.len() < settings.exemplars {
            counts.exemplars.push(SpanExemplar {
                trace_id: span.trace_id,
                span_id: span.span_id,
                value_ms,
                time_unix_nano: end,
            });
        }
        added
    }

    /// The batch to append (none when nothing was counted or offered), stamped with the
    /// decision time and encoded.
    pub fn finish(self, settings: &SeriesSettings, decided_unix_nano: u64) -> Result<Vec<Vec<u8>>, BatchError> {
        if self.series.is_empty() {
            return Ok(Vec::new());
        }
        let batch = SeriesDeltaBatch {
            decided_unix_nano,
            bounds_ms: settings.bounds_ms.clone(),
            series: self
                .series
                .into_iter()
                .map(|(key, counts)| SeriesDelta {
                    service: key.service.to_owned(),
                    name: key.name.to_owned(),
                    kind: key.kind,
                    status_code: key.status_code,
                    dimensions: key.dimensions,
                    calls: counts.calls,
                    sum_ms: counts.sum_ms,
                    buckets: counts.buckets,
                    exemplars: counts.exemplars,
                })
                .collect(),
        };
        Ok(vec![encode_series_deltas(&batch)?])
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
