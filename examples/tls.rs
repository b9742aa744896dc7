//! Mutual TLS end to end: makes a throwaway CA, a server certificate (for `localhost` and
//! 127.0.0.1) and a client certificate with rcgen, serves on 127.0.0.1 with client
//! certificates required, connects a client presenting its certificate, makes a few calls and
//! prints who the server's handler saw, and the stats.
//!
//! ```text
//! cargo run --example tls --features tls
//! ```
//!
//! In production, load PEM files with `towerpc::transport::tls::config::read_pem` instead of
//! generating certificates.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::net::TcpListener;
use towerpc::transport::tls::{self, TlsConnector};
use towerpc::transport::{ConnectInfo, TcpConnector};
use towerpc::{BoxError, Client, Error, Request, Response, Server};

/// A certificate (PEM) and its private key (PEM).
struct Pem {
    cert: String,
    key: String,
}

/// The CA certificate, and a server and a client identity it issued.
struct Certs {
    ca: String,
    server: Pem,
    client: Pem,
}

fn make_certs() -> Result<Certs, rcgen::Error> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "towerpc example CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;

    let mut server_params = CertificateParams::new(vec!["localhost".to_string()])?;
    server_params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    server_params
        .distinguished_name
        .push(DnType::CommonName, "towerpc example server");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &ca, &ca_key)?;

    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "towerpc example client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate()?;
    let client = client_params.signed_by(&client_key, &ca, &ca_key)?;

    Ok(Certs {
        ca: ca.pem(),
        server: Pem {
            cert: server.pem(),
            key: server_key.serialize_pem(),
        },
        client: Pem {
            cert: client.pem(),
            key: client_key.serialize_pem(),
        },
    })
}

/// `Echo` returns the body; `Whoami` describes the client certificate the connection carries.
async fn handle(req: Request) -> Result<Response, BoxError> {
    match req.method() {
        "Echo" => Ok(Response::new(req.into_body())),
        "Whoami" => {
            let info = req
                .extensions()
                .get::<ConnectInfo>()
                .ok_or("no connection info")?;
            let text = match info.peer_certificates() {
                Some(chain) if !chain.is_empty() => format!(
                    "client {} presented {} certificate(s); leaf is {} bytes of DER, starting {}",
                    info.remote_addr()
                        .map_or_else(|| "?".to_string(), |a| a.to_string()),
                    chain.len(),
                    chain[0].len(),
                    hex(&chain[0][..16.min(chain[0].len())]),
                ),
                _ => "client presented no certificate".to_string(),
            };
            Ok(Response::new(rmp_serde::to_vec(&text)?.into()))
        }
        other => Err(towerpc::Status::new(towerpc::Code::NotFound, other.to_string()).into()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let certs = make_certs()?;

    // Server: requires a client certificate from our CA.
    let server_tls = tls::config::server_mutual(
        certs.server.cert.as_bytes(),
        certs.server.key.as_bytes(),
        certs.ca.as_bytes(),
    )?;
    let server = Server::builder()
        .tls(server_tls)
        .handshake_timeout(Duration::from_secs(5))
        .on_connection_error(|info: &ConnectInfo, err: &Error| {
            eprintln!("server refused {:?}: {err}", info.remote_addr());
        });
    let stats = server.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve_with_incoming_shutdown(
        towerpc::server::TcpIncoming::from(listener),
        tower::service_fn(handle),
        async move {
            let _ = stopped.await;
        },
    ));
    println!("mutual-TLS server on {addr}");

    // Client: trusts our CA, verifies the server as "localhost", presents its certificate.
    let client_tls = tls::config::client_with_identity(
        certs.ca.as_bytes(),
        certs.client.cert.as_bytes(),
        certs.client.key.as_bytes(),
    )?;
    let connector = TlsConnector::new(TcpConnector::new(), client_tls, "localhost")?;
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_with(addr, connector)
        .await?;

    for word in ["hello", "over", "mutual", "TLS"] {
        let back: String = client.invoke("Echo", &word.to_string()).await?;
        println!("echo: {back}");
    }
    let who: String = client.invoke("Whoami", &()).await?;
    println!("server handler saw: {who}");

    drop(client);
    let _ = stop.send(());
    serving.await??;

    let s = stats.stats();
    println!(
        "server stats: accepts={} accept_errors={} calls={} errors={} frames_read={} \
         frames_written={} bytes_read={} bytes_written={}",
        s.accepts,
        s.accept_errors,
        s.calls,
        s.errors,
        s.frames_read,
        s.frames_written,
        s.bytes_read,
        s.bytes_written
    );
    Ok(())
}
