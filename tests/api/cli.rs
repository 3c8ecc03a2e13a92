//! The `kluis` binary itself: offline token management, migrate, health, SIGTERM.

use std::{
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kluis::api::pb;
use tonic::Code;

use crate::helpers::{TestDb, postgres_mode, spawn_on};

pub fn kluis(db: &TestDb) -> Command {
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
    let mut private = vec!["root.key", "operator.token"];
    if !postgres_mode() {
        private.extend(["kluis.db", "kluis.db.audit-index"]);
    }
    for file in private {
        let mode = std::fs::metadata(db.data_dir().join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_check_names_file_line_and_problem_and_explain_reads_like_the_statement() {
    let db = TestDb::new().await;
    let good = db.data_dir().join("good.toml");
    std::fs::write(&good, kluis::policy::DEFAULT_TOML).unwrap();
    let ok = kluis(&db)
        .args(["policy", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid (policy version 2019-08.1"));

    // A role granting a purpose the file does not define: the error names file and line.
    let bad_text = kluis::policy::DEFAULT_TOML.replacen(
        "[roles.marketing-mailer.grants.marketing]",
        "[roles.marketing-mailer.grants.sales]",
        1,
    );
    assert_ne!(
        bad_text,
        kluis::policy::DEFAULT_TOML,
        "fixture edit applied"
    );
    let line = bad_text
        .lines()
        .position(|l| l.contains("grants.sales"))
        .unwrap()
        + 1;
    let bad = db.data_dir().join("bad.toml");
    std::fs::write(&bad, &bad_text).unwrap();
    let out = kluis(&db)
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:{line}:", bad.display())) && err.contains("sales"),
        "{err}"
    );

    // `serve` refuses to start with it, with the same message.
    let serve = kluis(&db)
        .args(["serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!serve.status.success());
    assert!(
        String::from_utf8_lossy(&serve.stderr).contains(&format!("{}:{line}:", bad.display())),
        "{}",
        String::from_utf8_lossy(&serve.stderr)
    );

    for (lang, words) in [
        (
            "nl",
            [
                "Afhandelen bestelling",
                "wettelijke verplichting",
                "Autoriteit Persoonsgegevens",
            ],
        ),
        (
            "en",
            [
                "Afhandelen bestelling",
                "legal obligation",
                "Autoriteit Persoonsgegevens",
            ],
        ),
    ] {
        let out = kluis(&db)
            .args(["policy", "explain", "--lang", lang])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for w in words {
            assert!(text.contains(w), "{lang}: {w} missing");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_offline_reports_intact_and_then_the_position_of_a_cut() {
    let db = TestDb::new().await;
    let app = spawn_on(db.clone()).await;
    for _ in 0..3 {
        app.create(crate::helpers::full_subject(&crate::helpers::tag()))
            .await;
    }
    let db = app.stop().await; // the last checkpoint is signed on shutdown
    let ok = kluis(&db).args(["audit", "verify"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("audit chain intact: 3 events"), "{stdout}");
    let cp = kluis(&db).args(["audit", "checkpoint"]).output().unwrap();
    assert!(cp.status.success());
    assert!(String::from_utf8_lossy(&cp.stdout).contains("\"seq\":3"));

    // The last event deleted with the database checkpoints and the head rolled back: only the
    // checkpoint file outside the database still knows.
    let raw = db.raw().await;
    for sql in [
        "DELETE FROM audit_events WHERE seq = 3",
        "DELETE FROM audit_checkpoints",
        "DELETE FROM audit_subjects WHERE seq = 3",
        "UPDATE audit_index_state SET indexed_seq = 2 WHERE indexed_seq > 2",
        "UPDATE audit_head SET seq = 2, mac = (SELECT mac FROM audit_events WHERE seq = 2)",
    ] {
        match &raw {
            crate::helpers::Raw::Sqlite(p) => {
                sqlx::query(sql).execute(p).await.unwrap();
            }
            crate::helpers::Raw::Pg(p) => {
                sqlx::query(sql).execute(p).await.unwrap();
            }
        }
    }
    raw.close().await;
    let broken = kluis(&db).args(["audit", "verify"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&broken.stdout);
    assert_eq!(broken.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("BROKEN at seq 3"), "{stdout}");
}
