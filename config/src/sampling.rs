//! Tail sampling policies, in the shape of the OpenTelemetry Collector's `tail_sampling`
//! processor (`tail_sample.policies`, each with a `name` and a `type` and the section of that
//! type). The skeleton's `keep_errors` / `latency_threshold` remain as shorthand for a
//! `status_code` and a `latency` policy when no policies are configured.

use serde::{Deserialize, Serialize};

use crate::Problems;

/// One policy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Name, reported with every trace the policy keeps.
    pub name: String,
    /// Which section below applies.
    #[serde(rename = "type")]
    pub kind: PolicyType,
    /// `status_code`: keep a trace with a span in one of these statuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<StatusCodePolicy>,
    /// `latency`: keep a trace lasting at least `threshold_ms` (first start to last end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyPolicy>,
    /// `string_attribute`: keep a trace with a span or resource attribute matching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_attribute: Option<StringAttributePolicy>,
    /// `numeric_attribute`: keep a trace with an integer attribute in a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric_attribute: Option<NumericAttributePolicy>,
    /// `probabilistic`: keep this share of traces, decided on the trace id alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probabilistic: Option<ProbabilisticPolicy>,
    /// `and`: keep when every sub-policy keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub and: Option<AndPolicy>,
    /// `drop`: drop (veto every other policy) when every sub-policy matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropPolicy>,
}

/// The policy types.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyType {
    /// See [`StatusCodePolicy`].
    StatusCode,
    /// See [`LatencyPolicy`].
    Latency,
    /// See [`StringAttributePolicy`].
    StringAttribute,
    /// See [`NumericAttributePolicy`].
    NumericAttribute,
    /// See [`ProbabilisticPolicy`].
    Probabilistic,
    /// Keep every trace.
    AlwaysSample,
    /// See [`AndPolicy`].
    And,
    /// See [`DropPolicy`].
    Drop,
}

/// Span status codes, as the Collector spells them.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum StatusCode {
    /// `STATUS_CODE_UNSET`.
    #[serde(rename = "UNSET")]
    Unset,
    /// `STATUS_CODE_OK`.
    #[serde(rename = "OK")]
    Ok,
    /// `STATUS_CODE_ERROR`.
    #[serde(rename = "ERROR")]
    Error,
}

impl PolicyType {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyType::StatusCode => "status_code",
            PolicyType::Latency => "latency",
            PolicyType::StringAttribute => "string_attribute",
            PolicyType::NumericAttribute => "numeric_attribute",
            PolicyType::Probabilistic => "probabilistic",
            PolicyType::AlwaysSample => "always_sample",
            PolicyType::And => "and",
            PolicyType::Drop => "drop",
        }
    }
}

impl StatusCode {
    /// The OTLP wire value.
    pub fn wire(self) -> u8 {
        match self {
            StatusCode::Unset => 0,
            StatusCode::Ok => 1,
            StatusCode::Error => 2,
        }
    }
}

/// `status_code` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatusCodePolicy {
    /// Statuses that keep the trace.
    pub status_codes: Vec<StatusCode>,
}

/// `latency` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatencyPolicy {
    /// Keep traces lasting at least this long (milliseconds).
    pub threshold_ms: u64,
    /// And at most this long, when above zero.
    #[serde(default)]
    pub upper_threshold_ms: u64,
    /// Lift the threshold per route while the route's latency quantile nears it (top-level
    /// `latency` policies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveLatency>,
}

/// `latency.adaptive`: per route (the root span's `http.route`, else its name), the latency
/// `quantile` of the traces decided over `window` is tracked; when it comes within `margin_ms`
/// of the route's threshold, the threshold is lifted by `step_ms` (at most `max_threshold_ms`);
/// when it is back below the next lower threshold minus the margin, it steps back (never below
/// `threshold_ms`). One step per half window at most, and only on `min_samples` traces.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveLatency {
    /// The tracked quantile (0.95: p95).
    pub quantile: f64,
    /// The window the quantile is taken over (two halves; it moves by half a window).
    #[serde(with = "humantime_serde")]
    pub window: std::time::Duration,
    /// Lift when the quantile is within this of the threshold (milliseconds).
    pub margin_ms: u64,
    /// Size of one step (milliseconds).
    pub step_ms: u64,
    /// Highest threshold (milliseconds); 0: twice `threshold_ms`.
    pub max_threshold_ms: u64,
    /// Traces a route needs in the window before its threshold moves.
    pub min_samples: u64,
    /// Routes tracked; traces of further routes use `threshold_ms`.
    pub max_routes: usize,
}

impl Default for AdaptiveLatency {
    fn default() -> Self {
        AdaptiveLatency {
            quantile: 0.95,
            window: std::time::Duration::from_secs(300),
            margin_ms: 25,
            step_ms: 25,
            max_threshold_ms: 0,
            min_samples: 50,
            max_routes: 256,
        }
    }
}

/// `string_attribute` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StringAttributePolicy {
    /// Attribute key (span attributes first, then the resource's).
    pub key: String,
    /// Values that match (exactly, or as regular expressions with `enabled_regex_matching`).
    pub values: Vec<String>,
    /// Treat `values` as regular expressions (anchored at both ends).
    #[serde(default)]
    pub enabled_regex_matching: bool,
    /// Keep traces that do *not* match, and veto those that do.
    #[serde(default)]
    pub invert_match: bool,
}

