//! OTLP metrics to Prometheus series, with the OpenTelemetry-to-Prometheus naming the
//! Collector's and Prometheus' own translators use: name tokens joined by `_`, the unit as a
//! suffix (`ms` -> `milliseconds`, units in braces dropped), `_total` on monotonic sums, `ratio`
//! for gauges of unit `1`; histograms as `_bucket{le}`, `_sum`, `_count`; summaries as
//! `{quantile}`, `_sum`, `_count`. Data point attributes become labels (invalid characters ->
//! `_`), the resource's `service.name` becomes `job` (with `service.namespace/` when set) and
//! `service.instance.id` becomes `instance`. Exemplars of a histogram point go on the first
//! bucket whose bound holds their value, with `trace_id` and `span_id` labels. Exponential
//! histograms and delta sums have no remote-write 1.0 form: they are counted as unsupported.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Exemplar as OtlpExemplar, exemplar, metric, number_data_point,
};

use super::proto::{Exemplar, Label, Sample};

/// Series built from one or more OTLP requests: labels (sorted) -> samples and exemplars.
#[derive(Debug, Default)]
pub struct Converted {
    /// The series.
    pub series: BTreeMap<Vec<Label>, (Vec<Sample>, Vec<Exemplar>)>,
    /// Data points that have no remote-write form, per reason.
    pub unsupported: BTreeMap<&'static str, u64>,
}

/// The Prometheus name of an OTLP metric.
pub fn metric_name(name: &str, unit: &str, monotonic_sum: bool, gauge: bool) -> String {
    let mut tokens: Vec<String> =
        name.split(|c: char| !c.is_ascii_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_owned).collect();
    let unit_tokens = unit_suffix(unit, gauge);
    for token in unit_tokens {
        if !tokens.contains(&token) {
            tokens.push(token);
        }
    }
    if monotonic_sum {
        tokens.retain(|t| t != "total");
        tokens.push("total".to_owned());
    }
    let mut out = tokens.join("_");
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "%" => "percent",
        _ => return None,
    })
}

/// Suffix tokens of a unit: `ms` -> [milliseconds], `By/s` -> [bytes, per, second], braces
/// dropped, `1` -> [ratio] for gauges.
fn unit_suffix(unit: &str, gauge: bool) -> Vec<String> {
    let without_braces: String = {
        let mut depth = 0;
        unit.chars()
            .filter(|c| {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => return depth == 0,
                }
                false
            })
            .collect()
    };
    let unit = without_braces.trim();
    if unit == "1" {
        return if gauge { vec!["ratio".to_owned()] } else { Vec::new() };
    }
    let (main, per) = unit.split_once('/').map_or((unit, None), |(m, p)| (m, Some(p)));
    let mut out = Vec::new();
    let word = |u: &str| {
        unit_word(u).map(str::to_owned).or_else(|| {
            let cleaned: String = u.chars().filter(char::is_ascii_alphanumeric).collect();
            (!cleaned.is_empty()).then_some(cleaned)
        })
    };
    if let Some(main) = word(main) {
        out.push(main);
    }
    if let Some(per) = per.and_then(|p| {
        let singular = match p {
            "s" => Some("second"),
            "m" => Some("minute"),
            "h" => Some("hour"),
            "d" => Some("day"),
            _ => None,
        };
        singular.map(str::to_owned).or_else(|| word(p))
    }) {
        out.push("per".to_owned());
        out.push(per);
    }
    out
}

/// A label name Prometheus accepts: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`.
pub fn label_name(key: &str) -> String {
    let mut out: String = key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "key_");
    } else if out.starts_with("__") {
        out.insert_str(0, "key");
    }
    out
}

fn text_of(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).map(|kv| text_of(kv.value.as_ref())).filter(|v| !v.is_empty())
}

