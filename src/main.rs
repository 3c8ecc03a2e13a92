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
        Command::Health { addr } => {
            let addr = addr.unwrap_or_else(serve_addr);
            health(addr).await
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
    }
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

async fn health(addr: SocketAddr) -> Result<ExitCode, String> {
    match kluis::api::check_health(addr).await {
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