/// `numeric_attribute` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NumericAttributePolicy {
    /// Attribute key (integer values; span attributes first, then the resource's).
    pub key: String,
    /// Smallest value that matches.
    pub min_value: i64,
    /// Largest value that matches.
    pub max_value: i64,
    /// Keep traces that do *not* match, and veto those that do.
    #[serde(default)]
    pub invert_match: bool,
}

/// `probabilistic` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProbabilisticPolicy {
    /// Share of traces kept, in percent.
    pub sampling_percentage: f64,
}

/// `and` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AndPolicy {
    /// Every one must keep the trace.
    pub and_sub_policy: Vec<PolicyConfig>,
}

/// `drop` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DropPolicy {
    /// When every one matches, the trace is dropped whatever the other policies say.
    pub drop_sub_policy: Vec<PolicyConfig>,
}

impl PolicyConfig {
    /// Attribute tests (`string_attribute` and `numeric_attribute`) in this policy and its
    /// sub-policies.
    pub fn attribute_tests(&self) -> usize {
        let own = usize::from(matches!(self.kind, PolicyType::StringAttribute | PolicyType::NumericAttribute));
        let subs = self.and.iter().flat_map(|a| a.and_sub_policy.iter());
        let subs = subs.chain(self.drop.iter().flat_map(|d| d.drop_sub_policy.iter()));
        own + subs.map(PolicyConfig::attribute_tests).sum::<usize>()
    }

    fn section_present(&self) -> bool {
        match self.kind {
            PolicyType::StatusCode => self.status_code.is_some(),
            PolicyType::Latency => self.latency.is_some(),
            PolicyType::StringAttribute => self.string_attribute.is_some(),
            PolicyType::NumericAttribute => self.numeric_attribute.is_some(),
            PolicyType::Probabilistic => self.probabilistic.is_some(),
            PolicyType::AlwaysSample => true,
            PolicyType::And => self.and.is_some(),
            PolicyType::Drop => self.drop.is_some(),
        }
    }

    pub(crate) fn validate(&self, path: &str, problems: &mut Problems) {
        if self.name.is_empty() {
            problems.add(path, "a policy needs a name");
        }
        if !self.section_present() {
            let section = self.kind.as_str();
            problems.add(path, &format!("type {section} needs its section `{section}:`"));
            return;
        }
        if let Some(p) = &self.probabilistic
            && !(0.0..=100.0).contains(&p.sampling_percentage)
        {
            problems.add(&format!("{path}.probabilistic.sampling_percentage"), "must be within 0..=100");
        }
        if let Some(adaptive) = self.latency.as_ref().and_then(|l| l.adaptive.as_ref()) {
            let at = format!("{path}.latency.adaptive");
            if !(adaptive.quantile > 0.0 && adaptive.quantile < 1.0) {
                problems.add(&format!("{at}.quantile"), "must be between 0 and 1 (0.95: p95)");
            }
            if adaptive.step_ms == 0 {
                problems.add(&format!("{at}.step_ms"), "must be above 0");
            }
            if adaptive.window < std::time::Duration::from_secs(1) {
                problems.add(&format!("{at}.window"), "must be at least 1s");
            }
            let threshold = self.latency.as_ref().map_or(0, |l| l.threshold_ms);
            if adaptive.max_threshold_ms != 0 && adaptive.max_threshold_ms < threshold {
                problems.add(&format!("{at}.max_threshold_ms"), "must not be below threshold_ms");
            }
        }
        if let Some(p) = &self.latency
            && p.upper_threshold_ms > 0
            && p.upper_threshold_ms < p.threshold_ms
        {
            problems.add(&format!("{path}.latency.upper_threshold_ms"), "must be above threshold_ms (or 0: none)");
        }
        if let Some(p) = &self.numeric_attribute
            && p.max_value < p.min_value
        {
            problems.add(&format!("{path}.numeric_attribute.max_value"), "must not be below min_value");
        }
        if let Some(p) = &self.string_attribute {
            if p.values.is_empty() {
                problems.add(&format!("{path}.string_attribute.values"), "needs at least one value");
            }
            if p.enabled_regex_matching {
                for (i, value) in p.values.iter().enumerate() {
                    if let Err(err) = regex::Regex::new(value) {
                        problems.add(&format!("{path}.string_attribute.values[{i}]"), &err.to_string());
                    }
                }
            }
        }
        let subs = match (&self.and, &self.drop) {
            (Some(and), _) if self.kind == PolicyType::And => Some((&and.and_sub_policy, "and.and_sub_policy")),
            (_, Some(drop)) if self.kind == PolicyType::Drop => Some((&drop.drop_sub_policy, "drop.drop_sub_policy")),
            _ => None,
        };
        if let Some((subs, field)) = subs {
            if subs.is_empty() {
                problems.add(&format!("{path}.{field}"), "needs at least one sub-policy");
            }
            for (i, sub) in subs.iter().enumerate() {
                if sub.latency.as_ref().is_some_and(|l| l.adaptive.is_some()) {
                    problems.add(
                        &format!("{path}.{field}[{i}].latency.adaptive"),
                        "only a top-level latency policy adapts",
                    );
                }
                if matches!(sub.kind, PolicyType::And | PolicyType::Drop) {
                    problems.add(&format!("{path}.{field}[{i}]"), "and/drop cannot be nested");
                } else {
                    sub.validate(&format!("{path}.{field}[{i}]"), problems);
                }
            }
        }
    }
}
