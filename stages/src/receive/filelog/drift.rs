//! Schema drift, measured: per source file, how many lines missed each field, named a field by a
//! later alias, carried a level nobody maps (with the value), a malformed trace id, were not
//! JSON, were cut at `max_log_size` or held invalid UTF-8.
//!
//! The counts live in the queue's `state` table (`filelog/drift/<path>`, JSON), written in the
//! transaction that commits the lines they describe, so they survive restarts and
//! `tailgate status` reads them from the live queue. The first occurrence of each kind (and
//! value) per file is logged once; after that it is only counted.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// State key prefix of the drift counts.
pub const DRIFT_PREFIX: &[u8] = b"filelog/drift/";
/// Most distinct values kept per kind; further values are counted under `(other)`.
const MAX_VALUES_PER_KIND: usize = 32;
/// Most files with their own counts; further files are counted under `(other files)`.
const MAX_FILES: usize = 256;

/// Drift counts of one file: kind -> value -> lines (value is empty for kinds without one).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// The counts.
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Drift {
    /// Counts one line of `kind` (with `value` where the kind has one).
    pub fn count(&mut self, kind: &str, value: Option<&str>) {
        self.add(kind, value.unwrap_or(""), 1);
    }

    fn add(&mut self, kind: &str, value: &str, lines: u64) {
        let values = self.counts.entry(kind.to_owned()).or_default();
        let key = if values.contains_key(value) || values.len() < MAX_VALUES_PER_KIND {
            truncate(value, 64)
        } else {
            "(other)".to_owned()
        };
        *values.entry(key).or_default() += lines;
    }

    /// Lines counted for `kind` and `value`.
    pub fn get(&self, kind: &str, value: &str) -> u64 {
        self.counts.get(kind).and_then(|values| values.get(value)).copied().unwrap_or(0)
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// One line per kind, for `tailgate status`.
    pub fn summary(&self) -> Vec<String> {
        self.counts
            .iter()
            .map(|(kind, values)| {
                let parts: Vec<String> = values
                    .iter()
                    .map(|(value, lines)| if value.is_empty() { lines.to_string() } else { format!("{value}={lines}") })
                    .collect();
                format!("{kind}: {}", parts.join(", "))
            })
            .collect()
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text.to_owned(),
    }
}

/// Drift counts of every file, as stored plus what this process added since its last commit.
#[derive(Debug, Default, Clone)]
pub struct DriftTable {
    files: HashMap<String, Drift>,
    dirty: HashSet<String>,
    /// (file, kind, value) already logged.
    logged: HashSet<(String, String, String)>,
}

impl DriftTable {
    /// The table from its stored entries.
    pub fn load<'a>(stored: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> DriftTable {
        let mut table = DriftTable::default();
        for (key, value) in stored {
            let Some(path) = key.strip_prefix(DRIFT_PREFIX).and_then(|p| std::str::from_utf8(p).ok()) else { continue };
            if let Ok(drift) = serde_json::from_slice::<Drift>(value) {
                for (kind, values) in &drift.counts {
                    for value in values.keys() {
                        table.logged.insert((path.to_owned(), kind.clone(), value.clone()));
                    }
                }
                table.files.insert(path.to_owned(), drift);
            }
        }
        table
    }

    /// Adds the counts of lines read from `path` (logging each new kind once).
    pub fn merge(&mut self, path: &str, lines: &Drift) {
        if lines.is_empty() {
            return;
        }
        let path = if self.files.contains_key(path) || self.files.len() < MAX_FILES { path } else { "(other files)" };
        let file = self.files.entry(path.to_owned()).or_default();
        for (kind, values) in &lines.counts {
            for (value, count) in values {
                file.add(kind, value, *count);
                if self.logged.len() < 4096 && self.logged.insert((path.to_owned(), kind.clone(), value.clone())) {
                    tracing::warn!(file = path, kind = %kind, value = %value, "log schema drift: counted, see tailgate status");
                }
            }
        }
        self.dirty.insert(path.to_owned());
    }

    /// Changed entries to store: (key, JSON).
    pub fn take_changes(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for path in self.dirty.drain() {
            if let Some(drift) = self.files.get(&path)
                && let Ok(json) = serde_json::to_vec(drift)
            {
                out.push(([DRIFT_PREFIX, path.as_bytes()].concat(), json));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_per_kind_are_bounded() {
        let mut drift = Drift::default();
        for n in 0..100 {
            drift.count("unknown_level", Some(&format!("L{n}")));
        }
        assert_eq!(drift.counts["unknown_level"].len(), MAX_VALUES_PER_KIND + 1);
        assert_eq!(drift.get("unknown_level", "(other)"), 100 - MAX_VALUES_PER_KIND as u64);
    }

    #[test]
    fn the_table_round_trips_through_its_stored_form() {
        let mut table = DriftTable::default();
        let mut lines = Drift::default();
        lines.count("alias", Some("duration:duration"));
        lines.count("not_json", None);
        table.merge("/var/log/a.jsonl", &lines);
        table.merge("/var/log/a.jsonl", &lines);
        let changes = table.take_changes();
        assert_eq!(changes.len(), 1);
        let loaded = DriftTable::load(changes.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        assert_eq!(loaded.files["/var/log/a.jsonl"].get("alias", "duration:duration"), 2);
        assert!(table.take_changes().is_empty());
    }
}
