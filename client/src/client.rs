//! The [`Client`]: typed calls for what kluis's callers do (subjects, lookups, processing
//! records), each with the client's token, purpose, reason and deadline, idempotent ones retried;
//! and the raw generated stubs, with the same metadata, for everything else.

use std::{
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use prost_types::{FieldMask, Timestamp};
use tonic::{Request, Status, service::interceptor::InterceptedService, transport::Channel};

use crate::{
    Error,
    config::{ClientParts, RetryHook, Retrying},
    metadata::CallMetadata,
    paths::present_paths,
    pb::{
        self, admin_service_client::AdminServiceClient, audit_service_client::AuditServiceClient,
        consent_service_client::ConsentServiceClient,
        credential_service_client::CredentialServiceClient,
        disclosure_service_client::DisclosureServiceClient,
        retention_service_client::RetentionServiceClient,
        rights_service_client::RightsServiceClient, subject_service_client::SubjectServiceClient,
    },
    retry::RetryPolicy,
};

/// The channel under every stub of a [`Client`]: the connection plus the metadata interceptor.
pub type KluisChannel = InterceptedService<Channel, CallMetadata>;

/// A connection to kluis with a caller's token and a declared purpose. Cheap to clone (the
/// connection is shared); [`with_purpose`](Client::with_purpose),
/// [`with_reason`](Client::with_reason) and [`with_timeout`](Client::with_timeout) give clones
/// that differ only in what they declare.
///
/// ```no_run
/// # async fn demo() -> Result<(), kluis_client::Error> {
/// use kluis_client::{ClientConfig, Error, SecretString};
///
/// let billing = ClientConfig::new("http://127.0.0.1:50051", SecretString::from("kluis_…"))
///     .purpose("account")
///     .connect()
///     .await?;
/// let ids = billing.find_by_email("jan.jansen@example.nl").await?;
/// for id in &ids {
///     match billing.get_subject(id, &["billing", "payment"]).await {
///         Ok(read) => println!("{id}: {:?}", read.paths()),
///         Err(Error::NotFound { .. }) => println!("{id}: gone meanwhile"),
///         Err(e) => return Err(e),
///     }
/// }
/// let order = billing.with_purpose("order")?;
/// order.open_processing(&ids[0], "order", "INV-2026-0001").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    endpoint: Arc<str>,
    metadata: CallMetadata,
    retry: RetryPolicy,
    on_retry: Option<RetryHook>,
}

/// A subject as kluis answered a read or a write: what the caller may see under the declared
/// purpose. Its `Debug` lists ids and paths, never values.
#[derive(Clone, Default)]
pub struct SubjectData {
    /// The values the caller may read (only the paths asked for, on a read with a mask).
    pub subject: pb::Subject,
    /// Paths the caller's role sees only masked, with the masked form (never in `subject`).
    pub masked_values: Vec<pb::MaskedValue>,
    /// Paths stored for the subject that the declared purpose does not grant the caller's role.
    pub withheld_paths: Vec<String>,
}

impl SubjectData {
    fn new(
        subject: Option<pb::Subject>,
        masked_values: Vec<pb::MaskedValue>,
        withheld_paths: Vec<String>,
    ) -> SubjectData {
        SubjectData {
            subject: subject.unwrap_or_default(),
            masked_values,
            withheld_paths,
        }
    }

    /// The subject id (the only thing other systems keep).
    pub fn id(&self) -> &str {
        &self.subject.id
    }

    /// The version to pass as `expected_version` to an update.
    pub fn version(&self) -> u64 {
        self.subject.version
    }

    /// The leaf paths that came back with a value, in proto order.
    pub fn paths(&self) -> Vec<&'static str> {
        present_paths(&self.subject)
    }

    /// The paths that came back masked.
    pub fn masked_paths(&self) -> Vec<&str> {
        self.masked_values.iter().map(|m| m.path.as_str()).collect()
    }
}

impl fmt::Debug for SubjectData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubjectData")
            .field("id", &self.subject.id)
            .field("version", &self.subject.version)
            .field("paths", &self.paths())
            .field("masked_paths", &self.masked_paths())
            .field("withheld_paths", &self.withheld_paths)
            .finish()
    }
}

