//! X1 across processes (docs/reliability.md): 1,000 callers in this process call an echo server
//! in a child process, which is SIGKILLed and restarted while they run.
//!
//! ```text
//! cargo run --release --example churn --features compression-zstd -- [--calls 1000000] [--kills 5] [--callers 1000]
//! ```
//!
//! Every call carries its caller's id, a nonce and a payload of 0–512 KiB (mostly small; one in
//! 1,000 above 64 KiB, which travels in fragments), which
//! the server decodes and echoes. 10 % of calls are cancelled at a random point, 5 % carry a
//! 1–50 ms deadline, the rest use the default timeout; half the callers use a client that
//! offers zstd (with the `compression-zstd` feature). The server process is killed with
//! SIGKILL `--kills` times, spread over the run, and restarted on the same port after 0–200 ms.
//!
//! Passes (exit status 0) when no reply reached the wrong caller or came back altered, every
//! call ended as `Ok`, cancelled or a typed error, every call with a deadline ended within its
//! deadline plus 50 ms beyond how late plain sleeps in this process woke at worst, and both
//! clients' pending calls were gone within 1 s of the load stopping. The last line is a summary
//! scripts can read. `soak/RESULTS.md` records the long runs; CI runs 1 M calls with 5 kills.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use towerpc::payload::{from_msgpack, to_msgpack};
use towerpc::{BoxError, Client, Request, Response, Server};

/// What every call sends and the server echoes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Echo {
    caller: u32,
    nonce: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Args {
    calls: u64,
    kills: u32,
    callers: u32,
}

fn args() -> Args {
    let mut a = Args {
        calls: 1_000_000,
        kills: 5,
        callers: 1000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--calls" => a.calls = value.parse().expect("--calls N"),
            "--kills" => a.kills = value.parse().expect("--kills N"),
            "--callers" => a.callers = value.parse().expect("--callers N"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn main() -> Result<(), BoxError> {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        let addr: SocketAddr = std::env::args().nth(2).expect("serve ADDR").parse()?;
        return serve(addr);
    }
    let args = args();
    let rt = tokio::runtime::Runtime::new()?;
    let passed = rt.block_on(orchestrate(args))?;
    std::process::exit(if passed { 0 } else { 1 });
}

/// The child: an echo server that checks nothing and hides nothing.
fn serve(addr: SocketAddr) -> Result<(), BoxError> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let server = Server::builder();
        #[cfg(feature = "compression-zstd")]
        let server = server.accept_compression(towerpc::codec::Compression::Zstd);
        let echo = tower::service_fn(|req: Request| async move {
            let msg: Echo = from_msgpack(req.body())?;
            // A quarter of the calls wait 0–3 ms, one in a hundred 100 ms.
            let delay = match fastrand::u32(0..400) {
                0..=3 => Duration::from_millis(100),
                4..=99 => Duration::from_micros(fastrand::u64(0..3000)),
                _ => Duration::ZERO,
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, BoxError>(Response::new(to_msgpack(&msg)?))
        });
        server.serve(addr, echo).await?;
        Ok(())
    })
}

fn spawn_server(addr: SocketAddr) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["serve", &addr.to_string()])
        .kill_on_drop(true)
        .spawn()
}

