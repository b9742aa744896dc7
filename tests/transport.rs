//! One call suite run over every transport the crate offers (TCP, a unix socket, an in-memory
//! duplex pipe, TLS, TCP with zstd, deflate and lz4, TLS with zstd), plus compression
//! negotiation, the wire savings of compression and reconnecting with compression on. TLS
//! failures (bad certificates, mTLS, handshake timeouts) have their own suite in tests/tls.rs.

mod support;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
#[cfg(any(
    feature = "compression-zstd",
    feature = "compression-deflate",
    feature = "compression-lz4"
))]
use towerpc::codec::Compression;
use towerpc::{BoxError, Client, Code, Request, Response, Server, Status};

/// A small struct with named fields, as `Client::call` encodes it (msgpack, named).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    seq: u64,
    name: String,
    tags: Vec<String>,
    score: f64,
    active: bool,
}

impl Item {
    fn sample(seq: u64) -> Item {
        Item {
            seq,
            name: "towerpc-transport-suite".to_string(),
            tags: vec!["alpha".into(), "beta".into(), "gamma".into()],
            score: 0.75,
            active: true,
        }
    }
}

/// What the one-way handler saw.
type Notes = Arc<Mutex<Vec<u64>>>;

/// The suite's service: `Echo` returns the body, `Shuffle` sleeps a time derived from its
/// number (so replies leave out of order) and returns it, `Note` records a one-way message,
/// `Fail` answers NOT_FOUND with a message.
fn suite_service(notes: Notes) -> support::Svc {
    support::service(move |req: Request| {
        let notes = notes.clone();
        async move {
            match req.method() {
                "Echo" => Ok(Response::new(req.into_body())),
                "Shuffle" => {
                    let n: u64 = rmp_serde::from_slice(req.body())?;
                    let ms = n.wrapping_mul(7919) % 25;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(Response::new(support::msgpack(&n)))
                }
                "Note" => {
                    let n: u64 = rmp_serde::from_slice(req.body())?;
                    notes.lock().unwrap().push(n);
                    Ok(Response::new(Bytes::new()))
                }
                "Fail" => Err(Box::new(Status::new(Code::NotFound, "no such widget")) as BoxError),
                other => Err(format!("unknown method {other}").into()),
            }
        }
    })
}

