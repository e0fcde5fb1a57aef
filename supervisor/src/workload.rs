//! The field report's load profile, as data: virtual users ramping up to a sustained plateau,
//! each finishing about one trace a second on one of four endpoints with their own latency and
//! error profiles, plus the correlated JSON log lines a service writes and the ground truth of
//! which traces the default sampling must keep. Deterministic for a seed, so a run can be
//! checked against what it sent. Used by the load generator (`tailgate-loadgen profile`) and
//! meant for `tailgate demo`.
//!
//! Shape at the default ramp: 500 users x 1 trace/s x ~4.6 spans = ~2,300-2,500 spans/s; about
//! 19% of traces (20% of spans) are kept by `errors` or `slow` (a span longer than 200 ms).

use std::fmt::Write as _;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};

/// The latency at and above which a trace counts as slow (the product's default threshold).
pub const SLOW_MS: u64 = 200;

/// Virtual users over time: straight lines between `(at, users)` points from `(0, 0)`, then the
/// last value for good.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    points: Vec<(Duration, f64)>,
}

impl Default for Ramp {
    /// The field report's: 100 users by 30 s, 250 by 45 s, 500 at one minute, then sustained.
    fn default() -> Ramp {
        Ramp {
            points: vec![
                (Duration::from_secs(30), 100.0),
                (Duration::from_secs(45), 250.0),
                (Duration::from_secs(60), 500.0),
            ],
        }
    }
}

impl std::str::FromStr for Ramp {
    type Err = String;

    /// `30s:100,45s:250,60s:500` (times increasing; humantime durations).
    fn from_str(text: &str) -> Result<Ramp, String> {
        let mut points = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (at, users) = part.split_once(':').ok_or_else(|| format!("`{part}`: expected TIME:USERS"))?;
            let at = humantime::parse_duration(at).map_err(|e| format!("`{at}`: {e}"))?;
            let users: f64 = users.parse().map_err(|_| format!("`{users}`: not a number of users"))?;
            if !(0.0..=100_000.0).contains(&users) {
                return Err(format!("`{users}`: users must be 0-100000"));
            }
            if points.last().is_some_and(|(last, _)| at <= *last) {
                return Err(format!("`{part}`: times must increase"));
            }
            points.push((at, users));
        }
        if points.is_empty() {
            return Err("an empty ramp".into());
        }
        Ok(Ramp { points })
    }
}

impl Ramp {
    /// Users at `elapsed`.
    pub fn users_at(&self, elapsed: Duration) -> f64 {
        let mut from = (Duration::ZERO, 0.0);
        for &(at, users) in &self.points {
            if elapsed < at {
                let span = (at - from.0).as_secs_f64();
                let into = (elapsed - from.0).as_secs_f64();
                return from.1 + (users - from.1) * if span > 0.0 { into / span } else { 1.0 };
            }
            from = (at, users);
        }
        from.1
    }
}

/// One endpoint of the profiled service.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    /// `http.route` and the root span's name suffix.
    pub route: &'static str,
    /// HTTP method.
    pub method: &'static str,
    /// Share of requests, percent.
    pub weight: u32,
    /// Spans per trace (the root and its children).
    pub spans: u32,
    /// Typical root latency of a fast request, ms (drawn from half to one and a half times it).
    pub typical_ms: u64,
    /// Percent of requests slower than [`SLOW_MS`] (drawn from 250 to 900 ms).
    pub slow_percent: u32,
    /// Percent of requests with a failing span.
    pub error_percent: u32,
}

/// The four endpoints of the field report's service.
pub const ENDPOINTS: [Endpoint; 4] = [
    Endpoint {
        route: "/api/catalog",
        method: "GET",
        weight: 40,
        spans: 5,
        typical_ms: 25,
        slow_percent: 6,
        error_percent: 2,
    },
    Endpoint {
        route: "/api/search",
        method: "GET",
        weight: 30,
        spans: 5,
        typical_ms: 70,
        slow_percent: 15,
        error_percent: 3,
    },
    Endpoint {
        route: "/api/checkout",
        method: "POST",
        weight: 20,
        spans: 5,
        typical_ms: 120,
        slow_percent: 40,
        error_percent: 10,
    },
    Endpoint {
        route: "/healthz",
        method: "GET",
        weight: 10,
        spans: 1,
        typical_ms: 2,
        slow_percent: 0,
        error_percent: 0,
    },
];

/// Service name of the profiled service.
pub const SERVICE: &str = "shop";

/// Why the default sampling keeps a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// A span in ERROR.
    Errors,
    /// The root lasted longer than [`SLOW_MS`].
    Slow,
}

impl Keep {
    /// The policy name the product records (`tailgate.sampling.policy`).
    pub fn policy(self) -> &'static str {
        match self {
            Keep::Errors => "errors",
            Keep::Slow => "slow",
        }
    }
}

