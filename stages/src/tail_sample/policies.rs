//! The sampling policies, evaluated on a whole trace when it is decided, with the precedence of
//! the OpenTelemetry Collector's `tail_sampling` processor: a `drop` policy that matches vetoes
//! everything; otherwise an inverted match (`invert_match` and the value matched) drops;
//! otherwise the trace is kept if any policy keeps it (an inverted policy keeps a trace that
//! does not match); otherwise it is dropped. The first policy in configuration order that kept
//! the trace is reported as the reason.
//!
//! `probabilistic` is the OpenTelemetry consistent-probability rule: the trace id's last 56
//! bits are its randomness R, the policy's threshold T = (1 - p) * 2^56, and the trace is kept
//! when R >= T, so every node (and every collector using the same rule) keeps the same traces.

use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tailgate_config::{MAX_ATTRIBUTE_POLICIES, PolicyConfig, PolicyType};
use tailgate_ipc::batch::{ArchivedSpanBatch, SpanBody, span_duration};

use crate::otlp_wire::{
    AttributeValue, RESOURCE_ATTRIBUTES, SPAN_ATTRIBUTES, SPAN_TRACE_STATE, find_attribute, find_attributes,
    with_string_field,
};

/// 2^56: the range of a trace id's randomness.
const RANDOMNESS_RANGE: u64 = 1 << 56;

#[derive(Debug)]
enum Matcher {
    Exact(Vec<String>),
    Regex(Vec<regex::Regex>),
}

impl Matcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(values) => values.iter().any(|v| v == value),
            Matcher::Regex(patterns) => patterns.iter().any(|p| p.is_match(value)),
        }
    }
}

#[derive(Debug)]
enum Rule {
    StatusCode(Vec<u8>),
    Latency {
        min_nanos: u64,
        max_nanos: u64,
    },
    /// The shorthand's rule (`latency_threshold`): a span lasting longer than this.
    SpanLatency {
        over_nanos: u64,
    },
    /// A `string_attribute` or `numeric_attribute` policy: whether some span matched its
    /// test is bit `test` of [`Facts::matched`].
    Attribute {
        /// Index into [`Policies::tests`].
        test: u8,
        invert: bool,
    },
    Probabilistic {
        threshold: u64,
    },
    Always,
    And(Vec<Rule>),
    Drop(Vec<Rule>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Sampled,
    NotSampled,
    InvertSampled,
    InvertNotSampled,
    Dropped,
}

/// What an attribute policy tests on each span: the value of `key` ([`Tests::keys`]), the span's
/// own else its resource's.
#[derive(Debug)]
enum Test {
    /// `string_attribute`: a string value the matcher accepts.
    Text { key: usize, matcher: Matcher },
    /// `numeric_attribute`: an integer value in `min..=max`.
    Number { key: usize, min: i64, max: i64 },
}

impl Test {
    fn key(&self) -> usize {
        match self {
            Test::Text { key, .. } | Test::Number { key, .. } => *key,
        }
    }

    fn matches(&self, value: AttributeValue<'_>) -> bool {
        match (self, value) {
            (Test::Text { matcher, .. }, AttributeValue::Str(text)) => matcher.matches(text),
            (Test::Number { min, max, .. }, AttributeValue::Int(number)) => (*min..=*max).contains(&number),
            _ => false,
        }
    }
}

/// The attribute tests of the rules and the keys they read, each key once.
#[derive(Debug, Default)]
struct Tests {
    keys: Vec<String>,
    tests: Vec<Test>,
}

impl Tests {
    fn intern(&mut self, key: &str) -> usize {
        match self.keys.iter().position(|k| k == key) {
            Some(index) => index,
            None => {
                self.keys.push(key.to_string());
                self.keys.len() - 1
            }
        }
    }

