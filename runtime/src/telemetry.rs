//! Traces and logs (`[telemetry]`).
//!
//! Every event carries W3C trace context as the CloudEvents distributed-tracing extension
//! (`ce_traceparent`, `ce_tracestate`: extension attributes are `ce_` headers in the Kafka
//! binding; a bare `traceparent` header is read too). A trace starts at the HTTP request (an
//! incoming `traceparent` is its parent) and passes from each event to the events its handler
//! emits and the deadlines it sets, so one saga is one trace across services, instances and
//! Kafka. Spans: `ingress`, `consume`, `guest call`, `commit`, `relay publish` and
//! `deadline fired`, with the service, version, saga and event id as attributes.
//!
//! Spans are made and their ids carried and logged (log lines inside a span name its
//! `trace_id`) whether or not they are exported; `telemetry.otlp_endpoint` turns on the OTLP
//! (gRPC) export, off by default. The standard `OTEL_BSP_*` variables tune its batching.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// The CloudEvents distributed-tracing extension's attributes, as Kafka headers.
pub const TRACEPARENT: &str = "ce_traceparent";
pub const TRACESTATE: &str = "ce_tracestate";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// OTLP/gRPC endpoint spans are exported to, e.g. `http://127.0.0.1:4317`. Default none:
    /// no export. Env `SAGA_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// Share of the traces begun here that are recorded, 0 to 1; a trace begun elsewhere
    /// follows its caller's sampled flag. Default 1.
    pub sample_ratio: f64,
    /// Make spans at all. `false`: no spans, and events carry no trace context (the cheapest;
    /// `otlp_endpoint` is then ignored). Default true.
    pub spans: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            spans: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("telemetry.sample_ratio must be between 0 and 1, not {0}")]
    Ratio(f64),
    #[error("a global tracing subscriber is already installed")]
    Installed,
}

/// Keeps the tracer alive; [`Guard::shutdown`] sends what is still buffered.
pub struct Guard {
    provider: SdkTracerProvider,
}

impl Guard {
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::debug!("trace export shutdown: {e}");
        }
    }
}

/// The log filter: `SAGA_LOG` (a `tracing` filter), else info without the chatty crates.
fn log_directives() -> String {
    std::env::var("SAGA_LOG").unwrap_or_else(|_| "info,rdkafka=warn,sqlx=warn".into())
}

fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::builder().parse_lossy(log_directives())
}

/// Colours in the logs only for a terminal: a file or a log collector gets plain text.
fn colours() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal()
}

/// Logs to stderr only (the command-line tools).
pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(colours())
        .init();
}

/// Logs to stderr and this crate's spans to OpenTelemetry (exported if configured), for an
/// instance named `instance`. Must run inside the tokio runtime (the gRPC client lives there).
pub fn init(settings: &Settings, instance: &str) -> Result<Guard, Error> {
    if !(0.0..=1.0).contains(&settings.sample_ratio) {
        return Err(Error::Ratio(settings.sample_ratio));
    }
    if !settings.spans {
        init_logs();
        let provider = SdkTracerProvider::builder().build();
        return Ok(Guard { provider });
    }
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("saga-runtime")
        .with_attribute(KeyValue::new("service.instance.id", instance.to_string()))
        .build();
    let mut builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))));
    if let Some(endpoint) = settings.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| Error::Exporter {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    // One filter for both layers: the log filter, with this crate's spans and events on
    // whatever it says; the logs still show only what it admits. (With a per-layer filter on
    // the span layer instead, a span now and then had no trace data: about one run in four of
    // integration_tracing with SAGA_LOG=info, tracing-subscriber 0.3.23.)
    let mut directives = log_directives();
    if !directives.contains("saga_runtime") {
        directives.push_str(",saga_runtime=info");
    }
    let admitted = tracing_subscriber::EnvFilter::builder().parse_lossy(directives);
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("saga-runtime"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        // Nothing here reads OpenTelemetry's current context (trace context is taken from each
        // span, `carried`), so entering a span need not make its context current: that cost a
        // thread-local attach and detach on every poll of an instrumented future.
        .with_context_activation(false);
    // The logs show this crate's spans whatever the filter admits of events, so that a
    // warning names the trace it belongs to.
    use tracing_subscriber::filter::FilterExt as _;
    let ours = tracing_subscriber::filter::filter_fn(|m| {
        m.is_span() && m.target().starts_with("saga_runtime")
    });
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colours())
        .with_filter(log_filter().or(ours));
    tracing_subscriber::registry()
        .with(admitted)
        .with(spans)
        .with(logs)
        .try_init()
        .map_err(|_| Error::Installed)?;
    Ok(Guard { provider })
}

