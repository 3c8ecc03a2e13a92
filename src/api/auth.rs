//! The authentication layer: a request id for every call, the bearer token checked before any
//! kluis handler runs (health and reflection pass without one), the declared purpose and reason
//! taken along for the handler, failed authentications counted for the audit trail, and one log
//! line per call.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::{client_addr::TrustedProxies, status::to_status, tls::Tls};
use crate::{
    audit::{AuditEvent, AuditTrail, FORMAT_VERSION},
    clock::now_us,
    domain::{Caller, Callers, access::Declared},
};

/// What the layer found out about a call, for the handler: take it with [`context`].
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub caller: Caller,
    /// `package.Service/Method`.
    pub method: String,
    /// The client's address (`ip:port`), or empty when the transport did not say.
    pub peer: String,
    /// `x-kluis-purpose` and `x-kluis-reason` as sent.
    pub declared: Declared,
    /// Set once the call's audit event is taken care of ([`super::call::Calls::finish`]); a call
    /// refused before its handler ran (undecodable message, unknown method) is recorded by the
    /// layer instead.
    pub audited: Arc<std::sync::atomic::AtomicBool>,
}

/// The method as the audit trail may record it: `package.Service/Method` when the path has that
/// form, else `unknown` (a client's arbitrary path is not copied into the trail).
pub fn method_name(path: &str) -> String {
    let name = path.trim_start_matches('/');
    let well_formed = name.len() <= 128
        && name.starts_with("kluis.v1.")
        && name.split_once('/').is_some_and(|(service, method)| {
            !method.is_empty()
                && service
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.')
                && method.bytes().all(|b| b.is_ascii_alphanumeric())
        });
    if well_formed {
        name.to_owned()
    } else {
        "unknown".to_owned()
    }
}

/// Failed authentications per client address, so a token-guessing client cannot flood the audit
/// trail: the first failure of an address in a window is recorded at once, the rest of that
/// window as one event with their count when the window ends.
pub struct FailedAuthentications {
    trail: Arc<AuditTrail>,
    window: std::time::Duration,
    /// Failures per client address in a window after which its calls are refused (0: never).
    limit: u32,
    /// Whose `x-forwarded-for` is believed when finding the client address.
    proxies: TrustedProxies,
    counts: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl FailedAuthentications {
    pub fn new(
        trail: Arc<AuditTrail>,
        window: std::time::Duration,
        limit: u32,
        proxies: TrustedProxies,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            trail,
            window,
            limit,
            proxies,
            counts: std::sync::Mutex::new(std::collections::HashMap::new()),
        });
        let flusher = Arc::downgrade(&this);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(window);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = flusher.upgrade() else {
                    return;
                };
                this.flush().await;
            }
        });
        this
    }

    fn event(&self, peer: &str, count: u32, method: &str, request_id: &str) -> AuditEvent {
        AuditEvent {
            v: FORMAT_VERSION,
            at_us: now_us(),
            method: "auth.failed".into(),
            policy_version: self.trail.policy_version().to_owned(),
            outcome: "UNAUTHENTICATED".into(),
            request_id: request_id.to_owned(),
            peer: peer.to_owned(),
            count,
            detail: if method.is_empty() {
                String::new()
            } else {
                format!("rpc={}", method_name(method))
            },
            ..AuditEvent::default()
        }
    }

    /// Counts a failure of client address `key` (per address, not per connection: a client
    /// reconnecting gets no fresh window).
    fn note(&self, key: &str, method: &str, request_id: &str) {
        let n = match self.counts.lock() {
            Ok(mut counts) => {
                // A flood of fresh addresses shares one bucket rather than growing the map.
                let key = if counts.len() >= MAX_TRACKED_ADDRESSES && !counts.contains_key(key) {
                    OVERFLOW_KEY
                } else {
                    key
                };
                let n = counts.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 0,
        };
        let key = key.to_owned();
        if self.limit > 0 && n == self.limit {
            tracing::warn!(
                client = %key,
                failures = n,
                window_s = self.window.as_secs(),
                "failed-authentication limit reached: this address's calls are refused until the window ends"
            );
        }
        if n == 1 {
            let event = self.event(&key, 1, method, request_id);
            let trail = self.trail.clone();
            tokio::spawn(async move {
                if let Err(e) = trail.record(&event).await {
                    tracing::warn!(error = %e, "failed authentication not recorded in the audit trail");
                }
            });
        }
    }

    /// Records the failures counted since each address's first one, and starts a new window.
    pub async fn flush(&self) {
        let counts = match self.counts.lock() {
            Ok(mut counts) => std::mem::take(&mut *counts),
            Err(_) => return,
        };
        for (peer, n) in counts {
            if n > 1 {
                let event = self.event(&peer, n - 1, "", "");
                if let Err(e) = self.trail.record(&event).await {
                    tracing::warn!(error = %e, "failed authentications not recorded in the audit trail");
                }
            }
        }
    }

    pub fn window(&self) -> std::time::Duration {
        self.window
    }

    /// Whether client address `key` has used up its failures in this window.
    fn over_limit(&self, key: &str) -> bool {
        self.limit > 0
            && self
                .counts
                .lock()
                .is_ok_and(|counts| counts.get(key).is_some_and(|n| *n >= self.limit))
    }

    /// The client address of `request`: its peer, or behind a trusted proxy the
    /// `x-forwarded-for` entry [`TrustedProxies::client`] picks.
    fn client_of<B>(&self, request: &Request<B>) -> String {
        let Some(peer) = peer_socket(request) else {
            return String::new();
        };
        let forwarded = request
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        client_key(self.proxies.client(peer.ip(), forwarded))
    }
}