/// One generated trace.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Trace id.
    pub trace_id: [u8; 16],
    /// Index into [`ENDPOINTS`].
    pub endpoint: usize,
    /// Root latency, ms.
    pub root_ms: u64,
    /// The span (0 = root) that failed, if any.
    pub failed_span: Option<u32>,
}

impl Trace {
    /// The endpoint.
    pub fn endpoint(&self) -> &'static Endpoint {
        &ENDPOINTS[self.endpoint]
    }

    /// Spans in the trace.
    pub fn spans(&self) -> u32 {
        self.endpoint().spans
    }

    /// Whether (and why) the default sampling keeps it; errors take precedence, as in the
    /// product's policy order.
    pub fn keep(&self) -> Option<Keep> {
        if self.failed_span.is_some() {
            Some(Keep::Errors)
        } else if self.root_ms > SLOW_MS {
            Some(Keep::Slow)
        } else {
            None
        }
    }

    /// Span `index`'s id.
    pub fn span_id(&self, index: u32) -> [u8; 8] {
        let mut id = [0u8; 8];
        id[..4].copy_from_slice(&self.trace_id[12..]);
        id[4..].copy_from_slice(&(index + 1).to_be_bytes());
        id
    }

    /// Span `index`'s (start offset, duration) in ms from the trace's start: the root covers the
    /// trace, the children run one after another inside it.
    fn span_times(&self, index: u32) -> (u64, u64) {
        if index == 0 {
            return (0, self.root_ms);
        }
        let children = u64::from(self.spans().saturating_sub(1)).max(1);
        let slot = (self.root_ms / (children + 1)).max(1);
        (u64::from(index - 1) * slot + slot / 2, slot)
    }
}

/// A deterministic generator of the profile's traces.
#[derive(Debug, Clone)]
pub struct Workload {
    run_id: u64,
    state: u64,
    traces: u64,
}

impl Workload {
    /// A generator whose trace ids start with `run_id` (so runs never collide), drawing from `seed`.
    pub fn new(run_id: u64, seed: u64) -> Workload {
        Workload { run_id, state: seed ^ 0x9e37_79b9_7f4a_7c15, traces: 0 }
    }