    /// Adds a test; its bit in [`Facts::matched`]. Tests past [`MAX_ATTRIBUTE_POLICIES`]
    /// (refused by `check-config`) share the last bit.
    fn add(&mut self, test: Test) -> u8 {
        let bit = self.tests.len().min(MAX_ATTRIBUTE_POLICIES - 1) as u8;
        if self.tests.len() < MAX_ATTRIBUTE_POLICIES {
            self.tests.push(test);
        }
        bit
    }
}

impl Rule {
    /// The rule of `config`; its attribute tests are added to `tests`.
    fn new(config: &PolicyConfig, tests: &mut Tests) -> Rule {
        match config.kind {
            PolicyType::StatusCode => Rule::StatusCode(
                config.status_code.iter().flat_map(|s| s.status_codes.iter().map(|c| c.wire())).collect(),
            ),
            PolicyType::Latency => {
                let latency = config.latency.as_ref();
                let ms = |v: u64| v.saturating_mul(1_000_000);
                Rule::Latency {
                    min_nanos: ms(latency.map_or(0, |l| l.threshold_ms)),
                    max_nanos: latency.map(|l| l.upper_threshold_ms).filter(|u| *u > 0).map_or(u64::MAX, ms),
                }
            }
            PolicyType::StringAttribute => {
                let policy = config.string_attribute.as_ref();
                let values = policy.map(|p| p.values.clone()).unwrap_or_default();
                let matcher = if policy.is_some_and(|p| p.enabled_regex_matching) {
                    // Validated by check-config; anchored like the Collector's full matches.
                    Matcher::Regex(
                        values.iter().filter_map(|v| regex::Regex::new(&format!("^(?:{v})$")).ok()).collect(),
                    )
                } else {
                    Matcher::Exact(values)
                };
                let key = tests.intern(policy.map_or("", |p| p.key.as_str()));
                Rule::Attribute {
                    test: tests.add(Test::Text { key, matcher }),
                    invert: policy.is_some_and(|p| p.invert_match),
                }
            }
            PolicyType::NumericAttribute => {
                let policy = config.numeric_attribute.as_ref();
                let key = tests.intern(policy.map_or("", |p| p.key.as_str()));
                let test = Test::Number {
                    key,
                    min: policy.map_or(0, |p| p.min_value),
                    max: policy.map_or(-1, |p| p.max_value),
                };
                Rule::Attribute { test: tests.add(test), invert: policy.is_some_and(|p| p.invert_match) }
            }
            PolicyType::Probabilistic => {
                let percentage = config.probabilistic.as_ref().map_or(0.0, |p| p.sampling_percentage).clamp(0.0, 100.0);
                Rule::Probabilistic { threshold: threshold_for(percentage) }
            }
            PolicyType::AlwaysSample => Rule::Always,
            PolicyType::And => Rule::And(
                config.and.iter().flat_map(|a| a.and_sub_policy.iter()).map(|c| Rule::new(c, tests)).collect(),
            ),
            PolicyType::Drop => Rule::Drop(
                config.drop.iter().flat_map(|d| d.drop_sub_policy.iter()).map(|c| Rule::new(c, tests)).collect(),
            ),
        }
    }

    /// Whether the rule can overrule a keep by another policy: a `drop` (veto) or an inverted
    /// attribute match (drops when the value matches). Once a trace is kept, only these still
    /// need evaluating.
    fn can_overrule(&self) -> bool {
        match self {
            Rule::Drop(_) => true,
            Rule::Attribute { invert, .. } => *invert,
            _ => false,
        }
    }

    fn evaluate(&self, trace_id: &[u8; 16], facts: &Facts) -> Verdict {
        let sampled = |matched: bool| if matched { Verdict::Sampled } else { Verdict::NotSampled };
        match self {
            Rule::StatusCode(codes) => sampled(codes.iter().any(|c| facts.statuses & (1u8 << (c & 7)) != 0)),
            Rule::Latency { min_nanos, max_nanos } => {
                let duration = facts.duration_nanos();
                sampled(duration >= *min_nanos && duration <= *max_nanos)
            }
            Rule::SpanLatency { over_nanos } => sampled(facts.longest_span > *over_nanos),
            Rule::Attribute { test, invert } => match (facts.matched & (1u64 << test) != 0, invert) {
                (matched, false) => sampled(matched),
                (true, true) => Verdict::InvertNotSampled,
                (false, true) => Verdict::InvertSampled,
            },
            Rule::Probabilistic { threshold } => sampled(randomness(trace_id) >= *threshold),
            Rule::Always => Verdict::Sampled,
            Rule::And(subs) => sampled(subs.iter().all(|s| is_kept(s.evaluate(trace_id, facts)))),
            Rule::Drop(subs) => {
                if subs.iter().all(|s| is_kept(s.evaluate(trace_id, facts))) {
                    Verdict::Dropped
                } else {
                    Verdict::NotSampled
                }
            }
        }
    }
}

fn is_kept(verdict: Verdict) -> bool {
    matches!(verdict, Verdict::Sampled | Verdict::InvertSampled)
}

/// The trace id's randomness: its last 56 bits (W3C Trace Context level 2).
pub fn randomness(trace_id: &[u8; 16]) -> u64 {
    let mut last = [0u8; 8];
    last.copy_from_slice(&trace_id[8..]);
    u64::from_be_bytes(last) & (RANDOMNESS_RANGE - 1)
}

/// What the rules look at of a trace, gathered span by span as its spans are read (when they
/// are ingested, while their bytes are in the cache), so deciding the trace reads none of them
/// again unless it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// Bit `c` set when a span has status code `c`.
    statuses: u8,
    first_start: u64,
    last_end: u64,
    longest_span: u64,
    /// Bit `i` set when a span matched attribute test `i`.
    matched: u64,
}

