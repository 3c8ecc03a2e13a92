//! `kluis-bench`: the load generator behind kluis's performance targets.
//!
//! It seeds a database with subjects that have every field path set, then measures four scenarios
//! with a tonic client and HDR histograms (microsecond resolution, three significant figures):
//!
//! * `health` — the gRPC health check: the transport's own ceiling, measured in the same run;
//! * `get` — GetSubject of a random seeded subject, every path returned (no read mask);
//! * `find` — FindSubjects by the e-mail address of a random seeded subject;
//! * `create` — CreateSubject with every path set and a fresh e-mail address and username.
//!
//! Two modes. *Closed loop*: `--concurrency` tasks spread round robin over `--channels` HTTP/2
//! connections, each sending its next request as soon as the previous one is answered, for
//! `--duration` seconds after `--warmup` seconds whose results are thrown away. *Fixed rate*: an
//! open loop offering `--rate` requests/s for `--rate-duration` seconds; each request's latency is
//! counted from the moment it was *meant* to start, so a stalled server cannot hide its queueing
//! (no coordinated omission). It prints requests/s and p50/p99/p99.9 per scenario, each closed
//! loop's ratio to `health`, and how the run compares with the targets of the issues (2 cores,
//! SQLite, 100,000 subjects, at 64 concurrent: get — purpose-checked and durably audited — ≥ 30 %
//! of health and p99 ≤ 3 ms at a fixed 10,000 get/s; find ≥ 35 %; create ≥ 8,000 durable
//! subjects/s; server RSS ≤ 150 MB). Every call declares `--purpose` and `--reason`. Missed targets are
//! reported, not fatal: the exit status is non-zero only when the run itself could not complete.
//!
//! By default it starts its own server: the `kluis` binary next to this one, `kluis serve` on a
//! free 127.0.0.1 port with a fresh data directory under the system temp directory (removed at the
//! end unless `--keep-data`), `KLUIS_LOG=warn`, stderr to `server.log` there; it uses the first
//! operator token that server writes, reads the server's RSS from `/proc`, and kills it at the end.
//!
//! ```text
//! cargo build --release --bin kluis --bin kluis-bench
//! target/release/kluis-bench                               # the full run: 100,000 subjects
//! target/release/kluis-bench --seed 2000 --duration 3 --warmup 1 --rate 2000 --rate-duration 3
//! target/release/kluis-bench --database-url postgres://kluis@localhost/kluis_bench
//! target/release/kluis-bench --addr 10.0.0.5:50051 --token kluis_… --seed 10000
//! ```
//!
//! `--sweep N` adds the retention benchmark: N subjects, each with an order record completed seven
//! years and a day ago (so every path is due), are swept alone by the `Sweep` RPC at full speed
//! (target: 100,000 in ≤ 30 s); then N more are swept at the background sweeper's default rate and
//! batch (`at_background_rate`, the code the background sweeper runs) while the closed-loop `get`
//! runs (targets: ≥ 2,000 subjects/s purged while get keeps ≥ 70 % of its rate without the sweep).
//! The spawned server's background sweeper is switched off for this, so nothing is swept early.
//!
//! `--rewrap` adds the key-rotation benchmark on the seeded subjects (seed 1,000,000 for the
//! target): `RotateKek`, then the server's background re-wrap job at its default rate and batch
//! moves every data key to the new KEK while nothing else runs (target: 1,000,000 in ≤ 60 s);
//! then the closed-loop `get` alone, and again while the job re-wraps every data key once more
//! after a second rotation (targets: ≥ 10,000 data keys/s while get keeps ≥ 70 % of its rate).
//! The job's rate is read from `KeyStatus` at the start and end of the get measurement.
//!
//! `--tls` adds the transport benchmark: the closed-loop `get` over plaintext, then the spawned
//! server is restarted on the same data serving TLS with a self-signed certificate made here, and
//! the same `get` runs over TLS (target: TLS keeps >= 85 % of the plaintext rate).
//!
//! A PostgreSQL database that already has a root key needs `KLUIS_ROOT_KEY` (the spawned server
//! inherits the environment) and, when it already has callers, `--token`.

use std::{
    error::Error,
    fmt,
    fs::File,
    io::Read as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use kluis::api::pb::{
    self, admin_service_client::AdminServiceClient,
    credential_service_client::CredentialServiceClient,
    retention_service_client::RetentionServiceClient, subject_service_client::SubjectServiceClient,
};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

type BoxError = Box<dyn Error + Send + Sync>;

/// The load generator shares the machine's cores with the server it measures, so its own cost per
/// call is part of every figure: the server's allocator (mimalloc, see Cargo.toml) instead of
/// glibc malloc, which took 18 % of this process's samples under closed-loop `get` (12 % with it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Highest latency a histogram holds (60 s, in microseconds); slower calls are clamped to it.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Fixed-rate mode: requests in flight beyond this are not sent and are counted as dropped.
const MAX_OUTSTANDING: usize = 10_000;
/// How long the spawned server may take to answer its health check.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A single call that takes longer than this fails with DEADLINE_EXCEEDED.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The one IBAN every seeded subject shares (valid under ISO 13616 mod-97).
const IBAN: &str = "NL91ABNA0417164300";

#[derive(Parser, Debug)]
#[command(
    name = "kluis-bench",
    version,
    about = "Load generator for kluis: seeds subjects, then measures health, get, find and create"
)]
struct Cli {
    /// Target a running kluis at HOST:PORT (or a full http:// URI) instead of spawning one.
    #[arg(long)]
    addr: Option<String>,
    /// Bearer token for --addr (any role that may create and read subjects).
    #[arg(long, env = "KLUIS_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The purpose every call declares (`x-kluis-purpose`); the token's role must be allowed it.
    #[arg(long, default_value = "subject-request")]
    purpose: String,
    /// The reason every call gives (`x-kluis-reason`; operators must give one to read values).
    #[arg(long, default_value = "BENCH-1")]
    reason: String,
    /// Database URL for the spawned server (e.g. postgres://…); default: SQLite in its data dir.
    #[arg(long)]
    database_url: Option<String>,
    /// Keep the spawned server's data directory (database, key, log) instead of removing it.
    #[arg(long)]
    keep_data: bool,
    /// Subjects to create, every field set, before measuring.
    #[arg(long, default_value_t = 100_000)]
    seed: u64,
    /// Scenarios to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "health,get,find,create"
    )]
    scenarios: Vec<Scenario>,
    /// Closed loop, fixed rate, or both (closed loop for every scenario, then fixed rate).
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Requests in flight in the closed loop (and while seeding).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections; requests are spread over them round robin.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Seconds measured per closed-loop scenario.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before each measurement, whose results are discarded.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Offered requests/s in fixed-rate mode.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Seconds measured in fixed-rate mode (after --warmup seconds at the same rate).
    #[arg(long, default_value_t = 10.0)]
    rate_duration: f64,
    /// The scenario measured in fixed-rate mode.
    #[arg(long, value_enum, default_value_t = Scenario::Get)]
    rate_scenario: Scenario,
    /// Also measure the retention sweep with this many due subjects per part (0: skip); needs a
    /// spawned server and seeded subjects for `get`.
    #[arg(long, default_value_t = 0)]
    sweep: u64,
    /// Also measure KEK rotation: the background re-wrap job moving every seeded subject's data
    /// key, alone and under the closed-loop get (needs seeded subjects).
    #[arg(long)]
    rewrap: bool,
    /// Also measure `get` over TLS: the closed-loop get over plaintext, then the spawned server
    /// restarted on the same data with a certificate made here and the same get over TLS
    /// (target: TLS keeps >= 85 % of the plaintext rate). Needs a spawned server.
    #[arg(long)]
    tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Health,
    Get,
    Find,
    Create,
    /// `VerifyPassword` of seeded subjects (passwords set for the first [`VERIFY_SUBJECTS`]).
    Verify,
}

