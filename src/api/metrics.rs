//! Prometheus metrics: the process's recorder, the layer that counts and times every gRPC call,
//! and the plain-HTTP `/metrics` listener on its own port. Labels hold method names, status codes
//! and pool names only — never an id, a value or a caller.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tower::{Layer, Service};

use crate::store::Store;

/// Latency buckets (seconds) of the gRPC and commit histograms: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Connections the `/metrics` listener serves at once.
const MAX_CONNECTIONS: usize = 16;
/// How long a client of the `/metrics` listener may take to send a request's headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Buckets of the group-commit batch sizes (requests, audit events per transaction).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The recorder of this process, installed by the first instance that serves metrics (the
/// `metrics` macros record into one global recorder; instances in one process share it).
static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The process's Prometheus recorder, installing it on first use.
///
/// # Errors
/// When another metrics recorder was installed in this process first.
pub fn recorder() -> Result<PrometheusHandle, String> {
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), BATCH_BUCKETS)
                })
                .and_then(PrometheusBuilder::install_recorder)
                .map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

/// Help texts of every metric kluis records.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "kluis_grpc_requests_total",
        "gRPC calls answered, by method and status code"
    );
    describe_histogram!(
        "kluis_grpc_request_duration_seconds",
        metrics::Unit::Seconds,
        "time from a call's arrival to its answer's headers, by method"
    );
    describe_histogram!(
        "kluis_commit_batch_size",
        "requests committed per group-commit transaction"
    );
    describe_histogram!(
        "kluis_audit_batch_size",
        "audit events committed per group-commit transaction"
    );
    describe_histogram!(
        "kluis_commit_duration_seconds",
        metrics::Unit::Seconds,
        "time of one group-commit transaction"
    );
    describe_counter!(
        "kluis_keys_rewrapped_total",
        "data keys re-wrapped under the active KEK by this instance"
    );
    describe_gauge!(
        "kluis_keys_active_kek_version",
        "the KEK version new data keys are wrapped under"
    );
    describe_gauge!(
        "kluis_retention_due_subjects",
        "subjects with a due path found by this instance's last retention sweep"
    );
    describe_counter!(
        "kluis_retention_purged_subjects_total",
        "subjects some paths of which were purged by retention sweeps"
    );
    describe_counter!(
        "kluis_retention_shredded_subjects_total",
        "subjects whose data key was destroyed by retention sweeps (nothing left to keep)"
    );
    describe_counter!(
        "kluis_retention_purged_paths_total",
        "field values purged by retention sweeps"
    );
    describe_gauge!(
        "kluis_db_pool_connections",
        "open database connections, by pool (reads, writes; PostgreSQL: shared)"
    );
    describe_gauge!(
        "kluis_db_pool_idle_connections",
        "idle database connections, by pool"
    );
}

// ---- the gRPC layer ------------------------------------------------------------------------------

/// Counts and times every call by method and status code.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let mut call = CallRecord {
            method: method_label(request.uri().path()),
            started: Instant::now(),
            recorded: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            // An error status travels in the headers of a trailers-only answer; a success (or an
            // error after streamed messages) in the trailers, which this layer does not wait for.
            let code = match &result {
                Ok(response) => {
                    super::status::header_code(response.headers()).unwrap_or(tonic::Code::Ok)
                }
                Err(_) => tonic::Code::Unknown,
            };
            call.record(code);
            result
        })
    }
}

/// One call being counted: recorded with its status when answered, or as `CANCELLED` when its
/// future is dropped first (the server's deadline fired, or the client went away).
struct CallRecord {
    method: &'static str,
    started: Instant,
    recorded: bool,
}

impl CallRecord {
    fn record(&mut self, code: tonic::Code) {
        self.recorded = true;
        metrics::counter!(
            "kluis_grpc_requests_total",
            "method" => self.method,
            "code" => super::status::code_name(code),
        )
        .increment(1);
        metrics::histogram!("kluis_grpc_request_duration_seconds", "method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(tonic::Code::Cancelled);
        }
    }
}

/// `kluis.v1.SubjectService/GetSubject` for `/kluis.v1.SubjectService/GetSubject` when a service
/// of this server has that method; `unknown` for any other path (with or without a token), so a
/// client can neither mint labels nor put text of its own into them.
fn method_label(path: &str) -> &'static str {
    let path = path.trim_start_matches('/');
    known_methods()
        .get(path)
        .map_or("unknown", |known| known.as_str())
}

/// Every `package.Service/Method` kluis serves: its own services, health and reflection.
fn known_methods() -> &'static std::collections::HashSet<String> {
    static KNOWN: OnceLock<std::collections::HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message;
        let mut known: std::collections::HashSet<String> = [
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        for set in [
            super::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!(
                            "{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        known
    })
}

// ---- the /metrics listener -----------------------------------------------------------------------

/// Serves `GET /metrics` (Prometheus text format) on `listener` until the task is dropped; pool
/// gauges are read at each scrape.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, on_scrape: OnScrape) {
    // A scraper needs one connection; a few spare, and then no more.
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics listener: too many connections; closed");
            continue;
        };
        let handle = handle.clone();
        let on_scrape = on_scrape.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(&request, &handle, &on_scrape);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, %peer, "metrics connection ended with an error");
            }
        });
    }
}

/// Sets the gauges that are read at scrape time (pool use, key versions).
pub type OnScrape = Arc<dyn Fn() + Send + Sync>;

/// The pool gauges of `store`, now.
pub fn record_pool_use(store: &Store) {
    for (pool, open, idle) in store.pool_use() {
        metrics::gauge!("kluis_db_pool_connections", "pool" => pool).set(f64::from(open));
        metrics::gauge!("kluis_db_pool_idle_connections", "pool" => pool).set(idle as f64);
    }
}

fn answer(
    request: &Request<Incoming>,
    handle: &PrometheusHandle,
    on_scrape: &OnScrape,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            on_scrape();
            handle.run_upkeep();
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                handle.render(),
            )
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "kluis serves /metrics here\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
