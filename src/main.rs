//! The `kluis` command: serve, health, migrate, token. Wiring only; the work is in the library.

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
        #[arg(long, env = "KLUIS_HEALTH_ADDR", default_value = "127.0.0.1:50051")]
        addr: SocketAddr,
    },
    /// Apply pending database migrations and exit.
    Migrate(StorageArgs),
    /// Manage caller tokens directly in the database (works while kluis is not running).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
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
        Command::Health { addr } => match kluis::api::check_health(addr).await {
            Ok(true) => {
                println!("SERVING");
                Ok(ExitCode::SUCCESS)
            }
            Ok(false) => {
                println!("NOT_SERVING");
                Ok(ExitCode::FAILURE)
            }
            Err(e) => Err(format!("{addr}: {e}")),
        },
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
                .map_err(|e: kluis::domain::DomainError| e.to_string())?;
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
