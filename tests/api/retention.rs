//! The retention engine (DESIGN.md §2, "What keeps a path alive") through the real server:
//! processing records and their close events, retention-restricted reads, sweeps that purge what
//! lost its last basis and crypto-shred what has nothing left, legal holds, the privacy officer's
//! report, refused inputs that change nothing, two instances sweeping at once, the background
//! sweeper, and no personal value in the logs or the audit trail. The server's clock is moved
//! years ahead with `app.clock.advance_us`.

use std::{collections::BTreeSet, time::Duration};

use kluis::{
    api::pb::{self, PathRetentionState as State},
    policy::Period,
};
use prost_types::Timestamp;
use tonic::{Code, Status};

use crate::helpers::{
    Retention, Subjects, TestApp, TestDb, captured_logs, full_subject, spawn_with, tag,
};

const SECOND_US: i64 = 1_000_000;
const DAY_US: i64 = 86_400 * SECOND_US;
const PURGE: &str = "kluis.retention/Purge";
const SHRED: &str = "kluis.retention/Shred";
const SWEEPER: &str = "kluis-retention";

/// The paths the `order` purpose grants that `order_subject` stores.
const ORDER_PATHS: &[&str] = &[
    "address.city",
    "address.country",
    "address.house_number",
    "address.house_number_addition",
    "address.postal_code",
    "address.street",
    "billing.address.city",
    "billing.address.country",
    "billing.address.house_number",
    "billing.address.house_number_addition",
    "billing.address.postal_code",
    "billing.address.street",
    "billing.company_name",
    "billing.vat_number",
    "contact.email",
    "ip_addresses",
    "name.family",
    "name.given",
];

// ---- helpers ----------------------------------------------------------------------------------

/// A server whose background sweeper is off, so only the test's sweeps (and closes) purge.
async fn spawn_quiet() -> TestApp {
    spawn_with(TestDb::new().await, |args| args.retention.sweep_seconds = 0).await
}

/// A subject storing exactly what the `order` purpose grants (naw, network, e-mail, billing).
fn order_subject(t: &str) -> pb::Subject {
    let mut s = full_subject(t);
    s.contact.as_mut().unwrap().phone.clear();
    s.payment = None;
    s.profile = None;
    s.account = None;
    s.activity_log.clear();
    s
}

fn set(paths: &[&str]) -> BTreeSet<String> {
    paths.iter().map(|p| p.to_string()).collect()
}

fn us(ts: &Timestamp) -> i64 {
    ts.seconds * SECOND_US + i64::from(ts.nanos) / 1000
}

fn timestamp(us: i64) -> Timestamp {
    Timestamp {
        seconds: us.div_euclid(SECOND_US),
        nanos: i32::try_from(us.rem_euclid(SECOND_US) * 1000).unwrap(),
    }
}

fn seven_years_after(us: i64) -> i64 {
    Period {
        years: 7,
        ..Period::ZERO
    }
    .after(us)
}

/// Moves the server's clock so that its now is `target_us` (plus the few µs the call takes).
fn jump_to(app: &TestApp, target_us: i64) {
    let now = app.clock.now_us();
    assert!(target_us > now, "the clock only moves forward");
    app.clock.advance_us(target_us - now);
}

/// The paths of a subject `client` sees (GetSubject, full view: one metadata entry per path).
async fn visible(client: &mut Subjects, id: &str) -> Result<BTreeSet<String>, Status> {
    let subject = client
        .get_subject(pb::GetSubjectRequest {
            id: id.into(),
            read_mask: None,
            view: pb::SubjectView::Full as i32,
        })
        .await?
        .into_inner()
        .subject
        .unwrap();
    Ok(subject.field_metadata.into_iter().map(|m| m.path).collect())
}

async fn find(client: &mut Subjects, key: pb::find_subjects_request::Key) -> Vec<String> {
    client
        .find_subjects(pb::FindSubjectsRequest { key: Some(key) })
        .await
        .unwrap()
        .into_inner()
        .subject_ids
}

