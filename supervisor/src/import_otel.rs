//! `tailgate import-otel-config FILE`: translates an OpenTelemetry Collector configuration into
//! a tailgate configuration, and names everything it could not map.
//!
//! The collector's file is read as data; each key that has a tailgate counterpart is moved into
//! the new configuration and removed from the input, so whatever is left at the end is exactly
//! what was not mapped, reported with its path (and a hint where tailgate does the job another
//! way). Pipelines decide where exporters go: the OTLP exporter of a traces pipeline becomes
//! `exporters.traces.otlp`, a `loki` exporter of a logs pipeline `exporters.logs.loki`, and so
//! on. The result is deserialized into [`Config`] (so an unknown key is a bug here, not in the
//! output), validated, and written out as a complete configuration.

use serde_json::{Value, json};
use tailgate_config::Config;

/// The translation and what it could not carry over.
#[derive(Debug)]
pub struct Translation {
    /// The tailgate configuration, as YAML.
    pub yaml: String,
    /// Collector keys that were not mapped, each with its path and, where there is one, the
    /// tailgate way of doing the same.
    pub unmapped: Vec<String>,
    /// Problems `tailgate check-config` would report (e.g. certificate files missing here).
    pub problems: Vec<String>,
}

/// Hints for keys that tailgate covers differently, by the key's last path segments.
const HINTS: &[(&str, &str)] = &[
    ("tail_sampling.num_traces", "the pending-trace index is bounded by bytes: tail_sample.max_pending_bytes"),
    ("tail_sampling.expected_new_traces_per_sec", "not needed: the index grows and shrinks with the traffic"),
    (
        "tail_sampling.decision_cache",
        "decisions are kept by time: tail_sample.decision_cache_ttl and kept_decision_ttl",
    ),
    ("sending_queue.queue_size", "the queue is on disk and sized in bytes: queue.max_size_mib"),
    ("sending_queue.num_consumers", "one consumer per destination, in order"),
    (
        "retry_on_failure.max_elapsed_time",
        "tailgate retries until the backend takes or refuses the data; refused items go to the dead-letter store",
    ),
    ("batch.send_batch_max_size", "requests are capped by size (3 MiB) and split when a backend refuses them"),
    (
        "memory_limiter.limit_percentage",
        "budgets are absolute: supervisor.memory_soft_limit_mib / memory_hard_limit_mib",
    ),
    (
        "memory_limiter.spike_limit_percentage",
        "budgets are absolute: supervisor.memory_soft_limit_mib / memory_hard_limit_mib",
    ),
    ("spanmetrics.namespace", "span metrics are named traces.span.metrics.* (traces_span_metrics_* in Prometheus)"),
    ("extensions.health_check", "the supervisor serves /healthz and /readyz on supervisor.telemetry.endpoint"),
    (
        "receivers.hostmetrics",
        "not collected: tailgate reports its own processes in its self-metrics; run a node exporter for the host",
    ),
    (
        "processors.attributes",
        "not offered: set attributes at the source (SDK resource, filelog `attributes` / `resource`)",
    ),
    ("processors.resource", "not offered: set attributes at the source (SDK resource, filelog `resource`)"),
    ("exporters.otlphttp", "tailgate exports OTLP over gRPC: point exporters.*.otlp at the backend's gRPC port (4317)"),
    ("exporters.debug", "not exported; `tailgate status` and the self-metrics show what flows"),
    ("exporters.logging", "not exported; `tailgate status` and the self-metrics show what flows"),
    ("tls.insecure_skip_verify", "not offered: trust the backend's CA with tls.ca_file"),
    ("external_labels", "not offered: add the labels as resource attributes at the source"),
    (
        "resource_to_telemetry_conversion",
        "resource attributes become labels of span metrics through spanmetrics.dimensions",
    ),
];

fn hint_for(path: &str) -> Option<&'static str> {
    HINTS.iter().find(|(suffix, _)| path.ends_with(suffix) || path.contains(&format!("{suffix}."))).map(|(_, h)| *h)
}

/// Leftover keys of `value` under `path`, as paths (objects are walked; anything else is a leaf).
fn leftovers(path: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, inner) in map {
                leftovers(&format!("{path}.{key}"), inner, out);
            }
        }
        Value::Object(_) | Value::Null => {}
        _ => out.push(path.to_owned()),
    }
}

