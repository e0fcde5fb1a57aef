//! From stored log records to Loki entries: stream labels, lines, structured metadata, and the
//! per-stream state that keeps every stream in timestamp order across requests and restarts.
//!
//! Labels: `service_name` (the resource's `service.name`, `unknown_service` when absent, as Loki
//! names it), `level` (from the OTLP severity number, Loki's own mapping), plus the configured
//! resource and record attributes, names sanitized to `[a-zA-Z_][a-zA-Z0-9_]*`. Sorted by name,
//! so one label set is always one stream.
//!
//! The stream table (`loki/stream/<labels>` in the queue's `state` table, written in the
//! transaction that moves the cursor) holds each stream's newest timestamp sent, so
//! `out_of_order_action` holds across restarts, and bounds the number of streams
//! (`max_streams`): a record that would open one more stream goes to its service's
//! `{service_name, level}` stream instead, its other label values moved to structured metadata.

use std::collections::{BTreeMap, HashMap};

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tailgate_config::{LokiExporter, OutOfOrderAction, TraceContextPlacement};
use tailgate_ipc::batch::ArchivedLogBatch;

/// Prefix of the stream table in the queue's `state` table.
pub const STREAM_STATE_PREFIX: &[u8] = b"loki/stream/";

/// Streams not written for this long are forgotten when the table is at its bound (Loki itself
/// refuses entries more than about an hour behind a stream's newest).
const STREAM_IDLE_EVICT_NANOS: i64 = 2 * 3600 * 1_000_000_000;

/// One line for Loki.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Index into [`Prepared::streams`].
    pub stream: usize,
    /// Unix nanoseconds.
    pub unix_nanos: i64,
    /// The line.
    pub line: String,
    /// Structured metadata (name, value).
    pub metadata: Vec<(String, String)>,
}

/// A stream: its labels (sorted) and their selector text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    /// (name, value), sorted by name.
    pub labels: Vec<(String, String)>,
    /// `{name="value", ...}`.
    pub selector: String,
}

/// Entries ready to send: ordered by stream, then timestamp.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Streams the entries point into.
    pub streams: Vec<Stream>,
    /// Entries grouped by stream, each stream oldest first.
    pub entries: Vec<Entry>,
    /// Entries older than their stream's newest that were dropped (`out_of_order_action: drop`).
    pub dropped_out_of_order: u64,
    /// Entries whose timestamp was raised to their stream's newest.
    pub rewritten: u64,
    /// Records put on their service's stream because `max_streams` was reached.
    pub label_overflow: u64,
    /// Records whose body could not be decoded (counted, sent with an empty line).
    pub undecodable: u64,
    /// Records older than `max_entry_age`, dropped before sending.
    pub stale: u64,
}

/// The stream table as loaded from the queue, plus what this process changed since.
#[derive(Debug, Default)]
pub struct StreamTable {
    newest: HashMap<String, i64>,
    /// Streams whose newest timestamp changed since the last commit.
    dirty: BTreeMap<String, i64>,
    /// Streams forgotten since the last commit.
    evicted: Vec<String>,
}

impl StreamTable {
    /// The table from its stored entries (`key` without the prefix -> i64 BE).
    pub fn load<'a>(stored: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> StreamTable {
        let mut table = StreamTable::default();
        for (key, value) in stored {
            let Some(selector) = key.strip_prefix(STREAM_STATE_PREFIX) else { continue };
            let (Ok(selector), Ok(raw)) = (std::str::from_utf8(selector), <[u8; 8]>::try_from(value)) else { continue };
            table.newest.insert(selector.to_owned(), i64::from_be_bytes(raw));
        }
        table
    }

    /// Streams known.
    pub fn len(&self) -> usize {
        self.newest.len()
    }

    /// Whether no stream is known.
    pub fn is_empty(&self) -> bool {
        self.newest.is_empty()
    }

    /// Changes to write with the next cursor move: (key, Some(value)) to put, (key, None) to delete.
    pub fn take_changes(&mut self) -> Vec<(Vec<u8>, Option<[u8; 8]>)> {
        let key = |selector: &str| [STREAM_STATE_PREFIX, selector.as_bytes()].concat();
        let mut out: Vec<(Vec<u8>, Option<[u8; 8]>)> =
            std::mem::take(&mut self.evicted).iter().map(|s| (key(s), None)).collect();
        out.extend(std::mem::take(&mut self.dirty).iter().map(|(s, ts)| (key(s), Some(ts.to_be_bytes()))));
        out
    }

    /// Makes room for one more stream if the table is at `max`: forgets streams idle for hours.
    fn has_room(&mut self, max: usize, now_nanos: i64) -> bool {
        if self.newest.len() < max {
            return true;
        }
        let idle: Vec<String> = self
            .newest
            .iter()
            .filter(|(_, newest)| now_nanos.saturating_sub(**newest) > STREAM_IDLE_EVICT_NANOS)
            .map(|(selector, _)| selector.clone())
            .collect();
        for selector in idle {
            self.newest.remove(&selector);
            self.dirty.remove(&selector);
            self.evicted.push(selector);
        }
        self.newest.len() < max
    }
}

