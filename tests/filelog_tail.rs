//! The filelog receiver end to end: JSON log files in a directory of the test's own, tailed by
//! the real binary (`receivers.filelog`), every kept line exported over OTLP/gRPC to the test
//! backend. Every line written is an untraced ERROR record (kept by log_mirror), so each test can
//! assert the exact multiset of delivered bodies: every line exactly once, none missing, none
//! duplicated, nothing else.
//!
//! - rotation by rename: the old file is read to its end through the open handle (also lines a
//!   writer appends after the rename), the new file at the old path from its beginning;
//! - copytruncate (copy outside `include`): lines already read are not read again, the lines
//!   written after the truncation arrive;
//! - truncation without a copy: the file is read again from its start;
//! - a file that appears while running is tailed from its beginning;
//! - an unterminated last line is emitted after `force_flush_period`, a line finished in time is
//!   not split;
//! - receive SIGKILLed (three times) while tailing a 20,000-line file: every line exactly once;
//! - `start_at: end`: lines present at the first start are skipped, later ones arrive;
//! - `tailgate status` shows the schema drift counts per file;
//! - rotated names that still match `include`: a rename keeps the file's place; a copy (also
//!   one still being written when a poll sees it) is read only past what the original had
//!   given, as `stages/src/receive/filelog/files.rs` documents.
//!
//! No test asserts how fast anything happens: each waits (generously) for the lines, then a
//! while longer so duplicates have time to show.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::common::v1::any_value;

/// How long lines may take to arrive (the whole pipeline, on a loaded 2-core machine).
const ARRIVAL_LIMIT: Duration = Duration::from_secs(120);
/// How long to keep watching after every expected line arrived, for duplicates and extras:
/// several poll intervals, export batch timeouts and log_mirror steps.
const SETTLE: Duration = Duration::from_secs(3);

/// A running tailgate tailing `<logs>/*.log`, with its backend. Fields drop in order: tailgate
/// stops before the backend's runtime goes away.
struct Run {
    tailgate: Tailgate,
    backend: Backend,
    _runtime: tokio::runtime::Runtime,
    logs: tempfile::TempDir,
}

impl Run {
    /// Starts tailgate with `receivers.filelog` = `{ include: ["<logs>/*.log"], poll_interval:
    /// 100ms, <settings> }`. `prepare` runs on the log directory before the start.
    fn start(settings: &str, prepare: impl FnOnce(&Path)) -> Run {
        let logs = tempfile::tempdir().unwrap();
        prepare(logs.path());
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (backend, backend_addr) = Backend::serve(&runtime);
        let filelog = format!("{{ include: [\"{}/*.log\"], poll_interval: 100ms, {settings} }}", logs.path().display());
        let tailgate = Tailgate::start(backend_addr, &Timing { filelog: Some(filelog), ..Timing::default() });
        Run { tailgate, backend, _runtime: runtime, logs }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.logs.path().join(name)
    }

    /// Delivered body -> how often it arrived.
    fn delivered(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for request in &self.backend.received.lock().unwrap().logs {
            for resource in &request.resource_logs {
                for scope in &resource.scope_logs {
                    for record in &scope.log_records {
                        let body = match record.body.as_ref().and_then(|b| b.value.as_ref()) {
                            Some(any_value::Value::StringValue(text)) => text.clone(),
                            other => format!("(non-string body {other:?})"),
                        };
                        *out.entry(body).or_default() += 1;
                    }
                }
            }
        }
        out
    }

    /// Waits (up to [`ARRIVAL_LIMIT`]) until every one of `lines` arrived at least once.
    fn wait_for(&self, lines: &[String]) -> bool {
        wait_until(ARRIVAL_LIMIT, || {
            let delivered = self.delivered();
            lines.iter().all(|line| delivered.contains_key(line))
        })
    }

    /// Waits until `lines` arrived or fails with the report.
    fn wait_for_or_fail(&self, lines: &[String], what: &str) {
        if !self.wait_for(lines) {
            let delivered = self.delivered();
            let missing: Vec<&String> = lines.iter().filter(|l| !delivered.contains_key(*l)).collect();
            panic!(
                "{what}: {} of {} lines never arrived, e.g. {:?}\n{}",
                missing.len(),
                lines.len(),
                first(&missing, 10),
                self.log_excerpt()
            );
        }
    }