/// Labels of a resource: `job` and `instance`.
fn resource_labels(attributes: &[KeyValue]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(service) = attribute(attributes, "service.name") {
        let job = match attribute(attributes, "service.namespace") {
            Some(namespace) => format!("{namespace}/{service}"),
            None => service,
        };
        out.push(("job".to_owned(), job));
    }
    if let Some(instance) = attribute(attributes, "service.instance.id") {
        out.push(("instance".to_owned(), instance));
    }
    out
}

/// Formats a bucket bound or quantile as Prometheus does.
fn float_label(value: f64) -> String {
    if value.is_infinite() && value > 0.0 { "+Inf".to_owned() } else { format!("{value}") }
}

impl Converted {
    /// Adds every data point of `request`; point times of 0 read as `now_ms`.
    pub fn add(&mut self, request: &ExportMetricsServiceRequest, now_ms: i64) {
        for resource in &request.resource_metrics {
            let base = resource.resource.as_ref().map(|r| resource_labels(&r.attributes)).unwrap_or_default();
            for scope in &resource.scope_metrics {
                for metric in &scope.metrics {
                    self.add_metric(metric, &base, now_ms);
                }
            }
        }
    }

    fn push(
        &mut self,
        name: &str,
        base: &[(String, String)],
        attributes: &[KeyValue],
        extra: Option<(&str, String)>,
        sample: Sample,
    ) -> &mut Vec<Exemplar> {
        let mut labels: BTreeMap<String, String> = base.iter().cloned().collect();
        for kv in attributes {
            labels.insert(label_name(&kv.key), text_of(kv.value.as_ref()));
        }
        if let Some((key, value)) = extra {
            labels.insert(key.to_owned(), value);
        }
        labels.insert("__name__".to_owned(), name.to_owned());
        let labels: Vec<Label> = labels.into_iter().map(|(name, value)| Label { name, value }).collect();
        let entry = self.series.entry(labels).or_default();
        entry.0.push(sample);
        &mut entry.1
    }

    fn unsupported(&mut self, reason: &'static str, points: usize) {
        *self.unsupported.entry(reason).or_default() += points as u64;
    }

