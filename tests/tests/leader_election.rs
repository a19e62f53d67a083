//! Leader election on a Lease, against the fake API server through the real kube client.

// Test helpers panic on failure just as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use hearth_runtime::leader::{LeaderElection, Leadership, LeaseTiming};
use hearth_tests::FakeApiServer;
use hearth_tests::stall::StallingProxy;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const TIMING: LeaseTiming = LeaseTiming {
    lease_duration: Duration::from_secs(2),
    renew_deadline: Duration::from_millis(1500),
    retry_period: Duration::from_millis(100),
};

async fn setup() -> (FakeApiServer, Client) {
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(json!({"metadata": {"name": "hearth-system"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    (server, client)
}

fn candidate(
    client: &Client,
    holder: &str,
) -> (Leadership, CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let (leadership, task) =
        LeaderElection::new(client.clone(), "hearth-system", "db-provisioner", holder)
            .with_timing(TIMING)
            .spawn(shutdown.clone());
    (leadership, shutdown, task)
}

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "hearth-system");
    leases
        .get("db-provisioner")
        .await
        .unwrap()
        .spec
        .and_then(|spec| spec.holder_identity)
}

#[tokio::test]
async fn exactly_one_of_two_replicas_leads_and_the_other_takes_over_on_release() {
    let (_server, client) = setup().await;
    let (mut first, first_stop, first_task) = candidate(&client, "pod-a");
    tokio::time::timeout(Duration::from_secs(5), first.acquired())
        .await
        .unwrap();
    let (second, second_stop, second_task) = candidate(&client, "pod-b");

    // Renewals are no news: nobody watching leadership is woken by them.
    let mut watching = first.clone();
    let woken = tokio::time::timeout(Duration::from_millis(600), watching.changed()).await;
    assert!(woken.is_err(), "woken by a renewal: {woken:?}");

    // Over many rounds the second never leads while the first renews.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(first.is_leader());
        assert!(!second.is_leader());
    }
    assert_eq!(holder(&client).await.as_deref(), Some("pod-a"));

    // Shutdown releases the Lease: the second leads long before the lease would expire.
    first_stop.cancel();
    first_task.await.unwrap();
    assert!(!first.is_leader());
    let mut second_watch = second.clone();
    tokio::time::timeout(Duration::from_millis(1500), second_watch.acquired())
        .await
        .expect("the released lease was taken over at once");
    assert_eq!(holder(&client).await.as_deref(), Some("pod-b"));

    second_stop.cancel();
    second_task.await.unwrap();
    assert_eq!(holder(&client).await, None, "released on shutdown");
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_stops_leading_at_once() {
    let (_server, client) = setup().await;
    let (mut leader, stop, task) = candidate(&client, "pod-a");
    tokio::time::timeout(Duration::from_secs(5), leader.acquired())
        .await
        .unwrap();

    // Someone else writes the Lease (e.g. after a network partition healed).
    let leases: Api<Lease> = Api::namespaced(client.clone(), "hearth-system");
    let stolen =
        json!({"spec": {"holderIdentity": "pod-z", "renewTime": "2026-11-25T00:00:00.000000Z"}});
    leases
        .patch(
            "db-provisioner",
            &PatchParams::default(),
            &Patch::Merge(&stolen),
        )
        .await
        .unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(1), leader.changed())
        .await
        .unwrap();
    assert_eq!(lost, Some(false));
    assert!(!leader.is_leader());

    // pod-z never renews, so after a lease duration pod-a takes the Lease back.
    tokio::time::timeout(Duration::from_secs(5), leader.acquired())
        .await
        .unwrap();
    let lease = leases.get("db-provisioner").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(lease.lease_transitions, Some(1));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_stops_leading_after_the_renew_deadline() {
    let (server, client) = setup().await;
    let (mut leader, stop, task) = candidate(&client, "pod-a");
    tokio::time::timeout(Duration::from_secs(5), leader.acquired())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    drop(server);
    let lost = tokio::time::timeout(Duration::from_secs(5), leader.changed())
        .await
        .unwrap();
    assert_eq!(lost, Some(false));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= TIMING.renew_deadline - TIMING.retry_period && elapsed < TIMING.lease_duration,
        "lost after {elapsed:?}"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_leader_whose_requests_hang_stops_leading_by_the_renew_deadline_and_recovers() {
    let (server, _) = setup().await;
    let proxy = StallingProxy::start(server.addr()).await.unwrap();
    let client = server.client_at(&proxy.url()).unwrap();
    let (mut leader, stop, task) = candidate(&client, "pod-a");
    tokio::time::timeout(Duration::from_secs(5), leader.acquired())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    proxy.stall();
    let lost = tokio::time::timeout(Duration::from_secs(5), leader.changed())
        .await
        .expect("a leader with a hung request must give up leading");
    assert_eq!(lost, Some(false));
    let elapsed = started.elapsed();
    assert!(
        elapsed <= TIMING.renew_deadline + TIMING.retry_period,
        "lost after {elapsed:?}"
    );

    // Once the API answers again it leads again: losing by a timeout is not for good.
    proxy.resume();
    tokio::time::timeout(Duration::from_secs(5), leader.acquired())
        .await
        .expect("leads again once the API answers");

    // Shutdown is not held up by a request that will never be answered: the release of the
    // Lease it holds is given 3 s.
    proxy.stall();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(4), task)
        .await
        .expect("the election ends at shutdown")
        .unwrap();
}