    /// Waits until every line of `expected` arrived, then [`SETTLE`] longer, then asserts that
    /// each arrived exactly once and nothing else arrived (bodies for which `ignored` holds may
    /// arrive, but at most once each).
    fn expect_exactly_once(&self, expected: &[String], ignored: impl Fn(&str) -> bool) {
        let unique: BTreeMap<&str, ()> = expected.iter().map(|l| (l.as_str(), ())).collect();
        assert_eq!(unique.len(), expected.len(), "the test wrote the same line twice");
        let arrived = self.wait_for(expected);
        std::thread::sleep(SETTLE);
        let delivered = self.delivered();
        let missing: Vec<&String> = expected.iter().filter(|l| !delivered.contains_key(*l)).collect();
        let duplicated: Vec<(&String, &usize)> = delivered.iter().filter(|(_, count)| **count > 1).collect();
        let unexpected: Vec<&String> =
            delivered.keys().filter(|l| !unique.contains_key(l.as_str()) && !ignored(l)).collect();
        if !arrived || !missing.is_empty() || !duplicated.is_empty() || !unexpected.is_empty() {
            panic!(
                "wrote {} lines; {} distinct bodies arrived ({} records)\n\
                 missing ({}): {:?}\nduplicated ({}, body => times): {:?}\nunexpected ({}): {:?}\n{}",
                expected.len(),
                delivered.len(),
                delivered.values().sum::<usize>(),
                missing.len(),
                first(&missing, 20),
                duplicated.len(),
                first(&duplicated, 20),
                unexpected.len(),
                first(&unexpected, 20),
                self.log_excerpt()
            );
        }
    }

    /// How many delivered records have a body containing `needle`.
    fn count_containing(&self, needle: &str) -> usize {
        self.delivered().iter().filter(|(line, _)| line.contains(needle)).map(|(_, count)| count).sum()
    }

    /// The tailgate log's lines about files, stages and problems (the tail of them), for failures.
    fn log_excerpt(&self) -> String {
        let path = self.tailgate.dir.path().join("tailgate.log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let interesting: Vec<&str> = text
            .lines()
            .filter(|line| {
                ["filelog", "log file", "WARN", "ERROR", "stage process", "restart"].iter().any(|k| line.contains(k))
            })
            .collect();
        let tail = &interesting[interesting.len().saturating_sub(80)..];
        format!("--- {} (filtered, last {} lines) ---\n{}", path.display(), tail.len(), tail.join("\n"))
    }
}

fn first<T>(items: &[T], n: usize) -> &[T] {
    &items[..items.len().min(n)]
}

/// A line every stage keeps: ERROR level, no trace id.
fn line(tag: &str, n: usize) -> String {
    format!(r#"{{"level":"error","msg":"{tag}-{n}"}}"#)
}

fn lines(tag: &str, range: Range<usize>) -> Vec<String> {
    range.map(|n| line(tag, n)).collect()
}

/// The lines as a file holds them (each with its newline).
fn text(lines: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// A writer as loggers open their file: created if missing, O_APPEND.
fn open_append(path: &Path) -> File {
    OpenOptions::new().create(true).append(true).open(path).unwrap()
}

/// Appends the lines in one write.
fn append(file: &mut File, lines: &[String]) {
    file.write_all(&text(lines)).unwrap();
}

/// Appends the lines in parts of `part` lines, `gap` apart, so the receiver polls in between.
fn append_slowly(file: &mut File, lines: &[String], part: usize, gap: Duration) {
    for (index, chunk) in lines.chunks(part).enumerate() {
        if index > 0 {
            std::thread::sleep(gap);
        }
        append(file, chunk);
    }
}

fn concat(parts: &[&[String]]) -> Vec<String> {
    parts.iter().flat_map(|part| part.iter().cloned()).collect()
}

const BEGINNING: &str = "start_at: beginning, force_flush_period: 500ms";

#[test]
fn rename_rotation_reads_the_old_file_to_its_end_and_the_new_file_from_its_start() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("app.log");
    let mut writer = open_append(&path);
    let old = lines("rename-old", 0..200);
    append_slowly(&mut writer, &old, 50, Duration::from_millis(70));
    // Rotation right after the last append, while the receiver may still be reading: the
    // rotated name is outside `include`, so only the open handle reaches it from now on.
    std::fs::rename(&path, run.path("app.log.1")).unwrap();
    // A writer that still has the old file open appends to it right after the rename (before
    // it reopens its log): these lines are read through the receiver's handle. (A writer that
    // kept writing to the rotated file for longer than a poll would lose lines with any tailer
    // that follows `include`; this one writes in the same instant.)
    let late = lines("rename-late", 0..50);
    append(&mut writer, &late);
    // The writer reopens: a new file at the old path.
    let mut fresh = open_append(&path);
    let new = lines("rename-new", 0..200);
    append_slowly(&mut fresh, &new, 50, Duration::from_millis(70));
    run.expect_exactly_once(&concat(&[&old, &late, &new]), |_| false);
}

#[test]
fn copytruncate_with_the_copy_outside_include_reads_nothing_twice_and_loses_nothing() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("app.log");
    let mut writer = open_append(&path);
    let before = lines("copytrunc-before", 0..300);
    append_slowly(&mut writer, &before, 100, Duration::from_millis(70));
    // Everything written before the copy was read: the copytruncate window (lines written
    // between the last read and the truncation) is empty, so nothing may be lost.
    run.wait_for_or_fail(&before, "lines before the copytruncate");
    std::fs::copy(&path, run.path("app.log.1")).unwrap();
    writer.set_len(0).unwrap();
    let after = lines("copytrunc-after", 0..100);
    append(&mut writer, &after);
    // O_APPEND: the writer went on at the new end (0), not at its old offset.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), text(&after).len() as u64, "writer did not append at 0");
    run.expect_exactly_once(&concat(&[&before, &after]), |_| false);
}

#[test]
fn a_truncated_file_is_read_again_from_its_start() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("app.log");
    let mut writer = open_append(&path);
    let first = lines("trunc-first", 0..100);
    append(&mut writer, &first);
    run.wait_for_or_fail(&first, "lines before the truncation");
    writer.set_len(0).unwrap();
    // Longer lines than before: the file soon grows past the old offset, so the receiver has
    // to notice the truncation by the first bytes too, not only by the size.
    let second = lines("trunc-second-longer", 0..100);
    append_slowly(&mut writer, &second, 25, Duration::from_millis(50));
    run.expect_exactly_once(&concat(&[&first, &second]), |_| false);
}

