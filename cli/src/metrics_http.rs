//! The broker's HTTP endpoint: `GET /metrics` (Prometheus text exposition rendered by
//! `metrics-exporter-prometheus`), `GET /health` (the process is alive) and `GET /ready` (the
//! broker is serving). HTTP/1.1 by hyper; bounded connections, header read timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ketch_broker::metrics::{GAUGE_IDLE_TIMEOUT, LATENCY_BUCKETS_SECONDS};
use ketch_broker::server::BrokerProbe;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::sync::Semaphore;

/// Scrapers and probes served at once; more wait for a slot.
const HTTP_CONNECTIONS_MAX: usize = 64;
/// A client must send its request headers within this.
const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Histograms are drained into their buckets this often between scrapes (bounds memory).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's global `metrics` recorder.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
        .context("histogram buckets")?
        // Every live gauge is set at each scrape; those of deleted topics and groups go.
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT))
        .install_recorder()
        .context("installing the metrics recorder")?;
    ketch_broker::metrics::describe();
    metrics::describe_gauge!(
        "process_resident_memory_bytes",
        metrics::Unit::Bytes,
        "Resident memory of the broker process."
    );
    metrics::describe_gauge!(
        "process_open_fds",
        metrics::Unit::Count,
        "Open file descriptors of the broker process."
    );
    metrics::describe_gauge!(
        "process_threads",
        metrics::Unit::Count,
        "Threads of the broker process."
    );
    Ok(handle)
}

/// What the endpoint answers from. The broker is set once it has opened its storage.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub handle: PrometheusHandle,
    pub broker: Arc<OnceLock<BrokerProbe>>,
}

/// Whether `start` failed because another socket holds the address.
pub fn is_addr_in_use(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
    })
}

/// Binds `addr` and serves until the runtime stops; returns the bound address.
pub async fn start(addr: SocketAddr, endpoint: Endpoint) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics endpoint {addr} (choose another with --metrics-listen HOST:PORT, or off)")
    })?;
    let local = listener.local_addr().context("metrics endpoint address")?;
    let upkeep = endpoint.handle.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            interval.tick().await;
            upkeep.run_upkeep();
        }
    });
    let slots = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics endpoint accept failed");
                    continue;
                }
            };
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let endpoint = endpoint.clone();
                    async move { Ok::<_, Infallible>(answer(&endpoint, &request)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HTTP_HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "metrics endpoint connection failed");
                }
                drop(slot);
            });
        }
    });
    Ok(local)
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

const PLAIN: &str = "text/plain; charset=utf-8";
/// The Prometheus text exposition format.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

fn answer(endpoint: &Endpoint, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET is served\n".into(),
        );
    }
    let broker = endpoint.broker.get();
    match request.uri().path() {
        "/metrics" => {
            if let Some(broker) = broker {
                broker.collect_metrics();
            }
            collect_process_metrics();
            text(StatusCode::OK, EXPOSITION, endpoint.handle.render())
        }
        "/health" => text(StatusCode::OK, PLAIN, "alive\n".into()),
        "/ready" => match readiness(broker) {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /health or /ready\n".into(),
        ),
    }
}

/// Ready when the broker has opened its storage, bound its listener and accepts requests.
fn readiness(broker: Option<&BrokerProbe>) -> Result<(), &'static str> {
    match broker {
        None => Err("not ready: opening storage"),
        Some(broker) if !broker.is_serving() => Err("not ready: not accepting requests"),
        Some(_) => Ok(()),
    }
}

/// Resident memory, open files and threads, from `/proc/self` (Linux; elsewhere absent).
fn collect_process_metrics() {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            let value = |prefix: &str| {
                line.strip_prefix(prefix)?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            };
            if let Some(kib) = value("VmRSS:") {
                metrics::gauge!("process_resident_memory_bytes").set(kib * 1024.0);
            } else if let Some(threads) = value("Threads:") {
                metrics::gauge!("process_threads").set(threads);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(entries.count() as f64);
    }
}
