//! Start-up and wiring: open the store, unlock the keyring, bootstrap the first operator, bind the
//! listener. `Application::build` binds its own listener and exposes the port, so tests use port 0.

use std::{fs, future::Future, net::SocketAddr, os::unix::fs::DirBuilderExt, sync::Arc};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, task::JoinHandle};
use zeroize::Zeroizing;

use crate::{
    api::{
        self,
        tls::{Tls, TlsSettings},
    },
    audit::{AuditTrail, CheckpointSettings},
    clock::Clock,
    config::ServeArgs,
    crypto::{RootKey, RootKeys},
    domain::{
        Callers, Retention, RetentionSettings, Vault,
        consent::Consent,
        credentials::{Credentials, PasswordSettings},
        disclosure::Disclosures,
        keys::{KeySettings, KeyringError, Keys, open_audit_keys, open_keyring, open_rights_keys},
        rights::Rights,
    },
    keysource::{EnvKey, KeyFile, KeySource, KeySourceError, PASSPHRASE_PARAMS, Passphrase},
    policy::{Policy, PolicyErrors},
    store::{Store, StoreError},
};

/// Why kluis could not start. Messages name files and settings, never key material.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("policy file:\n{0}")]
    Policy(#[from] PolicyErrors),
    #[error("root key: {0}")]
    RootKey(String),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error("settings: {0}")]
    Config(String),
    #[error("first operator token: {0}")]
    Bootstrap(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] api::ServeError),
}

/// A built, not yet serving, kluis instance.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    limits: api::Limits,
    /// The `/metrics` listener, the recorder it renders and the gauges read at each scrape.
    metrics: Option<(TcpListener, PrometheusHandle, api::metrics::OnScrape)>,
    tls: Option<Arc<Tls>>,
    store: Store,
    services: api::Services,
    calls: api::Calls,
    failures: Arc<api::FailedAuthentications>,
    /// The background jobs (checkpoints, audit index and pruning, key jobs, re-index, sweeper,
    /// token pruning), stopped when serving ends.
    background: Vec<JoinHandle<()>>,
}

impl Application {
    pub async fn build(args: &ServeArgs) -> Result<Self, StartupError> {
        Self::build_with_clock(args, Clock::system()).await
    }

    /// Builds with a given clock (tests pass an adjustable one to jump years ahead).
    pub async fn build_with_clock(args: &ServeArgs, clock: Clock) -> Result<Self, StartupError> {
        check_plaintext(args)?;
        // Bad TLS files stop start-up before the database is touched.
        let tls = tls_settings(args)?
            .map(Tls::load)
            .transpose()
            .map_err(|e| StartupError::Config(format!("TLS: {e}")))?;
        // The recorder before anything records; its listener once the services exist.
        let recorder = args
            .metrics_listen
            .map(|_| api::metrics::recorder())
            .transpose()
            .map_err(|e| StartupError::Config(format!("metrics: {e}")))?;
        let data_dir = &args.storage.data_dir;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|source| StartupError::DataDir {
                path: data_dir.display().to_string(),
                source,
            })?;
        // A wrong policy file stops start-up before anything else is touched.
        let policy = Arc::new(load_policy(args)?);
        let store = Store::open(&args.storage.database_url()).await?;
        let (roots, source) = load_root_keys(args, &store).await?;
        // The root keys stay in memory (zeroized on drop) inside the keys, to load the versions
        // a rotation adds; they are never written anywhere but their source.
        let keys = Keys::open(
            store.clone(),
            roots.clone(),
            Some(source),
            key_settings(args)?,
            policy.version().to_owned(),
        )
        .await?;
        let audit_keys = open_audit_keys(&store, &roots).await?;
        let rights_keys = open_rights_keys(&store, &roots).await?;
        drop(roots);
        let trail = AuditTrail::new(
            store.clone(),
            audit_keys.chain,
            &audit_keys.checkpoint_seed,
            policy.version().to_owned(),
            checkpoint_settings(args),
        );
        let mut background = vec![trail.spawn_checkpointer()];
        // After the trail: the re-wrap job's events need the chain key.
        background.extend(keys.spawn_jobs());
        background.push(trail.spawn_indexer(std::time::Duration::from_millis(500)));
        background.push(spawn_audit_pruning(
            trail.clone(),
            args.audit.retention_days,
        ));
        tracing::info!(
            version = policy.version(),
            date = policy.date(),
            "policy in force"
        );