/// Builds entries from stored log batches.
pub struct EntryBuilder<'c> {
    config: &'c LokiExporter,
    /// selector -> index in `streams`.
    stream_index: HashMap<String, usize>,
    prepared: Prepared,
    per_stream: Vec<Vec<Entry>>,
    /// Streams this request opens that the stream table does not know yet.
    opened: usize,
}

impl<'c> EntryBuilder<'c> {
    /// A builder for one request.
    pub fn new(config: &'c LokiExporter) -> EntryBuilder<'c> {
        EntryBuilder {
            config,
            stream_index: HashMap::new(),
            prepared: Prepared::default(),
            per_stream: Vec::new(),
            opened: 0,
        }
    }

    /// Adds every record of a stored batch.
    pub fn add_batch(&mut self, batch: &ArchivedLogBatch, streams: &mut StreamTable, now_nanos: i64) {
        let resources: Vec<Vec<KeyValue>> = batch
            .resources
            .iter()
            .map(|block| Resource::decode(block.resource.as_slice()).map(|r| r.attributes).unwrap_or_default())
            .collect();
        for log in batch.logs.iter() {
            let resource_index =
                batch.scopes.get(log.scope.to_native() as usize).map(|scope| scope.resource.to_native() as usize);
            let block = resource_index.and_then(|index| batch.resources.get(index));
            let service = block.map(|b| b.service_name.as_str()).filter(|s| !s.is_empty()).unwrap_or("unknown_service");
            let resource = resource_index.and_then(|index| resources.get(index)).map(Vec::as_slice).unwrap_or(&[]);
            let record = match LogRecord::decode(log.body.as_slice()) {
                Ok(record) => record,
                Err(_) => {
                    self.prepared.undecodable += 1;
                    LogRecord::default()
                }
            };
            let severity = if log.severity_number != 0 { log.severity_number } else { record.severity_number as u8 };
            self.add_record(service, resource, &record, severity, log.time_unix_nano.to_native(), streams, now_nanos);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add_record(
        &mut self,
        service: &str,
        resource: &[KeyValue],
        record: &LogRecord,
        severity: u8,
        time_unix_nano: u64,
        streams: &mut StreamTable,
        now_nanos: i64,
    ) {
        let max_age = self.config.max_entry_age.as_nanos() as i64;
        if max_age > 0 && time_unix_nano > 0 && (time_unix_nano as i64) < now_nanos.saturating_sub(max_age) {
            self.prepared.stale += 1;
            return;
        }
        let level = level_of(severity, &record.severity_text);
        let mut labels = vec![("service_name".to_owned(), service.to_owned()), ("level".to_owned(), level.to_owned())];
        for key in &self.config.labels.resource {
            if let Some(value) = find_attribute(resource, key) {
                labels.push((label_name(key), value));
            }
        }
        for key in &self.config.labels.attributes {
            if let Some(value) = find_attribute(&record.attributes, key) {
                labels.push((label_name(key), value));
            }
        }
        labels.sort();
        labels.dedup_by(|a, b| a.0 == b.0);
        let mut metadata = Vec::new();
        let mut selector = selector_of(&labels);
        let room = (self.config.max_streams as usize).saturating_sub(self.opened);
        if !self.stream_index.contains_key(&selector)
            && !streams.newest.contains_key(&selector)
            && !streams.has_room(room, now_nanos)
        {
            self.prepared.label_overflow += 1;
            let (kept, moved): (Vec<_>, Vec<_>) =
                labels.into_iter().partition(|(name, _)| name == "service_name" || name == "level");
            metadata.extend(moved);
            labels = kept;
            selector = selector_of(&labels);
        }
        let mut line = body_text(record.body.as_ref());
        let trace_id = hex(&record.trace_id);
        let span_id = hex(&record.span_id);
        match self.config.trace_context {
            TraceContextPlacement::StructuredMetadata => {
                if !trace_id.is_empty() {
                    metadata.push(("trace_id".to_owned(), trace_id));
                }
                if !span_id.is_empty() {
                    metadata.push(("span_id".to_owned(), span_id));
                }
            }
            TraceContextPlacement::Line => {
                if !trace_id.is_empty() {
                    line.push_str(" trace_id=");
                    line.push_str(&trace_id);
                }
                if !span_id.is_empty() {
                    line.push_str(" span_id=");
                    line.push_str(&span_id);
                }
            }
        }
        for attribute in &record.attributes {
            if self.config.labels.attributes.contains(&attribute.key) {
                continue;
            }
            if let Some(value) = attribute.value.as_ref() {
                metadata.push((label_name(&attribute.key), any_value_text(value)));
            }
        }
        let stream = match self.stream_index.get(&selector) {
            Some(index) => *index,
            None => {
                let index = self.prepared.streams.len();
                if !streams.newest.contains_key(&selector) {
                    self.opened += 1;
                }
                self.stream_index.insert(selector.clone(), index);
                self.prepared.streams.push(Stream { labels, selector });
                self.per_stream.push(Vec::new());
                index
            }
        };
        let time = if time_unix_nano != 0 { time_unix_nano } else { record.observed_time_unix_nano };
        let unix_nanos = i64::try_from(time).unwrap_or(i64::MAX);
        self.per_stream[stream].push(Entry { stream, unix_nanos, line, metadata });
    }

    /// Orders each stream's entries by time, applies `out_of_order_action` against the stream
    /// table, and records each stream's newest timestamp in it.
    pub fn finish(mut self, streams: &mut StreamTable) -> Prepared {
        for (index, mut entries) in std::mem::take(&mut self.per_stream).into_iter().enumerate() {
            entries.sort_by_key(|entry| entry.unix_nanos);
            let selector = &self.prepared.streams[index].selector;
            let newest_sent = streams.newest.get(selector).copied();
            if let Some(newest) = newest_sent {
                match self.config.out_of_order_action {
                    OutOfOrderAction::Accept => {}
                    OutOfOrderAction::RewriteTimestamp => {
                        for entry in entries.iter_mut().take_while(|e| e.unix_nanos < newest) {
                            entry.unix_nanos = newest;
                            self.prepared.rewritten += 1;
                        }
                    }
                    OutOfOrderAction::Drop => {
                        let before = entries.len();
                        entries.retain(|entry| entry.unix_nanos >= newest);
                        self.prepared.dropped_out_of_order += (before - entries.len()) as u64;
                    }
                }
            }
            if let Some(last) = entries.last().map(|e| e.unix_nanos) {
                let newest = newest_sent.map_or(last, |n| n.max(last));
                streams.newest.insert(selector.clone(), newest);
                streams.dirty.insert(selector.clone(), newest);
            }
            self.prepared.entries.extend(entries);
        }
        self.prepared
    }
}

/// Loki's level for an OTLP severity (its own `detected_level` mapping); the severity text when
/// the number is unset.
pub fn level_of(severity_number: u8, severity_text: &str) -> &'static str {
    match severity_number {
        1..=4 => "trace",
        5..=8 => "debug",
        9..=12 => "info",
        13..=16 => "warn",
        17..=20 => "error",
        21..=24 => "fatal",
        _ => match severity_text.to_ascii_lowercase().as_str() {
            "trace" => "trace",
            "debug" => "debug",
            "info" => "info",
            "warn" | "warning" => "warn",
            "error" | "err" => "error",
            "fatal" | "critical" | "crit" => "fatal",
            _ => "unknown",
        },
    }
}

/// A label name Loki accepts: `[a-zA-Z_][a-zA-Z0-9_]*` (other characters become `_`).
pub fn label_name(key: &str) -> String {
    let mut out: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// `{a="x", b="y"}` with `\`, `"` and newlines escaped.
pub fn selector_of(labels: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (index, (name, value)) in labels.iter().enumerate() {
        if index > 0 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                other => out.push(other),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

fn find_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).map(any_value_text)
}

/// A body as Loki's line: strings as they are, anything else as JSON.
fn body_text(body: Option<&AnyValue>) -> String {
    match body {
        None => String::new(),
        Some(value) => any_value_text(value),
    }
}

fn any_value_text(value: &AnyValue) -> String {
    match value.value.as_ref() {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        _ => any_value_json(value).to_string(),
    }
}

fn any_value_json(value: &AnyValue) -> serde_json::Value {
    use serde_json::Value as Json;
    match value.value.as_ref() {
        None => Json::Null,
        Some(any_value::Value::StringValue(s)) => Json::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Json::Bool(*b),
        Some(any_value::Value::IntValue(i)) => Json::from(*i),
        Some(any_value::Value::DoubleValue(d)) => serde_json::Number::from_f64(*d).map_or(Json::Null, Json::Number),
        Some(any_value::Value::BytesValue(bytes)) => Json::String(hex(bytes)),
        // A reference into a profiles dictionary; logs carry no dictionary.
        Some(any_value::Value::StringValueStrindex(index)) => Json::from(*index),
        Some(any_value::Value::ArrayValue(array)) => Json::Array(array.values.iter().map(any_value_json).collect()),
        Some(any_value::Value::KvlistValue(list)) => Json::Object(
            list.values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(Json::Null, any_value_json)))
                .collect(),
        ),
    }
}

/// Lower-case hex; empty for an empty or all-zero id.
pub fn hex(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| *b == 0) {
        return String::new();
    }
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::logs::v1::LogRecord;
    use tailgate_config::{LokiExporter, OutOfOrderAction};