/// Trace context read from headers: Kafka records, outbox rows or HTTP requests.
pub trait Carrier {
    /// The value of header `name`, if present and text.
    fn header(&self, name: &str) -> Option<&str>;
}

impl<V: AsRef<[u8]>> Carrier for [(String, V)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v.as_ref()).ok())
    }
}

impl Carrier for axum::http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The propagator's view of an event's headers: the extension's `ce_` names first.
struct Extract<'a, C: ?Sized>(&'a C);

impl<C: Carrier + ?Sized> Extractor for Extract<'_, C> {
    fn get(&self, key: &str) -> Option<&str> {
        let ce = match key {
            "traceparent" => TRACEPARENT,
            "tracestate" => TRACESTATE,
            _ => return None,
        };
        self.0.header(ce).or_else(|| self.0.header(key))
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Make `span` a child of the trace context in `headers` (if they carry a valid one; else it
/// begins a trace) and note its trace id in its `trace_id` field, for the log lines in it.
pub fn follow<C: Carrier + ?Sized>(span: &tracing::Span, headers: &C) {
    // From an empty context, not the thread's current one: that may be the exporter's, which
    // suppresses telemetry, and a span begun in it would record nothing.
    let parent = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &Extract(headers));
    // Fails only for a span no layer records (no tracer installed): nothing to link.
    let _ = span.set_parent(parent);
    note_trace_id(span);
}

/// Make `span` a child of a stored `traceparent` (a deadline's), as [`follow`] does.
pub fn follow_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    let headers: Vec<(String, &str)> = traceparent
        .map(|t| (TRACEPARENT.to_string(), t))
        .into_iter()
        .collect();
    follow(span, headers.as_slice());
}

fn note_trace_id(span: &tracing::Span) {
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
    }
}

/// The headers that make events children of `span`: `ce_traceparent` (and `ce_tracestate`
/// if the trace has one); none if the span records no trace.
pub fn carried(span: &tracing::Span) -> Vec<(String, String)> {
    struct Inject(Vec<(String, String)>);
    impl Injector for Inject {
        fn set(&mut self, key: &str, value: String) {
            let ce = match key {
                "traceparent" => TRACEPARENT,
                "tracestate" if !value.is_empty() => TRACESTATE,
                _ => return,
            };
            self.0.push((ce.to_string(), value));
        }
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut out = Inject(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&context, &mut out);
    out.0
}

/// The span of one guest call (an attempt) of `service` at `version`, inside `parent`.
pub fn guest_span(
    parent: &tracing::Span,
    service: &str,
    version: &str,
    attempt: u32,
) -> tracing::Span {
    tracing::info_span!(
        parent: parent,
        "guest call",
        saga.service = %service,
        saga.version = %version,
        saga.attempt = attempt,
    )
}

/// Whether a header is one of the trace context's.
pub fn is_trace_header(name: &str) -> bool {
    name == TRACEPARENT || name == TRACESTATE
}

/// The `traceparent` among carried headers (what a deadline stores).
pub fn traceparent(carried: &[(String, String)]) -> Option<&str> {
    carried
        .iter()
        .find(|(k, _)| k == TRACEPARENT)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_tracer<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn a_span_following_an_events_traceparent_is_its_child_and_passes_its_own_on() {
        let carried = with_tracer(|| {
            let span = tracing::info_span!("consume", trace_id = tracing::field::Empty);
            let headers = vec![(TRACEPARENT.to_string(), PARENT.as_bytes().to_vec())];
            follow(&span, headers.as_slice());
            carried(&span)
        });
        let parent = traceparent(&carried).expect("a traceparent is carried on");
        let parts: Vec<&str> = parent.split('-').collect();
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_ne!(
            parts[2], "00f067aa0ba902b7",
            "its own span id, not its parent's"
        );
        assert_eq!(parts[3], "01", "sampled, as the parent");
    }

    #[test]
    fn a_bare_traceparent_header_is_read_and_garbage_begins_a_new_trace() {
        let (bare, garbage) = with_tracer(|| {
            let a = tracing::info_span!("a");
            follow(&a, [("traceparent".to_string(), PARENT)].as_slice());
            let b = tracing::info_span!("b");
            follow(&b, [(TRACEPARENT.to_string(), "00-nonsense")].as_slice());
            (carried(&a), carried(&b))
        });
        assert!(traceparent(&bare)
            .unwrap()
            .contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        let fresh = traceparent(&garbage).expect("a new trace");
        assert!(!fresh.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn without_a_tracer_nothing_is_carried() {
        let span = tracing::info_span!("consume");
        follow(&span, [(TRACEPARENT.to_string(), PARENT)].as_slice());
        assert!(carried(&span).is_empty());
    }
}
