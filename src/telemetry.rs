//! Observability: log lines (text or JSON), trace export over OTLP and
//! Prometheus metrics.

mod logging;
pub mod metrics;
mod otlp;

pub use logging::init;
pub use otlp::shutdown;