/// A FindSubjects key: exactly one blind-indexed path. Its `Debug` hides the value.
#[derive(Clone, PartialEq, Eq)]
pub enum Lookup {
    /// `contact.email`, matched case-insensitively.
    Email(String),
    /// `contact.phone`, E.164 (spaces and dashes accepted).
    Phone(String),
    /// `account.username`, matched case-insensitively.
    Username(String),
    /// `payment.iban`, spaces and case ignored.
    Iban(String),
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lookup::Email(_) => "Lookup::Email(redacted)",
            Lookup::Phone(_) => "Lookup::Phone(redacted)",
            Lookup::Username(_) => "Lookup::Username(redacted)",
            Lookup::Iban(_) => "Lookup::Iban(redacted)",
        })
    }
}

/// One id's outcome in [`Client::batch_get_subjects`].
#[derive(Debug)]
pub struct BatchItem {
    /// The id as requested.
    pub id: String,
    /// The subject, or this id's own error (typically [`Error::NotFound`]).
    pub result: Result<SubjectData, Error>,
}

const GET_SUBJECT: &str = "kluis.v1.SubjectService/GetSubject";
const FIND_SUBJECTS: &str = "kluis.v1.SubjectService/FindSubjects";
const BATCH_GET_SUBJECTS: &str = "kluis.v1.SubjectService/BatchGetSubjects";
const CREATE_SUBJECT: &str = "kluis.v1.SubjectService/CreateSubject";
const UPDATE_SUBJECT: &str = "kluis.v1.SubjectService/UpdateSubject";
const OPEN_PROCESSING: &str = "kluis.v1.RetentionService/OpenProcessing";
const CLOSE_PROCESSING: &str = "kluis.v1.RetentionService/CloseProcessing";

/// Whether a failed call may be sent again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idempotency {
    /// Reads, and calls the API defines as idempotent: retried.
    Idempotent,
    /// Creates and updates: attempted once.
    Once,
}

impl Client {
    pub(crate) fn from_parts(channel: Channel, parts: ClientParts) -> Client {
        Client {
            channel,
            endpoint: parts.endpoint,
            metadata: parts.metadata,
            retry: parts.retry,
            on_retry: parts.on_retry,
        }
    }

    /// A clone that declares `purpose` (`x-kluis-purpose`) instead.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `purpose` is not printable ASCII without spaces.
    pub fn with_purpose(&self, purpose: &str) -> Result<Client, Error> {
        Ok(Client {
            metadata: self.metadata.with_purpose(Some(purpose))?,
            ..self.clone()
        })
    }

    /// A clone that records `reason` (`x-kluis-reason`, a ticket reference) instead.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `reason` is not printable ASCII without spaces.
    pub fn with_reason(&self, reason: &str) -> Result<Client, Error> {
        Ok(Client {
            metadata: self.metadata.with_reason(Some(reason))?,
            ..self.clone()
        })
    }