#[test]
fn a_file_that_appears_while_running_is_tailed_from_its_beginning() {
    let first_lines = lines("appear-first", 0..30);
    let run = Run::start(BEGINNING, |dir| {
        std::fs::write(dir.join("first.log"), text(&first_lines)).unwrap();
    });
    run.wait_for_or_fail(&first_lines, "lines of the file present at the start");
    // A new service starts logging, in two appends. A file in a subdirectory does not match
    // `<dir>/*.log`.
    let mut second = open_append(&run.path("second.log"));
    let second_lines = lines("appear-second", 0..40);
    append_slowly(&mut second, &second_lines, 20, Duration::from_millis(150));
    std::fs::create_dir(run.path("sub")).unwrap();
    std::fs::write(run.path("sub").join("third.log"), text(&lines("appear-nested", 0..5))).unwrap();
    // The first file goes on growing too.
    let more = lines("appear-first-more", 0..10);
    append(&mut open_append(&run.path("first.log")), &more);
    run.expect_exactly_once(&concat(&[&first_lines, &second_lines, &more]), |_| false);
}

#[test]
fn an_unterminated_last_line_is_emitted_after_the_flush_period_and_a_finished_one_is_not_split() {
    // A long flush period, so a line whose writer finishes it 100 ms later is never emitted in
    // two parts, however slow the machine is.
    let run = Run::start("start_at: beginning, force_flush_period: 2s", |_| {});
    let path = run.path("app.log");
    let mut writer = open_append(&path);
    let split = line("partial-split", 0);
    let (head, tail) = split.split_at(split.len() / 2);
    writer.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    writer.write_all(tail.as_bytes()).unwrap();
    writer.write_all(b"\n").unwrap();
    // No newline: emitted only once the file has stopped growing for force_flush_period.
    let partial = line("partial", 1);
    writer.write_all(partial.as_bytes()).unwrap();
    run.wait_for_or_fail(std::slice::from_ref(&partial), "the unterminated last line");
    // The next line, complete, right after it.
    let complete = line("partial", 2);
    append(&mut writer, std::slice::from_ref(&complete));
    run.expect_exactly_once(&[split, partial, complete], |_| false);
}