impl Default for Facts {
    fn default() -> Facts {
        Facts { statuses: 0, first_start: u64::MAX, last_end: 0, longest_span: 0, matched: 0 }
    }
}

impl Facts {
    fn duration_nanos(&self) -> u64 {
        self.last_end.saturating_sub(self.first_start)
    }
}

/// Gathers [`Facts`] from the spans of one batch: each resource's attribute values are looked
/// up once per batch, not once per span.
pub struct Observer<'p, 'a> {
    policies: &'p Policies,
    batch: &'a ArchivedSpanBatch,
    /// Per resource of the batch, once looked up: the keys it has (bit per key) and the tests
    /// its values match (bit per test).
    resources: Vec<Option<(u64, u64)>>,
    found: Vec<Option<AttributeValue<'a>>>,
}

impl<'a> Observer<'_, 'a> {
    /// Adds span `index` of the batch to `facts`.
    pub fn observe(&mut self, facts: &mut Facts, index: u32) {
        let Some(span) = self.batch.spans.get(index as usize) else { return };
        facts.statuses |= 1u8 << (span.status_code & 7);
        let (start, end) = (span.start_unix_nano.to_native(), span.end_unix_nano.to_native());
        // A span without a start time says nothing about the trace's extent.
        if start != 0 {
            facts.first_start = facts.first_start.min(start);
            facts.last_end = facts.last_end.max(end);
        }
        facts.longest_span = facts.longest_span.max(span_duration(start, end));
        let tests = &self.policies.tests;
        if tests.tests.is_empty() {
            return;
        }
        self.found.clear();
        self.found.resize(tests.keys.len(), None);
        find_attributes(span.body.as_slice(), SPAN_ATTRIBUTES, &tests.keys, &mut self.found);
        let resource = self.batch.scopes.get(span.scope.to_native() as usize).map(|scope| scope.resource.to_native());
        let (resource_keys, resource_matched) = match resource {
            Some(resource) if self.found.iter().any(Option::is_none) => self.resource(resource as usize),
            _ => (0, 0),
        };
        for (bit, test) in tests.tests.iter().enumerate() {
            let matched = match self.found[test.key()] {
                Some(value) => test.matches(value),
                None => resource_keys & (1u64 << test.key()) != 0 && resource_matched & (1u64 << bit) != 0,
            };
            if matched {
                facts.matched |= 1u64 << bit;
            }
        }
    }

    /// The keys resource `index` has and the tests its values match (looked up once).
    fn resource(&mut self, index: usize) -> (u64, u64) {
        if let Some(Some(known)) = self.resources.get(index) {
            return *known;
        }
        let tests = &self.policies.tests;
        let mut values = vec![None; tests.keys.len()];
        if let Some(resource) = self.batch.resources.get(index) {
            find_attributes(resource.resource.as_slice(), RESOURCE_ATTRIBUTES, &tests.keys, &mut values);
        }
        let keys = values.iter().enumerate().filter(|(_, v)| v.is_some()).fold(0u64, |bits, (k, _)| bits | 1 << k);
        let matched = tests
            .tests
            .iter()
            .enumerate()
            .filter(|(_, test)| values[test.key()].is_some_and(|value| test.matches(value)))
            .fold(0u64, |bits, (bit, _)| bits | 1 << bit);
        if self.resources.len() <= index {
            self.resources.resize(index + 1, None);
        }
        self.resources[index] = Some((keys, matched));
        (keys, matched)
    }
}

