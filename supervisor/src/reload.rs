//! Configuration reload (SIGHUP or `tailgate reload`): the operator's file is read and validated
//! first; a file with problems changes nothing and the problems are reported. A valid file
//! becomes the active snapshot the stages read (`<data_dir>/run/config.yaml`, so an edit on disk
//! never reaches a stage that merely restarts after a crash), the supervisor takes its own
//! section, and only the stages whose configuration changed are drained and started again.
//! Their backlog stays in the queue, so nothing is lost.

use std::path::{Path, PathBuf};

use tailgate_config::Config;
use tailgate_ipc::StageId;

/// The active snapshot of the configuration, which stage processes are started with.
pub fn snapshot_path(data_dir: &Path) -> PathBuf {
    tailgate_ipc::wake::socket_dir(data_dir).join("config.yaml")
}

/// Writes `text` as the active snapshot (write to a temporary file, fsync, rename).
pub fn write_snapshot(data_dir: &Path, text: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let path = snapshot_path(data_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("yaml.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Reads and validates the operator's file; `data_dir` is the one the supervisor runs with.
pub fn load(source: &Path, data_dir: &Path) -> Result<(Config, String), String> {
    let text = std::fs::read_to_string(source).map_err(|err| format!("cannot read {}: {err}", source.display()))?;
    let mut config = Config::parse(&text).map_err(|err| format!("{}: {err}", source.display()))?;
    config.data_dir = data_dir.to_path_buf();
    Ok((config, text))
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// The stages whose configuration differs between `old` and `new`, or why the change needs a
/// restart of tailgate itself (the queue's directory, budget and sync interval, the
/// self-metrics endpoint, the cgroups).
pub fn changed_stages(old: &Config, new: &Config) -> Result<Vec<StageId>, String> {
    let mut fixed = Vec::new();
    if old.data_dir != new.data_dir {
        fixed.push("data_dir");
    }
    if old.queue.max_size_mib != new.queue.max_size_mib {
        fixed.push("queue.max_size_mib");
    }
    if old.queue.sync_interval != new.queue.sync_interval {
        fixed.push("queue.sync_interval");
    }
    if json(&old.supervisor.telemetry) != json(&new.supervisor.telemetry) {
        fixed.push("supervisor.telemetry");
    }
    if json(&old.supervisor.cgroups) != json(&new.supervisor.cgroups) {
        fixed.push("supervisor.cgroups");
    }
    if !fixed.is_empty() {
        return Err(format!("{} cannot change while tailgate runs; restart it to apply", fixed.join(", ")));
    }
    // What every stage process reads: its log level and the queue options, which include the
    // set of configured destinations (every process must open the queue with the same one).
    let destinations = |c: &Config| tailgate_stages::export::inactive_consumers(c);
    if old.log_level != new.log_level || destinations(old) != destinations(new) {
        return Ok(StageId::ALL.to_vec());
    }
    let differs = |a: serde_json::Value, b: serde_json::Value| a != b;
    let mut stages = Vec::new();
    if differs(json(&old.receivers), json(&new.receivers)) || old.queue.write_timeout != new.queue.write_timeout {
        stages.push(StageId::Receive);
    }
    // tail_sample counts the decided spans into span metrics' series: by their dimensions,
    // buckets, source and exemplars.
    let counting = |c: &Config| {
        let s = &c.spanmetrics;
        json(&(&s.dimensions, &s.histogram, &s.source, &s.exemplars))
    };
    if differs(json(&old.tail_sample), json(&new.tail_sample)) || differs(counting(old), counting(new)) {
        stages.push(StageId::TailSample);
    }
    if differs(json(&old.log_mirror), json(&new.log_mirror)) || differs(json(&old.tail_sample), json(&new.tail_sample))
    {
        stages.push(StageId::LogMirror);
    }
    if differs(json(&old.spanmetrics), json(&new.spanmetrics)) {
        stages.push(StageId::Spanmetrics);
    }
    if differs(json(&old.exporters), json(&new.exporters)) {
        stages.push(StageId::Export);
    }
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_stages_whose_sections_changed_are_restarted() {
        let base = Config::embedded_default().unwrap();
        assert!(changed_stages(&base, &base).unwrap().is_empty());
        let mut threshold = base.clone();
        threshold.tail_sample.latency_threshold = Some(std::time::Duration::from_millis(150));
        assert_eq!(changed_stages(&base, &threshold).unwrap(), vec![StageId::TailSample, StageId::LogMirror]);
        let mut level = base.clone();
        level.log_level = "debug".into();
        assert_eq!(changed_stages(&base, &level).unwrap(), StageId::ALL.to_vec());
        let mut budget = base.clone();
        budget.queue.max_size_mib += 1;
        let refused = changed_stages(&base, &budget).unwrap_err();
        assert!(refused.contains("queue.max_size_mib"), "{refused}");
        let mut supervisor = base.clone();
        supervisor.supervisor.liveness_timeout = std::time::Duration::from_secs(9);
        assert!(
            changed_stages(&base, &supervisor).unwrap().is_empty(),
            "the supervisor's own section restarts no stage"
        );
        let mut exporters = base.clone();
        exporters.exporters.batch.send_batch_size += 1;
        assert_eq!(changed_stages(&base, &exporters).unwrap(), vec![StageId::Export]);
        // tail_sample counts span metrics by the histogram's buckets; spanmetrics alone flushes.
        let mut buckets = base.clone();
        buckets.spanmetrics.histogram.explicit.buckets.pop();
        assert_eq!(changed_stages(&base, &buckets).unwrap(), vec![StageId::TailSample, StageId::Spanmetrics]);
        let mut flush = base.clone();
        flush.spanmetrics.metrics_flush_interval = std::time::Duration::from_secs(7);
        assert_eq!(changed_stages(&base, &flush).unwrap(), vec![StageId::Spanmetrics]);
    }
}