        let callers = Arc::new(Callers::new(store.clone()));
        let token_file = args.operator_token_file();
        let created = callers
            .bootstrap_operator(|token| {
                crate::keysource::write_private_atomically(
                    &token_file,
                    format!("{token}\n").as_bytes(),
                )
            })
            .await
            .map_err(|e| StartupError::Bootstrap(format!("{}: {e}", token_file.display())))?;
        if created {
            tracing::info!(path = %token_file.display(), "first operator token written (mode 0600)");
        }

        let vault = Arc::new(Vault::new(
            store.clone(),
            keys.clone(),
            policy.clone(),
            clock.clone(),
        ));
        background.extend(vault.spawn_reindexer());
        let retention = Arc::new(Retention::new(
            store.clone(),
            policy.clone(),
            clock.clone(),
            trail.clone(),
            retention_settings(args),
        ));
        background.extend(retention.spawn_sweeper());
        let consent = Arc::new(Consent::new(
            vault.clone(),
            rights_keys.token_mac,
            std::time::Duration::from_secs(u64::from(args.consent.unsubscribe_token_days) * 86_400),
        ));
        background.push(consent.spawn_token_pruning());
        let rights = Arc::new(Rights::new(
            vault.clone(),
            retention.clone(),
            consent.clone(),
            trail.clone(),
            crate::audit::signing_key_from_seed(&rights_keys.receipt_seed),
        ));
        let disclosures = Arc::new(Disclosures::new(vault.clone()));
        let credentials = Arc::new(
            Credentials::new(vault.clone(), password_settings(args)?)
                .map_err(|e| StartupError::Config(format!("password hashing: {e}")))?,
        );
        let proxies = api::client_addr::TrustedProxies::parse(&args.limits.trusted_proxies)
            .map_err(StartupError::Config)?;
        let failures = api::FailedAuthentications::new(
            trail.clone(),
            std::time::Duration::from_secs(args.audit.auth_failure_window_seconds.max(1)),
            args.limits.auth_failure_limit,
            proxies,
        );
        let calls = api::Calls {
            policy,
            trail,
            clock,
        };
        let listener =
            TcpListener::bind(args.listen)
                .await
                .map_err(|source| StartupError::Listen {
                    addr: args.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartupError::Listen {
                addr: args.listen,
                source,
            })?;
        let metrics = match (args.metrics_listen, recorder) {
            (Some(addr), Some(handle)) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::Listen { addr, source })?;
                let scrape_store = store.clone();
                let scrape_keys = keys.clone();
                let on_scrape: api::metrics::OnScrape = Arc::new(move || {
                    api::metrics::record_pool_use(&scrape_store);
                    metrics::gauge!("kluis_keys_active_kek_version")
                        .set(f64::from(scrape_keys.keyring().active_kek()));
                });
                Some((listener, handle, on_scrape))
            }
            _ => None,
        };
        Ok(Self {
            listener,
            local_addr,
            limits: api::Limits {
                request_timeout: std::time::Duration::from_secs(
                    args.limits.request_timeout_seconds.max(1),
                ),
                max_concurrent_requests: args.limits.max_concurrent_requests,
            },
            metrics,
            tls,
            store,
            services: api::Services {
                vault,
                retention,
                consent,
                rights,
                disclosures,
                credentials,
                callers,
                keys,
            },
            calls,
            failures,
            background,
        })
    }

    /// The retention engine of this instance.
    pub fn retention(&self) -> &Arc<Retention> {
        &self.services.retention
    }

    /// The consent service of this instance (tests prune its tokens).
    pub fn consent(&self) -> &Arc<Consent> {
        &self.services.consent
    }

    /// The keys of this instance (tests drive the re-wrap job step by step).
    pub fn keys(&self) -> &Arc<Keys> {
        &self.services.keys
    }

    /// The audit trail of this instance.
    pub fn audit_trail(&self) -> &Arc<AuditTrail> {
        &self.calls.trail
    }

    /// The address actually bound (the port is known even when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The address of the `/metrics` listener, when metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|(listener, _, _)| listener.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then lets in-flight calls finish and commits queued writes.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        tracing::info!(addr = %self.local_addr, backend = self.store.backend_name(), tls = self.tls.is_some(), "kluis serving");
        let failures = self.failures.clone();
        let trail = self.calls.trail.clone();
        let metrics = self.metrics.map(|(listener, handle, on_scrape)| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics served at /metrics");
            }
            tokio::spawn(api::metrics::serve(listener, handle, on_scrape))
        });
        let result = api::serve(
            self.listener,
            self.services,
            self.calls,
            self.failures,
            self.tls,
            self.limits,
            shutdown,
        )
        .await;
        if let Some(task) = metrics {
            task.abort();
        }
        // The background jobs stop before the store closes: none of them is left running
        // against closed pools, and the database's files are closed with the store. A job cut off
        // mid-way is one the process ending would cut off too; each resumes at the next start.
        for task in &self.background {
            task.abort();
        }
        for task in self.background {
            let _ = task.await;
        }
        // The failures counted in the current window, every queued write committed, and a last
        // checkpoint of the head they leave.
        failures.flush().await;
        self.store.finish_writes().await;
        if let Err(e) = trail.checkpoint().await {
            tracing::warn!(error = %e, "final audit checkpoint failed");
        }
        self.store.close().await;
        tracing::info!("kluis stopped");
        Ok(result?)
    }
}