/// The route a root span stands for (its `http.route`, else its name): what the adaptive
/// threshold and an incident window's routes are kept per.
pub fn root_route(span: &tailgate_ipc::batch::ArchivedSpanRecord) -> &str {
    match find_attribute(span.body.as_slice(), SPAN_ATTRIBUTES, "http.route") {
        Some(AttributeValue::Str(route)) => route,
        _ => span.name.as_str(),
    }
}

/// The span attribute that names the policy that kept a trace.
pub const POLICY_ATTRIBUTE: &str = "tailgate.sampling.policy";

/// What a kept trace's spans carry about why: the `tailgate.sampling.policy` attribute (as the
/// encoded `Span.attributes` entry, appended to the span's bytes: protobuf merges repeated
/// fields), and for a probabilistic keep the OpenTelemetry threshold `th` to put in the span's
/// `tracestate` under `ot`, so downstream counts can weight the span by 1/p.
#[derive(Debug, Clone)]
pub struct Mark {
    /// Shared by every span the policy keeps (appended to each in place of a copy).
    attribute_field: std::sync::Arc<[u8]>,
    threshold: Option<String>,
}

impl Mark {
    fn new(name: &str, rule: &Rule) -> Mark {
        let entry = KeyValue {
            key: POLICY_ATTRIBUTE.to_string(),
            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                value: Some(Value::StringValue(name.into())),
            }),
            ..Default::default()
        };
        let carrier = Span { attributes: vec![entry], ..Default::default() };
        let threshold = match rule {
            Rule::Probabilistic { threshold } => Some(threshold_hex(*threshold)),
            _ => None,
        };
        Mark { attribute_field: carrier.encode_to_vec().into(), threshold }
    }

    /// The span's bytes (`body`) with the mark added: the stored bytes followed by the
    /// attribute entry, or, for a probabilistic keep, the span re-encoded with its `tracestate`.
    pub fn body<'a>(&self, body: &'a [u8]) -> SpanBody<'a> {
        if let Some(threshold) = &self.threshold
            && let Some(mut owned) = with_string_field(body, SPAN_TRACE_STATE, self.attribute_field.len(), |state| {
                with_threshold(state, threshold)
            })
        {
            owned.extend_from_slice(&self.attribute_field);
            return SpanBody::Owned(owned);
        }
        SpanBody::Borrowed { body, tail: Some(self.attribute_field.clone()) }
    }
}

/// The rejection threshold for keeping `percentage` % of traces: (1 - p) x 2^56, computed in
/// integers (the percentage to a millionth of a percent) so 10% is exactly 0xe6666666666666.
pub fn threshold_for(percentage: f64) -> u64 {
    const SCALE: u128 = 100_000_000; // 100% in millionths of a percent
    let kept = (percentage * 1_000_000.0).round().clamp(0.0, SCALE as f64) as u128;
    (((SCALE - kept) << 56) / SCALE) as u64
}

/// A 56-bit threshold as OpenTelemetry writes `th`: 14 hex digits, trailing zeros dropped
/// (`0` for "keep all").
pub fn threshold_hex(threshold: u64) -> String {
    let digits = format!("{:014x}", threshold & (RANDOMNESS_RANGE - 1));
    let trimmed = digits.trim_end_matches('0');
    if trimmed.is_empty() { "0".to_string() } else { trimmed.to_string() }
}

/// `tracestate` with `th` set in its `ot` entry (added leftmost when there is none, as W3C
/// Trace Context asks for a modified entry).
fn with_threshold(tracestate: &str, threshold: &str) -> String {
    let mut ot: Vec<String> = Vec::new();
    let mut others: Vec<&str> = Vec::new();
    for member in tracestate.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        match member.strip_prefix("ot=") {
            Some(values) => {
                ot.extend(values.split(';').filter(|v| !v.starts_with("th:") && !v.is_empty()).map(str::to_owned))
            }
            None => others.push(member),
        }
    }
    ot.insert(0, format!("th:{threshold}"));
    std::iter::once(format!("ot={}", ot.join(";")))
        .chain(others.into_iter().map(str::to_owned))
        .collect::<Vec<_>>()
        .join(",")
}