/// Removes and returns `object[key]` (when `object` is an object holding it).
fn take(object: &mut Value, key: &str) -> Option<Value> {
    object.as_object_mut()?.remove(key)
}

/// Sets `target[path...] = value`, creating objects on the way.
fn put(target: &mut Value, path: &[&str], value: Value) {
    let mut at = target;
    for part in &path[..path.len() - 1] {
        if !at.is_object() {
            *at = json!({});
        }
        if !at.get(*part).is_some_and(Value::is_object) {
            at[*part] = json!({});
        }
        at = &mut at[*part];
    }
    if !at.is_object() {
        *at = json!({});
    }
    at[path[path.len() - 1]] = value;
}

/// Moves `source[from]` to `target[to...]` when present, converted by `convert`.
fn carry(
    source: &mut Value,
    from: &str,
    target: &mut Value,
    to: &[&str],
    convert: impl FnOnce(Value) -> Option<Value>,
) {
    if let Some(value) = take(source, from) {
        match convert(value.clone()) {
            Some(converted) => put(target, to, converted),
            // Left where it was: the leftovers name it as not mapped.
            None => put(source, &[from], value),
        }
    }
}

fn same(value: Value) -> Option<Value> {
    Some(value)
}

/// `${NAME}` (the Collector's older form) as `${env:NAME}`, in every string.
fn env_references(value: &mut Value) {
    match value {
        Value::String(text) => {
            let mut out = String::with_capacity(text.len());
            let mut rest = text.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                match after.find('}') {
                    Some(end) if !after[..end].contains(':') && !after[..end].is_empty() => {
                        out.push_str(&format!("${{env:{}}}", &after[..end]));
                        rest = &after[end + 1..];
                    }
                    _ => {
                        out.push_str("${");
                        rest = after;
                    }
                }
            }
            out.push_str(rest);
            *text = out;
        }
        Value::Array(items) => items.iter_mut().for_each(env_references),
        Value::Object(map) => map.values_mut().for_each(env_references),
        _ => {}
    }
}

/// The component type of an id (`otlp/jaeger` is an `otlp`).
fn kind_of(id: &str) -> &str {
    id.split('/').next().unwrap_or(id)
}

struct Importer {
    input: Value,
    output: Value,
    unmapped: Vec<String>,
    /// Components (`exporters.otlp/jaeger`) that were carried over: their leftover keys are
    /// listed one by one, other components as a whole.
    mapped: std::collections::BTreeSet<String>,
    /// Whether tail_sampling policies were carried over.
    sampling: bool,
    /// Each exporter as the Collector's file has it, taken once: a destination maps from a
    /// copy, so one exporter can serve several pipelines.
    exporters: std::collections::BTreeMap<String, Value>,
    /// What no destination used of each exporter.
    exporter_leftovers: std::collections::BTreeMap<String, Value>,
}

impl Importer {
    fn note(&mut self, path: &str, why: &str) {
        self.unmapped.push(format!("{path}: {why}"));
    }

