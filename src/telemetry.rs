//! Observability: log lines (text or JSON) and Prometheus metrics.

mod logging;
pub mod metrics;

pub use logging::init;
