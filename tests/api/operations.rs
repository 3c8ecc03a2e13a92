//! Operations: durability settings, restarts, several instances on one database, health and
//! reflection without a token; a stopped server leaves no file open and no job running.

use kluis::api::pb;
use tonic::Code;

use crate::helpers::{full_subject, postgres_mode, spawn_kluis, spawn_on, tag};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_runs_with_synchronous_full_and_wal() {
    let app = spawn_kluis().await;
    let d = app.store.durability().await.unwrap();
    if postgres_mode() {
        assert_eq!(d.backend, "postgres");
    } else {
        assert_eq!(
            d.sqlite_synchronous,
            Some(2),
            "PRAGMA synchronous read back from the server's pool: 2 = FULL"
        );
        assert_eq!(d.sqlite_journal_mode.as_deref(), Some("wal"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_data_readable() {
    let app = spawn_kluis().await;
    let t = tag();
    let created = app.create(full_subject(&t)).await;
    let db = app.stop().await;
    let again = spawn_on(db).await;
    let got = again.get(&created.id).await.unwrap();
    assert_eq!(got.contact.unwrap().email, format!("Klant.{t}@Example.nl"));
    let found = again
        .subjects()
        .find_subjects(pb::FindSubjectsRequest {
            key: Some(pb::find_subjects_request::Key::Username(format!("user{t}"))),
        })
        .await
        .unwrap()
        .into_inner()
        .subject_ids;
    assert_eq!(found, vec![created.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_database_read_each_others_subjects() {
    let a = spawn_kluis().await;
    let b = spawn_on(a.db.clone()).await;
    assert_ne!(a.addr, b.addr);
    let from_a = a.create(full_subject(&tag())).await;
    let from_b = b.create(full_subject(&tag())).await;
    assert_eq!(b.get(&from_a.id).await.unwrap().name, from_a.name);
    assert_eq!(a.get(&from_b.id).await.unwrap().name, from_b.name);
    // A token made on one instance works on the other.
    let token = b.token_for("billing-svc", "billing").await;
    a.subjects_under(Some(&token), Some("account"), None)
        .get_subject(pb::GetSubjectRequest {
            id: from_b.id.clone(),
            read_mask: None,
            view: 0,
        })
        .await
        .unwrap();
    // Erasure on one is seen by the other.
    a.subjects()
        .erase_subject(pb::EraseSubjectRequest {
            id: from_b.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(b.get(&from_b.id).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_without_a_token() {
    let app = spawn_kluis().await;
    assert!(kluis::api::check_health(app.addr, None).await.unwrap());

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "kluis.v1.SubjectService",
        "kluis.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_a_request_id() {
    let app = spawn_kluis().await;
    let response = app
        .subjects()
        .find_subjects(pb::FindSubjectsRequest {
            key: Some(pb::find_subjects_request::Key::Email("a@example.nl".into())),
        })
        .await
        .unwrap();
    let id = response
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(id.len(), 32);
    let err = app
        .subjects_as(None)
        .find_subjects(pb::FindSubjectsRequest::default())
        .await
        .unwrap_err();
    assert!(err.metadata().get("x-request-id").is_some());
}

/// The files below `dir` this process has open.
fn open_files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(&dir))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_has_none_of_its_files_open_and_no_job_left_running() {
    let app = spawn_kluis().await;
    let dir = app.db.data_dir();
    let created = app.create(full_subject(&tag())).await;
    app.get(&created.id).await.unwrap();
    // The audit indexer runs every 500 ms: let it index these calls at least once.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    if !postgres_mode() {
        assert!(
            !open_files_under(&dir).is_empty(),
            "a serving SQLite instance has its database open"
        );
    }
    let _db = app.stop().await;
    let open = open_files_under(&dir);
    assert!(open.is_empty(), "still open after stop: {open:?}");
    // A job left running would now fail at every run, and say so.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let logs = crate::helpers::captured_logs();
    assert!(
        !logs.contains("audit index writer closed"),
        "a background job still runs: {logs}"
    );
}