/// A 1 MiB body with a short period: any compressor shrinks it to a few KiB.
fn big_body() -> Bytes {
    (0..1usize << 20)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// The shared suite, run over a connected client. `compressed` says whether the connection is
/// expected to be compressed: checked on the bytes the 1 MiB call puts on the wire.
async fn call_suite(label: &str, client: &Client, notes: &Notes, compressed: bool) {
    // A single call.
    let item = Item::sample(1);
    let back: Item = client
        .invoke("Echo", &item)
        .await
        .unwrap_or_else(|e| panic!("{label}: single call failed: {e}"));
    assert_eq!(back, item, "{label}: single call");

    // 500 concurrent calls whose replies come back out of order.
    let done = Arc::new(Mutex::new(Vec::with_capacity(500)));
    let mut calls = JoinSet::new();
    for n in 0..500u64 {
        let client = client.clone();
        let done = done.clone();
        let label = label.to_string();
        calls.spawn(async move {
            let got: u64 = client
                .invoke("Shuffle", &n)
                .await
                .unwrap_or_else(|e| panic!("{label}: call {n} failed: {e}"));
            assert_eq!(got, n, "{label}: call {n} got another call's reply");
            done.lock().unwrap().push(n);
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(res) = calls.join_next().await {
            res.unwrap();
        }
    })
    .await;
    assert!(all.is_ok(), "{label}: 500 calls did not finish in 30 s");
    let done = done.lock().unwrap().clone();
    assert_eq!(done.len(), 500, "{label}");
    let in_order: Vec<u64> = (0..500).collect();
    assert_ne!(
        done, in_order,
        "{label}: replies did not come back out of order"
    );

    // A 1 MiB body, both ways.
    let body = big_body();
    let before = client.stats();
    let resp = client
        .request(Request::new("Echo", body.clone()))
        .await
        .unwrap_or_else(|e| panic!("{label}: 1 MiB call failed: {e}"));
    assert_eq!(resp.body().len(), body.len(), "{label}: 1 MiB reply length");
    assert!(resp.body() == &body, "{label}: 1 MiB reply differs");
    let delta = client.stats().since(&before);
    println!(
        "{label}: the 1 MiB call wrote {} bytes and read {} bytes",
        delta.bytes_written, delta.bytes_read
    );
    if compressed {
        assert!(
            delta.bytes_written < 256 << 10 && delta.bytes_read < 256 << 10,
            "{label}: expected a compressed connection, the 1 MiB call moved {} / {} bytes",
            delta.bytes_written,
            delta.bytes_read
        );
    } else {
        assert!(
            delta.bytes_written >= 1 << 20 && delta.bytes_read >= 1 << 20,
            "{label}: expected an uncompressed connection, the 1 MiB call moved {} / {} bytes",
            delta.bytes_written,
            delta.bytes_read
        );
    }

    // A one-way message reaches the handler.
    client
        .send("Note", &4242u64)
        .unwrap_or_else(|e| panic!("{label}: one-way send failed: {e}"));
    support::eventually(
        &format!("{label}: the one-way message to reach its handler"),
        Duration::from_secs(5),
        || notes.lock().unwrap().contains(&4242),
    )
    .await;

    // A handler error arrives with its code and message.
    let err = client
        .invoke::<_, u64>("Fail", &0u64)
        .await
        .expect_err("Fail succeeded");
    assert!(err.is_remote(), "{label}: {err:?}");
    assert_eq!(err.code(), Some(Code::NotFound), "{label}: {err:?}");
    assert_eq!(
        err.status().map(|s| s.message()),
        Some("no such widget"),
        "{label}"
    );

    assert_eq!(client.pending(), 0, "{label}: calls left pending");
    assert!(client.is_connected(), "{label}: connection lost");
}

/// Starts a TCP server for the suite; `accept` lists the algorithms it accepts, preferred first.
async fn suite_server(server: Server) -> (support::TestServer, Notes) {
    let notes = Notes::default();
    let server = support::serve(server, suite_service(notes.clone())).await;
    (server, notes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_plain_tcp() {
    let (server, notes) = suite_server(Server::builder()).await;
    let client = Client::builder().connect(server.addr).await.unwrap();
    call_suite("tcp", &client, &notes, false).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_through_a_proxy_that_splits_every_write() {
    // 13-byte pieces: frame headers and prefaces arrive split at every possible boundary.
    use support::proxy::{Faults, Proxy};
    let (server, notes) = suite_server(Server::builder()).await;
    let split = Faults {
        chunk: Some(13),
        ..Faults::default()
    };
    let proxy = Proxy::start(server.addr, split.clone(), split, 0).await;
    let client = Client::builder().connect(proxy.addr).await.unwrap();
    call_suite("split", &client, &notes, false).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

#[cfg(all(unix, feature = "unix"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_a_unix_socket() {
    use tokio_stream::wrappers::UnixListenerStream;
    use towerpc::transport::UnixConnector;

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir =
        std::env::temp_dir().join(format!("towerpc-transport-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rpc.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();

    let notes = Notes::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(Server::builder().serve_with_incoming_shutdown(
        UnixListenerStream::new(listener),
        suite_service(notes.clone()),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let client = Client::builder()
        .connect_with(path.clone(), UnixConnector)
        .await
        .unwrap();
    call_suite("unix", &client, &notes, false).await;
    drop(client);

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), serve)
        .await
        .expect("unix server did not shut down in 5 s")
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_an_in_memory_duplex_stream() {
    use tokio::io::DuplexStream;
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use tokio_stream::StreamExt;

    // Every dial makes a new pipe: the client keeps one end, the server's incoming stream
    // yields the other.
    let (conn_tx, conn_rx) = tokio::sync::mpsc::unbounded_channel::<DuplexStream>();
    let incoming = UnboundedReceiverStream::new(conn_rx).map(Ok::<_, io::Error>);
    let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let connector = {
        let dials = dials.clone();
        tower::service_fn(move |()| {
            let conn_tx = conn_tx.clone();
            let dials = dials.clone();
            async move {
                dials.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (client_end, server_end) = tokio::io::duplex(64 << 10);
                conn_tx
                    .send(server_end)
                    .map_err(|_| io::Error::other("the in-memory server is gone"))?;
                Ok::<_, io::Error>(client_end)
            }
        })
    };

    let notes = Notes::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder();
    let stats = server.clone();
    let serve = tokio::spawn(server.serve_with_incoming_shutdown(
        incoming,
        suite_service(notes.clone()),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let client = Client::builder().connect_with((), connector).await.unwrap();
    call_suite("duplex", &client, &notes, false).await;
    assert_eq!(dials.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(stats.stats().accepts, 1);
    drop(client);

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), serve)
        .await
        .expect("duplex server did not shut down in 5 s")
        .unwrap()
        .unwrap();
}

/// The call suite over TCP with `compression` negotiated.
#[cfg(any(
    feature = "compression-zstd",
    feature = "compression-deflate",
    feature = "compression-lz4"
))]
async fn suite_over_tcp_with(compression: Compression) {
    let (server, notes) = suite_server(Server::builder().accept_compression(compression)).await;
    let client = Client::builder()
        .compression(compression)
        .connect(server.addr)
        .await
        .unwrap();
    call_suite(&format!("tcp+{compression}"), &client, &notes, true).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

#[cfg(feature = "compression-zstd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_tcp_with_zstd() {
    suite_over_tcp_with(Compression::Zstd).await;
}

#[cfg(feature = "compression-deflate")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_tcp_with_deflate() {
    suite_over_tcp_with(Compression::Deflate).await;
}

#[cfg(feature = "compression-lz4")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_tcp_with_lz4() {
    suite_over_tcp_with(Compression::Lz4).await;
}

/// A CA, a `localhost` server certificate it signed, and the server and client TLS configs.
#[cfg(feature = "tls")]
fn tls_configs() -> (
    Arc<towerpc::transport::tls::rustls::ServerConfig>,
    Arc<towerpc::transport::tls::rustls::ClientConfig>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    use towerpc::transport::tls::config;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let server =
        config::server(leaf.pem().as_bytes(), leaf_key.serialize_pem().as_bytes()).unwrap();
    let client = config::client(ca.pem().as_bytes()).unwrap();
    (server, client)
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_tls() {
    use towerpc::transport::{tls::TlsConnector, TcpConnector};
    let (server_tls, client_tls) = tls_configs();
    let (server, notes) = suite_server(Server::builder().tls(server_tls)).await;
    let connector = TlsConnector::new(TcpConnector::new(), client_tls, "localhost").unwrap();
    let client = Client::builder()
        .connect_with(server.addr, connector)
        .await
        .unwrap();
    call_suite("tls", &client, &notes, false).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

#[cfg(all(feature = "tls", feature = "compression-zstd"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_over_tls_with_zstd() {
    use towerpc::transport::{tls::TlsConnector, TcpConnector};
    let (server_tls, client_tls) = tls_configs();
    let (server, notes) = suite_server(
        Server::builder()
            .tls(server_tls)
            .accept_compression(Compression::Zstd),
    )
    .await;
    let connector = TlsConnector::new(TcpConnector::new(), client_tls, "localhost").unwrap();
    let client = Client::builder()
        .compression(Compression::Zstd)
        .connect_with(server.addr, connector)
        .await
        .unwrap();
    call_suite("tls+zstd", &client, &notes, true).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

#[cfg(all(feature = "compression-zstd", feature = "compression-deflate"))]
/// Dials `addr` as a raw client offering `offer` (the preface bitmask) and returns the
/// compression byte of the server's preface.
async fn server_choice(addr: std::net::SocketAddr, offer: u8) -> u8 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use towerpc::codec::PREFACE_LEN;

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut preface = support::client_preface(1 << 20);
    preface[6] = offer;
    stream.write_all(&preface).await.unwrap();
    let mut theirs = [0u8; PREFACE_LEN];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut theirs))
        .await
        .expect("no server preface within 5 s")
        .expect("read the server preface");
    assert_eq!(&theirs[..6], b"TRPC\x01S", "server preface");
    theirs[6]
}

#[cfg(all(feature = "compression-zstd", feature = "compression-deflate"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_the_server_does_not_accept_falls_back_to_uncompressed() {
    let (server, notes) =
        suite_server(Server::builder().accept_compression(Compression::Deflate)).await;
    // The server answers a zstd-only offer with "none".
    assert_eq!(server_choice(server.addr, 0x01).await, 0);
    // A real client offering zstd still works, uncompressed.
    let client = Client::builder()
        .compression(Compression::Zstd)
        .connect(server.addr)
        .await
        .unwrap();
    call_suite("zstd offered, deflate accepted", &client, &notes, false).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

#[cfg(all(feature = "compression-zstd", feature = "compression-deflate"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_picks_its_preferred_algorithm_among_those_offered() {
    // Deflate preferred: an offer of both gets deflate.
    let (server, notes) = suite_server(
        Server::builder()
            .accept_compression(Compression::Deflate)
            .accept_compression(Compression::Zstd),
    )
    .await;
    assert_eq!(server_choice(server.addr, 0x03).await, 0x02);
    assert_eq!(server_choice(server.addr, 0x01).await, 0x01);
    assert_eq!(server_choice(server.addr, 0x02).await, 0x02);
    assert_eq!(server_choice(server.addr, 0x00).await, 0x00);
    // Algorithms this server does not accept (lz4), and bits nobody knows, are not chosen.
    assert_eq!(server_choice(server.addr, 0x04).await, 0x00);
    assert_eq!(server_choice(server.addr, 0x80).await, 0x00);
    assert_eq!(server_choice(server.addr, 0x06).await, 0x02);
    let client = Client::builder()
        .compression(Compression::Zstd)
        .compression(Compression::Deflate)
        .connect(server.addr)
        .await
        .unwrap();
    call_suite("both offered, deflate preferred", &client, &notes, true).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;

    // Zstd preferred: the same offer gets zstd.
    let (server, _notes) = suite_server(
        Server::builder()
            .accept_compression(Compression::Zstd)
            .accept_compression(Compression::Deflate),
    )
    .await;
    assert_eq!(server_choice(server.addr, 0x03).await, 0x01);
    server.shutdown(Duration::from_secs(5)).await;

    // A server that accepts nothing answers any offer with none, and works.
    let (server, notes) = suite_server(Server::builder()).await;
    assert_eq!(server_choice(server.addr, 0x03).await, 0x00);
    let client = Client::builder()
        .compression(Compression::Zstd)
        .compression(Compression::Deflate)
        .connect(server.addr)
        .await
        .unwrap();
    call_suite("both offered, none accepted", &client, &notes, false).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

/// Client bytes written per call over 2,000 calls of the same small struct (`callers` callers
/// sharing the calls), with `compression` on both sides or none.
#[cfg(any(feature = "compression-zstd", feature = "compression-deflate"))]
async fn bytes_written_per_call(compression: Option<Compression>, callers: usize) -> f64 {
    let mut server = Server::builder();
    let mut builder = Client::builder();
    if let Some(c) = compression {
        server = server.accept_compression(c);
        builder = builder.compression(c);
    }
    let server = support::serve(server, support::echo()).await;
    let client = builder.connect(server.addr).await.unwrap();
    let item = Item::sample(7);
    // One call first, so the figure counts calls, not the connection's start.
    let _: Item = client.invoke("Echo", &item).await.unwrap();
    let before = client.stats();
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        let client = client.clone();
        let item = item.clone();
        tasks.spawn(async move {
            for _ in 0..2000 / callers {
                let back: Item = client.invoke("Echo", &item).await.unwrap();
                assert_eq!(back, item);
            }
        });
    }
    while let Some(res) = tasks.join_next().await {
        res.unwrap();
    }
    let delta = client.stats().since(&before);
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
    delta.bytes_written as f64 / 2000.0
}

/// Compares bytes per call with `compression` against plain, one caller after another (every
/// call is its own batch, so each pays a compressor flush) and with 20 callers (batches of many
/// calls); the compressed figure must be below 40 % of the plain one in both.
#[cfg(any(feature = "compression-zstd", feature = "compression-deflate"))]
async fn shrinks_the_wire(compression: Compression) {
    for callers in [1, 20] {
        let plain = bytes_written_per_call(None, callers).await;
        let packed = bytes_written_per_call(Some(compression), callers).await;
        println!(
            "client bytes written per call, 2,000 calls, {callers} caller(s): plain {plain:.1}, \
             {compression} {packed:.1} ({:.0} %)",
            100.0 * packed / plain
        );
        assert!(
            packed < 0.4 * plain,
            "{compression} wrote {packed:.1} bytes per call, plain {plain:.1} ({callers} \
             callers): not below 40 %"
        );
    }
}

#[cfg(feature = "compression-zstd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_shrinks_the_wire_for_a_repeated_struct() {
    shrinks_the_wire(Compression::Zstd).await;
}

#[cfg(feature = "compression-deflate")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_shrinks_the_wire_for_a_repeated_struct() {
    shrinks_the_wire(Compression::Deflate).await;
}

