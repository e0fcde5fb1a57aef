//! Replays the committed fuzz corpus (`tests/fuzz/corpus/<target>/`: seeds and what fuzzing runs
//! found) and every crash fuzzing ever found (`tests/fuzz/regressions/<target>/`) through the
//! harnesses, in the normal test run, without instrumentation.

use std::path::Path;

fn replay(target: &str, harness: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut inputs = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        let mut paths: Vec<_> = entries.filter_map(|entry| entry.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            let outcome = std::panic::catch_unwind(|| harness(&data));
            assert!(outcome.is_ok(), "{target}: {} fails its properties", path.display());
            inputs += 1;
        }
    }
    assert!(inputs > 0, "{target}: no corpus under {}", root.display());
}

#[test]
fn otlp_protobuf_corpus() {
    replay("otlp_protobuf", tailgate_fuzz::otlp_protobuf);
}

#[test]
fn otlp_json_corpus() {
    replay("otlp_json", tailgate_fuzz::otlp_json);
}

#[test]
fn json_lines_corpus() {
    replay("json_lines", tailgate_fuzz::json_lines);
}

#[test]
fn export_answers_corpus() {
    replay("export_answers", tailgate_fuzz::export_answers);
}