/// The retention engine on the database in `args`, for `kluis retention sweep` (no server, no
/// background tasks); with its store, to close once done.
pub async fn open_retention(args: &ServeArgs) -> Result<(Arc<Retention>, Store), StartupError> {
    let policy = Arc::new(load_policy(args)?);
    let store = Store::open(&args.storage.database_url()).await?;
    let trail = open_audit_trail_on(args, store.clone()).await?;
    let retention = Arc::new(Retention::new(
        store.clone(),
        policy,
        Clock::system(),
        trail,
        retention_settings(args),
    ));
    Ok((retention, store))
}

/// The keys of the database in `args`, for `kluis keys …` (no server, no background jobs), with
/// the audit chain linked so rotations are audited; with the store, to close once done.
pub async fn open_keys(args: &ServeArgs) -> Result<(Arc<Keys>, Store), StartupError> {
    let store = Store::open(&args.storage.database_url()).await?;
    // The root keys are loaded once (a passphrase source runs Argon2id per version).
    let (roots, source) = load_root_keys(args, &store).await?;
    let trail = audit_trail_with(args, store.clone(), &roots).await?;
    let keys = Keys::open(
        store.clone(),
        roots,
        Some(source),
        key_settings(args)?,
        trail.policy_version().to_owned(),
    )
    .await?;
    Ok((keys, store))
}

/// The audit trail of the database in `args`, for offline verification (no server, no tasks).
pub async fn open_audit_trail(args: &ServeArgs) -> Result<Arc<AuditTrail>, StartupError> {
    let store = Store::open(&args.storage.database_url()).await?;
    open_audit_trail_on(args, store).await
}

async fn open_audit_trail_on(
    args: &ServeArgs,
    store: Store,
) -> Result<Arc<AuditTrail>, StartupError> {
    let (roots, _) = load_root_keys(args, &store).await?;
    audit_trail_with(args, store, &roots).await
}

/// The audit trail with root keys already loaded (checked against the database here).
async fn audit_trail_with(
    args: &ServeArgs,
    store: Store,
    roots: &RootKeys,
) -> Result<Arc<AuditTrail>, StartupError> {
    let policy = load_policy(args)?;
    open_keyring(&store, roots).await?;
    let keys = open_audit_keys(&store, roots).await?;
    Ok(AuditTrail::new(
        store,
        keys.chain,
        &keys.checkpoint_seed,
        policy.version().to_owned(),
        checkpoint_settings(args),
    ))
}

