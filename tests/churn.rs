//! X1, the headline churn test (CI variant; see docs/reliability.md, X1 and P17).
//!
//! 1,000 callers share one client (two with `compression-zstd`: half the callers use a second
//! client that offers zstd to a server that accepts it) and hammer an echo server on a fixed
//! 127.0.0.1 port. 10 % of calls are cancelled at a random point, 5 % carry a 1–50 ms
//! deadline, the rest use the default timeout. The server is killed five times at random
//! moments (its runtime is shut down with `shutdown_background`, which drops every task and
//! socket at once: the in-process analogue of SIGKILL) and restarted on the same port after
//! 0–200 ms.
//!
//! Pass: no reply ever reaches the wrong caller; no panic anywhere; every call ends as `Ok`
//! or a typed error; calls with a deadline end within deadline + 50 ms beyond the lateness of
//! the runtime itself (measured alongside), and within deadline + 250 ms in any case (see
//! [`DEADLINE_BOUND`]); the pending map drains within 1 s of the load stopping; the client's
//! counters agree with what callers saw.
//!
//! Set `CHURN_SEED` to replay the random choices (scheduling still differs between runs).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use towerpc::payload::{from_msgpack, to_msgpack};
use towerpc::{Client, Error, Request, Response, Server, Stats};

/// Callers, spread over the clients.
const CALLERS: u32 = 1000;
/// Calls in all; the load stops at this many or at [`TIME_LIMIT`], whichever comes first.
const CALL_BUDGET: u64 = 300_000;
const TIME_LIMIT: Duration = Duration::from_secs(20);
/// Server kills during the load.
const KILLS: usize = 5;
/// How late a call with a deadline may end beyond the lateness of the runtime itself: a call
/// ended by its deadline timer cannot return before the runtime polls its caller again.
const DEADLINE_SLACK: Duration = Duration::from_millis(50);
/// How late a call with a deadline may end, at most. docs/reliability.md (X1) asks for deadline + 50 ms,
/// but this test saturates both cores of a CI machine (1,000 closed-loop callers, the server,
/// debug builds), and under that load the runtime itself wakes plain `sleep`s up to ~85 ms
/// late (p50 ~6 ms, p99 ~40 ms; up to ~200 ms when the server runtime had two threads); the
/// deadline calls' lateness follows the same distribution, their worst cases at the same
/// instants as the sleeps'.
/// So: the absolute bound is deadline + 250 ms, and [`DEADLINE_SLACK`] is asserted relative
/// to the lateness of plain sleeps measured at the same moment (see `unexplained_lateness`).
const DEADLINE_BOUND: Duration = Duration::from_millis(250);
/// How close in time a plain sleep must end to a late call to explain its lateness.
const EXPLAIN_WINDOW_MS: u64 = 100;
/// Largest payload of most calls.
const MAX_PAYLOAD: usize = 4096;
/// Largest payload of the one call in 1,000 that is large enough to travel in fragments
/// (PROTOCOL.md §4.1), in both directions.
const MAX_BIG_PAYLOAD: usize = 512 * 1024;
/// The client's default call timeout (the library default); no call may take longer.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// The whole test is aborted after this long: a call that never ends, or a runtime blocked
/// for good, must fail the run rather than hang it. A healthy run takes ~20 s; the slowest
/// passing one, ~45 s (load, then every call ending by its default timeout, then the drain).
const WATCHDOG: Duration = Duration::from_secs(60);
/// Tasks measuring how late plain sleeps wake up under the same load.
const PROBES: u64 = 30;

/// What every call sends and the server echoes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Echo {
    caller: u32,
    nonce: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// The echo handler: decodes the request, waits 0–3 ms (a quarter of the calls not at all, 1 %
