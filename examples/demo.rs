//! Starts a towerpc server and one client in this process, runs many concurrent callers over
//! the client's single connection for a few seconds, and prints what happened.
//!
//! ```text
//! cargo run --release --example demo -- [--callers 1000] [--secs 3] [--payload 16]
//! ```

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use towerpc::{BoxError, Client, Request, Response, Server};

/// The demo's small request/response struct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Echo {
    id: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

struct Args {
    callers: usize,
    secs: f64,
    payload: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        callers: 1000,
        secs: 3.0,
        payload: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        let bad = || -> ! {
            eprintln!("usage: demo [--callers N] [--secs S] [--payload BYTES]");
            std::process::exit(2)
        };
        match flag.as_str() {
            "--callers" => args.callers = value.parse().unwrap_or_else(|_| bad()),
            "--secs" => args.secs = value.parse().unwrap_or_else(|_| bad()),
            "--payload" => args.payload = value.parse().unwrap_or_else(|_| bad()),
            _ => bad(),
        }
    }
    args.callers = args.callers.max(1);
    args
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args();

    // The server echoes the raw body back: the client encodes and decodes the struct.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Server::builder();
    let server_stats = server.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let echo = tower::service_fn(|req: Request| async move {
        Ok::<_, BoxError>(Response::new(req.into_body()))
    });
    let server_task = tokio::spawn(server.serve_with_listener(listener, echo, async {
        let _ = stop_rx.await;
    }));

    let client = Client::builder().connect(addr).await?;
    println!(
        "demo: server on {addr}, {} callers sharing one connection, {} s, {}-byte payload",
        args.callers, args.secs, args.payload
    );

    let deadline = Instant::now() + Duration::from_secs_f64(args.secs);
    let cstats0 = client.stats();
    let sstats0 = server_stats.stats();
    let started = Instant::now();
    let mut workers = Vec::with_capacity(args.callers);
    for w in 0..args.callers {
        let client = client.clone();
        let payload = vec![w as u8; args.payload];
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let req = Echo {
                    id: (w as u64) << 32 | n,
                    payload: payload.clone(),
                };
                let t = Instant::now();
                match client.call::<Echo, Echo>("Echo", &req).await {
                    // A reply that is not our own request would be a mixed-up id.
                    Ok(resp) if resp == req => lat.push(t.elapsed().as_micros() as u32),
                    _ => errors += 1,
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cs = client.stats().since(&cstats0);
    let ss = server_stats.stats().since(&sstats0);
    drop(client);
    let _ = stop_tx.send(());
    server_task.await??;

    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0
    };
    let calls = lat.len() as u64;
    let per_call = |x: u64| x as f64 / calls.max(1) as f64;
    println!(
        "client: {} writes, {} reads, {} bytes out, {} bytes in",
        cs.write_calls, cs.read_calls, cs.bytes_written, cs.bytes_read
    );
    println!(
        "server: {} writes, {} reads, {} bytes out, {} bytes in, {} handler calls",
        ss.write_calls, ss.read_calls, ss.bytes_written, ss.bytes_read, ss.calls
    );
    println!(
        "errors: {errors}; {:.1} calls per client write, {:.1} per server write",
        calls as f64 / cs.write_calls.max(1) as f64,
        calls as f64 / ss.write_calls.max(1) as f64,
    );
    println!(
        "demo: {calls} calls in {elapsed:.1} s, {:.0} calls/s, p50 {:.2} ms, p99 {:.2} ms, \
         {:.4} write syscalls/call, {:.1} bytes/call",
        calls as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        per_call(cs.write_calls + ss.write_calls),
        per_call(cs.bytes_written + ss.bytes_written),
    );
    if errors > 0 {
        std::process::exit(1);
    }
    Ok(())
}