async fn open(
    client: &mut Retention,
    subject: &str,
    purpose: &str,
    reference: &str,
) -> Result<pb::OpenProcessingResponse, Status> {
    client
        .open_processing(pb::OpenProcessingRequest {
            subject_id: subject.into(),
            purpose: purpose.into(),
            reference: reference.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn close(
    client: &mut Retention,
    purpose: &str,
    reference: &str,
    event: &str,
    at: Option<i64>,
) -> Result<pb::CloseProcessingResponse, Status> {
    client
        .close_processing(pb::CloseProcessingRequest {
            purpose: purpose.into(),
            reference: reference.into(),
            event: event.into(),
            at: at.map(timestamp),
        })
        .await
        .map(|r| r.into_inner())
}

async fn sweep(app: &TestApp) -> pb::SweepResponse {
    app.retention()
        .sweep(pb::SweepRequest::default())
        .await
        .unwrap()
        .into_inner()
}

async fn status(app: &TestApp, id: &str) -> pb::GetRetentionResponse {
    app.retention()
        .get_retention(pb::GetRetentionRequest {
            subject_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn report(app: &TestApp) -> pb::RetentionReportResponse {
    app.retention()
        .retention_report(pb::RetentionReportRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn path_state<'a>(r: &'a pb::GetRetentionResponse, path: &str) -> &'a pb::PathRetention {
    r.paths
        .iter()
        .find(|p| p.path == path)
        .unwrap_or_else(|| panic!("{path} not listed: {:?}", r.paths))
}

fn state_of(r: &pb::GetRetentionResponse, path: &str) -> State {
    State::try_from(path_state(r, path).state).unwrap()
}

fn listed(r: &pb::GetRetentionResponse) -> BTreeSet<String> {
    r.paths.iter().map(|p| p.path.clone()).collect()
}

/// The sweeper's purge and shred events of one subject.
async fn sweep_events(app: &TestApp, id: &str) -> Vec<pb::AuditEvent> {
    let mut out = Vec::new();
    for method in [PURGE, SHRED] {
        out.extend(
            app.audit_events(pb::QueryAuditLogRequest {
                subject_id: id.into(),
                method: method.into(),
                ..Default::default()
            })
            .await,
        );
    }
    out
}

async fn rows_of(app: &TestApp, sql: &'static str, id: &str) -> i64 {
    let raw = app.db.raw().await;
    let n = raw
        .count(sql, uuid::Uuid::parse_str(id).unwrap().as_bytes())
        .await;
    raw.close().await;
    n
}

fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
    result.unwrap_err().code()
}

/// Creates a subject holding the `order` paths with an order record `reference` opened by
/// billing, and closes it now; returns the subject id and the record's `retain_until`.
pub(crate) async fn completed_order(
    app: &TestApp,
    billing: &str,
    reference: &str,
) -> (String, i64) {
    let id = app.create(order_subject(&tag())).await.id;
    let mut order = app.retention_under(billing, "order");
    assert!(
        open(&mut order, &id, "order", reference)
            .await
            .unwrap()
            .created
    );
    let closed = close(&mut order, "order", reference, "order_completed", None)
        .await
        .unwrap();
    assert!(closed.closed);
    let until = us(closed.record.unwrap().retain_until.as_ref().unwrap());
    (id, until)
}

// ---- 1. an order's seven years ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_order_is_kept_seven_years_for_billing_then_purged_and_the_subject_shredded() {
    let app = spawn_quiet().await;
    let billing = app.token_for("facturatie", "billing").await;
    let hosting = app.token_for("backend", "hosting-backend").await;
    let id = app.create(order_subject(&tag())).await.id;
    let mut order = app.retention_under(&billing, "order");
    let opened = open(&mut order, &id, "order", "INV-2026-0042")
        .await
        .unwrap();
    assert!(opened.created);
    let record = opened.record.unwrap();
    assert_eq!(
        (record.subject_id.as_str(), record.close_time),
        (id.as_str(), None)
    );
    // While the order is open every path is kept by it.
    let r = status(&app, &id).await;
    assert_eq!(listed(&r), set(ORDER_PATHS));
    for path in ORDER_PATHS {
        assert_eq!(state_of(&r, path), State::Kept, "{path}");
        assert_eq!(path_state(&r, path).kept_by, ["order/INV-2026-0042"]);
    }
    let mut hosting_order = app.subjects_under(Some(&hosting), Some("order"), None);
    assert!(visible(&mut hosting_order, &id).await.is_ok());

    let closed = close(
        &mut order,
        "order",
        "INV-2026-0042",
        "order_completed",
        None,
    )
    .await
    .unwrap();
    assert!(closed.closed);
    let record = closed.record.unwrap();
    assert_eq!(record.close_event, "order_completed");
    let completed = us(record.close_time.as_ref().unwrap());
    let until = us(record.retain_until.as_ref().unwrap());
    assert_eq!(
        until,
        seven_years_after(completed),
        "P7Y: same day 7 years on"
    );
    assert!(until - completed >= 7 * 365 * DAY_US);

    // Completion + 7 years − 1 day: still there, for billing under order only.
    jump_to(&app, until - DAY_US);
    let r = status(&app, &id).await;
    for path in ORDER_PATHS {
        let p = path_state(&r, path);
        assert_eq!(state_of(&r, path), State::RetentionRestricted, "{path}");
        assert_eq!(p.until.as_ref().map(us), Some(until), "{path}");
        assert!(p.kept_by.is_empty(), "{path}");
        assert_eq!(p.retained_for, ["order"], "{path}");
    }
    assert_eq!(r.next_due.as_ref().map(us), Some(until));
    let swept = sweep(&app).await;
    assert_eq!(
        (swept.subjects_purged, swept.subjects_shredded),
        (0, 0),
        "{swept:?}"
    );
    let billing_sees = visible(
        &mut app.subjects_under(Some(&billing), Some("order"), None),
        &id,
    )
    .await
    .unwrap();
    assert!(
        set(&["name.given", "contact.email", "billing.company_name"]).is_subset(&billing_sees),
        "{billing_sees:?}"
    );
    // Not a retention reader: to hosting the subject no longer exists.
    assert_eq!(code(visible(&mut hosting_order, &id).await), Code::NotFound);
    assert_eq!(
        app.get(&id).await.unwrap().field_metadata.len(),
        ORDER_PATHS.len()
    );

    // Completion + 7 years: due, and the sweep purges every path and shreds the subject.
    let rep = report(&app).await;
    assert_eq!(rep.due_subjects, 1, "due within the default 30 days");
    let due: BTreeSet<String> = rep
        .due
        .iter()
        .map(|d| {
            assert_eq!((d.purpose.as_str(), d.subjects), ("order", 1), "{d:?}");
            d.path.clone()
        })
        .collect();
    assert_eq!(due, set(ORDER_PATHS));
    jump_to(&app, until);
    let r = status(&app, &id).await;
    assert_eq!(state_of(&r, "name.given"), State::Due);
    assert!(path_state(&r, "name.given").retained_for.is_empty());
    let planned = app
        .retention()
        .sweep(pb::SweepRequest {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((planned.dry_run, planned.subjects_shredded), (true, 1));
    assert!(app.get(&id).await.is_ok(), "a dry run changes nothing");
    let swept = sweep(&app).await;
    assert_eq!(
        (
            swept.subjects_visited,
            swept.subjects_purged,
            swept.subjects_shredded
        ),
        (1, 0, 1),
        "{swept:?}"
    );
    assert_eq!(app.get(&id).await.unwrap_err().code(), Code::NotFound);
    // Shredded: the wrapped data key is gone with the row.
    let raw = app.db.raw().await;
    let idb = uuid::Uuid::parse_str(&id).unwrap();
    assert_eq!(
        raw.count(
            "SELECT COUNT(*) FROM data_keys WHERE subject_id = $1",
            idb.as_bytes()
        )
        .await,
        0
    );
    raw.close().await;
    assert_eq!(
        code(
            visible(
                &mut app.subjects_under(Some(&billing), Some("order"), None),
                &id
            )
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        rows_of(
            &app,
            "SELECT COUNT(*) FROM erased_subjects WHERE id = $1",
            &id
        )
        .await,
        1
    );
    assert_eq!(
        rows_of(
            &app,
            "SELECT COUNT(*) FROM processing_records WHERE subject_id = $1",
            &id
        )
        .await,
        0
    );
    assert_eq!(
        rows_of(
            &app,
            "SELECT COUNT(*) FROM blind_index WHERE subject_id = $1",
            &id
        )
        .await,
        0
    );
    let events = sweep_events(&app, &id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e.method.as_str(), e.caller.as_str(), e.outcome.as_str()),
        (SHRED, SWEEPER, "OK")
    );
    assert_eq!(e.subject_ids, std::slice::from_ref(&id));
    assert_eq!(
        e.written_paths.iter().cloned().collect::<BTreeSet<_>>(),
        set(ORDER_PATHS)
    );
    assert!(e.detail.contains("order"), "{}", e.detail);
    // A second sweep finds nothing left to do.
    let again = sweep(&app).await;
    assert_eq!(again.subjects_visited, 0, "{again:?}");
    let r = report(&app).await;
    assert_eq!((r.shredded_subjects, r.purged_subjects), (1, 0));
}

// ---- 2. an account closed while a subscription runs -------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_an_account_purges_its_own_paths_at_once_and_a_cancelled_subscription_keeps_the_rest_for_billing()
 {
    let app = spawn_quiet().await;
    let t = tag();
    let hosting = app.token_for("backend", "hosting-backend").await;
    let billing = app.token_for("facturatie", "billing").await;
    let mut s = full_subject(&t);
    s.ip_addresses.clear();
    s.activity_log.clear();
    s.payment = Some(pb::Payment {
        iban: "NL91ABNA0417164300".into(),
        ..Default::default()
    });
    let id = app.create(s).await.id;
    let email = format!("klant.{t}@example.nl");
    let username = format!("user{t}");
    let account_ref = format!("acct-{t}");
    let sub_ref = format!("sub-{t}");
    let mut as_hosting = app.retention_under(&hosting, "account");
    let mut as_billing = app.retention_under(&billing, "subscription");
    assert!(
        open(&mut as_hosting, &id, "account", &account_ref)
            .await
            .unwrap()
            .created
    );
    assert!(
        open(&mut as_billing, &id, "subscription", &sub_ref)
            .await
            .unwrap()
            .created
    );
    let mut operator = app.subjects();
    let by_username = pb::find_subjects_request::Key::Username(username.clone());
    let by_iban = pb::find_subjects_request::Key::Iban("NL91ABNA0417164300".into());
    assert_eq!(
        find(&mut operator, by_username.clone()).await,
        std::slice::from_ref(&id)
    );
    assert_eq!(
        find(&mut operator, by_iban.clone()).await,
        std::slice::from_ref(&id)
    );

    // The account closes: what only it granted goes before the answer.
    let closed = close(
        &mut as_hosting,
        "account",
        &account_ref,
        "account_closed",
        None,
    )
    .await
    .unwrap();
    assert!(closed.closed);
    let record = closed.record.unwrap();
    assert_eq!(record.retain_until, record.close_time, "P0D");
    let account_only = set(&["profile.gender", "payment.iban", "account.username"]);
    let stored = visible(&mut operator, &id).await.unwrap();
    assert!(stored.is_disjoint(&account_only), "{stored:?}");
    assert!(
        set(&[
            "name.given",
            "address.city",
            "contact.email",
            "contact.phone",
            "billing.vat_number"
        ])
        .is_subset(&stored),
        "{stored:?}"
    );
    assert!(find(&mut operator, by_username.clone()).await.is_empty());
    assert!(find(&mut operator, by_iban).await.is_empty());
    let events = sweep_events(&app, &id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].method, PURGE);
    assert_eq!(
        events[0]
            .written_paths
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>(),
        account_only
    );
    // The running subscription keeps the rest, for hosting under account too.
    let mut hosting_account = app.subjects_under(Some(&hosting), Some("account"), None);
    let seen = visible(&mut hosting_account, &id).await.unwrap();
    assert!(
        set(&["name.given", "contact.email", "contact.phone"]).is_subset(&seen),
        "{seen:?}"
    );
    let by_email = pb::find_subjects_request::Key::Email(email.clone());
    assert_eq!(
        find(&mut hosting_account, by_email.clone()).await,
        std::slice::from_ref(&id)
    );
    let r = status(&app, &id).await;
    assert_eq!(state_of(&r, "contact.phone"), State::Kept);
    assert_eq!(
        path_state(&r, "contact.phone").kept_by,
        [format!("subscription/{sub_ref}")]
    );
    assert!(listed(&r).is_disjoint(&account_only));

    // The subscription is cancelled: its paths are for billing under subscription only.
    let cancelled = close(
        &mut as_billing,
        "subscription",
        &sub_ref,
        "subscription_cancelled",
        None,
    )
    .await
    .unwrap();
    assert!(cancelled.closed);
    let until = us(cancelled.record.unwrap().retain_until.as_ref().unwrap());
    let billing_seen = visible(
        &mut app.subjects_under(Some(&billing), Some("subscription"), None),
        &id,
    )
    .await
    .unwrap();
    assert!(
        set(&[
            "billing.company_name",
            "contact.email",
            "contact.phone",
            "name.given"
        ])
        .is_subset(&billing_seen),
        "{billing_seen:?}"
    );
    assert_eq!(
        code(visible(&mut hosting_account, &id).await),
        Code::NotFound
    );
    assert!(
        find(&mut hosting_account, by_email.clone())
            .await
            .is_empty()
    );
    // Billing under account: the account's retention ran out at its close.
    assert_eq!(
        code(
            visible(
                &mut app.subjects_under(Some(&billing), Some("account"), None),
                &id
            )
            .await
        ),
        Code::NotFound
    );
    // Operators still find and see it all.
    assert_eq!(
        find(&mut operator, by_email).await,
        std::slice::from_ref(&id)
    );
    let r = status(&app, &id).await;
    for path in [
        "contact.email",
        "contact.phone",
        "name.given",
        "billing.vat_number",
    ] {
        let p = path_state(&r, path);
        assert_eq!(state_of(&r, path), State::RetentionRestricted, "{path}");
        assert_eq!(p.until.as_ref().map(us), Some(until), "{path}");
        assert_eq!(p.retained_for, ["subscription"], "{path}");
    }
    // Nothing is due before the seven years are over.
    let swept = sweep(&app).await;
    assert_eq!((swept.subjects_purged, swept.subjects_shredded), (0, 0));
    assert_eq!(visible(&mut operator, &id).await.unwrap(), stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_written_after_its_retention_ran_out_is_erased_by_the_next_sweep() {
    let app = spawn_quiet().await;
    let hosting = app.token_for("backend", "hosting-backend").await;
    let billing = app.token_for("facturatie", "billing").await;
    let mut s = order_subject(&tag());
    s.profile = Some(pb::Profile {
        gender: pb::Gender::Female as i32,
    });
    let id = app.create(s).await.id;
    let mut account = app.retention_under(&hosting, "account");
    open(&mut account, &id, "account", "acct-2b").await.unwrap();
    open(
        &mut app.retention_under(&billing, "subscription"),
        &id,
        "subscription",
        "sub-2b",
    )
    .await
    .unwrap();
    close(&mut account, "account", "acct-2b", "account_closed", None)
        .await
        .unwrap();
    assert!(
        !visible(&mut app.subjects(), &id)
            .await
            .unwrap()
            .contains("profile.gender")
    );
    // Hosting may no longer write it; an operator still can, but nothing keeps it.
    let gender = |g: pb::Gender| pb::UpdateSubjectRequest {
        subject: Some(pb::Subject {
            id: id.clone(),
            profile: Some(pb::Profile { gender: g as i32 }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["profile.gender".into()],
        }),
        expected_version: None,
        source: String::new(),
    };
    let refused = app
        .subjects_under(Some(&hosting), Some("account"), None)
        .update_subject(gender(pb::Gender::Male))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    app.subjects()
        .update_subject(gender(pb::Gender::Male))
        .await
        .unwrap();
    let r = status(&app, &id).await;
    assert_eq!(state_of(&r, "profile.gender"), State::Due);
    let swept = sweep(&app).await;
    assert_eq!(swept.subjects_purged, 1, "{swept:?}");
    let stored = visible(&mut app.subjects(), &id).await.unwrap();
    assert!(!stored.contains("profile.gender"), "{stored:?}");
    assert!(
        stored.contains("name.given"),
        "the subscription keeps the rest"
    );
    let purges: Vec<Vec<String>> = sweep_events(&app, &id)
        .await
        .into_iter()
        .map(|e| e.written_paths)
        .collect();
    assert_eq!(purges, [["profile.gender"], ["profile.gender"]]);
}

// ---- 3. paths no record granted ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_no_record_ever_granted_survive_the_sweep_and_are_reported_without_basis() {
    let app = spawn_quiet().await;
    let billing = app.token_for("facturatie", "billing").await;
    let t = tag();
    let id = app.create(full_subject(&t)).await.id;
    let mut order = app.retention_under(&billing, "order");
    open(&mut order, &id, "order", "INV-3").await.unwrap();
    let until = us(close(&mut order, "order", "INV-3", "order_completed", None)
        .await
        .unwrap()
        .record
        .unwrap()
        .retain_until
        .as_ref()
        .unwrap());
    let unbased = set(&[
        "account.username",
        "activity_log",
        "contact.phone",
        "payment.account_holder",
        "payment.iban",
        "payment.method",
        "payment.psp_token",
        "profile.gender",
    ]);
    let r = status(&app, &id).await;
    for path in &unbased {
        assert_eq!(state_of(&r, path), State::NoBasisRecorded, "{path}");
    }
    assert_eq!(state_of(&r, "name.given"), State::RetentionRestricted);

    jump_to(&app, until + DAY_US);
    let swept = sweep(&app).await;
    assert_eq!(
        (swept.subjects_purged, swept.subjects_shredded),
        (1, 0),
        "{swept:?}"
    );
    let stored = visible(&mut app.subjects(), &id).await.unwrap();
    assert_eq!(stored, unbased, "the order's paths go, the rest stays");
    let r = status(&app, &id).await;
    assert_eq!(listed(&r), unbased);
    for path in &unbased {
        assert_eq!(state_of(&r, path), State::NoBasisRecorded, "{path}");
        assert!(path_state(&r, path).until.is_none());
    }
    assert!(r.next_due.is_none());
    let events = sweep_events(&app, &id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].method, PURGE);
    assert_eq!(
        events[0]
            .written_paths
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>(),
        set(ORDER_PATHS)
    );
    let mut operator = app.subjects();
    assert!(
        find(
            &mut operator,
            pb::find_subjects_request::Key::Email(format!("klant.{t}@example.nl"))
        )
        .await
        .is_empty()
    );
    assert_eq!(
        find(
            &mut operator,
            pb::find_subjects_request::Key::Username(format!("user{t}"))
        )
        .await,
        std::slice::from_ref(&id)
    );

    let rep = report(&app).await;
    assert_eq!(rep.subjects_with_unbased_paths, 1);
    assert_eq!(
        rep.subjects_with_unbased_paths_sample,
        std::slice::from_ref(&id)
    );
    let without: BTreeSet<String> = rep
        .paths_without_basis
        .iter()
        .map(|p| {
            assert_eq!(p.subjects, 1, "{p:?}");
            p.path.clone()
        })
        .collect();
    assert_eq!(without, unbased);
    assert_eq!(rep.subjects_without_records, 0);
    assert_eq!((rep.purged_subjects, rep.shredded_subjects), (1, 0));
    // Years later still nothing of it is due.
    app.clock.advance_us(3650 * DAY_US);
    let swept = sweep(&app).await;
    assert_eq!(swept.subjects_visited, 0, "{swept:?}");
    assert_eq!(visible(&mut operator, &id).await.unwrap(), unbased);
}

// ---- 4. subjects without records --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_without_records_is_reported_and_never_purged() {
    let app = spawn_quiet().await;
    let hosting = app.token_for("backend", "hosting-backend").await;
    let lone = app.create(full_subject(&tag())).await.id;
    // A bystander with a closed account and an order: purged by the same sweeps.
    let other = app.create(order_subject(&tag())).await.id;
    let mut account = app.retention_under(&hosting, "account");
    let mut order = app.retention_under(&hosting, "order");
    open(&mut account, &other, "account", "acct-4")
        .await
        .unwrap();
    open(&mut order, &other, "order", "INV-4").await.unwrap();
    close(&mut account, "account", "acct-4", "account_closed", None)
        .await
        .unwrap();
    close(&mut order, "order", "INV-4", "order_completed", None)
        .await
        .unwrap();

    let rep = report(&app).await;
    assert_eq!(rep.subjects_without_records, 1);
    assert_eq!(
        rep.subjects_without_records_sample,
        std::slice::from_ref(&lone)
    );
    let r = status(&app, &lone).await;
    assert!(r.records.is_empty());
    assert_eq!(r.paths.len(), 26);
    for p in &r.paths {
        assert_eq!(p.state, State::NoBasisRecorded as i32, "{p:?}");
    }
    let before = visible(&mut app.subjects(), &lone).await.unwrap();
    // A hold does not give it a record (nor its paths a basis).
    app.retention()
        .place_hold(pb::PlaceHoldRequest {
            target: Some(pb::place_hold_request::Target::SubjectId(lone.clone())),
            reason: "POLICE-2026-4".into(),
        })
        .await
        .unwrap();
    let rep = report(&app).await;
    assert_eq!(rep.subjects_without_records, 1);
    assert_eq!(
        rep.subjects_without_records_sample,
        std::slice::from_ref(&lone)
    );
    assert_eq!(rep.subjects_with_unbased_paths, 0);
    assert_eq!(rep.holds.len(), 1);

    app.clock.advance_us(20 * 366 * DAY_US);
    let swept = sweep(&app).await;
    assert_eq!(
        (swept.subjects_visited, swept.subjects_shredded),
        (1, 1),
        "only the bystander is visited: {swept:?}"
    );
    assert_eq!(app.get(&other).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(visible(&mut app.subjects(), &lone).await.unwrap(), before);
    assert!(sweep_events(&app, &lone).await.is_empty());
    let rep = report(&app).await;
    assert_eq!(rep.subjects_without_records, 1);
    assert_eq!(rep.subjects_without_records_sample, [lone]);
}

// ---- 5. legal holds ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_on_a_subject_or_a_record_suspend_a_due_purge_until_released() {
    let app = spawn_quiet().await;
    let billing = app.token_for("facturatie", "billing").await;
    let hosting = app.token_for("backend", "hosting-backend").await;
    // S1: held as a whole.
    let (s1, until1) = completed_order(&app, &billing, "INV-5a").await;
    let subject_hold = app
        .retention()
        .place_hold(pb::PlaceHoldRequest {
            target: Some(pb::place_hold_request::Target::SubjectId(s1.clone())),
            reason: "POLICE-2026-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(
        (
            subject_hold.subject_id.as_str(),
            subject_hold.purpose.as_str(),
            subject_hold.reason.as_str()
        ),
        (s1.as_str(), "", "POLICE-2026-1")
    );
    assert!(subject_hold.release_time.is_none());
    // S2: its order record held (placed while open); its account (closed later) is not.
    let mut s = order_subject(&tag());
    s.payment = Some(pb::Payment {
        iban: "NL91ABNA0417164300".into(),
        ..Default::default()
    });
    let s2 = app.create(s).await.id;
    let mut order = app.retention_under(&billing, "order");
    let mut account = app.retention_under(&hosting, "account");
    open(&mut order, &s2, "order", "INV-5b").await.unwrap();
    open(&mut account, &s2, "account", "acct-5b").await.unwrap();
    let record_hold = app
        .retention()
        .place_hold(pb::PlaceHoldRequest {
            target: Some(pb::place_hold_request::Target::Record(pb::RecordRef {
                purpose: "order".into(),
                reference: "INV-5b".into(),
            })),
            reason: "POLICE-2026-2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(
        (
            record_hold.subject_id.as_str(),
            record_hold.purpose.as_str(),
            record_hold.reference.as_str()
        ),
        (s2.as_str(), "order", "INV-5b")
    );
    let completed = close(&mut order, "order", "INV-5b", "order_completed", None)
        .await
        .unwrap()
        .record
        .unwrap();
    assert!(
        completed.held,
        "the close answers that a hold names the record"
    );
    let until2 = us(completed.retain_until.as_ref().unwrap());
    close(&mut account, "account", "acct-5b", "account_closed", None)
        .await
        .unwrap();
    assert_eq!(
        visible(&mut app.subjects(), &s2).await.unwrap(),
        set(ORDER_PATHS),
        "a hold on the order does not keep what only the account granted"
    );

    // Both orders' retention is over; the holds keep everything.
    jump_to(&app, until1.max(until2) + DAY_US);
    let swept = sweep(&app).await;
    assert_eq!(
        (swept.subjects_purged, swept.subjects_shredded),
        (0, 0),
        "{swept:?}"
    );
    for id in [&s1, &s2] {
        assert_eq!(
            visible(&mut app.subjects(), id).await.unwrap(),
            set(ORDER_PATHS)
        );
        assert!(
            sweep_events(&app, id)
                .await
                .iter()
                .all(|e| e.method != SHRED)
        );
    }
    let r1 = status(&app, &s1).await;
    assert_eq!(state_of(&r1, "name.given"), State::Due);
    assert!(path_state(&r1, "name.given").held);
    assert_eq!(r1.holds.len(), 1);
    assert!(r1.next_due.is_none());
    let r2 = status(&app, &s2).await;
    assert_eq!(state_of(&r2, "name.given"), State::RetentionRestricted);
    assert!(path_state(&r2, "name.given").held);
    let held: Vec<(&str, bool)> = r2
        .records
        .iter()
        .map(|r| (r.purpose.as_str(), r.held))
        .collect();
    assert!(
        held.contains(&("order", true)) && held.contains(&("account", false)),
        "{held:?}"
    );
    // Billing still reads the held order under order.
    assert!(
        visible(
            &mut app.subjects_under(Some(&billing), Some("order"), None),
            &s2
        )
        .await
        .is_ok()
    );
    let rep = report(&app).await;
    let in_force: BTreeSet<&str> = rep.holds.iter().map(|h| h.hold_id.as_str()).collect();
    assert_eq!(
        in_force,
        [subject_hold.hold_id.as_str(), record_hold.hold_id.as_str()]
            .into_iter()
            .collect()
    );

    // Releasing the subject's hold: the next sweep shreds S1, S2 stays held.
    let released = app
        .retention()
        .release_hold(pb::ReleaseHoldRequest {
            hold_id: subject_hold.hold_id.clone(),
            reason: "POLICE-2026-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert!(released.release_time.is_some());
    assert_eq!(released.release_reason, "POLICE-2026-1");
    let swept = sweep(&app).await;
    assert_eq!(
        (swept.subjects_purged, swept.subjects_shredded),
        (0, 1),
        "{swept:?}"
    );
    assert_eq!(app.get(&s1).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        visible(&mut app.subjects(), &s2).await.unwrap(),
        set(ORDER_PATHS)
    );
    // Releasing the record's hold: the next sweep shreds S2.
    app.retention()
        .release_hold(pb::ReleaseHoldRequest {
            hold_id: record_hold.hold_id.clone(),
            reason: "POLICE-2026-2".into(),
        })
        .await
        .unwrap();
    let swept = sweep(&app).await;
    assert_eq!(swept.subjects_shredded, 1, "{swept:?}");
    assert_eq!(app.get(&s2).await.unwrap_err().code(), Code::NotFound);
    assert!(report(&app).await.holds.is_empty());
}

// ---- 6. refused inputs ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_record_and_hold_calls_change_nothing() {
    let app = spawn_quiet().await;
    let billing = app.token_for("facturatie", "billing").await;
    let hosting = app.token_for("backend", "hosting-backend").await;
    let mailer = app.token_for("mailer", "marketing-mailer").await;
    let id = app.create(full_subject(&tag())).await.id;
    let other = app.create(full_subject(&tag())).await.id;
    let mut order = app.retention_under(&billing, "order");
    open(&mut order, &id, "order", "INV-6").await.unwrap();
    let before = status(&app, &id).await;
    let counts = || async {
        (
            app.raw_count("SELECT COUNT(*) FROM processing_records")
                .await,
            app.raw_count("SELECT COUNT(*) FROM legal_holds").await,
        )
    };
    assert_eq!(counts().await, (1, 0));

    let now = app.clock.now_us();
    assert_eq!(
        code(close(&mut order, "order", "INV-unknown", "order_completed", None).await),
        Code::NotFound
    );
    assert_eq!(
        code(close(&mut order, "order", "INV-6", "subscription_cancelled", None).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(close(&mut order, "order", "INV-6", "", None).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            close(
                &mut order,
                "order",
                "INV-6",
                "order_completed",
                Some(now + 3600 * SECOND_US)
            )
            .await
        ),
        Code::InvalidArgument
    );
    for reference in [
        "INV 7",
        "klant@example.nl",
        "",
        " ",
        "-INV",
        &"x".repeat(129),
    ] {
        assert_eq!(
            code(open(&mut order, &id, "order", reference).await),
            Code::InvalidArgument,
            "{reference:?}"
        );
    }
    assert_eq!(
        code(open(&mut app.retention(), &id, "marketing", "mail-6").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            open(
                &mut app.retention_under(&mailer, "marketing"),
                &id,
                "marketing",
                "mail-6"
            )
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(open(&mut app.retention(), &id, "subject-request", "req-6").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(open(&mut order, &id, "portal", "svc-6").await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            open(
                &mut app.retention_under(&billing, "portal"),
                &id,
                "portal",
                "svc-6"
            )
            .await
        ),
        Code::PermissionDenied
    );
    // Hosting may not close billing's subscription records, nor act under one.
    assert_eq!(
        code(
            open(
                &mut app.retention_under(&hosting, "account"),
                &id,
                "subscription",
                "sub-6"
            )
            .await
        ),
        Code::PermissionDenied
    );
    // The same reference for another subject.
    assert_eq!(
        code(open(&mut order, &other, "order", "INV-6").await),
        Code::AlreadyExists
    );
    // A repeated open changes nothing.
    let again = open(&mut order, &id, "order", "INV-6").await.unwrap();
    assert!(!again.created);
    // Operator-only calls.
    for token in [&billing, &hosting] {
        let mut client = app.retention_under(token, "order");
        let refused = [
            code(
                client
                    .get_retention(pb::GetRetentionRequest {
                        subject_id: id.clone(),
                    })
                    .await,
            ),
            code(
                client
                    .place_hold(pb::PlaceHoldRequest {
                        target: Some(pb::place_hold_request::Target::SubjectId(id.clone())),
                        reason: "POLICE-2026-1".into(),
                    })
                    .await,
            ),
            code(client.sweep(pb::SweepRequest::default()).await),
            code(
                client
                    .retention_report(pb::RetentionReportRequest::default())
                    .await,
            ),
            code(
                client
                    .release_hold(pb::ReleaseHoldRequest {
                        hold_id: uuid::Uuid::new_v4().to_string(),
                        reason: "POLICE-2026-1".into(),
                    })
                    .await,
            ),
        ];
        assert_eq!(refused, [Code::PermissionDenied; 5]);
    }
    // Holds: a free-text reason, an unknown record, an unknown subject, an unknown hold.
    let mut operator = app.retention();
    for (target, reason) in [
        (
            pb::place_hold_request::Target::SubjectId(id.clone()),
            "police asked",
        ),
        (pb::place_hold_request::Target::SubjectId(id.clone()), ""),
        (
            pb::place_hold_request::Target::Record(pb::RecordRef {
                purpose: "order".into(),
                reference: "INV-unknown".into(),
            }),
            "POLICE-2026-1",
        ),
        (
            pb::place_hold_request::Target::SubjectId(uuid::Uuid::new_v4().to_string()),
            "POLICE-2026-1",
        ),
    ] {
        let refused = operator
            .place_hold(pb::PlaceHoldRequest {
                target: Some(target.clone()),
                reason: reason.into(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(refused.code(), Code::InvalidArgument | Code::NotFound),
            "{target:?}: {refused:?}"
        );
    }
    assert_eq!(
        operator
            .release_hold(pb::ReleaseHoldRequest {
                hold_id: uuid::Uuid::new_v4().to_string(),
                reason: "POLICE-2026-1".into(),
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    let after = status(&app, &id).await;
    assert_eq!(after.records, before.records);
    assert_eq!(after.paths, before.paths);
    assert!(after.holds.is_empty());
    assert!(status(&app, &other).await.records.is_empty());
    assert_eq!(counts().await, (1, 0));

    // A close in the past is accepted, and the first close stands.
    let at = app.clock.now_us() - 3600 * SECOND_US;
    let closed = close(&mut order, "order", "INV-6", "order_completed", Some(at))
        .await
        .unwrap();
    assert!(closed.closed);
    let record = closed.record.unwrap();
    assert_eq!(record.close_time.as_ref().map(us), Some(at));
    assert_eq!(
        record.retain_until.as_ref().map(us),
        Some(seven_years_after(at))
    );
    let repeat = close(&mut order, "order", "INV-6", "order_completed", None)
        .await
        .unwrap();
    assert!(!repeat.closed);
    assert_eq!(repeat.record.unwrap().close_time.as_ref().map(us), Some(at));
    // A closed record is not reopened.
    assert_eq!(
        code(open(&mut order, &id, "order", "INV-6").await),
        Code::FailedPrecondition
    );
}

// ---- 7. two instances -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sweeping_the_same_due_subjects_purge_each_exactly_once() {
    let db = TestDb::new().await;
    let a = spawn_with(db.clone(), |args| args.retention.sweep_seconds = 0).await;
    let b = spawn_with(db, |args| args.retention.sweep_seconds = 0).await;
    let billing = a.token_for("facturatie", "billing").await;
    let hosting = a.token_for("backend", "hosting-backend").await;
    let mut shredded = Vec::new();
    let mut purged = Vec::new();
    let mut latest = 0;
    for n in 0..12 {
        if n % 3 == 0 {
            // Keeps paths no record granted: purged, not shredded.
            let id = a.create(full_subject(&tag())).await.id;
            let mut order = a.retention_under(&billing, "order");
            open(&mut order, &id, "order", &format!("INV-7-{n}"))
                .await
                .unwrap();
            let closed = close(
                &mut order,
                "order",
                &format!("INV-7-{n}"),
                "order_completed",
                None,
            )
            .await
            .unwrap();
            latest = latest.max(us(closed.record.unwrap().retain_until.as_ref().unwrap()));
            purged.push(id);
        } else {
            let client = if n % 2 == 0 { &a } else { &b };
            let (id, until) = completed_order(client, &billing, &format!("INV-7-{n}")).await;
            latest = latest.max(until);
            shredded.push(id);
        }
    }
    // One more with its account closed on b: shredded at once by b, never again.
    let mut s = full_subject(&tag());
    s.activity_log.clear();
    let id = b.create(s).await.id;
    let mut account = b.retention_under(&hosting, "account");
    open(&mut account, &id, "account", "acct-7").await.unwrap();
    close(&mut account, "account", "acct-7", "account_closed", None)
        .await
        .unwrap();
    shredded.push(id);

    jump_to(&a, latest + DAY_US);
    jump_to(&b, latest + DAY_US);
    let (mut sweep_a, mut sweep_b) = (a.retention(), b.retention());
    let (ra, rb) = tokio::join!(
        sweep_a.sweep(pb::SweepRequest::default()),
        sweep_b.sweep(pb::SweepRequest::default())
    );
    let (ra, rb) = (ra.unwrap().into_inner(), rb.unwrap().into_inner());
    assert_eq!(
        (ra.subjects_failed, rb.subjects_failed),
        (0, 0),
        "{ra:?} {rb:?}"
    );
    assert_eq!(
        ra.subjects_shredded + rb.subjects_shredded,
        shredded.len() as u64 - 1,
        "{ra:?} {rb:?}"
    );
    assert_eq!(
        ra.subjects_purged + rb.subjects_purged,
        purged.len() as u64,
        "{ra:?} {rb:?}"
    );
    for id in &shredded {
        assert_eq!(a.get(id).await.unwrap_err().code(), Code::NotFound);
        let events = sweep_events(&a, id).await;
        let shreds = events.iter().filter(|e| e.method == SHRED).count();
        assert_eq!(shreds, 1, "{id}: {events:?}");
    }
    for id in &purged {
        let events = sweep_events(&a, id).await;
        assert_eq!(events.len(), 1, "{id}: {events:?}");
        assert_eq!(events[0].method, PURGE);
        assert!(
            visible(&mut b.subjects(), id)
                .await
                .unwrap()
                .contains("profile.gender")
        );
    }
    assert_eq!(
        a.raw_count("SELECT COUNT(*) FROM erased_subjects").await,
        shredded.len() as i64
    );
    a.assert_audit_chain_intact().await;
}

// ---- 8. the background sweeper ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_sweeper_purges_a_due_subject_without_a_sweep_call() {
    let app = spawn_with(TestDb::new().await, |args| args.retention.sweep_seconds = 1).await;
    let billing = app.token_for("facturatie", "billing").await;
    let (id, until) = completed_order(&app, &billing, "INV-8").await;
    // A few intervals pass: nothing is due yet, so nothing goes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(app.get(&id).await.is_ok());
    jump_to(&app, until + SECOND_US);
    let started = std::time::Instant::now();
    loop {
        match app.get(&id).await {
            Err(e) if e.code() == Code::NotFound => break,
            Ok(_) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("still there after {:?}: {other:?}", started.elapsed()),
        }
    }
    let events = sweep_events(&app, &id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].method.as_str(), events[0].caller.as_str()),
        (SHRED, SWEEPER)
    );
    let sweeps = app
        .audit_events(pb::QueryAuditLogRequest {
            method: "kluis.v1.RetentionService/Sweep".into(),
            ..Default::default()
        })
        .await;
    assert!(sweeps.is_empty(), "{sweeps:?}");
}

// ---- 9. no personal values --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_calls_leave_no_personal_value_in_logs_or_audit_events() {
    let app = spawn_quiet().await;
    let billing = app.token_for("facturatie", "billing").await;
    let hosting = app.token_for("backend", "hosting-backend").await;
    let canary = format!("Canary{}", tag());
    let mut s = full_subject(&canary);
    s.name.as_mut().unwrap().given = format!("{canary}given");
    let id = app.create(s).await.id;
    let email = format!("klant.{}@example.nl", canary.to_lowercase());

    let mut order = app.retention_under(&billing, "order");
    let mut account = app.retention_under(&hosting, "account");
    open(&mut order, &id, "order", "INV-9").await.unwrap();
    open(&mut account, &id, "account", "acct-9").await.unwrap();
    // A reference carrying personal values is refused without echoing them.
    for reference in [email.clone(), format!("{canary} given")] {
        let refused = open(&mut order, &id, "order", &reference)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            !refused
                .message()
                .to_lowercase()
                .contains(&canary.to_lowercase())
        );
    }
    close(&mut account, "account", "acct-9", "account_closed", None)
        .await
        .unwrap();
    let hold = app
        .retention()
        .place_hold(pb::PlaceHoldRequest {
            target: Some(pb::place_hold_request::Target::SubjectId(id.clone())),
            reason: "POLICE-2026-9".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    status(&app, &id).await;
    report(&app).await;
    visible(
        &mut app.subjects_under(Some(&billing), Some("order"), None),
        &id,
    )
    .await
    .unwrap();
    app.retention()
        .release_hold(pb::ReleaseHoldRequest {
            hold_id: hold.hold_id,
            reason: "POLICE-2026-9".into(),
        })
        .await
        .unwrap();
    let until = us(close(&mut order, "order", "INV-9", "order_completed", None)
        .await
        .unwrap()
        .record
        .unwrap()
        .retain_until
        .as_ref()
        .unwrap());
    jump_to(&app, until + DAY_US);
    let swept = sweep(&app).await;
    assert_eq!(swept.subjects_purged, 1, "{swept:?}");
    report(&app).await;

    let stored = app.audit_bodies().await;
    let queried = format!(
        "{:?}",
        app.audit_events(pb::QueryAuditLogRequest::default()).await
    );
    assert!(
        stored.contains(PURGE) && queried.contains(PURGE),
        "the sweep is audited"
    );
    assert!(queried.contains("INV-9"), "references are recorded");
    let logs = captured_logs();
    assert!(
        logs.contains(&id),
        "the logs were captured (they name the subject)"
    );
    for (what, text) in [
        ("audit trail", &stored),
        ("audit query", &queried),
        ("logs", &logs),
    ] {
        let lower = text.to_lowercase();
        for value in [
            canary.to_lowercase(),
            email.clone(),
            "nl91abna0417164300".into(),
            "+31853033451".into(),
            "192.0.2.10".into(),
        ] {
            assert!(!lower.contains(&value), "{what} holds a personal value");
        }
    }
}

/// The `kluis` binary on `db` (its data dir, and its PostgreSQL database in PostgreSQL mode).
fn kluis_binary(db: &TestDb) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kluis"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KLUIS_DATA_DIR", db.data_dir())
        .env("KLUIS_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if crate::helpers::postgres_mode() {
        cmd.env("KLUIS_DATABASE_URL", &db.url);
    }
    cmd
}

/// `kluis serve` on a free port with the background sweeper every second at `rate` subjects/s.
fn serve_sweeping(db: &TestDb, rate: &str) -> std::process::Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    kluis_binary(db)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("KLUIS_RETENTION_SWEEP_SECONDS", "1")
        .env("KLUIS_RETENTION_SWEEP_RATE", rate)
        .env("KLUIS_RETENTION_SWEEP_BATCH", "5")
        .spawn()
        .unwrap()
}

const SWEEP_EVENTS: &str = "SELECT COUNT(*) FROM audit_events \
     WHERE method IN ('kluis.retention/Purge', 'kluis.retention/Shred')";
const SWEPT_SUBJECTS: &str = "SELECT COUNT(DISTINCT subjects) FROM audit_events \
     WHERE method IN ('kluis.retention/Purge', 'kluis.retention/Shred')";

/// Polls `sql` until it counts at least `at_least`; the last count.
async fn wait_for_count(db: &TestDb, sql: &'static str, at_least: i64, within: Duration) -> i64 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let raw = db.raw().await;
        let n = raw.count_all(sql).await;
        raw.close().await;
        if n >= at_least || std::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_killed_mid_sweep_resumes_with_nothing_purged_twice_or_skipped() {
    const N: i64 = 120;
    let app = spawn_quiet().await;
    let billing = app.token_for("billing", "billing").await;
    let order = app.retention_under(&billing, "order");
    // The records fall due a few seconds from now on the system clock (the binary's clock): not
    // at their close, which would purge them at once.
    let due = app.clock.now_us() + 12 * SECOND_US;
    let mut at = due - 7 * 365 * DAY_US;
    at += due - seven_years_after(at);
    // Seeded concurrently, so the group committer batches it (PostgreSQL commits are slow one
    // by one).
    let seeding = (0..N).map(|n| {
        let mut order = order.clone();
        let app = &app;
        async move {
            let id = app.create(order_subject(&tag())).await.id;
            let reference = format!("KILL-{n}");
            open(&mut order, &id, "order", &reference).await.unwrap();
            close(&mut order, "order", &reference, "order_completed", Some(at))
                .await
                .unwrap();
        }
    });
    futures_util::future::join_all(seeding).await;
    assert!(
        app.clock.now_us() < due,
        "seeding took so long that the records fell due while closing"
    );
    let db = app.stop().await;
    assert_eq!(
        wait_for_count(&db, SWEEP_EVENTS, 0, Duration::ZERO).await,
        0
    );

    // A slow sweeper (20 subjects/s in batches of 5), killed with SIGKILL part-way.
    let mut first = serve_sweeping(&db, "20");
    let before_kill = wait_for_count(&db, SWEEP_EVENTS, 15, Duration::from_secs(60)).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = wait_for_count(&db, SWEEP_EVENTS, 0, Duration::ZERO).await;
    assert!(
        (15..N).contains(&at_kill) && at_kill >= before_kill,
        "killed mid-sweep: {at_kill} of {N} swept"
    );

    // Started again at full speed, it finishes: every subject swept exactly once.
    let mut second = serve_sweeping(&db, "0");
    let done = wait_for_count(&db, SWEEP_EVENTS, N, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let done_later = wait_for_count(&db, SWEEP_EVENTS, 0, Duration::ZERO).await;
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(done, N, "every due subject swept after the restart");
    assert_eq!(done_later, N, "nothing swept twice");
    assert_eq!(
        wait_for_count(&db, SWEPT_SUBJECTS, 0, Duration::ZERO).await,
        N,
        "one event per subject"
    );
    assert_eq!(
        wait_for_count(&db, "SELECT COUNT(*) FROM subjects", 0, Duration::ZERO).await,
        0,
        "every subject kept only by the order is shredded"
    );
    let verify = kluis_binary(&db)
        .args(["audit", "verify"])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "audit chain intact after the kill: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_sweep_cli_dry_run_changes_nothing_and_the_real_run_purges() {
    let app = spawn_quiet().await;
    let billing = app.token_for("billing", "billing").await;
    let mut order = app.retention_under(&billing, "order");
    let due = app.clock.now_us() + 3 * SECOND_US;
    let mut at = due - 7 * 365 * DAY_US;
    at += due - seven_years_after(at);
    for n in 0..3 {
        let id = app.create(order_subject(&tag())).await.id;
        let reference = format!("CLI-{n}");
        open(&mut order, &id, "order", &reference).await.unwrap();
        close(&mut order, "order", &reference, "order_completed", Some(at))
            .await
            .unwrap();
    }
    let db = app.stop().await;
    let wait = due - kluis::clock::now_us() + SECOND_US / 2;
    if wait > 0 {
        tokio::time::sleep(Duration::from_micros(wait.unsigned_abs())).await;
    }
    let dry = kluis_binary(&db)
        .args(["retention", "sweep", "--dry-run"])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{text}");
    assert!(text.contains("3 due subjects visited"), "{text}");
    assert!(text.contains("dry run: nothing changed"), "{text}");
    assert_eq!(
        wait_for_count(&db, "SELECT COUNT(*) FROM subjects", 0, Duration::ZERO).await,
        3
    );
    let real = kluis_binary(&db)
        .args(["retention", "sweep"])
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&real.stdout);
    assert!(real.status.success(), "{text}");
    assert!(text.contains("3 crypto-shredded"), "{text}");
    assert_eq!(
        wait_for_count(&db, "SELECT COUNT(*) FROM subjects", 0, Duration::ZERO).await,
        0
    );
    assert_eq!(
        wait_for_count(&db, SWEEP_EVENTS, 0, Duration::ZERO).await,
        3
    );
}
