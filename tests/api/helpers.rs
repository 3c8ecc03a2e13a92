//! Test harness: `spawn_kluis()` starts the real server on 127.0.0.1:0 against a fresh database
//! (SQLite in a temp dir, or a new PostgreSQL database when KLUIS_TEST_BACKEND=postgres) and hands
//! out real gRPC clients. Logs of every in-process server are captured for the no-PII checks;
//! TEST_LOG=1 also prints them.

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Mutex, OnceLock},
};

use kluis::{
    Application, ServeArgs,
    api::pb::{
        self, admin_service_client::AdminServiceClient, audit_service_client::AuditServiceClient,
        consent_service_client::ConsentServiceClient,
        retention_service_client::RetentionServiceClient,
        subject_service_client::SubjectServiceClient,
    },
    clock::Clock,
};
use sqlx::{Connection, Executor};
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

// ---- captured logs ----------------------------------------------------------------------------

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = std::io::stdout().write_all(buf);
        }
        if let Ok(mut logs) = self.0.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buffer.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,h2=info,hyper=info,tower=info,sqlx=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    });
}

/// Everything every in-process server of this test binary has logged so far.
pub fn captured_logs() -> String {
    LOGS.get()
        .and_then(|l| {
            l.lock()
                .ok()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        })
        .unwrap_or_default()
}

// ---- databases --------------------------------------------------------------------------------

pub fn postgres_mode() -> bool {
    std::env::var("KLUIS_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

pub fn pg_admin_url() -> String {
    std::env::var("KLUIS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for one test: a temp dir for SQLite, a new database on PostgreSQL
/// (dropped again when the last handle goes).
pub struct TestDb {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub pg_name: Option<String>,
}

impl TestDb {
    pub async fn new() -> Arc<TestDb> {
        let dir = tempfile::tempdir().unwrap();
        if postgres_mode() {
            let name = format!("kluis_t_{}", uuid::Uuid::new_v4().simple());
            let admin = pg_admin_url();
            let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
            conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .await
                .unwrap();
            let url = url_with_database(&admin, &name);
            Arc::new(TestDb {
                dir,
                url,
                pg_name: Some(name),
            })
        } else {
            let url = format!("sqlite://{}", dir.path().join("kluis.db").display());
            Arc::new(TestDb {
                dir,
                url,
                pg_name: None,
            })
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// A direct connection to the test database, for looking at (and tampering with) rows.
    pub async fn raw(&self) -> Raw {
        if self.pg_name.is_some() {
            Raw::Pg(sqlx::PgPool::connect(&self.url).await.unwrap())
        } else {
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url)
                .unwrap()
                .busy_timeout(std::time::Duration::from_secs(10));
            // The per-subject audit index lives in a file of its own beside the database.
            let index = kluis::store::audit_index_file(options.get_filename())
                .to_string_lossy()
                .into_owned();
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .after_connect(move |conn, _| {
                    let index = index.clone();
                    Box::pin(async move {
                        sqlx::query("ATTACH DATABASE $1 AS audit_index")
                            .bind(index)
                            .execute(conn)
                            .await
                            .map(|_| ())
                    })
                })
                .connect_with(options)
                .await
                .unwrap();
            Raw::Sqlite(pool)
        }
    }
}

fn url_with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            let admin = pg_admin_url();
            // A runtime of its own: Drop may run outside (or at the end of) the test's runtime.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ = conn
                            .execute(sqlx::AssertSqlSafe(format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            )))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Raw SQL access to a test database.
pub enum Raw {
    Sqlite(sqlx::SqlitePool),
    Pg(sqlx::PgPool),
}

/// Runs `$body` with `$pool` bound to either backend's pool (compiled once per backend).
macro_rules! on_raw {
    ($raw:expr, $pool:ident => $body:expr) => {
        match $raw {
            Raw::Sqlite($pool) => $body,
            Raw::Pg($pool) => $body,
        }
    };
}

impl Raw {
    pub async fn count(&self, sql: &'static str, id: &[u8]) -> i64 {
        on_raw!(self, p => sqlx::query_scalar(sql).bind(id.to_vec()).fetch_one(p).await.unwrap())
    }

    /// SQLite: a consistent copy of the whole database at `path` (`VACUUM INTO`, a backup);
    /// `false` on PostgreSQL, where the tests copy rows instead.
    pub async fn backup_into(&self, path: &std::path::Path) -> bool {
        match self {
            Raw::Sqlite(p) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "VACUUM INTO '{}'",
                    path.display()
                )))
                .execute(p)
                .await
                .unwrap();
                true
            }
            Raw::Pg(_) => false,
        }
    }

    /// Every row of `keys`: (kind, version, root version, wrapped bytes).
    pub async fn key_rows(&self) -> Vec<(String, i64, i64, Vec<u8>)> {
        on_raw!(self, p => sqlx::query_as("SELECT kind, version, root_version, wrapped FROM keys ORDER BY kind, version")
            .fetch_all(p).await.unwrap())
    }

    pub async fn count_all(&self, sql: &'static str) -> i64 {
        on_raw!(self, p => sqlx::query_scalar(sql).fetch_one(p).await.unwrap())
    }

    pub async fn bytes(&self, sql: &'static str, id: &[u8]) -> Vec<u8> {
        on_raw!(self, p => sqlx::query_scalar(sql).bind(id.to_vec()).fetch_one(p).await.unwrap())
    }

    /// Runs `sql` with `$1` = value and `$2` = id.
    pub async fn set_bytes(&self, sql: &'static str, value: Vec<u8>, id: &[u8]) {
        on_raw!(self, p => {
            sqlx::query(sql).bind(value).bind(id.to_vec()).execute(p).await.unwrap();
        })
    }

    /// Every row of every kluis table as text (PostgreSQL: `row::text`, bytea in hex).
    pub async fn pg_dump_text(&self) -> String {
        let Raw::Pg(p) = self else {
            return String::new();
        };
        let mut out = String::new();
        for table in [
            "subjects",
            "data_keys",
            "blind_index",
            "keys",
            "root_key_checks",
            "erased_subjects",
            "callers",
        ] {
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT t::text FROM {table} t"
            )))
            .fetch_all(p)
            .await
            .unwrap();
            out.push_str(&rows.join("\n"));
        }
        out
    }

    pub async fn close(&self) {
        on_raw!(self, p => p.close().await)
    }
}