    /// A clone whose calls have `timeout` as their deadline (retries included).
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            metadata: self.metadata.with_timeout(timeout),
            ..self.clone()
        }
    }

    /// The declared purpose, if any.
    pub fn purpose(&self) -> Option<&str> {
        self.metadata.purpose()
    }

    /// The endpoint as configured.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    // ---- SubjectService ---------------------------------------------------------------------

    /// Creates a subject from the fields that are set (kluis validates each; the paths must be
    /// writable for the caller's role under the declared purpose). Answers with the new id and
    /// version 1. Never retried: a create whose answer was lost may have happened.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming every bad field, [`Error::PermissionDenied`] for paths
    /// outside the grant, [`Error::AlreadyExists`] for a taken username, and the errors of any
    /// call.
    pub async fn create_subject(&self, subject: pb::Subject) -> Result<SubjectData, Error> {
        let request = pb::CreateSubjectRequest {
            subject: Some(subject),
            source: String::new(),
        };
        let stub = self.subject_service();
        self.call(CREATE_SUBJECT, Idempotency::Once, |timeout| {
            let mut stub = stub.clone();
            let request = timed(request.clone(), timeout);
            async move { stub.create_subject(request).await }
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            SubjectData::new(r.subject, r.masked_values, r.withheld_paths)
        })
    }

    /// Reads subject `id`: only `paths` (leaves or groups such as `billing`, `payment`,
    /// `billing.address`; empty: every path the caller may read). Retried while kluis is
    /// unavailable.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown or erased subject (or one retention hides from the
    /// caller), [`Error::PermissionDenied`] for a path outside the grant asked for explicitly,
    /// [`Error::FailedPrecondition`] after an objection or under a restriction, and the errors
    /// of any call.
    pub async fn get_subject(&self, id: &str, paths: &[&str]) -> Result<SubjectData, Error> {
        let request = pb::GetSubjectRequest {
            id: id.to_owned(),
            read_mask: mask(paths),
            view: pb::SubjectView::Basic as i32,
        };
        let stub = self.subject_service();
        self.call(GET_SUBJECT, Idempotency::Idempotent, |timeout| {
            let mut stub = stub.clone();
            let request = timed(request.clone(), timeout);
            async move { stub.get_subject(request).await }
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            SubjectData::new(r.subject, r.masked_values, r.withheld_paths)
        })
    }

    /// Reads up to 100 subjects at once (same `paths` for all); one [`BatchItem`] per id, in
    /// order, each with its own outcome. Retried while kluis is unavailable.
    ///
    /// # Errors
    /// Errors that refuse the whole batch (`InvalidArgument` for 0 or more than 100 ids,
    /// permission, purpose) and those of any call; a missing subject is its item's
    /// [`Error::NotFound`].
    pub async fn batch_get_subjects(
        &self,
        ids: &[&str],
        paths: &[&str],
    ) -> Result<Vec<BatchItem>, Error> {
        let request = pb::BatchGetSubjectsRequest {
            ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            read_mask: mask(paths),
            view: pb::SubjectView::Basic as i32,
        };
        let stub = self.subject_service();
        let response = self
            .call(BATCH_GET_SUBJECTS, Idempotency::Idempotent, |timeout| {
                let mut stub = stub.clone();
                let request = timed(request.clone(), timeout);
                async move { stub.batch_get_subjects(request).await }
            })
            .await?
            .into_inner();
        Ok(response
            .results
            .into_iter()
            .map(|item| {
                use pb::batch_get_subjects_result::Result as Item;
                let result = match item.result {
                    Some(Item::Subject(s)) => Ok(SubjectData::new(
                        Some(s),
                        item.masked_values,
                        item.withheld_paths,
                    )),
                    Some(Item::Error(e)) => Err(Error::from_item(e.code, e.message)),
                    None => Err(Error::Unknown {
                        message: "batch item without subject or error".into(),
                    }),
                };
                BatchItem {
                    id: item.id,
                    result,
                }
            })
            .collect())
    }

    /// Sets the paths in `paths` (leaves or groups) to the values in `subject` (whose `id` names
    /// the subject): an empty value clears the path, a repeated field is replaced whole, other
    /// paths are untouched. With `expected_version`, refused unless the stored version equals
    /// it. Never retried.
    ///
    /// # Errors
    /// [`Error::Conflict`] when `expected_version` is stale, [`Error::InvalidArgument`] for bad
    /// values or an empty mask, [`Error::PermissionDenied`], [`Error::NotFound`],
    /// [`Error::FailedPrecondition`] for a path kept only for another purpose's retention, and
    /// the errors of any call.
    pub async fn update_subject(
        &self,
        subject: pb::Subject,
        paths: &[&str],
        expected_version: Option<u64>,
    ) -> Result<SubjectData, Error> {
        let request = pb::UpdateSubjectRequest {
            subject: Some(subject),
            update_mask: mask(paths),
            expected_version,
            source: String::new(),
        };
        let stub = self.subject_service();
        self.call(UPDATE_SUBJECT, Idempotency::Once, |timeout| {
            let mut stub = stub.clone();
            let request = timed(request.clone(), timeout);
            async move { stub.update_subject(request).await }
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            SubjectData::new(r.subject, r.masked_values, r.withheld_paths)
        })
    }

    /// The ids of the subjects whose `key` path equals the value (at most 1000); empty when
    /// none matches or the caller may see none. Retried while kluis is unavailable.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a value that cannot be such a key (naming the field), and
    /// the errors of any call.
    pub async fn find_subjects(&self, key: Lookup) -> Result<Vec<String>, Error> {
        use pb::find_subjects_request::Key;
        let request = pb::FindSubjectsRequest {
            key: Some(match key {
                Lookup::Email(v) => Key::Email(v),
                Lookup::Phone(v) => Key::Phone(v),
                Lookup::Username(v) => Key::Username(v),
                Lookup::Iban(v) => Key::Iban(v),
            }),
        };
        let stub = self.subject_service();
        self.call(FIND_SUBJECTS, Idempotency::Idempotent, |timeout| {
            let mut stub = stub.clone();
            let request = timed(request.clone(), timeout);
            async move { stub.find_subjects(request).await }
        })
        .await
        .map(|r| r.into_inner().subject_ids)
    }

    /// [`find_subjects`](Client::find_subjects) by e-mail address.
    ///
    /// # Errors
    /// As [`find_subjects`](Client::find_subjects).
    pub async fn find_by_email(&self, email: &str) -> Result<Vec<String>, Error> {
        self.find_subjects(Lookup::Email(email.to_owned())).await
    }

    // ---- RetentionService -------------------------------------------------------------------

    /// Opens the processing record (subject, `purpose`, `reference`) when a relationship starts
    /// (billing: an `order` per invoice number, a `subscription` per contract). Sent under the
    /// client's declared purpose, or under `purpose` when the client declares none; kluis wants
    /// the record's own purpose (operators: `subject-request`). Idempotent in kluis, so retried:
    /// `created` is false when the record existed already — also when an earlier attempt whose
    /// answer was lost created it.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] when the reference belongs to another subject,
    /// [`Error::FailedPrecondition`] for a closed record, [`Error::InvalidArgument`] for a
    /// purpose without retention or a bad reference, [`Error::NotFound`], and the errors of any
    /// call.
    pub async fn open_processing(
        &self,
        subject_id: &str,
        purpose: &str,
        reference: &str,
    ) -> Result<pb::OpenProcessingResponse, Error> {
        let request = pb::OpenProcessingRequest {
            subject_id: subject_id.to_owned(),
            purpose: purpose.to_owned(),
            reference: reference.to_owned(),
        };
        let stub = self.retention_for(purpose)?;
        self.call(OPEN_PROCESSING, Idempotency::Idempotent, |timeout| {
            let mut stub = stub.clone();
            let request = timed(request.clone(), timeout);
            async move { stub.open_processing(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Closes the record (`purpose`, `reference`) with the close event the policy defines for
    /// the purpose (`order_completed`, `subscription_cancelled`, `account_closed`,
    /// `service_ended`) at `at` (default: now), starting the retention clock. Sent under the
    /// declared purpose like [`open_processing`](Client::open_processing). Idempotent in kluis
    /// (the first close stands; `closed` is false after it), so retried.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown record, [`Error::InvalidArgument`] for another event
    /// or an `at` too far ahead, and the errors of any call.
    pub async fn close_processing(
        &self,
        purpose: &str,
        reference: &str,
        event: &str,
        at: Option<SystemTime>,
    ) -> Result<pb::CloseProcessingResponse, Error> {
        let request = pb::CloseProcessingRequest {
            purpose: purpose.to_owned(),
            reference: reference.to_owned(),
            event: event.to_owned(),
            at: at.map(Timestamp::from),
        };
        let stub = self.retention_for(purpose)?;
        self.call(CLOSE_PROCESSING, Idempotency::Idempotent, |timeout| {
            let mut stub = stub.clone();
            let request = timed(request.clone(), timeout);
            async move { stub.close_processing(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    // ---- raw stubs --------------------------------------------------------------------------

    /// The generated SubjectService stub with this client's token, purpose, reason and default
    /// deadline (no retries: the caller decides). Map its errors with `.map_err(Error::from)`.
    pub fn subject_service(&self) -> SubjectServiceClient<KluisChannel> {
        SubjectServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The generated RetentionService stub (see [`subject_service`](Client::subject_service)).
    pub fn retention_service(&self) -> RetentionServiceClient<KluisChannel> {
        RetentionServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The generated ConsentService stub (see [`subject_service`](Client::subject_service)).
    pub fn consent_service(&self) -> ConsentServiceClient<KluisChannel> {
        ConsentServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The generated RightsService stub (see [`subject_service`](Client::subject_service)).
    pub fn rights_service(&self) -> RightsServiceClient<KluisChannel> {
        RightsServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The generated DisclosureService stub (see [`subject_service`](Client::subject_service)).
    pub fn disclosure_service(&self) -> DisclosureServiceClient<KluisChannel> {
        DisclosureServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The generated CredentialService stub (see [`subject_service`](Client::subject_service)).
    pub fn credential_service(&self) -> CredentialServiceClient<KluisChannel> {
        CredentialServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The generated AdminService stub (operators; see
    /// [`subject_service`](Client::subject_service)).
    pub fn admin_service(&self) -> AdminServiceClient<KluisChannel> {
        AdminServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The generated AuditService stub (operators; see
    /// [`subject_service`](Client::subject_service)).
    pub fn audit_service(&self) -> AuditServiceClient<KluisChannel> {
        AuditServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
    }

    /// The underlying channel, for services of your own on the same connection.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    // ---- internals --------------------------------------------------------------------------

    /// The RetentionService stub for a record of `purpose`: under the declared purpose, or
    /// under `purpose` itself when none is declared.
    fn retention_for(&self, purpose: &str) -> Result<RetentionServiceClient<KluisChannel>, Error> {
        if self.metadata.purpose().is_some() {
            return Ok(self.retention_service());
        }
        Ok(RetentionServiceClient::with_interceptor(
            self.channel.clone(),
            self.metadata.with_purpose(Some(purpose))?,
        ))
    }

    /// Runs `attempt` (given the time left until the call's deadline) once, or — when
    /// idempotent — until it succeeds, fails with a non-retryable error, uses up the policy's
    /// attempts, or the next pause would pass the deadline.
    async fn call<T, F, Fut>(
        &self,
        method: &'static str,
        idempotency: Idempotency,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.metadata.timeout();
        let attempts = match idempotency {
            Idempotency::Idempotent => self.retry.max_attempts.max(1),
            Idempotency::Once => 1,
        };
        let mut n = 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let error = match attempt(left).await {
                Ok(answer) => return Ok(answer),
                Err(status) => Error::from(status),
            };
            if n >= attempts || !error.is_retryable() {
                return Err(error);
            }
            let delay = self.retry.delay(n);
            if Instant::now() + delay >= deadline {
                return Err(error);
            }
            if let Some(hook) = &self.on_retry {
                hook(&Retrying {
                    method,
                    attempt: n,
                    delay,
                    error: &error,
                });
            }
            tokio::time::sleep(delay).await;
            n += 1;
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("metadata", &self.metadata)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// A request with the gRPC timeout set to what is left of the call's deadline (at least 1 ms,
/// so an exhausted deadline fails at once rather than meaning "no deadline").
fn timed<T>(message: T, left: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(left.max(Duration::from_millis(1)));
    request
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    (!paths.is_empty()).then(|| FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::{ClientConfig, SecretString};

    /// A port nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn unreachable_client(retry: RetryPolicy, retries: Arc<AtomicU32>) -> Client {
        ClientConfig::new(
            format!("http://127.0.0.1:{}", closed_port()),
            SecretString::from("kluis_x_y"),
        )
        .purpose("account")
        .retry(retry)
        .on_retry(move |r| {
            assert!(r.error.is_retryable());
            retries.fetch_add(1, Ordering::SeqCst);
        })
        .connect_lazy()
        .unwrap()
    }

    const FAST: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
    };

    #[tokio::test]
    async fn a_read_is_attempted_max_attempts_times_then_reports_the_transport_error() {
        let retries = Arc::new(AtomicU32::new(0));
        let client = unreachable_client(FAST, retries.clone());
        let e = client.get_subject("id", &[]).await.unwrap_err();
        assert!(matches!(e, Error::Transport { .. }), "{e:?}");
        assert_eq!(retries.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn creates_and_updates_are_attempted_once() {
        let retries = Arc::new(AtomicU32::new(0));
        let client = unreachable_client(FAST, retries.clone());
        let e = client
            .create_subject(pb::Subject::default())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Transport { .. }), "{e:?}");
        let e = client
            .update_subject(pb::Subject::default(), &["name"], Some(1))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Transport { .. }), "{e:?}");
        assert_eq!(retries.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn no_pause_is_taken_that_would_pass_the_deadline() {
        let retries = Arc::new(AtomicU32::new(0));
        let slow = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
        };
        let client =
            unreachable_client(slow, retries.clone()).with_timeout(Duration::from_millis(500));
        let started = Instant::now();
        let e = client.find_by_email("a@example.nl").await.unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        assert_eq!(retries.load(Ordering::SeqCst), 0);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn debug_of_a_read_and_a_lookup_shows_paths_not_values() {
        let data = SubjectData {
            subject: pb::Subject {
                id: "0196-id".into(),
                version: 2,
                contact: Some(pb::Contact {
                    email: "jan@example.nl".into(),
                    phone: String::new(),
                }),
                ..Default::default()
            },
            masked_values: vec![pb::MaskedValue {
                path: "payment.iban".into(),
                masked: "NL** **** **** **43 00".into(),
            }],
            withheld_paths: vec!["billing.vat_number".into()],
        };
        let shown = format!("{data:?} {:?}", data.subject);
        assert!(
            shown.contains("contact.email") && shown.contains("0196-id"),
            "{shown}"
        );
        assert!(shown.contains("payment.iban") && shown.contains("billing.vat_number"));
        assert!(
            !shown.contains("jan@") && !shown.contains("NL**"),
            "{shown}"
        );
        let lookup = format!("{:?}", Lookup::Email("jan@example.nl".into()));
        assert!(!lookup.contains("jan"), "{lookup}");
    }
}
