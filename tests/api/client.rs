//! The Rust client (`kluis-client`) against the real server: the typed calls the billing service
//! and the hosting backend make, the error enum for each refusal, retries of idempotent calls
//! (and none of creates) while kluis is unreachable or UNAVAILABLE, the deadline, and the
//! billing example's flow (examples/billing.rs, compiled into this test).

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use kluis::api::pb as server_pb;
use kluis_client::{
    Client, ClientConfig, Error, FieldViolation, Lookup, RetryPolicy, SecretString, pb,
};
use tonic::{Request, Response, Status, transport::Server};

use crate::helpers::{OPERATOR_PURPOSE, OPERATOR_REASON, TestApp, full_subject, spawn_kluis, tag};

#[path = "../../examples/billing.rs"]
#[allow(dead_code)]
mod billing_example;

// ---- helpers ----------------------------------------------------------------------------------

/// Settings for `token` against `addr`, with fast retries so the tests stay quick.
fn config_at(addr: SocketAddr, token: &str) -> ClientConfig {
    ClientConfig::new(
        format!("http://{addr}"),
        SecretString::from(token.to_owned()),
    )
    .timeout(Duration::from_secs(20))
    .retry(RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    })
}

async fn connect(app: &TestApp, token: &str, purpose: &str) -> Client {
    config_at(app.addr, token)
        .purpose(purpose)
        .connect()
        .await
        .unwrap()
}

/// The first operator, under `subject-request` with a reason.
async fn operator(app: &TestApp) -> Client {
    config_at(app.addr, &app.operator_token)
        .purpose(OPERATOR_PURPOSE)
        .reason(OPERATOR_REASON)
        .connect()
        .await
        .unwrap()
}

/// A customer with every field path set, e-mail and username unique through `t`.
fn customer(t: &str) -> pb::Subject {
    full_subject(t)
}

fn email_of(t: &str) -> String {
    format!("klant.{t}@example.nl")
}

fn set<S: AsRef<str>>(paths: &[S]) -> BTreeSet<String> {
    paths.iter().map(|p| p.as_ref().to_owned()).collect()
}

/// Every field path of a category (`billing`, `payment`), from the client's path list.
fn category(name: &str) -> BTreeSet<String> {
    let prefix = format!("{name}.");
    set(&kluis_client::paths::ALL_PATHS
        .iter()
        .filter(|p| p.starts_with(&prefix))
        .collect::<Vec<_>>())
}

/// A customer as the hosting backend creates one at sign-up (its own categories only).
fn signup(t: &str) -> pb::Subject {
    pb::Subject {
        name: Some(pb::Name {
            given: "Jan".into(),
            family: format!("Jansen{t}"),
        }),
        contact: Some(pb::Contact {
            email: format!("Klant.{t}@Example.NL"),
            phone: "+31 85 303 34 51".into(),
        }),
        account: Some(pb::Account {
            username: format!("jansen{t}"),
        }),
        ..Default::default()
    }
}

