//! Series identity and durable series state.
//!
//! A series key is encoded with a length before every text field, so no two different series
//! share an encoding (names may hold any byte, NUL included). The state of a series (start time,
//! last update, calls, duration sum and bucket counts) lives in the queue's `state` table under
//! `spanmetrics/series/<key>`; the number of series is bounded by the cardinality limit and
//! series idle for `metrics_expiration` are deleted.

/// State key prefix of the series.
pub const SERIES_PREFIX: &[u8] = b"spanmetrics/series/";

/// The identity of one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    /// `service.name`.
    pub service: String,
    /// Span name.
    pub span_name: String,
    /// OTLP span kind number.
    pub kind: u8,
    /// OTLP status code number.
    pub status: u8,
    /// Configured dimensions that have a value: (name, value).
    pub dimensions: Vec<(String, String)>,
    /// The overflow series (every other field empty).
    pub overflow: bool,
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn take_text<'a>(raw: &mut &'a [u8]) -> Option<&'a str> {
    let length = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?) as usize;
    let text = std::str::from_utf8(raw.get(4..4 + length)?).ok()?;
    *raw = &raw[4 + length..];
    Some(text)
}

impl SeriesKey {
    /// The overflow series.
    pub fn overflow() -> SeriesKey {
        SeriesKey {
            service: String::new(),
            span_name: String::new(),
            kind: 0,
            status: 0,
            dimensions: Vec::new(),
            overflow: true,
        }
    }

    /// The state key.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = SERIES_PREFIX.to_vec();
        out.extend_from_slice(&[u8::from(self.overflow), self.kind, self.status]);
        put_text(&mut out, &self.service);
        put_text(&mut out, &self.span_name);
        out.push(self.dimensions.len() as u8);
        for (name, value) in &self.dimensions {
            put_text(&mut out, name);
            put_text(&mut out, value);
        }
        out
    }

    /// Reads a state key back.
    pub fn decode(key: &[u8]) -> Option<SeriesKey> {
        let mut raw = key.strip_prefix(SERIES_PREFIX)?;
        let (&[overflow, kind, status], rest) = raw.split_first_chunk::<3>()?;
        raw = rest;
        let service = take_text(&mut raw)?.to_owned();
        let span_name = take_text(&mut raw)?.to_owned();
        let (&count, rest) = raw.split_first()?;
        raw = rest;
        let mut dimensions = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name = take_text(&mut raw)?.to_owned();
            let value = take_text(&mut raw)?.to_owned();
            dimensions.push((name, value));
        }
        raw.is_empty().then_some(SeriesKey { service, span_name, kind, status, dimensions, overflow: overflow == 1 })
    }
}

/// Cumulative values of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesState {
    /// When the series started counting, Unix ns (the start time of its cumulative points).
    pub start_unix_nano: u64,
    /// When a span was last counted in it, Unix ns.
    pub last_seen_unix_nano: u64,
    /// Calls.
    pub calls: u64,
    /// Sum of durations, ms.
    pub sum_ms: f64,
    /// Per bucket (one more than bounds: the last is +Inf).
    pub buckets: Vec<u64>,
}

impl SeriesState {
    /// A new series with `buckets` buckets.
    pub fn new(now_unix_nano: u64, buckets: usize) -> SeriesState {
        SeriesState {
            start_unix_nano: now_unix_nano,
            last_seen_unix_nano: now_unix_nano,
            calls: 0,
            sum_ms: 0.0,
            buckets: vec![0; buckets],
        }
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.buckets.len() * 8);
        for word in [self.start_unix_nano, self.last_seen_unix_nano, self.calls, self.sum_ms.to_bits()] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        for count in &self.buckets {
            out.extend_from_slice(&count.to_be_bytes());
        }
        out
    }

    /// Reads the stored form; `None` when it does not have `buckets` buckets (bounds changed:
    /// the series starts over).
    pub fn decode(raw: &[u8], buckets: usize) -> Option<SeriesState> {
        if raw.len() != 32 + buckets * 8 {
            return None;
        }
        let word = |index: usize| u64::from_be_bytes(raw[index * 8..index * 8 + 8].try_into().unwrap_or_default());
        Some(SeriesState {
            start_unix_nano: word(0),
            last_seen_unix_nano: word(1),
            calls: word(2),
            sum_ms: f64::from_bits(word(3)),
            buckets: (0..buckets).map(|b| word(4 + b)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_nul_bytes_never_collide() {
        let key = |service: &str, name: &str| SeriesKey {
            service: service.into(),
            span_name: name.into(),
            kind: 2,
            status: 0,
            dimensions: vec![("http.method".into(), "GET".into())],
            overflow: false,
        };
        // With NUL-joined fields these two encoded identically.
        let (a, b) = (key("a\0b", "c"), key("a", "b\0c"));
        assert_ne!(a.encode(), b.encode());
        assert_eq!(SeriesKey::decode(&a.encode()), Some(a));
        assert_eq!(SeriesKey::decode(&SeriesKey::overflow().encode()), Some(SeriesKey::overflow()));
    }

    #[test]
    fn state_round_trips_and_refuses_other_bucket_counts() {
        let state =
            SeriesState { start_unix_nano: 1, last_seen_unix_nano: 2, calls: 3, sum_ms: 4.5, buckets: vec![1, 2] };
        assert_eq!(SeriesState::decode(&state.encode(), 2), Some(state.clone()));
        assert_eq!(SeriesState::decode(&state.encode(), 3), None);
    }
}
