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
use tailgate_config::{PolicyConfig, PolicyType};
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
    StringAttribute {
        /// Index into [`Policies::keys`].
        key: usize,
        matcher: Matcher,
        invert: bool,
    },
    NumericAttribute {
        /// Index into [`Policies::keys`].
        key: usize,
        min: i64,
        max: i64,
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

impl Rule {
    /// The rule of `config`; the attribute keys it reads are interned in `keys`.
    fn new(config: &PolicyConfig, keys: &mut Vec<String>) -> Rule {
        let mut intern = |key: &str| match keys.iter().position(|k| k == key) {
            Some(index) => index,
            None => {
                keys.push(key.to_string());
                keys.len() - 1
            }
        };
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
                Rule::StringAttribute {
                    key: intern(policy.map_or("", |p| p.key.as_str())),
                    matcher,
                    invert: policy.is_some_and(|p| p.invert_match),
                }
            }
            PolicyType::NumericAttribute => {
                let policy = config.numeric_attribute.as_ref();
                Rule::NumericAttribute {
                    key: intern(policy.map_or("", |p| p.key.as_str())),
                    min: policy.map_or(0, |p| p.min_value),
                    max: policy.map_or(-1, |p| p.max_value),
                    invert: policy.is_some_and(|p| p.invert_match),
                }
            }
            PolicyType::Probabilistic => {
                let percentage = config.probabilistic.as_ref().map_or(0.0, |p| p.sampling_percentage).clamp(0.0, 100.0);
                Rule::Probabilistic { threshold: threshold_for(percentage) }
            }
            PolicyType::AlwaysSample => Rule::Always,
            PolicyType::And => {
                Rule::And(config.and.iter().flat_map(|a| a.and_sub_policy.iter()).map(|c| Rule::new(c, keys)).collect())
            }
            PolicyType::Drop => Rule::Drop(
                config.drop.iter().flat_map(|d| d.drop_sub_policy.iter()).map(|c| Rule::new(c, keys)).collect(),
            ),
        }
    }

    /// Whether the rule can overrule a keep by another policy: a `drop` (veto) or an inverted
    /// attribute match (drops when the value matches). Once a trace is kept, only these still
    /// need evaluating.
    fn can_overrule(&self) -> bool {
        match self {
            Rule::Drop(_) => true,
            Rule::StringAttribute { invert, .. } | Rule::NumericAttribute { invert, .. } => *invert,
            _ => false,
        }
    }

    fn needs_attributes(&self) -> bool {
        match self {
            Rule::StringAttribute { .. } | Rule::NumericAttribute { .. } => true,
            Rule::And(subs) | Rule::Drop(subs) => subs.iter().any(Rule::needs_attributes),
            _ => false,
        }
    }

    fn evaluate(&self, trace: &TraceFacts<'_, '_>) -> Verdict {
        let sampled = |matched: bool| if matched { Verdict::Sampled } else { Verdict::NotSampled };
        let inverted = |matched: bool, invert: bool| match (matched, invert) {
            (matched, false) => sampled(matched),
            (true, true) => Verdict::InvertNotSampled,
            (false, true) => Verdict::InvertSampled,
        };
        match self {
            Rule::StatusCode(codes) => sampled(codes.iter().any(|c| trace.statuses & (1u8 << (c & 7)) != 0)),
            Rule::Latency { min_nanos, max_nanos } => {
                let duration = trace.duration_nanos();
                sampled(duration >= *min_nanos && duration <= *max_nanos)
            }
            Rule::SpanLatency { over_nanos } => sampled(trace.longest_span > *over_nanos),
            Rule::StringAttribute { key, matcher, invert } => {
                let matched = trace.attribute_values(*key).any(|value| match value {
                    AttributeValue::Str(text) => matcher.matches(text),
                    _ => false,
                });
                inverted(matched, *invert)
            }
            Rule::NumericAttribute { key, min, max, invert } => {
                let matched = trace.attribute_values(*key).any(|value| match value {
                    AttributeValue::Int(number) => (*min..=*max).contains(&number),
                    _ => false,
                });
                inverted(matched, *invert)
            }
            Rule::Probabilistic { threshold } => sampled(randomness(trace.trace_id) >= *threshold),
            Rule::Always => Verdict::Sampled,
            Rule::And(subs) => sampled(subs.iter().all(|s| is_kept(s.evaluate(trace)))),
            Rule::Drop(subs) => {
                if subs.iter().all(|s| is_kept(s.evaluate(trace))) {
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

/// What the rules look at, gathered once per trace; attributes are decoded only when a rule
/// needs them.
struct TraceFacts<'a, 'k> {
    trace_id: &'k [u8; 16],
    /// Bit `c` set when a span has status code `c`.
    statuses: u8,
    first_start: u64,
    last_end: u64,
    longest_span: u64,
    /// Each span's encoded bytes and its resource's, where attributes are looked up in place.
    attributes: Vec<(&'a [u8], Option<&'a [u8]>)>,
    /// The attribute keys the rules read ([`Policies::keys`]).
    keys: &'k [String],
    /// Per span, the value of each key (its own attribute, else its resource's): found in one
    /// walk of each span the first time a rule asks.
    values: std::cell::OnceCell<Vec<Option<AttributeValue<'a>>>>,
    /// The buffer `values` is built in (from [`Scratch`]).
    spare_values: std::cell::Cell<Vec<Option<AttributeValue<'a>>>>,
}

/// Buffers of [`Policies::decide_during`], kept by the caller for the batches' lifetime `'a`
/// and reused from trace to trace instead of allocated for each.
#[derive(Debug, Default)]
pub struct Scratch<'a> {
    attributes: Vec<(&'a [u8], Option<&'a [u8]>)>,
    values: Vec<Option<AttributeValue<'a>>>,
}

impl<'a> TraceFacts<'a, '_> {
    fn duration_nanos(&self) -> u64 {
        self.last_end.saturating_sub(self.first_start)
    }

    /// The value of key `key` ([`Policies::keys`]) on each span that has it.
    fn attribute_values(&self, key: usize) -> impl Iterator<Item = AttributeValue<'a>> + '_ {
        let width = self.keys.len().max(1);
        let values = self.values.get_or_init(|| {
            let mut values = self.spare_values.take();
            values.clear();
            values.resize(self.attributes.len() * width, None);
            for ((span, resource), found) in self.attributes.iter().zip(values.chunks_mut(width)) {
                find_attributes(span, SPAN_ATTRIBUTES, self.keys, found);
                if let Some(resource) = resource
                    && found.iter().any(Option::is_none)
                {
                    find_attributes(resource, RESOURCE_ATTRIBUTES, self.keys, found);
                }
            }
            values
        });
        values.chunks(width).filter_map(move |found| found.get(key).copied().flatten())
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
    /// The attribute keys the rules read, each once.
    keys: Vec<String>,
    marks: Vec<Mark>,
    needs_attributes: bool,
    /// The adaptive `latency` policy: its index and its per-route thresholds.
    adaptive: Option<(usize, super::adaptive::Adaptive)>,
}

impl Policies {
    /// Builds the rules (the configuration was validated by `check-config`). Without
    /// policies, the shorthand: `errors` (a span in ERROR, if `keep_errors`) and `slow` (a span
    /// lasting longer than `latency_threshold`: the product's rule before policies, which the
    /// golden sets pin; the `latency` policy type measures the whole trace, as the Collector).
    pub fn new(configs: &[PolicyConfig], keep_errors: bool, latency_threshold: std::time::Duration) -> Policies {
        let mut keys = Vec::new();
        let mut rules: Vec<(String, Rule)> =
            configs.iter().map(|c| (c.name.clone(), Rule::new(c, &mut keys))).collect();
        if configs.is_empty() {
            if keep_errors {
                rules.push(("errors".to_string(), Rule::StatusCode(vec![tailgate_ipc::batch::STATUS_CODE_ERROR])));
            }
            rules.push(("slow".to_string(), Rule::SpanLatency { over_nanos: latency_threshold.as_nanos() as u64 }));
        }
        let needs_attributes = rules.iter().any(|(_, rule)| rule.needs_attributes());
        let overrules = rules.iter().map(|(_, rule)| rule.can_overrule()).collect();
        let mut marks: Vec<Mark> = rules.iter().map(|(name, rule)| Mark::new(name, rule)).collect();
        marks.push(Mark::new(super::incident::INCIDENT_REASON, &Rule::Always));
        let adaptive = configs.iter().enumerate().find_map(|(index, config)| {
            let latency = config.latency.as_ref().filter(|_| config.kind == tailgate_config::PolicyType::Latency)?;
            let adaptive = latency.adaptive.as_ref()?;
            let stored = tailgate_ipc::decisions::RouteThresholds::default();
            Some((index, super::adaptive::Adaptive::new(latency.threshold_ms, adaptive, &stored)))
        });
        Policies { rules, overrules, keys, marks, needs_attributes, adaptive }
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

    /// Decides a trace on its spans (`(batch, index)` pairs): the index of the policy that kept
    /// it, or `None` when it is dropped.
    pub fn decide(&mut self, trace_id: &[u8; 16], spans: &[(&ArchivedSpanBatch, u32)]) -> Option<usize> {
        self.decide_during(trace_id, spans, None, &mut Scratch::default())
    }

    /// Like [`Policies::decide`], with an open incident window: a trace it covers is kept
    /// (reason [`Policies::incident_index`]) unless a `drop` policy vetoes it.
    pub fn decide_during<'a>(
        &mut self,
        trace_id: &[u8; 16],
        spans: &[(&'a ArchivedSpanBatch, u32)],
        incident: Option<&super::incident::Incident>,
        scratch: &mut Scratch<'a>,
    ) -> Option<usize> {
        let mut attributes = std::mem::take(&mut scratch.attributes);
        attributes.clear();
        // The rules' keys, lent to the facts while the rules run.
        let keys = std::mem::take(&mut self.keys);
        let mut facts = TraceFacts {
            trace_id,
            statuses: 0,
            first_start: u64::MAX,
            last_end: 0,
            longest_span: 0,
            attributes,
            keys: &keys,
            values: std::cell::OnceCell::new(),
            spare_values: std::cell::Cell::new(std::mem::take(&mut scratch.values)),
        };
        let kept_by = self.judge(&mut facts, spans, incident);
        scratch.values = facts.values.into_inner().unwrap_or_else(|| facts.spare_values.take());
        scratch.attributes = facts.attributes;
        self.keys = keys;
        kept_by
    }

    fn judge<'a>(
        &mut self,
        facts: &mut TraceFacts<'a, '_>,
        spans: &[(&'a ArchivedSpanBatch, u32)],
        incident: Option<&super::incident::Incident>,
    ) -> Option<usize> {
        let needs_route = self.adaptive.is_some() || incident.is_some_and(|i| !i.routes.is_empty());
        let needs_attributes = self.needs_attributes;
        let mut root_route: Option<String> = None;
        for (batch, index) in spans {
            let Some(span) = batch.spans.get(*index as usize) else { continue };
            facts.statuses |= 1u8 << (span.status_code & 7);
            let (start, end) = (span.start_unix_nano.to_native(), span.end_unix_nano.to_native());
            // A span without a start time says nothing about the trace's extent.
            if start != 0 {
                facts.first_start = facts.first_start.min(start);
                facts.last_end = facts.last_end.max(end);
            }
            let duration = span_duration(start, end);
            facts.longest_span = facts.longest_span.max(duration);
            let body = span.body.as_slice();
            if needs_route && span.parent_span_id == [0u8; 8] {
                let route = match find_attribute(body, SPAN_ATTRIBUTES, "http.route") {
                    Some(AttributeValue::Str(route)) => route,
                    _ => span.name.as_str(),
                };
                root_route = Some(route.to_owned());
            }
            if needs_attributes {
                let resource = batch
                    .scopes
                    .get(span.scope.to_native() as usize)
                    .and_then(|scope| batch.resources.get(scope.resource.to_native() as usize))
                    .map(|resource| resource.resource.as_slice());
                facts.attributes.push((body, resource));
            }
        }
        // The adaptive policy judges by its route's current threshold, then counts the trace.
        let adaptive = self.adaptive.as_mut().map(|(index, adaptive)| {
            let duration = facts.duration_nanos();
            let threshold = adaptive.threshold_ms(root_route.as_deref()).saturating_mul(1_000_000);
            if let Some(route) = &root_route {
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
                _ => rule.evaluate(facts),
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
            && incident.covers(root_route.as_deref())
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