    fn receivers(&mut self, used: &[String]) {
        let Some(mut receivers) = self.input.get_mut("receivers").map(Value::take) else { return };
        let ids: Vec<String> = receivers.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        let (mut otlp_done, mut filelog_done) = (false, false);
        for id in ids {
            if !used.contains(&id) {
                continue;
            }
            let path = format!("receivers.{id}");
            let Some(mut receiver) = take(&mut receivers, &id) else { continue };
            let first = match kind_of(&id) {
                "otlp" => !otlp_done,
                "filelog" => !filelog_done,
                _ => false,
            };
            if first {
                self.mapped.insert(path.clone());
            } else if matches!(kind_of(&id), "otlp" | "filelog") {
                self.note(&path, "a second receiver of this kind is not mapped (one per kind)");
                put(&mut receivers, &[&id], json!({}));
                continue;
            }
            match kind_of(&id) {
                "otlp" if !otlp_done => {
                    otlp_done = true;
                    let mut protocols = take(&mut receiver, "protocols").unwrap_or(json!({}));
                    let out = &mut self.output;
                    put(out, &["receivers", "otlp", "protocols"], json!({}));
                    // The size limit's key and conversion differ: gRPC in MiB, HTTP in bytes.
                    let mib = |v: Value| v.as_u64().map(|bytes| json!(bytes.div_ceil(1 << 20).max(1)));
                    for (name, default_endpoint, size_from, size_to, size) in [
                        (
                            "grpc",
                            "127.0.0.1:4317",
                            "max_recv_msg_size_mib",
                            "max_recv_msg_size_mib",
                            same as fn(Value) -> Option<Value>,
                        ),
                        ("http", "127.0.0.1:4318", "max_request_body_size", "max_request_body_size_mib", mib),
                    ] {
                        let Some(mut settings) = take(&mut protocols, name) else { continue };
                        let to = ["receivers", "otlp", "protocols", name];
                        // `grpc:` with no settings: the Collector's default port, on loopback.
                        put(out, &to, json!({"endpoint": default_endpoint}));
                        carry(&mut settings, "endpoint", out, &[&to[..], &["endpoint"]].concat(), same);
                        carry(&mut settings, size_from, out, &[&to[..], &[size_to]].concat(), size);
                        server_tls(&mut settings, out, &to);
                        put(&mut protocols, &[name], settings);
                    }
                    put(&mut receiver, &["protocols"], protocols);
                }
                "filelog" if !filelog_done => {
                    filelog_done = true;
                    let to = ["receivers", "filelog"];
                    for key in [
                        "include",
                        "exclude",
                        "start_at",
                        "poll_interval",
                        "max_log_size",
                        "include_file_name",
                        "include_file_path",
                        "fingerprint_size",
                        "force_flush_period",
                        "attributes",
                        "resource",
                    ] {
                        carry(&mut receiver, key, &mut self.output, &[&to[..], &[key]].concat(), same);
                    }
                    // tailgate parses JSON lines itself; a plain json_parser operator is implied.
                    if let Some(Value::Array(operators)) = take(&mut receiver, "operators") {
                        for (index, operator) in operators.into_iter().enumerate() {
                            let plain_json = operator.get("type").and_then(Value::as_str) == Some("json_parser")
                                && operator.as_object().is_some_and(|o| o.keys().all(|k| k == "type" || k == "id"));
                            if !plain_json {
                                let kind = operator.get("type").and_then(Value::as_str).unwrap_or("?").to_owned();
                                self.note(
                                    &format!("{path}.operators[{index}]"),
                                    &format!("operator `{kind}` not mapped (tailgate reads JSON lines with receivers.filelog.fields aliases and levels)"),
                                );
                            }
                        }
                    }
                }
                _ => {}
            }
            put(&mut receivers, &[&id], receiver);
        }
        put(&mut self.input, &["receivers"], receivers);
    }

