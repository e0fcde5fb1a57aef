//! One JSON line to one log record: fields found by their aliases, levels and times read the way
//! the usual JSON loggers write them, and every deviation from the expected schema counted
//! ([`Drift`]). A line that is not a JSON object becomes a text record (judged as untraced).

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use tailgate_config::{FieldAliases, FilelogReceiver, LevelName, LevelNumbers};

use super::drift::Drift;

/// A parsed line, ready for the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed<'a> {
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
    pub service: Option<Cow<'a, str>>,
    /// The encoded `LogRecord`.
    pub record: Vec<u8>,
}

/// Parses lines of files under one receiver configuration.
#[derive(Debug)]
pub struct LineParser {
    fields: FieldAliases,
    /// Configured level words (lower case) -> severity number.
    extra_levels: Vec<(String, u8)>,
    /// The configured `attributes`, encoded once as `LogRecord.attributes` entries.
    static_attributes: Vec<u8>,
    include_file_name: bool,
    include_file_path: bool,
}

/// A JSON value the parser looked at, borrowed from the line where it has no escapes.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    /// A string, unescaped.
    Text(Cow<'a, str>),
    /// A number, as written.
    Number(&'a str),
    /// Anything else (`true`, an object, an array), as written.
    Other(&'a str),
}

impl<'a> Field<'a> {
    fn of(raw: &'a RawValue) -> Option<Field<'a>> {
        let text = raw.get();
        match text.as_bytes().first()? {
            b'"' => serde_json::from_str::<Text<'a>>(text).ok().map(|t| Field::Text(t.0)),
            b'-' | b'0'..=b'9' => Some(Field::Number(text)),
            _ => Some(Field::Other(text)),
        }
    }

    fn number(&self) -> Option<f64> {
        match self {
            Field::Number(text) => text.parse().ok(),
            Field::Text(text) => text.trim().parse().ok(),
            Field::Other(_) => None,
        }
    }

    fn text(&self) -> &str {
        match self {
            Field::Text(text) => text,
            Field::Number(text) | Field::Other(text) => text,
        }
    }
}

/// A JSON string, borrowed unless it has escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }
            fn visit_string<E>(self, text: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// The members of one JSON object, keys and values borrowed from the line: values are
/// validated but only decoded when a field is looked up ([`Field::of`]).
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members<'de>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some((key, value)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    members.push((key.0, value));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

impl<'a> Members<'a> {
    /// The value of `name` (the last one, if the line repeats it), `null` counting as absent; a
    /// dotted name also matches nested objects.
    fn lookup(&self, name: &str) -> Option<Field<'a>> {
        let member = |key: &str| self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v);
        if let Some(raw) = member(name).filter(|raw| raw.get() != "null") {
            return Field::of(raw);
        }
        let (head, rest) = name.split_once('.')?;
        let raw = member(head).filter(|raw| raw.get().starts_with('{'))?;
        serde_json::from_str::<Members<'a>>(raw.get()).ok()?.lookup(rest)
    }

    /// The first alias present; counts a missing field and a field found under a later alias.
    fn find(&self, aliases: &[String], field: &'static str, drift: &mut Drift) -> Option<Field<'a>> {
        let found =
            aliases.iter().enumerate().find_map(|(position, name)| self.lookup(name).map(|value| (position, value)));
        match found {
            Some((position, value)) => {
                if position > 0 {
                    drift.count("alias", Some(&format!("{field}:{}", aliases[position])));
                }
                Some(value)
            }
            None => {
                drift.count("missing", Some(field));
                None
            }
        }
    }
}

/// Protobuf encoding of the `LogRecord` fields the parser writes (field numbers from
/// opentelemetry/proto/logs/v1/logs.proto; the output is what prost encodes for the same
/// message, pinned by a test).
mod wire {
    use prost::encoding::{encode_varint, encoded_len_varint};

    pub const TIME_UNIX_NANO: u64 = 1 << 3 | 1;
    pub const SEVERITY_NUMBER: u64 = 2 << 3;
    pub const SEVERITY_TEXT: u64 = 3 << 3 | 2;
    pub const BODY: u64 = 5 << 3 | 2;
    pub const ATTRIBUTES: u64 = 6 << 3 | 2;
    pub const TRACE_ID: u64 = 9 << 3 | 2;
    pub const SPAN_ID: u64 = 10 << 3 | 2;
    pub const OBSERVED_TIME_UNIX_NANO: u64 = 11 << 3 | 1;
    /// `KeyValue.key`, `KeyValue.value`, `AnyValue.string_value`.
    const KEY: u64 = 1 << 3 | 2;
    const VALUE: u64 = 2 << 3 | 2;
    const STRING_VALUE: u64 = 1 << 3 | 2;

    pub fn bytes(out: &mut Vec<u8>, tag: u64, value: &[u8]) {
        encode_varint(tag, out);
        encode_varint(value.len() as u64, out);
        out.extend_from_slice(value);
    }

    pub fn fixed64(out: &mut Vec<u8>, tag: u64, value: u64) {
        encode_varint(tag, out);
        out.extend_from_slice(&value.to_le_bytes());
    }

    /// Length of an `AnyValue` holding a string.
    fn any_string_len(value: &str) -> usize {
        1 + encoded_len_varint(value.len() as u64) + value.len()
    }

    /// An `AnyValue` with a string, as field `tag`.
    pub fn any_string(out: &mut Vec<u8>, tag: u64, value: &str) {
        encode_varint(tag, out);
        encode_varint(any_string_len(value) as u64, out);
        bytes(out, STRING_VALUE, value.as_bytes());
    }

    /// A `KeyValue` with a string value, as an entry of `LogRecord.attributes` (an empty key
    /// is left out, as protobuf leaves out empty strings).
    pub fn string_attribute(out: &mut Vec<u8>, key: &str, value: &str) {
        let value_len = any_string_len(value);
        let key_len = if key.is_empty() { 0 } else { 1 + encoded_len_varint(key.len() as u64) + key.len() };
        let len = key_len + 1 + encoded_len_varint(value_len as u64) + value_len;
        encode_varint(ATTRIBUTES, out);
        encode_varint(len as u64, out);
        if !key.is_empty() {
            bytes(out, KEY, key.as_bytes());
        }
        any_string(out, VALUE, value);
    }
}

impl LineParser {
    /// A parser for `config`.
    pub fn new(config: &FilelogReceiver) -> LineParser {
        let mut static_attributes = Vec::new();
        for (key, value) in &config.attributes {
            wire::string_attribute(&mut static_attributes, key, value);
        }
        LineParser {
            fields: config.fields.clone(),
            extra_levels: config
                .fields
                .levels
                .iter()
                .map(|(word, level)| (word.to_ascii_lowercase(), level.severity_number()))
                .collect(),
            static_attributes,
            include_file_name: config.include_file_name,
            include_file_path: config.include_file_path,
        }
    }

    /// The attributes every record read from `path` carries, encoded: the configured
    /// `attributes`, then `log.file.name` and `log.file.path` when included. The tailer encodes
    /// them once per file and read, not once per line.
    pub fn file_attributes(&self, path: &str) -> Vec<u8> {
        let mut out = self.static_attributes.clone();
        if self.include_file_name {
            let name = std::path::Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or(path);
            wire::string_attribute(&mut out, "log.file.name", name);
        }
        if self.include_file_path {
            wire::string_attribute(&mut out, "log.file.path", path);
        }
        out
    }

    /// Parses one line (without its newline) read from `path` at `observed_unix_nano`.
    pub fn parse<'a>(&self, line: &'a str, path: &str, observed_unix_nano: u64, drift: &mut Drift) -> Parsed<'a> {
        self.parse_with(line, &self.file_attributes(path), observed_unix_nano, drift)
    }

    /// [`LineParser::parse`] with the file's attributes already encoded
    /// ([`LineParser::file_attributes`]).
    pub fn parse_with<'a>(
        &self,
        line: &'a str,
        attributes: &[u8],
        observed_unix_nano: u64,
        drift: &mut Drift,
    ) -> Parsed<'a> {
        let mut parsed = Parsed {
            trace_id: [0; 16],
            span_id: [0; 8],
            severity_number: 0,
            duration_nanos: 0,
            time_unix_nano: 0,
            service: None,
            record: Vec::new(),
        };
        let mut severity_text = Cow::Borrowed("");
        match serde_json::from_str::<Members<'a>>(line) {
            Ok(members) => self.read_fields(&members, &mut parsed, &mut severity_text, drift),
            Err(_) => drift.count("not_json", None),
        }
        let out = &mut parsed.record;
        out.reserve(line.len() + severity_text.len() + attributes.len() + 96);
        if parsed.time_unix_nano != 0 {
            wire::fixed64(out, wire::TIME_UNIX_NANO, parsed.time_unix_nano);
        }
        if parsed.severity_number != 0 {
            prost::encoding::encode_varint(wire::SEVERITY_NUMBER, out);
            prost::encoding::encode_varint(u64::from(parsed.severity_number), out);
        }
        if !severity_text.is_empty() {
            wire::bytes(out, wire::SEVERITY_TEXT, severity_text.as_bytes());
        }
        wire::any_string(out, wire::BODY, line);
        out.extend_from_slice(attributes);
        if parsed.trace_id != [0; 16] {
            wire::bytes(out, wire::TRACE_ID, &parsed.trace_id);
        }
        if parsed.span_id != [0; 8] {
            wire::bytes(out, wire::SPAN_ID, &parsed.span_id);
        }
        if observed_unix_nano != 0 {
            wire::fixed64(out, wire::OBSERVED_TIME_UNIX_NANO, observed_unix_nano);
        }
        parsed
    }

    fn read_fields<'a>(
        &self,
        members: &Members<'a>,
        parsed: &mut Parsed<'a>,
        severity_text: &mut Cow<'a, str>,
        drift: &mut Drift,
    ) {
        let fields = &self.fields;
        if let Some(value) = members.find(&fields.trace_id, "trace_id", drift) {
            match hex_id::<16>(value.text()) {
                Some(id) if matches!(value, Field::Text(_)) => parsed.trace_id = id,
                _ => drift.count("malformed_trace_id", None),
            }
        }
        if let Some(value) = members.find(&fields.span_id, "span_id", drift) {
            match hex_id::<8>(value.text()) {
                Some(id) if matches!(value, Field::Text(_)) => parsed.span_id = id,
                _ => drift.count("malformed_span_id", None),
            }
        }
        if let Some(value) = members.find(&fields.level, "level", drift) {
            match self.severity(&value) {
                Some(number) => parsed.severity_number = number,
                None => drift.count("unknown_level", Some(value.text())),
            }
            *severity_text = match value {
                Field::Text(text) => text,
                Field::Number(text) | Field::Other(text) => Cow::Borrowed(text),
            };
        }
        let duration = fields
            .duration
            .iter()
            .enumerate()
            .find_map(|(position, alias)| members.lookup(&alias.name).map(|value| (position, value)));
        if let Some((position, value)) = duration {
            if position > 0 {
                drift.count("alias", Some(&format!("duration:{}", fields.duration[position].name)));
            }
            let unit = fields.duration[position].unit;
            match value.number() {
                Some(number) if number >= 0.0 => parsed.duration_nanos = (number * unit.nanos()) as u64,
                _ => drift.count("malformed_duration", None),
            }
        } else {
            drift.count("missing", Some("duration"));
        }
        if let Some(value) = members.find(&fields.time, "time", drift) {
            match time_of(&value) {
                Some(nanos) => parsed.time_unix_nano = nanos,
                None => drift.count("malformed_time", None),
            }
        }
        let service = fields.service.iter().find_map(|name| members.lookup(name));
        if let Some(Field::Text(service)) = service {
            parsed.service = Some(service);
        }
    }

    fn severity(&self, value: &Field<'_>) -> Option<u8> {
        match value {
            Field::Number(text) => text.parse::<u64>().ok().and_then(|n| numeric_level(n, self.fields.level_numbers)),
            Field::Text(text) => {
                let lower = text.trim().to_ascii_lowercase();
                if let Some((_, number)) = self.extra_levels.iter().find(|(word, _)| *word == lower) {
                    return Some(*number);
                }
                if let Ok(number) = lower.parse::<u64>() {
                    return numeric_level(number, self.fields.level_numbers);
                }
                word_level(&lower)
            }
            Field::Other(_) => None,
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
pub fn time_of(value: &Field<'_>) -> Option<u64> {
    let text = match value {
        Field::Number(text) => *text,
        Field::Text(text) => {
            let text = text.trim();
            if let Some(nanos) = rfc3339(text) {
                return Some(nanos);
            }
            text
        }
        Field::Other(_) => return None,
    };
    match text.parse::<u64>() {
        Ok(integer) => unix_integer(integer),
        Err(_) => unix_number(text.parse().ok()?),
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
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::logs::v1::LogRecord;
    use prost::Message;

    fn text(value: &str) -> Field<'_> {
        Field::Text(Cow::Borrowed(value))
    }

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
            assert_eq!(parser().severity(&text(word)), Some(number), "{word}");
        }
        assert_eq!(numeric_level(3, LevelNumbers::Syslog), Some(17));
        assert_eq!(numeric_level(50, LevelNumbers::Pino), Some(17));
        assert_eq!(numeric_level(17, LevelNumbers::Otel), Some(17));
        assert_eq!(rfc3339("1970-01-01T00:00:01Z"), Some(1_000_000_000));
        assert_eq!(rfc3339("2024-02-29T12:00:00.5+01:00"), Some(1_709_204_400_500_000_000));
        assert_eq!(time_of(&Field::Number("1709204400123")), Some(1_709_204_400_123_000_000));
        assert_eq!(time_of(&Field::Number("1709204400.5")), Some(1_709_204_400_500_000_000));
        assert_eq!(time_of(&text("2024-02-29T12:00:00.5+01:00")), Some(1_709_204_400_500_000_000));
        assert_eq!(time_of(&Field::Other("true")), None);
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

    /// The record written on the wire is the `LogRecord` prost encodes for the same fields: the
    /// hand-written encoder leaves out nothing and orders the fields as the schema does.
    #[test]
    fn records_encode_as_the_protobuf_schema_does() {
        let config: FilelogReceiver = serde_json::from_value(serde_json::json!({
            "include": ["/x/*.log"],
            "attributes": {"env": "edge", "node": "n1"},
            "include_file_name": true,
            "include_file_path": true,
        }))
        .unwrap();
        let parser = LineParser::new(&config);
        let kv = |key: &str, value: &str| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
            ..Default::default()
        };
        let lines = [
            r#"{"time":"2024-02-29T12:00:00Z","level":"warn","trace_id":"0af7651916cd43dd8448eb211c80319c","span_id":"00f067aa0ba902b7","duration_ms":3,"msg":"\u00e9t\u00e9 \"quoted\""}"#,
            r#"{"level":6,"duration_ms":1.5,"service":"orders"}"#,
            "not json at all",
            "",
        ];
        for line in lines {
            let mut drift = Drift::default();
            let parsed = parser.parse(line, "/x/app.log", 1_700_000_000_000_000_000, &mut drift);
            let mut attributes = vec![kv("env", "edge"), kv("node", "n1")];
            attributes.push(kv("log.file.name", "app.log"));
            attributes.push(kv("log.file.path", "/x/app.log"));
            let expected = LogRecord {
                time_unix_nano: parsed.time_unix_nano,
                observed_time_unix_nano: 1_700_000_000_000_000_000,
                severity_number: i32::from(parsed.severity_number),
                severity_text: LogRecord::decode(parsed.record.as_slice()).unwrap().severity_text,
                body: Some(AnyValue { value: Some(any_value::Value::StringValue(line.into())) }),
                attributes,
                trace_id: if parsed.trace_id == [0; 16] { Vec::new() } else { parsed.trace_id.to_vec() },
                span_id: if parsed.span_id == [0; 8] { Vec::new() } else { parsed.span_id.to_vec() },
                ..Default::default()
            };
            assert_eq!(parsed.record, expected.encode_to_vec(), "{line}");
        }
        let mut drift = Drift::default();
        let parsed = parser.parse(lines[0], "/x/app.log", 1, &mut drift);
        let record = LogRecord::decode(parsed.record.as_slice()).unwrap();
        assert_eq!((record.severity_text.as_str(), record.severity_number), ("warn", 13));
        assert_eq!(record.time_unix_nano, 1_709_208_000_000_000_000);
        let parsed = parser.parse(lines[1], "/x/app.log", 1, &mut drift);
        let record = LogRecord::decode(parsed.record.as_slice()).unwrap();
        assert_eq!((record.severity_text.as_str(), record.severity_number), ("6", 9), "syslog info, as written");
        assert_eq!(parsed.service.as_deref(), Some("orders"));
    }

    #[test]
    fn escaped_keys_and_values_and_repeated_keys_are_read_as_json_means_them() {
        let mut drift = Drift::default();
        let line = r#"{"lev\u0065l":"\u0045RROR","trace_id":"0000","trace_id":"0af7651916cd43dd8448eb211c80319c","trace":null,"duration_ms":null,"elapsed_ms":"2"}"#;
        let parsed = parser().parse(line, "/x/a.log", 1, &mut drift);
        assert_eq!(parsed.severity_number, 17, "escaped key and value");
        assert_eq!(parsed.trace_id[0], 0x0a, "the last of repeated keys counts");
        assert_eq!(parsed.duration_nanos, 2_000_000, "null counts as absent");
        assert_eq!(drift.get("alias", "duration:elapsed_ms"), 1);
        for not_an_object in ["[1,2]", "\"text\"", "{\"a\":1} trailing", "{\"a\":}"] {
            let mut drift = Drift::default();
            parser().parse(not_an_object, "/x/a.log", 1, &mut drift);
            assert_eq!(drift.get("not_json", ""), 1, "{not_an_object}");
        }
    }
}
