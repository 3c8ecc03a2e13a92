//! The audit trail: every call recorded (refused ones too), never a personal value, fail-closed
//! when it cannot be written, a keyed chain that verifies and breaks on each kind of tampering, and
//! one chain across instances.

use std::time::{Duration, Instant};

use kluis::api::pb;
use tonic::Code;

use crate::helpers::{Raw, TestApp, full_subject, spawn_kluis, spawn_on, spawn_with, tag};

fn all() -> pb::QueryAuditLogRequest {
    pb::QueryAuditLogRequest::default()
}

async fn verify(app: &TestApp) -> pb::VerifyAuditChainResponse {
    app.audit()
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Runs `sql` on the test database (tampering, triggers).
async fn exec(raw: &Raw, sql: &str) {
    let sql = sql.to_owned();
    match raw {
        Raw::Sqlite(p) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(p)
                .await
                .unwrap();
        }
        Raw::Pg(p) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(p)
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_audited_with_purpose_paths_outcome_and_policy_version() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    let backend = app.token_for("backend", "hosting-backend").await;
    let backend_id = backend.split('_').nth(1).unwrap().to_owned();
    let mut client = app.subjects_under(Some(&backend), Some("account"), None);
    let read = client
        .get_subject(pb::GetSubjectRequest {
            id: created.id.clone(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap();
    let request_id = read
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    // Refused: a path outside the grant asked explicitly; a purpose the role may not use.
    let denied = client
        .get_subject(pb::GetSubjectRequest {
            id: created.id.clone(),
            read_mask: Some(prost_types::FieldMask {
                paths: vec!["billing.vat_number".into()],
            }),
            view: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let wrong_purpose = app
        .subjects_under(Some(&backend), Some("marketing"), None)
        .get_subject(pb::GetSubjectRequest {
            id: created.id.clone(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_purpose.code(), Code::PermissionDenied);
    let no_purpose = app
        .subjects_under(Some(&backend), None, None)
        .get_subject(pb::GetSubjectRequest {
            id: created.id.clone(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(no_purpose.code(), Code::InvalidArgument);

    let events = app
        .audit_events(pb::QueryAuditLogRequest {
            caller: backend_id.clone(),
            ..all()
        })
        .await;
    assert_eq!(events.len(), 4, "{events:#?}");
    let ok = &events[0];
    assert_eq!(ok.method, "kluis.v1.SubjectService/GetSubject");
    assert_eq!(ok.role, "hosting-backend");
    assert_eq!(ok.purpose, "account");
    assert_eq!(ok.outcome, "OK");
    assert_eq!(ok.request_id, request_id);
    assert_eq!(ok.subject_ids, vec![created.id.clone()]);
    assert_eq!(ok.policy_version, "2019-08.1");
    assert!(ok.peer.starts_with("127.0.0.1:"), "peer {}", ok.peer);
    assert!(ok.read_paths.contains(&"contact.email".to_owned()));
    assert!(!ok.read_paths.iter().any(|p| p.starts_with("payment")));
    assert!(ok.masked_paths.contains(&"payment.iban".to_owned()));
    assert!(ok.withheld_paths.contains(&"billing.vat_number".to_owned()));
    assert!(ok.time.as_ref().unwrap().seconds > 1_700_000_000);
    assert_eq!(
        (events[1].outcome.as_str(), events[1].purpose.as_str()),
        ("PERMISSION_DENIED", "account")
    );
    // A refused read names its subject and what was refused.
    assert_eq!(events[1].subject_ids, vec![created.id.clone()]);
    assert_eq!(events[1].detail, "denied=billing.vat_number");
    assert_eq!(events[2].subject_ids, vec![created.id.clone()]);
    assert_eq!(
        (events[2].outcome.as_str(), events[2].purpose.as_str()),
        ("PERMISSION_DENIED", "marketing")
    );
    assert_eq!(
        (events[3].outcome.as_str(), events[3].purpose.as_str()),
        ("INVALID_ARGUMENT", "")
    );

    // The operator's create: written paths, reason, in the subject's history.
    let history = app
        .audit_events(pb::QueryAuditLogRequest {
            subject_id: created.id.clone(),
            method: "kluis.v1.SubjectService/CreateSubject".into(),
            ..all()
        })
        .await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].written_paths.len(), 26);
    assert_eq!(history[0].reason, crate::helpers::OPERATOR_REASON);
    assert_eq!(history[0].purpose, "subject-request");

    // Filters: by outcome (in any of its spellings), and a page at a time.
    for spelling in ["permission_denied", "PermissionDenied", "PERMISSION_DENIED"] {
        let refused = app
            .audit_events(pb::QueryAuditLogRequest {
                outcome: spelling.into(),
                caller: backend_id.clone(),
                ..all()
            })
            .await;
        assert_eq!(refused.len(), 2, "{spelling}");
    }
    // Filters that could never match are refused, not answered with nothing.
    for (bad, field) in [
        (
            pb::QueryAuditLogRequest {
                caller: "backend".into(),
                ..all()
            },
            "caller",
        ),
        (
            pb::QueryAuditLogRequest {
                purpose: "sales".into(),
                ..all()
            },
            "purpose",
        ),
        (
            pb::QueryAuditLogRequest {
                outcome: "Denied".into(),
                ..all()
            },
            "outcome",
        ),
        (
            pb::QueryAuditLogRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: 20,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: 10,
                    nanos: 0,
                }),
                ..all()
            },
            "end_time",
        ),
    ] {
        let err = app.audit().query_audit_log(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let page = app
        .audit()
        .query_audit_log(pb::QueryAuditLogRequest {
            page_size: 2,
            ..all()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let next = app
        .audit()
        .query_audit_log(pb::QueryAuditLogRequest {
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..all()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(next.events[0].seq > page.events[1].seq);

    // Non-operators cannot read the trail.
    let denied = crate::helpers::TestApp::bearer(Some(&backend), None, None);
    let mut foreign =
        pb::audit_service_client::AuditServiceClient::with_interceptor(app.channel(), denied);
    assert_eq!(
        foreign.query_audit_log(all()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_not_audited() {
    let app = spawn_kluis().await;
    for _ in 0..3 {
        assert!(kluis::api::check_health(app.addr, None).await.unwrap());
    }
    let count = app.raw_count("SELECT COUNT(*) FROM audit_events").await;
    assert_eq!(count, 0, "health checks left audit events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_never_hold_a_personal_value() {
    let app = spawn_kluis().await;
    let canary = format!("Canary{}", tag());
    let mut subject = full_subject(&canary);
    subject.name.as_mut().unwrap().given = format!("{canary}given");
    let created = app.create(subject).await;
    let email = format!("klant.{}@example.nl", canary.to_lowercase());
    let mut s = app.subjects();
    s.find_subjects(pb::FindSubjectsRequest {
        key: Some(pb::find_subjects_request::Key::Email(email.clone())),
    })
    .await
    .unwrap();
    s.find_subjects(pb::FindSubjectsRequest {
        key: Some(pb::find_subjects_request::Key::Iban(
            "NL91ABNA0417164300".into(),
        )),
    })
    .await
    .unwrap();
    s.update_subject(pb::UpdateSubjectRequest {
        subject: Some(pb::Subject {
            id: created.id.clone(),
            name: Some(pb::Name {
                given: format!("{canary}new"),
                family: String::new(),
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["name.given".into()],
        }),
        expected_version: None,
        source: String::new(),
    })
    .await
    .unwrap();
    // A refused write carrying a canary, and a read.
    let backend = app.token_for("backend", "hosting-backend").await;
    let err = app
        .subjects_under(Some(&backend), Some("account"), None)
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(full_subject(&format!("{canary}x"))),
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    app.get(&created.id).await.unwrap();

    let raw = app.db.raw().await;
    let bodies: Vec<Vec<u8>> = match &raw {
        Raw::Sqlite(p) => sqlx::query_scalar("SELECT body FROM audit_events")
            .fetch_all(p)
            .await
            .unwrap(),
        Raw::Pg(p) => sqlx::query_scalar("SELECT body FROM audit_events")
            .fetch_all(p)
            .await
            .unwrap(),
    };
    assert!(bodies.len() >= 7);
    let stored = bodies
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    let queried = format!("{:?}", app.audit_events(all()).await);
    for text in [&stored, &queried] {
        let lower = text.to_lowercase();
        for value in [
            canary.to_lowercase(),
            email.clone(),
            "nl91abna0417164300".into(),
            "+31853033451".into(),
            "192.0.2.10".into(),
            "koningsweg".into(),
        ] {
            assert!(
                !lower.contains(&value),
                "audit trail holds a personal value"
            );
        }
    }
    assert!(
        stored.contains("lookup=contact.email"),
        "the lookup path is recorded"
    );
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_recorded_once_per_address_and_window() {
    let db = crate::helpers::TestDb::new().await;
    let app = spawn_with(db, |args| args.audit.auth_failure_window_seconds = 1).await;
    let bad =
        "kluis_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000";
    for _ in 0..5 {
        let err = app
            .subjects_as(Some(bad))
            .get_subject(pb::GetSubjectRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = app
            .audit_events(pb::QueryAuditLogRequest {
                method: "auth.failed".into(),
                ..all()
            })
            .await;
        let total: u32 = events.iter().map(|e| e.count).sum();
        if total == 5 {
            assert_eq!(
                events.len(),
                2,
                "one at once, the rest counted: {events:#?}"
            );
            assert_eq!(events[0].count, 1);
            assert_eq!(events[0].outcome, "UNAUTHENTICATED");
            assert_eq!(events[0].peer, "127.0.0.1");
            assert_eq!(events[0].caller, "");
            assert_eq!(events[1].count, 4);
            break;
        }
        assert!(total < 5 && Instant::now() < deadline, "{events:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_audit_write_refuses_the_call_and_returns_no_data() {
    let app = spawn_kluis().await;
    let created = app.create(full_subject(&tag())).await;
    let raw = app.db.raw().await;
    let subjects_before = raw.count_all("SELECT COUNT(*) FROM subjects").await;
    match &raw {
        Raw::Sqlite(_) => {
            exec(
                &raw,
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events \
                 BEGIN SELECT RAISE(ABORT, 'audit disk full'); END",
            )
            .await
        }
        Raw::Pg(_) => {
            exec(
                &raw,
                "CREATE FUNCTION refuse_audit() RETURNS trigger AS $$ \
                 BEGIN RAISE EXCEPTION 'audit disk full'; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events \
                 FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
            )
            .await
        }
    }
    let read = app.get(&created.id).await.unwrap_err();
    assert_eq!(read.code(), Code::Unavailable, "a read whose event fails");
    let write = app
        .subjects()
        .create_subject(pb::CreateSubjectRequest {
            subject: Some(full_subject(&tag())),
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(write.code(), Code::Unavailable, "a write whose event fails");
    assert_eq!(
        raw.count_all("SELECT COUNT(*) FROM subjects").await,
        subjects_before,
        "the write left nothing behind"
    );
    match &raw {
        Raw::Sqlite(_) => exec(&raw, "DROP TRIGGER refuse_audit").await,
        Raw::Pg(_) => exec(&raw, "DROP TRIGGER refuse_audit ON audit_events").await,
    }
    app.get(&created.id).await.unwrap();
    assert!(verify(&app).await.intact);
    raw.close().await;
}

/// Mixed workload: creates, reads, finds, updates, refusals, erasure.
async fn mixed_workload(app: &TestApp) {
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.create(full_subject(&tag())).await.id);
    }
    let backend = app.token_for("backend", "hosting-backend").await;
    let mut c = app.subjects_under(Some(&backend), Some("account"), None);
    for id in &ids {
        c.get_subject(pb::GetSubjectRequest {
            id: id.clone(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap();
        let _ = c
            .get_subject(pb::GetSubjectRequest {
                id: id.clone(),
                read_mask: Some(prost_types::FieldMask {
                    paths: vec!["payment.psp_token".into(), "billing.company_name".into()],
                }),
                view: 0,
            })
            .await
            .unwrap_err();
    }
    app.subjects()
        .batch_get_subjects(pb::BatchGetSubjectsRequest {
            ids: ids.clone(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap();
    app.subjects()
        .erase_subject(pb::EraseSubjectRequest { id: ids[0].clone() })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_verifies_after_a_mixed_workload_and_each_kind_of_tampering_is_found() {
    let app = spawn_kluis().await;
    mixed_workload(&app).await;
    let report = verify(&app).await;
    assert!(report.intact, "{report:?}");
    assert!(report.events_checked >= 18, "{report:?}");
    // A checkpoint of the current head, in the database and in the file.
    let cp = app.trail.checkpoint().await.unwrap().unwrap();
    let raw = app.db.raw().await;
    let last: i64 = raw.count_all("SELECT MAX(seq) FROM audit_events").await;
    assert!(cp.seq >= last - 1, "checkpoint {} head {last}", cp.seq);
    let k = 7i64;

    // 1. A body edited.
    exec(
        &raw,
        &format!("UPDATE audit_events SET body = body || body WHERE seq = {k}"),
    )
    .await;
    let broken = verify(&app).await;
    assert!(!broken.intact);
    assert_eq!(broken.broken_at_seq, k, "{broken:?}");
    let original: Vec<u8> = match &raw {
        Raw::Sqlite(p) => sqlx::query_scalar(
            "SELECT substr(body, 1, length(body) / 2) FROM audit_events WHERE seq = $1",
        )
        .bind(k)
        .fetch_one(p)
        .await
        .unwrap(),
        Raw::Pg(p) => sqlx::query_scalar(
            "SELECT substring(body from 1 for length(body) / 2) FROM audit_events WHERE seq = $1",
        )
        .bind(k)
        .fetch_one(p)
        .await
        .unwrap(),
    };
    match &raw {
        Raw::Sqlite(p) => {
            sqlx::query("UPDATE audit_events SET body = $1 WHERE seq = $2")
                .bind(original)
                .bind(k)
                .execute(p)
                .await
                .unwrap();
        }
        Raw::Pg(p) => {
            sqlx::query("UPDATE audit_events SET body = $1 WHERE seq = $2")
                .bind(original)
                .bind(k)
                .execute(p)
                .await
                .unwrap();
        }
    }
    assert!(verify(&app).await.intact, "restored");

    // 2. A query column edited to hide the event from queries.
    let caller: String = match &raw {
        Raw::Sqlite(p) => sqlx::query_scalar("SELECT caller FROM audit_events WHERE seq = $1")
            .bind(k)
            .fetch_one(p)
            .await
            .unwrap(),
        Raw::Pg(p) => sqlx::query_scalar("SELECT caller FROM audit_events WHERE seq = $1")
            .bind(k)
            .fetch_one(p)
            .await
            .unwrap(),
    };
    exec(
        &raw,
        &format!("UPDATE audit_events SET caller = 'someone-else' WHERE seq = {k}"),
    )
    .await;
    let broken = verify(&app).await;
    assert_eq!(broken.broken_at_seq, k, "{broken:?}");
    assert!(broken.problem.contains("caller"), "{}", broken.problem);
    exec(
        &raw,
        &format!("UPDATE audit_events SET caller = '{caller}' WHERE seq = {k}"),
    )
    .await;
    assert!(verify(&app).await.intact, "restored");
    exec(&raw, "DROP TABLE IF EXISTS audit_scratch").await;
    exec(
        &raw,
        "CREATE TABLE audit_scratch AS SELECT * FROM audit_events",
    )
    .await;
    // 3. An event deleted in the middle.
    exec(
        &raw,
        &format!("DELETE FROM audit_events WHERE seq = {}", k + 2),
    )
    .await;
    let broken = verify(&app).await;
    assert!(!broken.intact);
    assert!(
        broken.broken_at_seq == k || broken.broken_at_seq == k + 2 || broken.broken_at_seq == k + 3,
        "{broken:?}"
    );
    exec(
        &raw,
        &format!(
            "INSERT INTO audit_events SELECT * FROM audit_scratch WHERE seq = {}",
            k + 2
        ),
    )
    .await;
    assert!(verify(&app).await.intact, "restored");
    // 4. An event inserted: a copy of a genuine one appended after the head.
    let head: i64 = raw.count_all("SELECT MAX(seq) FROM audit_events").await;
    exec(
        &raw,
        &format!(
            "INSERT INTO audit_events (seq, at_us, caller, purpose, method, outcome, subjects, body, mac) \
             SELECT {}, at_us, caller, purpose, method, outcome, subjects, body, mac FROM audit_events WHERE seq = {k}",
            head + 1
        ),
    )
    .await;
    // (The server cannot append after a forged row: its next event would collide with it, so the
    // call fails closed. The check runs on the trail directly.)
    let broken = app.trail.verify(&[]).await.unwrap().unwrap_err();
    assert_eq!(broken.seq(), head + 1, "{broken}");
    assert_eq!(
        app.get(&uuid::Uuid::new_v4().to_string())
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable,
        "appending after a forged event fails closed"
    );
    exec(
        &raw,
        &format!("DELETE FROM audit_events WHERE seq = {}", head + 1),
    )
    .await;
    // 5. The tail cut off together with its database checkpoints and the head moved back: the
    //    checkpoint file outside the database still tells.
    let cut = cp.seq - 3;
    exec(&raw, &format!("DELETE FROM audit_events WHERE seq > {cut}")).await;
    // (A thorough forger also trims the per-subject index and its mark.)
    exec(
        &raw,
        &format!("DELETE FROM audit_subjects WHERE seq > {cut}"),
    )
    .await;
    exec(
        &raw,
        &format!(
            "UPDATE audit_index_state SET indexed_seq = \
             CASE WHEN indexed_seq > {cut} THEN {cut} ELSE indexed_seq END"
        ),
    )
    .await;
    exec(
        &raw,
        &format!("DELETE FROM audit_checkpoints WHERE seq > {cut}"),
    )
    .await;
    exec(
        &raw,
        &format!(
            "UPDATE audit_head SET seq = {cut}, mac = (SELECT mac FROM audit_events WHERE seq = {cut})"
        ),
    )
    .await;
    let broken = verify(&app).await;
    assert!(!broken.intact);
    assert!(broken.problem.to_lowercase().contains("file"), "{broken:?}");
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_events_before_a_checkpoint_still_verify() {
    let app = spawn_kluis().await;
    mixed_workload(&app).await;
    let cp = app.trail.checkpoint().await.unwrap().unwrap();
    mixed_workload(&app).await;
    let pruned = app
        .trail
        .prune(kluis::domain::now_us() + 1_000_000)
        .await
        .unwrap();
    assert_eq!(pruned, cp.seq as u64, "pruned up to the checkpoint");
    let report = verify(&app).await;
    assert!(report.intact, "{report:?}");
    assert_eq!(report.first_seq, cp.seq + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_under_concurrent_load_keep_one_valid_chain() {
    let a = spawn_kluis().await;
    let b = spawn_on(a.db.clone()).await;
    let subject = a.create(full_subject(&tag())).await;
    let before = a.raw_count("SELECT COUNT(*) FROM audit_events").await;
    let per_task = 40;
    let mut tasks = Vec::new();
    for app in [&a, &b] {
        for n in 0..4 {
            let mut client = app.subjects();
            let id = subject.id.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_task {
                    if (i + n) % 5 == 0 {
                        client
                            .create_subject(pb::CreateSubjectRequest {
                                subject: Some(full_subject(&tag())),
                                source: String::new(),
                            })
                            .await
                            .unwrap();
                    } else {
                        client
                            .get_subject(pb::GetSubjectRequest {
                                id: id.clone(),
                                read_mask: None,
                                view: 0,
                            })
                            .await
                            .unwrap();
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = a.raw_count("SELECT COUNT(*) FROM audit_events").await;
    assert_eq!(
        after - before,
        2 * 4 * per_task as i64,
        "one event per call"
    );
    let report = verify(&b).await;
    assert!(report.intact, "{report:?}");
    assert_gap_free_chain(&a).await;
}

/// Asserts the events are numbered 1..n without gaps, the head at n; returns n.
async fn assert_gap_free_chain(app: &TestApp) -> i64 {
    let raw = app.db.raw().await;
    let (count, max, head): (i64, i64, i64) = (
        raw.count_all("SELECT COUNT(*) FROM audit_events").await,
        raw.count_all("SELECT MAX(seq) FROM audit_events").await,
        raw.count_all("SELECT seq FROM audit_head").await,
    );
    raw.close().await;
    assert_eq!((max, head), (count, count), "seq 1..n without gaps");
    max
}

/// Reads answered alternately by two instances on one database: each one's event links to the
/// head the other instance left (an instance that linked to a head it remembered would fork the
/// chain or collide on its sequence number).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_alternating_between_two_instances_extend_one_chain_in_turn() {
    let a = spawn_kluis().await;
    let b = spawn_on(a.db.clone()).await;
    let subject = a.create(full_subject(&tag())).await;
    let before = a.raw_count("SELECT MAX(seq) FROM audit_events").await;
    for _ in 0..5 {
        a.get(&subject.id).await.unwrap();
        b.get(&subject.id).await.unwrap();
    }
    let max = assert_gap_free_chain(&a).await;
    assert_eq!(max - before, 10, "one event per get, none lost");
    for app in [&a, &b] {
        let report = verify(app).await;
        assert!(report.intact, "{report:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_history_is_complete_before_and_after_the_index_catches_up() {
    let app = spawn_kluis().await;
    let one = app.create(full_subject(&tag())).await;
    let other = app.create(full_subject(&tag())).await;
    async fn history(app: &TestApp, id: &str) -> Vec<pb::AuditEvent> {
        app.audit_events(pb::QueryAuditLogRequest {
            subject_id: id.to_owned(),
            ..all()
        })
        .await
    }
    for _ in 0..3 {
        app.get(&one.id).await.unwrap();
    }
    app.get(&other.id).await.unwrap();
    // Wait until the indexer has taken these events in, then add more that it has not.
    let deadline = Instant::now() + Duration::from_secs(10);
    let appended = app.raw_count("SELECT MAX(seq) FROM audit_events").await;
    while app
        .raw_count("SELECT indexed_seq FROM audit_index_state")
        .await
        < appended
    {
        assert!(Instant::now() < deadline, "the indexer did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.subjects()
        .batch_get_subjects(pb::BatchGetSubjectsRequest {
            ids: vec![one.id.clone(), other.id.clone(), one.id.clone()],
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap();
    let events = history(&app, &one.id).await;
    let methods: Vec<&str> = events.iter().map(|e| e.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "kluis.v1.SubjectService/CreateSubject",
            "kluis.v1.SubjectService/GetSubject",
            "kluis.v1.SubjectService/GetSubject",
            "kluis.v1.SubjectService/GetSubject",
            "kluis.v1.SubjectService/BatchGetSubjects",
        ]
    );
    assert!(events.iter().all(|e| e.subject_ids.contains(&one.id)));
    // Once indexed, the same answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let indexed = app
            .raw_count("SELECT indexed_seq FROM audit_index_state")
            .await;
        if indexed >= events.last().unwrap().seq {
            break;
        }
        assert!(Instant::now() < deadline, "the indexer did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = history(&app, &one.id).await;
    assert_eq!(
        again.iter().map(|e| e.seq).collect::<Vec<_>>()[..5],
        events.iter().map(|e| e.seq).collect::<Vec<_>>()[..]
    );

    // The index is checked too: an index row deleted to hide a read from the subject's history
    // breaks verification at that event.
    let hidden = events[1].seq;
    let raw = app.db.raw().await;
    exec(
        &raw,
        &format!("CREATE TABLE index_scratch AS SELECT * FROM audit_subjects WHERE seq = {hidden}"),
    )
    .await;
    exec(
        &raw,
        &format!("DELETE FROM audit_subjects WHERE seq = {hidden}"),
    )
    .await;
    let broken = app.trail.verify(&[]).await.unwrap().unwrap_err();
    assert_eq!(broken.seq(), hidden, "{broken}");
    assert!(broken.to_string().contains("index"), "{broken}");
    exec(
        &raw,
        "INSERT INTO audit_subjects SELECT * FROM index_scratch",
    )
    .await;
    assert!(app.trail.verify(&[]).await.unwrap().is_ok(), "restored");
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_before_their_handler_and_unknown_callers_are_audited_once() {
    let app = spawn_kluis().await;
    // A method kluis does not have, called with a valid token: tonic answers UNIMPLEMENTED before
    // any handler runs.
    let mut grpc = tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(
        app.channel(),
        crate::helpers::TestApp::bearer(Some(&app.operator_token), Some("subject-request"), None),
    ));
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<pb::GetSubjectRequest, pb::GetSubjectResponse, _>(
            tonic::Request::new(pb::GetSubjectRequest::default()),
            http::uri::PathAndQuery::from_static("/kluis.v1.SubjectService/NoSuchMethod"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let events = app
        .audit_events(pb::QueryAuditLogRequest {
            method: "kluis.v1.SubjectService/NoSuchMethod".into(),
            ..all()
        })
        .await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].outcome, "UNIMPLEMENTED");
    assert_eq!(events[0].purpose, "subject-request");

    // Revoking a caller that does not exist: one event, NOT_FOUND.
    let err = app
        .admin()
        .revoke_caller_token(pb::RevokeCallerTokenRequest {
            id: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let events = app
        .audit_events(pb::QueryAuditLogRequest {
            method: "kluis.v1.AdminService/RevokeCallerToken".into(),
            ..all()
        })
        .await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].outcome, "NOT_FOUND");
}