#[test]
fn receive_sigkilled_while_tailing_loses_and_repeats_no_line() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("big.log");
    let mut writer = open_append(&path);
    let all = lines("kill", 0..20_000);
    let mut kills = 0;
    for (index, part) in all.chunks(2_000).enumerate() {
        append(&mut writer, part);
        // Kill receive right after an append (while it reads and commits it), three times; the
        // writer keeps appending while it is down.
        if matches!(index, 1 | 4 | 7) {
            if index == 4 {
                // This kill lands once lines are flowing out of the pipeline.
                assert!(
                    wait_until(ARRIVAL_LIMIT, || run.count_containing("\"kill-") > 0),
                    "no line arrived before the second kill\n{}",
                    run.log_excerpt()
                );
            }
            let pid = run.tailgate.stage_pid("receive").expect("receive is running");
            signal(pid, "KILL");
            kills += 1;
            // Shown with a failure: where the kills landed.
            eprintln!(
                "kill {kills}: {} of {} written lines had arrived",
                run.count_containing("\"kill-"),
                (index + 1) * 2_000
            );
            run.tailgate.wait_for_restart("receive", pid);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(kills, 3);
    run.expect_exactly_once(&all, |_| false);
}

#[test]
fn start_at_end_skips_what_the_files_held_at_the_first_start() {
    let before = lines("startend-before", 0..50);
    let run = Run::start("start_at: end, force_flush_period: 500ms", |dir| {
        std::fs::write(dir.join("app.log"), text(&before)).unwrap();
    });
    // Lines written before the receiver's first poll are skipped too (they were there "at the
    // start"): wait until it demonstrably polled once. A probe file gets a line every 150 ms
    // until one arrives; probe lines are read once the receiver found the file, whenever that was.
    let mut probe = open_append(&run.path("probe.log"));
    let mut written = 0;
    let polled = wait_until(ARRIVAL_LIMIT, || {
        if run.count_containing("startend-probe") > 0 {
            return true;
        }
        append(&mut probe, &[line("startend-probe", written)]);
        written += 1;
        std::thread::sleep(Duration::from_millis(100));
        false
    });
    assert!(polled, "no probe line arrived\n{}", run.log_excerpt());
    let after = lines("startend-after", 0..50);
    append_slowly(&mut open_append(&run.path("app.log")), &after, 10, Duration::from_millis(50));
    // A file created from now on is read from its beginning, whatever start_at says.
    let later = lines("startend-later-file", 0..20);
    std::fs::write(run.path("later.log"), text(&later)).unwrap();
    run.expect_exactly_once(&concat(&[&after, &later]), |line| line.contains("startend-probe"));
    let delivered = run.delivered();
    let skipped_arrived: Vec<&String> = before.iter().filter(|l| delivered.contains_key(*l)).collect();
    assert!(skipped_arrived.is_empty(), "lines present before the first start arrived: {skipped_arrived:?}");
}

#[test]
fn status_shows_schema_drift_per_file() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("drift.log");
    let kept = [
        // `duration` instead of `duration_ms` (an alias): counted; ERROR keeps the line.
        r#"{"level":"error","duration":12,"msg":"drift-alias-0"}"#,
        // An unknown level: counted with its value; the duration over 200 ms keeps the line.
        r#"{"level":"SEVERE","duration_ms":900,"msg":"drift-severe-0"}"#,
        r#"{"level":"error","duration":30,"msg":"drift-alias-1"}"#,
        // Read after the text line: once it arrived, the text line was committed too.
        r#"{"level":"error","duration_ms":5,"msg":"drift-last"}"#,
    ]
    .map(String::from);
    let mut content = Vec::new();
    for (index, line) in kept.iter().enumerate() {
        if index == 2 {
            // Not JSON: counted; kept or not as log_mirror judges a text record (not asserted).
            content.extend_from_slice(b"panic: boom\n");
        }
        content.extend_from_slice(line.as_bytes());
        content.push(b'\n');
    }
    std::fs::write(&path, content).unwrap();
    run.expect_exactly_once(&kept, |line| line == "panic: boom");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .arg("status")
        .arg("--config")
        .arg(&run.tailgate.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tailgate status failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    // The file's section: its path on a line of its own, then its `kind: value=count` lines
    // (indented deeper) up to the next file or the end.
    let shown = path.display().to_string();
    let mut section: Option<Vec<String>> = None;
    let mut indent = 0;
    for line in stdout.lines() {
        let trimmed = line.trim();
        let depth = line.len() - line.trim_start().len();
        match &mut section {
            None if trimmed == shown => {
                section = Some(Vec::new());
                indent = depth;
            }
            Some(lines) if depth > indent && !trimmed.is_empty() => lines.push(trimmed.to_owned()),
            Some(_) => break,
            None => {}
        }
    }
    let section = section.unwrap_or_else(|| panic!("no drift section for {shown} in the status:\n{stdout}"));
    for want in ["alias: duration:duration=2", "unknown_level: SEVERE=1", "not_json: 1"] {
        assert!(section.iter().any(|l| l == want), "{shown}: no `{want}` in its drift section {section:?}\n{stdout}");
    }
    // The same counts as self-metrics, by kind (what an alert on drift watches).
    let metrics = common::http_get(run.tailgate.telemetry, "/metrics").1;
    for (kind, lines) in [("alias", 2), ("unknown_level", 1), ("not_json", 1)] {
        let want = format!("tailgate_log_schema_drift_lines_total{{kind=\"{kind}\"}} {lines}");
        assert!(metrics.lines().any(|l| l == want), "no `{want}` in /metrics:\n{metrics}");
    }
}

// Beyond the brief's list: rotation variants whose rotated name still matches `include`.

#[test]
fn rename_rotation_within_include_keeps_reading_the_renamed_file_where_it_stood() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("app.log");
    let mut writer = open_append(&path);
    let old = lines("inrename-old", 0..200);
    append_slowly(&mut writer, &old, 50, Duration::from_millis(70));
    // The rotated name matches `*.log`: the same file (inode) under a new name, not a new file.
    std::fs::rename(&path, run.path("app.1.log")).unwrap();
    let late = lines("inrename-late", 0..50);
    append(&mut writer, &late);
    let mut fresh = open_append(&path);
    let new = lines("inrename-new", 0..200);
    append_slowly(&mut fresh, &new, 50, Duration::from_millis(70));
    // The old writer writes a little more to the renamed file later: still tailed (it matches).
    std::thread::sleep(Duration::from_millis(500));
    let later = lines("inrename-later", 0..10);
    append(&mut writer, &later);
    run.expect_exactly_once(&concat(&[&old, &late, &new, &later]), |_| false);
}