/// Plaintext gRPC leaves the host only when the operator says so (`--insecure`), with a warning:
/// the privacy statement promises secured connections.
fn check_plaintext(args: &ServeArgs) -> Result<(), StartupError> {
    if args.listen.ip().is_loopback() || args.tls.tls_cert.is_some() {
        return Ok(());
    }
    if !args.insecure {
        return Err(StartupError::Config(format!(
            "--listen {} is not a loopback address and kluis serves plaintext gRPC: put a \
             TLS-terminating proxy in front and pass --insecure (KLUIS_INSECURE=true) to accept \
             that, or listen on 127.0.0.1",
            args.listen
        )));
    }
    tracing::warn!(addr = %args.listen, "serving plaintext gRPC on a non-loopback address (--insecure): only behind a TLS-terminating proxy on a trusted network");
    if args.limits.trusted_proxies.is_empty() && args.limits.auth_failure_limit > 0 {
        tracing::warn!(
            "no --trusted-proxy: behind a proxy every client shares its address, so one client's \
             failed authentications (--auth-failure-limit) lock out all of them; list the proxy"
        );
    }
    Ok(())
}

/// The TLS settings, if a certificate is configured; `DNS-NAME=ROLE` mappings are checked here.
pub fn tls_settings(args: &ServeArgs) -> Result<Option<TlsSettings>, StartupError> {
    let t = &args.tls;
    let (Some(cert), Some(key)) = (&t.tls_cert, &t.tls_key) else {
        return Ok(None);
    };
    let mut client_roles = std::collections::HashMap::new();
    for mapping in &t.tls_client_roles {
        let bad = || {
            StartupError::Config(format!(
                "--tls-client-role {mapping:?}: expected DNS-NAME=ROLE with ROLE one of {}",
                crate::policy::Role::ALL.map(|r| r.as_str()).join(", ")
            ))
        };
        let (name, role) = mapping.split_once('=').ok_or_else(bad)?;
        let role: crate::policy::Role = role.trim().parse().map_err(|_| bad())?;
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || client_roles.insert(name.clone(), role).is_some() {
            return Err(StartupError::Config(format!(
                "--tls-client-role {mapping:?}: empty or repeated DNS name"
            )));
        }
    }
    Ok(Some(TlsSettings {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: t.tls_client_ca.clone(),
        client_cert_required: t.tls_client_cert_required,
        client_roles,
        poll: (t.tls_reload_seconds > 0)
            .then(|| std::time::Duration::from_secs(t.tls_reload_seconds)),
    }))
}

/// Keyring reloads and the re-wrap job's pace from the configuration.
pub fn key_settings(args: &ServeArgs) -> Result<KeySettings, StartupError> {
    let k = &args.keys;
    if !(k.refresh_seconds.is_finite() && k.refresh_seconds > 0.0 && k.refresh_seconds <= 3600.0) {
        return Err(StartupError::Config(
            "--keyring-refresh-seconds must be more than 0 and at most 3600".into(),
        ));
    }
    Ok(KeySettings {
        refresh: std::time::Duration::from_secs_f64(k.refresh_seconds),
        rewrap_rate: k.rewrap_rate,
        rewrap_batch: k.rewrap_batch.clamp(1, 10_000),
    })
}

/// The retention engine's settings from the configuration.
/// Password hashing and throttling settings; parameters below OWASP's Argon2id recommendation
/// stop start-up.
pub fn password_settings(args: &ServeArgs) -> Result<PasswordSettings, StartupError> {
    let p = &args.password;
    let params = crate::crypto::PasswordParams {
        m_kib: p.memory_kib,
        t: p.passes,
        p: p.lanes,
    };
    if !params.meets_owasp() || p.lanes == 0 {
        return Err(StartupError::Config(format!(
            "--password-memory-kib {} with --password-passes {} is below OWASP's Argon2id minimum \
             (19456 KiB with 2 passes, or at least 7168 KiB with memory × passes ≥ 38912)",
            p.memory_kib, p.passes
        )));
    }
    Ok(PasswordSettings {
        params,
        concurrency: p.concurrency.max(1),
        max_failures: p.max_failures.max(1),
        window: std::time::Duration::from_secs(p.failure_window_seconds.max(1)),
    })
}