/// Seeded subjects that get a password for the `verify` scenario.
const VERIFY_SUBJECTS: usize = 64;
/// The password the `verify` scenario sets and checks.
const BENCH_PASSWORD: &str = "kluis-bench password 2026";

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Health => "health",
            Scenario::Get => "get",
            Scenario::Find => "find",
            Scenario::Create => "create",
            Scenario::Verify => "verify",
        }
    }

    fn needs_seed(self) -> bool {
        matches!(self, Scenario::Get | Scenario::Find | Scenario::Verify)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Closed,
    Rate,
    Both,
}

impl Mode {
    fn closed(self) -> bool {
        matches!(self, Mode::Closed | Mode::Both)
    }
    fn rate(self) -> bool {
        matches!(self, Mode::Rate | Mode::Both)
    }
}

/// A run-stopping error with a plain message.
#[derive(Debug)]
struct BenchError(String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for BenchError {}

fn fail(message: impl Into<String>) -> BoxError {
    Box::new(BenchError(message.into()))
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kluis-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let cli = Cli::parse();
    validate(&cli)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();

    let mut server = match &cli.addr {
        Some(_) => None,
        None => Some(ServerGuard::spawn(&cli, &run_id).await?),
    };
    let (result, interrupted) = tokio::select! {
        r = bench(&cli, &run_id, server.as_mut()) => (r, false),
        _ = tokio::signal::ctrl_c() => (Err(fail("interrupted")), true),
    };
    if let Some(server) = server.as_mut() {
        if result.is_err() && !interrupted {
            server.keep = true;
        }
        if server.keep {
            eprintln!(
                "kluis-bench: the server's data directory and log are kept in {}",
                server.dir.display()
            );
        }
    }
    // Dropping the guard kills the server (and removes its data unless kept).
    drop(server);
    result
}

fn validate(cli: &Cli) -> Result<(), BoxError> {
    if cli.concurrency == 0 || cli.channels == 0 {
        return Err(fail("--concurrency and --channels must be at least 1"));
    }
    for (flag, v) in [
        ("--duration", cli.duration),
        ("--rate", cli.rate),
        ("--rate-duration", cli.rate_duration),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(fail(format!("{flag} must be a positive number")));
        }
    }
    if !(cli.warmup.is_finite() && cli.warmup >= 0.0) {
        return Err(fail("--warmup must be zero or more seconds"));
    }
    if cli.addr.is_some() && cli.database_url.is_some() {
        return Err(fail(
            "--database-url is for the spawned server; it cannot be used with --addr",
        ));
    }
    let needs_seed = (cli.mode.closed() && cli.scenarios.iter().any(|s| s.needs_seed()))
        || (cli.mode.rate() && cli.rate_scenario.needs_seed());
    if cli.tls && (cli.addr.is_some() || cli.seed == 0) {
        return Err(fail(
            "--tls needs a spawned server (no --addr) and --seed 1 or more (for get)",
        ));
    }
    if cli.rewrap && cli.seed == 0 {
        return Err(fail("--rewrap needs --seed 1 or more"));
    }
    if cli.sweep > 0 && (cli.addr.is_some() || cli.seed == 0) {
        return Err(fail(
            "--sweep needs a spawned server (no --addr) and --seed 1 or more (for get)",
        ));
    }
    if needs_seed && cli.seed == 0 {
        return Err(fail(
            "get and find need seeded subjects: use --seed 1 or more",
        ));
    }
    Ok(())
}

async fn bench(
    cli: &Cli,
    run_id: &str,
    mut server: Option<&mut ServerGuard>,
) -> Result<(), BoxError> {
    let (uri, token) = match (&cli.addr, server.as_deref()) {
        (Some(addr), _) => {
            let token = cli
                .token
                .clone()
                .ok_or_else(|| fail("--addr needs --token (or KLUIS_BENCH_TOKEN)"))?;
            let uri = if addr.contains("://") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
            (uri, token)
        }
        (None, Some(server)) => (server.uri.clone(), server.token.clone()),
        (None, None) => return Err(fail("no server to measure")),
    };

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let backend = match (&cli.database_url, &cli.addr) {
        (Some(url), _) if url.starts_with("postgres") => "postgres",
        (Some(_), _) => "other",
        (None, Some(_)) => "unknown (external server)",
        (None, None) => "sqlite",
    };
    let target = match server.as_deref() {
        Some(s) => format!("spawned kluis pid {} at {}", s.pid(), s.uri),
        None => format!("external kluis at {uri}"),
    };
    println!(
        "kluis-bench {}: {cpus} CPUs, backend {backend}, {target}, seeding {} subjects, \
         concurrency {}, {} channels, warm-up {}s, duration {}s, run id {run_id}",
        env!("CARGO_PKG_VERSION"),
        cli.seed,
        cli.concurrency,
        cli.channels,
        cli.warmup,
        cli.duration
    );

    let conns = connect(&uri, None, &token, &cli.purpose, &cli.reason, cli.channels).await?;
    let counter = Arc::new(AtomicU64::new(0));
    let mut report = Report::default();

    // Seed.
    let data = if cli.seed > 0 {
        let (data, row) = seed(&conns, cli.seed, cli.concurrency, run_id, &counter).await?;
        report.print_header();
        report.push(row);
        Arc::new(data)
    } else {
        report.print_header();
        Arc::new(Seeded::default())
    };
    counter.store(cli.seed, Ordering::Relaxed);
    if let Some(s) = server.as_deref_mut() {
        s.check_alive()?;
        report.rss_after_seed = proc_memory(s.pid());
    }

    let warmup = Duration::from_secs_f64(cli.warmup);
    let ctx = Arc::new(Context {
        data,
        run_id: run_id.to_owned(),
        counter,
    });

    if cli.scenarios.contains(&Scenario::Verify) || cli.rate_scenario == Scenario::Verify {
        eprintln!("setting passwords of {VERIFY_SUBJECTS} seeded subjects for `verify` ...");
        set_passwords(&conns[0], &ctx.data).await?;
    }

    if cli.mode.closed() {
        for &scenario in &cli.scenarios {
            let outcome = closed_loop(
                scenario,
                &conns,
                &ctx,
                cli.concurrency,
                warmup,
                Duration::from_secs_f64(cli.duration),
            )
            .await?;
            let row = Row::new(
                scenario.name(),
                "closed",
                format!("{}c/{}ch", cli.concurrency, cli.channels),
                &outcome,
                cli.duration,
            );
            report.push(row);
            if let Some(s) = server.as_deref_mut() {
                s.check_alive()?;
            }
        }
    }

    if cli.mode.rate() {
        let outcome = fixed_rate(
            cli.rate_scenario,
            &conns,
            &ctx,
            cli.rate,
            warmup,
            Duration::from_secs_f64(cli.rate_duration),
        )
        .await?;
        let mut row = Row::new(
            cli.rate_scenario.name(),
            "rate",
            format!("{}/s", cli.rate),
            &outcome.outcome,
            outcome.elapsed,
        );
        row.dropped = outcome.dropped;
        report.push(row);
        println!(
            "  fixed rate: offered {:.0}/s, achieved {:.1}/s, {} dropped (over {} in flight), \
             scheduler lag p99 {:.3} ms / max {:.3} ms (included in the latencies)",
            cli.rate,
            report.rows.last().map_or(0.0, |r| r.rate),
            outcome.dropped,
            MAX_OUTSTANDING,
            ms(outcome.lag.value_at_quantile(0.99)),
            ms(outcome.lag.max()),
        );
        if let Some(s) = server.as_deref_mut() {
            s.check_alive()?;
        }
    }

    if cli.rewrap {
        rewrap_bench(cli, &conns, &ctx).await?;
        if let Some(s) = server.as_deref_mut() {
            s.check_alive()?;
        }
    }

    if cli.sweep > 0 {
        retention_bench(cli, &conns, &ctx, run_id).await?;
        if let Some(s) = server.as_deref_mut() {
            s.check_alive()?;
        }
    }

    if cli.tls
        && let Some(s) = server.as_deref_mut()
    {
        tls_bench(cli, s, &token, &conns, &ctx, &mut report).await?;
    }

    if let Some(s) = server.as_deref() {
        report.rss_end = proc_memory(s.pid());
        report.wal_end = std::fs::metadata(s.dir.join("kluis.db-wal"))
            .ok()
            .map(|m| m.len());
    }
    report.print_footer(cli, backend);
    if let Some(s) = server.as_deref() {
        println!("{}", s.log_summary());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Adds `authorization: Bearer <token>`, `x-kluis-purpose` and `x-kluis-reason` to every kluis call.
#[derive(Clone)]
struct Bearer {
    token: MetadataValue<Ascii>,
    purpose: MetadataValue<Ascii>,
    reason: MetadataValue<Ascii>,
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert("authorization", self.token.clone());
        metadata.insert("x-kluis-purpose", self.purpose.clone());
        metadata.insert("x-kluis-reason", self.reason.clone());
        Ok(request)
    }
}

type Subjects = SubjectServiceClient<InterceptedService<Channel, Bearer>>;
type RetentionClient = RetentionServiceClient<InterceptedService<Channel, Bearer>>;
type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;
type Passwords = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

/// The clients of one HTTP/2 connection; cloning shares the connection.
#[derive(Clone)]
struct Conn {
    subjects: Subjects,
    admin: AdminClient,
    retention: RetentionClient,
    passwords: Passwords,
    health: HealthClient<Channel>,
}

async fn connect(
    uri: &str,
    tls: Option<&ClientTlsConfig>,
    token: &str,
    purpose: &str,
    reason: &str,
    channels: usize,
) -> Result<Vec<Conn>, BoxError> {
    let bearer = Bearer {
        token: format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| fail("the token is not valid in a header"))?,
        purpose: purpose
            .parse()
            .map_err(|_| fail("--purpose is not valid in a header"))?,
        reason: reason
            .parse()
            .map_err(|_| fail("--reason is not valid in a header"))?,
    };
    let mut endpoint = Endpoint::from_shared(uri.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    let mut conns = Vec::with_capacity(channels);
    for _ in 0..channels {
        // Every `connect` opens its own HTTP/2 connection.
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| fail(format!("cannot connect to {uri}: {e}")))?;
        conns.push(Conn {
            subjects: SubjectServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            retention: RetentionServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            passwords: CredentialServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            health: HealthClient::new(channel),
        });
    }
    Ok(conns)
}