    fn policy(&mut self, path: &str, mut policy: Value) -> Option<Value> {
        let name = policy.get("name").and_then(Value::as_str).unwrap_or("?").to_owned();
        let kind = policy.get("type").and_then(Value::as_str).unwrap_or("?").to_owned();
        const SUPPORTED: &[&str] = &[
            "status_code",
            "latency",
            "string_attribute",
            "numeric_attribute",
            "probabilistic",
            "always_sample",
            "and",
            "drop",
        ];
        if !SUPPORTED.contains(&kind.as_str()) {
            self.note(path, &format!("policy {name:?} of type `{kind}` not mapped"));
            return None;
        }
        if let Some(salt) = policy.get_mut("probabilistic").and_then(|p| take(p, "hash_salt")) {
            self.note(&format!("{path}.probabilistic.hash_salt"), &format!("{salt} not mapped: tailgate decides on the trace id's randomness (W3C level 2), the same on every node"));
        }
        for (section, list) in [("and", "and_sub_policy"), ("drop", "drop_sub_policy")] {
            if let Some(Value::Array(subs)) = policy.get_mut(section).and_then(|s| take(s, list)) {
                let count = subs.len();
                let mapped: Vec<Value> = subs
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, sub)| self.policy(&format!("{path}.{section}.{list}[{i}]"), sub))
                    .collect();
                if mapped.len() < count {
                    // Fewer conditions would match more traces: an `and` would keep, a `drop`
                    // would drop, traces the Collector does not.
                    self.note(path, &format!("policy {name:?} not mapped: not every sub-policy could be"));
                    return None;
                }
                put(&mut policy, &[section, list], Value::Array(mapped));
            }
        }
        match serde_json::from_value::<tailgate_config::PolicyConfig>(policy) {
            Ok(parsed) => serde_json::to_value(parsed).ok(),
            Err(err) => {
                self.note(path, &format!("policy {name:?} not mapped: {err}"));
                None
            }
        }
    }

    fn processors(&mut self, used: &[String]) {
        let Some(mut processors) = self.input.get_mut("processors").map(Value::take) else { return };
        let ids: Vec<String> = processors.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        for id in ids.into_iter().filter(|id| used.contains(id)) {
            let path = format!("processors.{id}");
            let Some(mut processor) = take(&mut processors, &id) else { continue };
            if matches!(kind_of(&id), "tail_sampling" | "memory_limiter" | "batch") {
                self.mapped.insert(path.clone());
            }
            match kind_of(&id) {
                "tail_sampling" => {
                    carry(&mut processor, "decision_wait", &mut self.output, &["tail_sample", "decision_wait"], same);
                    if let Some(Value::Array(policies)) = take(&mut processor, "policies") {
                        let mapped: Vec<Value> = policies
                            .into_iter()
                            .enumerate()
                            .filter_map(|(i, p)| self.policy(&format!("{path}.policies[{i}]"), p))
                            .collect();
                        if mapped.is_empty() {
                            continue;
                        }
                        self.sampling = true;
                        put(&mut self.output, &["tail_sample", "policies"], Value::Array(mapped));
                        // Policies replace the shorthand.
                        put(&mut self.output, &["tail_sample", "keep_errors"], Value::Null);
                        put(&mut self.output, &["tail_sample", "latency_threshold"], Value::Null);
                    }
                }
                "memory_limiter" => {
                    let limit = take(&mut processor, "limit_mib").and_then(|v| v.as_u64());
                    let spike = take(&mut processor, "spike_limit_mib").and_then(|v| v.as_u64());
                    let _ = take(&mut processor, "check_interval");
                    if let Some(limit) = limit {
                        let soft = spike.map_or(limit * 4 / 5, |spike| limit.saturating_sub(spike).max(1));
                        put(&mut self.output, &["supervisor", "memory_hard_limit_mib"], json!(limit));
                        put(&mut self.output, &["supervisor", "memory_soft_limit_mib"], json!(soft));
                    }
                }
                "batch" => {
                    carry(
                        &mut processor,
                        "send_batch_size",
                        &mut self.output,
                        &["exporters", "batch", "send_batch_size"],
                        same,
                    );
                    carry(&mut processor, "timeout", &mut self.output, &["exporters", "batch", "timeout"], same);
                }
                _ => {}
            }
            put(&mut processors, &[&id], processor);
        }
        put(&mut self.input, &["processors"], processors);
    }

    fn spanmetrics(&mut self, used: &[String]) {
        let Some(mut connectors) = self.input.get_mut("connectors").map(Value::take) else { return };
        let ids: Vec<String> = connectors.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        for id in ids.into_iter().filter(|id| used.contains(id) && kind_of(id) == "spanmetrics") {
            let Some(mut connector) = take(&mut connectors, &id) else { continue };
            self.mapped.insert(format!("connectors.{id}"));
            let out = &mut self.output;
            if let Some(mut histogram) = take(&mut connector, "histogram") {
                if let Some(mut explicit) = take(&mut histogram, "explicit") {
                    carry(&mut explicit, "buckets", out, &["spanmetrics", "histogram", "explicit", "buckets"], same);
                    put(&mut histogram, &["explicit"], explicit);
                }
                put(&mut connector, &["histogram"], histogram);
            }
            for key in ["dimensions", "metrics_flush_interval", "metrics_expiration", "aggregation_cardinality_limit"] {
                carry(&mut connector, key, out, &["spanmetrics", key], same);
            }
            if let Some(mut exemplars) = take(&mut connector, "exemplars") {
                carry(&mut exemplars, "enabled", out, &["spanmetrics", "exemplars", "enabled"], same);
                carry(
                    &mut exemplars,
                    "max_per_data_point",
                    out,
                    &["spanmetrics", "exemplars", "max_per_data_point"],
                    same,
                );
                put(&mut connector, &["exemplars"], exemplars);
            }
            put(&mut connectors, &[&id], connector);
        }
        put(&mut self.input, &["connectors"], connectors);
    }

    /// Moves one exporter into `exporters.<signal>.<kind>`.
    fn exporter(&mut self, id: &str, signal: &str, file_storage: &mut Option<String>) {
        let path = format!("exporters.{id}");
        let kind = kind_of(id);
        let target = match kind {
            "otlp" => "otlp",
            "loki" if signal == "logs" => "loki",
            "prometheusremotewrite" if signal == "metrics" => "prometheusremotewrite",
            _ => return,
        };
        if !self.exporters.contains_key(id) {
            let Some(original) = self.input.get_mut("exporters").and_then(|e| take(e, id)) else { return };
            self.exporters.insert(id.to_owned(), original);
        }
        if self.output.pointer(&format!("/exporters/{signal}/{target}")).is_some_and(|d| !d.is_null()) {
            self.note(&path, &format!("a second `{target}` destination for {signal} is not mapped (one per kind)"));
            return;
        }
        let mut exporter = self.exporters[id].clone();
        self.mapped.insert(path.clone());
        let to = ["exporters", signal, target];
        let mut out = json!({});
        let insecure = exporter.pointer("/tls/insecure").and_then(Value::as_bool).unwrap_or(false);
        if let Some(Value::String(endpoint)) = take(&mut exporter, "endpoint") {
            let url = if endpoint.contains("://") {
                endpoint
            } else if insecure {
                format!("http://{endpoint}")
            } else {
                format!("https://{endpoint}")
            };
            out["endpoint"] = json!(url);
        }
        if let Some(mut tls) = take(&mut exporter, "tls") {
            let _ = take(&mut tls, "insecure");
            let mut client = json!({});
            for key in ["ca_file", "cert_file", "key_file", "server_name_override"] {
                if kind != "otlp" && key == "server_name_override" {
                    continue;
                }
                carry(&mut tls, key, &mut client, &[key], same);
            }
            if client.as_object().is_some_and(|c| !c.is_empty()) {
                out["tls"] = client;
            }
            put(&mut exporter, &["tls"], tls);
        }
        carry(&mut exporter, "timeout", &mut out, &["timeout"], same);
        if kind == "otlp" {
            carry(&mut exporter, "compression", &mut out, &["compression"], |v| {
                matches!(v.as_str(), Some("gzip" | "none")).then_some(v)
            });
            carry(&mut exporter, "keepalive", &mut out, &["keepalive"], same);
        } else if let Some(Value::Object(mut headers)) = take(&mut exporter, "headers") {
            if kind == "loki"
                && let Some(tenant) = headers.remove("X-Scope-OrgID")
            {
                out["tenant_id"] = tenant;
            }
            if !headers.is_empty() {
                out["headers"] = Value::Object(headers);
            }
        }
        if let Some(mut queue) = take(&mut exporter, "sending_queue") {
            let _ = take(&mut queue, "enabled");
            if let Some(Value::String(storage)) = take(&mut queue, "storage") {
                *file_storage = Some(storage);
            }
            put(&mut exporter, &["sending_queue"], queue);
        }
        let _ = take(&mut exporter, "remote_write_queue").map(|mut q| {
            let _ = take(&mut q, "enabled");
            put(&mut exporter, &["remote_write_queue"], q);
        });
        if let Some(mut retry) = take(&mut exporter, "retry_on_failure") {
            let _ = take(&mut retry, "enabled");
            carry(
                &mut retry,
                "initial_interval",
                &mut self.output,
                &["exporters", "retry_on_failure", "initial_interval"],
                same,
            );
            carry(
                &mut retry,
                "max_interval",
                &mut self.output,
                &["exporters", "retry_on_failure", "max_interval"],
                same,
            );
            put(&mut exporter, &["retry_on_failure"], retry);
        }
        put(&mut self.output, &to, out);
        self.exporter_leftovers.insert(id.to_owned(), exporter);
    }

    fn service(&mut self) -> Result<(), String> {
        let mut service = self.input.get_mut("service").map(Value::take).unwrap_or(json!({}));
        let mut pipelines = take(&mut service, "pipelines").unwrap_or(json!({}));
        let pipeline_ids: Vec<String> = pipelines.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        let mut used_receivers = Vec::new();
        let mut used_processors = Vec::new();
        let mut used_connectors = Vec::new();
        let mut destinations: Vec<(String, String)> = Vec::new();
        let connectors: Vec<String> = self
            .input
            .get("connectors")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for pipeline in &pipeline_ids {
            let signal = kind_of(pipeline).to_owned();
            let Some(mut spec) = take(&mut pipelines, pipeline) else { continue };
            let list = |spec: &mut Value, key: &str| -> Vec<String> {
                take(spec, key)
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            };
            for id in list(&mut spec, "receivers") {
                if connectors.contains(&id) {
                    used_connectors.push(id);
                } else {
                    used_receivers.push(id);
                }
            }
            used_processors.extend(list(&mut spec, "processors"));
            for id in list(&mut spec, "exporters") {
                if connectors.contains(&id) {
                    used_connectors.push(id);
                } else {
                    destinations.push((id, signal.clone()));
                }
            }
            if !matches!(signal.as_str(), "traces" | "logs" | "metrics") {
                self.note(&format!("service.pipelines.{pipeline}"), "not a traces, logs or metrics pipeline");
            }
            leftovers(&format!("service.pipelines.{pipeline}"), &spec, &mut self.unmapped);
        }
        self.receivers(&used_receivers);
        self.processors(&used_processors);
        self.spanmetrics(&used_connectors);
        // Destinations come from the pipelines only, not from the defaults.
        for signal in ["traces", "logs", "metrics"] {
            self.output["exporters"][signal] = Value::Null;
        }
        let mut file_storage = None;
        destinations.sort();
        destinations.dedup();
        for (id, signal) in &destinations {
            self.exporter(id, signal, &mut file_storage);
        }
        for (id, leftover) in std::mem::take(&mut self.exporter_leftovers) {
            put(&mut self.input, &["exporters", &id], leftover);
        }
        if !self.sampling {
            // The Collector's traces pipeline without a (mappable) tail_sampling processor
            // forwards every trace; tailgate's default would drop most of them.
            put(&mut self.output, &["tail_sample", "policies"], json!([{"name": "all", "type": "always_sample"}]));
            put(&mut self.output, &["tail_sample", "keep_errors"], Value::Null);
            put(&mut self.output, &["tail_sample", "latency_threshold"], Value::Null);
            self.note(
                "processors.tail_sampling",
                "no tail_sampling policy was mapped: every trace is kept, as the Collector forwarded them (an `always_sample` policy); write tail_sample.policies to cut",
            );
        }
        if self.output.pointer("/exporters/traces/otlp").is_none() {
            return Err("no OTLP exporter in a traces pipeline: tailgate needs exporters.traces.otlp".into());
        }
        // The persistent queue's directory becomes the data directory.
        if let Some(storage) = file_storage
            && let Some(mut extension) = self.input.get_mut("extensions").and_then(|e| take(e, &storage))
        {
            self.mapped.insert(format!("extensions.{storage}"));
            carry(&mut extension, "directory", &mut self.output, &["data_dir"], same);
            put(&mut self.input, &["extensions", &storage], extension);
        }
        let _ = take(&mut service, "extensions");
        if let Some(mut telemetry) = take(&mut service, "telemetry") {
            if let Some(mut metrics) = take(&mut telemetry, "metrics") {
                carry(&mut metrics, "address", &mut self.output, &["supervisor", "telemetry", "endpoint"], same);
                let _ = take(&mut metrics, "level");
                put(&mut telemetry, &["metrics"], metrics);
            }
            if let Some(mut logs) = take(&mut telemetry, "logs") {
                carry(&mut logs, "level", &mut self.output, &["log_level"], |v| {
                    v.as_str().map(|s| json!(s.to_lowercase()))
                });
                put(&mut telemetry, &["logs"], logs);
            }
            put(&mut service, &["telemetry"], telemetry);
        }
        put(&mut self.input, &["service"], service);
        Ok(())
    }
}