// ---- servers and clients ----------------------------------------------------------------------

/// Adds `authorization: Bearer <token>`, `x-kluis-purpose` and `x-kluis-reason` to every call
/// (each left out when `None`).
#[derive(Clone)]
pub struct Bearer {
    token: Option<AsciiMetadataValue>,
    purpose: Option<AsciiMetadataValue>,
    reason: Option<AsciiMetadataValue>,
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.token {
            request.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(v) = &self.purpose {
            request.metadata_mut().insert("x-kluis-purpose", v.clone());
        }
        if let Some(v) = &self.reason {
            request.metadata_mut().insert("x-kluis-reason", v.clone());
        }
        Ok(request)
    }
}

/// The purpose and reason operators' test clients declare unless told otherwise.
pub const OPERATOR_PURPOSE: &str = "subject-request";
pub const OPERATOR_REASON: &str = "TEST-1";

pub type Subjects = SubjectServiceClient<InterceptedService<Channel, Bearer>>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;
pub type Consent = ConsentServiceClient<InterceptedService<Channel, Bearer>>;
pub type Audit = AuditServiceClient<InterceptedService<Channel, Bearer>>;
pub type Retention = RetentionServiceClient<InterceptedService<Channel, Bearer>>;

/// A running kluis on 127.0.0.1:0 with its operator token.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The `/metrics` listener, when the test asked for one.
    pub metrics_addr: Option<SocketAddr>,
    pub operator_token: String,
    pub db: Arc<TestDb>,
    pub store: kluis::store::Store,
    pub trail: Arc<kluis::audit::AuditTrail>,
    /// The consent service (its token pruning runs daily; tests call it).
    pub consent: Arc<kluis::domain::consent::Consent>,
    /// The server's clock: `advance_us` jumps it ahead (retention tests jump years).
    pub clock: Clock,
    /// The server's keys (tests run re-wrap batches themselves).
    pub keys: Arc<kluis::domain::keys::Keys>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), kluis::StartupError>>>,
    channel: Channel,
}

pub async fn spawn_kluis() -> TestApp {
    spawn_on(TestDb::new().await).await
}

