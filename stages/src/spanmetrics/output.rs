//! The OTLP metrics request a flush writes: one resource per service, with the calls sum and the
//! duration histogram (exemplars on the histogram points), both cumulative.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    exemplar, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::series::{SeriesKey, SeriesState};
use super::{CALLS_METRIC, DURATION_METRIC, Exemplar};

fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

/// The connector's text for an OTLP span kind.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "SPAN_KIND_INTERNAL",
        2 => "SPAN_KIND_SERVER",
        3 => "SPAN_KIND_CLIENT",
        4 => "SPAN_KIND_PRODUCER",
        5 => "SPAN_KIND_CONSUMER",
        _ => "SPAN_KIND_UNSPECIFIED",
    }
}

/// The connector's text for an OTLP status code.
pub fn status_name(status: u8) -> &'static str {
    match status {
        1 => "STATUS_CODE_OK",
        2 => "STATUS_CODE_ERROR",
        _ => "STATUS_CODE_UNSET",
    }
}

fn attributes(key: &SeriesKey) -> Vec<KeyValue> {
    if key.overflow {
        return vec![string_attribute("otel.metric.overflow", "true")];
    }
    let mut out = vec![
        string_attribute("service.name", &key.service),
        string_attribute("span.name", &key.span_name),
        string_attribute("span.kind", kind_name(key.kind)),
        string_attribute("status.code", status_name(key.status)),
    ];
    out.extend(key.dimensions.iter().map(|(name, value)| string_attribute(name, value)));
    out
}

fn exemplar_of(exemplar: &Exemplar) -> opentelemetry_proto::tonic::metrics::v1::Exemplar {
    opentelemetry_proto::tonic::metrics::v1::Exemplar {
        time_unix_nano: exemplar.time_unix_nano,
        span_id: exemplar.span_id.to_vec(),
        trace_id: exemplar.trace_id.to_vec(),
        value: Some(exemplar::Value::AsDouble(exemplar.value_ms)),
        ..Default::default()
    }
}

/// Builds the request for the series changed in a flush.
pub fn request(
    series: &[(SeriesKey, SeriesState, Vec<Exemplar>)],
    bounds_ms: &[f64],
    now_unix_nano: u64,
) -> ExportMetricsServiceRequest {
    let mut by_service: BTreeMap<&str, (Vec<NumberDataPoint>, Vec<HistogramDataPoint>)> = BTreeMap::new();
    for (key, state, exemplars) in series {
        let (calls, durations) = by_service.entry(key.service.as_str()).or_default();
        let attributes = attributes(key);
        calls.push(NumberDataPoint {
            attributes: attributes.clone(),
            start_time_unix_nano: state.start_unix_nano,
            time_unix_nano: now_unix_nano,
            value: Some(number_data_point::Value::AsInt(i64::try_from(state.calls).unwrap_or(i64::MAX))),
            ..Default::default()
        });
        durations.push(HistogramDataPoint {
            attributes,
            start_time_unix_nano: state.start_unix_nano,
            time_unix_nano: now_unix_nano,
            count: state.calls,
            sum: Some(state.sum_ms),
            bucket_counts: state.buckets.clone(),
            explicit_bounds: bounds_ms.to_vec(),
            exemplars: exemplars.iter().map(exemplar_of).collect(),
            ..Default::default()
        });
    }
    let cumulative = AggregationTemporality::Cumulative as i32;
    let resource_metrics = by_service
        .into_iter()
        .map(|(service, (calls, durations))| ResourceMetrics {
            resource: Some(Resource {
                attributes: if service.is_empty() {
                    Vec::new()
                } else {
                    vec![string_attribute("service.name", service)]
                },
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope { name: "tailgate/spanmetrics".into(), ..Default::default() }),
                metrics: vec![
                    Metric {
                        name: CALLS_METRIC.into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: calls,
                            aggregation_temporality: cumulative,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    },
                    Metric {
                        name: DURATION_METRIC.into(),
                        unit: "ms".into(),
                        data: Some(metric::Data::Histogram(Histogram {
                            data_points: durations,
                            aggregation_temporality: cumulative,
                        })),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}
