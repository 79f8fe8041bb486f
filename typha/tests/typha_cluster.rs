//! Cluster tier: Typha against the real kube-apiserver. Three agents fed through two Typha replicas hold
//! exactly what a direct watch holds through creates, updates and deletes; when a replica dies mid-stream its
//! clients move to the other and converge; a client with the wrong identity and one speaking a future
//! protocol version are refused with clear messages.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_datastore::typha::{client, tls};
use caracal_datastore::{Cache, Update, api};
use caracal_typha::server;
use serde_json::json;
use tokio::sync::mpsc;

type Pki = caracal_e2e::pki::TyphaPki;

fn pki() -> Pki {
    Pki::generate().expect("pki")
}

/// A Typha replica fed by its own upstream watches; returns its address and the tasks to kill it.
async fn replica(
    client: &kube::Client,
    pki: &Pki,
) -> (String, Vec<tokio::task::JoinHandle<()>>, Arc<server::Server>) {
    let srv = server::Server::new(server::Config {
        ping_interval: Duration::from_millis(500),
        shed_window: Duration::from_millis(300),
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr").to_string();
    let cfg = tls::server_config(&pki.ca, &pki.server.0, &pki.server.1).expect("server tls");
    let (tx, mut rx) = mpsc::channel::<Update>(4096);
    let mut tasks = api::watch(client.clone(), tx);
    let feeder = srv.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(u) = rx.recv().await {
            feeder.push(u).await;
        }
    }));
    tasks.push(tokio::spawn(srv.clone().serve(listener, cfg)));
    (addr, tasks, srv)
}

fn agent(
    addrs: Vec<String>,
    pki: &Pki,
    cert: &(String, String),
    name: &str,
    version: u32,
) -> (mpsc::Receiver<Update>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4096);
    let tls = tls::client_config(&pki.ca, &cert.0, &cert.1).expect("client tls");
    let mut cfg = client::Config::new(addrs, name);
    cfg.protocol_version = version;
    (rx, tokio::spawn(client::run(cfg, tls, tx)))
}

fn drain(cache: &mut Cache, rx: &mut mpsc::Receiver<Update>) {
    while let Ok(u) = rx.try_recv() {
        cache.apply(u);
    }
}

