//! OpenTelemetry trace export over OTLP/HTTP, configured the standard way:
//! it is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-only
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and the exporter reads the
//! rest (`..._PROTOCOL` `http/protobuf` or `http/json`, `..._HEADERS`,
//! `..._TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_BSP_*`) from the environment.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the environment asks for trace export.
fn wanted() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// A tracer exporting in batches from a background thread, or `None` when
/// export is off or cannot be set up (said on stderr: logging is not up yet).
pub fn tracer() -> Option<opentelemetry_sdk::trace::Tracer> {
    if !wanted() {
        return None;
    }
    let protocol = match protocol() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("pier: OTLP trace export disabled: {why}");
            return None;
        }
    };
    // The exporter's blocking HTTP client must not be built on an async
    // runtime's thread.
    let built = std::thread::spawn(move || {
        use opentelemetry_otlp::WithExportConfig as _;
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .build()
    })
    .join();
    let exporter = match built {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            eprintln!("pier: OTLP trace export disabled: {e}");
            return None;
        }
        Err(_) => {
            eprintln!("pier: OTLP trace export disabled: the exporter could not be built");
            return None;
        }
    };
    let resource = Resource::builder()
        .with_service_name(std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "pier".into()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("pier");
    let _ = PROVIDER.set(provider);
    Some(tracer)
}

/// The encoding the environment asks for; OTLP's default is protobuf
/// (the exporter library would pick JSON when both are compiled in).
fn protocol() -> Result<opentelemetry_otlp::Protocol, String> {
    let asked = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()));
    match asked.as_deref().map(str::trim) {
        None | Some("http/protobuf") => Ok(opentelemetry_otlp::Protocol::HttpBinary),
        Some("http/json") => Ok(opentelemetry_otlp::Protocol::HttpJson),
        Some(other) => Err(format!(
            "protocol {other:?} is not supported; use http/protobuf or http/json"
        )),
    }
}

/// Whether spans leave the process (the request span then carries the
/// request's facts as attributes).
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// Sends the spans still buffered (at exit).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get()
        && let Err(e) = p.shutdown()
    {
        eprintln!("pier: flushing traces failed: {e}");
    }
}