    use super::*;

    fn config(max_streams: u32, action: OutOfOrderAction) -> LokiExporter {
        let mut config: LokiExporter =
            serde_json::from_value(serde_json::json!({ "endpoint": "http://127.0.0.1:3100/loki/api/v1/push" }))
                .unwrap();
        config.max_streams = max_streams;
        config.out_of_order_action = action;
        config.labels.attributes = vec!["http.route".into()];
        config
    }

    fn record(route: &str, line: &str) -> LogRecord {
        LogRecord {
            body: Some(AnyValue { value: Some(any_value::Value::StringValue(line.into())) }),
            attributes: vec![KeyValue {
                key: "http.route".into(),
                value: Some(AnyValue { value: Some(any_value::Value::StringValue(route.into())) }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn entries_past_max_entry_age_are_dropped_and_counted() {
        let mut config = config(10, OutOfOrderAction::Accept);
        config.max_entry_age = std::time::Duration::from_secs(3600);
        let mut builder = EntryBuilder::new(&config);
        let mut streams = StreamTable::default();
        let now = 10_000_000_000_000i64;
        let hour = 3_600_000_000_000u64;
        builder.add_record("checkout", &[], &record("/a", "old"), 17, now as u64 - 2 * hour, &mut streams, now);
        builder.add_record("checkout", &[], &record("/a", "fresh"), 17, now as u64 - hour / 2, &mut streams, now);
        let prepared = builder.finish(&mut streams);
        assert_eq!((prepared.stale, prepared.entries.len()), (1, 1));
    }

    fn add(builder: &mut EntryBuilder<'_>, streams: &mut StreamTable, route: &str, line: &str, time: u64) {
        builder.add_record("checkout", &[], &record(route, line), 17, time, streams, 10);
    }

    #[test]
    fn streams_past_the_bound_fall_back_to_service_and_level() {
        let config = config(2, OutOfOrderAction::Accept);
        let mut streams = StreamTable::default();
        let mut builder = EntryBuilder::new(&config);
        for (n, route) in ["/a", "/b", "/c", "/d"].iter().enumerate() {
            add(&mut builder, &mut streams, route, &format!("line {n}"), 5);
        }
        let prepared = builder.finish(&mut streams);
        let selectors: Vec<&str> = prepared.streams.iter().map(|s| s.selector.as_str()).collect();
        assert_eq!(
            selectors,
            vec![
                r#"{http_route="/a", level="error", service_name="checkout"}"#,
                r#"{http_route="/b", level="error", service_name="checkout"}"#,
                r#"{level="error", service_name="checkout"}"#,
            ]
        );
        assert_eq!(prepared.label_overflow, 2);
        // The moved label value travels as structured metadata.
        let overflowed = prepared.entries.iter().find(|e| e.line == "line 3").unwrap();
        assert!(overflowed.metadata.contains(&("http_route".to_owned(), "/d".to_owned())));
    }

    #[test]
    fn each_stream_goes_out_in_time_order_across_requests() {
        for (action, expected_times, dropped) in [
            (OutOfOrderAction::RewriteTimestamp, vec![100, 100, 150], 0),
            (OutOfOrderAction::Drop, vec![150], 2),
            (OutOfOrderAction::Accept, vec![50, 90, 150], 0),
        ] {
            let config = config(10, action);
            let mut streams = StreamTable::default();
            let mut first = EntryBuilder::new(&config);
            add(&mut first, &mut streams, "/a", "late", 100);
            add(&mut first, &mut streams, "/a", "early", 60);
            let prepared = first.finish(&mut streams);
            let times: Vec<i64> = prepared.entries.iter().map(|e| e.unix_nanos).collect();
            assert_eq!(times, vec![60, 100], "within a request, oldest first");
            // The stream table is what a restart reads back.
            let changes = streams.take_changes();
            let stored: Vec<(Vec<u8>, Vec<u8>)> = changes.into_iter().map(|(k, v)| (k, v.unwrap().to_vec())).collect();
            let mut restarted = StreamTable::load(stored.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            let mut second = EntryBuilder::new(&config);
            add(&mut second, &mut restarted, "/a", "older", 50);
            add(&mut second, &mut restarted, "/a", "newer", 150);
            add(&mut second, &mut restarted, "/a", "old", 90);
            let prepared = second.finish(&mut restarted);
            let times: Vec<i64> = prepared.entries.iter().map(|e| e.unix_nanos).collect();
            assert_eq!(times, expected_times, "{action:?}");
            assert_eq!(prepared.dropped_out_of_order, dropped);
        }
    }
}
