//! TLS and mutual TLS end to end, over TCP on 127.0.0.1, with certificates made at run time by
//! rcgen (no key files in the repository): a CA, a server certificate for `localhost` and
//! 127.0.0.1, a client certificate, and the bad ones (expired, wrong name, unknown CA,
//! self-signed). Every failure must be typed and prompt on both sides; see docs/reliability.md
//! ("TLS failures", P15).
#![cfg(feature = "tls")]

mod support;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use towerpc::transport::tls::{self, rustls, TlsConnector};
use towerpc::transport::{ConnectInfo, TcpConnector};
use towerpc::{BoxError, Client, Error, Request, Response, Server};

use support::{echo, eventually, serve, service, Svc, TestServer};

/// Bound on every failure the suite provokes. The target is 1 s; the slack absorbs a loaded CI
/// machine without letting a hang (a 10 s handshake timeout, a 20 s call timeout) pass.
const PROMPT: Duration = Duration::from_secs(2);

/// Bound on each whole test.
const TEST_BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A certificate authority: its certificate (PEM) and signing key.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        Ca {
            pem: cert.pem(),
            cert,
            key,
        }
    }
}

/// An end-entity certificate (PEM and DER) with its private key (PEM).
struct Identity {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

/// Parameters of a leaf certificate: common name, DNS names, IP addresses, one extended key
/// usage.
fn leaf_params(
    cn: &str,
    dns: &[&str],
    ips: &[IpAddr],
    usage: ExtendedKeyUsagePurpose,
) -> CertificateParams {
    let names: Vec<String> = dns.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params
}

/// Signs `params` with `issuer`, or self-signs them with `None`.
fn issue(params: CertificateParams, issuer: Option<&Ca>) -> Identity {
    let key = KeyPair::generate().expect("leaf key");
    let cert = match issuer {
        Some(ca) => params.signed_by(&key, &ca.cert, &ca.key),
        None => params.self_signed(&key),
    }
    .expect("sign leaf");
    Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn server_params(dns: &[&str]) -> CertificateParams {
    leaf_params(
        "towerpc test server",
        dns,
        &[LOCALHOST],
        ExtendedKeyUsagePurpose::ServerAuth,
    )
}

fn client_params(cn: &str) -> CertificateParams {
    leaf_params(cn, &[], &[], ExtendedKeyUsagePurpose::ClientAuth)
}

/// Everything the suite needs, made fresh for each test.
struct Pki {
    ca: Ca,
    /// `localhost` and 127.0.0.1, issued by `ca`.
    server: Identity,
    /// A client identity issued by `ca`.
    client: Identity,
    /// A second, equally valid client identity issued by `ca`.
    client2: Identity,
    /// `localhost`, issued by `ca`, valid only during the year 2000.
    expired: Identity,
    /// Issued by `ca` for `wrong.example` only (no IP address either).
    wrong_name: Identity,
    /// A server certificate for `localhost` from a CA nobody trusts.
    foreign_server: Identity,
    /// A client certificate from a CA nobody trusts.
    foreign_client: Identity,
    /// A self-signed server certificate for `localhost`.
    self_signed: Identity,
}

impl Pki {
    fn new() -> Pki {
        let ca = Ca::new("towerpc test CA");
        let other = Ca::new("towerpc unknown CA");
        let mut expired = server_params(&["localhost"]);
        expired.not_before = rcgen::date_time_ymd(2000, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let wrong_name = leaf_params(
            "wrong",
            &["wrong.example"],
            &[],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        Pki {
            server: issue(server_params(&["localhost"]), Some(&ca)),
            client: issue(client_params("towerpc test client"), Some(&ca)),
            client2: issue(client_params("towerpc second client"), Some(&ca)),
            expired: issue(expired, Some(&ca)),
            wrong_name: issue(wrong_name, Some(&ca)),
            foreign_server: issue(server_params(&["localhost"]), Some(&other)),
            foreign_client: issue(client_params("towerpc foreign client"), Some(&other)),
            self_signed: issue(server_params(&["localhost"]), None),
            ca,
        }
    }

    fn ca_pem(&self) -> &[u8] {
        self.ca.pem.as_bytes()
    }

    /// A server configuration (no client certificates) presenting `id`.
    fn server_config(&self, id: &Identity) -> Arc<rustls::ServerConfig> {
        tls::config::server(id.cert_pem.as_bytes(), id.key_pem.as_bytes()).expect("server config")
    }

    /// A mutual-TLS server configuration presenting `self.server`, trusting clients of `ca`.
    fn mutual_config(&self) -> Arc<rustls::ServerConfig> {
        tls::config::server_mutual(
            self.server.cert_pem.as_bytes(),
            self.server.key_pem.as_bytes(),
            self.ca_pem(),
        )
        .expect("mutual server config")
    }

    /// A client configuration trusting `ca`, without a certificate.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        tls::config::client(self.ca_pem()).expect("client config")
    }

    /// A client configuration trusting `ca` and presenting `id`.
    fn identity_config(&self, id: &Identity) -> Arc<rustls::ClientConfig> {
        tls::config::client_with_identity(
            self.ca_pem(),
            id.cert_pem.as_bytes(),
            id.key_pem.as_bytes(),
        )
        .expect("client identity config")
    }
}

// ---------------------------------------------------------------------------------------------
// Servers, clients, reports
// ---------------------------------------------------------------------------------------------

/// What the server's `on_connection_error` hook saw.
#[derive(Debug)]
struct Report {
    handshake: bool,
    text: String,
    at: Instant,
    peer: Option<SocketAddr>,
}

type Reports = mpsc::UnboundedReceiver<Report>;

/// Adds an `on_connection_error` hook that forwards every report to the returned channel.
fn reporting(server: Server) -> (Server, Reports) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = server.on_connection_error(move |info: &ConnectInfo, err: &Error| {
        let _ = tx.send(Report {
            handshake: err.is_handshake(),
            text: format!("{err:#}"),
            at: Instant::now(),
            peer: info.remote_addr(),
        });
    });
    (server, rx)
}

/// Starts a TLS server presenting `config`, with an error reporter.
async fn tls_server(
    server: Server,
    config: Arc<rustls::ServerConfig>,
    svc: Svc,
) -> (TestServer, Reports) {
    let (server, reports) = reporting(server.tls(config));
    (serve(server, svc).await, reports)
}

/// The next report, which must arrive within `PROMPT` of `since`; it must be a handshake error.
async fn next_report(reports: &mut Reports, since: Instant) -> Report {
    let report = tokio::time::timeout(PROMPT, reports.recv())
        .await
        .unwrap_or_else(|_| panic!("the server reported no connection error within {PROMPT:?}"))
        .expect("report channel closed");
    let late = report.at.saturating_duration_since(since);
    assert!(late < PROMPT, "server reported after {late:?}: {report:?}");
    assert!(
        report.handshake,
        "server error is not is_handshake(): {report:?}"
    );
    report
}

/// Panics if the server has reported anything.
fn assert_no_reports(reports: &mut Reports) {
    if let Ok(r) = reports.try_recv() {
        panic!("unexpected connection error on the server: {r:?}");
    }
}

fn client_builder() -> towerpc::client::Builder {
    Client::builder()
        .timeout(Some(Duration::from_secs(5)))
        .connect_timeout(Duration::from_secs(5))
}

fn connector(config: Arc<rustls::ClientConfig>) -> TlsConnector<TcpConnector> {
    TlsConnector::new(TcpConnector::new(), config, "localhost").expect("TLS connector")
}

/// Dials `addr` over TLS (verifying the server as `localhost`) with `builder`.
async fn connect_tls_with(
    builder: towerpc::client::Builder,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> towerpc::Result<Client> {
    builder.connect_with(addr, connector(config)).await
}

async fn connect_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> towerpc::Result<Client> {
    connect_tls_with(client_builder(), addr, config).await
}

/// Runs a connect that must fail; returns its error and how long it took, which must be
/// under `PROMPT`.
async fn connect_fails(fut: impl Future<Output = towerpc::Result<Client>>) -> (Error, Duration) {
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("connect hung for 10 s");
    let took = start.elapsed();
    match res {
        Ok(_) => panic!("connect succeeded; it should have been refused"),
        Err(e) => {
            assert!(took < PROMPT, "connect failed only after {took:?}: {e}");
            (e, took)
        }
    }
}

/// Fails the test if `fut` takes longer than `TEST_BOUND`.
async fn bounded<F: Future<Output = ()>>(fut: F) {
    tokio::time::timeout(TEST_BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {TEST_BOUND:?}"));
}

/// Echoes every method but `Whoami`, which answers with msgpack `(chain_len, leaf_der)`: the
/// number of certificates the client presented (0 without any) and the first one's DER.
fn whoami() -> Svc {
    service(|req: Request| async move {
        if req.method() != "Whoami" {
            return Ok(Response::new(req.into_body()));
        }
        let info = req
            .extensions()
            .get::<ConnectInfo>()
            .ok_or("no ConnectInfo in the request extensions")?;
        let chain = info.peer_certificates().unwrap_or(&[]);
        let leaf = chain
            .first()
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default();
        let out = (chain.len(), serde_bytes::ByteBuf::from(leaf));
        Ok(Response::new(rmp_serde::to_vec(&out)?.into()))
    })
}

/// Asks the server which certificate chain it saw from this client.
async fn who_am_i(client: &Client) -> (usize, Vec<u8>) {
    let resp = client
        .request(Request::new("Whoami", Bytes::new()))
        .await
        .expect("Whoami call");
    let (n, leaf): (usize, serde_bytes::ByteBuf) =
        rmp_serde::from_slice(resp.body()).expect("decode Whoami");
    (n, leaf.into_vec())
}

/// Lowercased, for loose matching of error texts.
fn lower(e: &impl std::fmt::Display) -> String {
    format!("{e:#}").to_lowercase()
}

/// Open file descriptors of this process, when the platform says (Linux).
fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

/// Whether this test has the process to itself (nextest's default), so process-wide counts
/// such as open fds belong to it alone.
fn process_per_test() -> bool {
    std::env::var("NEXTEST_EXECUTION_MODE").is_ok_and(|m| m == "process-per-test")
}

// ---------------------------------------------------------------------------------------------
// 1. Plain TLS works
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_echo_suite() {
    bounded(async {
        let pki = Pki::new();
        let (srv, mut reports) =
            tls_server(Server::builder(), pki.server_config(&pki.server), whoami()).await;
        let client = connect_tls(srv.addr, pki.client_config())
            .await
            .expect("TLS connect");

        // A few calls in a row.
        for i in 0..5 {
            let msg = format!("hello over TLS #{i}");
            let got: String = client.invoke("Echo", &msg).await.expect("call");
            assert_eq!(got, msg);
        }

        // Many at once over the one connection.
        let calls = (0..200u64).map(|i| {
            let client = client.clone();
            async move { client.invoke::<u64, u64>("Echo", &i).await }
        });
        let results = futures_util::future::join_all(calls).await;
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r.expect("concurrent call"), i as u64);
        }

        // A 1 MiB body each way.
        let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let resp = client
            .request(Request::new("Echo", big.clone()))
            .await
            .expect("1 MiB call");
        assert_eq!(resp.body().len(), big.len());
        assert!(resp.body()[..] == big[..], "1 MiB body came back altered");

        // Without mTLS the handler sees no client certificate.
        assert_eq!(who_am_i(&client).await, (0, Vec::new()));

        let stats = srv.stats();
        assert_eq!(stats.accepts, 1);
        assert_eq!(stats.accept_errors, 0);
        assert!(
            stats.bytes_read >= 1 << 20,
            "server read {} bytes",
            stats.bytes_read
        );
        assert!(stats.bytes_written >= 1 << 20);
        assert_no_reports(&mut reports);
    })
    .await;
}

/// The bytes on the wire are TLS records, not towerpc frames: the body must not appear in
/// clear in what the server writes.
#[tokio::test]
async fn tls_server_speaks_tls_on_the_wire() {
    bounded(async {
        let pki = Pki::new();
        let (srv, _reports) =
            tls_server(Server::builder(), pki.server_config(&pki.server), echo()).await;
        // A hand-made ClientHello is more than we want here; check the server's first bytes
        // after rustls' own ClientHello instead, through a recording TCP relay.
        let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
        let seen2 = seen.clone();
        let upstream = srv.addr;
        tokio::spawn(async move {
            let (down, _) = relay.accept().await.unwrap();
            let up = TcpStream::connect(upstream).await.unwrap();
            let (mut dr, mut dw) = down.into_split();
            let (mut ur, mut uw) = up.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut dr, &mut uw).await;
            });
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match ur.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        seen2.lock().unwrap().extend_from_slice(&buf[..n]);
                        if dw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let client = connect_tls(relay_addr, pki.client_config())
            .await
            .expect("TLS connect through relay");
        let secret = "a secret that must not cross the wire in clear".to_string();
        let got: String = client.invoke("Echo", &secret).await.expect("call");
        assert_eq!(got, secret);
        let seen = seen.lock().unwrap().clone();
        assert!(!seen.is_empty());
        // 0x16: a TLS handshake record (the ServerHello).
        assert_eq!(seen[0], 0x16, "server did not start with a TLS record");
        assert!(
            !seen.windows(4).any(|w| w == b"TRPC"),
            "the towerpc preface crossed the wire in clear"
        );
        assert!(
            !seen.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the reply crossed the wire in clear"
        );
    })
    .await;
}

/// `connect_with` returned `Ok`, so the connection is up: `is_connected()` must say so at
/// once. The client's background task signals the first success before it marks the phase
/// `Connected` (src/client/connection.rs, `run`: `first.send(Ok(()))` precedes `serve`), so on
/// a multi-thread runtime the caller can observe `false` in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn is_connected_right_after_tls_connect() {
    bounded(async {
        let pki = Pki::new();
        let (srv, _reports) =
            tls_server(Server::builder(), pki.server_config(&pki.server), echo()).await;
        let config = pki.client_config();
        let mut not_yet = 0;
        for _ in 0..50 {
            let client = connect_tls(srv.addr, config.clone())
                .await
                .expect("TLS connect");
            if !client.is_connected() {
                not_yet += 1;
            }
        }
        assert_eq!(
            not_yet, 0,
            "{not_yet}/50 clients said !is_connected() right after connect_with returned Ok"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. mTLS accepted: the client's identity reaches handlers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn mtls_identity_reaches_handlers() {
    bounded(async {
        let pki = Pki::new();
        let (srv, mut reports) = tls_server(Server::builder(), pki.mutual_config(), whoami()).await;

        let client = connect_tls(srv.addr, pki.identity_config(&pki.client))
            .await
            .expect("mTLS connect");
        let (n, leaf) = who_am_i(&client).await;
        assert_eq!(n, 1, "the client presented its leaf only");
        assert_eq!(leaf.len(), pki.client.der.len());
        assert!(
            leaf == pki.client.der,
            "handler saw another certificate than the client's"
        );
        let got: String = client.invoke("Echo", &"hi".to_string()).await.unwrap();
        assert_eq!(got, "hi");

        // A second client on the same server: each connection carries its own identity.
        let client2 = connect_tls(srv.addr, pki.identity_config(&pki.client2))
            .await
            .expect("mTLS connect (second client)");
        let (_, leaf2) = who_am_i(&client2).await;
        assert!(leaf2 == pki.client2.der);
        assert!(leaf2 != leaf);
        let (_, leaf_again) = who_am_i(&client).await;
        assert!(leaf_again == pki.client.der);

        assert_eq!(srv.stats().accepts, 2);
        assert_no_reports(&mut reports);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. mTLS rejected
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn mtls_rejects_client_without_certificate() {
    bounded(async {
        let pki = Pki::new();
        let (srv, mut reports) = tls_server(Server::builder(), pki.mutual_config(), echo()).await;
        let start = Instant::now();
        let (err, took) = connect_fails(connect_tls(srv.addr, pki.client_config())).await;
        assert!(
            err.is_handshake(),
            "not is_handshake() after {took:?}: {err}"
        );
        let report = next_report(&mut reports, start).await;
        assert!(
            lower(&report.text).contains("certificate"),
            "server report does not name the missing certificate: {}",
            report.text
        );
        assert_eq!(srv.stats().accept_errors, 1);
    })
    .await;
}

#[tokio::test]
async fn mtls_rejects_client_certificate_from_unknown_ca() {
    bounded(async {
        let pki = Pki::new();
        let (srv, mut reports) = tls_server(Server::builder(), pki.mutual_config(), echo()).await;
        let start = Instant::now();
        let config = pki.identity_config(&pki.foreign_client);
        let (err, took) = connect_fails(connect_tls(srv.addr, config)).await;
        assert!(
            err.is_handshake(),
            "not is_handshake() after {took:?}: {err}"
        );
        let report = next_report(&mut reports, start).await;
        assert!(
            lower(&report.text).contains("issuer") || lower(&report.text).contains("certificate"),
            "server report does not say why: {}",
            report.text
        );

        // The server is fine for a proper client afterwards.
        let client = connect_tls(srv.addr, pki.identity_config(&pki.client))
            .await
            .expect("good mTLS client");
        let got: u64 = client.invoke("Echo", &7u64).await.unwrap();
        assert_eq!(got, 7);
        assert_no_reports(&mut reports);
    })
    .await;
}

/// A `connect_with` that fails hands back no client, so nothing may keep dialing the server
/// in the background (the reconnect backoff starts at 1 s ± 20 %).
#[tokio::test]
async fn failed_tls_connect_does_not_keep_redialing() {
    bounded(async {
        let pki = Pki::new();
        let (srv, mut reports) = tls_server(Server::builder(), pki.mutual_config(), echo()).await;
        let start = Instant::now();
        let (err, _) = connect_fails(connect_tls(srv.addr, pki.client_config())).await;
        assert!(err.is_handshake(), "{err}");
        next_report(&mut reports, start).await;
        tokio::time::sleep(Duration::from_millis(1800)).await;
        assert_eq!(
            srv.stats().accepts,
            1,
            "the failed client went on dialing after connect_with returned its error"
        );
        assert_no_reports(&mut reports);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Bad server certificates
// ---------------------------------------------------------------------------------------------

/// A server presenting `id`; a client trusting only the test CA must refuse it promptly with
/// an `is_handshake()` error whose text mentions TLS and `why`; the server must report it.
async fn client_refuses_server_cert(pki: &Pki, id: &Identity, why: &[&str]) {
    let (srv, mut reports) = tls_server(Server::builder(), pki.server_config(id), echo()).await;
    let start = Instant::now();
    let (err, took) = connect_fails(connect_tls(srv.addr, pki.client_config())).await;
    assert!(
        err.is_handshake(),
        "not is_handshake() after {took:?}: {err}"
    );
    let text = lower(&err);
    assert!(
        text.contains("tls") && text.contains("certificate"),
        "error does not say it is a TLS certificate problem: {err}"
    );
    assert!(
        why.iter().any(|w| text.contains(w)),
        "error does not say why ({why:?}): {err}"
    );
    assert_eq!(
        err.server_addr(),
        Some(srv.addr),
        "error does not name the server: {err}"
    );
    let report = next_report(&mut reports, start).await;
    assert!(
        lower(&report.text).contains("tls")
            || lower(&report.text).contains("certificate")
            || lower(&report.text).contains("alert"),
        "server report does not say it is TLS: {}",
        report.text
    );
    assert_eq!(srv.stats().accept_errors, 1);
}

#[tokio::test]
async fn client_refuses_expired_server_certificate() {
    bounded(async {
        let pki = Pki::new();
        client_refuses_server_cert(&pki, &pki.expired, &["expired"]).await;
    })
    .await;
}

#[tokio::test]
async fn client_refuses_server_certificate_for_wrong_name() {
    bounded(async {
        let pki = Pki::new();
        client_refuses_server_cert(&pki, &pki.wrong_name, &["not valid for name"]).await;
    })
    .await;
}

#[tokio::test]
async fn client_refuses_server_certificate_from_unknown_ca() {
    bounded(async {
        let pki = Pki::new();
        client_refuses_server_cert(&pki, &pki.foreign_server, &["issuer"]).await;
    })
    .await;
}

#[tokio::test]
async fn client_refuses_self_signed_server_certificate() {
    bounded(async {
        let pki = Pki::new();
        client_refuses_server_cert(&pki, &pki.self_signed, &["issuer"]).await;
    })
    .await;
}

/// Checks the IP SAN too: a client verifying the server as 127.0.0.1 accepts the good
/// certificate and refuses the one that names only `wrong.example`.
#[tokio::test]
async fn server_verified_by_ip_address() {
    bounded(async {
        let pki = Pki::new();
        let (srv, _r) = tls_server(Server::builder(), pki.server_config(&pki.server), echo()).await;
        let tls = TlsConnector::new(TcpConnector::new(), pki.client_config(), "127.0.0.1")
            .expect("IP server name");
        let client = client_builder()
            .connect_with(srv.addr, tls.clone())
            .await
            .expect("TLS by IP address");
        let got: u64 = client.invoke("Echo", &1u64).await.unwrap();
        assert_eq!(got, 1);

        let (bad, _r2) = tls_server(
            Server::builder(),
            pki.server_config(&pki.wrong_name),
            echo(),
        )
        .await;
        let (err, _) = connect_fails(client_builder().connect_with(bad.addr, tls)).await;
        assert!(err.is_handshake(), "{err}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Plaintext peers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn plaintext_client_against_tls_server() {
    bounded(async {
        let pki = Pki::new();
        let (srv, mut reports) =
            tls_server(Server::builder(), pki.server_config(&pki.server), echo()).await;
        let start = Instant::now();
        let (err, took) = connect_fails(client_builder().connect(srv.addr)).await;
        assert!(
            err.is_handshake() || err.is_unavailable(),
            "untyped error after {took:?}: {err}"
        );
        next_report(&mut reports, start).await;
        assert_eq!(srv.stats().accept_errors, 1);

        // And a plaintext raw peer that keeps its socket open is hung up on, not left waiting
        // for the handshake timeout (10 s by default).
        let mut raw = TcpStream::connect(srv.addr).await.unwrap();
        let start = Instant::now();
        raw.write_all(&support::client_preface(1 << 20))
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(PROMPT, async {
            loop {
                match raw.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {} // a TLS alert, most likely
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "TLS server kept a plaintext peer open for {PROMPT:?}"
        );
        next_report(&mut reports, start).await;
    })
    .await;
}

#[tokio::test]
async fn tls_client_against_plaintext_server() {
    bounded(async {
        let pki = Pki::new();
        let (server, mut reports) = reporting(Server::builder());
        let srv = serve(server, echo()).await;
        let start = Instant::now();
        let (err, took) = connect_fails(connect_tls(srv.addr, pki.client_config())).await;
        assert!(
            err.is_handshake() || err.is_unavailable(),
            "untyped error after {took:?}: {err}"
        );
        // The server saw a ClientHello where a preface belongs.
        next_report(&mut reports, start).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Handshake timeout and slowloris
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_is_bounded_by_handshake_timeout() {
    bounded(async {
        const TIMEOUT: Duration = Duration::from_millis(300);
        const SILENT: usize = 50;
        const PARTIAL: usize = 5;
        let pki = Pki::new();
        let (srv, mut reports) = tls_server(
            Server::builder().handshake_timeout(TIMEOUT),
            pki.server_config(&pki.server),
            echo(),
        )
        .await;

        // Each idle peer reports how long the server let it live.
        let mut idle = Vec::new();
        for i in 0..SILENT + PARTIAL {
            let mut stream = TcpStream::connect(srv.addr)
                .await
                .expect("connect idle peer");
            let opened = Instant::now();
            if i >= SILENT {
                // A TLS handshake record header announcing 200 bytes, then two of them.
                stream
                    .write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00])
                    .await
                    .unwrap();
            }
            idle.push(tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let res = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {} // an alert is fine; keep reading to the close
                        }
                    }
                })
                .await;
                res.map(|()| opened.elapsed())
            }));
        }

        // Meanwhile a good client connects and calls at once, several times.
        for _ in 0..5 {
            let start = Instant::now();
            let client = connect_tls(srv.addr, pki.client_config())
                .await
                .expect("good client during slowloris");
            let got: u64 = client.invoke("Echo", &5u64).await.unwrap();
            assert_eq!(got, 5);
            let took = start.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "good client took {took:?} during slowloris"
            );
            drop(client);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        for (i, h) in idle.into_iter().enumerate() {
            let lived = h
                .await
                .unwrap()
                .unwrap_or_else(|_| panic!("idle peer {i} was still open after 5 s"));
            assert!(
                lived < TIMEOUT + Duration::from_secs(1),
                "idle peer {i} was closed only after {lived:?}"
            );
            assert!(
                lived + Duration::from_millis(50) >= TIMEOUT,
                "idle peer {i} was closed after {lived:?}, before the handshake timeout"
            );
        }

        let mut timed_out = 0;
        let since = Instant::now() - Duration::from_secs(1);
        for _ in 0..SILENT + PARTIAL {
            let r = next_report(&mut reports, since).await;
            assert!(
                lower(&r.text).contains("timed out"),
                "unexpected report: {r:?}"
            );
            assert!(r.peer.is_some_and(|p| p.ip() == LOCALHOST));
            timed_out += 1;
        }
        assert_eq!(timed_out, SILENT + PARTIAL);
        assert_no_reports(&mut reports);
        let stats = srv.stats();
        assert_eq!(stats.accepts, (SILENT + PARTIAL + 5) as u64);
        assert_eq!(stats.accept_errors, (SILENT + PARTIAL) as u64);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. on_connect hooks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_on_connect_refuses_then_admits() {
    bounded(async {
        let pki = Pki::new();
        let open = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicUsize::new(0));
        let (o, s) = (open.clone(), seen.clone());
        let server = Server::builder().on_connect(move |info: ConnectInfo| {
            let (open, seen) = (o.clone(), s.clone());
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                assert!(info.remote_addr().is_some());
                if open.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err::<(), BoxError>("server is closed to new clients".into())
                }
            }
        });
        let (srv, mut reports) = tls_server(server, pki.server_config(&pki.server), echo()).await;

        let start = Instant::now();
        let (err, took) = connect_fails(connect_tls(srv.addr, pki.client_config())).await;
        assert!(
            err.is_handshake(),
            "not is_handshake() after {took:?}: {err}"
        );
        let report = next_report(&mut reports, start).await;
        assert!(
            report.text.contains("server is closed to new clients"),
            "report does not carry the hook's reason: {}",
            report.text
        );
        assert_eq!(seen.load(Ordering::SeqCst), 1);

        open.store(true, Ordering::SeqCst);
        let client = connect_tls(srv.addr, pki.client_config())
            .await
            .expect("admitted by the hook");
        let got: u64 = client.invoke("Echo", &3u64).await.unwrap();
        assert_eq!(got, 3);
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_no_reports(&mut reports);
    })
    .await;
}

/// Authorization by certificate: both clients hold valid certificates from the trusted CA;
/// the server's hook admits only the first one, by its DER.
#[tokio::test]
async fn server_on_connect_sees_client_certificate() {
    bounded(async {
        let pki = Pki::new();
        let allowed = pki.client.der.clone();
        let server = Server::builder().on_connect(move |info: ConnectInfo| {
            let ok = info
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(|leaf| leaf.as_ref() == allowed.as_slice());
            async move {
                if ok {
                    Ok(())
                } else {
                    Err::<(), BoxError>("certificate not on the allow list".into())
                }
            }
        });
        let (srv, mut reports) = tls_server(server, pki.mutual_config(), whoami()).await;

        let client = connect_tls(srv.addr, pki.identity_config(&pki.client))
            .await
            .expect("allowed client");
        assert!(who_am_i(&client).await.1 == pki.client.der);

        let start = Instant::now();
        let (err, _) =
            connect_fails(connect_tls(srv.addr, pki.identity_config(&pki.client2))).await;
        assert!(err.is_handshake(), "{err}");
        let report = next_report(&mut reports, start).await;
        assert!(report.text.contains("allow list"), "{}", report.text);
    })
    .await;
}

#[tokio::test]
async fn client_on_connect_refuses_and_admits() {
    bounded(async {
        let pki = Pki::new();
        let (srv, mut reports) =
            tls_server(Server::builder(), pki.server_config(&pki.server), echo()).await;

        // A hook that refuses: the dial fails as a handshake error carrying the reason.
        let refusing = client_builder().on_connect(|_info: ConnectInfo| async {
            Err::<(), BoxError>("client policy refuses this server".into())
        });
        let start = Instant::now();
        let (err, took) =
            connect_fails(connect_tls_with(refusing, srv.addr, pki.client_config())).await;
        assert!(
            err.is_handshake(),
            "not is_handshake() after {took:?}: {err}"
        );
        assert!(
            format!("{err:#}").contains("client policy refuses this server"),
            "{err}"
        );
        // The server saw a TLS session end without a preface.
        next_report(&mut reports, start).await;

        // A hook that checks the server's certificate and admits it.
        let server_der = pki.server.der.clone();
        let checked = Arc::new(AtomicUsize::new(0));
        let c = checked.clone();
        let admitting = client_builder().on_connect(move |info: ConnectInfo| {
            let ok = info
                .peer_certificates()
                .and_then(|chain| chain.first())
                .is_some_and(|leaf| leaf.as_ref() == server_der.as_slice());
            let c = c.clone();
            async move {
                if !ok {
                    return Err::<(), BoxError>("not the expected server certificate".into());
                }
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
        let client = connect_tls_with(admitting, srv.addr, pki.client_config())
            .await
            .expect("admitted by the client hook");
        let got: String = client.invoke("Echo", &"pinned".to_string()).await.unwrap();
        assert_eq!(got, "pinned");
        assert_eq!(checked.load(Ordering::SeqCst), 1);
        assert_no_reports(&mut reports);
    })
    .await;
}

#[tokio::test]
async fn server_on_connect_that_never_returns_is_bounded() {
    bounded(async {
        const TIMEOUT: Duration = Duration::from_millis(300);
        let pki = Pki::new();
        let server = Server::builder()
            .handshake_timeout(TIMEOUT)
            .on_connect(|_info: ConnectInfo| std::future::pending::<Result<(), BoxError>>());
        let (srv, mut reports) = tls_server(server, pki.server_config(&pki.server), echo()).await;
        let start = Instant::now();
        let (err, took) = connect_fails(connect_tls(srv.addr, pki.client_config())).await;
        assert!(
            err.is_handshake(),
            "not is_handshake() after {took:?}: {err}"
        );
        assert!(
            took + Duration::from_millis(50) >= TIMEOUT,
            "failed after {took:?}, before the handshake timeout: {err}"
        );
        let report = next_report(&mut reports, start).await;
        assert!(lower(&report.text).contains("timed out"), "{report:?}");
    })
    .await;
}

#[tokio::test]
async fn client_on_connect_that_never_returns_is_bounded() {
    bounded(async {
        let pki = Pki::new();
        let (srv, _reports) =
            tls_server(Server::builder(), pki.server_config(&pki.server), echo()).await;
        let stuck = client_builder()
            .connect_timeout(Duration::from_millis(300))
            .on_connect(|_info: ConnectInfo| std::future::pending::<Result<(), BoxError>>());
        let (err, took) =
            connect_fails(connect_tls_with(stuck, srv.addr, pki.client_config())).await;
        assert!(
            err.is_handshake() || err.is_unavailable(),
            "untyped error after {took:?}: {err}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8. Many short TLS connections
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_tls_cycles() {
    bounded(async {
        const CYCLES: u64 = 200;
        let pki = Pki::new();
        let (srv, mut reports) = tls_server(Server::builder(), pki.mutual_config(), whoami()).await;
        let client_config = pki.identity_config(&pki.client);
        let fds_before = open_fds();

        for i in 0..CYCLES {
            let client = connect_tls(srv.addr, client_config.clone())
                .await
                .unwrap_or_else(|e| panic!("cycle {i}: connect failed: {e}"));
            let got: u64 = client
                .invoke("Echo", &i)
                .await
                .unwrap_or_else(|e| panic!("cycle {i}: call failed: {e}"));
            assert_eq!(got, i);
            if i % 50 == 0 {
                assert!(who_am_i(&client).await.1 == pki.client.der);
            }
            drop(client);
        }

        let stats = srv.stats();
        assert_eq!(stats.accepts, CYCLES);
        assert_eq!(stats.accept_errors, 0);
        assert_eq!(stats.errors, 0);
        assert_eq!(stats.protocol_errors, 0);
        assert_no_reports(&mut reports);

        // Every connection is torn down: the process's descriptors return to where they
        // were (checked only when this test has the process to itself).
        if let (Some(before), true) = (fds_before, process_per_test()) {
            eventually("fds back to baseline", Duration::from_secs(5), || {
                open_fds().is_some_and(|now| now <= before + 2)
            })
            .await;
        }
    })
    .await;
}