pub fn serve_args(db: &TestDb) -> ServeArgs {
    ServeArgs::new(
        "127.0.0.1:0".parse().unwrap(),
        db.data_dir(),
        postgres_mode().then(|| db.url.clone()),
    )
}

/// Starts a server on an existing test database (a restart, or a second instance).
pub async fn spawn_on(db: Arc<TestDb>) -> TestApp {
    spawn_with(db, |_| {}).await
}

/// Starts a server on `db` with settings changed by `configure`.
pub async fn spawn_with(db: Arc<TestDb>, configure: impl FnOnce(&mut ServeArgs)) -> TestApp {
    init_logs();
    let mut args = serve_args(&db);
    configure(&mut args);
    let clock = Clock::adjustable();
    let app = Application::build_with_clock(&args, clock.clone())
        .await
        .unwrap();
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let store = app.store().clone();
    let trail = app.audit_trail().clone();
    let consent = app.consent().clone();
    let keys = app.keys().clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let operator_token = std::fs::read_to_string(db.data_dir().join("operator.token"))
        .unwrap()
        .trim()
        .to_owned();
    // Lazy: a server serving TLS gets its channel from the test (`use_channel`).
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    TestApp {
        addr,
        metrics_addr,
        operator_token,
        db,
        store,
        trail,
        consent,
        clock,
        keys,
        shutdown: Some(tx),
        task: Some(task),
        channel,
    }
}

impl TestApp {
    pub fn bearer(token: Option<&str>, purpose: Option<&str>, reason: Option<&str>) -> Bearer {
        Bearer {
            token: token.map(|t| MetadataValue::try_from(format!("Bearer {t}")).unwrap()),
            purpose: purpose.map(|p| MetadataValue::try_from(p).unwrap()),
            reason: reason.map(|r| MetadataValue::try_from(r).unwrap()),
        }
    }

    /// SubjectService as the first operator, under `subject-request` with a reason.
    pub fn subjects(&self) -> Subjects {
        self.subjects_as(Some(&self.operator_token.clone()))
    }

    /// SubjectService with `token`, under `subject-request` with a reason (an operator's call).
    pub fn subjects_as(&self, token: Option<&str>) -> Subjects {
        self.subjects_under(token, Some(OPERATOR_PURPOSE), Some(OPERATOR_REASON))
    }