// ---- typed calls ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_creates_reads_finds_and_updates_a_subject() {
    let app = spawn_kluis().await;
    let backend = app.token_for("backend", "hosting-backend").await;
    let kluis = connect(&app, &backend, "account").await;
    let t = tag();

    let created = kluis.create_subject(signup(&t)).await.unwrap();
    assert_eq!(created.version(), 1);
    assert!(!created.id().is_empty());
    assert_eq!(
        set(&created.paths()),
        set(&[
            "name.given",
            "name.family",
            "contact.email",
            "contact.phone",
            "account.username"
        ])
    );

    let read = kluis
        .get_subject(created.id(), &["name", "contact.email"])
        .await
        .unwrap();
    assert_eq!(read.paths(), ["name.given", "name.family", "contact.email"]);
    assert_eq!(
        read.subject.contact.unwrap().email,
        signup(&t).contact.unwrap().email,
        "stored as given"
    );

    assert_eq!(
        kluis
            .find_by_email(&email_of(&t).to_uppercase())
            .await
            .unwrap(),
        [created.id()]
    );
    assert_eq!(
        kluis
            .find_subjects(Lookup::Username(format!("JANSEN{t}")))
            .await
            .unwrap(),
        [created.id()]
    );
    assert!(
        kluis
            .find_by_email(&format!("nobody.{t}@example.nl"))
            .await
            .unwrap()
            .is_empty()
    );

    let updated = kluis
        .update_subject(
            pb::Subject {
                id: created.id().to_owned(),
                contact: Some(pb::Contact {
                    phone: "+31 6 1234 5678".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &["contact.phone"],
            Some(created.version()),
        )
        .await
        .unwrap();
    assert_eq!(updated.version(), 2);
    let phone = kluis
        .get_subject(created.id(), &["contact.phone"])
        .await
        .unwrap();
    assert_eq!(
        phone.subject.contact.as_ref().unwrap().phone,
        "+31612345678"
    );
    assert_eq!(phone.version(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_reads_billing_and_payment_under_account_and_billing_under_order() {
    let app = spawn_kluis().await;
    let t = tag();
    let id = operator(&app)
        .await
        .create_subject(customer(&t))
        .await
        .unwrap()
        .subject
        .id;
    let billing_token = app.token_for("billing", "billing").await;
    let billing = connect(&app, &billing_token, "account").await;

    let account = billing
        .get_subject(&id, &["billing", "payment"])
        .await
        .unwrap();
    let mut expected = category("billing");
    expected.extend(category("payment"));
    assert_eq!(set(&account.paths()), expected);
    assert!(account.masked_values.is_empty());
    assert_eq!(account.subject.payment.unwrap().iban, "NL91ABNA0417164300");

    let order = billing.with_purpose("order").unwrap();
    assert_eq!(order.purpose(), Some("order"));
    assert_eq!(
        billing.purpose(),
        Some("account"),
        "the original is unchanged"
    );
    let under_order = order.get_subject(&id, &["billing"]).await.unwrap();
    assert_eq!(set(&under_order.paths()), category("billing"));

    // The hosting backend sees the IBAN only masked under `account`, beside the subject.
    let backend_token = app.token_for("backend", "hosting-backend").await;
    let backend = connect(&app, &backend_token, "account").await;
    let masked = backend.get_subject(&id, &[]).await.unwrap();
    assert!(masked.masked_paths().contains(&"payment.iban"));
    assert!(!masked.paths().iter().any(|p| p.starts_with("payment.")));

    // A batch: one result per id, an unknown id its own NotFound.
    let unknown = uuid::Uuid::new_v4().to_string();
    let items = order
        .batch_get_subjects(&[id.as_str(), unknown.as_str()], &["billing"])
        .await
        .unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].id, id);
    assert_eq!(
        set(&items[0].result.as_ref().unwrap().paths()),
        category("billing")
    );
    assert_eq!(items[1].id, unknown);
    assert!(
        matches!(items[1].result, Err(Error::NotFound { .. })),
        "{:?}",
        items[1].result
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_opens_and_closes_an_order_record_and_repeats_change_nothing() {
    let app = spawn_kluis().await;
    let t = tag();
    let op = operator(&app).await;
    let id = op.create_subject(customer(&t)).await.unwrap().subject.id;
    let other = op
        .create_subject(customer(&tag()))
        .await
        .unwrap()
        .subject
        .id;
    let billing_token = app.token_for("billing", "billing").await;
    let order = connect(&app, &billing_token, "order").await;
    let invoice = format!("INV-{t}");

    let opened = order.open_processing(&id, "order", &invoice).await.unwrap();
    assert!(opened.created);
    let record = opened.record.unwrap();
    assert_eq!(
        (
            record.subject_id.as_str(),
            record.purpose.as_str(),
            record.reference.as_str()
        ),
        (id.as_str(), "order", invoice.as_str())
    );
    assert!(record.close_time.is_none());
    let again = order.open_processing(&id, "order", &invoice).await.unwrap();
    assert!(
        !again.created,
        "a repeated open is not an error and changes nothing"
    );

    let e = order
        .open_processing(&other, "order", &invoice)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e:?}");

    // The purpose's own close event only.
    let e = order
        .close_processing("order", &invoice, "account_closed", None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    let closed = order
        .close_processing("order", &invoice, "order_completed", None)
        .await
        .unwrap();
    assert!(closed.closed);
    let record = closed.record.unwrap();
    assert_eq!(record.close_event, "order_completed");
    let (close, until) = (
        record.close_time.unwrap().seconds,
        record.retain_until.unwrap().seconds,
    );
    let years = (until - close) as f64 / (365.25 * 86_400.0);
    assert!(
        (years - 7.0).abs() < 0.01,
        "seven years of retention: {years}"
    );
    let again = order
        .close_processing("order", &invoice, "order_completed", None)
        .await
        .unwrap();
    assert!(!again.closed, "the first close stands");

    let e = order
        .close_processing("order", &format!("INV-none-{t}"), "order_completed", None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");

    // A client that declares no purpose opens a record under the record's own purpose.
    let undeclared = config_at(app.addr, &billing_token).connect().await.unwrap();
    let subscription = undeclared
        .open_processing(&id, "subscription", &format!("SUB-{t}"))
        .await
        .unwrap();
    assert!(subscription.created);
}

// ---- the error enum ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_purpose_or_reason_is_invalid_argument_naming_the_header() {
    let app = spawn_kluis().await;
    let id = operator(&app)
        .await
        .create_subject(customer(&tag()))
        .await
        .unwrap()
        .subject
        .id;
    let billing_token = app.token_for("billing", "billing").await;
    let undeclared = config_at(app.addr, &billing_token).connect().await.unwrap();
    let e = undeclared.get_subject(&id, &[]).await.unwrap_err();
    let Error::InvalidArgument {
        field_violations, ..
    } = &e
    else {
        panic!("expected InvalidArgument, got {e:?}");
    };
    assert_eq!(
        field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect::<Vec<_>>(),
        ["x-kluis-purpose"]
    );

    // Operators' reads need a reason.
    let no_reason = config_at(app.addr, &app.operator_token)
        .purpose(OPERATOR_PURPOSE)
        .connect()
        .await
        .unwrap();
    let e = no_reason.get_subject(&id, &[]).await.unwrap_err();
    assert!(
        e.field_violations()
            .iter()
            .any(|v| v.field == "x-kluis-reason"),
        "{e:?}"
    );
    // …and with one it is served.
    no_reason
        .with_reason("TICKET-42")
        .unwrap()
        .get_subject(&id, &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purpose_outside_the_role_or_a_path_outside_the_grant_is_permission_denied() {
    let app = spawn_kluis().await;
    let id = operator(&app)
        .await
        .create_subject(customer(&tag()))
        .await
        .unwrap()
        .subject
        .id;
    let billing_token = app.token_for("billing", "billing").await;
    let marketing = connect(&app, &billing_token, "marketing").await;
    match marketing.get_subject(&id, &[]).await {
        Err(Error::PermissionDenied { message }) => {
            assert!(message.contains("marketing"), "{message}")
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    let order = connect(&app, &billing_token, "order").await;
    match order.get_subject(&id, &["payment.iban"]).await {
        Err(Error::PermissionDenied { message }) => {
            assert!(message.contains("payment.iban"), "{message}")
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    let backend_token = app.token_for("backend", "hosting-backend").await;
    let backend = connect(&app, &backend_token, "account").await;
    let e = backend
        .get_subject(&id, &["billing.vat_number"])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied { .. }), "{e:?}");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_subject_is_not_found_and_a_bad_token_unauthenticated() {
    let app = spawn_kluis().await;
    let billing_token = app.token_for("billing", "billing").await;
    let billing = connect(&app, &billing_token, "account").await;
    let e = billing
        .get_subject(&uuid::Uuid::new_v4().to_string(), &[])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(!e.is_retryable());

    let forged = connect(&app, "kluis_0000_forged", "account").await;
    let e = forged.find_by_email("a@example.nl").await.unwrap_err();
    assert!(matches!(e, Error::Unauthenticated { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_email_is_invalid_argument_with_the_field_violation_and_no_value() {
    let app = spawn_kluis().await;
    let backend_token = app.token_for("backend", "hosting-backend").await;
    let backend = connect(&app, &backend_token, "account").await;
    let t = tag();
    let bad = format!("jan-{t}-at-example");
    let mut subject = signup(&t);
    subject.contact.as_mut().unwrap().email = bad.clone();
    let e = backend.create_subject(subject).await.unwrap_err();
    let Error::InvalidArgument {
        field_violations, ..
    } = &e
    else {
        panic!("expected InvalidArgument, got {e:?}");
    };
    assert_eq!(
        field_violations,
        &[FieldViolation {
            field: "contact.email".into(),
            description: "not a valid e-mail address".into(),
        }]
    );
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains(&bad), "the value is in the error: {shown}");

    let e = backend.find_by_email(&bad).await.unwrap_err();
    assert_eq!(
        e.field_violations()
            .iter()
            .map(|v| v.field.as_str())
            .collect::<Vec<_>>(),
        ["contact.email"]
    );
    assert!(
        backend
            .find_by_email(&email_of(&t))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_version_is_a_conflict_and_changes_nothing() {
    let app = spawn_kluis().await;
    let backend_token = app.token_for("backend", "hosting-backend").await;
    let backend = connect(&app, &backend_token, "account").await;
    let created = backend.create_subject(signup(&tag())).await.unwrap();
    let family = |name: &str| pb::Subject {
        id: created.id().to_owned(),
        name: Some(pb::Name {
            given: "Jan".into(),
            family: name.into(),
        }),
        ..Default::default()
    };
    backend
        .update_subject(family("First"), &["name"], Some(1))
        .await
        .unwrap();
    let e = backend
        .update_subject(family("Second"), &["name"], Some(1))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e:?}");
    assert_eq!(e.code(), tonic::Code::Aborted);
    let now = backend
        .get_subject(created.id(), &["name.family"])
        .await
        .unwrap();
    assert_eq!(now.subject.name.as_ref().unwrap().family, "First");
    assert_eq!(now.version(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_is_enforced_as_deadline_exceeded() {
    let app = spawn_kluis().await;
    let billing_token = app.token_for("billing", "billing").await;
    let billing = connect(&app, &billing_token, "account").await;
    let hurried = billing.with_timeout(Duration::from_micros(1));
    let e = hurried.find_by_email("a@example.nl").await.unwrap_err();
    assert!(matches!(e, Error::DeadlineExceeded { .. }), "{e:?}");
    // The client itself is fine afterwards.
    billing.find_by_email("a@example.nl").await.unwrap();
}

// ---- retries ----------------------------------------------------------------------------------

/// A SubjectService in front of kluis that answers the first `fail_first` calls of each method
/// with UNAVAILABLE (as kluis does when its database or audit trail is down) and passes the rest
/// on, counting every call it receives.
struct Flaky {
    fail_first: u32,
    calls: Mutex<HashMap<&'static str, u32>>,
    upstream: server_pb::subject_service_client::SubjectServiceClient<tonic::transport::Channel>,
}

impl Flaky {
    async fn start(app: &TestApp, fail_first: u32) -> (Arc<Flaky>, SocketAddr) {
        let flaky = Arc::new(Flaky {
            fail_first,
            calls: Mutex::new(HashMap::new()),
            upstream: server_pb::subject_service_client::SubjectServiceClient::new(app.channel()),
        });
        let incoming =
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let service =
            server_pb::subject_service_server::SubjectServiceServer::from_arc(flaky.clone());
        tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        (flaky, addr)
    }

    fn calls(&self, method: &'static str) -> u32 {
        self.calls.lock().unwrap().get(method).copied().unwrap_or(0)
    }

    /// Counts the call; UNAVAILABLE while it is among the first `fail_first`, else the request
    /// to forward (with the caller's metadata).
    fn admit<T>(&self, method: &'static str, request: Request<T>) -> Result<Request<T>, Status> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(method).or_insert(0);
            *n += 1;
            *n
        };
        if n <= self.fail_first {
            return Err(Status::unavailable(format!(
                "kluis cannot serve this now; retry (request id flaky-{method}-{n})"
            )));
        }
        let (metadata, _, message) = request.into_parts();
        let mut forward = Request::new(message);
        *forward.metadata_mut() = metadata;
        Ok(forward)
    }
}

#[tonic::async_trait]
impl server_pb::subject_service_server::SubjectService for Flaky {
    async fn create_subject(
        &self,
        request: Request<server_pb::CreateSubjectRequest>,
    ) -> Result<Response<server_pb::CreateSubjectResponse>, Status> {
        let request = self.admit("create", request)?;
        self.upstream.clone().create_subject(request).await
    }

    async fn get_subject(
        &self,
        request: Request<server_pb::GetSubjectRequest>,
    ) -> Result<Response<server_pb::GetSubjectResponse>, Status> {
        let request = self.admit("get", request)?;
        self.upstream.clone().get_subject(request).await
    }

    async fn update_subject(
        &self,
        request: Request<server_pb::UpdateSubjectRequest>,
    ) -> Result<Response<server_pb::UpdateSubjectResponse>, Status> {
        let request = self.admit("update", request)?;
        self.upstream.clone().update_subject(request).await
    }

    async fn find_subjects(
        &self,
        request: Request<server_pb::FindSubjectsRequest>,
    ) -> Result<Response<server_pb::FindSubjectsResponse>, Status> {
        let request = self.admit("find", request)?;
        self.upstream.clone().find_subjects(request).await
    }

    async fn batch_get_subjects(
        &self,
        request: Request<server_pb::BatchGetSubjectsRequest>,
    ) -> Result<Response<server_pb::BatchGetSubjectsResponse>, Status> {
        let request = self.admit("batch", request)?;
        self.upstream.clone().batch_get_subjects(request).await
    }

    async fn erase_subject(
        &self,
        _: Request<server_pb::EraseSubjectRequest>,
    ) -> Result<Response<server_pb::EraseSubjectResponse>, Status> {
        Err(Status::unimplemented("not in front"))
    }

    async fn record_activity(
        &self,
        _: Request<server_pb::RecordActivityRequest>,
    ) -> Result<Response<server_pb::RecordActivityResponse>, Status> {
        Err(Status::unimplemented("not in front"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_retried_on_unavailable_until_kluis_answers() {
    let app = spawn_kluis().await;
    let t = tag();
    let id = operator(&app)
        .await
        .create_subject(customer(&t))
        .await
        .unwrap()
        .subject
        .id;
    let billing_token = app.token_for("billing", "billing").await;
    let (flaky, addr) = Flaky::start(&app, 2).await;
    let retried = Arc::new(Mutex::new(Vec::new()));
    let seen = retried.clone();
    let billing = config_at(addr, &billing_token)
        .purpose("account")
        .on_retry(move |r| {
            seen.lock().unwrap().push((
                r.method,
                r.attempt,
                r.error.request_id().map(str::to_owned),
            ))
        })
        .connect()
        .await
        .unwrap();

    let read = billing.get_subject(&id, &["billing"]).await.unwrap();
    assert_eq!(set(&read.paths()), category("billing"));
    assert_eq!(
        flaky.calls("get"),
        3,
        "two UNAVAILABLE answers, then served"
    );
    assert_eq!(
        billing.find_by_email(&email_of(&t)).await.unwrap(),
        [id.as_str()]
    );
    assert_eq!(flaky.calls("find"), 3);
    let items = billing
        .batch_get_subjects(&[&id], &["billing"])
        .await
        .unwrap();
    assert!(items[0].result.is_ok());
    assert_eq!(flaky.calls("batch"), 3);
    assert_eq!(
        *retried.lock().unwrap(),
        [
            (
                "kluis.v1.SubjectService/GetSubject",
                1,
                Some("flaky-get-1".to_owned())
            ),
            (
                "kluis.v1.SubjectService/GetSubject",
                2,
                Some("flaky-get-2".to_owned())
            ),
            (
                "kluis.v1.SubjectService/FindSubjects",
                1,
                Some("flaky-find-1".to_owned())
            ),
            (
                "kluis.v1.SubjectService/FindSubjects",
                2,
                Some("flaky-find-2".to_owned())
            ),
            (
                "kluis.v1.SubjectService/BatchGetSubjects",
                1,
                Some("flaky-batch-1".to_owned())
            ),
            (
                "kluis.v1.SubjectService/BatchGetSubjects",
                2,
                Some("flaky-batch-2".to_owned())
            ),
        ]
    );

    // The attempts are bounded: kluis unavailable for longer ends in Unavailable.
    let (always, addr) = Flaky::start(&app, u32::MAX).await;
    let patient = config_at(addr, &billing_token)
        .purpose("account")
        .connect()
        .await
        .unwrap();
    let e = patient.get_subject(&id, &[]).await.unwrap_err();
    assert!(
        matches!(&e, Error::Unavailable { request_id: Some(r), .. } if r == "flaky-get-4"),
        "{e:?}"
    );
    assert_eq!(always.calls("get"), 4, "max_attempts in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_and_updates_are_not_retried_on_unavailable() {
    let app = spawn_kluis().await;
    let backend_token = app.token_for("backend", "hosting-backend").await;
    let direct = connect(&app, &backend_token, "account").await;
    let existing = direct.create_subject(signup(&tag())).await.unwrap();
    let (flaky, addr) = Flaky::start(&app, 1).await;
    let retries = Arc::new(AtomicU32::new(0));
    let counted = retries.clone();
    let backend = config_at(addr, &backend_token)
        .purpose("account")
        .on_retry(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .connect()
        .await
        .unwrap();

    let t = tag();
    let e = backend.create_subject(signup(&t)).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert_eq!(flaky.calls("create"), 1, "a create is attempted once");
    assert!(
        direct
            .find_by_email(&email_of(&t))
            .await
            .unwrap()
            .is_empty()
    );

    let e = backend
        .update_subject(
            pb::Subject {
                id: existing.id().to_owned(),
                name: Some(pb::Name {
                    given: "Piet".into(),
                    family: "Pietersen".into(),
                }),
                ..Default::default()
            },
            &["name"],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert_eq!(flaky.calls("update"), 1, "an update is attempted once");
    assert_eq!(retries.load(Ordering::SeqCst), 0);
    assert_eq!(
        direct
            .get_subject(existing.id(), &[])
            .await
            .unwrap()
            .version(),
        1
    );

    // The next create gets through (the front fails only the first).
    backend.create_subject(signup(&t)).await.unwrap();
    assert_eq!(flaky.calls("create"), 2);
}

/// A port nothing listens on yet (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts forwarding `port` to `target` once `start` fires (kluis "coming up" late).
fn forward_later(port: u16, target: SocketAddr, start: tokio::sync::oneshot::Receiver<()>) {
    tokio::spawn(async move {
        if start.await.is_err() {
            return;
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_made_before_kluis_listens_is_retried_until_it_answers() {
    let app = spawn_kluis().await;
    let t = tag();
    let id = operator(&app)
        .await
        .create_subject(customer(&t))
        .await
        .unwrap()
        .subject
        .id;
    let billing_token = app.token_for("billing", "billing").await;
    let port = free_port();
    let (start, started) = tokio::sync::oneshot::channel();
    forward_later(port, app.addr, started);
    let start = Mutex::new(Some(start));
    let retries = Arc::new(AtomicU32::new(0));
    let counted = retries.clone();
    // The service starts first: a lazy client, nothing listening on the port yet.
    let billing = config_at(SocketAddr::from(([127, 0, 0, 1], port)), &billing_token)
        .purpose("account")
        .retry(RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        })
        .on_retry(move |r| {
            assert!(matches!(r.error, Error::Transport { .. }), "{:?}", r.error);
            counted.fetch_add(1, Ordering::SeqCst);
            // The first failed attempt brings kluis up.
            if let Some(start) = start.lock().unwrap().take() {
                let _ = start.send(());
            }
        })
        .connect_lazy()
        .unwrap();

    let read = billing.get_subject(&id, &["payment"]).await.unwrap();
    assert_eq!(set(&read.paths()), category("payment"));
    assert!(
        retries.load(Ordering::SeqCst) >= 1,
        "the first attempt found nothing listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_is_not_retried_while_kluis_is_unreachable() {
    let app = spawn_kluis().await;
    let backend_token = app.token_for("backend", "hosting-backend").await;
    let port = free_port();
    let (start, started) = tokio::sync::oneshot::channel();
    forward_later(port, app.addr, started);
    let retries = Arc::new(AtomicU32::new(0));
    let counted = retries.clone();
    let backend = config_at(SocketAddr::from(([127, 0, 0, 1], port)), &backend_token)
        .purpose("account")
        .on_retry(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .connect_lazy()
        .unwrap();
    let t = tag();
    let e = backend.create_subject(signup(&t)).await.unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    assert!(e.is_retryable(), "retryable in kind, but a create is not");
    assert_eq!(retries.load(Ordering::SeqCst), 0);

    // Once kluis is reachable, the same client works; nothing was created by the failed call.
    start.send(()).unwrap();
    let direct = connect(&app, &backend_token, "account").await;
    assert!(
        direct
            .find_by_email(&email_of(&t))
            .await
            .unwrap()
            .is_empty()
    );
    let created = backend.create_subject(signup(&t)).await.unwrap();
    assert_eq!(
        direct.find_by_email(&email_of(&t)).await.unwrap(),
        [created.id()]
    );
}

// ---- the billing example ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_billing_example_finds_the_customer_reads_its_paths_and_records_an_order() {
    let app = spawn_kluis().await;
    let t = tag();
    let op = operator(&app).await;
    let id = op.create_subject(customer(&t)).await.unwrap().subject.id;
    // The hosting backend's account record keeps the account paths alive.
    op.open_processing(&id, "account", &format!("acct-{t}"))
        .await
        .unwrap();
    let billing_token = app.token_for("billing", "billing").await;
    let billing = connect(&app, &billing_token, "account").await;
    let invoice = format!("INV-{t}");

    let run = billing_example::run(&billing, &email_of(&t).to_uppercase(), &invoice)
        .await
        .unwrap();
    assert_eq!(run.subject_id, id);
    let mut account = category("billing");
    account.extend(category("payment"));
    assert_eq!(set(&run.account_paths), account);
    assert!(run.account_masked.is_empty());
    assert_eq!(set(&run.order_paths), category("billing"));
    assert!(run.record_created && run.record_closed);
    assert!(run.retain_until.is_some());

    // Run again for the same invoice: the closed record is not reopened, closing again changes
    // nothing.
    let again = billing_example::run(&billing, &email_of(&t), &invoice)
        .await
        .unwrap();
    assert!(!again.record_created && !again.record_closed);
    assert_eq!(set(&again.account_paths), account);

    match billing_example::run(&billing, &format!("nobody.{t}@example.nl"), &invoice).await {
        Err(billing_example::RunError::NoCustomer) => {}
        other => panic!("expected NoCustomer, got {other:?}"),
    }
    // A refusal comes back as the client's error, for the example to match on.
    let forged = connect(&app, "kluis_0000_forged", "account").await;
    match billing_example::run(&forged, &email_of(&t), &invoice).await {
        Err(billing_example::RunError::Kluis(Error::Unauthenticated { .. })) => {}
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
}