fn server_tls(source: &mut Value, out: &mut Value, to: &[&str]) {
    if let Some(mut tls) = take(source, "tls") {
        let mut server = json!({});
        for key in ["cert_file", "key_file", "client_ca_file"] {
            carry(&mut tls, key, &mut server, &[key], same);
        }
        put(out, &[to, &["tls"]].concat(), server);
        put(source, &["tls"], tls);
    }
}

/// Translates the text of a Collector configuration.
pub fn translate(collector: &str) -> Result<Translation, String> {
    let mut input: Value =
        serde_saphyr::from_str(collector).map_err(|err| format!("not a YAML configuration: {err}"))?;
    if !input.is_object() {
        return Err("not a Collector configuration (expected a mapping with receivers, exporters, service)".into());
    }
    env_references(&mut input);
    let defaults = serde_json::to_value(Config::embedded_default().map_err(|err| err.to_string())?)
        .map_err(|err| err.to_string())?;
    let mut importer = Importer {
        input,
        output: defaults,
        unmapped: Vec::new(),
        mapped: Default::default(),
        sampling: false,
        exporters: Default::default(),
        exporter_leftovers: Default::default(),
    };
    importer.service()?;
    // Defaults that only make sense with the default backends.
    let Importer { input, mut output, mut unmapped, mapped, .. } = importer;
    // What is left: a component nothing carried over is named as a whole (with a hint where
    // tailgate covers it differently); a carried-over one by each key left in it.
    if let Value::Object(sections) = &input {
        for (section, components) in sections {
            let Value::Object(components) = components else { continue };
            for (id, rest) in components {
                let component = format!("{section}.{id}");
                let hint = hint_for(&component).or_else(|| hint_for(&format!("{section}.{}", kind_of(id))));
                if section == "service" || mapped.contains(&component) {
                    let mut keys = Vec::new();
                    leftovers(&component, rest, &mut keys);
                    for key in keys {
                        unmapped.push(match hint_for(&key) {
                            Some(hint) => format!("{key}: not mapped ({hint})"),
                            None => format!("{key}: not mapped"),
                        });
                    }
                } else {
                    unmapped.push(match hint {
                        Some(hint) => format!("{component}: not mapped ({hint})"),
                        None => format!("{component}: not mapped (no tailgate counterpart, or not used by a pipeline)"),
                    });
                }
            }
        }
    }
    drop_nulls(&mut output);
    let config: Config = serde_json::from_value(output)
        .map_err(|err| format!("translation produced an invalid configuration: {err}"))?;
    let problems = config.validate().into_iter().map(|p| p.to_string()).collect();
    // `key: null` is an absent optional key: leave those lines out.
    let yaml = serde_saphyr::to_string(&config).map_err(|err| err.to_string())?;
    let yaml: String = yaml.lines().filter(|line| !line.ends_with(": null")).map(|line| format!("{line}\n")).collect();
    Ok(Translation { yaml, unmapped, problems })
}

