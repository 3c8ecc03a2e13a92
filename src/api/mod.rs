//! The gRPC surface: kluis services, health, reflection (v1 and v1alpha), the auth layer.

mod admin;
mod audit;
mod auth;
mod call;
pub mod client_addr;
mod conn_io;
mod consent;
mod convert;
mod credential;
mod disclosure;
pub mod metrics;
pub mod pb;
mod retention;
mod rights;
mod status;
mod subject;
pub mod tls;

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::transport::Server;

pub use auth::{FailedAuthentications, RequestContext};
pub use call::Calls;

use crate::domain::{
    Callers, Retention, Vault, consent::Consent, credentials::Credentials, disclosure::Disclosures,
    keys::Keys, rights::Rights,
};

/// Largest request message kluis decodes; a larger one is refused by the transport with
/// `OUT_OF_RANGE` before any handler runs.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Calls one HTTP/2 connection may have in flight at once; a client with more waits for a free
/// stream (or opens another connection). A call the server has accepted holds memory while it
/// waits for a slot of `--max-concurrent-requests` (README, Benchmark: the peak with 64 and 256).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// The domain services one instance serves.
pub struct Services {
    pub vault: Arc<Vault>,
    pub retention: Arc<Retention>,
    pub consent: Arc<Consent>,
    pub rights: Arc<Rights>,
    pub disclosures: Arc<Disclosures>,
    pub credentials: Arc<Credentials>,
    pub callers: Arc<Callers>,
    pub keys: Arc<Keys>,
}

/// Bounds on what callers can make one instance do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The deadline of a call that brings none, and the most any call gets.
    pub request_timeout: std::time::Duration,
    /// Calls served at once over all connections; more wait for a free slot.
    pub max_concurrent_requests: usize,
}

/// Serves every kluis service on `listener` until `shutdown` completes, then drains in-flight calls.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    calls: Calls,
    failures: Arc<FailedAuthentications>,
    tls: Option<Arc<tls::Tls>>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let Services {
        vault,
        retention,
        consent,
        rights,
        disclosures,
        credentials,
        callers,
        keys,
    } = services;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::subject_service_server::SubjectServiceServer<subject::SubjectApi>>()
        .await;
    health
        .set_serving::<pb::admin_service_server::AdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<pb::consent_service_server::ConsentServiceServer<consent::ConsentApi>>()
        .await;
    health
        .set_serving::<pb::audit_service_server::AuditServiceServer<audit::AuditApi>>()
        .await;
    health
        .set_serving::<pb::retention_service_server::RetentionServiceServer<retention::RetentionApi>>()
        .await;
    health
        .set_serving::<pb::rights_service_server::RightsServiceServer<rights::RightsApi>>()
        .await;
    health
        .set_serving::<pb::disclosure_service_server::DisclosureServiceServer<disclosure::DisclosureApi>>()
        .await;
    health
        .set_serving::<pb::credential_service_server::CredentialServiceServer<credential::CredentialApi>>()
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.BadRequest & co., so grpcurl can show error details, not base64.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError(e.to_string()))?;
    // grpcurl and Python's grpcio client still speak v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.BadRequest & co., so grpcurl can show error details, not base64.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError(e.to_string()))?;

    let subjects = pb::subject_service_server::SubjectServiceServer::new(subject::SubjectApi::new(
        vault.clone(),
        calls.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let admin = pb::admin_service_server::AdminServiceServer::new(admin::AdminApi::new(
        callers.clone(),
        keys,
        calls.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let consent = pb::consent_service_server::ConsentServiceServer::new(consent::ConsentApi::new(
        consent,
        calls.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let audit = pb::audit_service_server::AuditServiceServer::new(audit::AuditApi::new(
        calls.trail.clone(),
        calls.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let retention = pb::retention_service_server::RetentionServiceServer::new(
        retention::RetentionApi::new(retention, calls.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let rights = pb::rights_service_server::RightsServiceServer::new(rights::RightsApi::new(
        rights,
        calls.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let disclosures = pb::disclosure_service_server::DisclosureServiceServer::new(
        disclosure::DisclosureApi::new(disclosures, calls.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let credentials = pb::credential_service_server::CredentialServiceServer::new(
        credential::CredentialApi::new(credentials, calls.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES);

    let router = Server::builder()
        // Bounds the calls one connection can have in flight (and the memory they hold); a client
        // with more waits for a free stream instead of queueing inside kluis.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // A connection whose peer stopped answering pings is closed, not kept forever.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        // A call without `grpc-timeout` gets this deadline; one with a longer one is cut to it.
        .timeout(limits.request_timeout)
        // Outermost: calls refused by the auth layer are counted too.
        .layer(metrics::GrpcMetricsLayer)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.max_concurrent_requests.max(1),
        ))
        .layer(auth::AuthLayer::new(callers, failures, calls, tls.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(subjects)
        .add_service(admin)
        .add_service(consent)
        .add_service(audit)
        .add_service(retention)
        .add_service(rights)
        .add_service(disclosures)
        .add_service(credentials);
    let served = match tls {
        Some(tls) => {
            tls.spawn_reloader();
            router
                .serve_with_incoming_shutdown(tls::incoming(listener, tls), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(plain_incoming(listener), shutdown)
                .await
        }
    };
    served.map_err(|e| ServeError(e.to_string()))
}

/// Accepted connections with Nagle off (small gRPC frames must not wait for delayed ACKs) and TCP
/// keepalive on. `Server::tcp_nodelay` only applies to listeners tonic binds itself.
fn tcp_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)))
}

/// Plaintext connections as served: [`tcp_incoming`]'s, with vectored writes hidden from HTTP/2
/// ([`conn_io`]).
fn plain_incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<conn_io::Unvectored<tokio::net::TcpStream>>> {
    tcp_incoming(listener).map(|c| c.map(conn_io::Unvectored))
}

/// The server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("gRPC server: {0}")]
pub struct ServeError(String);

/// Connects a health-protocol client to `addr` and asks whether the server is serving; over TLS
/// when given a CA certificate (PEM) and the name the server's certificate carries.
pub async fn check_health(
    addr: SocketAddr,
    tls: Option<(Vec<u8>, String)>,
) -> Result<bool, ServeError> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| ServeError(e.to_string()))?;
    if let Some((ca, name)) = tls {
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                    .domain_name(name),
            )
            .map_err(|e| ServeError(e.to_string()))?;
    }
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| ServeError(e.to_string()))?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| ServeError(e.to_string()))?;
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tokio::{io::AsyncWrite, net::TcpStream};

    use super::*;

    #[tokio::test]
    async fn served_plaintext_connections_have_nagle_off_and_no_vectored_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = std::pin::pin!(plain_incoming(listener));
        let client = TcpStream::connect(addr).await.unwrap();
        let served = incoming.next().await.unwrap().unwrap();
        assert!(!served.is_write_vectored());
        assert!(served.0.nodelay().unwrap());
        assert_eq!(served.0.peer_addr().unwrap(), client.local_addr().unwrap());
    }
}
