//! OpenTelemetry export (optional): one span per request, with the engine's stages or the
//! upstream call as child spans, sent over OTLP/HTTP to a collector.
//!
//! The spans are made from the request's finished trace record (`tenancy`), so they carry
//! exactly what `GET /v1/traces/{id}` shows (route, model, status, tokens, timings) and
//! cost nothing while export is off. The engine reports stage durations, not instants:
//! the child spans are laid end to end, ending with the request.
//!
//! Configured by `--otlp-endpoint` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL:
//! spans go to `/v1/traces` under it); `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the
//! default, or `http/json`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` and the
//! `OTEL_BSP_*` batch settings are read as the specification says.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use serde_json::Value;

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Flushes and stops the exporter when dropped (at shutdown).
pub struct OtelGuard(SdkTracerProvider);

impl Drop for OtelGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            tracing::warn!(error = %e, "flushing OpenTelemetry spans");
        }
    }
}

/// Starts exporting to `endpoint` (or to `OTEL_EXPORTER_OTLP_ENDPOINT` when `None`); `Ok(None)`
/// when neither is set.
pub fn install(endpoint: Option<&str>) -> Result<Option<OtelGuard>, String> {
    let from_env = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.is_empty());
    let Some(base) = endpoint.map(String::from).or(from_env) else {
        return Ok(None);
    };
    let url = format!("{}/v1/traces", base.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .build()
        .map_err(|e| format!("the OTLP exporter for {url}: {e}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "ferry".into());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    if TRACER.set(provider.tracer("ferry")).is_err() {
        return Err("OpenTelemetry export is already installed".into());
    }
    tracing::info!(%url, "exporting request spans over OTLP");
    Ok(Some(OtelGuard(provider)))
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// Exports one finished request from its trace; `elapsed` is its whole duration.
pub fn export(trace: &Value, elapsed: Duration) {
    let Some(tracer) = TRACER.get() else {
        return;
    };
    let end = SystemTime::now();
    let start = end - elapsed;
    let text = |v: &Value| v.as_str().map(String::from);
    let route = text(&trace["route"]).unwrap_or_default();
    let mut attributes = vec![
        KeyValue::new("ferry.request_id", text(&trace["request_id"]).unwrap_or_default()),
        KeyValue::new("http.route", route.clone()),
        KeyValue::new("ferry.status", text(&trace["status"]).unwrap_or_default()),
    ];
    let strings = [
        ("gen_ai.request.model", &trace["model"]),
        ("ferry.tenant_id", &trace["tenant_id"]),
        ("ferry.project_id", &trace["project_id"]),
        ("ferry.key_id", &trace["key_id"]),
        ("ferry.provider", &trace["routing"]["provider"]),
        ("ferry.guardrail_policy", &trace["guardrails"]["policy"]),
    ];
    attributes.extend(strings.into_iter().filter_map(|(k, v)| Some(KeyValue::new(k, text(v)?))));
    let numbers = [
        ("http.response.status_code", &trace["http_status"]),
        ("gen_ai.usage.input_tokens", &trace["tokens"]["prompt"]),
        ("gen_ai.usage.output_tokens", &trace["tokens"]["completion"]),
        ("ferry.cached_tokens", &trace["tokens"]["cached"]),
    ];
    attributes.extend(numbers.into_iter().filter_map(|(k, v)| Some(KeyValue::new(k, v.as_i64()?))));
    let http_status = trace["http_status"].as_u64().unwrap_or(0);
    let mut root = tracer
        .span_builder(route)
        .with_kind(SpanKind::Server)
        .with_start_time(start)
        .with_attributes(attributes)
        .start(tracer);
    if http_status >= 500 || trace["status"] == "error" && http_status == 0 {
        root.set_status(Status::error(format!("HTTP {http_status}")));
    }
    let cx = Context::current_with_span(root);
    let ms = |v: &Value| v.as_f64().map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    let timings = &trace["timings"];
    // The engine's stages, laid end to end so that decoding ends with the request.
    let mut stages: Vec<(&str, Duration, Vec<KeyValue>)> = Vec::new();
    for name in ["queue", "prefill", "decode"] {
        if let Some(d) = ms(&timings[format!("{name}_ms")]) {
            stages.push((name, d, Vec::new()));
        }
    }
    if stages.is_empty()
        && let Some(d) = ms(&timings["upstream_ms"])
    {
        let routing = &trace["routing"];
        let mut attrs = Vec::new();
        if let Some(target) = text(&routing["target"]) {
            attrs.push(KeyValue::new("ferry.upstream.target", target));
        }
        for key in ["attempts", "fallbacks"] {
            if let Some(n) = routing[key].as_i64() {
                attrs.push(KeyValue::new(format!("ferry.upstream.{key}"), n));
            }
        }
        stages.push(("upstream", d, attrs));
    }
    let total: Duration = stages.iter().map(|(_, d, _)| *d).sum();
    let mut at = end.checked_sub(total).filter(|t| *t >= start).unwrap_or(start);
    for (name, duration, attrs) in stages {
        let kind = if name == "upstream" { SpanKind::Client } else { SpanKind::Internal };
        let span_name = if name == "upstream" { "upstream".to_string() } else { format!("engine.{name}") };
        let mut child = tracer
            .span_builder(span_name)
            .with_kind(kind)
            .with_start_time(at)
            .with_attributes(attrs)
            .start_with_context(tracer, &cx);
        at = (at + duration).min(end);
        child.end_with_timestamp(at);
    }
    cx.span().end_with_timestamp(end);
}