fn drop_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        map.values_mut().for_each(drop_nulls);
    } else if let Value::Array(items) = value {
        items.iter_mut().for_each(drop_nulls);
    }
}

/// `tailgate import-otel-config FILE [--output OUT]`.
pub fn main(file: &std::path::Path, output: Option<&std::path::Path>) -> std::process::ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("cannot read {}: {err}", file.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    let translation = match translate(&text) {
        Ok(translation) => translation,
        Err(err) => {
            eprintln!("{}: {err}", file.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut header = format!("# Translated from the OpenTelemetry Collector configuration {}\n", file.display());
    header.push_str("# by `tailgate import-otel-config`. Every key: docs/configuration.md.\n");
    if !translation.unmapped.is_empty() {
        header.push_str("# Not mapped:\n");
        for line in &translation.unmapped {
            header.push_str(&format!("#   {line}\n"));
        }
    }
    let document = format!("{header}{}", translation.yaml);
    match output {
        Some(path) => {
            if let Err(err) = std::fs::write(path, &document) {
                eprintln!("cannot write {}: {err}", path.display());
                return std::process::ExitCode::FAILURE;
            }
        }
        None => print!("{document}"),
    }
    for line in &translation.unmapped {
        eprintln!("not mapped: {line}");
    }
    for problem in &translation.problems {
        eprintln!("check: {problem}");
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_env_references_become_env_references() {
        let mut value = json!({"a": "Bearer ${TOKEN}", "b": ["${env:X}", "$${LIT", "x${Y}z"]});
        env_references(&mut value);
        assert_eq!(value, json!({"a": "Bearer ${env:TOKEN}", "b": ["${env:X}", "$${LIT", "x${env:Y}z"]}));
    }
}
