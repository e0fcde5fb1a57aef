//! One JSON line to one log record: fields found by their aliases, levels and times read the way
//! the usual JSON loggers write them, and every deviation from the expected schema counted
//! ([`Drift`]). A line that is not a JSON object becomes a text record (judged as untraced).

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use prost::Message;
use serde_json::{Map, Value};
use tailgate_config::{FieldAliases, FilelogReceiver, LevelName, LevelNumbers};

use super::drift::Drift;

/// A parsed line, ready for the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// Trace id (zero when absent or malformed).
    pub trace_id: [u8; 16],
    /// Span id (zero when absent or malformed).
    pub span_id: [u8; 8],
    /// OTel severity number (0 unknown).
    pub severity_number: u8,
    /// Duration the line reports, nanoseconds (0 when none).
    pub duration_nanos: u64,
    /// Event time, Unix ns (0: none; the read time is the observed time).
    pub time_unix_nano: u64,
    /// Service named by the line, if any.
    pub service: Option<String>,
    /// The encoded `LogRecord`.
    pub record: Vec<u8>,
}

/// Parses lines of files under one receiver configuration.
#[derive(Debug)]
pub struct LineParser {
    fields: FieldAliases,
    /// Configured level words (lower case) -> severity number.
    extra_levels: Vec<(String, u8)>,
    static_attributes: Vec<KeyValue>,
    include_file_name: bool,
    include_file_path: bool,
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

impl LineParser {
    /// A parser for `config`.
    pub fn new(config: &FilelogReceiver) -> LineParser {
        LineParser {
            fields: config.fields.clone(),
            extra_levels: config
                .fields
                .levels
                .iter()
                .map(|(word, level)| (word.to_ascii_lowercase(), level.severity_number()))
                .collect(),
            static_attributes: config.attributes.iter().map(|(k, v)| string_kv(k, v)).collect(),
            include_file_name: config.include_file_name,
            include_file_path: config.include_file_path,
        }
    }

    /// Parses one line (without its newline) read from `path` at `observed_unix_nano`.
    pub fn parse(&self, line: &str, path: &str, observed_unix_nano: u64, drift: &mut Drift) -> Parsed {
        let mut parsed = Parsed {
            trace_id: [0; 16],
            span_id: [0; 8],
            severity_number: 0,
            duration_nanos: 0,
            time_unix_nano: 0,
            service: None,
            record: Vec::new(),
        };
        let mut severity_text = String::new();
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => {
                self.read_fields(&object, &mut parsed, &mut severity_text, drift);
            }
            _ => drift.count("not_json", None),
        }
        let mut attributes = self.static_attributes.clone();
        if self.include_file_name {
            let name = std::path::Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or(path);
            attributes.push(string_kv("log.file.name", name));
        }
        if self.include_file_path {
            attributes.push(string_kv("log.file.path", path));
        }
        let record = LogRecord {
            time_unix_nano: parsed.time_unix_nano,
            observed_time_unix_nano: observed_unix_nano,
            severity_number: i32::from(parsed.severity_number),
            severity_text,
            body: Some(AnyValue { value: Some(any_value::Value::StringValue(line.to_owned())) }),
            attributes,
            trace_id: if parsed.trace_id == [0; 16] { Vec::new() } else { parsed.trace_id.to_vec() },
            span_id: if parsed.span_id == [0; 8] { Vec::new() } else { parsed.span_id.to_vec() },
            ..Default::default()
        };
        parsed.record = record.encode_to_vec();
        parsed
    }

