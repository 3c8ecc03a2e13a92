//! Key rotation through the real server: KEK rotation under load with the background re-wrap job,
//! retirement refused while a version is in use, the job resumed after `kill -9`, a second
//! instance picking up a rotation, `KeyStatus` and the backup dependencies, and the audit trail.

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use kluis::api::pb;
use tonic::Code;

use crate::helpers::{
    TestApp, TestDb, captured_logs, full_subject, postgres_mode, spawn_with, tag,
};

/// Settings for these tests: a fast keyring reload, and the re-wrap job at `rate` (0: off).
fn keys_config(rate: u32) -> impl FnOnce(&mut kluis::ServeArgs) {
    move |args| {
        args.keys.refresh_seconds = 0.2;
        args.keys.rewrap_rate = rate;
        args.keys.rewrap_batch = 25;
    }
}

/// An instance that reloads its keyring only every minute, its jobs off.
fn stale_config(args: &mut kluis::ServeArgs) {
    args.keys.refresh_seconds = 60.0;
    args.keys.rewrap_rate = 0;
}

async fn status(app: &TestApp) -> pb::KeyStatusResponse {
    app.admin()
        .key_status(pb::KeyStatusRequest { backup_time: None })
        .await
        .unwrap()
        .into_inner()
}

/// Data keys per KEK version, as KeyStatus counts them.
fn data_keys(status: &pb::KeyStatusResponse) -> Vec<(u32, u64)> {
    status
        .keys
        .iter()
        .filter(|k| k.kind == "kek" && k.data_keys.unwrap_or(0) > 0)
        .map(|k| (k.version, k.data_keys.unwrap_or(0)))
        .collect()
}

async fn rotate(app: &TestApp) -> u32 {
    app.admin()
        .rotate_kek(pb::RotateKekRequest {})
        .await
        .unwrap()
        .into_inner()
        .version
}

async fn retire(app: &TestApp, version: u32) -> Result<bool, tonic::Status> {
    app.admin()
        .retire_kek(pb::RetireKekRequest { version })
        .await
        .map(|r| r.into_inner().retired_now)
}

/// Creates `n` subjects, 16 at a time; their ids and family names.
async fn create_many(app: &TestApp, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (n - out.len()).min(16);
        let created =
            futures_util::future::join_all((0..batch).map(|_| app.create(full_subject(&tag()))))
                .await;
        out.extend(created.into_iter().map(|s| (s.id, s.name.unwrap().family)));
    }
    out
}

/// Reads every subject back and compares its family name.
async fn all_readable(app: &TestApp, subjects: &[(String, String)]) {
    for (id, family) in subjects {
        let got = app.get(id).await.unwrap_or_else(|e| panic!("{id}: {e:?}"));
        assert_eq!(&got.name.unwrap().family, family, "{id}");
    }
}

