//! Leader election against the in-test API server: of two replicas exactly one is ready; when
//! the leader stops it releases the Lease and the standby takes over at once; when a leader
//! dies without releasing, the standby takes over once the lease expires. Durations are short
//! (whole seconds, as the Lease stores them) so the test runs in real time.

mod k8s_fake;

use std::time::Duration;

use epp_core::app::{Runtime, RuntimeOptions};
use epp_core::discovery::StaticDiscovery;
use epp_core::k8s::leader::{self, LeaderElectionConfig};
use epp_core::telemetry::Shutdown;
use k8s_fake::{FakeApi, Res};

const NS: &str = "llm-d";

fn cfg(api: &FakeApi, identity: &str) -> LeaderElectionConfig {
    let mut c = LeaderElectionConfig::new(api.client(), NS, "epp-qwen");
    c.identity = identity.into();
    c.lease_duration = Duration::from_secs(2);
    c.renew_deadline = Duration::from_millis(1500);
    c.retry_period = Duration::from_millis(200);
    c
}

async fn replica(api: &FakeApi, identity: &str) -> Runtime {
    let opts = RuntimeOptions {
        discovery: std::sync::Arc::new(StaticDiscovery {
            endpoints: vec!["127.0.0.1:9".into()],
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        }),
        metrics_addr: None,
        health_addr: Some("127.0.0.1:0".parse().unwrap()),
        leader_election: Some(cfg(api, identity)),
        ..Default::default()
    };
    let v = opts.validate().unwrap();
    Runtime::start(opts, v, Shutdown::new()).await.unwrap()
}

async fn readyz(addr: std::net::SocketAddr) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let t = String::from_utf8_lossy(&buf).to_string();
    (
        t[9..12].parse().unwrap(),
        t.split_once("\r\n\r\n").unwrap().1.to_string(),
    )
}

async fn wait_ready(p: &Runtime, want: bool, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if p.is_ready().is_ok() == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness did not become {want} within {within:?}: {:?}",
            p.is_ready()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn holder(api: &FakeApi) -> Option<String> {
    api.get(Res::Leases, NS, "epp-qwen")
        .and_then(|l| l.pointer("/spec/holderIdentity").cloned())
        .and_then(|v| v.as_str().map(String::from))
}

#[tokio::test]
async fn two_replicas_one_ready_and_the_standby_takes_over() {
    let api = FakeApi::start();
    let a = replica(&api, "replica-a").await;
    wait_ready(&a, true, Duration::from_secs(3)).await;
    let b = replica(&api, "replica-b").await;
    // B stays a standby for longer than a lease duration, because A keeps renewing.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(a.is_ready().is_ok());
    let (code, why) = readyz(b.health_addr.unwrap()).await;
    assert_eq!(code, 503);
    assert!(why.contains("not the leader"), "{why}");
    assert_eq!(readyz(a.health_addr.unwrap()).await.0, 200);
    assert_eq!(holder(&api).as_deref(), Some("replica-a"));

    // The leader stops: it releases the lease and B takes over within a few retry periods,
    // well before the 2 s lease would have expired.
    let t0 = tokio::time::Instant::now();
    a.shutdown.trigger();
    a.join().await;
    wait_ready(&b, true, Duration::from_millis(1500)).await;
    assert!(t0.elapsed() < Duration::from_millis(1500));
    assert_eq!(readyz(b.health_addr.unwrap()).await.0, 200);
    assert_eq!(holder(&api).as_deref(), Some("replica-b"));
    let transitions = api
        .get(Res::Leases, NS, "epp-qwen")
        .unwrap()
        .pointer("/spec/leaseTransitions")
        .and_then(|v| v.as_i64());
    assert_eq!(transitions, Some(1));
    b.shutdown.trigger();
    b.join().await;
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_after_the_lease_expires() {
    let api = FakeApi::start();
    let (a, a_task) = leader::start(cfg(&api, "crashing"), Shutdown::new())
        .await
        .unwrap();
    let mut a2 = a.clone();
    tokio::time::timeout(Duration::from_secs(3), a2.wait_for(true))
        .await
        .unwrap();
    let (b, _b_task) = leader::start(cfg(&api, "survivor"), Shutdown::new())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.is_leader());
    // Crash: no release.
    a_task.abort();
    let t0 = tokio::time::Instant::now();
    let mut b2 = b.clone();
    tokio::time::timeout(Duration::from_secs(4), b2.wait_for(true))
        .await
        .expect("the standby takes over once the lease expires");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "took over too early ({took:?}): the lease was still valid"
    );
    assert_eq!(holder(&api).as_deref(), Some("survivor"));
}

#[tokio::test]
async fn invalid_durations_are_rejected() {
    let api = FakeApi::start();
    let mut c = cfg(&api, "x");
    c.renew_deadline = Duration::from_secs(3);
    let e = c.validate().unwrap_err();
    assert!(e.contains("--ha-lease-duration"), "{e}");
    let mut c = cfg(&api, "x");
    c.retry_period = Duration::from_secs(2);
    assert!(c.validate().unwrap_err().contains("--ha-renew-deadline"));
}
