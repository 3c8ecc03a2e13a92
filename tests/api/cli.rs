//! The `kluis` binary itself: offline token management, migrate, health, SIGTERM.

use std::{
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kluis::api::pb;
use tonic::Code;

use crate::helpers::{TestDb, postgres_mode, spawn_on};

fn kluis(db: &TestDb) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kluis"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KLUIS_DATA_DIR", db.data_dir())
        .env("KLUIS_LOG", "warn");
    if postgres_mode() {
        cmd.env("KLUIS_DATABASE_URL", &db.url);
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_works_offline_and_the_token_is_accepted_by_the_server() {
    let db = TestDb::new().await;
    let migrate = kluis(&db).arg("migrate").output().unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let out = kluis(&db)
        .args([
            "token",
            "create",
            "--caller",
            "billing-svc",
            "--role",
            "billing",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("kluis_"));
    let bad_role = kluis(&db)
        .args(["token", "create", "--caller", "x", "--role", "root"])
        .output()
        .unwrap();
    assert!(!bad_role.status.success());

    // The database already has a caller, so the first start creates no operator token file.
    let app = spawn_on_without_operator(db.clone()).await;
    let mut client = app.subjects_under(Some(&token), Some("account"), None);
    let err = client
        .get_subject(pb::GetSubjectRequest {
            id: uuid::Uuid::new_v4().to_string(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "authenticated, subject unknown");
    let list = kluis(&db).args(["token", "list"]).output().unwrap();
    let listing = String::from_utf8(list.stdout).unwrap();
    assert!(
        listing.contains("billing-svc") && !listing.contains(&token[20..]),
        "{listing}"
    );
    let id = token.split('_').nth(1).unwrap();
    assert!(
        kluis(&db)
            .args(["token", "revoke", id])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await; // the documented cache window
    let err = client
        .get_subject(pb::GetSubjectRequest {
            id: uuid::Uuid::new_v4().to_string(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// Like `spawn_on`, for a database whose callers were made offline (no operator.token file).
async fn spawn_on_without_operator(db: std::sync::Arc<TestDb>) -> crate::helpers::TestApp {
    std::fs::write(db.data_dir().join("operator.token"), "none").unwrap();
    spawn_on(db).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_without_configuration_answers_health_and_stops_on_sigterm() {
    let db = TestDb::new().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut child = kluis(&db)
        .args(["serve", "--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let health = kluis(&db)
            .args(["health", "--addr", &addr])
            .output()
            .unwrap();
        if health.status.success() {
            assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "kluis did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for file in ["root.key", "operator.token"] {
        let mode = std::fs::metadata(db.data_dir().join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    if !postgres_mode() {
        let mode = std::fs::metadata(db.data_dir().join("kluis.db"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "kluis.db");
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kluis did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "exit {status:?}: {log}");
    let token = std::fs::read_to_string(db.data_dir().join("operator.token")).unwrap();
    assert!(!log.contains(token.trim()), "the token reached the log");
    let health = kluis(&db)
        .args(["health", "--addr", &addr])
        .output()
        .unwrap();
    assert!(
        !health.status.success(),
        "health fails once the server is gone"
    );
}
