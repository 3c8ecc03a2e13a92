//! How a [`Client`] is set up: endpoint, bearer token, default purpose and reason, TLS (a CA,
//! optionally a client identity for mTLS, a domain-name override), deadlines and the retry policy.
//! Everything is checked when the client is built, so a bad setting fails at start-up, not at
//! the first call.

use std::{fmt, net::IpAddr, sync::Arc, time::Duration};

use secrecy::{ExposeSecret, SecretSlice, SecretString};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::{Client, Error, metadata::CallMetadata, retry::RetryPolicy};

/// A retry about to happen: passed to the hook set with [`ClientConfig::on_retry`] (to log or
/// count retries) before the client sleeps and tries again.
#[derive(Debug)]
pub struct Retrying<'a> {
    /// The gRPC method, e.g. `kluis.v1.SubjectService/GetSubject`.
    pub method: &'static str,
    /// The attempt that failed, from 1.
    pub attempt: u32,
    /// How long the client waits before the next attempt.
    pub delay: Duration,
    /// Why the attempt failed ([`Error::Unavailable`] or [`Error::Transport`]).
    pub error: &'a Error,
}

/// A hook called before every retry.
pub type RetryHook = Arc<dyn Fn(&Retrying<'_>) + Send + Sync>;

/// Settings for a [`Client`]. Build one with [`ClientConfig::new`] and the builder methods, then
/// [`connect`](ClientConfig::connect) (or [`connect_lazy`](ClientConfig::connect_lazy)).
///
/// ```no_run
/// # async fn demo(ca_pem: Vec<u8>) -> Result<(), kluis_client::Error> {
/// use std::time::Duration;
/// use kluis_client::{ClientConfig, SecretString};
///
/// let client = ClientConfig::new(
///     "https://kluis.internal:50051",
///     SecretString::from(std::env::var("KLUIS_TOKEN").unwrap_or_default()),
/// )
/// .purpose("account")
/// .ca_certificate_pem(ca_pem)
/// .timeout(Duration::from_secs(5))
/// .connect()
/// .await?;
/// # Ok(()) }
/// ```
pub struct ClientConfig {
    endpoint: String,
    /// `None`: the client certificate alone identifies the caller.
    token: Option<SecretString>,
    purpose: Option<String>,
    reason: Option<String>,
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, SecretSlice<u8>)>,
    domain_name: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
    on_retry: Option<RetryHook>,
    allow_plaintext_remote: bool,
}

impl ClientConfig {
    /// The default deadline of a call, retries included.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    /// The default limit on establishing a connection (TCP and TLS handshake).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Settings for kluis at `endpoint` (`http://127.0.0.1:50051`, `https://kluis.internal:50051`)
    /// with a caller token (`kluis_<id>_<secret>`, from `AdminService.CreateCallerToken`).
    /// Defaults: no purpose or reason, no TLS, a 10 s deadline per call, a 5 s connect timeout,
    /// [`RetryPolicy::default`].
    pub fn new(endpoint: impl Into<String>, token: SecretString) -> ClientConfig {
        ClientConfig::with_token(endpoint, Some(token))
    }

    /// Settings for kluis at an `https://` `endpoint` where the client certificate
    /// ([`ClientConfig::identity_pem`], required) alone says who calls: kluis maps its DNS name to
    /// a role (`--tls-client-role`). No `authorization` header is sent.
    pub fn with_client_certificate(endpoint: impl Into<String>) -> ClientConfig {
        ClientConfig::with_token(endpoint, None)
    }

    fn with_token(endpoint: impl Into<String>, token: Option<SecretString>) -> ClientConfig {
        ClientConfig {
            endpoint: endpoint.into(),
            token,
            purpose: None,
            reason: None,
            ca_pem: None,
            identity: None,
            domain_name: None,
            timeout: Self::DEFAULT_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            retry: RetryPolicy::default(),
            on_retry: None,
            allow_plaintext_remote: false,
        }
    }

    /// The purpose every call declares (`x-kluis-purpose`) unless overridden with
    /// [`Client::with_purpose`]: `account`, `order`, `subscription`, `portal`, … (the policy
    /// file's purposes). Without one, data calls are refused with `INVALID_ARGUMENT`.
    pub fn purpose(mut self, purpose: impl Into<String>) -> ClientConfig {
        self.purpose = Some(purpose.into());
        self
    }