#[test]
fn copytruncate_with_the_copy_inside_include_reads_the_copy_only_past_what_was_read() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("app.log");
    let mut writer = open_append(&path);
    let before = lines("incopy-before", 0..300);
    append_slowly(&mut writer, &before, 100, Duration::from_millis(70));
    run.wait_for_or_fail(&before, "lines before the copytruncate");
    // Written right before the copy: maybe read from the original, maybe only from the copy
    // (files.rs: the copy is read from where the original had got to). Either way once.
    let unread = lines("incopy-unread", 0..20);
    append(&mut writer, &unread);
    std::fs::copy(&path, run.path("app.1.log")).unwrap();
    writer.set_len(0).unwrap();
    let after = lines("incopy-after", 0..100);
    append(&mut writer, &after);
    run.expect_exactly_once(&concat(&[&before, &unread, &after]), |_| false);
}

#[test]
fn copytruncate_with_a_copy_inside_include_that_takes_longer_than_a_poll_reads_nothing_twice() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("app.log");
    let mut writer = open_append(&path);
    let before = lines("slowcopy-before", 0..300);
    append(&mut writer, &before);
    run.wait_for_or_fail(&before, "lines before the copytruncate");
    // `cp` of a large log takes a while: the receiver sees the copy while it is being written.
    // The first part (whole lines) is longer than the fingerprint (1000 bytes), so the copy is
    // recognised by its first bytes while it is incomplete.
    let content = std::fs::read(&path).unwrap();
    let cut = 2_000 + content[2_000..].iter().position(|b| *b == b'\n').unwrap() + 1;
    let (head, rest) = content.split_at(cut);
    let mut copy = File::create(run.path("app.1.log")).unwrap();
    copy.write_all(head).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    copy.write_all(rest).unwrap();
    drop(copy);
    writer.set_len(0).unwrap();
    let after = lines("slowcopy-after", 0..100);
    append(&mut writer, &after);
    run.expect_exactly_once(&concat(&[&before, &after]), |_| false);
}

#[test]
fn copytruncate_while_the_original_keeps_growing_reads_nothing_twice() {
    let run = Run::start(BEGINNING, |_| {});
    let path = run.path("app.log");
    let mut writer = open_append(&path);
    let before = lines("growing-before", 0..300);
    append(&mut writer, &before);
    run.wait_for_or_fail(&before, "lines before the copy");
    // The copy starts (its first part is seen by a poll), the service keeps writing to the
    // original, and those lines are read from the original before the copy ends and the
    // original is truncated: the copy must not deliver them again.
    let content = std::fs::read(&path).unwrap();
    let cut = 2_000 + content[2_000..].iter().position(|b| *b == b'\n').unwrap() + 1;
    let mut copy = File::create(run.path("app.1.log")).unwrap();
    copy.write_all(&content[..cut]).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let during = lines("growing-during", 0..50);
    append(&mut writer, &during);
    run.wait_for_or_fail(&during, "lines written while the copy was made");
    let content = std::fs::read(&path).unwrap();
    copy.write_all(&content[cut..]).unwrap();
    drop(copy);
    std::thread::sleep(Duration::from_millis(400));
    writer.set_len(0).unwrap();
    let after = lines("growing-after", 0..100);
    append(&mut writer, &after);
    run.expect_exactly_once(&concat(&[&before, &during, &after]), |_| false);
}