pub fn retention_settings(args: &ServeArgs) -> RetentionSettings {
    let r = &args.retention;
    RetentionSettings {
        close_tolerance: std::time::Duration::from_secs(r.close_tolerance_seconds),
        sweep_interval: (r.sweep_seconds > 0)
            .then(|| std::time::Duration::from_secs(r.sweep_seconds)),
        sweep_rate: r.sweep_rate,
        sweep_batch: r.sweep_batch.max(1),
    }
}

/// When the audit trail signs checkpoints, and the file outside the database that receives them.
fn checkpoint_settings(args: &ServeArgs) -> CheckpointSettings {
    CheckpointSettings {
        file: Some(args.audit_checkpoint_file()),
        every_events: args.audit.checkpoint_events.max(1),
        every: std::time::Duration::from_secs(args.audit.checkpoint_seconds.max(1)),
    }
}

/// The policy file named in the settings, else the shipped one; either is validated whole.
pub fn load_policy(args: &ServeArgs) -> Result<Policy, PolicyErrors> {
    match &args.policy {
        Some(path) => Policy::load(path),
        None => Policy::shipped(),
    }
}

/// Prunes audit events older than the retention once a day (and once shortly after start).
fn spawn_audit_pruning(trail: Arc<AuditTrail>, retention_days: u32) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(24 * 3600));
        loop {
            tick.tick().await;
            let cutoff = crate::domain::now_us() - i64::from(retention_days) * 86_400_000_000;
            match trail.prune(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, retention_days, "old audit events pruned"),
                Err(e) => tracing::warn!(error = %e, "audit pruning failed"),
            }
        }
    })
}

/// The key source the settings name: an operator passphrase (`KLUIS_ROOT_PASSPHRASE`, or the file
/// `--root-passphrase-file` names) unsealing the sealed key file; else `KLUIS_ROOT_KEY`; else the
/// key file.
pub fn key_source(args: &ServeArgs) -> Result<Arc<dyn KeySource>, StartupError> {
    let passphrase = match (
        std::env::var("KLUIS_ROOT_PASSPHRASE"),
        &args.root_passphrase_file,
    ) {
        (Ok(p), _) => Some(Zeroizing::new(p.into_bytes())),
        (Err(_), Some(path)) => {
            let mut text = Zeroizing::new(
                fs::read(path)
                    .map_err(|e| StartupError::RootKey(format!("{}: {e}", path.display())))?,
            );
            // A trailing newline (echo, editors) is not part of the passphrase.
            while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                text.pop();
            }
            Some(text)
        }
        (Err(_), None) => None,
    };
    if let Some(passphrase) = passphrase {
        let source = Passphrase::new(args.sealed_key_file(), passphrase, PASSPHRASE_PARAMS)
            .map_err(|e| StartupError::RootKey(e.to_string()))?;
        return Ok(Arc::new(source));
    }
    if let Ok(text) = std::env::var("KLUIS_ROOT_KEY") {
        return Ok(Arc::new(EnvKey::new(
            "KLUIS_ROOT_KEY",
            Zeroizing::new(text),
        )));
    }
    Ok(Arc::new(KeyFile::new(args.key_file())))
}

/// The root keys from the configured source. On a fresh database a source without a key gets a
/// new version-1 key; a database that already has a key-check value but whose source holds no key
/// is refused instead of being given a new key.
pub async fn load_root_keys(
    args: &ServeArgs,
    store: &Store,
) -> Result<(RootKeys, Arc<dyn KeySource>), StartupError> {
    let source = key_source(args)?;
    let root_error = |e: KeySourceError| StartupError::RootKey(e.to_string());
    if source.is_empty().map_err(root_error)? {
        if store.has_key_checks().await? {
            return Err(StartupError::RootKey(format!(
                "the {} does not exist, but this database was set up with a root key: restore it \
                 or set KLUIS_ROOT_KEY (a new key could not read the existing data)",
                source.describe()
            )));
        }
        let root = RootKey::generate().map_err(|e| StartupError::RootKey(e.to_string()))?;
        source.add(&root).map_err(root_error)?;
        tracing::info!(source = %source.describe(), "new root key written (owner-only); back it up apart from the database");
    }
    let keys = source.load().map_err(root_error)?;
    tracing::info!(source = %source.describe(), versions = keys.len(), "root key loaded");
    Ok((RootKeys::new(keys), source))
}