/// Seeded subjects, by seed index.
#[derive(Default)]
struct Seeded {
    ids: Vec<String>,
    emails: Vec<String>,
    usernames: Vec<String>,
}

/// What every request task needs.
struct Context {
    data: Arc<Seeded>,
    run_id: String,
    /// Next unique number for a created subject's e-mail address and username.
    counter: Arc<AtomicU64>,
}

/// One request of `scenario`; an error is `CODE: message`.
async fn call(scenario: Scenario, conn: &mut Conn, ctx: &Context, pick: u64) -> Result<(), String> {
    match scenario {
        Scenario::Health => {
            let r = conn
                .health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(status_text)?;
            if r.into_inner().status != ServingStatus::Serving as i32 {
                return Err("health: not SERVING".into());
            }
        }
        Scenario::Get => {
            let ids = &ctx.data.ids;
            let id = ids
                .get((pick % ids.len().max(1) as u64) as usize)
                .ok_or("no seeded subjects")?;
            let r = conn
                .subjects
                .get_subject(pb::GetSubjectRequest {
                    id: id.clone(),
                    read_mask: None,
                    view: 0,
                })
                .await
                .map_err(status_text)?;
            if r.into_inner().subject.is_none_or(|s| &s.id != id) {
                return Err("get: response without the subject asked for".into());
            }
        }
        Scenario::Find => {
            let emails = &ctx.data.emails;
            let email = emails
                .get((pick % emails.len().max(1) as u64) as usize)
                .ok_or("no seeded subjects")?;
            let r = conn
                .subjects
                .find_subjects(pb::FindSubjectsRequest {
                    key: Some(pb::find_subjects_request::Key::Email(email.clone())),
                })
                .await
                .map_err(status_text)?;
            if r.into_inner().subject_ids.is_empty() {
                return Err("find: no subject for a seeded e-mail address".into());
            }
        }
        Scenario::Create => {
            let n = ctx.counter.fetch_add(1, Ordering::Relaxed);
            create(conn, n, &ctx.run_id).await?;
        }
        Scenario::Verify => {
            let names = &ctx.data.usernames;
            let with_password = names.len().clamp(1, VERIFY_SUBJECTS) as u64;
            let username = names
                .get((pick % with_password) as usize)
                .ok_or("no seeded subjects")?;
            let r = conn
                .passwords
                .verify_password(pb::VerifyPasswordRequest {
                    username: username.clone(),
                    password: BENCH_PASSWORD.into(),
                    client_ip: String::new(),
                })
                .await
                .map_err(status_text)?;
            if !r.into_inner().valid {
                return Err("verify: the seeded password did not verify".into());
            }
        }
    }
    Ok(())
}

/// Sets [`BENCH_PASSWORD`] for the first [`VERIFY_SUBJECTS`] seeded subjects.
async fn set_passwords(conn: &Conn, data: &Seeded) -> Result<(), BoxError> {
    for id in data.ids.iter().take(VERIFY_SUBJECTS) {
        conn.passwords
            .clone()
            .set_password(pb::SetPasswordRequest {
                subject_id: id.clone(),
                password: BENCH_PASSWORD.into(),
            })
            .await
            .map_err(|s| fail(status_text(s)))?;
    }
    Ok(())
}

/// Creates subject number `n` with every path set; returns its id.
async fn create(conn: &mut Conn, n: u64, run_id: &str) -> Result<String, String> {
    let r = conn
        .subjects
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(full_subject(n, run_id)),
            source: "kluis-bench".into(),
        })
        .await
        .map_err(status_text)?;
    r.into_inner()
        .subject
        .map(|s| s.id)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| "create: response without a subject id".to_owned())
}

