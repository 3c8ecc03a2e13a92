//! Settings: command-line flags with `KLUIS_…` environment fallbacks and safe defaults, resolved
//! once into paths and a database URL.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;

/// Where kluis keeps its data. No `Debug`: the database URL may carry a password.
#[derive(Clone, Args)]
pub struct StorageArgs {
    /// Data directory: SQLite database, root key file and first operator token.
    #[arg(long, env = "KLUIS_DATA_DIR", default_value = "./kluis-data")]
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://USER@HOST/DB`; default `sqlite://<data-dir>/kluis.db`.
    #[arg(long, env = "KLUIS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

impl StorageArgs {
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("kluis.db").display()))
    }
}

/// Settings of `kluis serve`. No `Debug`, as for [`StorageArgs`].
#[derive(Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "KLUIS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Allow plaintext gRPC on an address other than loopback (e.g. behind a TLS-terminating
    /// proxy on a network you trust); logged as a warning. Without it such an address is refused.
    #[arg(long, env = "KLUIS_INSECURE")]
    pub insecure: bool,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this address, apart from the gRPC
    /// port; unset: no metrics. Keep it on loopback or a monitoring network.
    #[arg(long, env = "KLUIS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Root key file; default `<data-dir>/root.key`, created (mode 0600) on first start.
    #[arg(long, env = "KLUIS_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// A file holding the operator passphrase that unseals the sealed root-key file (e.g. a
    /// systemd credential); `KLUIS_ROOT_PASSPHRASE` gives the passphrase itself. Either one makes
    /// the passphrase the key source.
    #[arg(long, env = "KLUIS_ROOT_PASSPHRASE_FILE")]
    pub root_passphrase_file: Option<PathBuf>,
    /// The sealed root-key file the passphrase unseals; default `<data-dir>/root.key.sealed`,
    /// created on first start.
    #[arg(long, env = "KLUIS_SEALED_KEY_FILE")]
    pub sealed_key_file: Option<PathBuf>,
    /// The privacy policy (TOML); default: the shipped policy (`kluis policy show`).
    #[arg(long, env = "KLUIS_POLICY")]
    pub policy: Option<PathBuf>,
    #[command(flatten)]
    pub audit: AuditArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub consent: ConsentArgs,
    #[command(flatten)]
    pub password: PasswordArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// TLS on the gRPC listener (rustls; TLS 1.2 and 1.3), and client certificates (mTLS).
#[derive(Clone, Debug, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first); with `--tls-key` kluis serves TLS only. Re-read on
    /// SIGHUP and when the file changes.
    #[arg(long, env = "KLUIS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate (keep it mode 0600).
    #[arg(long, env = "KLUIS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that sign client certificates: clients may present one (mTLS);
    /// a client certificate that does not chain to it, or has expired, is refused at the handshake.
    #[arg(long, env = "KLUIS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse every handshake without a valid client certificate (with `--tls-client-ca`).
    #[arg(
        long,
        env = "KLUIS_TLS_CLIENT_CERT_REQUIRED",
        requires = "tls_client_ca"
    )]
    pub tls_client_cert_required: bool,
    /// `DNS-NAME=ROLE`: a verified client certificate with this DNS name (subject alternative
    /// name) authenticates a caller with this role when the call has no bearer token. Repeat the
    /// flag, or separate with commas in the environment variable.
    #[arg(
        long = "tls-client-role",
        env = "KLUIS_TLS_CLIENT_ROLES",
        value_delimiter = ',',
        requires = "tls_client_ca"
    )]
    pub tls_client_roles: Vec<String>,
    /// Seconds between checks of the certificate, key and client-CA files for changes (0: reload
    /// on SIGHUP only).
    #[arg(long, env = "KLUIS_TLS_RELOAD_SECONDS", default_value_t = 10)]
    pub tls_reload_seconds: u64,
}

/// How the keyring is kept current across instances and how fast data keys are re-wrapped after
/// a KEK rotation.
#[derive(Clone, Debug, Args)]
pub struct KeyArgs {
    /// Seconds between keyring reloads (versions another instance added); a demoted KEK can be
    /// retired no sooner than this after its successor was made.
    #[arg(
        long = "keyring-refresh-seconds",
        env = "KLUIS_KEYRING_REFRESH_SECONDS",
        default_value_t = 5.0
    )]
    pub refresh_seconds: f64,
    /// Data keys re-wrapped per second at most by the background job after a KEK rotation
    /// (0 switches the job off; `kluis keys rewrap` then does it).
    #[arg(
        long = "kek-rewrap-rate",
        env = "KLUIS_KEK_REWRAP_RATE",
        default_value_t = 20_000
    )]
    pub rewrap_rate: u32,
    /// Data keys per re-wrap transaction.
    #[arg(
        long = "kek-rewrap-batch",
        env = "KLUIS_KEK_REWRAP_BATCH",
        default_value_t = 500
    )]
    pub rewrap_batch: u32,
}