    /// SubjectService with `token`, declaring `purpose` and `reason` (each left out when `None`).
    pub fn subjects_under(
        &self,
        token: Option<&str>,
        purpose: Option<&str>,
        reason: Option<&str>,
    ) -> Subjects {
        SubjectServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(token, purpose, reason),
        )
        .max_encoding_message_size(64 * 1024 * 1024)
    }

    pub fn consent_under(&self, token: &str, purpose: &str) -> Consent {
        ConsentServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(Some(token), Some(purpose), None),
        )
    }

    /// RetentionService with `token` under `purpose` (operators: `subject-request` with a reason).
    pub fn retention_under(&self, token: &str, purpose: &str) -> Retention {
        RetentionServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(Some(token), Some(purpose), Some(OPERATOR_REASON)),
        )
    }

    /// RetentionService as the first operator, under `subject-request`.
    pub fn retention(&self) -> Retention {
        self.retention_under(&self.operator_token.clone(), OPERATOR_PURPOSE)
    }

    /// AuditService as the first operator.
    pub fn audit(&self) -> Audit {
        AuditServiceClient::with_interceptor(
            self.channel.clone(),
            Self::bearer(Some(&self.operator_token), None, None),
        )
    }

    /// Asserts that `VerifyAuditChain` finds the whole chain intact.
    pub async fn assert_audit_chain_intact(&self) {
        let verified = self
            .audit()
            .verify_audit_chain(pb::VerifyAuditChainRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(verified.intact, "{verified:?}");
    }

    pub fn admin(&self) -> Admin {
        self.admin_as(Some(&self.operator_token.clone()))
    }

    pub fn admin_as(&self, token: Option<&str>) -> Admin {
        AdminServiceClient::with_interceptor(self.channel.clone(), Self::bearer(token, None, None))
    }

    /// Every audit event, oldest first (as the operator; the queries add events of their own).
    pub async fn audit_events(&self, filter: pb::QueryAuditLogRequest) -> Vec<pb::AuditEvent> {
        let mut out = Vec::new();
        let mut request = filter;
        request.page_size = 1000;
        loop {
            let page = self
                .audit()
                .query_audit_log(request.clone())
                .await
                .unwrap()
                .into_inner();
            out.extend(page.events);
            if page.next_page_token.is_empty() {
                return out;
            }
            request.page_token = page.next_page_token;
        }
    }

    /// A new caller of `role`; returns its token.
    pub async fn token_for(&self, name: &str, role: &str) -> String {
        self.admin()
            .create_caller_token(pb::CreateCallerTokenRequest {
                name: name.into(),
                role: role.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// The client channel to this server.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Makes every client of this app use `channel` (e.g. a TLS channel).
    pub fn use_channel(&mut self, channel: Channel) {
        self.channel = channel;
    }

    /// Every stored audit event body as text (to look for values that must not be there).
    pub async fn audit_bodies(&self) -> String {
        let raw = self.db.raw().await;
        let bodies: Vec<Vec<u8>> = match &raw {
            Raw::Sqlite(p) => sqlx::query_scalar("SELECT body FROM audit_events")
                .fetch_all(p)
                .await
                .unwrap(),
            Raw::Pg(p) => sqlx::query_scalar("SELECT body FROM audit_events")
                .fetch_all(p)
                .await
                .unwrap(),
        };
        raw.close().await;
        bodies
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn raw_count(&self, sql: &'static str) -> i64 {
        let raw = self.db.raw().await;
        let n = raw.count_all(sql).await;
        raw.close().await;
        n
    }

    /// Graceful stop: drains calls and commits queued writes.
    pub async fn stop(mut self) -> Arc<TestDb> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.db.clone()
    }

    pub async fn create(&self, subject: pb::Subject) -> pb::Subject {
        self.subjects()
            .create_subject(pb::CreateSubjectRequest {
                subject: Some(subject),
                source: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .subject
            .unwrap()
    }

    /// GetSubject with every path and `field_metadata` (SUBJECT_VIEW_FULL).
    pub async fn get(&self, id: &str) -> Result<pb::Subject, Status> {
        self.subjects()
            .get_subject(pb::GetSubjectRequest {
                id: id.into(),
                read_mask: None,
                view: pb::SubjectView::Full as i32,
            })
            .await
            .map(|r| r.into_inner().subject.unwrap())
    }
}

// ---- fixtures ---------------------------------------------------------------------------------

fn ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

fn address(tag: &str) -> pb::Address {
    pb::Address {
        street: format!("Koningsweg {tag}"),
        house_number: "6".into(),
        house_number_addition: "A".into(),
        postal_code: "7672 GD".into(),
        city: "Vriezenveen".into(),
        country: "NL".into(),
    }
}

/// A subject with every field path set; e-mail and username unique through `tag`.
pub fn full_subject(tag: &str) -> pb::Subject {
    pb::Subject {
        name: Some(pb::Name {
            given: format!("Given{tag}"),
            family: format!("Family{tag}"),
        }),
        address: Some(address(tag)),
        contact: Some(pb::Contact {
            email: format!("Klant.{tag}@Example.nl"),
            phone: "+31853033451".into(),
        }),
        ip_addresses: vec![
            pb::IpAddressRecord {
                address: "192.0.2.10".into(),
                first_seen: Some(ts(1_700_000_000)),
                last_seen: Some(ts(1_700_100_000)),
            },
            pb::IpAddressRecord {
                address: "2001:db8::1".into(),
                first_seen: None,
                last_seen: None,
            },
        ],
        billing: Some(pb::Billing {
            company_name: format!("Bedrijf {tag} B.V."),
            vat_number: "NL123456789B01".into(),
            address: Some(address(&format!("b{tag}"))),
        }),
        payment: Some(pb::Payment {
            iban: "NL91ABNA0417164300".into(),
            account_holder: format!("Holder {tag}"),
            psp_token: format!("psp_{tag}"),
            method: pb::PaymentMethod::Ideal as i32,
        }),
        profile: Some(pb::Profile {
            gender: pb::Gender::Female as i32,
        }),
        account: Some(pb::Account {
            username: format!("user{tag}"),
        }),
        activity_log: vec![pb::ActivityEntry {
            action: "login".into(),
            time: Some(ts(1_700_000_500)),
            ip_address: "192.0.2.10".into(),
        }],
        ..Default::default()
    }
}

/// A short unique tag for fixtures.
pub fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}
