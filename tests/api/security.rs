//! Authentication, the no-plaintext-at-rest and no-PII-in-logs promises, tamper detection and the
//! root-key check.

use std::time::{Duration, Instant};

use kluis::{
    Application, StartupError,
    api::pb,
    domain::{keys::KeyringError, record::SealedRecord},
};
use prost::Message;
use tonic::Code;

use crate::helpers::{
    Admin, Subjects, TestApp, TestDb, captured_logs, full_subject, serve_args, spawn_kluis,
    spawn_on, spawn_with, tag,
};

/// Calls every kluis RPC once with these clients; returns (rpc, status code).
async fn every_rpc(mut s: Subjects, mut a: Admin) -> Vec<(&'static str, Code)> {
    let id = uuid::Uuid::new_v4().to_string();
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |e| e.code());
    vec![
        (
            "CreateSubject",
            code(
                s.create_subject(pb::CreateSubjectRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "GetSubject",
            code(
                s.get_subject(pb::GetSubjectRequest {
                    id: id.clone(),
                    read_mask: None,
                    view: 0,
                })
                .await
                .map(|_| ()),
            ),
        ),
        (
            "UpdateSubject",
            code(
                s.update_subject(pb::UpdateSubjectRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "FindSubjects",
            code(
                s.find_subjects(pb::FindSubjectsRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "BatchGetSubjects",
            code(
                s.batch_get_subjects(pb::BatchGetSubjectsRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "EraseSubject",
            code(
                s.erase_subject(pb::EraseSubjectRequest { id })
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "CreateCallerToken",
            code(
                a.create_caller_token(pb::CreateCallerTokenRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "RevokeCallerToken",
            code(
                a.revoke_caller_token(pb::RevokeCallerTokenRequest::default())
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "ListCallers",
            code(a.list_callers(pb::ListCallersRequest {}).await.map(|_| ())),
        ),
    ]
}

fn assert_all(results: &[(&str, Code)], expected: Code, why: &str) {
    assert_eq!(results.len(), 9);
    for (rpc, code) in results {
        assert_eq!(*code, expected, "{rpc} {why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_without_a_valid_token_is_unauthenticated() {
    // Far more failures than the failed-authentication limit allows one address (tests/api/limits.rs).
    let app = spawn_with(TestDb::new().await, |args| {
        args.limits.auth_failure_limit = 0
    })
    .await;
    assert_all(
        &every_rpc(app.subjects_as(None), app.admin_as(None)).await,
        Code::Unauthenticated,
        "without token",
    );

    for bad in [
        "kluis_",
        "not-a-token",
        "kluis_0123456789abcdef_tooshort",
        "kluis_0123456789ABCDEF_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let r = every_rpc(app.subjects_as(Some(bad)), app.admin_as(Some(bad))).await;
        assert_all(&r, Code::Unauthenticated, "with a malformed token");
    }
    // Well-formed, unknown id; and a known id with the wrong secret.
    let unknown = format!("kluis_0123456789abcdef_{}", "0".repeat(64));
    assert_all(
        &every_rpc(
            app.subjects_as(Some(&unknown)),
            app.admin_as(Some(&unknown)),
        )
        .await,
        Code::Unauthenticated,
        "with an unknown token",
    );
    let real = app.operator_token.clone();
    let wrong_secret = format!(
        "{}{}",
        &real[..real.len() - 1],
        if real.ends_with('0') { '1' } else { '0' }
    );
    assert_all(
        &every_rpc(
            app.subjects_as(Some(&wrong_secret)),
            app.admin_as(Some(&wrong_secret)),
        )
        .await,
        Code::Unauthenticated,
        "with a wrong secret",
    );

    let token = app.token_for("soon-revoked", "operator").await;
    let before = every_rpc(app.subjects_as(Some(&token)), app.admin_as(Some(&token))).await;
    assert!(
        before.iter().all(|(_, c)| *c != Code::Unauthenticated),
        "valid before: {before:?}"
    );
    let id = token.split('_').nth(1).unwrap().to_owned();
    app.admin()
        .revoke_caller_token(pb::RevokeCallerTokenRequest { id })
        .await
        .unwrap();
    // At once on the instance that revoked.
    assert_all(
        &every_rpc(app.subjects_as(Some(&token)), app.admin_as(Some(&token))).await,
        Code::Unauthenticated,
        "with a revoked token",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_fails_on_another_instance_within_two_seconds() {
    let a = spawn_kluis().await;
    let b = spawn_on(a.db.clone()).await;
    let token = a.token_for("billing-svc", "billing").await;
    let created = a.create(full_subject(&tag())).await;
    let read = |app: &TestApp| {
        let mut client = app.subjects_under(Some(&token), Some("account"), None);
        let id = created.id.clone();
        async move {
            client
                .get_subject(pb::GetSubjectRequest {
                    id,
                    read_mask: None,
                    view: 0,
                })
                .await
                .map(|_| ())
        }
    };
    read(&b).await.unwrap(); // B has the caller cached now.
    let id = token.split('_').nth(1).unwrap().to_owned();
    a.admin()
        .revoke_caller_token(pb::RevokeCallerTokenRequest { id })
        .await
        .unwrap();
    let revoked_at = Instant::now();
    assert_eq!(read(&a).await.unwrap_err().code(), Code::Unauthenticated);
    loop {
        match read(&b).await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            Ok(()) => assert!(
                revoked_at.elapsed() < Duration::from_secs(2),
                "revoked token still accepted by the other instance after 2 s"
            ),
            Err(e) => panic!("unexpected {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_are_for_operators_only() {
    let app = spawn_kluis().await;
    for role in ["hosting-backend", "billing", "marketing-mailer"] {
        let token = app.token_for(&format!("svc-{role}"), role).await;
        let mut admin = app.admin_as(Some(&token));
        let err = admin
            .list_callers(pb::ListCallersRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{role}");
        let err = admin
            .create_caller_token(pb::CreateCallerTokenRequest {
                name: "x".into(),
                role: "operator".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{role}");
    }
    let callers = app
        .admin()
        .list_callers(pb::ListCallersRequest {})
        .await
        .unwrap()
        .into_inner()
        .callers;
    assert_eq!(callers.len(), 4);
    assert!(
        callers
            .iter()
            .any(|c| c.name == "operator" && c.role == "operator")
    );
    let err = app
        .admin()
        .create_caller_token(pb::CreateCallerTokenRequest {
            name: "x".into(),
            role: "superuser".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = app
        .admin()
        .revoke_caller_token(pb::RevokeCallerTokenRequest {
            id: "0000000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// A subject whose every text leaf carries `canary`.
fn canary_subject(canary: &str) -> pb::Subject {
    let mut s = full_subject(&tag());
    let name = s.name.as_mut().unwrap();
    name.given = format!("{canary}given");
    name.family = format!("{canary}family");
    s.address.as_mut().unwrap().street = format!("{canary}street");
    s.address.as_mut().unwrap().city = format!("{canary}city");
    s.contact.as_mut().unwrap().email = format!("{canary}@example.nl");
    s.billing.as_mut().unwrap().company_name = format!("{canary}company");
    s.payment.as_mut().unwrap().account_holder = format!("{canary}holder");
    s.payment.as_mut().unwrap().psp_token = format!("{canary}psp");
    s.account.as_mut().unwrap().username = format!("{canary}user");
    s.activity_log[0].action = format!("{canary}action");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_value_never_reaches_the_database_or_the_logs() {
    let app = spawn_kluis().await;
    let canary = format!("canary{}", tag());
    let created = app.create(canary_subject(&canary)).await;
    let got = app.get(&created.id).await.unwrap();
    assert!(
        got.name.unwrap().given.starts_with(&canary),
        "the canary is really stored and readable"
    );
    // Also through find, update and a refused call that carries the canary.
    app.subjects()
        .find_subjects(pb::FindSubjectsRequest {
            key: Some(pb::find_subjects_request::Key::Email(format!(
                "{canary}@example.nl"
            ))),
        })
        .await
        .unwrap();
    let refused = app
        .subjects()
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(pb::Subject {
                contact: Some(pb::Contact {
                    email: format!("{canary} is not an address"),
                    phone: canary.clone(),
                }),
                ..Default::default()
            }),
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        !refused.message().contains(&canary),
        "error message echoes the value"
    );
    assert!(
        !format!("{:?}", refused.details()).contains(&canary),
        "error details echo the value"
    );

    let canary_hex = hex::encode(canary.as_bytes());
    let db = app.stop().await;
    let raw = db.raw().await;
    if crate::helpers::postgres_mode() {
        let dump = raw.pg_dump_text().await;
        assert!(
            dump.contains(&hex::encode(
                uuid::Uuid::parse_str(&created.id).unwrap().as_bytes()
            )),
            "dump covers the row"
        );
        assert!(
            !dump.contains(&canary) && !dump.contains(&canary_hex),
            "plaintext in PostgreSQL"
        );
    } else {
        raw.close().await;
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(db.data_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("kluis.db")
            {
                bytes.extend(std::fs::read(&path).unwrap());
            }
        }
        assert!(bytes.len() > 8192, "read the database files");
        let needle = canary.as_bytes();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "plaintext in the SQLite files"
        );
    }
    let logs = captured_logs();
    assert!(
        logs.contains(&created.id),
        "the logs were captured (they name the subject id)"
    );
    assert!(!logs.contains(&canary), "a personal value reached the logs");
}

async fn tamper_setup() -> (TestApp, pb::Subject, pb::Subject) {
    let app = spawn_kluis().await;
    let a = app.create(full_subject(&tag())).await;
    let b = app.create(full_subject(&tag())).await;
    (app, a, b)
}

fn id_bytes(s: &pb::Subject) -> Vec<u8> {
    uuid::Uuid::parse_str(&s.id).unwrap().as_bytes().to_vec()
}

const READ_RECORD: &str = "SELECT record FROM subjects WHERE id = $1";
const WRITE_RECORD: &str = "UPDATE subjects SET record = $1 WHERE id = $2";

fn assert_data_loss(result: Result<pb::Subject, tonic::Status>, what: &str) {
    let err = result.map(|_| ()).unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{what}: {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_ciphertext_reads_as_data_loss() {
    let (app, a, b) = tamper_setup().await;
    let raw = app.db.raw().await;
    let mut record =
        SealedRecord::decode(raw.bytes(READ_RECORD, &id_bytes(&a)).await.as_slice()).unwrap();
    let field = record
        .fields
        .iter_mut()
        .find(|f| f.path == "contact.email")
        .unwrap();
    field.ciphertext[0] ^= 0x01;
    raw.set_bytes(WRITE_RECORD, record.encode_to_vec(), &id_bytes(&a))
        .await;
    assert_data_loss(app.get(&a.id).await, "flipped bit");
    assert!(app.get(&b.id).await.is_ok(), "other subjects unaffected");
    // A mask that avoids the damaged leaf still reads.
    let ok = app
        .subjects()
        .get_subject(pb::GetSubjectRequest {
            id: a.id.clone(),
            read_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into()],
            }),
            view: 0,
        })
        .await;
    assert!(ok.is_ok());
    // Garbage instead of a record.
    raw.set_bytes(WRITE_RECORD, vec![0xff; 40], &id_bytes(&a))
        .await;
    assert_data_loss(app.get(&a.id).await, "undecodable record");
    assert!(
        captured_logs().contains(&format!("subject={}", a.id)),
        "logged at error with the id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciphertexts_moved_between_subjects_or_paths_read_as_data_loss() {
    let (app, a, b) = tamper_setup().await;
    let raw = app.db.raw().await;
    let rec_a =
        SealedRecord::decode(raw.bytes(READ_RECORD, &id_bytes(&a)).await.as_slice()).unwrap();
    let rec_b =
        SealedRecord::decode(raw.bytes(READ_RECORD, &id_bytes(&b)).await.as_slice()).unwrap();

    // B's e-mail ciphertext copied into A's record at the same path.
    let mut swapped = rec_a.clone();
    let from_b = rec_b
        .fields
        .iter()
        .find(|f| f.path == "contact.email")
        .unwrap()
        .clone();
    *swapped
        .fields
        .iter_mut()
        .find(|f| f.path == "contact.email")
        .unwrap() = from_b;
    raw.set_bytes(WRITE_RECORD, swapped.encode_to_vec(), &id_bytes(&a))
        .await;
    assert_data_loss(app.get(&a.id).await, "ciphertext of another subject");

    // A's given name moved to A's family-name path.
    let mut moved = rec_a.clone();
    let given = moved
        .fields
        .iter()
        .find(|f| f.path == "name.given")
        .unwrap()
        .clone();
    let family = moved
        .fields
        .iter_mut()
        .find(|f| f.path == "name.family")
        .unwrap();
    family.nonce = given.nonce;
    family.ciphertext = given.ciphertext;
    raw.set_bytes(WRITE_RECORD, moved.encode_to_vec(), &id_bytes(&a))
        .await;
    assert_data_loss(app.get(&a.id).await, "ciphertext of another path");

    // B's whole row content (record and wrapped key) copied onto A's id.
    raw.set_bytes(WRITE_RECORD, rec_b.encode_to_vec(), &id_bytes(&a))
        .await;
    let dek_b = raw
        .bytes(
            "SELECT wrapped_dek FROM data_keys WHERE subject_id = $1",
            &id_bytes(&b),
        )
        .await;
    raw.set_bytes(
        "UPDATE data_keys SET wrapped_dek = $1 WHERE subject_id = $2",
        dek_b,
        &id_bytes(&a),
    )
    .await;
    assert_data_loss(app.get(&a.id).await, "row copied to another id");
    assert!(app.get(&b.id).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_root_key_stops_start_up() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    let db = app.stop().await;
    let key_file = db.data_dir().join("root.key");
    let original = std::fs::read_to_string(&key_file).unwrap();
    let other = kluis::crypto::RootKey::generate().unwrap();
    std::fs::write(&key_file, other.to_file_contents().as_bytes()).unwrap();
    let err = Application::build(&serve_args(&db))
        .await
        .err()
        .expect("start-up must be refused");
    assert!(
        matches!(err, StartupError::Keyring(KeyringError::WrongRootKey)),
        "{err}"
    );
    assert!(err.to_string().contains("root key does not match"), "{err}");

    // A key of another version gets no check value of its own: refused the same way.
    let v2 = kluis::crypto::RootKey::generate()
        .unwrap()
        .to_file_contents()
        .replace(" v1 ", " v2 ");
    std::fs::write(&key_file, v2.as_bytes()).unwrap();
    let err = Application::build(&serve_args(&db))
        .await
        .err()
        .expect("start-up must be refused");
    assert!(
        matches!(err, StartupError::Keyring(KeyringError::WrongRootKey)),
        "{err}"
    );

    // A missing key file is refused too, rather than replaced by a new key.
    std::fs::remove_file(&key_file).unwrap();
    let err = Application::build(&serve_args(&db))
        .await
        .err()
        .expect("start-up must be refused");
    assert!(err.to_string().contains("does not exist"), "{err}");

    // The right key opens it again, data intact.
    std::fs::write(&key_file, original).unwrap();
    // (A key file others can read is refused: keep it private.)
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let again = spawn_on(db).await;
    assert!(again.get(&created.id).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_token_files_are_private_and_reused_on_restart() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_kluis().await;
    let db = app.stop().await;
    let key_file = db.data_dir().join("root.key");
    let token_file = db.data_dir().join("operator.token");
    for f in [&key_file, &token_file] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let (key, token) = (
        std::fs::read(&key_file).unwrap(),
        std::fs::read(&token_file).unwrap(),
    );
    let again = spawn_on(db.clone()).await;
    assert_eq!(std::fs::read(&key_file).unwrap(), key);
    assert_eq!(std::fs::read(&token_file).unwrap(), token);
    again
        .admin()
        .list_callers(pb::ListCallersRequest {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_on_a_non_loopback_address_needs_an_explicit_insecure_flag() {
    let db = crate::helpers::TestDb::new().await;
    let mut args = serve_args(&db);
    args.listen = "0.0.0.0:0".parse().unwrap();
    let err = Application::build(&args)
        .await
        .err()
        .expect("start-up must be refused");
    assert!(matches!(err, StartupError::Config(_)), "{err}");
    assert!(err.to_string().contains("--insecure"), "{err}");
    // Refused before anything was touched: no key, no token, no database.
    assert!(!db.data_dir().join("root.key").exists());
    args.insecure = true;
    let app = Application::build(&args).await.unwrap();
    assert!(app.local_addr().ip().is_unspecified());
    // On loopback no flag is needed (every other test).
}
