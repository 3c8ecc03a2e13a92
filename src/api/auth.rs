//! The authentication layer: a request id for every call, the bearer token checked before any
//! kluis handler runs (health and reflection pass without one), and one log line per call.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;

use super::status::to_status;
use crate::domain::{Caller, Callers};

/// What the layer found out about a call, for the handler: take it with [`context`].
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub caller: Caller,
}

/// Paths served without a token: the health protocol and server reflection.
fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

#[derive(Clone)]
pub struct AuthLayer {
    callers: Arc<Callers>,
}

impl AuthLayer {
    pub fn new(callers: Arc<Callers>) -> Self {
        Self { callers }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            callers: self.callers.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    callers: Arc<Callers>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The clone that was made ready is the one that must serve this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let callers = self.callers.clone();
        let method = request.uri().path().to_owned();
        if is_public(&method) {
            return Box::pin(inner.call(request));
        }
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let span = tracing::info_span!("rpc", %request_id, %method, caller = tracing::field::Empty, role = tracing::field::Empty);
        Box::pin(
            async move {
                let started = Instant::now();
                let header = request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap_or("\u{0}"));
                let mut response = match callers.authenticate(header).await {
                    Ok(caller) => {
                        let span = tracing::Span::current();
                        span.record("caller", caller.name.as_str());
                        span.record("role", caller.role.as_str());
                        request.extensions_mut().insert(RequestContext {
                            request_id: request_id.clone(),
                            caller,
                        });
                        inner.call(request).await?
                    }
                    Err(e) => to_status(e, &request_id).into_http(),
                };
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-request-id", v);
                }
                let status = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0 or in trailers")
                    .to_owned();
                tracing::debug!(grpc_status = %status, elapsed_us = started.elapsed().as_micros() as u64, "rpc done");
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The context the layer put on an authenticated request.
pub fn context<T>(request: &tonic::Request<T>) -> Result<RequestContext, tonic::Status> {
    request
        .extensions()
        .get::<RequestContext>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("no authenticated caller"))
}