    fn next(&mut self) -> u64 {
        // splitmix64
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn percent(&mut self) -> u32 {
        (self.next() % 100) as u32
    }

    /// The next trace.
    pub fn trace(&mut self) -> Trace {
        self.traces += 1;
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&self.run_id.to_be_bytes());
        // The low half carries randomness too (probabilistic policies read the last 56 bits).
        trace_id[8..].copy_from_slice(&(self.next() & !0xffff_ffff | (self.traces & 0xffff_ffff)).to_be_bytes());
        let pick = self.percent();
        let mut endpoint = ENDPOINTS.len() - 1;
        let mut total = 0;
        for (index, candidate) in ENDPOINTS.iter().enumerate() {
            total += candidate.weight;
            if pick < total {
                endpoint = index;
                break;
            }
        }
        let profile = ENDPOINTS[endpoint];
        let root_ms = if self.percent() < profile.slow_percent {
            250 + self.next() % 651
        } else {
            let low = (profile.typical_ms / 2).max(1);
            (low + self.next() % (profile.typical_ms + 1)).min(SLOW_MS - 10)
        };
        let failed_span = (self.percent() < profile.error_percent).then(|| {
            // The deepest span fails (a dependency), the root only for one-span traces.
            profile.spans - 1
        });
        Trace { trace_id, endpoint, root_ms, failed_span }
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

/// The traces as one OTLP request, each ending at `end_unix_nano` (a finished request is
/// exported when it ends, as an SDK does).
pub fn request(traces: &[Trace], end_unix_nano: u64) -> ExportTraceServiceRequest {
    let mut spans = Vec::new();
    for trace in traces {
        let profile = trace.endpoint();
        let start = end_unix_nano.saturating_sub(trace.root_ms * 1_000_000);
        for index in 0..trace.spans() {
            let (offset, duration) = trace.span_times(index);
            let failed = trace.failed_span == Some(index);
            let root = index == 0;
            spans.push(Span {
                trace_id: trace.trace_id.to_vec(),
                span_id: trace.span_id(index).to_vec(),
                parent_span_id: if root { Vec::new() } else { trace.span_id(0).to_vec() },
                name: if root {
                    format!("{} {}", profile.method, profile.route)
                } else {
                    format!("{} step {index}", &profile.route[1..])
                },
                kind: if root { span::SpanKind::Server } else { span::SpanKind::Client } as i32,
                start_time_unix_nano: start + offset * 1_000_000,
                end_time_unix_nano: start + (offset + duration) * 1_000_000,
                attributes: if root {
                    vec![kv("http.route", profile.route), kv("http.request.method", profile.method)]
                } else {
                    vec![kv("db.system", "postgresql")]
                },
                status: Some(Status {
                    code: if failed { status::StatusCode::Error } else { status::StatusCode::Unset } as i32,
                    message: if failed { "dependency failed".into() } else { String::new() },
                }),
                ..Default::default()
            });
        }
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", SERVICE), kv("host.name", "edge-1")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// Appends the trace's JSON log lines (one per span, ERROR on the failing one) to `out`, as the
/// service writes them for the file input.
pub fn log_lines(trace: &Trace, end_unix_ms: u64, out: &mut String) {
    let profile = trace.endpoint();
    for index in 0..trace.spans() {
        let failed = trace.failed_span == Some(index);
        let (_, duration) = trace.span_times(index);
        let _ = writeln!(
            out,
            r#"{{"time":{end_unix_ms},"level":"{}","msg":"{} {} step {index}","trace_id":"{}","span_id":"{}","service":"{SERVICE}","http.route":"{}","duration_ms":{duration}}}"#,
            if failed { "ERROR" } else { "INFO" },
            profile.method,
            profile.route,
            hex(&trace.trace_id),
            hex(&trace.span_id(index)),
            profile.route,
        );
    }
}

/// The trace's ground-truth line (JSON) when the default sampling must keep it.
pub fn truth_line(trace: &Trace) -> Option<String> {
    let keep = trace.keep()?;
    Some(format!(
        r#"{{"trace_id":"{}","route":"{}","spans":{},"root_ms":{},"kept_by":"{}"}}"#,
        hex(&trace.trace_id),
        trace.endpoint().route,
        trace.spans(),
        trace.root_ms,
        keep.policy()
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_follows_its_points_then_holds() {
        let ramp = Ramp::default();
        assert_eq!(ramp.users_at(Duration::ZERO), 0.0);
        assert_eq!(ramp.users_at(Duration::from_secs(15)), 50.0);
        assert_eq!(ramp.users_at(Duration::from_secs(30)), 100.0);
        assert_eq!(ramp.users_at(Duration::from_secs(60)), 500.0);
        assert_eq!(ramp.users_at(Duration::from_secs(600)), 500.0);
        assert_eq!("30s:100,45s:250,60s:500".parse::<Ramp>().unwrap(), ramp);
        assert!("30s:100,20s:5".parse::<Ramp>().is_err());
        assert!("soon:5".parse::<Ramp>().is_err());
        assert!("".parse::<Ramp>().is_err());
    }

    #[test]
    fn the_profile_keeps_about_a_fifth_of_the_spans_and_says_why() {
        let mut workload = Workload::new(7, 42);
        let traces: Vec<Trace> = (0..100_000).map(|_| workload.trace()).collect();
        let spans: u64 = traces.iter().map(|t| u64::from(t.spans())).sum();
        let kept: u64 = traces.iter().filter(|t| t.keep().is_some()).map(|t| u64::from(t.spans())).sum();
        let share = kept as f64 / spans as f64;
        assert!((0.17..0.23).contains(&share), "kept {share}");
        // Every endpoint occurs with about its weight; ids are distinct.
        for (index, endpoint) in ENDPOINTS.iter().enumerate() {
            let count = traces.iter().filter(|t| t.endpoint == index).count() as f64 / 1000.0;
            assert!((count - f64::from(endpoint.weight)).abs() < 1.5, "{}: {count}%", endpoint.route);
        }
        let ids: std::collections::HashSet<[u8; 16]> = traces.iter().map(|t| t.trace_id).collect();
        assert_eq!(ids.len(), traces.len());
        // The request carries exactly what the ground truth claims.
        let request = request(&traces[..50], 1_000_000_000_000);
        let sent = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(sent.len() as u64, traces[..50].iter().map(|t| u64::from(t.spans())).sum::<u64>());
        for trace in &traces[..50] {
            let own: Vec<&Span> = sent.iter().filter(|s| s.trace_id == trace.trace_id).collect();
            let error = own.iter().any(|s| s.status.as_ref().is_some_and(|st| st.code == 2));
            let longest = own.iter().map(|s| s.end_time_unix_nano - s.start_time_unix_nano).max().unwrap();
            let kept = error || longest > SLOW_MS * 1_000_000;
            assert_eq!(kept, trace.keep().is_some(), "{trace:?}");
            assert_eq!(truth_line(trace).is_some(), kept);
        }
        let mut lines = String::new();
        log_lines(&traces[0], 5, &mut lines);
        assert_eq!(lines.lines().count() as u32, traces[0].spans());
        assert!(lines.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }
}
