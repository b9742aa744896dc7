//! One client over many servers: three servers on loopback, one slow, one killed and
//! restarted, under a steady load through the balanced client and the retry policy.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use towerpc::balance::Balanced;
use towerpc::retry::Policy;
use towerpc::{Client, Request, Response, Server};

use support::{eventually, service, within, ServerProcess, Svc};

const BOUND: Duration = Duration::from_secs(20);

/// Echoes after `delay`, counting the calls it runs.
fn counted(runs: Arc<AtomicU64>, delay: Duration) -> Svc {
    service(move |req: Request| {
        let runs = runs.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            runs.fetch_add(1, Ordering::Relaxed);
            Ok(Response::new(req.into_body()))
        }
    })
}

fn client_builder() -> towerpc::client::Builder {
    Client::builder()
        .timeout(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(50), 1.0, Duration::from_millis(50))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_client_routes_around_slow_and_dead_servers() {
    let runs: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| support::free_addr()).collect();
    let delays = [
        Duration::from_millis(1),
        Duration::from_millis(25),
        Duration::from_millis(1),
    ];
    let mut procs = Vec::new();
    for i in 0..3 {
        let svc = counted(runs[i].clone(), delays[i]);
        procs.push(Some(
            ServerProcess::start(addrs[i], Server::builder(), svc).await,
        ));
    }

    let policy = Policy::new().idempotent("Echo");
    let balanced = Balanced::fixed(client_builder(), addrs.clone());
    let svc = ServiceBuilder::new()
        .retry(policy.clone())
        .service(balanced);

    // 32 callers, each calling in a loop until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (svc, stop, done, failed) = (svc.clone(), stop.clone(), done.clone(), failed.clone());
        callers.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = support::msgpack(&n);
                match svc
                    .clone()
                    .oneshot(Request::new("Echo", body.clone()))
                    .await
                {
                    Ok(resp) if resp.body() == &body => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("call failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let load = |i: usize| runs[i].load(Ordering::Relaxed);

    // All three take calls; the slow one fewer (counted over 6,000 calls, so that a moment
    // in which a loaded machine starves a fast server does not decide it).
    eventually("6,000 calls", BOUND, || {
        done.load(Ordering::Relaxed) >= 6_000
    })
    .await;
    let (fast, slow) = (load(0), load(1));
    println!(
        "before the kill: per server {}/{}/{}",
        load(0),
        load(1),
        load(2)
    );
    assert!(
        slow > 0 && slow * 2 < fast,
        "slow server got {slow}, fast {fast}"
    );

    // Kill the third server: calls carry on on the other two.
    let killed = procs[2].take().unwrap().kill();
    let at_kill = load(2);
    let before = done.load(Ordering::Relaxed);
    eventually("2,000 calls after the kill", BOUND, || {
        done.load(Ordering::Relaxed) >= before + 2_000
    })
    .await;
    assert_eq!(load(2), at_kill, "a dead server ran calls");
    println!("killed server had served {}", killed.calls);

    // Restart it: it rejoins and takes calls again.
    procs[2] = Some(
        ServerProcess::start(
            addrs[2],
            Server::builder(),
            counted(runs[2].clone(), delays[2]),
        )
        .await,
    );
    eventually("the restarted server takes calls", BOUND, || {
        load(2) >= at_kill + 200
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    within(BOUND, async {
        while let Some(r) = callers.join_next().await {
            r.unwrap();
        }
    })
    .await;
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "balance: {done} calls, per server {}/{}/{}, failed {failed}, retried {}",
        load(0),
        load(1),
        load(2),
        policy.retries()
    );
    // Calls in flight on the killed server were retried elsewhere (Echo is idempotent).
    assert_eq!(failed, 0);
}

/// Servers added and removed through the handle; a removed server gets no new calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_change_at_run_time() {
    let runs: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let a = support::serve(Server::builder(), counted(runs[0].clone(), Duration::ZERO)).await;
    let b = support::serve(Server::builder(), counted(runs[1].clone(), Duration::ZERO)).await;
    let (balanced, endpoints) = Balanced::dynamic(client_builder());
    endpoints.insert(a.addr);
    for i in 0..50u64 {
        let n: u64 = within(BOUND, balanced.invoke("Echo", &i)).await.unwrap();
        assert_eq!(n, i);
    }
    assert_eq!(runs[0].load(Ordering::Relaxed), 50);
    endpoints.insert(b.addr);
    eventually("the new server takes calls", BOUND, || {
        let balanced = balanced.clone();
        tokio::spawn(async move { balanced.invoke::<_, u64>("Echo", &1u64).await });
        runs[1].load(Ordering::Relaxed) > 0
    })
    .await;
    endpoints.remove(a.addr);
    // Let calls already routed to `a` finish, then check no new ones go there.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let at_remove = runs[0].load(Ordering::Relaxed);
    for i in 0..50u64 {
        let _: u64 = within(BOUND, balanced.invoke("Echo", &i)).await.unwrap();
    }
    assert_eq!(runs[0].load(Ordering::Relaxed), at_remove);
}

/// A DNS name (here `localhost`, re-resolved on an interval) as the set of servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_name_is_resolved_into_endpoints() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let name = format!("localhost:{}", server.addr.port());
    let balanced = Balanced::dns(client_builder(), name, Duration::from_millis(100));
    // `localhost` may also resolve to ::1, where nothing listens: that endpoint never becomes
    // ready, and the balancer uses the one that does.
    let n: u64 = within(BOUND, balanced.invoke("Echo", &7u64)).await.unwrap();
    assert_eq!(n, 7);
}