    /// The reason every call records (`x-kluis-reason`, a ticket reference such as
    /// `TICKET-1234`, never personal data); required for operators' reads.
    pub fn reason(mut self, reason: impl Into<String>) -> ClientConfig {
        self.reason = Some(reason.into());
        self
    }

    /// The CA certificate (PEM) that signed kluis's server certificate. Needs an `https://`
    /// endpoint; an `https://` endpoint needs it.
    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> ClientConfig {
        self.ca_pem = Some(pem.into());
        self
    }

    /// A client certificate and its private key (PEM) for mutual TLS.
    pub fn identity_pem(
        mut self,
        certificate: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> ClientConfig {
        self.identity = Some((certificate.into(), SecretSlice::from(key.into())));
        self
    }

    /// The name to verify the server certificate against, when it differs from the endpoint's
    /// host (e.g. connecting by IP address).
    pub fn domain_name(mut self, name: impl Into<String>) -> ClientConfig {
        self.domain_name = Some(name.into());
        self
    }

    /// The deadline of each call, retries and backoff included; sent to kluis as the gRPC
    /// timeout, so kluis stops working on a call its caller has given up on.
    pub fn timeout(mut self, timeout: Duration) -> ClientConfig {
        self.timeout = timeout;
        self
    }

    /// How long establishing a connection may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientConfig {
        self.connect_timeout = timeout;
        self
    }

    /// How idempotent calls are retried ([`RetryPolicy::NONE`] turns retries off).
    pub fn retry(mut self, policy: RetryPolicy) -> ClientConfig {
        self.retry = policy;
        self
    }

    /// A hook called before each retry, e.g. to log it or count it.
    pub fn on_retry(
        mut self,
        hook: impl Fn(&Retrying<'_>) + Send + Sync + 'static,
    ) -> ClientConfig {
        self.on_retry = Some(Arc::new(hook));
        self
    }

    /// Allows an `http://` endpoint on a host other than loopback, which sends the token and
    /// the data in clear: only behind a TLS-terminating proxy on a network you trust (the
    /// counterpart of kluis's `--insecure`). Without it such an endpoint is refused.
    pub fn allow_plaintext_remote(mut self, allow: bool) -> ClientConfig {
        self.allow_plaintext_remote = allow;
        self
    }

    /// Builds the client and connects now.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad setting, [`Error::Transport`] when kluis cannot be
    /// reached (or the TLS handshake fails).
    pub async fn connect(self) -> Result<Client, Error> {
        let (endpoint, parts) = self.into_parts()?;
        let channel = endpoint.connect().await?;
        Ok(Client::from_parts(channel, parts))
    }

    /// Builds the client without connecting: the first call connects (and an idempotent call
    /// keeps retrying while kluis is not reachable yet). Useful when a service starts before
    /// kluis does.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad setting.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let (endpoint, parts) = self.into_parts()?;
        Ok(Client::from_parts(endpoint.connect_lazy(), parts))
    }

