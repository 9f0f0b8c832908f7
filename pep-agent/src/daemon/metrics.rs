//! Prometheus `/metrics` (text exposition, prometheus-client), `/healthz`
//! (the process answers) and `/readyz` (programs attached and policies
//! loaded), on a small HTTP/1.1 server.

use std::{
    convert::Infallible,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use aya::maps::{Map, MapData, PerCpuArray};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use pep_common::event::{
    COUNTER_ASK_LOST, COUNTER_CACHE_HIT, COUNTER_CACHE_MISS, COUNTER_DECISIONS, COUNTER_LOST,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::sync::watch;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub action: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub op: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// A monotonic kernel counter mirrored into a Prometheus counter.
struct Mirror {
    counter: Counter,
    seen: AtomicU64,
}

impl Mirror {
    fn new() -> Self {
        Self {
            counter: Counter::default(),
            seen: AtomicU64::new(0),
        }
    }

    fn update(&self, total: u64) {
        let before = self.seen.swap(total, Ordering::SeqCst);
        if total > before {
            self.counter.inc_by(total - before);
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub reload_seconds: Histogram,
    pub pdp_latency: Histogram,
    pub sandboxes: Gauge,
    kernel_decisions: Mirror,
    cache_hits: Mirror,
    cache_misses: Mirror,
    lost: Mirror,
    asks_lost: Mirror,
    /// Set once the programs are attached and every policy installed.
    pub ready: AtomicBool,
    counters: Mutex<Option<PerCpuArray<MapData, u64>>>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("pep");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions recorded in the audit stream, by action and verdict",
            decisions.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "control_requests",
            "Control socket requests by op and result",
            requests.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("reloads", "Policy reloads by result", reloads.clone());
        let reload_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reload_duration_seconds",
            "Time to validate, compile and install a reload",
            reload_seconds.clone(),
        );
        let pdp_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "pdp_latency_seconds",
            "Latency of Policy Decision Point answers",
            pdp_latency.clone(),
        );
        let sandboxes = Gauge::default();
        registry.register("sandboxes", "Sandboxes managed by the daemon", sandboxes.clone());
        let kernel_decisions = Mirror::new();
        registry.register(
            "kernel_decisions",
            "Decisions the kernel made (pinned counter, across daemon restarts)",
            kernel_decisions.counter.clone(),
        );
        let cache_hits = Mirror::new();
        registry.register(
            "cache_hits",
            "Verdict cache hits in the kernel",
            cache_hits.counter.clone(),
        );
        let cache_misses = Mirror::new();
        registry.register(
            "cache_misses",
            "Verdict cache misses in the kernel",
            cache_misses.counter.clone(),
        );
        let lost = Mirror::new();
        registry.register(
            "ringbuf_lost",
            "Events the ring buffer had no room for (reported in-band as audit.lost)",
            lost.counter.clone(),
        );
        let asks_lost = Mirror::new();
        registry.register(
            "pdp_asks_lost",
            "Verdict-cache misses the kernel could not send to the PDP (ring full or too many held connects): denied, and reported in-band",
            asks_lost.counter.clone(),
        );
        Arc::new(Self {
            registry,
            decisions,
            requests,
            reloads,
            reload_seconds,
            pdp_latency,
            sandboxes,
            kernel_decisions,
            cache_hits,
            cache_misses,
            lost,
            asks_lost,
            ready: AtomicBool::new(false),
            counters: Mutex::new(None),
        })
    }

    /// Reads the kernel counters from the pinned `COUNTERS` map from now on.
    pub fn watch_counters(&self, pin_dir: &Path) {
        let path = pin_dir.join("maps/COUNTERS");
        match MapData::from_pin(&path)
            .map(Map::PerCpuArray)
            .and_then(PerCpuArray::try_from)
        {
            Ok(arr) => *self.counters.lock().unwrap_or_else(|e| e.into_inner()) = Some(arr),
            Err(e) => tracing::warn!("metrics: {}: {e}", path.display()),
        }
    }

    pub fn count_request(&self, op: &str, ok: bool) {
        self.requests
            .get_or_create(&RequestLabels {
                op: op.into(),
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    /// The text exposition, kernel counters read now.
    pub fn encode(&self) -> String {
        if let Some(arr) = self.counters.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let sum = |i: u32| {
                arr.get(&i, 0)
                    .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                    .unwrap_or(0)
            };
            self.kernel_decisions.update(sum(COUNTER_DECISIONS));
            self.cache_hits.update(sum(COUNTER_CACHE_HIT));
            self.cache_misses.update(sum(COUNTER_CACHE_MISS));
            self.lost.update(sum(COUNTER_LOST));
            self.asks_lost.update(sum(COUNTER_ASK_LOST));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("metrics accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let m = metrics.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(m.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!("metrics connection: {e}") },
                _ = stop.changed() => {}
            }
        });
    }
}

fn text(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn handle(m: Arc<Metrics>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = "text/plain; charset=utf-8";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.encode(),
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, plain, "ok\n".into()),
        (&Method::GET, "/readyz") => {
            if m.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, plain, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, plain, "not ready\n".into())
            }
        }
        _ => text(StatusCode::NOT_FOUND, plain, "not found\n".into()),
    })
}
