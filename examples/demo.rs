//! Starts a towerpc server and one client in this process, runs many concurrent callers over
//! the client's single connection for a few seconds, and prints what happened.
//!
//! ```text
//! cargo run --release --example demo -- [--callers 1000] [--secs 3] [--payload 16]
//!     [--compression none|zstd|deflate|lz4] [--tls]
//! ```
//!
//! `--compression zstd` needs the `compression-zstd` feature, `deflate` needs
//! `compression-deflate`, and `--tls` needs `tls` (it makes a throwaway CA and a `localhost`
//! certificate with rcgen at start); `--all-features` has them all.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use towerpc::codec::Compression;
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
    compression: String,
    tls: bool,
}

const USAGE: &str = "usage: demo [--callers N] [--secs S] [--payload BYTES] \
                     [--compression none|zstd|deflate|lz4] [--tls]";

fn parse_args() -> Args {
    let mut args = Args {
        callers: 1000,
        secs: 3.0,
        payload: 16,
        compression: "none".to_string(),
        tls: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let bad = || -> ! {
            eprintln!("{USAGE}");
            std::process::exit(2)
        };
        if flag == "--tls" {
            args.tls = true;
            continue;
        }
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--callers" => args.callers = value.parse().unwrap_or_else(|_| bad()),
            "--secs" => args.secs = value.parse().unwrap_or_else(|_| bad()),
            "--payload" => args.payload = value.parse().unwrap_or_else(|_| bad()),
            "--compression" if ["none", "zstd", "deflate", "lz4"].contains(&value.as_str()) => {
                args.compression = value
            }
            _ => bad(),
        }
    }
    args.callers = args.callers.max(1);
    args
}

/// Prints why the demo cannot run as asked, and exits.
#[cfg(not(all(
    feature = "tls",
    feature = "compression-zstd",
    feature = "compression-deflate",
    feature = "compression-lz4"
)))]
fn missing_feature(flag: &str, feature: &str) -> ! {
    eprintln!(
        "demo: {flag} needs the `{feature}` feature, which this build lacks; run \
         `cargo run --release --features {feature} --example demo -- {flag}` (or --all-features)"
    );
    std::process::exit(2)
}

/// The algorithm named on the command line, if this build has it.
fn compression(name: &str) -> Option<Compression> {
    match name {
        #[cfg(feature = "compression-zstd")]
        "zstd" => Some(Compression::Zstd),
        #[cfg(not(feature = "compression-zstd"))]
        "zstd" => missing_feature("--compression zstd", "compression-zstd"),
        #[cfg(feature = "compression-deflate")]
        "deflate" => Some(Compression::Deflate),
        #[cfg(not(feature = "compression-deflate"))]
        "deflate" => missing_feature("--compression deflate", "compression-deflate"),
        #[cfg(feature = "compression-lz4")]
        "lz4" => Some(Compression::Lz4),
        #[cfg(not(feature = "compression-lz4"))]
        "lz4" => missing_feature("--compression lz4", "compression-lz4"),
        _ => None,
    }
}

/// A throwaway CA and a certificate for `localhost` it signed: the server's TLS config and a
/// client config that trusts the CA.
#[cfg(feature = "tls")]
fn tls_configs() -> Result<
    (
        std::sync::Arc<towerpc::transport::tls::rustls::ServerConfig>,
        std::sync::Arc<towerpc::transport::tls::rustls::ClientConfig>,
    ),
    BoxError,
> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use towerpc::transport::tls::config;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "towerpc demo CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let server_params = CertificateParams::new(vec!["localhost".to_string()])?;
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &ca, &ca_key)?;
    let server = config::server(
        server_cert.pem().as_bytes(),
        server_key.serialize_pem().as_bytes(),
    )?;
    let client = config::client(ca.pem().as_bytes())?;
    Ok((server, client))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args();
    let algo = compression(&args.compression);
    #[cfg(not(feature = "tls"))]
    if args.tls {
        missing_feature("--tls", "tls");
    }
    #[cfg(feature = "tls")]
    let tls = if args.tls { Some(tls_configs()?) } else { None };

    // The server echoes the raw body back: the client encodes and decodes the struct.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut server = Server::builder();
    if let Some(algo) = algo {
        server = server.accept_compression(algo);
    }
    #[cfg(feature = "tls")]
    if let Some((server_tls, _)) = &tls {
        server = server.tls(server_tls.clone());
    }
    let server_stats = server.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let echo = tower::service_fn(|req: Request| async move {
        Ok::<_, BoxError>(Response::new(req.into_body()))
    });
    let server_task = tokio::spawn(server.serve_with_incoming_shutdown(
        towerpc::server::TcpIncoming::from(listener),
        echo,
        async {
            let _ = stop_rx.await;
        },
    ));

    let mut builder = Client::builder();
    if let Some(algo) = algo {
        builder = builder.compression(algo);
    }
    #[cfg(feature = "tls")]
    let client = match &tls {
        Some((_, client_tls)) => {
            let connector = towerpc::transport::tls::TlsConnector::new(
                towerpc::transport::TcpConnector::new(),
                client_tls.clone(),
                "localhost",
            )?;
            builder.connect_with(addr, connector).await?
        }
        None => builder.connect(addr).await?,
    };
    #[cfg(not(feature = "tls"))]
    let client = builder.connect(addr).await?;
    println!(
        "demo: server on {addr}, {} callers sharing one connection, {} s, {}-byte payload, \
         compression {}, TLS {}",
        args.callers,
        args.secs,
        args.payload,
        algo.map_or_else(|| "none".to_string(), |a| a.to_string()),
        if args.tls { "on" } else { "off" },
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
                match client.invoke::<Echo, Echo>("Echo", &req).await {
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
