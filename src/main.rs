//! The `kluis` command: serve, health, migrate, token, policy, audit, retention. Wiring only; the
//! work is in the library.

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use kluis::{
    Application, ServeArgs,
    config::StorageArgs,
    domain::{Callers, Role},
    store::Store,
};

/// mimalloc instead of glibc malloc: the server allocates many small buffers per call on every
/// worker thread (see Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kluis",
    version,
    about = "kluis — the personal-data vault (gRPC)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (SQLite in ./kluis-data by default; no configuration needed).
    Serve(ServeArgs),
    /// Ask a running kluis whether it is serving (gRPC health protocol); exit 0 when it is.
    Health {
        /// Default: the address `serve` listens on (`KLUIS_LISTEN`, a wildcard address asked on
        /// loopback), else 127.0.0.1:50051.
        #[arg(long, env = "KLUIS_HEALTH_ADDR")]
        addr: Option<SocketAddr>,
        /// Speak TLS, trusting this PEM CA (a self-signed server certificate is its own CA).
        #[arg(long, env = "KLUIS_HEALTH_CA")]
        ca: Option<std::path::PathBuf>,
        /// The name the server certificate must carry (default `localhost`).
        #[arg(long, env = "KLUIS_HEALTH_TLS_NAME", default_value = "localhost")]
        tls_name: String,
    },
    /// Apply pending database migrations and exit.
    Migrate(StorageArgs),
    /// Manage caller tokens directly in the database (works while kluis is not running).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Check, explain or print the privacy policy file.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Verify the audit trail or print its latest checkpoint (offline, against the database).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Rotate, retire and inspect keys (against the database; a running kluis picks the change up
    /// within its keyring refresh interval and its re-wrap job does the rest).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Purge what lost its last legal basis now (against the database; a running kluis may keep
    /// serving meanwhile).
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Erase every due field path of every due subject (crypto-shredding subjects nothing keeps),
    /// each with its audit event; or with --dry-run only count what would go.
    Sweep {
        #[command(flatten)]
        args: ServeArgs,
        /// Change nothing; print what a sweep would purge.
        #[arg(long)]
        dry_run: bool,
        /// Subjects at most (0: every due subject).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// Subjects per second at most (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new KEK version active; data keys are re-wrapped by the running kluis's background
    /// job, or by `kluis keys rewrap`.
    RotateKek {
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Re-wrap every data key still under an older KEK version now, then exit.
    Rewrap {
        #[command(flatten)]
        args: ServeArgs,
        /// Data keys per second at most (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
    /// Retire a decrypt-only KEK version no data key uses any more, destroying its wrapped key.
    RetireKek {
        #[command(flatten)]
        args: ServeArgs,
        #[arg(long = "kek-version")]
        kek_version: u32,
    },
    /// Make a new blind-index key version active; a running kluis re-indexes every subject under
    /// it in the background (lookups consult both versions meanwhile).
    RotateIndex {
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Retire a blind-index key version no subject's entries use any more, destroying it.
    RetireIndex {
        #[command(flatten)]
        args: ServeArgs,
        #[arg(long = "index-version")]
        index_version: u32,
    },
    /// Rotate the root key: the key source keeps a new version and every key in the database is
    /// re-wrapped under it. Running instances pick it up from the same source when they meet it.
    RotateRoot {
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Retire an old root-key version no key is wrapped under any more, and remove it from the
    /// key source (a read-only source, KLUIS_ROOT_KEY, is left to you).
    RetireRoot {
        #[command(flatten)]
        args: ServeArgs,
        #[arg(long = "root-version")]
        root_version: u32,
    },
    /// Print every key version, the data keys per KEK version and the re-wrap progress; with
    /// --backup-time, the versions a backup taken then depends on.
    Status {
        #[command(flatten)]
        args: ServeArgs,
        /// RFC 3339 time of a backup, e.g. 2026-11-01T02:00:00Z.
        #[arg(long)]
        backup_time: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file as `kluis serve` does at start; errors name file, line and problem.
    Check { file: std::path::PathBuf },
    /// Print the purposes as a reader of the privacy statement would recognise them.
    Explain {
        /// A policy file; default: the shipped policy.
        #[arg(long, env = "KLUIS_POLICY")]
        policy: Option<std::path::PathBuf>,
        /// nl or en.
        #[arg(long, default_value = "nl")]
        lang: String,
    },
    /// Print the shipped policy file (a starting point for your own).
    Show,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the keyed chain and check every checkpoint (database and checkpoint files);
    /// exit 0 when intact, 1 with the first broken position otherwise.
    Verify {
        #[command(flatten)]
        args: ServeArgs,
        /// Further checkpoint files to check (e.g. copies shipped from other instances).
        #[arg(long = "also-checkpoint-file")]
        also: Vec<std::path::PathBuf>,
    },
    /// Print the latest signed checkpoint (JSON) for shipping elsewhere.
    Checkpoint {
        #[command(flatten)]
        args: ServeArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a caller and print its token once.
    Create {
        #[arg(long)]
        caller: String,
        /// hosting-backend, billing, marketing-mailer or operator.
        #[arg(long)]
        role: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Revoke a caller's token.
    Revoke {
        /// The caller id (the part after `kluis_` in its token).
        id: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// List callers (never tokens).
    List {
        #[command(flatten)]
        storage: StorageArgs,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    kluis::telemetry::init();
    match run(Cli::parse().command).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("kluis: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve(args) => {
            let app = Application::build(&args).await.map_err(|e| e.to_string())?;
            app.run_until(shutdown_signal())
                .await
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { addr, ca, tls_name } => {
            let addr = addr.unwrap_or_else(serve_addr);
            let tls = match ca {
                Some(path) => Some((
                    std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                    tls_name,
                )),
                None => None,
            };
            health(addr, tls).await
        }
        Command::Migrate(storage) => {
            std::fs::create_dir_all(&storage.data_dir).map_err(|e| e.to_string())?;
            let store = Store::open(&storage.database_url())
                .await
                .map_err(|e| e.to_string())?;
            store.close().await;
            println!(
                "migrations applied to the {} database",
                store.backend_name()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { command } => token(command).await,
        Command::Policy { command } => policy(command),
        Command::Audit { command } => audit(command).await,
        Command::Retention { command } => retention(command).await,
        Command::Keys { command } => keys(command).await,
    }
}

/// The audit event of a `kluis keys …` command (the operator at the console).
fn cli_draft(method: &str, policy_version: &str) -> kluis::domain::call::Draft {
    kluis::domain::call::Draft::new(kluis::audit::AuditEvent {
        at_us: kluis::domain::now_us(),
        method: format!("cli.keys.{method}"),
        caller: "kluis-cli".to_owned(),
        role: "operator".to_owned(),
        policy_version: policy_version.to_owned(),
        ..kluis::audit::AuditEvent::default()
    })
}

fn format_time(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| us.to_string())
}

async fn keys(command: KeysCommand) -> Result<ExitCode, String> {
    let (args, run) = match command {
        KeysCommand::RotateKek { args } => (args, KeysRun::Rotate),
        KeysCommand::Rewrap { args, rate } => (args, KeysRun::Rewrap(rate)),
        KeysCommand::RetireKek { args, kek_version } => (args, KeysRun::Retire(kek_version)),
        KeysCommand::RotateRoot { args } => (args, KeysRun::RotateRoot),
        KeysCommand::RotateIndex { args } => (args, KeysRun::RotateIndex),
        KeysCommand::RetireIndex {
            args,
            index_version,
        } => (args, KeysRun::RetireIndex(index_version)),
        KeysCommand::RetireRoot { args, root_version } => (args, KeysRun::RetireRoot(root_version)),
        KeysCommand::Status { args, backup_time } => {
            let at = backup_time
                .map(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
                        .map_err(|e| format!("--backup-time {t}: {e}"))
                })
                .transpose()?;
            (args, KeysRun::Status(at))
        }
    };
    let (keys, store) = kluis::app::open_keys(&args)
        .await
        .map_err(|e| e.to_string())?;
    let policy_version = kluis::app::load_policy(&args)
        .map_err(|e| e.to_string())?
        .version()
        .to_owned();
    let result = match run {
        KeysRun::Rotate => {
            let mut draft = cli_draft("rotate-kek", &policy_version);
            keys.rotate_kek(&mut draft)
                .await
                .map(|v| format!("KEK v{v} is active; data keys under older versions are re-wrapped by the running kluis (or `kluis keys rewrap`)"))
        }
        KeysRun::Retire(version) => {
            let mut draft = cli_draft("retire-kek", &policy_version);
            keys.retire_kek(version, &mut draft).await.map(|now| {
                if now {
                    format!("KEK v{version} retired; its wrapped key is destroyed")
                } else {
                    format!("KEK v{version} had been retired before")
                }
            })
        }
        KeysRun::RotateIndex => {
            let mut draft = cli_draft("rotate-index", &policy_version);
            keys.rotate_index_key(&mut draft).await.map(|v| {
                format!(
                    "blind-index key v{v} is active; a running kluis re-indexes every subject under it \
                     (lookups consult the older versions meanwhile)"
                )
            })
        }
        KeysRun::RetireIndex(version) => {
            let mut draft = cli_draft("retire-index", &policy_version);
            keys.retire_index_key(version, &mut draft).await.map(|now| {
                if now {
                    format!("blind-index key v{version} retired; its wrapped key is destroyed")
                } else {
                    format!("blind-index key v{version} had been retired before")
                }
            })
        }
        KeysRun::RotateRoot => {
            let mut draft = cli_draft("rotate-root", &policy_version);
            keys.rotate_root(&mut draft).await.map(|v| {
                format!(
                    "root key v{v} is in the key source and wraps every key; once every instance \
                     can read it, retire the old version with `kluis keys retire-root`"
                )
            })
        }
        KeysRun::RetireRoot(version) => {
            let mut draft = cli_draft("retire-root", &policy_version);
            keys.retire_root(version, &mut draft).await
        }
        KeysRun::Rewrap(rate) => {
            let started = std::time::Instant::now();
            keys.rewrap_all(rate).await.map(|n| {
                let secs = started.elapsed().as_secs_f64();
                format!(
                    "{n} data keys re-wrapped under KEK v{} in {secs:.1} s ({:.0}/s)",
                    keys.keyring().active_kek(),
                    n as f64 / secs.max(1e-9)
                )
            })
        }
        KeysRun::Status(at) => keys.status(at).await.map(|s| {
            let mut out = String::new();
            for r in &s.roots {
                out.push_str(&format!(
                    "root v{}  created {}{}\n",
                    r.version,
                    format_time(r.created_at_us),
                    r.retired_at_us.map(|t| format!("  retired {}", format_time(t))).unwrap_or_default()
                ));
            }
            for k in &s.keys {
                out.push_str(&format!(
                    "{} v{}  {}  under root v{}  created {}{}{}\n",
                    k.kind,
                    k.version,
                    k.state,
                    k.root_version,
                    format_time(k.created_at_us),
                    k.retired_at_us.map(|t| format!("  retired {}", format_time(t))).unwrap_or_default(),
                    k.data_keys
                        .map(|n| format!("  data keys {n}"))
                        .or(k.indexed_subjects.map(|n| format!("  subjects {n}")))
                        .unwrap_or_default()
                ));
            }
            out.push_str(&format!(
                "active KEK v{}; data keys still to re-wrap: {}\nactive blind-index key v{}; subjects still to re-index: {}",
                s.active_kek, s.rewrap_pending, s.active_index, s.reindex_pending
            ));
            if let Some(b) = &s.backup {
                out.push_str(&format!("\nA backup taken at {} depends on:", format_time(b.at_us)));
                for r in &b.roots {
                    out.push_str(&format!("\n  root v{}{}", r.version, if r.retired_at_us.is_some() { " (retired)" } else { "" }));
                }
                for k in &b.keys {
                    out.push_str(&format!("\n  {} v{}{}", k.kind, k.version, if k.retired_at_us.is_some() { " (retired)" } else { "" }));
                }
                out.push_str(if b.unrecoverable {
                    "\nEvery one is retired: subjects erased before then cannot be recovered from it."
                } else {
                    "\nNot every one is retired: subjects erased since then can still be recovered from it."
                });
            }
            out
        }),
    };
    store.close().await;
    println!("{}", result.map_err(|e| e.to_string())?);
    Ok(ExitCode::SUCCESS)
}

enum KeysRun {
    Rotate,
    RotateIndex,
    RetireIndex(u32),
    RotateRoot,
    RetireRoot(u32),
    Retire(u32),
    Rewrap(u32),
    Status(Option<i64>),
}

async fn retention(command: RetentionCommand) -> Result<ExitCode, String> {
    match command {
        RetentionCommand::Sweep {
            args,
            dry_run,
            limit,
            rate,
        } => {
            let (engine, store) = kluis::app::open_retention(&args)
                .await
                .map_err(|e| e.to_string())?;
            let started = std::time::Instant::now();
            let options = kluis::domain::retention::SweepOptions {
                dry_run,
                rate,
                batch: engine.settings().sweep_batch,
                limit,
            };
            let result = engine.sweep(options).await;
            store.close().await;
            let stats = result.map_err(|e| e.to_string())?;
            let verb = if dry_run { "would purge" } else { "purged" };
            println!(
                "{} due subjects visited in {:.1} s: {verb} paths of {}, {} crypto-shredded{}",
                stats.subjects_visited,
                started.elapsed().as_secs_f64(),
                stats.subjects_purged,
                stats.subjects_shredded,
                if dry_run {
                    " (dry run: nothing changed)"
                } else {
                    ""
                }
            );
            for (path, n) in &stats.paths {
                println!("  {path}: {n}");
            }
            if stats.skipped > 0 || stats.failed > 0 {
                println!(
                    "{} subjects changed meanwhile and {} failed (see the log): the next sweep takes them",
                    stats.skipped, stats.failed
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn policy(command: PolicyCommand) -> Result<ExitCode, String> {
    use kluis::policy::{Lang, Policy};
    match command {
        PolicyCommand::Check { file } => {
            let policy = Policy::load(&file).map_err(|e| e.to_string())?;
            println!(
                "{}: valid (policy version {}, {})",
                file.display(),
                policy.version(),
                policy.date()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain { policy, lang } => {
            let lang: Lang = lang
                .parse()
                .map_err(|_| format!("--lang {lang}: expected nl or en"))?;
            let policy = match policy {
                Some(path) => Policy::load(&path),
                None => Policy::shipped(),
            }
            .map_err(|e| e.to_string())?;
            print!("{}", policy.explain(lang));
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Show => {
            print!("{}", kluis::policy::DEFAULT_TOML);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn audit(command: AuditCommand) -> Result<ExitCode, String> {
    match command {
        AuditCommand::Verify { args, also } => {
            let trail = kluis::app::open_audit_trail(&args)
                .await
                .map_err(|e| e.to_string())?;
            let mut files = vec![args.audit_checkpoint_file()];
            files.extend(also);
            for file in files.iter().filter(|f| !f.exists()) {
                println!(
                    "note: checkpoint file {} does not exist: the tail is checked against the \
                     database's checkpoints only",
                    file.display()
                );
            }
            match trail.verify(&files).await.map_err(|e| e.to_string())? {
                Ok(report) => {
                    println!(
                        "audit chain intact: {} events (seq {}..{}), {} checkpoints checked, last checkpoint at seq {}",
                        report.events,
                        report.first_seq.unwrap_or(0),
                        report.last_seq.unwrap_or(0),
                        report.checkpoints_checked,
                        report.last_checkpoint_seq.unwrap_or(0)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(broken) => {
                    let text = broken.to_string();
                    let prefix = format!("audit chain broken at seq {}: ", broken.seq());
                    println!(
                        "audit chain BROKEN at seq {}: {}",
                        broken.seq(),
                        text.strip_prefix(&prefix).unwrap_or(&text)
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::Checkpoint { args } => {
            let trail = kluis::app::open_audit_trail(&args)
                .await
                .map_err(|e| e.to_string())?;
            match trail.latest_checkpoint().await.map_err(|e| e.to_string())? {
                Some(cp) => {
                    println!("{}", serde_json::to_string(&cp).map_err(|e| e.to_string())?);
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    Err("no checkpoint yet (the chain is empty or kluis has not signed one)".into())
                }
            }
        }
    }
}

/// Where `serve` would listen, as a health check reaches it.
fn serve_addr() -> SocketAddr {
    let default = SocketAddr::from(([127, 0, 0, 1], 50051));
    let Some(mut addr) = std::env::var("KLUIS_LISTEN")
        .ok()
        .and_then(|v| v.parse::<SocketAddr>().ok())
    else {
        return default;
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

async fn health(addr: SocketAddr, tls: Option<(Vec<u8>, String)>) -> Result<ExitCode, String> {
    match kluis::api::check_health(addr, tls).await {
        Ok(true) => {
            println!("SERVING");
            Ok(ExitCode::SUCCESS)
        }
        Ok(false) => {
            println!("NOT_SERVING");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(format!("{addr}: {e} (is kluis running there?)")),
    }
}

async fn open(storage: &StorageArgs) -> Result<(Store, Arc<Callers>), String> {
    std::fs::create_dir_all(&storage.data_dir).map_err(|e| e.to_string())?;
    let store = Store::open(&storage.database_url())
        .await
        .map_err(|e| e.to_string())?;
    Ok((store.clone(), Arc::new(Callers::new(store))))
}

async fn token(command: TokenCommand) -> Result<ExitCode, String> {
    match command {
        TokenCommand::Create {
            caller,
            role,
            storage,
        } => {
            let role: Role = role
                .parse()
                .map_err(|e: kluis::policy::UnknownRole| e.to_string())?;
            let (store, callers) = open(&storage).await?;
            let (info, token) = callers
                .create(&caller, role)
                .await
                .map_err(|e| e.to_string())?;
            store.close().await;
            eprintln!(
                "caller {} ({}, role {}) created; the token is shown only now:",
                info.id, info.name, info.role
            );
            println!("{}", token.as_str());
        }
        TokenCommand::Revoke { id, storage } => {
            let (store, callers) = open(&storage).await?;
            let info = callers.revoke(&id).await.map_err(|e| e.to_string())?;
            store.close().await;
            println!("caller {} ({}) revoked", info.id, info.name);
        }
        TokenCommand::List { storage } => {
            let (store, callers) = open(&storage).await?;
            let list = callers.list().await.map_err(|e| e.to_string())?;
            store.close().await;
            println!("{:<18} {:<24} {:<18} revoked", "id", "name", "role");
            for c in list {
                println!(
                    "{:<18} {:<24} {:<18} {}",
                    c.id,
                    c.name,
                    c.role,
                    if c.revoked_at_us.is_some() {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining");
}
