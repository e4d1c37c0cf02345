//! Observability: log lines (text or JSON), trace export over OTLP and
//! Prometheus metrics.

pub mod access;
mod logging;
pub mod metrics;
mod otlp;
pub mod tally;
mod text;

pub use logging::init;
pub use otlp::exporting;

/// Before exit: sends the spans still batched and writes out queued log
/// lines.
pub fn shutdown() {
    otlp::shutdown();
    logging::flush();
}
