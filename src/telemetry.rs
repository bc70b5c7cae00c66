//! Logs and traces.
//!
//! - Logs: JSON lines in production, readable text in dev; levels from `RUST_LOG`. JSON
//!   lines carry the fields of the spans they happen in (`request_id`, `trace_id`, `route`,
//!   `client_ip`, `user`, ...).
//! - Traces: with `telemetry.otlp_endpoint` set, spans go to an OTLP collector (Jaeger
//!   takes OTLP natively) through a batch processor on its own thread: exporting never
//!   blocks a request, a full queue drops spans, and failures are logged by the SDK.
//!   Message-path spans (`chat.send`, `chat.deliver`, `redis.*`) are DEBUG-level spans
//!   that only the trace exporter subscribes to, so with tracing off they are never even
//!   created.

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterFn, Targets};
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

use crate::config::{Config, LogFormat, TelemetryConfig};

/// Whether spans are exported: without it there is no trace context to look up, so the
/// per-message trace-context code is skipped.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes buffered spans and stops the exporter. Call from a blocking thread while
    /// the runtime still runs (`spawn_blocking`): a gRPC exporter's connection lives on
    /// the runtime, and the HTTP exporter's blocking client must not be dropped in it.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("chatgate: flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber (logs, and the trace exporter when configured). Call
/// once, from `main`, before the runtime starts; `runtime` is entered while a gRPC
/// exporter is built (its channel runs on it).
///
/// # Errors
/// The exporter cannot be built (a malformed endpoint).
pub fn init(config: &Config, runtime: &tokio::runtime::Runtime) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match config.log.format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_filter(filter)
            .boxed(),
    };
    let provider = if config.telemetry.otlp_endpoint.is_empty() {
        None
    } else {
        Some(provider(&config.telemetry, &config.instance_id, runtime)?)
    };
    let traces = provider.as_ref().map(|provider| {
        opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
        ]));
        let tracer = provider.tracer("chatgate");
        // Spans only (log events stay in the logs), chatgate's down to DEBUG, the HTTP
        // layers' at INFO.
        let targets = Targets::new()
            .with_target("chatgate", tracing::Level::DEBUG)
            .with_target("tower_http", tracing::Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(targets)
            .with_filter(FilterFn::new(|metadata| metadata.is_span()))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    EXPORTING.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
    Ok(Telemetry { provider })
}

fn provider(
    config: &TelemetryConfig,
    instance_id: &str,
    runtime: &tokio::runtime::Runtime,
) -> Result<SdkTracerProvider, String> {
    let timeout = std::time::Duration::from_secs(5);
    let exporter = if config.otlp_protocol == "grpc" {
        let _inside = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&config.otlp_endpoint)
            .with_timeout(timeout)
            .build()
    } else {
        // A base URL gets the standard traces path, as the OTEL_* variables would.
        let endpoint = match reqwest::Url::parse(&config.otlp_endpoint) {
            Ok(url) if url.path() == "/" || url.path().is_empty() => {
                format!("{}/v1/traces", config.otlp_endpoint.trim_end_matches('/'))
            }
            _ => config.otlp_endpoint.clone(),
        };
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .with_headers(Default::default())
            .build()
    }
    .map_err(|e| format!("telemetry.otlp_endpoint: cannot build the OTLP exporter: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance_id.to_string()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(resource)
        .build())
}

/// The W3C `traceparent` of the current span, when it is recorded (tracing on).
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Makes `span` a child of the remote span named by a W3C `traceparent`.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let carrier =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

/// Makes `span` a child of the `traceparent` in these HTTP headers, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if let Some(traceparent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        set_remote_parent(span, traceparent);
    }
}

/// The trace id of `span`, when it is recorded (for log lines).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    let otel = context.span();
    let sc = otel.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
