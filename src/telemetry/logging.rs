//! The tracing subscriber: text or JSON log lines filtered by `RUST_LOG`
//! (default `info`), plus span export over OTLP when configured.

use std::io::{BufWriter, IsTerminal};
use std::sync::Mutex;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::text::{TextFields, TextLine};
use crate::config::LogFormat;

/// Lines a burst may queue before requests wait for the log writer.
const QUEUED_LINES: usize = 8192;

/// Held until [`flush`]: dropping it writes out the queued lines.
static WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Every request logs a line: written to stderr directly, each one cost a
    // syscall under a process-wide lock on the request's worker thread (a
    // third of the throughput of small responses). A writer thread takes the
    // formatted lines and writes whatever has queued in one syscall. Not
    // lossy: when the queue is full, requests wait rather than lines vanish.
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("pier-log")
        .finish(BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let lines = tracing_subscriber::fmt::layer().with_writer(writer);
    let lines = match format {
        // Colours for a person at a terminal; plain lines, cheaply written,
        // for files and collectors.
        LogFormat::Text if std::io::stderr().is_terminal() => lines.boxed(),
        LogFormat::Text => lines
            .with_ansi(false)
            .event_format(TextLine)
            .fmt_fields(TextFields)
            .boxed(),
        LogFormat::Json => lines.with_ansi(false).json().boxed(),
    };
    let export = super::otlp::tracer().map(|t| tracing_opentelemetry::layer().with_tracer(t));
    // A second init (tests) keeps the first subscriber and its writer.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(export)
        .try_init();
    if installed.is_ok()
        && let Ok(mut held) = WRITER.lock()
    {
        *held = Some(guard);
    }
}

/// Writes out the lines still queued; later lines are dropped.
pub fn flush() {
    let guard = WRITER.lock().ok().and_then(|mut held| held.take());
    drop(guard);
}