    fn add_metric(
        &mut self,
        metric: &opentelemetry_proto::tonic::metrics::v1::Metric,
        base: &[(String, String)],
        now_ms: i64,
    ) {
        let time = |nanos: u64| if nanos == 0 { now_ms } else { i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX) };
        let number = |value: &Option<number_data_point::Value>| match value {
            Some(number_data_point::Value::AsDouble(d)) => *d,
            Some(number_data_point::Value::AsInt(i)) => *i as f64,
            None => f64::NAN,
        };
        match &metric.data {
            Some(metric::Data::Gauge(gauge)) => {
                let name = metric_name(&metric.name, &metric.unit, false, true);
                for point in &gauge.data_points {
                    let sample = Sample { value: number(&point.value), timestamp: time(point.time_unix_nano) };
                    self.push(&name, base, &point.attributes, None, sample);
                }
            }
            Some(metric::Data::Sum(sum)) => {
                if sum.aggregation_temporality == AggregationTemporality::Delta as i32 {
                    return self.unsupported("delta_temporality", sum.data_points.len());
                }
                let name = metric_name(&metric.name, &metric.unit, sum.is_monotonic, !sum.is_monotonic);
                for point in &sum.data_points {
                    let sample = Sample { value: number(&point.value), timestamp: time(point.time_unix_nano) };
                    self.push(&name, base, &point.attributes, None, sample);
                }
            }
            Some(metric::Data::Histogram(histogram)) => {
                if histogram.aggregation_temporality == AggregationTemporality::Delta as i32 {
                    return self.unsupported("delta_temporality", histogram.data_points.len());
                }
                let name = metric_name(&metric.name, &metric.unit, false, false);
                for point in &histogram.data_points {
                    let timestamp = time(point.time_unix_nano);
                    let mut cumulative = 0u64;
                    let bounds = point.explicit_bounds.iter().copied().chain(std::iter::once(f64::INFINITY));
                    let mut placed = vec![false; point.exemplars.len()];
                    for (bound, count) in bounds.zip(point.bucket_counts.iter()) {
                        cumulative += count;
                        let sample = Sample { value: cumulative as f64, timestamp };
                        let le = Some(("le", float_label(bound)));
                        let exemplars = self.push(&format!("{name}_bucket"), base, &point.attributes, le, sample);
                        for (index, otlp) in point.exemplars.iter().enumerate() {
                            let value = exemplar_value(otlp);
                            if !placed[index] && value <= bound {
                                placed[index] = true;
                                exemplars.push(exemplar_of(otlp, value, timestamp));
                            }
                        }
                    }
                    let sum = Sample { value: point.sum.unwrap_or(0.0), timestamp };
                    self.push(&format!("{name}_sum"), base, &point.attributes, None, sum);
                    let count = Sample { value: point.count as f64, timestamp };
                    self.push(&format!("{name}_count"), base, &point.attributes, None, count);
                }
            }
            Some(metric::Data::Summary(summary)) => {
                let name = metric_name(&metric.name, &metric.unit, false, false);
                for point in &summary.data_points {
                    let timestamp = time(point.time_unix_nano);
                    for quantile in &point.quantile_values {
                        let sample = Sample { value: quantile.value, timestamp };
                        let label = Some(("quantile", float_label(quantile.quantile)));
                        self.push(&name, base, &point.attributes, label, sample);
                    }
                    self.push(
                        &format!("{name}_sum"),
                        base,
                        &point.attributes,
                        None,
                        Sample { value: point.sum, timestamp },
                    );
                    let count = Sample { value: point.count as f64, timestamp };
                    self.push(&format!("{name}_count"), base, &point.attributes, None, count);
                }
            }
            Some(metric::Data::ExponentialHistogram(histogram)) => {
                self.unsupported("exponential_histogram", histogram.data_points.len());
            }
            None => {}
        }
    }
}

fn exemplar_value(exemplar: &OtlpExemplar) -> f64 {
    match exemplar.value {
        Some(exemplar::Value::AsDouble(d)) => d,
        Some(exemplar::Value::AsInt(i)) => i as f64,
        None => 0.0,
    }
}

fn exemplar_of(otlp: &OtlpExemplar, value: f64, point_ms: i64) -> Exemplar {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut labels = Vec::new();
    if !otlp.span_id.is_empty() {
        labels.push(Label { name: "span_id".into(), value: hex(&otlp.span_id) });
    }
    if !otlp.trace_id.is_empty() {
        labels.push(Label { name: "trace_id".into(), value: hex(&otlp.trace_id) });
    }
    let timestamp = if otlp.time_unix_nano == 0 { point_ms } else { (otlp.time_unix_nano / 1_000_000) as i64 };
    Exemplar { labels, value, timestamp }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_otel_to_prometheus_translation() {
        assert_eq!(metric_name("traces.span.metrics.calls", "", true, false), "traces_span_metrics_calls_total");
        assert_eq!(
            metric_name("traces.span.metrics.duration", "ms", false, false),
            "traces_span_metrics_duration_milliseconds"
        );
        assert_eq!(metric_name("app.requests", "{request}", true, false), "app_requests_total");
        assert_eq!(metric_name("http.server.request.size", "By", false, false), "http_server_request_size_bytes");
        assert_eq!(metric_name("system.cpu.utilization", "1", false, true), "system_cpu_utilization_ratio");
        assert_eq!(metric_name("net.io", "By/s", false, true), "net_io_bytes_per_second");
        assert_eq!(metric_name("queue.total", "", true, false), "queue_total");
        assert_eq!(label_name("service.name"), "service_name");
        assert_eq!(label_name("__private"), "key__private");
        assert_eq!(label_name("9lives"), "key_9lives");
    }
}