/// The configured policies, ready to evaluate.
#[derive(Debug)]
pub struct Policies {
    rules: Vec<(String, Rule)>,
    /// Per rule, whether it can overrule a keep ([`Rule::can_overrule`]).
    overrules: Vec<bool>,
    /// The attribute tests of the rules and the keys they read.
    tests: Tests,
    marks: Vec<Mark>,
    /// The adaptive `latency` policy: its index and its per-route thresholds.
    adaptive: Option<(usize, super::adaptive::Adaptive)>,
}

impl Policies {
    /// Builds the rules (the configuration was validated by `check-config`). Without
    /// policies, the shorthand: `errors` (a span in ERROR, if `keep_errors`) and `slow` (a span
    /// lasting longer than `latency_threshold`: the product's rule before policies, which the
    /// golden sets pin; the `latency` policy type measures the whole trace, as the Collector).
    pub fn new(configs: &[PolicyConfig], keep_errors: bool, latency_threshold: std::time::Duration) -> Policies {
        let mut tests = Tests::default();
        let mut rules: Vec<(String, Rule)> =
            configs.iter().map(|c| (c.name.clone(), Rule::new(c, &mut tests))).collect();
        if configs.is_empty() {
            if keep_errors {
                rules.push(("errors".to_string(), Rule::StatusCode(vec![tailgate_ipc::batch::STATUS_CODE_ERROR])));
            }
            rules.push(("slow".to_string(), Rule::SpanLatency { over_nanos: latency_threshold.as_nanos() as u64 }));
        }
        let overrules = rules.iter().map(|(_, rule)| rule.can_overrule()).collect();
        let mut marks: Vec<Mark> = rules.iter().map(|(name, rule)| Mark::new(name, rule)).collect();
        marks.push(Mark::new(super::incident::INCIDENT_REASON, &Rule::Always));
        let adaptive = configs.iter().enumerate().find_map(|(index, config)| {
            let latency = config.latency.as_ref().filter(|_| config.kind == tailgate_config::PolicyType::Latency)?;
            let adaptive = latency.adaptive.as_ref()?;
            let stored = tailgate_ipc::decisions::RouteThresholds::default();
            Some((index, super::adaptive::Adaptive::new(latency.threshold_ms, adaptive, &stored)))
        });
        Policies { rules, overrules, tests, marks, adaptive }
    }

    /// Resumes the adaptive thresholds stored in the queue.
    pub fn resume_thresholds(&mut self, stored: &tailgate_ipc::decisions::RouteThresholds, configs: &[PolicyConfig]) {
        if let Some((index, adaptive)) = &mut self.adaptive
            && let Some(latency) = configs.get(*index).and_then(|c| c.latency.as_ref())
            && let Some(config) = &latency.adaptive
        {
            *adaptive = super::adaptive::Adaptive::new(latency.threshold_ms, config, stored);
        }
    }

    /// The adaptive thresholds' tracker, if a `latency` policy adapts.
    pub fn adaptive(&mut self) -> Option<&mut super::adaptive::Adaptive> {
        self.adaptive.as_mut().map(|(_, adaptive)| adaptive)
    }

    /// Gathers the facts of spans of `batch` ([`Observer::observe`]).
    pub fn observer<'p, 'a>(&'p self, batch: &'a ArchivedSpanBatch) -> Observer<'p, 'a> {
        Observer { policies: self, batch, resources: Vec::new(), found: Vec::new() }
    }

    /// Whether deciding a trace needs its root's route ([`root_route`]): an adaptive
    /// threshold, or an incident window for some routes.
    pub fn needs_route(&self, incident: Option<&super::incident::Incident>) -> bool {
        self.adaptive.is_some() || incident.is_some_and(|i| !i.routes.is_empty())
    }

    /// Decides a trace on its spans (`(batch, index)` pairs): the index of the policy that kept
    /// it, or `None` when it is dropped.
    pub fn decide(&mut self, trace_id: &[u8; 16], spans: &[(&ArchivedSpanBatch, u32)]) -> Option<usize> {
        let mut facts = Facts::default();
        let mut root = None;
        for (batch, index) in spans {
            self.observer(batch).observe(&mut facts, *index);
            if let Some(span) = batch.spans.get(*index as usize).filter(|s| s.parent_span_id == [0u8; 8]) {
                root = Some(root_route(span));
            }
        }
        self.decide_during(trace_id, &facts, root, None)
    }