async fn wait_listening(addr: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < until, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the callers saw.
#[derive(Debug, Default)]
struct Tally {
    calls: AtomicU64,
    ok: AtomicU64,
    wrong_caller: AtomicU64,
    altered: AtomicU64,
    cancelled: AtomicU64,
    timeouts: AtomicU64,
    unavailable: AtomicU64,
    lost: AtomicU64,
    stalled: AtomicU64,
    other: AtomicU64,
    /// How far past its deadline each call with a deadline ended, in microseconds.
    lateness: Mutex<Vec<u64>>,
    /// How late plain sleeps woke, in microseconds.
    sleep_lag: Mutex<Vec<u64>>,
    /// The longest call made with the client's default timeout, in microseconds.
    longest_default_us: AtomicU64,
}

fn payload_len() -> usize {
    if fastrand::u32(0..1000) == 0 {
        return fastrand::usize(64 * 1024..=512 * 1024);
    }
    match fastrand::u32(0..100) {
        0 => fastrand::usize(4096..=64 * 1024),
        1..=9 => fastrand::usize(256..4096),
        _ => fastrand::usize(0..256),
    }
}

async fn one_call(client: &Client, caller: u32, tally: &Tally) {
    let sent = Echo {
        caller,
        nonce: fastrand::u64(..),
        payload: vec![fastrand::u8(..); payload_len()],
    };
    let body = to_msgpack(&sent).expect("encodes");
    let kind = fastrand::u32(0..100);
    let started = Instant::now();
    let (result, deadline) = match kind {
        // Cancelled: dropped at a random point 0–5 ms in.
        0..=9 => {
            let call = client.request(Request::new("echo", body));
            let cut = Duration::from_micros(fastrand::u64(0..5000));
            match tokio::time::timeout(cut, call).await {
                Ok(res) => (res, None),
                Err(_) => {
                    tally.cancelled.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
        // A deadline of its own, 1–50 ms.
        10..=14 => {
            let d = Duration::from_millis(fastrand::u64(1..=50));
            let req = Request::new("echo", body).with_timeout(d);
            (client.request(req).await, Some(d))
        }
        _ => {
            let res = client.request(Request::new("echo", body)).await;
            let took = started.elapsed().as_micros() as u64;
            tally.longest_default_us.fetch_max(took, Relaxed);
            (res, None)
        }
    };
    match result {
        Ok(resp) => match from_msgpack::<Echo>(resp.body()) {
            Ok(got) if got == sent => {
                tally.ok.fetch_add(1, Relaxed);
            }
            Ok(got) if got.caller != sent.caller || got.nonce != sent.nonce => {
                tally.wrong_caller.fetch_add(1, Relaxed);
            }
            _ => {
                tally.altered.fetch_add(1, Relaxed);
            }
        },
        Err(e) => {
            let counter = if e.is_timeout() {
                if let Some(d) = deadline {
                    let late = started.elapsed().saturating_sub(d);
                    tally.lateness.lock().unwrap().push(late.as_micros() as u64);
                }
                &tally.timeouts
            } else if e.is_unavailable() || e.is_overloaded() {
                // The server is down: wait a little before the next call, as a real caller
                // would, instead of spinning through fail-fast errors.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(10..=50))).await;
                &tally.unavailable
            } else if e.is_stalled() {
                &tally.stalled
            } else if e.is_closed() || e.is_remote() || e.is_cancelled() {
                // The connection went down under the call (a kill), or the server's side
                // said so as it went.
                &tally.lost
            } else {
                // Encoding, decoding, protocol errors: none may happen here.
                &tally.other
            };
            counter.fetch_add(1, Relaxed);
        }
    }
}

fn percentile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q) as usize]
}

async fn orchestrate(args: Args) -> Result<bool, BoxError> {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let mut child = spawn_server(addr)?;
    wait_listening(addr).await;

    let plain = Client::builder().connect(addr).await?;
    let builder = Client::builder();
    #[cfg(feature = "compression-zstd")]
    let builder = builder.compression(towerpc::codec::Compression::Zstd);
    let zstd = builder.connect(addr).await?;

    let tally = Arc::new(Tally::default());
    let issued = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();

    // Plain sleeps alongside: how late this process's runtime wakes anything.
    let probes: Vec<_> = (0..30)
        .map(|_| {
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let d = Duration::from_millis(fastrand::u64(1..=50));
                    let t = Instant::now();
                    tokio::time::sleep(d).await;
                    let late = t.elapsed().saturating_sub(d).as_micros() as u64;
                    tally.sleep_lag.lock().unwrap().push(late);
                }
            })
        })
        .collect();

    let callers: Vec<_> = (0..args.callers)
        .map(|caller| {
            let client = if caller % 2 == 0 {
                plain.clone()
            } else {
                zstd.clone()
            };
            let (tally, issued, budget) = (tally.clone(), issued.clone(), args.calls);
            tokio::spawn(async move {
                while issued.fetch_add(1, Relaxed) < budget {
                    one_call(&client, caller, &tally).await;
                    tally.calls.fetch_add(1, Relaxed);
                }
            })
        })
        .collect();

    // The killer: SIGKILL when the calls cross each (k+1)/(kills+1) of the budget.
    let mut kills = Vec::new();
    for k in 0..args.kills {
        let at = args.calls * (k as u64 + 1) / (args.kills as u64 + 1);
        while tally.calls.load(Relaxed) < at {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        child.kill().await?; // SIGKILL, then reaped
        let killed = start.elapsed();
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=200))).await;
        child = spawn_server(addr)?;
        wait_listening(addr).await;
        kills.push((killed, start.elapsed() - killed));
    }

    for c in callers {
        c.await?;
    }
    let load = start.elapsed();
    stop.store(true, Relaxed);
    for p in probes {
        p.await?;
    }
    // Every pending call is answered or abandoned-and-answered within 1 s.
    let drained_by = Instant::now() + Duration::from_secs(1);
    while plain.pending() + zstd.pending() > 0 && Instant::now() < drained_by {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = plain.pending() + zstd.pending();
    child.kill().await?;

    let t = &tally;
    let mut late = t.lateness.lock().unwrap().clone();
    let mut lag = t.sleep_lag.lock().unwrap().clone();
    let (late_p99, late_max) = (percentile(&mut late, 0.99), percentile(&mut late, 1.0));
    let (lag_p99, lag_max) = (percentile(&mut lag, 0.99), percentile(&mut lag, 1.0));
    let calls = t.calls.load(Relaxed);
    for (i, (at, down)) in kills.iter().enumerate() {
        println!("churn: kill {} at {at:.2?}, back after {down:.2?}", i + 1);
    }
    println!(
        "churn: deadline calls {} late p99 {late_p99} us max {late_max} us; plain sleeps late p99 {lag_p99} us max {lag_max} us",
        late.len()
    );
    let ok_late = late_max <= lag_max + 50_000;
    // Calls with the default timeout (20 s) end by it too.
    let longest = t.longest_default_us.load(Relaxed);
    let ok_longest = longest <= 20_050_000;
    println!("churn: longest call with the default timeout {longest} us");
    let wrong = t.wrong_caller.load(Relaxed);
    let altered = t.altered.load(Relaxed);
    let other = t.other.load(Relaxed);
    let passed = wrong == 0 && altered == 0 && other == 0 && ok_late && ok_longest && left == 0;
    println!(
        "churn: SUMMARY calls {calls} ok {} cancelled {} timeout {} unavailable {} lost {} stalled {} other {other} wrong_caller {wrong} altered {altered} kills {} pending_after {left} secs {:.1} calls_per_s {:.0} {}",
        t.ok.load(Relaxed),
        t.cancelled.load(Relaxed),
        t.timeouts.load(Relaxed),
        t.unavailable.load(Relaxed),
        t.lost.load(Relaxed),
        t.stalled.load(Relaxed),
        kills.len(),
        load.as_secs_f64(),
        calls as f64 / load.as_secs_f64(),
        if passed { "PASS" } else { "FAIL" },
    );
    Ok(passed)
}