impl Default for KeyArgs {
    fn default() -> Self {
        Self {
            refresh_seconds: 5.0,
            rewrap_rate: 20_000,
            rewrap_batch: 500,
        }
    }
}

/// How customers' portal passwords are hashed and attempts throttled.
#[derive(Clone, Debug, Args)]
pub struct PasswordArgs {
    /// Argon2id memory in KiB (at least OWASP's recommendation: 19456 with 2 passes).
    #[arg(
        long = "password-memory-kib",
        env = "KLUIS_PASSWORD_MEMORY_KIB",
        default_value_t = 19456
    )]
    pub memory_kib: u32,
    /// Argon2id passes.
    #[arg(
        long = "password-passes",
        env = "KLUIS_PASSWORD_PASSES",
        default_value_t = 2
    )]
    pub passes: u32,
    /// Argon2id lanes.
    #[arg(
        long = "password-lanes",
        env = "KLUIS_PASSWORD_LANES",
        default_value_t = 1
    )]
    pub lanes: u32,
    /// Password hashes computed at once at most (each holds the memory above).
    #[arg(
        long = "password-concurrency",
        env = "KLUIS_PASSWORD_CONCURRENCY",
        default_value_t = 2
    )]
    pub concurrency: usize,
    /// Failed attempts per username, and per address, before further attempts wait out the window.
    #[arg(
        long = "password-max-failures",
        env = "KLUIS_PASSWORD_MAX_FAILURES",
        default_value_t = 5
    )]
    pub max_failures: u32,
    /// The throttling window in seconds.
    #[arg(
        long = "password-failure-window-seconds",
        env = "KLUIS_PASSWORD_FAILURE_WINDOW_SECONDS",
        default_value_t = 300
    )]
    pub failure_window_seconds: u64,
}

impl Default for PasswordArgs {
    fn default() -> Self {
        Self {
            memory_kib: 19456,
            passes: 2,
            lanes: 1,
            concurrency: 2,
            max_failures: 5,
            failure_window_seconds: 300,
        }
    }
}

/// Settings of the consent service.
#[derive(Clone, Debug, Args)]
pub struct ConsentArgs {
    /// Days an unsubscribe token from a marketing mail stays redeemable; older tokens are pruned
    /// daily (the subject can still object through the account, the portal or an operator).
    #[arg(
        long = "unsubscribe-token-days",
        env = "KLUIS_UNSUBSCRIBE_TOKEN_DAYS",
        default_value_t = 400
    )]
    pub unsubscribe_token_days: u32,
}

impl Default for ConsentArgs {
    fn default() -> Self {
        Self {
            unsubscribe_token_days: 400,
        }
    }
}

/// Settings of the retention engine.
#[derive(Clone, Debug, Args)]
pub struct RetentionArgs {
    /// The background sweeper looks for due paths at least this often (and as soon as one falls
    /// due); 0 switches it off (then run `kluis retention sweep` from a timer).
    #[arg(
        long = "retention-sweep-seconds",
        env = "KLUIS_RETENTION_SWEEP_SECONDS",
        default_value_t = 60
    )]
    pub sweep_seconds: u64,
    /// Subjects per second the background sweeper purges at most (0: no limit).
    #[arg(
        long = "retention-sweep-rate",
        env = "KLUIS_RETENTION_SWEEP_RATE",
        default_value_t = 2500
    )]
    pub sweep_rate: u32,
    /// Subjects per sweep batch (committed together).
    #[arg(
        long = "retention-sweep-batch",
        env = "KLUIS_RETENTION_SWEEP_BATCH",
        default_value_t = 250
    )]
    pub sweep_batch: u32,
    /// How far in the future a close event's time may lie (clock skew between systems).
    #[arg(
        long = "retention-close-tolerance-seconds",
        env = "KLUIS_RETENTION_CLOSE_TOLERANCE_SECONDS",
        default_value_t = 300
    )]
    pub close_tolerance_seconds: u64,
}

impl Default for RetentionArgs {
    fn default() -> Self {
        Self {
            sweep_seconds: 60,
            sweep_rate: 2500,
            sweep_batch: 250,
            close_tolerance_seconds: 300,
        }
    }
}

