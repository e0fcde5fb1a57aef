//! Per-item caps (`receivers.otlp.limits`, the OpenTelemetry SDK's attribute limits): a span or
//! log record within every cap is stored as received; one over a cap is decoded, cut down to it
//! with what was cut counted in its `dropped_*_count` fields, and encoded again (the slow path:
//! unknown fields of that one item are not carried over).

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tailgate_config::AttributeLimits;

/// The caps in force (`0` / `None`: no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most attributes per span and per log record.
    pub attributes: usize,
    /// Longest string (characters) or bytes (bytes) attribute value.
    pub value_length: Option<usize>,
    /// Most events per span.
    pub events: usize,
    /// Most links per span.
    pub links: usize,
}

impl Limits {
    /// No caps.
    pub const NONE: Limits = Limits { attributes: 0, value_length: None, events: 0, links: 0 };

    /// The configured caps.
    pub fn from_config(config: &AttributeLimits) -> Limits {
        Limits {
            attributes: config.attribute_count_limit as usize,
            value_length: config.attribute_value_length_limit.map(|limit| limit as usize),
            events: config.event_count_limit as usize,
            links: config.link_count_limit as usize,
        }
    }

    /// Whether an item with these counts, whose longest attribute encoding is `longest_attribute`
    /// bytes, may be over a cap (a value can only be too long if its encoding is).
    pub(super) fn exceeded(&self, attributes: usize, longest_attribute: usize, events: usize, links: usize) -> bool {
        let over = |count: usize, cap: usize| cap > 0 && count > cap;
        over(attributes, self.attributes)
            || over(events, self.events)
            || over(links, self.links)
            || self.value_length.is_some_and(|cap| longest_attribute > cap)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_config(&AttributeLimits::default())
    }
}

/// What the caps cut from a request's items, for the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncated {
    /// Attributes dropped (past the count cap).
    pub attributes: u64,
    /// Attribute values shortened.
    pub values: u64,
    /// Span events dropped.
    pub events: u64,
    /// Span links dropped.
    pub links: u64,
}

impl Truncated {
    /// Whether anything was cut.
    pub fn any(&self) -> bool {
        *self != Truncated::default()
    }
}

fn cut_list<T>(items: &mut Vec<T>, cap: usize, dropped: &mut u32, counter: &mut u64) {
    if cap > 0 && items.len() > cap {
        let cut = items.len() - cap;
        items.truncate(cap);
        *dropped = dropped.saturating_add(u32::try_from(cut).unwrap_or(u32::MAX));
        *counter += cut as u64;
    }
}

/// Shortens a value to `cap` (strings at a character boundary, arrays and lists element by
/// element); whether anything was cut.
fn cut_value(value: &mut AnyValue, cap: usize) -> bool {
    match &mut value.value {
        Some(Value::StringValue(text)) => match text.char_indices().nth(cap) {
            Some((end, _)) => {
                text.truncate(end);
                true
            }
            None => false,
        },
        Some(Value::BytesValue(bytes)) if bytes.len() > cap => {
            bytes.truncate(cap);
            true
        }
        Some(Value::ArrayValue(array)) => array.values.iter_mut().fold(false, |cut, v| cut_value(v, cap) | cut),
        Some(Value::KvlistValue(list)) => {
            list.values.iter_mut().filter_map(|kv| kv.value.as_mut()).fold(false, |cut, v| cut_value(v, cap) | cut)
        }
        _ => false,
    }
}

fn cut_attributes(attributes: &mut Vec<KeyValue>, dropped: &mut u32, limits: &Limits, truncated: &mut Truncated) {
    cut_list(attributes, limits.attributes, dropped, &mut truncated.attributes);
    if let Some(cap) = limits.value_length {
        for value in attributes.iter_mut().filter_map(|kv| kv.value.as_mut()) {
            truncated.values += u64::from(cut_value(value, cap));
        }
    }
}

/// A (checked) span cut down to the caps, re-encoded.
pub(super) fn limit_span(body: &[u8], limits: &Limits, truncated: &mut Truncated) -> Vec<u8> {
    let Ok(mut span) = Span::decode(body) else { return body.to_vec() };
    cut_attributes(&mut span.attributes, &mut span.dropped_attributes_count, limits, truncated);
    cut_list(&mut span.events, limits.events, &mut span.dropped_events_count, &mut truncated.events);
    cut_list(&mut span.links, limits.links, &mut span.dropped_links_count, &mut truncated.links);
    span.encode_to_vec()
}

/// A (checked) log record cut down to the caps, re-encoded.
pub(super) fn limit_log_record(body: &[u8], limits: &Limits, truncated: &mut Truncated) -> Vec<u8> {
    let Ok(mut record) = LogRecord::decode(body) else { return body.to_vec() };
    cut_attributes(&mut record.attributes, &mut record.dropped_attributes_count, limits, truncated);
    record.encode_to_vec()
}