/// 100 ms), and sends the decoded request back re-encoded.
fn echo_handler() -> support::Svc {
    support::service(|req: Request| async move {
        let msg: Echo = from_msgpack(req.body())?;
        let delay = if fastrand::u32(0..100) == 0 {
            Duration::from_millis(100)
        } else {
            match fastrand::u64(0..4000) {
                us @ 1000..=3999 => Duration::from_micros(us - 1000),
                _ => Duration::ZERO,
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(Response::new(to_msgpack(&msg)?))
    })
}

fn server_config() -> Server {
    let server = Server::builder();
    #[cfg(feature = "compression-zstd")]
    let server = server.accept_compression(towerpc::codec::Compression::Zstd);
    server
}

/// How a call was made.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// `client.call` with the default timeout.
    Default = 0,
    /// `client.request` with `Request::timeout` of 1–50 ms.
    Deadline = 1,
    /// Cancelled at a random point 0–5 ms in; this column counts those that ended first.
    Cancel = 2,
}

/// What one caller (and then one client, and then everything) saw.
#[derive(Debug, Default)]
struct Tally {
    calls: u64,
    /// Replies that came back to the right caller with the right payload.
    ok: u64,
    /// Replies that echoed another caller's id or nonce: the headline failure.
    wrong_caller: u64,
    /// Right caller and nonce, wrong payload.
    corrupted: u64,
    /// An `Ok` reply whose body did not decode.
    garbled: u64,
    /// Calls dropped by the caller before they ended.
    cancelled: u64,
    /// Errors by kind, per [`Path`].
    errors: BTreeMap<&'static str, [u64; 3]>,
    /// Errors outside the expected kinds.
    unexpected: u64,
    samples: Vec<String>,
    /// How far past its deadline each call with a deadline ended, in microseconds, and when
    /// it ended (ms since the load started).
    lateness_us: Vec<(u64, u64)>,
    /// Longest call without a deadline.
    longest_default: Duration,
}

impl Tally {
    fn sample(&mut self, s: String) {
        if self.samples.len() < 10 {
            self.samples.push(s);
        }
    }

    fn merge(&mut self, other: Tally) {
        self.calls += other.calls;
        self.ok += other.ok;
        self.wrong_caller += other.wrong_caller;
        self.corrupted += other.corrupted;
        self.garbled += other.garbled;
        self.cancelled += other.cancelled;
        for (kind, n) in other.errors {
            let row = self.errors.entry(kind).or_default();
            for (a, b) in row.iter_mut().zip(n) {
                *a += b;
            }
        }
        self.unexpected += other.unexpected;
        for s in other.samples {
            self.sample(s);
        }
        self.lateness_us.extend(other.lateness_us);
        self.longest_default = self.longest_default.max(other.longest_default);
    }

    fn errors_total(&self) -> u64 {
        self.errors.values().flatten().sum()
    }

    /// Records how a call ended.
    fn record(&mut self, path: Path, sent: &Echo, res: towerpc::Result<Echo>) {
        match res {
            Ok(got) if got.caller != sent.caller || got.nonce != sent.nonce => {
                self.wrong_caller += 1;
                self.sample(format!(
                    "WRONG CALLER: caller {} nonce {:#x} got caller {} nonce {:#x} ({path:?})",
                    sent.caller, sent.nonce, got.caller, got.nonce
                ));
            }
            Ok(got) if got.payload != sent.payload => {
                self.corrupted += 1;
                self.sample(format!(
                    "CORRUPTED: caller {} nonce {:#x}: sent {} bytes, got {} ({path:?})",
                    sent.caller,
                    sent.nonce,
                    sent.payload.len(),
                    got.payload.len()
                ));
            }
            Ok(_) => self.ok += 1,
            Err(e) => {
                let (kind, expected) = classify(&e);
                self.errors.entry(kind).or_default()[path as usize] += 1;
                if !expected {
                    self.unexpected += 1;
                    self.sample(format!("unexpected error ({path:?}): {e:?}"));
                }
            }
        }
    }
}

/// The kind of an error, and whether churn explains it.
fn classify(e: &Error) -> (&'static str, bool) {
    if e.is_timeout() {
        if e.is_remote() {
            ("timeout (server DEADLINE_EXCEEDED)", true)
        } else {
            ("timeout", true)
        }
    } else if e.is_unavailable() {
        ("unavailable (fail fast)", true)
    } else if e.is_stalled() {
        ("stalled", true)
    } else if e.is_closed() {
        ("closed (connection lost)", true)
    } else if e.is_overloaded() {
        ("overloaded", true)
    } else if e.is_cancelled() {
        // Only an abandoned call gets CANCELLED back, and nobody waits for that reply.
        ("cancelled (remote)", false)
    } else if e.is_protocol() {
        ("protocol", false)
    } else if e.is_decode() {
        ("decode", false)
    } else if e.is_encode() {
        ("encode", false)
    } else if e.is_remote() {
        ("remote (other code)", false)
    } else {
        ("untyped", false)
    }
}

/// Shared between the callers and the killer.
struct Load {
    start: Instant,
    issued: AtomicU64,
    stopped: AtomicBool,
    /// The killer has made its kills: the budget may end the load. (Without this, a load
    /// faster than the kills' downtime and settling could end before the last kill.)
    killed: AtomicBool,
}

impl Load {
    /// Takes one call from the budget; false once the load is over.
    fn next(&self) -> bool {
        if self.stopped.load(Relaxed) {
            return false;
        }
        let spent = self.issued.fetch_add(1, Relaxed) >= CALL_BUDGET;
        if self.start.elapsed() >= TIME_LIMIT || (spent && self.killed.load(Relaxed)) {
            self.stopped.store(true, Relaxed);
            return false;
        }
        true
    }

    /// The share of the load done so far (by calls or by time, whichever is further).
    fn progress(&self) -> f64 {
        let by_calls = self.issued.load(Relaxed) as f64 / CALL_BUDGET as f64;
        let by_time = self.start.elapsed().as_secs_f64() / TIME_LIMIT.as_secs_f64();
        by_calls.max(by_time)
    }
}

/// Turns a raw reply into the echoed message; an `Ok` reply whose body does not decode is
/// `Err(reply)`.
fn decode_reply(res: towerpc::Result<Response>) -> Result<towerpc::Result<Echo>, Response> {
    match res {
        Ok(resp) => match from_msgpack::<Echo>(resp.body()) {
            Ok(echo) => Ok(Ok(echo)),
            Err(_) => Err(resp),
        },
        Err(e) => Ok(Err(e)),
    }
}

async fn caller(id: u32, client: Client, load: Arc<Load>, seed: u64) -> (u32, Tally) {
    let mut rng = fastrand::Rng::with_seed(seed ^ u64::from(id).wrapping_mul(0x9E37_79B9));
    let mut t = Tally::default();
    let mut payload = vec![0u8; MAX_BIG_PAYLOAD];
    while load.next() {
        t.calls += 1;
        let len = if rng.u32(0..1000) == 0 {
            rng.usize(64 * 1024..=MAX_BIG_PAYLOAD)
        } else {
            rng.usize(0..=MAX_PAYLOAD)
        };
        rng.fill(&mut payload[..len]);
        let msg = Echo {
            caller: id,
            nonce: rng.u64(..),
            payload: payload[..len].to_vec(),
        };
        let roll = rng.u32(0..100);
        let outage = if roll < 10 {
            // Cancel at a random point: before sending, queued, on the wire, in the handler,
            // while the reply is on its way back.
            let after = Duration::from_micros(rng.u64(0..5000));
            let ended = if rng.bool() {
                tokio::time::timeout(after, client.invoke::<Echo, Echo>("Echo", &msg))
                    .await
                    .ok()
            } else {
                let body = to_msgpack(&msg).expect("encode");
                let fut = client.request(Request::new("Echo", body));
                tokio::select! {
                    res = fut => match decode_reply(res) {
                        Ok(res) => Some(res),
                        Err(resp) => {
                            t.garbled += 1;
                            t.sample(format!("garbled reply body ({} bytes)", resp.body().len()));
                            continue;
                        }
                    },
                    () = tokio::time::sleep(after) => None,
                }
            };
            match ended {
                None => {
                    t.cancelled += 1;
                    false
                }
                Some(res) => {
                    let outage = res.as_ref().is_err_and(is_outage);
                    t.record(Path::Cancel, &msg, res);
                    outage
                }
            }
        } else if roll < 15 {
            let deadline = Duration::from_millis(rng.u64(1..=50));
            let body = to_msgpack(&msg).expect("encode");
            let begun = Instant::now();
            let res = client
                .request(Request::new("Echo", body).with_timeout(deadline))
                .await;
            let took = begun.elapsed();
            t.lateness_us.push((
                took.saturating_sub(deadline).as_micros() as u64,
                load.start.elapsed().as_millis() as u64,
            ));
            match decode_reply(res) {
                Ok(res) => {
                    let outage = res.as_ref().is_err_and(is_outage);
                    t.record(Path::Deadline, &msg, res);
                    outage
                }
                Err(resp) => {
                    t.garbled += 1;
                    t.sample(format!("garbled reply body ({} bytes)", resp.body().len()));
                    false
                }
            }
        } else {
            let begun = Instant::now();
            let res = client.invoke::<Echo, Echo>("Echo", &msg).await;
            t.longest_default = t.longest_default.max(begun.elapsed());
            let outage = res.as_ref().is_err_and(is_outage);
            t.record(Path::Default, &msg, res);
            outage
        };
        if outage {
            // While the server is down calls fail at once; a real caller would pause too,
            // rather than burn the whole budget on fail-fast errors.
            tokio::time::sleep(Duration::from_millis(rng.u64(5..=20))).await;
        }
    }
    (id, t)
}

fn is_outage(e: &Error) -> bool {
    e.is_unavailable() || e.is_closed() || e.is_stalled()
}

fn percentile(sorted: &[(u64, u64)], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].0
}

