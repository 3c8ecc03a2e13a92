//! Horizontal scale: two instances on one database behind one address (a round-robin TCP proxy,
//! as a load balancer would be), under concurrent load — nothing lost or duplicated, one audit
//! chain both verify, and a revocation on one instance seen by the other within the documented
//! window (`kluis::domain::callers::CACHE_TTL`).

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use kluis::api::pb::{self, subject_service_client::SubjectServiceClient};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, transport::Channel};

use crate::helpers::{
    OPERATOR_PURPOSE, OPERATOR_REASON, TestApp, full_subject, spawn_kluis, spawn_on, tag,
};

/// A TCP proxy on 127.0.0.1 handing each new connection to the next backend in turn.
async fn round_robin(backends: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut next = 0usize;
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let backend = backends[next % backends.len()];
            next += 1;
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    addr
}

/// One new HTTP/2 connection through the proxy.
async fn connection(proxy: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{proxy}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn subjects(channel: Channel, token: &str) -> crate::helpers::Subjects {
    SubjectServiceClient::with_interceptor(
        channel,
        TestApp::bearer(Some(token), Some(OPERATOR_PURPOSE), Some(OPERATOR_REASON)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_behind_one_address_lose_nothing_and_keep_one_audit_chain() {
    let a = spawn_kluis().await;
    let b = spawn_on(a.db.clone()).await;
    let proxy = round_robin(vec![a.addr, b.addr]).await;
    let token = a.operator_token.clone();

    // 8 connections (alternately to a and b), 2 writers each: every writer creates subjects and
    // reads each one back over the *next* connection, so half the reads cross instances.
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(connection(proxy).await);
    }
    let channels = Arc::new(channels);
    let per_task = 25;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let channels = channels.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..per_task {
                let write = subjects(channels[t % 8].clone(), &token);
                let read = subjects(channels[(t + 1) % 8].clone(), &token);
                let subject = full_subject(&format!("{}-{t}-{i}", tag()));
                let created = write
                    .clone()
                    .create_subject(pb::CreateSubjectRequest {
                        subject: Some(subject.clone()),
                        source: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .subject
                    .unwrap();
                let got = read
                    .clone()
                    .get_subject(pb::GetSubjectRequest {
                        id: created.id.clone(),
                        read_mask: None,
                        view: 0,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .subject
                    .unwrap();
                assert_eq!(got.contact, subject.contact);
                ids.push(created.id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 16 * per_task);
    assert_eq!(unique.len(), ids.len(), "an id was handed out twice");
    let stored = a.raw_count("SELECT count(*) FROM subjects").await;
    assert_eq!(stored, ids.len() as i64, "subjects lost or duplicated");
    // Each instance reads every subject, whichever wrote it.
    for id in ids.iter().step_by(7) {
        a.get(id).await.unwrap();
        b.get(id).await.unwrap();
    }

    // One chain: both instances verify all of it, and it holds every create of the load.
    for app in [&a, &b] {
        app.assert_audit_chain_intact().await;
    }
    let creates = a
        .raw_count("SELECT count(*) FROM audit_events WHERE method = 'kluis.v1.SubjectService/CreateSubject'")
        .await;
    assert_eq!(creates, ids.len() as i64);
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_on_one_instance_is_refused_by_the_other_within_the_cache_window() {
    let a = spawn_kluis().await;
    let b = spawn_on(a.db.clone()).await;
    let created = a.create(full_subject(&tag())).await;
    let issued = a
        .admin()
        .create_caller_token(pb::CreateCallerTokenRequest {
            name: "billing".into(),
            role: "billing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let read = |app: &TestApp| {
        let client = app.subjects_under(Some(&issued.token), Some("account"), None);
        let id = created.id.clone();
        async move {
            client
                .clone()
                .get_subject(pb::GetSubjectRequest {
                    id,
                    read_mask: None,
                    view: 0,
                })
                .await
                .map(drop)
        }
    };
    // Both instances have the caller in their cache.
    read(&a).await.unwrap();
    read(&b).await.unwrap();

    a.admin()
        .revoke_caller_token(pb::RevokeCallerTokenRequest {
            id: issued.caller.unwrap().id,
        })
        .await
        .unwrap();
    // At once on the instance that revoked.
    assert_eq!(read(&a).await.unwrap_err().code(), Code::Unauthenticated);
    // On the other, once its cached row is older than the window.
    tokio::time::sleep(kluis::domain::callers::CACHE_TTL + Duration::from_millis(100)).await;
    assert_eq!(read(&b).await.unwrap_err().code(), Code::Unauthenticated);
    b.stop().await;
    a.stop().await;
}