fn status_text(status: Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn email(n: u64, run_id: &str) -> String {
    format!("bench.{n}.{run_id}@example.nl")
}

/// A subject with every field path of the contract set; e-mail, username, phone and PSP token
/// depend on `n`.
fn full_subject(n: u64, run_id: &str) -> pb::Subject {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ts = |ago_s: u64| prost_types::Timestamp {
        seconds: now.as_secs().saturating_sub(ago_s) as i64,
        nanos: now.subsec_nanos() as i32,
    };
    let house_number = (n % 300 + 1).to_string();
    pb::Subject {
        name: Some(pb::Name {
            given: "Jan".into(),
            family: format!("Jansen {n}"),
        }),
        address: Some(pb::Address {
            street: "Westeinde".into(),
            house_number: house_number.clone(),
            house_number_addition: "A".into(),
            postal_code: "7672 GD".into(),
            city: "Vriezenveen".into(),
            country: "NL".into(),
        }),
        contact: Some(pb::Contact {
            email: email(n, run_id),
            // + and 11 digits: a valid E.164 number for every n below 10^8.
            phone: format!("+316{:08}", n % 100_000_000),
        }),
        ip_addresses: vec![
            pb::IpAddressRecord {
                address: "192.0.2.10".into(),
                first_seen: Some(ts(86_400)),
                last_seen: Some(ts(0)),
            },
            pb::IpAddressRecord {
                address: "2001:db8::1".into(),
                first_seen: None,
                last_seen: None,
            },
        ],
        billing: Some(pb::Billing {
            company_name: "Jansen Hosting B.V.".into(),
            vat_number: "NL123456789B01".into(),
            address: Some(pb::Address {
                street: "Westeinde".into(),
                house_number,
                house_number_addition: "B".into(),
                postal_code: "7672 GD".into(),
                city: "Vriezenveen".into(),
                country: "NL".into(),
            }),
        }),
        payment: Some(pb::Payment {
            iban: IBAN.into(),
            account_holder: "J. Jansen".into(),
            psp_token: format!("psp_{run_id}_{n}"),
            method: pb::PaymentMethod::Ideal as i32,
        }),
        profile: Some(pb::Profile {
            gender: pb::Gender::Male as i32,
        }),
        account: Some(pb::Account {
            username: format!("bench{n}.{run_id}"),
        }),
        activity_log: vec![pb::ActivityEntry {
            action: "login".into(),
            time: Some(ts(60)),
            ip_address: "192.0.2.10".into(),
        }],
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------------------------

/// Successes (as a latency histogram) and failures of one measurement.
struct Outcome {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Outcome {
    fn new() -> Result<Self, BoxError> {
        Ok(Self {
            hist: new_histogram()?,
            errors: 0,
            first_error: None,
        })
    }

    fn record(&mut self, result: Result<(), String>, latency: Duration) {
        match result {
            Ok(()) => self.hist.saturating_record(micros(latency)),
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Outcome) -> Result<(), BoxError> {
        self.hist.add(&other.hist)?;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }

    fn ok(&self) -> u64 {
        self.hist.len()
    }
}

fn new_histogram() -> Result<Histogram<u64>, BoxError> {
    Ok(Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// SplitMix64: a small, fast generator for picking subjects; no cryptographic use.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        Self(uuid::Uuid::new_v4().as_u64_pair().0)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Closed loop: `concurrency` tasks each keep one request in flight. Calls that complete during
/// the warm-up, or after the deadline, are not counted.
async fn closed_loop(
    scenario: Scenario,
    conns: &[Conn],
    ctx: &Arc<Context>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Outcome, BoxError> {
    eprintln!(
        "  {}: closed loop, {concurrency} concurrent, {:.1}s warm-up + {:.1}s ...",
        scenario.name(),
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    let measure_from = Instant::now() + warmup;
    let until = measure_from + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let mut conn = conns[t % conns.len()].clone();
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::new()?;
            let mut rng = Rng::seeded();
            loop {
                let started = Instant::now();
                let result = call(scenario, &mut conn, &ctx, rng.next()).await;
                let done = Instant::now();
                if done >= until {
                    break;
                }
                if done >= measure_from {
                    out.record(result, done - started);
                }
            }
            Ok::<_, BoxError>(out)
        }));
    }
    let mut total = Outcome::new()?;
    for task in tasks {
        total.merge(task.await??)?;
    }
    Ok(total)
}

/// The result of a fixed-rate run.
struct RateOutcome {
    outcome: Outcome,
    /// Seconds from the start of the measured window until its last call completed.
    elapsed: f64,
    dropped: u64,
    /// How late the scheduler sent requests, in microseconds.
    lag: Histogram<u64>,
}

struct RateShared {
    outcome: Mutex<(Outcome, Option<Instant>)>,
    outstanding: AtomicUsize,
}

/// Open loop at `rate` requests/s. A scheduler thread sends request `i` at `start + i / rate` and
/// the latency of each is measured from that intended start, so queueing anywhere — the server,
/// the connection or this scheduler — shows up in the percentiles.
async fn fixed_rate(
    scenario: Scenario,
    conns: &[Conn],
    ctx: &Arc<Context>,
    rate: f64,
    warmup: Duration,
    duration: Duration,
) -> Result<RateOutcome, BoxError> {
    eprintln!(
        "  {}: fixed rate {rate:.0}/s, {:.1}s warm-up + {:.1}s ...",
        scenario.name(),
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    let shared = Arc::new(RateShared {
        outcome: Mutex::new((Outcome::new()?, None)),
        outstanding: AtomicUsize::new(0),
    });
    let handle = tokio::runtime::Handle::current();
    let conns = conns.to_vec();
    let ctx = ctx.clone();
    let sched_shared = shared.clone();
    let scheduler = tokio::task::spawn_blocking(move || -> Result<_, BoxError> {
        let shared = sched_shared;
        let mut lag = new_histogram()?;
        let mut rng = Rng::seeded();
        let mut dropped = 0u64;
        let start = Instant::now() + Duration::from_millis(20);
        let measure_from = start + warmup;
        let total = ((warmup + duration).as_secs_f64() * rate).round() as u64;
        let mut i = 0u64;
        while i < total {
            let intended = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if intended > now {
                // A thread sleep wakes within tens of microseconds; tokio's timer only has
                // millisecond resolution, which would add up to 1 ms to every latency.
                std::thread::sleep(intended - now);
                continue;
            }
            let measured = intended >= measure_from;
            i += 1;
            if measured {
                lag.saturating_record(micros(now - intended));
            }
            if shared.outstanding.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
                if measured {
                    dropped += 1;
                }
                continue;
            }
            shared.outstanding.fetch_add(1, Ordering::Relaxed);
            let mut conn = conns[(i as usize) % conns.len()].clone();
            let ctx = ctx.clone();
            let shared = shared.clone();
            let pick = rng.next();
            handle.spawn(async move {
                let result = call(scenario, &mut conn, &ctx, pick).await;
                let done = Instant::now();
                if measured {
                    let mut guard = shared
                        .outcome
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    guard.0.record(result, done - intended);
                    guard.1 = Some(guard.1.map_or(done, |last| last.max(done)));
                }
                shared.outstanding.fetch_sub(1, Ordering::Relaxed);
            });
        }
        Ok((measure_from, dropped, lag))
    });
    let (measure_from, dropped, lag) = scheduler.await??;

    // Let the calls still in flight finish (each has its own timeout).
    let drain_until = Instant::now() + CALL_TIMEOUT + Duration::from_secs(5);
    while shared.outstanding.load(Ordering::Relaxed) > 0 {
        if Instant::now() > drain_until {
            return Err(fail(
                "fixed rate: calls still in flight after their timeout",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (outcome, last) = {
        let mut guard = shared
            .outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let outcome = std::mem::replace(&mut guard.0, Outcome::new()?);
        (outcome, guard.1)
    };
    let elapsed = last
        .map_or(Duration::ZERO, |l| {
            l.saturating_duration_since(measure_from)
        })
        .max(duration)
        .as_secs_f64();
    Ok(RateOutcome {
        outcome,
        elapsed,
        dropped,
        lag,
    })
}

/// Creates subjects `0..n` with every path set at `concurrency` requests in flight.
async fn seed(
    conns: &[Conn],
    n: u64,
    concurrency: usize,
    run_id: &str,
    counter: &Arc<AtomicU64>,
) -> Result<(Seeded, Row), BoxError> {
    eprintln!("seeding {n} subjects, every field set, {concurrency} concurrent ...");
    counter.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                let d = done.load(Ordering::Relaxed);
                eprintln!(
                    "  seeded {d}/{n} ({:.0}/s)",
                    d as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let mut conn = conns[t % conns.len()].clone();
        let counter = counter.clone();
        let done = done.clone();
        let run_id = run_id.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::new()?;
            let mut created = Vec::new();
            loop {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t0 = Instant::now();
                let result = create(&mut conn, i, &run_id).await;
                let latency = t0.elapsed();
                match result {
                    Ok(id) => {
                        created.push((i, id));
                        out.record(Ok(()), latency);
                    }
                    Err(e) => out.record(Err(e), latency),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, BoxError>((out, created))
        }));
    }
    let mut total = Outcome::new()?;
    let mut created = Vec::with_capacity(n as usize);
    for task in tasks {
        let (out, list) = task.await??;
        total.merge(out)?;
        created.extend(list);
    }
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    created.sort_unstable_by_key(|(i, _)| *i);
    eprintln!(
        "seeded {} subjects in {elapsed:.1}s ({:.0}/s), {} errors",
        created.len(),
        created.len() as f64 / elapsed,
        total.errors
    );
    // A few failures leave a usable data set; more mean the run would measure something else.
    if created.is_empty() || total.errors * 100 > n {
        return Err(fail(format!(
            "seeding failed: {} of {n} creates failed; first: {}",
            total.errors,
            total.first_error.as_deref().unwrap_or("-")
        )));
    }
    let data = Seeded {
        emails: created.iter().map(|(i, _)| email(*i, run_id)).collect(),
        usernames: created
            .iter()
            .map(|(i, _)| format!("bench{i}.{run_id}"))
            .collect(),
        ids: created.into_iter().map(|(_, id)| id).collect(),
    };
    let row = Row::new("seed", "closed", format!("{n} subj"), &total, elapsed);
    Ok((data, row))
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

/// Creates `n` subjects (every path set), each with an order record; then closes every record so
/// that its seven years run out at one moment after the closes (each close is timed in the past, as
/// a billing system registering old orders would). Returns how many and when they fall due.
/// Records are closed only after every subject exists, and `extra` seconds are added to the
/// margin, so nothing falls due while seeding (a close that is due at once purges before it
/// answers, which would bypass the sweep being measured).
async fn seed_due(
    conns: &[Conn],
    n: u64,
    concurrency: usize,
    run_id: &str,
    first: u64,
    extra: Duration,
) -> Result<(u64, SystemTime), BoxError> {
    eprintln!("seeding {n} subjects with an open order record ...");
    let started = Instant::now();
    let opened = run_parallel(conns, n, concurrency, {
        let run_id = run_id.to_owned();
        move |mut conn: Conn, k: u64| {
            let run_id = run_id.clone();
            async move {
                let id = create(&mut conn, first + k, &run_id).await?;
                conn.retention
                    .open_processing(pb::OpenProcessingRequest {
                        subject_id: id,
                        purpose: "order".into(),
                        reference: format!("bench-{run_id}-{}", first + k),
                    })
                    .await
                    .map_err(status_text)?;
                Ok(())
            }
        }
    })
    .await?;
    // Closing is cheaper than creating: the margin covers the closes, then `extra`.
    let margin = started.elapsed() + Duration::from_secs(10) + extra;
    let due_at = SystemTime::now() + margin;
    let seven_years =
        kluis::policy::Period::parse("P7Y").ok_or_else(|| fail("P7Y does not parse"))?;
    let due_us = i64::try_from(due_at.duration_since(UNIX_EPOCH)?.as_micros())?;
    // The close time whose seven years end at `due_us` (one correction for leap days).
    let mut at_us = due_us - 7 * 365 * 86_400_000_000;
    at_us += due_us - seven_years.after(at_us);
    let at = prost_types::Timestamp {
        seconds: at_us.div_euclid(1_000_000),
        nanos: i32::try_from(at_us.rem_euclid(1_000_000) * 1000)?,
    };
    eprintln!(
        "closing {opened} order records (due in {:.0}s) ...",
        margin.as_secs_f64()
    );
    let closed = run_parallel(conns, opened, concurrency, {
        let run_id = run_id.to_owned();
        move |mut conn: Conn, k: u64| {
            let reference = format!("bench-{run_id}-{}", first + k);
            async move {
                conn.retention
                    .close_processing(pb::CloseProcessingRequest {
                        purpose: "order".into(),
                        reference,
                        event: "order_completed".into(),
                        at: Some(at),
                    })
                    .await
                    .map_err(status_text)?;
                Ok(())
            }
        }
    })
    .await?;
    if SystemTime::now() >= due_at {
        return Err(fail(
            "seeding took longer than its margin: records fell due while closing",
        ));
    }
    eprintln!(
        "seeded {closed} subjects with a completed order in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok((closed, due_at))
}

/// Runs `job(conn, k)` for k in 0..n on `concurrency` tasks; the number that succeeded. More than
/// 1 % failures fail the run.
async fn run_parallel<F, Fut>(
    conns: &[Conn],
    n: u64,
    concurrency: usize,
    job: F,
) -> Result<u64, BoxError>
where
    F: Fn(Conn, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let conn = conns[t % conns.len()].clone();
        let counter = counter.clone();
        let job = job.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
            loop {
                let k = counter.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    break;
                }
                match job(conn.clone(), k).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (ok, failed, first_error)
        }));
    }
    let (mut ok, mut failed, mut first_error) = (0, 0, None);
    for task in tasks {
        let (o, f, e) = task.await?;
        ok += o;
        failed += f;
        if first_error.is_none() {
            first_error = e;
        }
    }
    if failed * 100 > n {
        return Err(fail(format!(
            "{failed} of {n} failed; first: {}",
            first_error.unwrap_or_default()
        )));
    }
    Ok(ok)
}

/// Waits until `at`.
async fn sleep_until(at: SystemTime) {
    if let Ok(wait) = at.duration_since(SystemTime::now()) {
        eprintln!(
            "  waiting {:.1}s until the records fall due ...",
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait + Duration::from_millis(100)).await;
    }
}

/// Sweeps until nothing is due, in `Sweep` calls of at most 20,000 subjects (each well inside the
/// call timeout); the summed answer and how long it took.
async fn sweep_once(
    conn: &Conn,
    at_background_rate: bool,
) -> Result<(pb::SweepResponse, f64), BoxError> {
    let started = Instant::now();
    let mut total = pb::SweepResponse::default();
    loop {
        let answer = conn
            .retention
            .clone()
            .sweep(pb::SweepRequest {
                dry_run: false,
                limit: 20_000,
                at_background_rate,
            })
            .await
            .map_err(|s| fail(status_text(s)))?
            .into_inner();
        total.subjects_visited += answer.subjects_visited;
        total.subjects_purged += answer.subjects_purged;
        total.subjects_shredded += answer.subjects_shredded;
        total.subjects_skipped += answer.subjects_skipped;
        total.subjects_failed += answer.subjects_failed;
        if answer.subjects_visited == 0 {
            return Ok((total, started.elapsed().as_secs_f64()));
        }
    }
}

/// The retention benchmark of `--sweep` (see the module documentation).
async fn retention_bench(
    cli: &Cli,
    conns: &[Conn],
    ctx: &Arc<Context>,
    run_id: &str,
) -> Result<(), BoxError> {
    let n = cli.sweep;
    let base = 10_000_000;
    // Part 1: the sweep alone.
    let (seeded, due_at) =
        seed_due(conns, n, cli.concurrency, run_id, base, Duration::ZERO).await?;
    sleep_until(due_at).await;
    eprintln!("  sweep alone: Sweep at full speed ...");
    let (alone, alone_secs) = sweep_once(&conns[0], false).await?;
    let alone_gone = alone.subjects_purged + alone.subjects_shredded;
    let alone_rate = alone_gone as f64 / alone_secs;

    // Part 2: get alone, then get while the sweep runs at the background sweeper's rate.
    let warmup = Duration::from_secs_f64(cli.warmup);
    let duration = Duration::from_secs_f64(cli.duration);
    // Enough to outlast the get measurement at the background rate.
    let (seeded2, due_at) = seed_due(
        conns,
        n.min(50_000),
        cli.concurrency,
        run_id,
        base + n,
        warmup + duration + Duration::from_secs(2),
    )
    .await?;
    let get_alone =
        closed_loop(Scenario::Get, conns, ctx, cli.concurrency, warmup, duration).await?;
    sleep_until(due_at).await;
    let sweeper_conn = conns[0].clone();
    let sweep_task = tokio::spawn(async move { sweep_once(&sweeper_conn, true).await });
    let get_during =
        closed_loop(Scenario::Get, conns, ctx, cli.concurrency, warmup, duration).await?;
    let sweep_still_running = !sweep_task.is_finished();
    let (under_load, load_secs) = sweep_task.await??;
    let load_gone = under_load.subjects_purged + under_load.subjects_shredded;
    let load_rate = load_gone as f64 / load_secs;
    let get_alone_rate = get_alone.ok() as f64 / cli.duration;
    let get_during_rate = get_during.ok() as f64 / cli.duration;
    let kept = 100.0 * get_during_rate / get_alone_rate.max(1.0);

    println!();
    println!(
        "retention sweep alone: {seeded} due subjects seeded, {alone_gone} swept (purged {}, shredded {}, skipped {}, failed {}) in {alone_secs:.1}s = {alone_rate:.0} subjects/s",
        alone.subjects_purged,
        alone.subjects_shredded,
        alone.subjects_skipped,
        alone.subjects_failed
    );
    println!(
        "retention sweep under get load (background rate and batch): {seeded2} seeded, {load_gone} swept (skipped {}, failed {}) in {load_secs:.1}s = {load_rate:.0} subjects/s; get {get_alone_rate:.0}/s without the sweep, {get_during_rate:.0}/s during it ({kept:.1} %){}",
        under_load.subjects_skipped,
        under_load.subjects_failed,
        if sweep_still_running {
            ""
        } else {
            " — NOTE: the sweep ended before the get measurement did"
        }
    );
    let alone_target = seeded >= 100_000;
    println!(
        "target 100,000 due subjects swept in <= 30 s: {}",
        if alone_target {
            met(
                alone_secs <= 30.0 * (seeded as f64 / 100_000.0),
                format!("{alone_secs:.1} s for {alone_gone}"),
            )
        } else {
            format!("not measured at that size ({seeded} subjects; pass --sweep 100000)")
        }
    );
    println!(
        "target sweep under load >= 2,000 subjects/s: {}",
        met(load_rate >= 2000.0, format!("{load_rate:.0}/s"))
    );
    println!(
        "target get keeps >= 70 % during the sweep: {}",
        met(kept >= 70.0, format!("{kept:.1} %"))
    );
    Ok(())
}

/// Data keys still under an older KEK, as `KeyStatus` says.
async fn rewrap_pending(conn: &Conn) -> Result<u64, BoxError> {
    Ok(conn
        .admin
        .clone()
        .key_status(pb::KeyStatusRequest { backup_time: None })
        .await
        .map_err(|s| fail(status_text(s)))?
        .into_inner()
        .rewrap_pending)
}

/// Rotates the KEK and returns the data keys the job now has to move.
async fn rotate_kek(conn: &Conn) -> Result<u64, BoxError> {
    let version = conn
        .admin
        .clone()
        .rotate_kek(pb::RotateKekRequest {})
        .await
        .map_err(|s| fail(status_text(s)))?
        .into_inner()
        .version;
    let pending = rewrap_pending(conn).await?;
    eprintln!("  KEK v{version} active; {pending} data keys to re-wrap");
    Ok(pending)
}

/// Waits until the re-wrap job has moved every data key; seconds since `started`.
async fn wait_rewrapped(conn: &Conn, started: Instant) -> Result<f64, BoxError> {
    loop {
        if rewrap_pending(conn).await? == 0 {
            return Ok(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The key-rotation benchmark of `--rewrap` (see the module documentation).
async fn rewrap_bench(cli: &Cli, conns: &[Conn], ctx: &Arc<Context>) -> Result<(), BoxError> {
    // Part 1: the job alone.
    let started = Instant::now();
    let alone = rotate_kek(&conns[0]).await?;
    let alone_secs = wait_rewrapped(&conns[0], started).await?;
    let alone_rate = alone as f64 / alone_secs;

    // Part 2: get alone, then get while the job re-wraps everything once more.
    let warmup = Duration::from_secs_f64(cli.warmup);
    let duration = Duration::from_secs_f64(cli.duration);
    let get_alone =
        closed_loop(Scenario::Get, conns, ctx, cli.concurrency, warmup, duration).await?;
    let total = rotate_kek(&conns[0]).await?;
    let get_task = {
        let (conns, ctx, concurrency) = (conns.to_vec(), ctx.clone(), cli.concurrency);
        tokio::spawn(async move {
            closed_loop(Scenario::Get, &conns, &ctx, concurrency, warmup, duration).await
        })
    };
    // The job's progress over get's measured window (after its warm-up).
    tokio::time::sleep(warmup).await;
    let (t0, p0) = (Instant::now(), rewrap_pending(&conns[0]).await?);
    tokio::time::sleep(duration).await;
    let (t1, p1) = (Instant::now(), rewrap_pending(&conns[0]).await?);
    let get_during = get_task
        .await
        .map_err(|e| fail(format!("get task: {e}")))??;
    let load_rate = p0.saturating_sub(p1) as f64 / (t1 - t0).as_secs_f64();
    let rest_started = Instant::now();
    let rest_secs = wait_rewrapped(&conns[0], rest_started).await?;
    let get_alone_rate = get_alone.ok() as f64 / cli.duration;
    let get_during_rate = get_during.ok() as f64 / cli.duration;
    let kept = 100.0 * get_during_rate / get_alone_rate.max(1.0);

    println!();
    println!(
        "KEK re-wrap alone (background job, default rate and batch): {alone} data keys in \
         {alone_secs:.1} s = {alone_rate:.0}/s"
    );
    println!(
        "KEK re-wrap under get load: {total} data keys to move; {:.0} moved in the {:.1} s \
         measured = {load_rate:.0}/s ({p1} still pending at its end{}, done {rest_secs:.1} s later); \
         get {get_alone_rate:.0}/s without the job, {get_during_rate:.0}/s during it ({kept:.1} %)",
        p0.saturating_sub(p1) as f64,
        (t1 - t0).as_secs_f64(),
        if p1 == 0 {
            " — NOTE: the job ended before the get measurement did"
        } else {
            ""
        },
    );
    println!(
        "target 1,000,000 data keys re-wrapped in <= 60 s: {}",
        if alone >= 1_000_000 {
            met(
                alone_secs <= 60.0 * (alone as f64 / 1_000_000.0),
                format!("{alone_secs:.1} s for {alone}"),
            )
        } else {
            format!("not measured at that size ({alone} data keys; pass --seed 1000000)")
        }
    );
    println!(
        "target re-wrap under load >= 10,000 data keys/s: {}",
        met(load_rate >= 10_000.0, format!("{load_rate:.0}/s"))
    );
    println!(
        "target get keeps >= 70 % during the re-wrap: {}",
        met(kept >= 70.0, format!("{kept:.1} %"))
    );
    Ok(())
}

/// A target's verdict with the measured figure.
fn met(ok: bool, measured: String) -> String {
    format!("{} ({measured})", if ok { "OK" } else { "MISSED" })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

struct Row {
    scenario: String,
    mode: &'static str,
    load: String,
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    errors: u64,
    dropped: u64,
    first_error: Option<String>,
}

impl Row {
    fn new(scenario: &str, mode: &'static str, load: String, o: &Outcome, secs: f64) -> Self {
        let q = |p: f64| ms(o.hist.value_at_quantile(p));
        Self {
            scenario: scenario.to_owned(),
            mode,
            load,
            rate: if secs > 0.0 {
                o.ok() as f64 / secs
            } else {
                0.0
            },
            p50: q(0.50),
            p99: q(0.99),
            p999: q(0.999),
            max: ms(o.hist.max()),
            errors: o.errors,
            dropped: 0,
            first_error: o.first_error.clone(),
        }
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// `--tls`: get/s over plaintext and over TLS, and the errors of both runs.
    tls: Option<(f64, f64, u64)>,
    rss_after_seed: Option<(f64, f64)>,
    rss_end: Option<(f64, f64)>,
    /// Size of the spawned server's SQLite WAL file at the end, in bytes.
    wal_end: Option<u64>,
}

impl Report {
    fn print_header(&self) {
        println!();
        println!(
            "{:<8} {:<6} {:>12} {:>10} {:>8} {:>8} {:>9} {:>8} {:>7} {:>9}",
            "scenario",
            "mode",
            "load",
            "req/s",
            "p50(ms)",
            "p99(ms)",
            "p99.9(ms)",
            "max(ms)",
            "errors",
            "vs health"
        );
    }

    fn health_rate(&self) -> Option<f64> {
        self.closed("health").map(|r| r.rate).filter(|r| *r > 0.0)
    }

    fn closed(&self, scenario: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.scenario == scenario && r.mode == "closed")
    }

    /// Prints `row` at once (the run is long) and keeps it for the summary.
    fn push(&mut self, row: Row) {
        let health = match (row.mode, row.scenario.as_str()) {
            ("closed", "health") => Some(row.rate).filter(|r| *r > 0.0),
            _ => self.health_rate(),
        };
        let ratio = match (row.mode, row.scenario.as_str(), health) {
            ("closed", "seed", _) => "-".to_owned(),
            ("closed", _, Some(h)) => format!("{:.1}%", 100.0 * row.rate / h),
            _ => "-".to_owned(),
        };
        println!(
            "{:<8} {:<6} {:>12} {:>10.1} {:>8.3} {:>8.3} {:>9.3} {:>8.3} {:>7} {:>9}",
            row.scenario,
            row.mode,
            row.load,
            row.rate,
            row.p50,
            row.p99,
            row.p999,
            row.max,
            row.errors,
            ratio
        );
        if let Some(e) = &row.first_error {
            println!("         first error: {e}");
        }
        self.rows.push(row);
    }

    fn print_footer(&self, cli: &Cli, backend: &str) {
        println!();
        if let Some((rss, hwm)) = self.rss_after_seed {
            println!("server memory after seeding: RSS {rss:.1} MB, peak {hwm:.1} MB");
        }
        if let Some((rss, hwm)) = self.rss_end {
            println!("server memory at the end:    RSS {rss:.1} MB, peak {hwm:.1} MB");
        }
        if let Some(bytes) = self.wal_end {
            println!(
                "SQLite WAL file at the end:  {:.1} MiB (cut back to 64 MiB each time it starts over)",
                bytes as f64 / 1_048_576.0
            );
        }

        let mut differs = Vec::new();
        if cli.seed != 100_000 {
            differs.push(format!("{} subjects seeded, not 100000", cli.seed));
        }
        if cli.concurrency != 64 {
            differs.push(format!("concurrency {}, not 64", cli.concurrency));
        }
        if backend != "sqlite" {
            differs.push(format!("backend {backend}, not sqlite"));
        }
        if let Ok(n) = std::thread::available_parallelism()
            && n.get() != 2
        {
            differs.push(format!("{n} CPUs, not 2"));
        }
        if !differs.is_empty() {
            println!(
                "note: the targets assume other conditions ({})",
                differs.join("; ")
            );
        }

        let health = self.health_rate();
        // get: the policy-and-audit issue's target (every get purpose-checked and durably audited);
        // find: the core issue's.
        for (scenario, min_pct) in [("get", 30.0), ("find", 35.0)] {
            let label = format!("target {scenario} >= {min_pct:.0}% of health:");
            match (self.closed(scenario), health) {
                (Some(row), Some(h)) => {
                    let pct = 100.0 * row.rate / h;
                    println!(
                        "{label} {pct:.1}% {}",
                        verdict(pct >= min_pct && row.errors == 0, || format!(
                            "{:.1} points{}",
                            (min_pct - pct).max(0.0),
                            errors_note(row.errors)
                        ))
                    );
                }
                _ => println!("{label} not measured (needs closed-loop {scenario} and health)"),
            }
        }

        let label = "target create >= 8000 durable subjects/s:";
        match self.closed("create") {
            Some(row) => println!(
                "{label} {:.0}/s {}",
                row.rate,
                verdict(row.rate >= 8000.0 && row.errors == 0, || format!(
                    "{:.0}/s{}",
                    (8000.0 - row.rate).max(0.0),
                    errors_note(row.errors)
                ))
            ),
            None => println!("{label} not measured"),
        }

        let label = "target fixed rate 10000 get/s, p99 <= 3 ms:";
        match self
            .rows
            .iter()
            .find(|r| r.mode == "rate" && r.scenario == "get")
        {
            Some(row) => {
                let mut notes = Vec::new();
                if row.p99 > 3.0 {
                    notes.push(format!("{:.3} ms", row.p99 - 3.0));
                }
                if row.errors > 0 {
                    notes.push(format!("{} errors", row.errors));
                }
                if row.dropped > 0 {
                    notes.push(format!("{} dropped", row.dropped));
                }
                if row.rate < 0.99 * cli.rate {
                    notes.push(format!("achieved only {:.0}/s", row.rate));
                }
                let offered = if (cli.rate - 10_000.0).abs() > f64::EPSILON {
                    format!(" (offered {:.0}/s, not 10000)", cli.rate)
                } else {
                    String::new()
                };
                println!(
                    "{label} {:.3} ms{offered} {}",
                    row.p99,
                    verdict(notes.is_empty(), || notes.join(", "))
                );
            }
            None => println!("{label} not measured"),
        }

        if let Some((plain, tls, errors)) = self.tls {
            let pct = if plain > 0.0 {
                100.0 * tls / plain
            } else {
                0.0
            };
            println!(
                "target get over TLS >= {TLS_MIN_PCT:.0}% of plaintext: {tls:.0}/s vs {plain:.0}/s = {pct:.1}% {}",
                verdict(pct >= TLS_MIN_PCT && errors == 0, || format!(
                    "{:.1} points{}",
                    (TLS_MIN_PCT - pct).max(0.0),
                    errors_note(errors)
                ))
            );
        }

        let label = "target server RSS <= 150 MB:";
        match self.rss_end {
            Some((_, hwm)) => println!(
                "{label} peak {hwm:.1} MB {}",
                verdict(hwm <= 150.0, || format!("{:.1} MB", hwm - 150.0))
            ),
            None => println!("{label} not measured (only for a spawned server)"),
        }
    }
}

fn verdict(ok: bool, by: impl FnOnce() -> String) -> String {
    if ok {
        "OK".to_owned()
    } else {
        format!("MISSED by {}", by())
    }
}

fn errors_note(errors: u64) -> String {
    if errors > 0 {
        format!(" ({errors} errors)")
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// The issue's target: at 64 concurrent gets, TLS keeps this share of the plaintext rate.
const TLS_MIN_PCT: f64 = 85.0;

/// The closed-loop get over plaintext, then over TLS after restarting the server with a
/// certificate, on the same data and with the same load; prints both and their ratio.
async fn tls_bench(
    cli: &Cli,
    server: &mut ServerGuard,
    token: &str,
    conns: &[Conn],
    ctx: &Arc<Context>,
    report: &mut Report,
) -> Result<(), BoxError> {
    let warmup = Duration::from_secs_f64(cli.warmup);
    let duration = Duration::from_secs_f64(cli.duration);
    let load = format!("{}c/{}ch", cli.concurrency, cli.channels);
    eprintln!("TLS: get over plaintext, then over TLS on the restarted server ...");
    let plain = closed_loop(Scenario::Get, conns, ctx, cli.concurrency, warmup, duration).await?;
    report.push(Row::new(
        "get/h2c",
        "closed",
        load.clone(),
        &plain,
        cli.duration,
    ));
    server.check_alive()?;

    server.restart_with_tls(cli).await?;
    eprintln!(
        "restarted with TLS (pid {}) at {}",
        server.pid(),
        server.uri
    );
    let tls_conns = connect(
        &server.uri,
        server.tls.as_ref(),
        token,
        &cli.purpose,
        &cli.reason,
        cli.channels,
    )
    .await?;
    let tls = closed_loop(
        Scenario::Get,
        &tls_conns,
        ctx,
        cli.concurrency,
        warmup,
        duration,
    )
    .await?;
    report.push(Row::new("get/tls", "closed", load, &tls, cli.duration));
    server.check_alive()?;
    report.tls = Some((
        report.rows[report.rows.len() - 2].rate,
        report.rows[report.rows.len() - 1].rate,
        plain.errors + tls.errors,
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The spawned server
// ---------------------------------------------------------------------------------------------

/// A `kluis serve` child process with its own data directory. Dropping it kills the server and,
/// unless `keep` is set, removes the directory.
struct ServerGuard {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    uri: String,
    /// How clients reach a server started with TLS (`None`: plaintext).
    tls: Option<ClientTlsConfig>,
    token: String,
    keep: bool,
}

impl ServerGuard {
    async fn spawn(cli: &Cli, run_id: &str) -> Result<Self, BoxError> {
        let dir = std::env::temp_dir().join(format!("kluis-bench-{run_id}"));
        Self::start(cli, dir, None).await
    }

    /// Stops this server and starts it again on the same data, serving TLS with a self-signed
    /// certificate for `localhost` made here (written to the data directory).
    async fn restart_with_tls(&mut self, cli: &Cli) -> Result<(), BoxError> {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let (cert_file, key_file) = (self.dir.join("tls.crt"), self.dir.join("tls.key"));
        std::fs::write(&cert_file, cert.cert.pem())?;
        std::fs::write(&key_file, cert.signing_key.serialize_pem())?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(cert.cert.pem()))
            .domain_name("localhost");
        // The old process goes first (one server per SQLite file); its data directory stays.
        self.keep = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let restarted =
            Self::start(cli, self.dir.clone(), Some((cert_file, key_file, tls))).await?;
        let mut old = std::mem::replace(self, restarted);
        old.keep = true;
        Ok(())
    }

    async fn start(
        cli: &Cli,
        dir: PathBuf,
        tls: Option<(PathBuf, PathBuf, ClientTlsConfig)>,
    ) -> Result<Self, BoxError> {
        let exe = std::env::current_exe()?.with_file_name("kluis");
        if !exe.is_file() {
            return Err(fail(format!(
                "{} not found: build it (cargo build --release --bin kluis) or use --addr",
                exe.display()
            )));
        }
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("server.log");
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let listen = format!("127.0.0.1:{port}");
        let stderr = File::create(&log)?;
        let mut command = Command::new(&exe);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--listen")
            .arg(&listen)
            .env("KLUIS_LOG", "warn")
            // --sweep measures sweeps it starts itself: nothing may be swept before.
            .env(
                "KLUIS_RETENTION_SWEEP_SECONDS",
                if cli.sweep > 0 { "0" } else { "60" },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(url) = &cli.database_url {
            command.arg("--database-url").arg(url);
        }
        if let Some((cert, key, _)) = &tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        let child = command.spawn()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut guard = Self {
            child,
            dir,
            log,
            uri: format!("{scheme}://{listen}"),
            tls: tls.map(|(_, _, client)| client),
            token: String::new(),
            keep: cli.keep_data,
        };
        eprintln!(
            "started {} serve (pid {}) on {listen}, data in {}",
            exe.display(),
            guard.pid(),
            guard.dir.display()
        );
        if let Err(e) = guard.wait_serving().await {
            guard.keep = true;
            return Err(fail(format!(
                "the spawned server did not start: {e}\n{}",
                tail(&guard.log)
            )));
        }
        let token_file = guard.dir.join("operator.token");
        guard.token = match (std::fs::read_to_string(&token_file), &cli.token) {
            (Ok(text), _) => text.trim().to_owned(),
            (Err(_), Some(token)) => token.clone(),
            (Err(e), None) => {
                return Err(fail(format!(
                    "{}: {e} (a database that already has callers needs --token)",
                    token_file.display()
                )));
            }
        };
        Ok(guard)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_serving(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut endpoint = Endpoint::from_shared(self.uri.clone())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Err(fail(format!("it exited with {status}")));
            }
            match endpoint.connect().await {
                Ok(channel) => match HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                    Ok(r) => last = format!("health status {}", r.get_ref().status),
                    Err(s) => last = status_text(s),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(fail(format!(
            "not SERVING after {}s ({last})",
            STARTUP_TIMEOUT.as_secs()
        )))
    }

    /// Fails when the server has exited.
    fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait()? {
            Some(status) => Err(fail(format!(
                "the server exited with {status}\n{}",
                tail(&self.log)
            ))),
            None => Ok(()),
        }
    }
}

impl ServerGuard {
    /// How many warnings and errors the server logged (it runs with `KLUIS_LOG=warn`).
    fn log_summary(&self) -> String {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return format!("server log: cannot read {}", self.log.display());
        };
        let (mut warnings, mut errors, mut first) = (0u64, 0u64, None);
        for line in text.lines() {
            let line = strip_ansi(line);
            if line.contains(" ERROR ") {
                errors += 1;
            } else if line.contains(" WARN ") {
                warnings += 1;
            } else {
                continue;
            }
            first.get_or_insert(line);
        }
        match first {
            None => "server log: no warnings or errors".to_owned(),
            Some(first) => {
                format!("server log: {warnings} warnings, {errors} errors; first: {first}")
            }
        }
    }
}

/// `line` without terminal colour sequences (`ESC [ … letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last lines of the server log, for error messages.
fn tail(log: &Path) -> String {
    let mut text = String::new();
    if File::open(log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_err()
    {
        return format!("(no log at {})", log.display());
    }
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(20);
    format!(
        "last lines of {}:\n{}",
        log.display(),
        lines[from..].join("\n")
    )
}

/// `(VmRSS, VmHWM)` of process `pid` in MB, from `/proc/<pid>/status` (Linux only).
fn proc_memory(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