/// The calls with a deadline that ended more than [`DEADLINE_SLACK`] late and more than
/// [`DEADLINE_SLACK`] later than every plain sleep that ended within [`EXPLAIN_WINDOW_MS`] of
/// them: lateness the runtime's load does not explain. Returns (lateness us, at ms, worst
/// nearby sleep us).
fn unexplained_lateness(calls: &[(u64, u64)], sleeps: &[(u64, u64)]) -> Vec<(u64, u64, u64)> {
    let slack = DEADLINE_SLACK.as_micros() as u64;
    let mut by_time: Vec<(u64, u64)> = sleeps.iter().map(|&(us, at)| (at, us)).collect();
    by_time.sort_unstable();
    calls
        .iter()
        .filter(|c| c.0 > slack)
        .filter_map(|&(us, at)| {
            let from = by_time.partition_point(|s| s.0 + EXPLAIN_WINDOW_MS < at);
            let to = by_time.partition_point(|s| s.0 <= at + EXPLAIN_WINDOW_MS);
            let nearby = by_time[from..to].iter().map(|s| s.1).max().unwrap_or(0);
            (us > nearby + slack).then_some((us, at, nearby))
        })
        .collect()
}

struct Lateness {
    max: u64,
    over: usize,
}

/// Prints the distribution of `samples` (lateness in us, when in ms) and the worst five with
/// the time since the kill before each.
fn report_lateness(what: &str, samples: &mut [(u64, u64)], kills: &[Duration]) -> Lateness {
    samples.sort_unstable();
    let slack = DEADLINE_SLACK.as_micros() as u64;
    let over = samples.iter().filter(|s| s.0 > slack).count();
    let max = samples.last().map_or(0, |s| s.0);
    println!(
        "churn: {what} ({}): lateness p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {max} \
         us; {over} over {DEADLINE_SLACK:?}",
        samples.len(),
        percentile(samples, 0.5),
        percentile(samples, 0.9),
        percentile(samples, 0.99),
        percentile(samples, 0.999),
    );
    let worst: Vec<String> = samples
        .iter()
        .rev()
        .take(5)
        .map(|&(us, at_ms)| {
            let at = Duration::from_millis(at_ms);
            match kills.iter().rev().find(|&&k| k <= at) {
                Some(k) => format!("{us} us at {at:?} ({:?} after a kill)", at - *k),
                None => format!("{us} us at {at:?} (before the first kill)"),
            }
        })
        .collect();
    println!("churn:   worst: {}", worst.join(", "));
    Lateness { max, over }
}

