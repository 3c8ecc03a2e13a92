//! Customers' portal passwords through the real server: set, verify and change; the password
//! policy; throttling per username and per address; hashes upgraded when the parameters rise;
//! passwords erased with the subject and never in the audit trail or the logs.

use std::time::Duration;

use kluis::{
    Application,
    api::pb::{self, credential_service_client::CredentialServiceClient},
};
use tonic::{Code, codegen::InterceptedService, transport::Channel};

use crate::helpers::{
    Bearer, OPERATOR_PURPOSE, OPERATOR_REASON, TestApp, TestDb, captured_logs, full_subject,
    serve_args, spawn_kluis, spawn_on, spawn_with, tag,
};

type Passwords = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

fn passwords(app: &TestApp, token: &str, purpose: &str) -> Passwords {
    CredentialServiceClient::with_interceptor(
        app.channel(),
        TestApp::bearer(Some(token), Some(purpose), Some(OPERATOR_REASON)),
    )
}

async fn set(client: &mut Passwords, id: &str, password: &str) -> Result<(), tonic::Status> {
    client
        .set_password(pb::SetPasswordRequest {
            subject_id: id.into(),
            password: password.into(),
        })
        .await
        .map(|_| ())
}

async fn verify(
    client: &mut Passwords,
    username: &str,
    password: &str,
) -> Result<pb::VerifyPasswordResponse, tonic::Status> {
    client
        .verify_password(pb::VerifyPasswordRequest {
            username: username.into(),
            password: password.into(),
            client_ip: "203.0.113.7".into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A subject with a username, and the hosting backend's password client under `account`.
async fn customer(app: &TestApp) -> (String, String, Passwords) {
    let subject = app.create(full_subject(&tag())).await;
    let username = subject.account.unwrap().username;
    let hosting = app.token_for("backend", "hosting-backend").await;
    (subject.id, username, passwords(app, &hosting, "account"))
}

async fn stored_hash(app: &TestApp) -> String {
    let raw = app.db.raw().await;
    let hash: String = match &raw {
        crate::helpers::Raw::Sqlite(p) => sqlx::query_scalar("SELECT hash FROM credentials")
            .fetch_one(p)
            .await
            .unwrap(),
        crate::helpers::Raw::Pg(p) => sqlx::query_scalar("SELECT hash FROM credentials")
            .fetch_one(p)
            .await
            .unwrap(),
    };
    raw.close().await;
    hash
}

#[tokio::test]
async fn a_password_set_verifies_by_username_and_changes_only_with_the_current_one() {
    let app = spawn_kluis().await;
    let (id, username, mut backend) = customer(&app).await;
    let password = "correct horse battery staple";
    set(&mut backend, &id, password).await.unwrap();
    assert!(
        stored_hash(&app)
            .await
            .starts_with("$argon2id$v=19$m=19456,t=2,p=1$")
    );

    let ok = verify(&mut backend, &username, password).await.unwrap();
    assert!(ok.valid);
    assert_eq!(ok.subject_id, id);
    // The username matches case-insensitively, like the lookup.
    assert!(
        verify(&mut backend, &username.to_uppercase(), password)
            .await
            .unwrap()
            .valid
    );
    let wrong = verify(&mut backend, &username, "correct horse battery stapler")
        .await
        .unwrap();
    assert!(!wrong.valid && wrong.subject_id.is_empty());
    assert!(
        !verify(&mut backend, "nobody-here", password)
            .await
            .unwrap()
            .valid
    );

    let refused = backend
        .change_password(pb::ChangePasswordRequest {
            subject_id: id.clone(),
            current_password: "not the password at all".into(),
            new_password: "a brand new passphrase".into(),
            client_ip: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.changed);
    assert!(
        verify(&mut backend, &username, password)
            .await
            .unwrap()
            .valid
    );
    let changed = backend
        .change_password(pb::ChangePasswordRequest {
            subject_id: id.clone(),
            current_password: password.into(),
            new_password: "a brand new passphrase".into(),
            client_ip: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(changed.changed);
    assert!(
        !verify(&mut backend, &username, password)
            .await
            .unwrap()
            .valid
    );
    assert!(
        verify(&mut backend, &username, "a brand new passphrase")
            .await
            .unwrap()
            .valid
    );
}

#[tokio::test]
async fn the_password_policy_and_the_callers_are_checked_and_refusals_store_nothing() {
    let app = spawn_kluis().await;
    let (id, _username, mut backend) = customer(&app).await;
    for (bad, why) in [
        ("short", "too short"),
        (&*"x".repeat(129), "too long"),
        ("            ", "only spaces"),
        ("tab\tinside-the-password", "control character"),
    ] {
        let e = set(&mut backend, &id, bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{why}");
        assert!(
            format!("{e:?}").contains("password"),
            "{why}: names the field"
        );
    }
    let billing = app.token_for("billing", "billing").await;
    let e = set(
        &mut passwords(&app, &billing, "account"),
        &id,
        "a fine long password",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let hosting = app.token_for("backend2", "hosting-backend").await;
    let e = set(
        &mut passwords(&app, &hosting, "portal"),
        &id,
        "a fine long password",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "login is under account");
    let e = set(
        &mut backend,
        &uuid::Uuid::new_v4().to_string(),
        "a fine long password",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(app.raw_count("SELECT COUNT(*) FROM credentials").await, 0);
    // Operators may set one (a support case).
    set(
        &mut passwords(&app, &app.operator_token.clone(), OPERATOR_PURPOSE),
        &id,
        "set by support 2026",
    )
    .await
    .unwrap();
    assert_eq!(app.raw_count("SELECT COUNT(*) FROM credentials").await, 1);
}

#[tokio::test]
async fn failed_attempts_are_throttled_per_username_and_per_address_until_the_window_passes() {
    let app = spawn_with(TestDb::new().await, |args| {
        args.password.max_failures = 3;
        args.password.failure_window_seconds = 2;
    })
    .await;
    let (id, username, mut backend) = customer(&app).await;
    set(&mut backend, &id, "the right password").await.unwrap();
    for _ in 0..3 {
        assert!(
            !verify(&mut backend, &username, "a wrong password")
                .await
                .unwrap()
                .valid
        );
    }
    // Now even the right password waits: the username is throttled.
    let e = verify(&mut backend, &username, "the right password")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("try again"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        verify(&mut backend, &username, "the right password")
            .await
            .unwrap()
            .valid
    );

    // Guessing across usernames from one address throttles the address.
    for n in 0..3 {
        let _ = verify(&mut backend, &format!("guess{n}"), "whatever-password")
            .await
            .unwrap();
    }
    let e = verify(&mut backend, &username, "the right password")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("address"));
    // Another customer behind the same portal, from another address, is not held up.
    let other = backend
        .verify_password(pb::VerifyPasswordRequest {
            username: username.clone(),
            password: "the right password".into(),
            client_ip: "198.51.100.20".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.valid);
    let bad_ip = backend
        .verify_password(pb::VerifyPasswordRequest {
            username: username.clone(),
            password: "the right password".into(),
            client_ip: "not-an-ip".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_ip.code(), Code::InvalidArgument);
    let throttled = app
        .audit_events(pb::QueryAuditLogRequest {
            method: "kluis.v1.CredentialService/VerifyPassword".into(),
            outcome: "RESOURCE_EXHAUSTED".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(throttled.len(), 2, "refusals are audited");
}

#[tokio::test]
async fn a_hash_made_with_older_parameters_is_upgraded_at_the_next_successful_login() {
    let db = TestDb::new().await;
    let app = spawn_on(db.clone()).await;
    let (id, username, mut backend) = customer(&app).await;
    set(&mut backend, &id, "the right password").await.unwrap();
    let before = stored_hash(&app).await;
    assert!(before.contains("m=19456,t=2,p=1"));
    app.stop().await;

    let app = spawn_with(db, |args| args.password.passes = 3).await;
    let hosting = app.token_for("backend3", "hosting-backend").await;
    let mut backend = passwords(&app, &hosting, "account");
    assert!(
        !verify(&mut backend, &username, "a wrong password")
            .await
            .unwrap()
            .valid
    );
    assert_eq!(
        stored_hash(&app).await,
        before,
        "a failed login changes nothing"
    );
    assert!(
        verify(&mut backend, &username, "the right password")
            .await
            .unwrap()
            .valid
    );
    let after = stored_hash(&app).await;
    assert!(after.contains("m=19456,t=3,p=1"), "{after}");
    assert!(
        verify(&mut backend, &username, "the right password")
            .await
            .unwrap()
            .valid
    );
}

#[tokio::test]
async fn parameters_below_owasps_minimum_stop_start_up() {
    let db = TestDb::new().await;
    let mut args = serve_args(&db);
    args.password.passes = 1;
    let err = Application::build(&args).await.err().expect("refused");
    assert!(err.to_string().contains("OWASP"), "{err}");
}

#[tokio::test]
async fn a_password_goes_with_its_subject_and_never_into_the_trail_or_the_logs() {
    let app = spawn_kluis().await;
    let (id, username, mut backend) = customer(&app).await;
    let canary = format!("Canary-Password-{}", tag());
    set(&mut backend, &id, &canary).await.unwrap();
    assert!(
        verify(&mut backend, &username, &canary)
            .await
            .unwrap()
            .valid
    );
    let _ = verify(&mut backend, &username, &format!("{canary}-wrong")).await;
    let hash = stored_hash(&app).await;
    let stored = app.audit_bodies().await;
    assert!(stored.contains("login=ok") && stored.contains("password-set"));
    assert!(
        !stored.contains("203.0.113.7"),
        "no customer address in the trail"
    );
    let logs = captured_logs();
    for text in [&stored, &logs] {
        assert!(!text.contains(&canary), "no password");
        assert!(!text.contains(&hash[hash.len() - 20..]), "no hash");
    }
    app.subjects()
        .erase_subject(pb::EraseSubjectRequest { id: id.clone() })
        .await
        .unwrap();
    assert_eq!(app.raw_count("SELECT COUNT(*) FROM credentials").await, 0);
    assert!(
        !verify(&mut backend, &username, &canary)
            .await
            .unwrap()
            .valid
    );
}