/// The client reconnects after a restart on the same port and the new connection is
/// compressed again.
#[cfg(any(feature = "compression-zstd", feature = "compression-deflate"))]
async fn reconnects_with(compression: Compression) {
    let label = format!("reconnect+{compression}");
    let notes = Notes::default();
    let mut server = support::serve(
        Server::builder().accept_compression(compression),
        suite_service(notes.clone()),
    )
    .await;
    let addr = server.addr;
    let client = Client::builder()
        .compression(compression)
        .reconnect_backoff(Duration::from_millis(50), 1.6, Duration::from_millis(200))
        .connect(addr)
        .await
        .unwrap();
    assert_eq!(client.invoke::<_, u64>("Shuffle", &1u64).await.unwrap(), 1);

    server.trigger_shutdown();
    server.join(Duration::from_secs(5)).await;
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        client.invoke::<_, u64>("Shuffle", &2u64),
    )
    .await
    .expect("a call to a stopped server hung");
    let err = res.expect_err("a call to a stopped server succeeded");
    assert!(err.is_unavailable() || err.is_closed(), "{err:?}");

    let listener = support::rebind(addr).await;
    let notes = Notes::default();
    let server = support::serve_on(
        listener,
        Server::builder().accept_compression(compression),
        suite_service(notes.clone()),
    );
    let start = std::time::Instant::now();
    let mut last_err = None;
    let mut recovered = false;
    for i in 0..500u64 {
        match tokio::time::timeout(
            Duration::from_secs(5),
            client.invoke::<_, u64>("Shuffle", &i),
        )
        .await
        {
            Ok(Ok(n)) => {
                assert_eq!(n, i);
                recovered = true;
                break;
            }
            Ok(Err(e)) => last_err = Some(e),
            Err(_) => panic!("{label}: a call hung while the client reconnected"),
        }
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        recovered,
        "{label}: no successful call within 5 s of the restart; last error: {last_err:?}"
    );
    assert!(client.stats().dials >= 2);
    // The new connection negotiated compression again and carries the whole suite.
    call_suite(&label, &client, &notes, true).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

