//! Attribute lookups on encoded spans, resources and log records, in place (no decode): what
//! the sampling policies and the log file's duration fields read, and the one field rewrite
//! tail_sample makes (a kept span's `trace_state`).

use super::wire;

/// `Span.attributes` field number.
pub const SPAN_ATTRIBUTES: u32 = 9;
/// Field number of `Span.trace_state`.
pub const SPAN_TRACE_STATE: u32 = 3;
/// `Resource.attributes` field number.
pub const RESOURCE_ATTRIBUTES: u32 = 1;
/// `LogRecord.attributes` field number.
pub const LOG_RECORD_ATTRIBUTES: u32 = 6;

/// An attribute value found by [`find_attribute`] (only the kinds policies compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeValue<'a> {
    /// `AnyValue.string_value`.
    Str(&'a str),
    /// `AnyValue.int_value`.
    Int(i64),
    /// Any other kind.
    Other,
}

/// Finds attribute `key` among the `KeyValue`s at field `attributes_field` of an encoded message
/// (`Span`: 9, `Resource`: 1) without decoding it: walks the fields and compares keys in
/// place. `None` when absent or the bytes do not parse.
pub fn find_attribute<'a>(message: &'a [u8], attributes_field: u32, key: &str) -> Option<AttributeValue<'a>> {
    let mut found = [None];
    find_attributes(message, attributes_field, &[key], &mut found);
    found[0]
}

/// Finds several attributes in one walk: `found[i]` receives the first value of `keys[i]`
/// (left as it is when absent). The walk stops once every key has a value; a value is decoded
/// only when its key is wanted. Bytes that do not parse end the walk with what was found.
pub fn find_attributes<'a, K: AsRef<str>>(
    message: &'a [u8],
    attributes_field: u32,
    keys: &[K],
    found: &mut [Option<AttributeValue<'a>>],
) {
    let _ = walk_attributes(message, attributes_field, keys, found);
}

fn walk_attributes<'a, K: AsRef<str>>(
    message: &'a [u8],
    attributes_field: u32,
    keys: &[K],
    found: &mut [Option<AttributeValue<'a>>],
) -> Option<()> {
    let mut missing = found.iter().take(keys.len()).filter(|f| f.is_none()).count();
    let mut reader = wire::Reader::new(message);
    while missing > 0 && !reader.is_done() {
        let (number, wire_type, at) = reader.key().ok()?;
        if number != attributes_field || wire_type != 2 {
            reader.skip(wire_type, at).ok()?;
            continue;
        }
        let entry = reader.len_delimited(at).ok()?;
        let (mut found_key, mut value) = (None, None);
        let mut fields = wire::Reader::new(entry);
        while !fields.is_done() {
            let (number, wire_type, at) = fields.key().ok()?;
            match (number, wire_type) {
                (1, 2) => found_key = Some(fields.len_delimited(at).ok()?),
                (2, 2) => value = Some(fields.len_delimited(at).ok()?),
                _ => fields.skip(wire_type, at).ok()?,
            }
        }
        let Some(found_key) = found_key else { continue };
        let Some(slot) = keys
            .iter()
            .zip(found.iter_mut())
            .find_map(|(key, slot)| (slot.is_none() && key.as_ref().as_bytes() == found_key).then_some(slot))
        else {
            continue;
        };
        *slot = Some(any_value(value.unwrap_or_default())?);
        missing -= 1;
    }
    Some(())
}

/// Rewrites string field `number` of an encoded message without decoding the rest: every
/// occurrence is left out and one field holding `rewrite(last value or "")` is written after
/// the other fields (protobuf reads fields in any order; the last value of a singular field
/// wins, and there is only one). `reserve` more bytes are reserved for the caller to append.
/// `None` when the message does not parse or the value is not UTF-8.
pub fn with_string_field(
    message: &[u8],
    number: u32,
    reserve: usize,
    rewrite: impl FnOnce(&str) -> String,
) -> Option<Vec<u8>> {
    let base = message.as_ptr() as usize;
    let mut reader = wire::Reader::new(message);
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut last = "";
    while !reader.is_done() {
        let (found, wire_type, at) = reader.key().ok()?;
        if found == number && wire_type == 2 {
            last = std::str::from_utf8(reader.len_delimited(at).ok()?).ok()?;
            cuts.push((at - base, message.len() - reader.remaining()));
        } else {
            reader.skip(wire_type, at).ok()?;
        }
    }
    let value = rewrite(last);
    let mut out = Vec::with_capacity(message.len() + value.len() + 12 + reserve);
    let mut from = 0;
    for (start, end) in cuts {
        out.extend_from_slice(&message[from..start]);
        from = end;
    }
    out.extend_from_slice(&message[from..]);
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value.as_bytes());
    Some(out)
}