    /// Decides a trace on its gathered facts and its root's route (when [`Policies::needs_route`]),
    /// with an open incident window: a trace it covers is kept (reason
    /// [`Policies::incident_index`]) unless a `drop` policy vetoes it. Returns the index of the
    /// policy that kept it, or `None` when it is dropped.
    pub fn decide_during(
        &mut self,
        trace_id: &[u8; 16],
        facts: &Facts,
        root_route: Option<&str>,
        incident: Option<&super::incident::Incident>,
    ) -> Option<usize> {
        // The adaptive policy judges by its route's current threshold, then counts the trace.
        let adaptive = self.adaptive.as_mut().map(|(index, adaptive)| {
            let duration = facts.duration_nanos();
            let threshold = adaptive.threshold_ms(root_route).saturating_mul(1_000_000);
            if let Some(route) = root_route {
                adaptive.observe(route, duration);
            }
            (*index, duration >= threshold)
        });
        let (mut dropped, mut inverted_out, mut kept_by) = (false, false, None);
        for (index, (_, rule)) in self.rules.iter().enumerate() {
            if kept_by.is_some() && !self.overrules[index] {
                // Kept already: only a veto or an inverted match can still change the outcome.
                continue;
            }
            let verdict = match (adaptive, rule) {
                (Some((at, over)), Rule::Latency { max_nanos, .. }) if at == index => {
                    if over && facts.duration_nanos() <= *max_nanos { Verdict::Sampled } else { Verdict::NotSampled }
                }
                _ => rule.evaluate(trace_id, facts),
            };
            dropped |= verdict == Verdict::Dropped;
            inverted_out |= verdict == Verdict::InvertNotSampled;
            if kept_by.is_none() && is_kept(verdict) {
                kept_by = Some(index);
            }
        }
        if dropped {
            return None;
        }
        if let Some(incident) = incident
            && incident.covers(root_route)
            && (incident.keep_all || incident.latency_ms.is_some_and(|ms| facts.duration_nanos() >= ms * 1_000_000))
        {
            return Some(self.incident_index());
        }
        if inverted_out {
            return None;
        }
        kept_by
    }

    /// The mark of policy `index` for the spans of the traces it keeps (the incident window's
    /// at [`Policies::incident_index`]).
    pub fn mark(&self, index: usize) -> Option<&Mark> {
        self.marks.get(index)
    }

    /// The reason index of a trace kept by an incident window (after the configured policies).
    pub fn incident_index(&self) -> usize {
        self.rules.len()
    }