    fn read_fields(
        &self,
        object: &Map<String, Value>,
        parsed: &mut Parsed,
        severity_text: &mut String,
        drift: &mut Drift,
    ) {
        let fields = &self.fields;
        if let Some(value) = find(object, &fields.trace_id, "trace_id", drift) {
            match value.as_str().and_then(hex_id::<16>) {
                Some(id) => parsed.trace_id = id,
                None => drift.count("malformed_trace_id", None),
            }
        }
        if let Some(value) = find(object, &fields.span_id, "span_id", drift) {
            match value.as_str().and_then(hex_id::<8>) {
                Some(id) => parsed.span_id = id,
                None => drift.count("malformed_span_id", None),
            }
        }
        if let Some(value) = find(object, &fields.level, "level", drift) {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            match self.severity(value) {
                Some(number) => parsed.severity_number = number,
                None => drift.count("unknown_level", Some(&text)),
            }
            *severity_text = text;
        }
        let names: Vec<&str> = fields.duration.iter().map(|d| d.name.as_str()).collect();
        if let Some((position, value)) = find_position(object, &names) {
            if position > 0 {
                drift.count("alias", Some(&format!("duration:{}", names[position])));
            }
            let unit = fields.duration[position].unit;
            match number_of(value) {
                Some(number) if number >= 0.0 => parsed.duration_nanos = (number * unit.nanos()) as u64,
                _ => drift.count("malformed_duration", None),
            }
        } else {
            drift.count("missing", Some("duration"));
        }
        if let Some(value) = find(object, &fields.time, "time", drift) {
            match time_of(value) {
                Some(nanos) => parsed.time_unix_nano = nanos,
                None => drift.count("malformed_time", None),
            }
        }
        let service_names: Vec<&str> = fields.service.iter().map(String::as_str).collect();
        if let Some((_, Value::String(service))) = find_position(object, &service_names) {
            parsed.service = Some(service.clone());
        }
    }

    fn severity(&self, value: &Value) -> Option<u8> {
        match value {
            Value::Number(number) => number.as_u64().and_then(|n| numeric_level(n, self.fields.level_numbers)),
            Value::String(text) => {
                let lower = text.trim().to_ascii_lowercase();
                if let Some((_, number)) = self.extra_levels.iter().find(|(word, _)| *word == lower) {
                    return Some(*number);
                }
                if let Ok(number) = lower.parse::<u64>() {
                    return numeric_level(number, self.fields.level_numbers);
                }
                word_level(&lower)
            }
            _ => None,
        }
    }
}

/// The built-in level words (lower case).
pub fn word_level(word: &str) -> Option<u8> {
    let level = match word {
        "trace" | "trc" | "t" | "verbose" => LevelName::Trace,
        "debug" | "dbg" | "d" => LevelName::Debug,
        "info" | "inf" | "i" | "information" | "informational" | "notice" => LevelName::Info,
        "warn" | "warning" | "wrn" | "w" => LevelName::Warn,
        "error" | "err" | "e" | "eror" => LevelName::Error,
        "crit" | "critical" | "alert" => return Some(18),
        "fatal" | "ftl" | "f" | "panic" | "emerg" | "emergency" => LevelName::Fatal,
        _ => return None,
    };
    Some(level.severity_number())
}

/// A numeric level on the configured scale.
pub fn numeric_level(number: u64, scale: LevelNumbers) -> Option<u8> {
    match scale {
        LevelNumbers::Syslog => match number {
            0 => Some(21),
            1 => Some(19),
            2 => Some(18),
            3 => Some(17),
            4 => Some(13),
            5 => Some(10),
            6 => Some(9),
            7 => Some(5),
            _ => None,
        },
        LevelNumbers::Otel => (1..=24).contains(&number).then_some(number as u8),
        LevelNumbers::Pino => match number {
            10 => Some(1),
            20 => Some(5),
            30 => Some(9),
            40 => Some(13),
            50 => Some(17),
            60 => Some(21),
            _ => None,
        },
    }
}

/// The first alias present; counts a missing field and a field found under a later alias.
fn find<'o>(
    object: &'o Map<String, Value>,
    aliases: &[String],
    field: &'static str,
    drift: &mut Drift,
) -> Option<&'o Value> {
    let names: Vec<&str> = aliases.iter().map(String::as_str).collect();
    match find_position(object, &names) {
        Some((position, value)) => {
            if position > 0 {
                drift.count("alias", Some(&format!("{field}:{}", names[position])));
            }
            Some(value)
        }
        None => {
            drift.count("missing", Some(field));
            None
        }
    }
}

