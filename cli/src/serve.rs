//! `towerpc serve-echo`: a dispatcher with `echo`, `sleep` and `fail`, to try things out and to
//! benchmark against.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use clap::Args;
use serde::Deserialize;
use towerpc::codec::Compression;
use towerpc::dispatch::Dispatcher;
use towerpc::server::TcpIncoming;
use towerpc::transport::tls;
use towerpc::{Code, Server, Status};

/// `towerpc serve-echo ADDR`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HOST:PORT to listen on (port 0 picks a free one; the address is printed).
    pub addr: SocketAddr,
    /// PEM certificate chain: serve TLS (with --key).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// PEM CA certificates: require client certificates they sign (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub client_ca: Option<PathBuf>,
    /// Do not accept stream compression (by default zstd, lz4 and deflate are accepted).
    #[arg(long)]
    pub no_compression: bool,
}

/// The `fail` method's request: `{"code": "not_found", "message": "..."}`, or just a message.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Fail {
    Message(String),
    Full {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    },
}

/// The wire code named `name` (`not_found`, `NOT_FOUND`, `not found`, or its number).
pub fn code_by_name(name: &str) -> Option<Code> {
    if let Ok(n) = name.parse::<u16>() {
        return Some(Code::from_u16(n));
    }
    let wanted = name.to_lowercase().replace(['_', '-'], " ");
    (0..=64)
        .map(Code::from_u16)
        .find(|c| c.to_string() == wanted || (wanted == "application" && *c == Code::Application))
}

/// The dispatcher `serve-echo` serves.
pub fn dispatcher() -> Dispatcher {
    Dispatcher::new()
        .route("echo", |v: rmpv::Value| async move { v })
        .route("sleep", |ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        })
        .route("fail", |f: Fail| async move {
            let (code, message) = match f {
                Fail::Message(m) => (Code::Application, m),
                Fail::Full { code, message } => {
                    let code = match code {
                        Some(name) => code_by_name(&name).unwrap_or(Code::Unknown),
                        None => Code::Application,
                    };
                    (code, message.unwrap_or_else(|| "failed as asked".into()))
                }
            };
            Err::<(), _>(Status::new(code, message))
        })
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    let mut server = Server::builder();
    if !args.no_compression {
        for c in [Compression::Zstd, Compression::Lz4, Compression::Deflate] {
            server = server.accept_compression(c);
        }
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let (cert, key) = (read(cert)?, read(key)?);
        let config = match &args.client_ca {
            Some(ca) => tls::config::server_mutual(&cert, &key, &read(ca)?),
            None => tls::config::server(&cert, &key),
        }
        .map_err(|e| anyhow!("TLS configuration: {e}"))?;
        server = server.tls(config);
    }
    let incoming = TcpIncoming::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let addr = incoming.local_addr()?;
    println!("listening on {addr} (methods: echo, sleep, fail)");
    std::io::stdout().flush()?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("draining");
    };
    server
        .serve_with_incoming_shutdown(incoming, dispatcher(), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_by_name() {
        assert_eq!(code_by_name("not_found"), Some(Code::NotFound));
        assert_eq!(
            code_by_name("DEADLINE_EXCEEDED"),
            Some(Code::DeadlineExceeded)
        );
        assert_eq!(code_by_name("application"), Some(Code::Application));
        assert_eq!(code_by_name("nonsense"), None);
    }
}