/// Aborts the process if the test is still running after `limit`, from a plain thread that
/// does not depend on the (possibly blocked) runtime.
fn watchdog(limit: Duration) {
    std::thread::Builder::new()
        .name("churn-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!("churn: WATCHDOG: still running after {limit:?}; something hung. Aborting.");
            std::process::abort();
        })
        .expect("watchdog thread");
}

/// Counts panics on every thread (callers, client tasks, the server runtime, handlers).
fn count_panics() -> Arc<AtomicUsize> {
    let panics = Arc::new(AtomicUsize::new(0));
    let counter = panics.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counter.fetch_add(1, Relaxed);
        previous(info);
    }));
    panics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_never_delivers_a_reply_to_the_wrong_caller() {
    let panics = count_panics();
    watchdog(WATCHDOG);
    let seed = std::env::var("CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("churn: seed {seed} (CHURN_SEED={seed} to replay the random choices)");
    let mut rng = fastrand::Rng::with_seed(seed);

    // A fixed port: learn a free one, then keep binding it.
    let addr = support::free_addr();
    let mut server =
        Some(support::ServerProcess::start(addr, server_config(), echo_handler()).await);
    let mut server_stats: Vec<Stats> = Vec::new();

    let builder = || {
        Client::builder()
            .reconnect_backoff(Duration::from_millis(20), 1.6, Duration::from_millis(200))
            .connect_timeout(Duration::from_secs(1))
    };
    #[allow(unused_mut)]
    let mut clients = vec![("plain", builder().connect(addr).await.expect("connect"))];
    #[cfg(feature = "compression-zstd")]
    clients.push((
        "zstd",
        builder()
            .compression(towerpc::codec::Compression::Zstd)
            .connect(addr)
            .await
            .expect("connect (zstd)"),
    ));

    let load = Arc::new(Load {
        start: Instant::now(),
        issued: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        killed: AtomicBool::new(false),
    });
    let mut callers = JoinSet::new();
    for id in 0..CALLERS {
        let (_, client) = &clients[id as usize % clients.len()];
        callers.spawn(caller(id, client.clone(), load.clone(), seed));
    }

    // A probe of the runtime's own lateness under this load: plain sleeps of 1–50 ms on the
    // callers' runtime, to tell the library's lateness from the scheduler's.
    let probes: Vec<_> = (0..PROBES)
        .map(|i| {
            let load = load.clone();
            let mut rng = fastrand::Rng::with_seed(seed.rotate_left(17) ^ i);
            tokio::spawn(async move {
                let mut lag_us = Vec::new();
                while !load.stopped.load(Relaxed) {
                    let d = Duration::from_millis(rng.u64(1..=50));
                    let begun = Instant::now();
                    tokio::time::sleep(d).await;
                    lag_us.push((
                        begun.elapsed().saturating_sub(d).as_micros() as u64,
                        load.start.elapsed().as_millis() as u64,
                    ));
                }
                lag_us
            })
        })
        .collect();

    // The killer: five kills at random points of the load, each followed by a restart on
    // the same port 0–200 ms later.
    let mut points: Vec<f64> = (0..KILLS).map(|_| 0.05 + 0.8 * rng.f64()).collect();
    points.sort_by(f64::total_cmp);
    let mut kills = Vec::new();
    for point in points {
        while load.progress() < point {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let in_flight: usize = clients.iter().map(|(_, c)| c.pending()).sum();
        let at = load.start.elapsed();
        let during_load = !load.stopped.load(Relaxed);
        server_stats.push(server.take().expect("server running").kill());
        let down = Duration::from_millis(rng.u64(0..=200));
        tokio::time::sleep(down).await;
        server = Some(support::ServerProcess::start(addr, server_config(), echo_handler()).await);
        kills.push((at, in_flight, down, during_load));
        // Let the clients reconnect and load the new server before the next kill.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    load.killed.store(true, Relaxed);

    // Callers stop taking calls at the budget or the time limit; the calls they have in
    // flight end within the default timeout at the latest.
    let mut per_client: Vec<Tally> = clients.iter().map(|_| Tally::default()).collect();
    let n_clients = per_client.len();
    let mut caller_panics = 0;
    let joined = tokio::time::timeout(DEFAULT_TIMEOUT + Duration::from_secs(2), async {
        while let Some(res) = callers.join_next().await {
            match res {
                Ok((id, tally)) => per_client[id as usize % n_clients].merge(tally),
                Err(e) => {
                    caller_panics += 1;
                    eprintln!("caller task failed: {e}");
                }
            }
        }
    })
    .await;
    let load_time = load.start.elapsed();
    assert!(
        joined.is_ok(),
        "{} callers still had a call running {:?} after the load stopped",
        callers.len(),
        DEFAULT_TIMEOUT + Duration::from_secs(2)
    );

    // The pending maps drain: abandoned ids are released by the server's (late) replies.
    let drain_start = Instant::now();
    for (name, client) in &clients {
        support::eventually(
            &format!("{name} client's pending calls to drain"),
            Duration::from_secs(1).saturating_sub(drain_start.elapsed()),
            || client.pending() == 0,
        )
        .await;
    }
    let drained_in = drain_start.elapsed();
    let mut probe_lag = Vec::new();
    for probe in probes {
        probe_lag.extend(probe.await.expect("probe task"));
    }

    let last = server.take().expect("server running").kill();
    server_stats.push(last);

    // Report.
    let mut total = Tally::default();
    for (i, tally) in per_client.into_iter().enumerate() {
        let (name, client) = &clients[i];
        let stats = client.stats();
        let lib_ok = tally.ok + tally.wrong_caller + tally.corrupted + tally.garbled;
        println!(
            "churn: {name} client: {} calls, {} ok, {} cancelled, {} errors; stats: calls {} \
             errors {} timeouts {} dials {} dial_errors {} protocol_errors {} bytes_written {} \
             bytes_read {}",
            tally.calls,
            tally.ok,
            tally.cancelled,
            tally.errors_total(),
            stats.calls,
            stats.errors,
            stats.timeouts,
            stats.dials,
            stats.dial_errors,
            stats.protocol_errors,
            stats.bytes_written,
            stats.bytes_read
        );
        // The client counts a call when it ends through its reply slot (not the fail-fast
        // refusals, not the dropped ones): every Ok the callers saw is among them.
        assert!(
            stats.calls >= lib_ok,
            "{name} client counted {} calls but callers saw {lib_ok} Ok replies",
            stats.calls
        );
        assert_eq!(
            stats.calls - stats.errors,
            lib_ok,
            "{name} client: counted calls minus errors differ from the Ok replies callers saw"
        );
        assert_eq!(
            stats.protocol_errors, 0,
            "{name} client saw protocol errors"
        );
        total.merge(tally);
    }
    let served: u64 = server_stats.iter().map(|s| s.calls).sum();
    let server_panics: u64 = server_stats.iter().map(|s| s.panics).sum();
    let accepts: u64 = server_stats.iter().map(|s| s.accepts).sum();

    println!("churn: errors by kind     default  deadline  cancel(ended first)");
    for (kind, n) in &total.errors {
        println!("churn:   {kind:<36} {:>8} {:>9} {:>8}", n[0], n[1], n[2]);
    }
    for (i, (at, in_flight, down, during_load)) in kills.iter().enumerate() {
        println!(
            "churn: kill {} at {at:.2?} with {in_flight} calls in flight, down {down:?}{}",
            i + 1,
            if *during_load {
                ""
            } else {
                " (after the load)"
            }
        );
    }
    let kill_times: Vec<Duration> = kills.iter().map(|k| k.0).collect();
    let mut lateness = std::mem::take(&mut total.lateness_us);
    let unexplained = unexplained_lateness(&lateness, &probe_lag);
    let late = report_lateness("calls with a deadline", &mut lateness, &kill_times);
    println!(
        "churn:   {} calls more than {DEADLINE_SLACK:?} late, {} of them more than \
         {DEADLINE_SLACK:?} later than the plain sleeps ending within {EXPLAIN_WINDOW_MS} ms",
        late.over,
        unexplained.len()
    );
    let lag = report_lateness("plain 1-50 ms sleeps", &mut probe_lag, &kill_times);
    println!(
        "churn: longest call without deadline {:?}",
        total.longest_default
    );
    for s in &total.samples {
        println!("churn: sample: {s}");
    }
    let errors_by = |pred: fn(&str) -> bool| -> u64 {
        total
            .errors
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(_, n)| n.iter().sum::<u64>())
            .sum()
    };
    println!(
        "churn: SUMMARY calls {} ok {} cancelled {} timeout {} unavailable {} closed {} \
         stalled {} overloaded {} unexpected {} wrong_caller {} corrupted {} garbled {} \
         panics {} kills {} server_calls {} accepts {} wall {:.2?} (load {:.2?}, drained in \
         {:.0?}) clients {}",
        total.calls,
        total.ok,
        total.cancelled,
        errors_by(|k| k.starts_with("timeout")),
        errors_by(|k| k.starts_with("unavailable")),
        errors_by(|k| k.starts_with("closed")),
        errors_by(|k| k == "stalled"),
        errors_by(|k| k == "overloaded"),
        total.unexpected,
        total.wrong_caller,
        total.corrupted,
        total.garbled,
        panics.load(Relaxed),
        kills.len(),
        served,
        accepts,
        load.start.elapsed(),
        load_time,
        drained_in,
        clients.len()
    );

    // The headline.
    assert_eq!(total.wrong_caller, 0, "replies reached the wrong caller");
    assert_eq!(total.corrupted, 0, "replies came back with another payload");
    assert_eq!(total.garbled, 0, "Ok replies that did not decode");
    assert_eq!(panics.load(Relaxed), 0, "something panicked");
    assert_eq!(caller_panics, 0, "caller tasks failed");
    assert_eq!(server_panics, 0, "handlers panicked");
    assert_eq!(total.unexpected, 0, "calls ended with unexpected errors");
    assert_eq!(
        total.ok + total.cancelled + total.errors_total(),
        total.calls,
        "every call ends as Ok, cancelled by its caller, or a typed error"
    );
    assert_eq!(kills.len(), KILLS);
    assert!(
        kills.iter().all(|k| k.3),
        "every kill should hit the load: {kills:?}"
    );
    assert!(total.ok > 0, "no call succeeded");
    assert!(
        late.max <= DEADLINE_BOUND.as_micros() as u64,
        "a call with a deadline ended {} us late, more than {DEADLINE_BOUND:?} (plain sleeps: \
         max {} us late)",
        late.max,
        lag.max
    );
    assert!(
        unexplained.is_empty(),
        "{} calls with a deadline ended more than {DEADLINE_SLACK:?} later than plain sleeps \
         ending around the same time (lateness us, at ms, worst nearby sleep us): {:?}",
        unexplained.len(),
        &unexplained[..unexplained.len().min(10)]
    );
    assert!(total.longest_default <= DEFAULT_TIMEOUT + DEADLINE_SLACK);
}