#[cfg(feature = "compression-zstd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_with_zstd_after_a_server_restart() {
    reconnects_with(Compression::Zstd).await;
}

#[cfg(feature = "compression-deflate")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_with_deflate_after_a_server_restart() {
    reconnects_with(Compression::Deflate).await;
}

/// Makes 200 calls over `client` (after one to settle the connection: the prefaces and any
/// handshake are left out), then waits for both ends' counters to agree: the bytes one side
/// wrote are the bytes the other read. Panics with both figures when they do not.
async fn assert_wire_bytes_agree(
    label: &str,
    client: &Client,
    server: &towerpc::server::ServerHandle,
) {
    let item = Item::sample(3);
    let _: Item = client.invoke("Echo", &item).await.unwrap();
    // The server counts its reply's bytes just after the write returns, which may be after
    // the client has read them: let the counters settle before the snapshot.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (c0, s0) = (client.stats(), server.stats());
    for _ in 0..200 {
        let _: Item = client.invoke("Echo", &item).await.unwrap();
    }
    let mut agree = false;
    let (mut c, mut s) = (client.stats().since(&c0), server.stats().since(&s0));
    for _ in 0..200 {
        c = client.stats().since(&c0);
        s = server.stats().since(&s0);
        if c.bytes_written == s.bytes_read && c.bytes_read == s.bytes_written {
            agree = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{label}: over 200 calls the client wrote {} / read {}, the server read {} / wrote {}",
        c.bytes_written, c.bytes_read, s.bytes_read, s.bytes_written
    );
    assert!(
        agree,
        "{label}: over 200 calls the client wrote {} bytes and read {}, the server read {} and \
         wrote {}",
        c.bytes_written, c.bytes_read, s.bytes_read, s.bytes_written
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_count_the_same_wire_bytes() {
    let server = support::serve(Server::builder(), support::echo()).await;
    let client = Client::builder().connect(server.addr).await.unwrap();
    assert_wire_bytes_agree("tcp", &client, &server.server).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

#[cfg(feature = "compression-zstd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_count_the_same_compressed_wire_bytes() {
    let server = support::serve(
        Server::builder().accept_compression(Compression::Zstd),
        support::echo(),
    )
    .await;
    let client = Client::builder()
        .compression(Compression::Zstd)
        .connect(server.addr)
        .await
        .unwrap();
    assert_wire_bytes_agree("tcp+zstd", &client, &server.server).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}

/// Stats are documented as bytes on the wire, below TLS: both ends count beneath it (the
/// client's `TlsConnector` puts the counter under its TLS stream).
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_count_the_same_wire_bytes_under_tls() {
    use towerpc::transport::tls::TlsConnector;
    use towerpc::transport::TcpConnector;

    let (server_tls, client_tls) = tls_configs();
    let server = support::serve(Server::builder().tls(server_tls), support::echo()).await;
    let connector = TlsConnector::new(TcpConnector::new(), client_tls, "localhost").unwrap();
    let client = Client::builder()
        .connect_with(server.addr, connector)
        .await
        .unwrap();
    assert_wire_bytes_agree("tcp+tls", &client, &server.server).await;
    drop(client);
    server.shutdown(Duration::from_secs(5)).await;
}