/// Limits that keep one client from taking the service down.
#[derive(Clone, Debug, Args)]
pub struct LimitArgs {
    /// Deadline of a call that brings none (`grpc-timeout`), and the most any call gets.
    #[arg(
        long = "request-timeout-seconds",
        env = "KLUIS_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub request_timeout_seconds: u64,
    /// Calls served at once over all connections; more wait for a free slot, holding less memory
    /// than a call being served (README, Benchmark: the server's peak under overload).
    #[arg(
        long = "max-concurrent-requests",
        env = "KLUIS_MAX_CONCURRENT_REQUESTS",
        default_value_t = 256
    )]
    pub max_concurrent_requests: usize,
    /// Failed authentications from one client address within the failure window
    /// (`--auth-failure-window-seconds`) after which its calls are refused with
    /// `RESOURCE_EXHAUSTED` until the window ends (0: no limit). Successful calls never count.
    #[arg(
        long = "auth-failure-limit",
        env = "KLUIS_AUTH_FAILURE_LIMIT",
        default_value_t = 20
    )]
    pub auth_failure_limit: u32,
    /// A proxy or load balancer (IP address or CIDR) whose `x-forwarded-for` entries are
    /// believed: behind it, the client address is the last entry not itself a trusted proxy.
    /// Repeat the flag, or separate with commas in the environment variable.
    #[arg(
        long = "trusted-proxy",
        env = "KLUIS_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
}

impl Default for LimitArgs {
    fn default() -> Self {
        Self {
            request_timeout_seconds: 30,
            max_concurrent_requests: 256,
            auth_failure_limit: 20,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Settings of the audit trail.
#[derive(Clone, Debug, Args)]
pub struct AuditArgs {
    /// Append-only file that receives every signed checkpoint outside the database; default
    /// `<data-dir>/audit-checkpoints.jsonl`. Ship it elsewhere (or point it at another disk).
    #[arg(long = "audit-checkpoint-file", env = "KLUIS_AUDIT_CHECKPOINT_FILE")]
    pub checkpoint_file: Option<PathBuf>,
    /// A checkpoint after this many events…
    #[arg(
        long = "audit-checkpoint-events",
        env = "KLUIS_AUDIT_CHECKPOINT_EVENTS",
        default_value_t = 10_000
    )]
    pub checkpoint_events: u64,
    /// …or after this many seconds with new events: at most this long are events unprotected by
    /// an outside checkpoint.
    #[arg(
        long = "audit-checkpoint-seconds",
        env = "KLUIS_AUDIT_CHECKPOINT_SECONDS",
        default_value_t = 10
    )]
    pub checkpoint_seconds: u64,
    /// Audit events older than this many days are pruned (up to a checkpoint); default 7 years.
    #[arg(
        long = "audit-retention-days",
        env = "KLUIS_AUDIT_RETENTION_DAYS",
        default_value_t = 2557
    )]
    pub retention_days: u32,
    /// Failed authentications from one address are recorded once at first, then counted and
    /// recorded once per this many seconds.
    #[arg(
        long = "auth-failure-window-seconds",
        env = "KLUIS_AUTH_FAILURE_WINDOW_SECONDS",
        default_value_t = 60
    )]
    pub auth_failure_window_seconds: u64,
}

impl Default for AuditArgs {
    fn default() -> Self {
        Self {
            checkpoint_file: None,
            checkpoint_events: 10_000,
            checkpoint_seconds: 10,
            retention_days: 2557,
            auth_failure_window_seconds: 60,
        }
    }
}

impl ServeArgs {
    /// Settings for tests and embedding: listen on `listen`, keep everything in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, database_url: Option<String>) -> Self {
        Self {
            listen,
            insecure: false,
            metrics_listen: None,
            tls: TlsArgs::default(),
            limits: LimitArgs::default(),
            storage: StorageArgs {
                data_dir,
                database_url,
            },
            key_file: None,
            root_passphrase_file: None,
            sealed_key_file: None,
            policy: None,
            audit: AuditArgs::default(),
            retention: RetentionArgs::default(),
            consent: ConsentArgs::default(),
            password: PasswordArgs::default(),
            keys: KeyArgs::default(),
        }
    }

    pub fn key_file(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.storage.data_dir.join("root.key"))
    }

    pub fn sealed_key_file(&self) -> PathBuf {
        self.sealed_key_file
            .clone()
            .unwrap_or_else(|| self.storage.data_dir.join("root.key.sealed"))
    }

    pub fn audit_checkpoint_file(&self) -> PathBuf {
        self.audit
            .checkpoint_file
            .clone()
            .unwrap_or_else(|| self.storage.data_dir.join("audit-checkpoints.jsonl"))
    }

    pub fn operator_token_file(&self) -> PathBuf {
        self.storage.data_dir.join("operator.token")
    }
}