/// The first of `names` present (a dotted name also matches nested objects), with its position.
fn find_position<'o>(object: &'o Map<String, Value>, names: &[&str]) -> Option<(usize, &'o Value)> {
    names.iter().enumerate().find_map(|(position, name)| lookup(object, name).map(|value| (position, value)))
}

fn lookup<'o>(object: &'o Map<String, Value>, name: &str) -> Option<&'o Value> {
    if let Some(value) = object.get(name).filter(|v| !v.is_null()) {
        return Some(value);
    }
    let (head, rest) = name.split_once('.')?;
    match object.get(head)? {
        Value::Object(inner) => lookup(inner, rest),
        _ => None,
    }
}

fn number_of(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// An id of `N` bytes from hex (either case; an all-zero id counts as absent).
pub fn hex_id<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.trim();
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (index, pair) in text.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[index] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    (out != [0u8; N]).then_some(out)
}

/// An event time: RFC 3339 text, or a Unix time whose unit is told by its size (seconds,
/// milliseconds, microseconds or nanoseconds).
pub fn time_of(value: &Value) -> Option<u64> {
    match value {
        Value::Number(number) => match number.as_u64() {
            Some(integer) => unix_integer(integer),
            None => unix_number(number.as_f64()?),
        },
        Value::String(text) => {
            let text = text.trim();
            rfc3339(text).or_else(|| match text.parse::<u64>() {
                Ok(integer) => unix_integer(integer),
                Err(_) => unix_number(text.parse().ok()?),
            })
        }
        _ => None,
    }
}

fn unix_integer(number: u64) -> Option<u64> {
    let nanos = match number {
        0 => return None,
        n if n < 100_000_000_000 => n.checked_mul(1_000_000_000)?,
        n if n < 100_000_000_000_000 => n.checked_mul(1_000_000)?,
        n if n < 100_000_000_000_000_000 => n.checked_mul(1_000)?,
        n => n,
    };
    Some(nanos)
}