    /// The name of policy `index`.
    pub fn name(&self, index: usize) -> &str {
        if index == self.incident_index() {
            return super::incident::INCIDENT_REASON;
        }
        self.rules.get(index).map_or("", |(name, _)| name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::AnyValue;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use tailgate_ipc::batch::{self, ResourceBlock, ScopeBlock, SpanBatch, SpanRecord};

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
    }

    /// Span times in `batch_of` are milliseconds after this.
    const BASE_MS: u64 = 1_700_000_000_000;

    /// One batch: a resource with `service.name`/`tier`, and spans (status, start ms, end ms,
    /// span attributes).
    fn batch_of(spans: Vec<(u8, u64, u64, Vec<KeyValue>)>) -> Vec<u8> {
        batch_at(spans.into_iter().map(|(status, start, end, a)| (status, BASE_MS + start, BASE_MS + end, a)).collect())
    }

    /// Like [`batch_of`], span times in Unix milliseconds (0: unset).
    fn batch_at(spans: Vec<(u8, u64, u64, Vec<KeyValue>)>) -> Vec<u8> {
        let resource = Resource {
            attributes: vec![kv("service.name", Value::StringValue("shop".into())), kv("tier", Value::IntValue(2))],
            ..Default::default()
        };
        let batch = SpanBatch {
            received_unix_nano: 1,
            resources: vec![ResourceBlock { resource: resource.encode_to_vec(), ..Default::default() }],
            scopes: vec![ScopeBlock::default()],
            spans: spans
                .into_iter()
                .enumerate()
                .map(|(i, (status, start, end, attributes))| SpanRecord {
                    trace_id: [9; 16],
                    span_id: [i as u8; 8],
                    start_unix_nano: start * 1_000_000,
                    end_unix_nano: end * 1_000_000,
                    status_code: status,
                    body: Span { attributes, ..Default::default() }.encode_to_vec(),
                    ..Default::default()
                })
                .collect(),
        };
        batch::encode_spans(&batch).unwrap()
    }

    fn policies(yaml: &str) -> Policies {
        let configs: Vec<PolicyConfig> = serde_saphyr::from_str(yaml).unwrap();
        Policies::new(&configs, false, std::time::Duration::ZERO)
    }

    fn decide(policies: &mut Policies, bytes: &[u8], trace_id: [u8; 16]) -> Option<String> {
        let batch = batch::access_spans(bytes).unwrap();
        let spans: Vec<(&ArchivedSpanBatch, u32)> = (0..batch.spans.len() as u32).map(|i| (batch, i)).collect();
        policies.decide(&trace_id, &spans).map(|i| policies.name(i).to_string())
    }

    #[test]
    fn precedence_follows_the_collector() {
        let mut set = policies(
            "    - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}\n\
             \x20   - {name: slow, type: latency, latency: {threshold_ms: 200}}\n\
             \x20   - {name: no-health, type: drop, drop: {drop_sub_policy: [{name: health, type: string_attribute, string_attribute: {key: http.route, values: [/healthz]}}]}}\n",
        );
        let route = |r: &str| vec![kv("http.route", Value::StringValue(r.into()))];
        // Error and slow: the first policy in order is the reason.
        assert_eq!(decide(&mut set, &batch_of(vec![(2, 0, 300, route("/a"))]), [9; 16]), Some("errors".into()));
        assert_eq!(decide(&mut set, &batch_of(vec![(0, 0, 300, route("/a"))]), [9; 16]), Some("slow".into()));
        // Latency is the trace's, first start to last end: two short spans 250 ms apart.
        assert_eq!(
            decide(&mut set, &batch_of(vec![(0, 0, 10, vec![]), (0, 240, 250, vec![])]), [9; 16]),
            Some("slow".into())
        );
        assert_eq!(decide(&mut set, &batch_of(vec![(0, 0, 120, route("/a"))]), [9; 16]), None);
        // A span without a start time has no known duration: not slow, and no extent for the
        // trace (an error still counts).
        let unset_start =
            |status| batch_at(vec![(status, 0, BASE_MS + 300, vec![]), (0, BASE_MS, BASE_MS + 10, vec![])]);
        assert_eq!(decide(&mut set, &unset_start(0), [9; 16]), None);
        assert_eq!(decide(&mut set, &unset_start(2), [9; 16]), Some("errors".into()));
        // A drop policy vetoes even an error.
        assert_eq!(decide(&mut set, &batch_of(vec![(2, 0, 300, route("/healthz"))]), [9; 16]), None);
    }

    #[test]
    fn attribute_policies_match_span_then_resource_attributes() {
        let mut set = policies(
            "    - {name: checkout, type: string_attribute, string_attribute: {key: http.route, values: [/checkout]}}\n\
             \x20   - {name: api, type: string_attribute, string_attribute: {key: http.route, values: ['/api/v[0-9]+/.*'], enabled_regex_matching: true}}\n\
             \x20   - {name: tier, type: numeric_attribute, numeric_attribute: {key: tier, min_value: 3, max_value: 5}}\n",
        );
        let route = |r: &str| vec![kv("http.route", Value::StringValue(r.into()))];
        assert_eq!(decide(&mut set, &batch_of(vec![(0, 0, 1, route("/checkout"))]), [9; 16]), Some("checkout".into()));
        assert_eq!(decide(&mut set, &batch_of(vec![(0, 0, 1, route("/api/v2/items"))]), [9; 16]), Some("api".into()));
        assert_eq!(decide(&mut set, &batch_of(vec![(0, 0, 1, route("/apix/v2/items"))]), [9; 16]), None);
        // The resource's tier is 2: outside 3..=5; a span attribute of 4 matches.
        assert_eq!(decide(&mut set, &batch_of(vec![(0, 0, 1, route("/other"))]), [9; 16]), None);
        assert_eq!(
            decide(&mut set, &batch_of(vec![(0, 0, 1, vec![kv("tier", Value::IntValue(4))])]), [9; 16]),
            Some("tier".into())
        );
        // Inverted: keeps what does not match, vetoes what does.
        let mut inverted = policies(
            "    - {name: not-internal, type: string_attribute, string_attribute: {key: service.name, values: [internal], invert_match: true}}\n\
             \x20   - {name: all, type: always_sample}\n",
        );
        assert_eq!(decide(&mut inverted, &batch_of(vec![(0, 0, 1, vec![])]), [9; 16]), Some("not-internal".into()));
        let internal = vec![kv("service.name", Value::StringValue("internal".into()))];
        assert_eq!(
            decide(&mut inverted, &batch_of(vec![(0, 0, 1, internal)]), [9; 16]),
            None,
            "an inverted match vetoes"
        );
    }

    #[test]
    fn probabilistic_keeps_its_share_by_the_trace_ids_randomness() {
        let mut set =
            policies("    - {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}\n");
        let bytes = batch_of(vec![(0, 0, 1, vec![])]);
        let mut kept = 0;
        for n in 0..10_000u64 {
            // Spread ids: a multiplicative hash of n into the randomness bits.
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
            let first = decide(&mut set, &bytes, id);
            assert_eq!(first, decide(&mut set, &bytes, id), "not deterministic");
            assert_eq!(first.is_some(), randomness(&id) >= threshold_for(10.0));
            kept += usize::from(first.is_some());
        }
        assert!((900..1100).contains(&kept), "{kept} of 10,000 kept at 10%");
        let mut all = policies("    - {name: all, type: probabilistic, probabilistic: {sampling_percentage: 100}}\n");
        assert!(decide(&mut all, &bytes, [0; 16]).is_some());
        let mut none = policies("    - {name: none, type: probabilistic, probabilistic: {sampling_percentage: 0}}\n");
        assert!(decide(&mut none, &bytes, [0xff; 16]).is_none());
    }

    #[test]
    fn and_keeps_only_when_every_sub_policy_keeps() {
        let mut set = policies(
            "    - {name: slow-checkout, type: and, and: {and_sub_policy: [{name: s, type: latency, latency: {threshold_ms: 100}}, {name: c, type: string_attribute, string_attribute: {key: http.route, values: [/checkout]}}]}}\n",
        );
        let checkout = || vec![kv("http.route", Value::StringValue("/checkout".into()))];
        assert_eq!(decide(&mut set, &batch_of(vec![(0, 0, 150, checkout())]), [9; 16]), Some("slow-checkout".into()));
        assert_eq!(decide(&mut set, &batch_of(vec![(0, 0, 50, checkout())]), [9; 16]), None);
    }

    #[test]
    fn the_shorthand_judges_spans_and_the_latency_policy_the_whole_trace() {
        let mut shorthand = Policies::new(&[], true, std::time::Duration::from_millis(200));
        // Two short spans a second apart: not slow by the shorthand (no span over 200 ms) ...
        let spread = batch_of(vec![(0, 0, 100, vec![]), (0, 1000, 1030, vec![])]);
        assert_eq!(decide(&mut shorthand, &spread, [9; 16]), None);
        assert_eq!(decide(&mut shorthand, &batch_of(vec![(0, 0, 201, vec![])]), [9; 16]), Some("slow".into()));
        assert_eq!(decide(&mut shorthand, &batch_of(vec![(2, 0, 1, vec![])]), [9; 16]), Some("errors".into()));
        // ... but a 1,030 ms trace by the latency policy.
        let mut latency = policies("    - {name: slow, type: latency, latency: {threshold_ms: 200}}\n");
        assert_eq!(decide(&mut latency, &spread, [9; 16]), Some("slow".into()));
    }

    #[test]
    fn thresholds_are_written_as_opentelemetry_tracestate() {
        assert_eq!(threshold_hex(0), "0");
        assert_eq!(threshold_hex(1 << 55), "8");
        assert_eq!(threshold_hex(threshold_for(10.0)), "e6666666666666");
        assert_eq!(threshold_for(100.0), 0);
        assert_eq!(threshold_for(0.0), RANDOMNESS_RANGE);
        assert_eq!(with_threshold("", "8"), "ot=th:8");
        assert_eq!(with_threshold("vendor=x,ot=th:c;rv:abc", "8"), "ot=th:8;rv:abc,vendor=x");
        let body = Span { trace_state: "vendor=x".into(), ..Default::default() }.encode_to_vec();
        let set = policies("    - {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 50}}\n");
        let body = set.mark(0).unwrap().body(&body).to_vec();
        let span = Span::decode(body.as_slice()).unwrap();
        assert_eq!(span.trace_state, "ot=th:8,vendor=x");
        assert_eq!(span.attributes.len(), 1);
        assert_eq!(span.attributes[0].key, POLICY_ATTRIBUTE);
    }
}