/// Client addresses whose failures are counted one by one in a window; beyond, they share
/// [`OVERFLOW_KEY`].
const MAX_TRACKED_ADDRESSES: usize = 100_000;
const OVERFLOW_KEY: &str = "(many addresses)";

/// The key failures are counted under: an IPv4 address, or an IPv6 address's /64 (what one
/// client network usually holds, so rotating addresses within it gains nothing).
fn client_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => {
            let network = std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64));
            format!("{network}/64")
        }
    }
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
    failures: Arc<FailedAuthentications>,
    calls: super::call::Calls,
    tls: Option<Arc<Tls>>,
}

impl AuthLayer {
    pub fn new(
        callers: Arc<Callers>,
        failures: Arc<FailedAuthentications>,
        calls: super::call::Calls,
        tls: Option<Arc<Tls>>,
    ) -> Self {
        Self {
            callers,
            failures,
            calls,
            tls,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            callers: self.callers.clone(),
            failures: self.failures.clone(),
            calls: self.calls.clone(),
            tls: self.tls.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    callers: Arc<Callers>,
    failures: Arc<FailedAuthentications>,
    calls: super::call::Calls,
    tls: Option<Arc<Tls>>,
}

/// The caller a verified client certificate stands for, when the configuration maps one of its
/// DNS names to a role.
fn certificate_caller<B>(tls: Option<&Tls>, request: &Request<B>) -> Option<Caller> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let (name, role) = tls?.client_role(certs.first()?)?;
    Some(Caller::from_certificate(&name, role))
}

/// The TCP peer, on a plaintext or a TLS connection.
fn peer_socket<B>(request: &Request<B>) -> Option<std::net::SocketAddr> {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// The TCP peer's address as the audit trail records it.
fn peer_address<B>(request: &Request<B>) -> String {
    peer_socket(request)
        .map(|addr| addr.to_string())
        .unwrap_or_default()
}

/// A metadata value as text, if it is one.
fn header_text<B>(request: &Request<B>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
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
        let failures = self.failures.clone();
        let calls = self.calls.clone();
        let tls = self.tls.clone();
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
                let peer = peer_address(&request);
                let client = failures.client_of(&request);
                let certified = certificate_caller(tls.as_deref(), &request);
                // An address that used up its failed authentications waits for the window to end,
                // whatever it sends now: guessing is slowed to the limit per window. A client
                // with a verified certificate kluis maps to a role is not guessing.
                if certified.is_none() && failures.over_limit(&client) {
                    failures.note(&client, method.trim_start_matches('/'), &request_id);
                    return Ok(tonic::Status::resource_exhausted(format!(
                        "too many failed authentications from this address; retry within {} s \
                         (request id {request_id})",
                        failures.window().as_secs()
                    ))
                    .into_http());
                }
                // A bearer token decides the caller; without one, a client certificate the
                // configuration maps to a role does.
                let authenticated = match (header, certified) {
                    (None, Some(caller)) => Ok(caller),
                    (header, _) => callers.authenticate(header).await,
                };
                let mut response = match authenticated {
                    Ok(caller) => {
                        let span = tracing::Span::current();
                        span.record("caller", caller.name.as_str());
                        span.record("role", caller.role.as_str());
                        let declared = Declared {
                            purpose: header_text(&request, "x-kluis-purpose"),
                            reason: header_text(&request, "x-kluis-reason"),
                        };
                        let ctx = RequestContext {
                            request_id: request_id.clone(),
                            caller,
                            method: method_name(&method),
                            peer,
                            declared,
                            audited: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                        };
                        request.extensions_mut().insert(ctx.clone());
                        let response = inner.call(request).await?;
                        if !ctx.audited.load(std::sync::atomic::Ordering::SeqCst) {
                            // Refused before the handler ran: tonic answered with the status in
                            // the headers (a trailers-only response).
                            let code = super::status::header_code(response.headers())
                                .unwrap_or(tonic::Code::Unknown);
                            calls.record_refusal(&ctx, code).await;
                        }
                        response
                    }
                    Err(e) => {
                        if matches!(e, crate::domain::DomainError::Unauthenticated(_)) {
                            failures.note(&client, method.trim_start_matches('/'), &request_id);
                        }
                        to_status(e, &request_id).into_http()
                    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_per_ipv4_address_and_per_ipv6_64_network() {
        assert_eq!(client_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
        let a = client_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = client_key("2001:db8:1:2:bbbb::9".parse().unwrap());
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_eq!(a, b);
        assert_ne!(a, client_key("2001:db8:1:3::1".parse().unwrap()));
    }
}