fn unix_number(number: f64) -> Option<u64> {
    if number.is_nan() || number <= 0.0 {
        return None;
    }
    let nanos = if number < 1e11 {
        number * 1e9
    } else if number < 1e14 {
        number * 1e6
    } else if number < 1e17 {
        number * 1e3
    } else {
        number
    };
    Some(nanos as u64)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` (a space instead of `T` too).
pub fn rfc3339(text: &str) -> Option<u64> {
    let bytes = text.trim().as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = bytes.get(range)?;
        digits.iter().all(u8::is_ascii_digit).then(|| digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    if bytes.get(4) != Some(&b'-') || bytes.get(7) != Some(&b'-') || !matches!(bytes.get(10), Some(b'T' | b't' | b' '))
    {
        return None;
    }
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut at = 19;
    let mut nanos = 0i64;
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        let mut scale = 100_000_000i64;
        while let Some(digit) = bytes.get(at).filter(|d| d.is_ascii_digit()) {
            nanos += i64::from(digit - b'0') * scale;
            scale /= 10;
            at += 1;
        }
    }
    let offset_seconds = match bytes.get(at) {
        Some(b'Z' | b'z') if at + 1 == bytes.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == bytes.len() => {
            let minutes = number(at + 1..at + 3)? * 60 + number(at + 4..at + 6)?;
            if *sign == b'+' { minutes * 60 } else { -minutes * 60 }
        }
        _ => return None,
    };
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    u64::try_from(seconds.checked_mul(1_000_000_000)?.checked_add(nanos)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> LineParser {
        let config: FilelogReceiver = serde_json::from_value(serde_json::json!({ "include": ["/x/*.log"] })).unwrap();
        LineParser::new(&config)
    }

    #[test]
    fn the_field_reports_drift_cases_are_handled_by_the_defaults() {
        let mut drift = Drift::default();
        let line =
            r#"{"msg":"db timeout","level":"ERR","duration_ms":350,"trace_id":"0af7651916cd43dd8448eb211c80319c"}"#;
        let parsed = parser().parse(line, "/x/a.log", 1, &mut drift);
        assert_eq!(parsed.severity_number, 17);
        assert_eq!(parsed.duration_nanos, 350_000_000);
        assert_eq!(parsed.trace_id[0], 0x0a);
        // `duration` (not the first alias) is handled and counted as drift.
        let mut drift = Drift::default();
        let parsed = parser().parse(r#"{"level":"info","duration":12.5}"#, "/x/a.log", 1, &mut drift);
        assert_eq!((parsed.severity_number, parsed.duration_nanos), (9, 12_500_000));
        assert_eq!(drift.get("alias", "duration:duration"), 1);
        assert_eq!(drift.get("missing", "trace_id"), 1);
    }

    #[test]
    fn unknown_levels_are_counted_with_their_value_and_the_line_still_judged() {
        let mut drift = Drift::default();
        let parsed = parser().parse(r#"{"level":"SEVERE","duration_ms":900}"#, "/x/a.log", 1, &mut drift);
        assert_eq!(parsed.severity_number, 0);
        assert_eq!(parsed.duration_nanos, 900_000_000, "the duration still judges the line");
        assert_eq!(drift.get("unknown_level", "SEVERE"), 1);
    }

    #[test]
    fn a_line_that_is_not_json_is_kept_as_text_and_counted() {
        let mut drift = Drift::default();
        let parsed = parser().parse("panic: runtime error", "/x/a.log", 7, &mut drift);
        assert_eq!(drift.get("not_json", ""), 1);
        let record = LogRecord::decode(parsed.record.as_slice()).unwrap();
        let body = record.body.and_then(|b| b.value);
        assert_eq!(body, Some(any_value::Value::StringValue("panic: runtime error".into())));
        assert_eq!(record.observed_time_unix_nano, 7);
    }

    #[test]
    fn levels_times_and_ids_in_their_usual_spellings() {
        for (word, number) in [("E", 17), ("error", 17), ("ERROR", 17), ("fatal", 21), ("crit", 18), ("WARNING", 13)] {
            assert_eq!(parser().severity(&Value::String(word.into())), Some(number), "{word}");
        }
        assert_eq!(numeric_level(3, LevelNumbers::Syslog), Some(17));
        assert_eq!(numeric_level(50, LevelNumbers::Pino), Some(17));
        assert_eq!(numeric_level(17, LevelNumbers::Otel), Some(17));
        assert_eq!(rfc3339("1970-01-01T00:00:01Z"), Some(1_000_000_000));
        assert_eq!(rfc3339("2024-02-29T12:00:00.5+01:00"), Some(1_709_204_400_500_000_000));
        assert_eq!(time_of(&serde_json::json!(1_709_204_400_123u64)), Some(1_709_204_400_123_000_000));
        assert_eq!(hex_id::<8>("00F067AA0BA902B7"), Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]));
        assert_eq!(hex_id::<8>("00000000000000000"), None);
        assert_eq!(hex_id::<16>("00000000000000000000000000000000"), None);
        let mut drift = Drift::default();
        let nested = r#"{"trace":{"id":"0af7651916cd43dd8448eb211c80319c"},"lvl":"warn","elapsed_ms":"3"}"#;
        let parsed = parser().parse(nested, "/x/a.log", 1, &mut drift);
        assert_eq!((parsed.trace_id[15], parsed.severity_number, parsed.duration_nanos), (0x9c, 13, 3_000_000));
        let mut drift = Drift::default();
        parser().parse(r#"{"trace_id":"xyz","level":"info"}"#, "/x/a.log", 1, &mut drift);
        assert_eq!(drift.get("malformed_trace_id", ""), 1);
    }
}
