//! TLS on the gRPC listener, with certificates made here (rcgen): round trip, a client trusting
//! another CA refused, client certificates (mTLS) mapped to roles, expired or foreign client
//! certificates refused at the handshake, and the certificate swapped while serving.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use kluis::api::pb::{self, subject_service_client::SubjectServiceClient};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::helpers::{OPERATOR_PURPOSE, TestApp, TestDb, full_subject, spawn_with, tag};

/// A test CA that signs server and client certificates into files in `dir`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: &'static str,
}

impl Pki {
    fn new(dir: &Path, name: &'static str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("kluis test CA {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Self {
            ca,
            dir: dir.to_owned(),
            name,
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).unwrap();
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for `dns` (leaf PEM, key PEM), valid until `not_after`.
    fn issue(
        &self,
        dns: &str,
        usage: ExtendedKeyUsagePurpose,
        not_after: time::OffsetDateTime,
    ) -> (String, String) {
        let mut params = CertificateParams::new(vec![dns.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, dns);
        params.extended_key_usages = vec![usage];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a `localhost` server certificate and its key to `cert` and `key`.
    fn server_files(&self, cert: &Path, key: &Path) {
        let (c, k) = self.issue(
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            in_days(30),
        );
        // Written to a temporary name and renamed, as an operator's deploy step would.
        for (path, text) in [(key, k), (cert, c)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }

    fn client(&self, dns: &str, not_after: time::OffsetDateTime) -> Identity {
        let (c, k) = self.client_pems(dns, not_after);
        Identity::from_pem(c, k)
    }

    /// A client certificate for `dns` as (leaf PEM, key PEM).
    fn client_pems(&self, dns: &str, not_after: time::OffsetDateTime) -> (String, String) {
        self.issue(dns, ExtendedKeyUsagePurpose::ClientAuth, not_after)
    }
}

fn in_days(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

struct TlsFiles {
    _dir: tempfile::TempDir,
    server: Pki,
    clients: Pki,
    cert: PathBuf,
    key: PathBuf,
}

fn tls_files() -> TlsFiles {
    let dir = tempfile::tempdir().unwrap();
    let server = Pki::new(dir.path(), "server");
    let clients = Pki::new(dir.path(), "clients");
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    server.server_files(&cert, &key);
    TlsFiles {
        _dir: dir,
        server,
        clients,
        cert,
        key,
    }
}

/// A kluis serving TLS with `files`; `mtls` adds the client CA and maps `billing.test` to the
/// billing role (`required`: no handshake without a client certificate).
async fn spawn_tls(files: &TlsFiles, mtls: Option<bool>, reload_seconds: u64) -> TestApp {
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let client_ca = files.clients.ca_file();
    let mut app = spawn_with(TestDb::new().await, move |args| {
        args.tls.tls_cert = Some(cert);
        args.tls.tls_key = Some(key);
        args.tls.tls_reload_seconds = reload_seconds;
        if let Some(required) = mtls {
            args.tls.tls_client_ca = Some(client_ca);
            args.tls.tls_client_cert_required = required;
            args.tls.tls_client_roles = vec!["billing.test=billing".into()];
        }
    })
    .await;
    let channel = tls_channel(&app, &files.server.ca_pem(), None)
        .await
        .unwrap();
    app.use_channel(channel);
    app
}

/// A new TLS connection to `app` trusting `ca_pem`, presenting `identity` if given.
async fn tls_channel(
    app: &TestApp,
    ca_pem: &str,
    identity: Option<Identity>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Endpoint::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A bare TLS 1.2 handshake with the server at `addr`, presenting `identity` (leaf PEM, key PEM)
/// if given; the error is rustls's description, naming the alert the server sent.
async fn tls12_handshake(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<(String, String)>,
) -> Result<(), String> {
    use std::sync::Arc;
    use tokio_rustls::rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    };

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map(drop)
        .map_err(|e| format!("{e:?}"))
}

/// GetSubject on `channel` without a bearer token, under `purpose`.
async fn get_without_token(
    channel: Channel,
    id: &str,
    purpose: &str,
) -> Result<pb::GetSubjectResponse, tonic::Status> {
    SubjectServiceClient::with_interceptor(channel, TestApp::bearer(None, Some(purpose), None))
        .get_subject(pb::GetSubjectRequest {
            id: id.into(),
            read_mask: None,
            view: 0,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_round_trips_over_tls_and_a_plaintext_client_gets_nothing() {
    let files = tls_files();
    let app = spawn_tls(&files, None, 0).await;
    let created = app.create(full_subject(&tag())).await;
    let read = app.get(&created.id).await.unwrap();
    assert_eq!(read.contact, created.contact);

    // The same port spoken to in plaintext: no gRPC answer at all, let alone data.
    let plain = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let plain_result = SubjectServiceClient::with_interceptor(
        plain,
        TestApp::bearer(
            Some(&app.operator_token),
            Some(OPERATOR_PURPOSE),
            Some("T-1"),
        ),
    )
    .get_subject(pb::GetSubjectRequest {
        id: created.id.clone(),
        read_mask: None,
        view: 0,
    })
    .await;
    let err = plain_result.expect_err("plaintext must not be served");
    assert!(
        matches!(
            err.code(),
            // The server closes the connection at the failed handshake: tonic reports that as
            // unavailable, cancelled or a transport error depending on when it notices.
            Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Internal
        ),
        "{err:?}"
    );

    // The audit trail records the TLS peer's address like a plaintext one.
    let events = app
        .audit_events(pb::QueryAuditLogRequest {
            subject_id: created.id.clone(),
            ..Default::default()
        })
        .await;
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|e| e.peer.starts_with("127.0.0.1:")),
        "{events:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_another_ca_is_refused_at_the_handshake() {
    let files = tls_files();
    let app = spawn_tls(&files, None, 0).await;
    // The client CA did not sign the server's certificate.
    let refused = tls_channel(&app, &files.clients.ca_pem(), None).await;
    assert!(
        refused.is_err(),
        "a server certificate from an untrusted CA was accepted"
    );
    // A name the certificate does not carry is refused too.
    let wrong_name = Endpoint::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(files.server.ca_pem()))
                .domain_name("kluis.example.org"),
        )
        .unwrap()
        .connect()
        .await;
    assert!(wrong_name.is_err());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_mapped_to_a_role_authenticates_as_that_role() {
    let files = tls_files();
    let app = spawn_tls(&files, Some(false), 0).await;
    let id = app.create(full_subject(&tag())).await.id;

    let billing = tls_channel(
        &app,
        &files.server.ca_pem(),
        Some(files.clients.client("billing.test", in_days(30))),
    )
    .await
    .unwrap();
    // The certificate's DNS name maps to `billing`: payment data under `account`…
    let read = get_without_token(billing.clone(), &id, "account")
        .await
        .unwrap();
    let subject = read.subject.unwrap();
    assert!(
        subject.payment.is_some(),
        "billing reads payment under account"
    );
    assert!(
        subject.ip_addresses.is_empty(),
        "billing does not get network data"
    );
    // …but not a purpose the billing role may not use, nor an operator call.
    let denied = get_without_token(billing.clone(), &id, "marketing")
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let admin = kluis::api::pb::admin_service_client::AdminServiceClient::with_interceptor(
        billing.clone(),
        TestApp::bearer(None, None, None),
    )
    .list_callers(pb::ListCallersRequest::default())
    .await
    .unwrap_err();
    assert_eq!(admin.code(), Code::PermissionDenied, "{admin:?}");

    // A bearer token on the same connection decides the caller instead.
    let mut with_token = SubjectServiceClient::with_interceptor(
        billing.clone(),
        TestApp::bearer(
            Some(&app.operator_token),
            Some(OPERATOR_PURPOSE),
            Some("T-7"),
        ),
    );
    let as_operator = with_token
        .get_subject(pb::GetSubjectRequest {
            id: id.clone(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!as_operator.subject.unwrap().ip_addresses.is_empty());

    // A valid certificate whose name is not mapped, and no certificate at all, need a token.
    let unmapped = tls_channel(
        &app,
        &files.server.ca_pem(),
        Some(files.clients.client("mailer.test", in_days(30))),
    )
    .await
    .unwrap();
    let status = get_without_token(unmapped, &id, "account")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = get_without_token(app.channel(), &id, "account")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // The audit trail names the certificate caller and its role.
    let events = app
        .audit_events(pb::QueryAuditLogRequest {
            caller: "tls:billing.test".into(),
            ..Default::default()
        })
        .await;
    assert!(
        events
            .iter()
            .any(|e| e.role == "billing" && e.outcome == "OK" && e.purpose == "account"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.outcome == "PERMISSION_DENIED"),
        "{events:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_foreign_or_missing_client_certificates_are_refused_when_one_is_required() {
    let files = tls_files();
    let app = spawn_tls(&files, Some(true), 0).await;
    let ca = files.server.ca_pem();

    let valid = tls_channel(
        &app,
        &ca,
        Some(files.clients.client("billing.test", in_days(30))),
    )
    .await
    .unwrap();
    let id = "00000000-0000-7000-8000-000000000000";
    let status = get_without_token(valid, id, "account").await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "a valid certificate gets through"
    );

    // Expired yesterday, from another CA, or none: the server refuses the handshake with the
    // matching alert. A TLS 1.2 client waits for the server's Finished, so the alert ends its
    // handshake (a TLS 1.3 client would only see it on a later read).
    let expired = files.clients.client_pems("billing.test", in_days(-1));
    let foreign_pki = Pki::new(files.clients.dir.as_path(), "foreign");
    let foreign = foreign_pki.client_pems("billing.test", in_days(30));
    for (identity, alert) in [
        (Some(expired), "CertificateExpired"),
        (Some(foreign), "UnknownCA"),
        (None, "CertificateRequired"),
    ] {
        let refusal = tls12_handshake(app.addr, &ca, identity)
            .await
            .expect_err(alert);
        assert!(refusal.contains(alert), "expected {alert}: {refusal}");
    }
    let valid = files.clients.client_pems("billing.test", in_days(30));
    tls12_handshake(app.addr, &ca, Some(valid))
        .await
        .expect("TLS 1.2 with a valid certificate is accepted");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_reaches_new_connections_while_open_ones_keep_working() {
    let files = tls_files();
    let app = spawn_tls(&files, None, 1).await;
    let id = app.create(full_subject(&tag())).await.id;
    let old_ca = files.server.ca_pem();
    let open = tls_channel(&app, &old_ca, None).await.unwrap();

    // The operator deploys a certificate from a new CA; kluis notices the files changed.
    let renewed = Pki::new(files.clients.dir.as_path(), "renewed");
    renewed.server_files(&files.cert, &files.key);
    let started = Instant::now();
    loop {
        if tls_channel(&app, &renewed.ca_pem(), None).await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the new certificate was not served within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // New connections see only the new certificate…
    assert!(tls_channel(&app, &old_ca, None).await.is_err());
    // …and the connection opened before the change still serves calls.
    let mut client = SubjectServiceClient::with_interceptor(
        open,
        TestApp::bearer(
            Some(&app.operator_token),
            Some(OPERATOR_PURPOSE),
            Some("T-2"),
        ),
    );
    let read = client
        .get_subject(pb::GetSubjectRequest {
            id,
            read_mask: None,
            view: 0,
        })
        .await;
    assert!(read.is_ok(), "{read:?}");

    // A broken file is not put in force: the server keeps serving the certificate it has.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(tls_channel(&app, &renewed.ca_pem(), None).await.is_ok());
    assert!(
        crate::helpers::captured_logs().contains("TLS reload failed"),
        "a failed reload is logged"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kluis_serve_reloads_its_certificate_on_sighup() {
    let db = TestDb::new().await;
    let files = tls_files();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let addr_text = addr.to_string();
    let mut child = crate::cli::kluis(&db)
        .args(["serve", "--listen", &addr_text, "--tls-reload-seconds", "0"])
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let healthy = |ca: PathBuf| {
        let db = &db;
        let addr_text = addr_text.clone();
        move || {
            crate::cli::kluis(db)
                .args(["health", "--addr", &addr_text, "--ca"])
                .arg(&ca)
                .output()
                .unwrap()
                .status
                .success()
        }
    };
    let old = healthy(files.server.ca_file());
    let started = Instant::now();
    while !old() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "kluis did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = Pki::new(files.clients.dir.as_path(), "renewed");
    renewed.server_files(&files.cert, &files.key);
    let new = healthy(renewed.ca_file());
    // Without polling, nothing changes until the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!new(), "reloaded without SIGHUP");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let started = Instant::now();
    while !new() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGHUP did not reload the certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!old(), "the old certificate is no longer served");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop kluis"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

// ---- kluis to PostgreSQL over TLS ------------------------------------------------------------------

/// `postgres://user@HOST:port/db?sslmode=verify-full&sslrootcert=ROOT` for the test server.
fn verify_full_url(host: &str, db: &str, root: &Path) -> String {
    use std::str::FromStr;
    let admin =
        sqlx::postgres::PgConnectOptions::from_str(&crate::helpers::pg_admin_url()).unwrap();
    format!(
        "postgres://{}@{host}:{}/{db}?sslmode=verify-full&sslrootcert={}",
        admin.get_username(),
        admin.get_port(),
        root.display()
    )
}

/// PostgreSQL's own certificate, as the root to trust (the local cluster's is self-signed).
async fn pg_server_certificate() -> PathBuf {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&crate::helpers::pg_admin_url())
        .await
        .unwrap();
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        ssl, "on",
        "this test needs PostgreSQL with ssl = on (ssl_cert_file/ssl_key_file in postgresql.conf)"
    );
    let cert: String = sqlx::query_scalar("SHOW ssl_cert_file")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    PathBuf::from(cert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kluis_talks_to_postgresql_over_verified_tls_and_refuses_an_unverified_server() {
    if !crate::helpers::postgres_mode() {
        eprintln!("PostgreSQL TLS: runs in the PostgreSQL phase (KLUIS_TEST_BACKEND=postgres)");
        return;
    }
    let root = pg_server_certificate().await;
    let db = TestDb::new().await;
    let name = db.pg_name.clone().unwrap();

    // A server certificate trusted through a CA kluis does not know, and a name the certificate
    // does not carry (the local cluster's certificate names `localhost`, not the address): both
    // refused before kluis serves anything, with a message naming TLS.
    let stranger = Pki::new(db.dir.path(), "stranger");
    for (url, why) in [
        (
            verify_full_url("localhost", &name, &stranger.ca_file()),
            "unknown CA",
        ),
        (verify_full_url("127.0.0.1", &name, &root), "name mismatch"),
    ] {
        let mut args = crate::helpers::serve_args(&db);
        args.storage.database_url = Some(url);
        let started = Instant::now();
        let err = match kluis::app::Application::build(&args).await {
            Ok(_) => panic!("{why}: kluis started against an unverified PostgreSQL server"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("database") && err.to_lowercase().contains("certificate"),
            "{why}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "{why}");
    }

    // verify-full with the server's certificate and its name: kluis serves, and every connection
    // it holds to its database is encrypted.
    let url = verify_full_url("localhost", &name, &root);
    let app = spawn_with(db.clone(), |args| args.storage.database_url = Some(url)).await;
    let created = app.create(full_subject(&tag())).await;
    assert_eq!(app.get(&created.id).await.unwrap().contact, created.contact);

    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&crate::helpers::pg_admin_url())
        .await
        .unwrap();
    let (total, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
    )
    .bind(&name)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(total > 0, "kluis holds no connection to {name}");
    assert_eq!(encrypted, total, "connections to {name} without TLS");
    conn.close().await.unwrap();
    app.stop().await;
}

// ---- the Rust client over TLS ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kluis_client_speaks_tls_and_mtls_and_can_be_identified_by_its_certificate_alone() {
    use kluis_client::{ClientConfig, Error, SecretString};
    let files = tls_files();
    let app = spawn_tls(&files, Some(true), 0).await;
    let endpoint = format!("https://127.0.0.1:{}", app.addr.port());
    let config = || {
        ClientConfig::new(
            endpoint.clone(),
            SecretString::from(app.operator_token.clone()),
        )
        .ca_certificate_pem(files.server.ca_pem())
        .domain_name("localhost")
        .purpose(OPERATOR_PURPOSE)
        .reason("T-1")
        .timeout(Duration::from_secs(5))
    };

    // With its client certificate: served.
    let (cert, key) = files.clients.client_pems("billing.test", in_days(30));
    let client = config().identity_pem(cert, key).connect().await.unwrap();
    let created = client.create_subject(full_subject(&tag())).await.unwrap();
    let read = client.get_subject(created.id(), &[]).await.unwrap();
    assert_eq!(read.id(), created.id());

    // The certificate alone (no token): kluis maps `billing.test` to the billing role.
    let (cert, key) = files.clients.client_pems("billing.test", in_days(30));
    let billing = ClientConfig::with_client_certificate(endpoint.clone())
        .ca_certificate_pem(files.server.ca_pem())
        .domain_name("localhost")
        .identity_pem(cert, key)
        .purpose("account")
        .connect()
        .await
        .unwrap();
    let read = billing
        .get_subject(created.id(), &["billing"])
        .await
        .unwrap();
    assert!(!read.paths().is_empty());
    assert!(read.paths().iter().all(|p| p.starts_with("billing.")));
    // Without a certificate there is nobody to be: refused before anything is sent.
    let err = ClientConfig::with_client_certificate(endpoint.clone())
        .ca_certificate_pem(files.server.ca_pem())
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");

    // Without one, where one is required: refused at the handshake, as a transport failure.
    match config().connect().await {
        Ok(client) => {
            let err = client.get_subject(created.id(), &[]).await.unwrap_err();
            assert!(
                matches!(err, Error::Transport { .. } | Error::Unavailable { .. }),
                "{err:?}"
            );
        }
        Err(err) => assert!(
            matches!(err, Error::Transport { .. } | Error::Unavailable { .. }),
            "{err:?}"
        ),
    }
    app.stop().await;
}
