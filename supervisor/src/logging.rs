//! Log output for every process (the supervisor and its stages write to the same stderr):
//! timestamped text on a terminal or in a file, the journal's form under systemd (no timestamp,
//! since journald stamps every line; the level as the syslog priority prefix `<N>` journald
//! parses), or one JSON object per line for log shippers.

use std::fmt;

use tailgate_config::LogFormat;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM` = `dev:inode` of it).
pub fn stderr_is_journal() -> bool {
    std::env::var("JOURNAL_STREAM").is_ok_and(|stream| is_journal_stream(&stream, std::io::stderr()))
}

/// Whether `fd` is the stream a `JOURNAL_STREAM` value (`device:inode`) names.
pub fn is_journal_stream(stream: &str, fd: impl std::os::fd::AsFd) -> bool {
    let Some((dev, ino)) =
        stream.split_once(':').and_then(|(dev, ino)| Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?)))
    else {
        return false;
    };
    rustix::fs::fstat(fd).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// The format `configured` resolves to here.
pub fn resolve(configured: LogFormat) -> LogFormat {
    match configured {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    }
}

/// The syslog priority journald reads from a `<N>` line prefix.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Text without a timestamp or level word, prefixed with the level's syslog priority.
pub struct Journald<F> {
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// Sets up logging to stderr in `format`; `RUST_LOG` overrides the configured filter.
pub fn init(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _already_set = match resolve(format) {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Journald => {
            let inner = tracing_subscriber::fmt::format().without_time().with_level(false).with_ansi(false);
            builder.with_ansi(false).event_format(Journald { inner }).try_init()
        }
        _ => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(syslog_priority(&Level::ERROR), 3);
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::INFO), 6);
        assert_eq!(syslog_priority(&Level::DEBUG), 7);
    }

    #[test]
    fn the_journal_stream_is_recognised_by_device_and_inode() {
        let file = tempfile::tempfile().unwrap();
        let st = rustix::fs::fstat(&file).unwrap();
        assert!(is_journal_stream(&format!("{}:{}", st.st_dev, st.st_ino), &file));
        assert!(!is_journal_stream(&format!("{}:{}", st.st_dev, st.st_ino + 1), &file));
        assert!(!is_journal_stream("garbage", &file));
    }

    #[test]
    fn journald_lines_carry_the_priority_and_no_timestamp() {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let inner = tracing_subscriber::fmt::format().without_time().with_level(false).with_ansi(false);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .event_format(Journald { inner })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(stage = "export", "backend refused");
            tracing::info!("started");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("<3>") && lines[0].contains("backend refused stage=\"export\""), "{text}");
        assert!(lines[1].starts_with("<6>") && lines[1].contains("started"), "{text}");
        assert!(!text.contains("2026-") && !text.contains("ERROR"), "no timestamp, no level word: {text}");
    }

    #[test]
    fn auto_is_text_unless_stderr_is_the_journal() {
        // The test's stderr is not a journal stream whatever JOURNAL_STREAM says.
        assert_eq!(resolve(LogFormat::Auto), LogFormat::Text);
        assert_eq!(resolve(LogFormat::Json), LogFormat::Json);
    }
}