    fn into_parts(self) -> Result<(Endpoint, ClientParts), Error> {
        let uri: Uri = self
            .endpoint
            .parse()
            .map_err(|_| Error::config("the endpoint is not a URL (http://host:port)"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(Error::config(
                    "the endpoint must start with http:// or https://",
                ));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| Error::config("the endpoint has no host"))?;
        let tls_settings =
            self.ca_pem.is_some() || self.identity.is_some() || self.domain_name.is_some();
        if self.token.is_none() && (!https || self.identity.is_none()) {
            return Err(Error::config(
                "without a token the client certificate must identify the caller: use an \
                 https:// endpoint and identity_pem",
            ));
        }
        if !https && tls_settings {
            return Err(Error::config(
                "TLS settings given for an http:// endpoint; use https://",
            ));
        }
        if !https && !self.allow_plaintext_remote && !is_loopback(host) {
            return Err(Error::config(
                "plaintext http:// to a host other than loopback would send the token in clear; \
                 use https:// with a CA certificate, or allow_plaintext_remote(true) behind a \
                 TLS-terminating proxy",
            ));
        }
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|_| Error::config("the endpoint is not a valid URI"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if https {
            let Some(ca) = self.ca_pem else {
                return Err(Error::config(
                    "an https:// endpoint needs the CA certificate of kluis's server certificate \
                     (ca_certificate_pem)",
                ));
            };
            // rustls skips what is not a PEM certificate; an empty trust store would only fail
            // at the first handshake.
            if !is_pem_certificate(&ca) {
                return Err(Error::config(
                    "the CA certificate is not a PEM certificate (-----BEGIN CERTIFICATE-----)",
                ));
            }
            if let Some((certificate, _)) = &self.identity
                && !is_pem_certificate(certificate)
            {
                return Err(Error::config(
                    "the client certificate is not a PEM certificate (-----BEGIN CERTIFICATE-----)",
                ));
            }
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                // gRPC is HTTP/2 whatever ALPN says.
                .assume_http2(true)
                .timeout(self.connect_timeout);
            if let Some((certificate, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(certificate, key.expose_secret()));
            }
            if let Some(name) = self.domain_name {
                tls = tls.domain_name(name);
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                Error::config(format!(
                    "TLS settings refused (CA certificate or client identity unreadable): {}",
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
                ))
            })?;
        }
        let metadata = CallMetadata::new(
            self.token.as_ref(),
            self.purpose.as_deref(),
            self.reason.as_deref(),
            self.timeout,
        )?;
        Ok((
            endpoint,
            ClientParts {
                endpoint: self.endpoint.into(),
                metadata,
                retry: self.retry,
                on_retry: self.on_retry,
            },
        ))
    }
}

/// What a [`Client`] keeps of its configuration.
pub(crate) struct ClientParts {
    pub(crate) endpoint: Arc<str>,
    pub(crate) metadata: CallMetadata,
    pub(crate) retry: RetryPolicy,
    pub(crate) on_retry: Option<RetryHook>,
}

fn is_pem_certificate(pem: &[u8]) -> bool {
    let marker = b"-----BEGIN CERTIFICATE-----";
    pem.windows(marker.len()).any(|w| w == marker)
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("purpose", &self.purpose)
            .field("reason", &self.reason)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field(
                "identity",
                &self.identity.as_ref().map(|_| "<pem, key ***>"),
            )
            .field("domain_name", &self.domain_name)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry", &self.retry)
            .field("on_retry", &self.on_retry.as_ref().map(|_| "<hook>"))
            .field("allow_plaintext_remote", &self.allow_plaintext_remote)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn config(endpoint: &str) -> ClientConfig {
        ClientConfig::new(endpoint, SecretString::from("kluis_x_s3cret"))
    }

    fn refused(c: ClientConfig) -> String {
        match c.connect_lazy() {
            Err(Error::InvalidConfig { message }) => message,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn loopback_plaintext_is_fine_and_remote_plaintext_needs_consent() {
        config("http://127.0.0.1:50051").connect_lazy().unwrap();
        config("http://localhost:50051").connect_lazy().unwrap();
        config("http://[::1]:50051").connect_lazy().unwrap();
        assert!(refused(config("http://kluis.internal:50051")).contains("in clear"));
        config("http://kluis.internal:50051")
            .allow_plaintext_remote(true)
            .connect_lazy()
            .unwrap();
    }

    #[tokio::test]
    async fn tls_settings_are_checked_when_the_client_is_built() {
        assert!(
            refused(config("http://127.0.0.1:50051").ca_certificate_pem(b"x".to_vec()))
                .contains("https://")
        );
        assert!(refused(config("https://kluis.internal:50051")).contains("CA certificate"));
        assert!(
            refused(config("https://kluis.internal:50051").ca_certificate_pem(b"not pem".to_vec()))
                .contains("not a PEM certificate")
        );
        const CERT: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(
            refused(
                config("https://kluis.internal:50051")
                    .ca_certificate_pem(CERT.to_vec())
                    .identity_pem(CERT.to_vec(), b"no key here".to_vec())
            )
            .contains("TLS settings refused")
        );
        assert!(refused(config("ftp://kluis.internal")).contains("http://"));
        assert!(refused(config("not a url")).contains("URL"));
        assert!(refused(config("http://127.0.0.1:1").purpose("two words")).contains("purpose"));
    }

    #[test]
    fn debug_shows_no_secrets() {
        let shown = format!(
            "{:?}",
            config("https://kluis.internal")
                .identity_pem(b"CERT".to_vec(), b"PRIVATE KEY BYTES".to_vec())
        );
        assert!(
            !shown.contains("s3cret") && !shown.contains("PRIVATE"),
            "{shown}"
        );
    }
}
