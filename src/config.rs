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
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Root key file; default `<data-dir>/root.key`, created (mode 0600) on first start.
    #[arg(long, env = "KLUIS_KEY_FILE")]
    pub key_file: Option<PathBuf>,
}

impl ServeArgs {
    /// Settings for tests and embedding: listen on `listen`, keep everything in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, database_url: Option<String>) -> Self {
        Self {
            listen,
            storage: StorageArgs {
                data_dir,
                database_url,
            },
            key_file: None,
        }
    }

    pub fn key_file(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.storage.data_dir.join("root.key"))
    }

    pub fn operator_token_file(&self) -> PathBuf {
        self.storage.data_dir.join("operator.token")
    }
}