/// Waits until no data key is left under an older KEK (the job finished), at most 60 s.
async fn wait_rewrapped(app: &TestApp) -> pb::KeyStatusResponse {
    let started = Instant::now();
    loop {
        let s = status(app).await;
        if s.rewrap_pending == 0 {
            return s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "re-wrap stalled: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_rotated_twice_under_concurrent_reads_and_writes_fails_no_request() {
    // A slow job, so rotations and re-wrapping overlap the load.
    let app = spawn_with(TestDb::new().await, keys_config(1500)).await;
    let subjects = Arc::new(create_many(&app, 150).await);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let created = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for worker in 0..4usize {
        let (subjects, stop, calls, created) = (
            subjects.clone(),
            stop.clone(),
            calls.clone(),
            created.clone(),
        );
        let mut client = app.subjects();
        load.push(tokio::spawn(async move {
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                let (id, family) = &subjects[i % subjects.len()];
                if i % 5 == 0 {
                    // A write: a new subject (wrapped under whatever KEK is active).
                    let s = client
                        .create_subject(pb::CreateSubjectRequest {
                            subject: Some(full_subject(&tag())),
                            source: String::new(),
                        })
                        .await
                        .map_err(|e| format!("create: {e:?}"))?
                        .into_inner()
                        .subject
                        .unwrap();
                    created.lock().await.push((s.id, s.name.unwrap().family));
                } else if i % 5 == 1 {
                    // A write to an existing subject.
                    client
                        .update_subject(pb::UpdateSubjectRequest {
                            subject: Some(pb::Subject {
                                id: id.clone(),
                                contact: Some(pb::Contact {
                                    email: String::new(),
                                    phone: "+31612345678".into(),
                                }),
                                ..Default::default()
                            }),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["contact.phone".into()],
                            }),
                            expected_version: None,
                            source: String::new(),
                        })
                        .await
                        .map_err(|e| format!("update {id}: {e:?}"))?;
                } else {
                    let got = client
                        .get_subject(pb::GetSubjectRequest {
                            id: id.clone(),
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| format!("get {id}: {e:?}"))?
                        .into_inner()
                        .subject
                        .unwrap();
                    if &got.name.unwrap().family != family {
                        return Err(format!("{id}: another family name"));
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
                i += 4;
            }
            Ok::<(), String>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rotate(&app).await, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rotate(&app).await, 3);
    let done = wait_rewrapped(&app).await;
    // On a loaded machine the rotations can finish before the load has done much: let it run on
    // to a meaningful number of calls.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while calls.load(Ordering::Relaxed) <= 100 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap().unwrap();
    }
    assert!(calls.load(Ordering::Relaxed) > 100, "the load ran");
    // Subjects created during the load may have been wrapped under v2 after the job looked: run
    // one more pass, then everything is under v3.
    app.keys.rewrap_all(0).await.unwrap();
    let total = 150 + created.lock().await.len() as u64;
    assert_eq!(data_keys(&status(&app).await), [(3, total)], "{done:?}");
    assert_eq!(done.active_kek_version, 3);
    let states: Vec<(u32, String)> = done
        .keys
        .iter()
        .filter(|k| k.kind == "kek")
        .map(|k| (k.version, k.state.clone()))
        .collect();
    assert_eq!(
        states,
        [
            (1, "decrypt-only".to_owned()),
            (2, "decrypt-only".to_owned()),
            (3, "active".to_owned())
        ]
    );
    all_readable(&app, &subjects).await;
    all_readable(&app, &created.lock().await).await;
    // The rotations are in the audit trail, and the chain is intact.
    let rotations = app
        .audit_events(pb::QueryAuditLogRequest {
            method: "kluis.v1.AdminService/RotateKek".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(rotations.len(), 2);
    app.assert_audit_chain_intact().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_a_kek_is_refused_while_in_use_and_destroys_it_after() {
    let db = TestDb::new().await;
    let app = spawn_with(db.clone(), keys_config(0)).await;
    let subjects = create_many(&app, 40).await;
    assert_eq!(data_keys(&status(&app).await), [(1, 40)]);

    let err = retire(&app, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("active"), "{}", err.message());
    assert_eq!(rotate(&app).await, 2);
    // Right after the rotation another instance may not have loaded v2 yet.
    let err = retire(&app, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("less than the keyring refresh interval"),
        "{}",
        err.message()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let err = retire(&app, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("40 data keys are still wrapped under kek v1"),
        "{}",
        err.message()
    );
    let err = retire(&app, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(retire(&app, 7).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        retire(&app, 0).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A non-operator may do none of it.
    let billing = app.token_for("billing", "billing").await;
    let mut as_billing = app.admin_as(Some(&billing));
    let err = as_billing
        .rotate_kek(pb::RotateKekRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = as_billing
        .key_status(pb::KeyStatusRequest { backup_time: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Nothing changed by the refusals.
    assert_eq!(data_keys(&status(&app).await), [(1, 40)]);

    assert_eq!(app.keys.rewrap_all(0).await.unwrap(), 40);
    assert_eq!(data_keys(&status(&app).await), [(2, 40)]);
    assert!(retire(&app, 1).await.unwrap());
    assert!(
        !retire(&app, 1).await.unwrap(),
        "retiring again changes nothing"
    );
    let after = status(&app).await;
    let v1 = after
        .keys
        .iter()
        .find(|k| k.kind == "kek" && k.version == 1)
        .unwrap();
    assert_eq!(v1.state, "retired");
    assert!(v1.retire_time.is_some());
    // The wrapped key is gone from the database, not just marked.
    assert_eq!(
        app.raw_count(
            "SELECT COUNT(*) FROM keys WHERE kind = 'kek' AND version = 1 AND length(wrapped) = 0"
        )
        .await,
        1
    );
    all_readable(&app, &subjects).await;
    let retirements = app
        .audit_events(pb::QueryAuditLogRequest {
            method: "kluis.v1.AdminService/RetireKek".into(),
            ..Default::default()
        })
        .await;
    let outcomes: Vec<&str> = retirements.iter().map(|e| e.outcome.as_str()).collect();
    assert!(
        outcomes.contains(&"OK") && outcomes.contains(&"FAILED_PRECONDITION"),
        "{outcomes:?}"
    );

    // A restart loads only what is left, and every subject still reads.
    let db = app.stop().await;
    let app = spawn_with(db, keys_config(0)).await;
    all_readable(&app, &subjects).await;
    // No key material in the logs: not the root key, in any form.
    let root = std::fs::read_to_string(app.db.data_dir().join("root.key")).unwrap();
    let hex_key = root.split_whitespace().last().unwrap().to_owned();
    assert!(!captured_logs().contains(&hex_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_reads_subjects_wrapped_under_a_kek_it_had_not_loaded() {
    let db = TestDb::new().await;
    // B reloads only every minute: it must notice the new version by itself on a read.
    let a = spawn_with(db.clone(), keys_config(0)).await;
    let b = spawn_with(db.clone(), stale_config).await;
    assert_eq!(rotate(&a).await, 2);
    let subject = a.create(full_subject(&tag())).await;
    let got = b.get(&subject.id).await.unwrap();
    assert_eq!(got.name, subject.name);
    assert_eq!(data_keys(&status(&b).await), [(2, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rewrap_job_killed_midway_resumes_and_finishes() {
    let db = TestDb::new().await;
    let app = spawn_with(db.clone(), keys_config(0)).await;
    let subjects = create_many(&app, 400).await;
    assert_eq!(rotate(&app).await, 2);
    // `kluis keys rewrap`, slowed down, killed with SIGKILL part-way.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kluis"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KLUIS_DATA_DIR", db.data_dir())
        .env("KLUIS_LOG", "warn")
        .env("KLUIS_KEK_REWRAP_BATCH", "20")
        .args(["keys", "rewrap", "--rate", "200"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if postgres_mode() {
        cmd.env("KLUIS_DATABASE_URL", &db.url);
    }
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    loop {
        let pending = status(&app).await.rewrap_pending;
        if pending <= 300 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the command made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let pending = status(&app).await.rewrap_pending;
    assert!(
        pending > 0 && pending < 400,
        "killed part-way: {pending} left"
    );
    // Every subject reads meanwhile, whichever KEK wraps it.
    all_readable(&app, &subjects).await;

    // Restarted with the background job on, it finishes.
    let db = app.stop().await;
    let app = spawn_with(db, keys_config(20_000)).await;
    let done = wait_rewrapped(&app).await;
    assert_eq!(data_keys(&done), [(2, 400)]);
    all_readable(&app, &subjects).await;
    // The job says so in the audit trail.
    let events = app
        .audit_events(pb::QueryAuditLogRequest {
            method: "keys.rewrap".into(),
            ..Default::default()
        })
        .await;
    assert!(!events.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_status_names_the_versions_a_backup_depends_on() {
    let app = spawn_with(TestDb::new().await, keys_config(0)).await;
    create_many(&app, 3).await;
    let before = prost_types::Timestamp {
        seconds: kluis::domain::now_us() / 1_000_000 + 1,
        nanos: 0,
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    rotate(&app).await;
    app.keys.rewrap_all(0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    retire(&app, 1).await.unwrap();
    let deps = |s: pb::KeyStatusResponse| {
        let b = s.backup.unwrap();
        let keys: Vec<(String, u32, bool)> = b
            .keys
            .iter()
            .map(|k| (k.kind.clone(), k.version, k.retire_time.is_some()))
            .collect();
        (b.root_versions.len(), keys, b.unrecoverable)
    };
    let old = app
        .admin()
        .key_status(pb::KeyStatusRequest {
            backup_time: Some(before),
        })
        .await
        .unwrap()
        .into_inner();
    let (roots, keys, unrecoverable) = deps(old);
    assert_eq!(roots, 1);
    assert_eq!(
        keys,
        [
            ("blind-index".to_owned(), 1, false),
            ("kek".to_owned(), 1, true)
        ],
        "the backup needs KEK v1 (now retired) and index key v1"
    );
    assert!(!unrecoverable, "root v1 and index key v1 still exist");
    let now = app
        .admin()
        .key_status(pb::KeyStatusRequest {
            backup_time: Some(prost_types::Timestamp {
                seconds: kluis::domain::now_us() / 1_000_000 + 1,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let (_, keys, _) = deps(now);
    assert!(keys.contains(&("kek".to_owned(), 2, false)));
    assert!(!keys.iter().any(|k| k.0 == "kek" && k.1 == 1), "{keys:?}");
}

/// `kluis keys …` against the test database (the server may be running or not), with the tests'
/// keyring refresh interval of 0.2 s.
fn kluis_keys(db: &TestDb, args: &[&str]) -> std::process::Output {
    kluis_keys_refreshing(db, args, "0.2")
}

/// `kluis keys …` assuming instances reload their keyring every `refresh_seconds`.
fn kluis_keys_refreshing(
    db: &TestDb,
    args: &[&str],
    refresh_seconds: &str,
) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kluis"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KLUIS_DATA_DIR", db.data_dir())
        .env("KLUIS_LOG", "warn")
        .env("KLUIS_KEYRING_REFRESH_SECONDS", refresh_seconds)
        .arg("keys")
        .args(args);
    if postgres_mode() {
        cmd.env("KLUIS_DATABASE_URL", &db.url);
    }
    cmd.output().unwrap()
}

fn build_error(result: Result<kluis::Application, kluis::StartupError>) -> String {
    match result {
        Ok(_) => panic!("start-up should have been refused"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_root_key_rotation_only_the_new_version_starts_kluis() {
    let db = TestDb::new().await;
    let app = spawn_with(db.clone(), keys_config(0)).await;
    let subjects = create_many(&app, 5).await;
    let db = app.stop().await;
    let key_file = db.data_dir().join("root.key");
    let old_file = std::fs::read_to_string(&key_file).unwrap();

    let out = kluis_keys(&db, &["rotate-root"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let both = std::fs::read_to_string(&key_file).unwrap();
    assert!(both.contains("kluis-root-key v1 ") && both.contains("kluis-root-key v2 "));
    // Retiring the newest version is refused.
    let out = kluis_keys(&db, &["retire-root", "--root-version", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("newest"));
    // Right after the rotation an instance may not have read v2 yet: refused for a moment (a
    // 30 s refresh interval here, so a slow machine cannot outrun the window).
    let out = kluis_keys_refreshing(&db, &["retire-root", "--root-version", "1"], "30");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("less than the keyring refresh interval")
    );
    std::thread::sleep(Duration::from_millis(250));
    let out = kluis_keys(&db, &["retire-root", "--root-version", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_file = std::fs::read_to_string(&key_file).unwrap();
    assert!(
        !new_file.contains("kluis-root-key v1 "),
        "v1 destroyed in the key file"
    );

    // With only the new version: it starts, and every subject reads.
    let app = spawn_with(db.clone(), keys_config(0)).await;
    all_readable(&app, &subjects).await;
    let roots: Vec<(u32, bool)> = status(&app)
        .await
        .root_versions
        .iter()
        .map(|r| (r.version, r.retire_time.is_some()))
        .collect();
    assert_eq!(roots, [(1, true), (2, false)]);
    let db = app.stop().await;
    // With only the old one (a stale copy of the key file): refused, saying which it needs.
    std::fs::write(&key_file, &old_file).unwrap();
    let err = build_error(kluis::Application::build(&crate::helpers::serve_args(&db)).await);
    assert!(err.contains("root key v1 was retired"), "{err}");
    assert!(err.contains("v2"), "{err}");
    std::fs::write(&key_file, &new_file).unwrap();
    // The rotations are audited, as commands.
    let app = spawn_with(db, keys_config(0)).await;
    for method in ["cli.keys.rotate-root", "cli.keys.retire-root"] {
        let events = app
            .audit_events(pb::QueryAuditLogRequest {
                method: method.into(),
                ..Default::default()
            })
            .await;
        assert!(!events.is_empty(), "{method}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_unseals_the_root_key_and_a_wrong_one_stops_start_up() {
    let db = TestDb::new().await;
    let dir = db.data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let right = dir.join("passphrase");
    let wrong = dir.join("wrong-passphrase");
    std::fs::write(&right, "correct horse battery staple\n").unwrap();
    std::fs::write(&wrong, "correct horse battery stable\n").unwrap();
    let with = |file: std::path::PathBuf| {
        move |args: &mut kluis::ServeArgs| {
            args.root_passphrase_file = Some(file);
        }
    };
    let app = spawn_with(db.clone(), with(right.clone())).await;
    let subjects = create_many(&app, 3).await;
    let db = app.stop().await;
    assert!(dir.join("root.key.sealed").exists());
    assert!(
        !dir.join("root.key").exists(),
        "no plain key file with a passphrase"
    );
    let sealed = std::fs::read_to_string(dir.join("root.key.sealed")).unwrap();
    assert!(sealed.starts_with("kluis-sealed-root-key v1 argon2id m=65536,t=3,p=1 "));

    let mut args = crate::helpers::serve_args(&db);
    args.root_passphrase_file = Some(wrong);
    let err = build_error(kluis::Application::build(&args).await);
    assert!(err.contains("wrong passphrase"), "{err}");
    // No half-working service: nothing was bound or written.
    assert!(!dir.join("root.key").exists());

    let app = spawn_with(db, with(right)).await;
    all_readable(&app, &subjects).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_readable_by_others_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_with(TestDb::new().await, keys_config(0)).await;
    let db = app.stop().await;
    let key_file = db.data_dir().join("root.key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = build_error(kluis::Application::build(&crate::helpers::serve_args(&db)).await);
    assert!(err.contains("readable by group or others"), "{err}");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    spawn_with(db, keys_config(0)).await;
}

/// Tries to open a backed-up data key with `roots` and backed-up key rows: every KEK the roots
/// unwrap is tried on it. `None` when nothing opens it.
fn open_backup_dek(
    roots: &kluis::crypto::RootKeys,
    key_rows: &[(String, i64, i64, Vec<u8>)],
    subject: uuid::Uuid,
    dek_id: uuid::Uuid,
    wrapped_dek: &[u8],
) -> Option<kluis::crypto::SecretKey> {
    use kluis::crypto::{Keyring, SecretKey, WrappedKey};
    for (kind, version, root_version, wrapped) in key_rows {
        if kind != "kek" || wrapped.is_empty() {
            continue;
        }
        let version = *version as u32;
        let Ok(kek) = roots.unwrap(
            "kek",
            version,
            &WrappedKey {
                wrapping_version: *root_version as u32,
                bytes: wrapped.clone(),
            },
        ) else {
            continue;
        };
        let ring = Keyring::new(
            [(version, kek)].into_iter().collect(),
            version,
            1,
            SecretKey::random().unwrap(),
        )
        .unwrap();
        let dek = WrappedKey {
            wrapping_version: version,
            bytes: wrapped_dek.to_vec(),
        };
        if let Ok(key) = ring.unwrap_dek(subject, dek_id, &dek) {
            return Some(key);
        }
    }
    None
}

/// Whether any blind-index key that `roots` unwrap from `key_rows` gives `digest` for the e-mail
/// address (a backup's index entry confirmed against a guessed value).
fn matches_backup(
    roots: &kluis::crypto::RootKeys,
    key_rows: &[(String, i64, i64, Vec<u8>)],
    email: &str,
    digest: &[u8],
) -> bool {
    use kluis::crypto::{Keyring, SecretKey, WrappedKey};
    key_rows
        .iter()
        .any(|(kind, version, root_version, wrapped)| {
            if kind != "blind-index" || wrapped.is_empty() {
                return false;
            }
            let Ok(key) = roots.unwrap(
                "blind-index",
                *version as u32,
                &WrappedKey {
                    wrapping_version: *root_version as u32,
                    bytes: wrapped.clone(),
                },
            ) else {
                return false;
            };
            let ring = Keyring::new(
                [(1, SecretKey::random().unwrap())].into_iter().collect(),
                1,
                *version as u32,
                key,
            )
            .unwrap();
            ring.blind_index("contact.email", email).1.as_slice() == digest
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_crypto_period_procedure_a_backup_of_an_erased_subject_is_undecryptable_and_unmatchable()
 {
    use kluis::crypto::{RootKey, RootKeys};
    let db = TestDb::new().await;
    let app = spawn_with(db.clone(), keys_config(0)).await;
    let subject = app.create(full_subject(&tag())).await;
    let id = uuid::Uuid::parse_str(&subject.id).unwrap();
    // The backup: the database's keys and the subject's wrapped data key, as a dump would hold them.
    let raw = app.db.raw().await;
    let backup_keys = raw.key_rows().await;
    let dek_id = raw
        .bytes(
            "SELECT dek_id FROM data_keys WHERE subject_id = $1",
            id.as_bytes(),
        )
        .await;
    let dek_id = uuid::Uuid::from_slice(&dek_id).unwrap();
    let backup_digest = raw
        .bytes(
            "SELECT digest FROM blind_index WHERE subject_id = $1 AND path = 'contact.email'",
            id.as_bytes(),
        )
        .await;
    let wrapped_dek = raw
        .bytes(
            "SELECT wrapped_dek FROM data_keys WHERE subject_id = $1",
            id.as_bytes(),
        )
        .await;
    let backup_dir = db.data_dir().with_extension("backup");
    std::fs::create_dir_all(&backup_dir).unwrap();
    let whole_backup = raw.backup_into(&backup_dir.join("kluis.db")).await;
    raw.close().await;
    let key_file = db.data_dir().join("root.key");
    let roots_then =
        RootKeys::new(RootKey::parse_all(&std::fs::read_to_string(&key_file).unwrap()).unwrap());
    assert!(
        open_backup_dek(&roots_then, &backup_keys, id, dek_id, &wrapped_dek).is_some(),
        "with the keys of its day the backup opens (so the check below can fail)"
    );

    let email = subject.contact.clone().unwrap().email.to_lowercase();
    assert!(
        matches_backup(&roots_then, &backup_keys, &email, &backup_digest),
        "with the keys of its day the backup's index entry matches the address"
    );

    // The subject is erased; then the procedure: rotate the KEK and re-wrap, rotate the
    // blind-index key and re-index, rotate the root key, retire the old versions.
    app.subjects()
        .erase_subject(pb::EraseSubjectRequest {
            id: subject.id.clone(),
        })
        .await
        .unwrap();
    let _others = create_many(&app, 10).await;
    rotate(&app).await;
    app.keys.rewrap_all(0).await.unwrap();
    rotate_index(&app).await;
    let db = app.stop().await;
    // The re-index job runs in a server with the jobs on.
    let app = spawn_with(db, keys_config(20_000)).await;
    let started = Instant::now();
    while status(&app).await.reindex_pending > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "re-index stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(retire(&app, 1).await.unwrap());
    assert!(
        app.admin()
            .retire_index_key(pb::RetireIndexKeyRequest { version: 1 })
            .await
            .unwrap()
            .into_inner()
            .retired_now
    );
    let db = app.stop().await;
    for args in [
        &["rotate-root"][..],
        &["retire-root", "--root-version", "1"],
    ] {
        // (after the rotation, the refresh interval passes before the retirement)
        std::thread::sleep(Duration::from_millis(250));
        let out = kluis_keys(&db, args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // What still exists: the live key file and the live database's keys.
    let roots_now =
        RootKeys::new(RootKey::parse_all(&std::fs::read_to_string(&key_file).unwrap()).unwrap());
    assert_eq!(roots_now.versions().collect::<Vec<_>>(), [2]);
    let raw = db.raw().await;
    let live_keys = raw.key_rows().await;
    raw.close().await;
    assert!(
        open_backup_dek(&roots_now, &backup_keys, id, dek_id, &wrapped_dek).is_none(),
        "the backup's own KEK copies need root key v1, which is gone"
    );
    assert!(
        open_backup_dek(&roots_now, &live_keys, id, dek_id, &wrapped_dek).is_none(),
        "no live KEK opens it: KEK v1 is destroyed"
    );
    assert!(
        live_keys
            .iter()
            .any(|(kind, v, _, wrapped)| kind == "kek" && *v == 1 && wrapped.is_empty())
    );
    assert!(
        !matches_backup(&roots_now, &backup_keys, &email, &backup_digest),
        "the backup's own index key copies need root key v1"
    );
    assert!(
        !matches_backup(&roots_now, &live_keys, &email, &backup_digest),
        "no live blind-index key confirms the address: v1 is destroyed"
    );
    // The whole backup restored beside today's key file: kluis refuses it (SQLite, where the test
    // takes a whole-database copy; on PostgreSQL the rows above stand for it).
    if whole_backup {
        std::fs::copy(&key_file, backup_dir.join("root.key")).unwrap();
        let restored =
            kluis::ServeArgs::new("127.0.0.1:0".parse().unwrap(), backup_dir.clone(), None);
        let err = build_error(kluis::Application::build(&restored).await);
        assert!(err.contains("root key does not match"), "{err}");
    }
    // KeyStatus tells the same: everything that backup needs is retired.
    let app = spawn_with(db, keys_config(0)).await;
    let deps = app
        .admin()
        .key_status(pb::KeyStatusRequest {
            backup_time: subject.create_time,
        })
        .await
        .unwrap()
        .into_inner()
        .backup
        .unwrap();
    let retired: Vec<(String, u32, bool)> = deps
        .keys
        .iter()
        .map(|k| (k.kind.clone(), k.version, k.retire_time.is_some()))
        .collect();
    assert!(
        retired.contains(&("kek".to_owned(), 1, true)),
        "{retired:?}"
    );
    assert!(deps.root_versions.iter().all(|r| r.retire_time.is_some()));
    assert!(deps.unrecoverable, "{deps:?}");
}

/// Subjects created with their ids and e-mail addresses.
async fn create_with_emails(app: &TestApp, n: usize) -> Vec<(String, String, String)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (n - out.len()).min(16);
        let created =
            futures_util::future::join_all((0..batch).map(|_| app.create(full_subject(&tag()))))
                .await;
        out.extend(
            created
                .into_iter()
                .map(|s| (s.id, s.contact.unwrap().email, s.account.unwrap().username)),
        );
    }
    out
}

async fn find_email(client: &mut crate::helpers::Subjects, email: &str) -> Vec<String> {
    client
        .find_subjects(pb::FindSubjectsRequest {
            key: Some(pb::find_subjects_request::Key::Email(email.to_owned())),
        })
        .await
        .unwrap()
        .into_inner()
        .subject_ids
}

async fn rotate_index(app: &TestApp) -> u32 {
    app.admin()
        .rotate_index_key(pb::RotateIndexKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_find_every_subject_while_the_blind_index_key_is_rotated() {
    let db = TestDb::new().await;
    // The re-index job off at first: every old subject stays under index key v1 for now.
    let app = spawn_with(db.clone(), keys_config(0)).await;
    let old = create_with_emails(&app, 30).await;
    assert_eq!(rotate_index(&app).await, 2);
    let new = create_with_emails(&app, 5).await;
    let s = status(&app).await;
    assert_eq!((s.active_index_key_version, s.reindex_pending), (2, 30));
    let mut client = app.subjects();
    for (id, email, _) in old.iter().chain(&new) {
        assert_eq!(
            &find_email(&mut client, email).await,
            std::slice::from_ref(id),
            "{email}"
        );
    }
    // A username taken under the old key is still taken.
    let mut dup = full_subject(&tag());
    dup.account = Some(pb::Account {
        username: old[0].2.clone(),
    });
    let err = client
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(dup),
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // Retiring v1 is refused while subjects use it.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let err = app
        .admin()
        .retire_index_key(pb::RetireIndexKeyRequest { version: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("30 subjects"), "{}", err.message());
    let db = app.stop().await;

    // With the job on (and slow: 30 subjects take 3 s, several rounds of lookups even on a loaded
    // machine), lookups go on while it runs and never miss.
    let app = spawn_with(db, |args| {
        args.keys.refresh_seconds = 0.2;
        args.keys.rewrap_rate = 10;
        args.keys.rewrap_batch = 2;
    })
    .await;
    let mut client = app.subjects();
    let mut during = 0;
    let started = Instant::now();
    loop {
        let pending = status(&app).await.reindex_pending;
        for (id, email, _) in old.iter().chain(&new) {
            assert_eq!(
                &find_email(&mut client, email).await,
                std::slice::from_ref(id),
                "{email}"
            );
            during += u64::from(pending > 0);
        }
        if pending == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "re-index stalled"
        );
    }
    assert!(during > 35, "lookups ran while the job did ({during})");
    let retired = app
        .admin()
        .retire_index_key(pb::RetireIndexKeyRequest { version: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(retired.retired_now);
    assert_eq!(
        app.raw_count("SELECT COUNT(*) FROM blind_index WHERE key_version = 1")
            .await,
        0
    );
    for (id, email, _) in old.iter().chain(&new) {
        assert_eq!(
            &find_email(&mut client, email).await,
            std::slice::from_ref(id)
        );
    }
    // The job appends its event when a last pass finds nothing left, which comes one rate-limit
    // step after KeyStatus shows nothing pending: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = app
            .audit_events(pb::QueryAuditLogRequest {
                method: "keys.reindex".into(),
                ..Default::default()
            })
            .await;
        if !events.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the re-index job recorded no event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_key_version_is_not_retired_while_a_subject_with_older_entries_also_has_its_entries()
 {
    // Job off: subjects move between versions only by their own writes.
    let app = spawn_with(TestDb::new().await, keys_config(0)).await;
    let created = create_with_emails(&app, 1).await;
    let (id, email, _) = &created[0];
    assert_eq!(rotate_index(&app).await, 2);
    // A new username is indexed under v2; the e-mail address stays under v1.
    let username = format!("renamed{}", tag());
    app.subjects()
        .update_subject(pb::UpdateSubjectRequest {
            subject: Some(pb::Subject {
                id: id.clone(),
                account: Some(pb::Account {
                    username: username.clone(),
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["account.username".into()],
            }),
            expected_version: None,
            source: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(rotate_index(&app).await, 3);
    tokio::time::sleep(Duration::from_millis(250)).await;
    // v2 holds the subject's username entry even though its oldest entry is under v1.
    let err = app
        .admin()
        .retire_index_key(pb::RetireIndexKeyRequest { version: 2 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut client = app.subjects();
    assert_eq!(
        find_email(&mut client, email).await,
        std::slice::from_ref(id)
    );
    let by_username = client
        .find_subjects(pb::FindSubjectsRequest {
            key: Some(pb::find_subjects_request::Key::Username(username)),
        })
        .await
        .unwrap()
        .into_inner()
        .subject_ids;
    assert_eq!(by_username, std::slice::from_ref(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_a_stale_keyring_cannot_wrap_under_a_retired_kek() {
    let db = TestDb::new().await;
    let a = spawn_with(db.clone(), keys_config(0)).await;
    // B reloads its keyring only every minute (a misconfigured or cut-off instance).
    let b = spawn_with(db.clone(), stale_config).await;
    let before = create_many(&b, 2).await;
    assert_eq!(rotate(&a).await, 2);
    a.keys.rewrap_all(0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(retire(&a, 1).await.unwrap());
    // B still wraps under v1: the database refuses, B reloads, and the retry works.
    let err = b
        .subjects()
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(full_subject(&tag())),
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let after = b.create(full_subject(&tag())).await;
    assert_eq!(data_keys(&status(&a).await), [(2, 3)]);
    all_readable(&b, &before).await;
    assert!(b.get(&after.id).await.is_ok());
}