/// An encoded `AnyValue` as far as policies compare it.
fn any_value(value: &[u8]) -> Option<AttributeValue<'_>> {
    let mut any = wire::Reader::new(value);
    let mut result = AttributeValue::Other;
    while !any.is_done() {
        let (number, wire_type, at) = any.key().ok()?;
        match (number, wire_type) {
            (1, 2) => {
                result =
                    std::str::from_utf8(any.len_delimited(at).ok()?).map_or(AttributeValue::Other, AttributeValue::Str)
            }
            (3, 0) => result = AttributeValue::Int(any.varint().ok()? as i64),
            _ => {
                any.skip(wire_type, at).ok()?;
                result = AttributeValue::Other;
            }
        }
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn attributes_are_found_in_place_and_bad_bytes_find_nothing() {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        use opentelemetry_proto::tonic::trace::v1::Span;
        let kv = |key: &str, value: Value| opentelemetry_proto::tonic::common::v1::KeyValue {
            key: key.into(),
            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue { value: Some(value) }),
            ..Default::default()
        };
        let span_message = Span {
            name: "GET".into(),
            attributes: vec![
                kv("http.route", Value::StringValue("/checkout".into())),
                kv("retries", Value::IntValue(-3)),
                kv("ok", Value::BoolValue(true)),
            ],
            ..Default::default()
        };
        let span = span_message.encode_to_vec();
        assert_eq!(find_attribute(&span, 9, "http.route"), Some(AttributeValue::Str("/checkout")));
        assert_eq!(find_attribute(&span, 9, "retries"), Some(AttributeValue::Int(-3)));
        assert_eq!(find_attribute(&span, 9, "ok"), Some(AttributeValue::Other));
        assert_eq!(find_attribute(&span, 9, "missing"), None);
        for cut in 0..span.len() {
            // Truncated bytes never panic; they find the key only if it lies before the cut.
            let _ = find_attribute(&span[..cut], 9, "retries");
        }
        assert_eq!(find_attribute(&[0xff, 0xff, 0xff], 9, "http.route"), None);
        // A string field rewritten in place of every occurrence, the rest of the bytes kept.
        let with_state = Span { trace_state: "a=1".into(), ..span_message.clone() }.encode_to_vec();
        let rewritten = with_string_field(&with_state, 3, 0, |old| format!("ot=th:8,{old}")).unwrap();
        let decoded = Span::decode(rewritten.as_slice()).unwrap();
        assert_eq!(decoded.trace_state, "ot=th:8,a=1");
        assert_eq!(decoded.attributes, span_message.attributes);
        let mut twice = with_state.clone();
        twice.extend_from_slice(&Span { trace_state: "b=2".into(), ..Default::default() }.encode_to_vec());
        let rewritten = with_string_field(&twice, 3, 0, |old| format!("[{old}]")).unwrap();
        assert_eq!(Span::decode(rewritten.as_slice()).unwrap().trace_state, "[b=2]");
        assert_eq!(rewritten.windows(3).filter(|w| *w == b"a=1").count(), 0);
        let rewritten = with_string_field(&span, 3, 0, |old| format!("[{old}]")).unwrap();
        assert_eq!(Span::decode(rewritten.as_slice()).unwrap().trace_state, "[]");
        assert_eq!(with_string_field(&[0xff, 0xff, 0xff], 3, 0, |_| String::new()), None);
        // Several keys in one walk; a slot already filled (a span's own value) is left alone.
        let mut found = [None, Some(AttributeValue::Int(7)), None];
        find_attributes(&span, 9, &["retries", "http.route", "missing"], &mut found);
        assert_eq!(found, [Some(AttributeValue::Int(-3)), Some(AttributeValue::Int(7)), None]);
        let mut found = [None, None];
        find_attributes(&span, 9, &["ok", "http.route"], &mut found);
        assert_eq!(found, [Some(AttributeValue::Other), Some(AttributeValue::Str("/checkout"))]);
    }
}