async fn converge(
    direct: &mut (Cache, mpsc::Receiver<Update>),
    agents: &mut [(Cache, mpsc::Receiver<Update>)],
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        drain(&mut direct.0, &mut direct.1);
        for a in agents.iter_mut() {
            drain(&mut a.0, &mut a.1);
        }
        let want = direct.0.documents();
        if direct.0.in_sync() && agents.iter().all(|a| a.0.in_sync() && a.0.documents() == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: Typha-fed agents did not converge on the direct watch's state"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_ns(client: &kube::Client, name: &str, labels: serde_json::Value) {
    caracal_e2e::objects::namespace(client, name, labels)
        .await
        .expect("namespace");
}

#[tokio::test]
async fn typha_hands_out_no_snapshot_before_its_upstream_is_complete() {
    let pki = pki();
    let srv = server::Server::new(server::Config::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr").to_string();
    let serving = tokio::spawn(srv.clone().serve(
        listener,
        tls::server_config(&pki.ca, &pki.server.0, &pki.server.1).expect("tls"),
    ));
    let (tx, mut rx) = mpsc::channel(64);
    let cfg = client::Config::new(vec![addr.clone()], "node-1");
    let tls_cfg = tls::client_config(&pki.ca, &pki.node.0, &pki.node.1).expect("tls");
    let session = tokio::spawn(async move { client::session(&cfg, &addr, tls_cfg, &tx).await });
    // One kind listed, the others not: nothing reaches the agent.
    srv.push(Update::InSync {
        kind: "v1/Pod".into(),
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        rx.try_recv().is_err(),
        "a client got data before Typha's view was complete"
    );
    assert!(!srv.ready());
    for (v, k, _, _) in caracal_datastore::KINDS {
        srv.push(Update::InSync {
            kind: caracal_datastore::kind_id(v, k),
        })
        .await;
    }
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("data once complete");
    assert!(matches!(first, Some(Update::Resync { .. })), "{first:?}");
    session.abort();
    serving.abort();
}

#[tokio::test]
async fn a_client_too_slow_to_keep_up_is_dropped_so_it_resyncs() {
    let pki = pki();
    let srv = server::Server::new(server::Config {
        client_buffer: 16,
        ..Default::default()
    });
    for (v, k, _, _) in caracal_datastore::KINDS {
        srv.push(Update::InSync {
            kind: caracal_datastore::kind_id(v, k),
        })
        .await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr").to_string();
    let serving = tokio::spawn(srv.clone().serve(
        listener,
        tls::server_config(&pki.ca, &pki.server.0, &pki.server.1).expect("tls"),
    ));
    // A client that says hello and then never reads.
    let tcp = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("caracal-typha").expect("name");
    let cfg = tls::client_config(&pki.ca, &pki.node.0, &pki.node.1).expect("tls");
    let mut stalled = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("tls");
    let hello = caracal_datastore::typha::protocol::ClientMsg::Hello {
        protocol_version: 1,
        node_name: "slow".into(),
    };
    caracal_datastore::typha::protocol::write(
        &mut stalled,
        &caracal_datastore::typha::protocol::Frame::encode(&hello),
    )
    .await
    .expect("hello");
    // Updates keep coming (about 20 MB): its socket fills, its queue overflows, and it is dropped.
    let big = "x".repeat(2000);
    let start = Instant::now();
    let mut i = 0u64;
    while srv.stats.dropped.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a client that never reads was not dropped"
        );
        srv.push(Update::Upsert {
            kind: "v1/Namespace".into(),
            key: format!("n{i}"),
            object: json!({"metadata": {"name": format!("n{i}")}, "pad": big}),
        })
        .await;
        i += 1;
        if i.is_multiple_of(1000) {
            tokio::task::yield_now().await;
        }
    }
    drop(stalled);
    serving.abort();
}

#[tokio::test]
async fn agents_through_typha_hold_what_a_direct_watch_holds_across_failover() {
    let (_cp, kc) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let pki = pki();
    let (addr_a, tasks_a, srv_a) = replica(&kc, &pki).await;
    let (addr_b, tasks_b, srv_b) = replica(&kc, &pki).await;

    let (dtx, drx) = mpsc::channel(4096);
    let direct_watch = api::watch(kc.clone(), dtx);
    let mut direct = (Cache::default(), drx);
    // Agents 0 and 1 start on replica A, agent 2 on replica B; each knows both.
    let mut agents = Vec::new();
    let mut agent_tasks = Vec::new();
    for (i, first) in [&addr_a, &addr_a, &addr_b].into_iter().enumerate() {
        let other = if first == &addr_a {
            addr_b.clone()
        } else {
            addr_a.clone()
        };
        let (rx, t) = agent(
            vec![first.clone(), other],
            &pki,
            &pki.node,
            &format!("node-{i}"),
            1,
        );
        agents.push((Cache::default(), rx));
        agent_tasks.push(t);
    }

    // Creates, updates and deletes.
    for i in 0..5 {
        create_ns(&kc, &format!("ns-{i}"), json!({"round": "1"})).await;
    }
    let nps: kube::Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        kube::Api::namespaced(kc.clone(), "ns-1");
    let np = serde_json::from_value(json!({"metadata": {"name": "deny"}, "spec": {"podSelector": {}}}))
        .expect("np");
    nps.create(&Default::default(), &np).await.expect("np");
    converge(&mut direct, &mut agents, "after creates").await;
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(kc.clone());
    namespaces
        .patch(
            "ns-2",
            &Default::default(),
            &kube::api::Patch::Merge(&json!({"metadata": {"labels": {"round": "2"}}})),
        )
        .await
        .expect("update");
    nps.delete("deny", &Default::default()).await.expect("delete");
    converge(&mut direct, &mut agents, "after an update and a delete").await;

    // Replica A goes away mid-stream (sheds its clients, stops its watches); changes keep coming; its
    // clients move to B.
    srv_a.shutdown();
    for t in tasks_a {
        t.abort();
    }
    for i in 5..10 {
        create_ns(&kc, &format!("ns-{i}"), json!({"round": "3"})).await;
    }
    converge(&mut direct, &mut agents, "after replica A died").await;
    assert!(
        srv_b.stats.connections.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "every agent is on B now"
    );

    // The wrong identity is refused; a future protocol version gets the version error.
    let pki_cfg = tls::client_config(&pki.ca, &pki.intruder.0, &pki.intruder.1).expect("tls");
    let (itx, _irx) = mpsc::channel(16);
    let ended = client::session(
        &client::Config::new(vec![addr_b.clone()], "intruder"),
        &addr_b,
        pki_cfg,
        &itx,
    )
    .await;
    assert!(
        matches!(&ended, client::Ended::Refused(m) if m.contains("is not \"caracal-node\"")),
        "{ended:?}"
    );
    let ok_tls = tls::client_config(&pki.ca, &pki.node.0, &pki.node.1).expect("tls");
    let mut future = client::Config::new(vec![addr_b.clone()], "node-9");
    future.protocol_version = 2;
    let (ftx, _frx) = mpsc::channel(16);
    let ended = client::session(&future, &addr_b, ok_tls, &ftx).await;
    assert!(
        matches!(&ended, client::Ended::Refused(m) if m.contains("protocol version 2 is not supported")),
        "{ended:?}"
    );
    assert!(srv_b.stats.refused.load(std::sync::atomic::Ordering::Relaxed) >= 2);

    for t in agent_tasks.into_iter().chain(tasks_b).chain(direct_watch) {
        t.abort();
    }
}
