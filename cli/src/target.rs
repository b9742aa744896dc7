//! Where to connect and how: the address forms and the connection options every subcommand
//! that dials shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, ValueEnum};
use towerpc::codec::Compression;
use towerpc::transport::tls::{self, rustls, TlsConnector};
use towerpc::transport::{TcpConnector, UnixConnector, UpgradeConnector};
use towerpc::Client;

/// Connection options.
#[derive(Debug, Clone, Args)]
pub struct ConnectOpts {
    /// Use TLS (implied by an https:// address).
    #[arg(long, global = true)]
    pub tls: bool,
    /// PEM file of the CA certificates that sign the server's certificate (default: the
    /// system's roots).
    #[arg(long, value_name = "FILE", global = true)]
    pub ca: Option<PathBuf>,
    /// PEM file of the client certificate chain, for mutual TLS (with --key).
    #[arg(long, value_name = "FILE", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key, for mutual TLS (with --cert).
    #[arg(long, value_name = "FILE", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name to verify the server's certificate against (default: the address's host).
    #[arg(long, value_name = "NAME", global = true)]
    pub server_name: Option<String>,
    /// Ask the server for stream compression (the server must accept it).
    #[arg(long, value_enum, global = true)]
    pub compression: Option<CompressionArg>,
    /// How long to wait for the connection (and TLS, and the upgrade) to be up.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, global = true)]
    pub connect_timeout: Duration,
}

/// Compression algorithms, as the flag spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// zstd.
    Zstd,
    /// deflate.
    Deflate,
    /// lz4 (frame format).
    Lz4,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Compression {
        match c {
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Deflate => Compression::Deflate,
            CompressionArg::Lz4 => Compression::Lz4,
        }
    }
}

/// Parses `250ms`, `1.5s`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 500ms, 2s, 1m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// A parsed ADDR argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`.
    Tcp { host: String, port: u16 },
    /// `unix:/path/to/socket`.
    Unix(PathBuf),
    /// `http://host[:port]/path` or `https://...`: the HTTP/1.1 upgrade.
    Upgrade(http::Uri),
}

impl Target {
    /// Parses `host:port`, `[v6]:port`, `unix:PATH`, or an `http(s)://` URL.
    pub fn parse(addr: &str) -> Result<Target> {
        if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                bail!("address {addr:?} names no socket path");
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if addr.starts_with("http://") || addr.starts_with("https://") {
            let uri: http::Uri = addr
                .parse()
                .map_err(|e| anyhow!("invalid URL {addr:?}: {e}"))?;
            if uri.host().is_none() {
                bail!("URL {addr:?} has no host");
            }
            return Ok(Target::Upgrade(uri));
        }
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("address {addr:?} is not HOST:PORT, unix:PATH or a URL"))?;
        let port = port
            .parse()
            .map_err(|_| anyhow!("address {addr:?} has an invalid port {port:?}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            bail!("address {addr:?} has no host");
        }
        Ok(Target::Tcp {
            host: host.to_string(),
            port,
        })
    }

    fn host(&self) -> Option<&str> {
        match self {
            Target::Tcp { host, .. } => Some(host),
            Target::Unix(_) => None,
            Target::Upgrade(uri) => uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']')),
        }
    }
}

/// Dials `addr` with `opts`; `builder` carries the subcommand's own settings.
pub async fn connect(
    addr: &str,
    opts: &ConnectOpts,
    builder: towerpc::client::Builder,
) -> Result<Client> {
    let target = Target::parse(addr)?;
    let mut builder = builder.connect_timeout(opts.connect_timeout);
    if let Some(c) = opts.compression {
        builder = builder.compression(c.into());
    }
    let https = matches!(&target, Target::Upgrade(uri) if uri.scheme_str() == Some("https"));
    let tls = if opts.tls || https {
        let name = match (&opts.server_name, target.host()) {
            (Some(name), _) => name.clone(),
            (None, Some(host)) => host.to_string(),
            (None, None) => bail!("--tls over a unix socket needs --server-name"),
        };
        Some((tls_config(opts)?, name))
    } else {
        None
    };
    let connected = match (&target, tls) {
        (Target::Tcp { host, port }, None) => {
            let addr = resolve(host, *port).await?;
            builder.connect(addr).await
        }
        (Target::Tcp { host, port }, Some((config, name))) => {
            let addr = resolve(host, *port).await?;
            let connector =
                TlsConnector::new(TcpConnector::new(), config, &name).map_err(anyhow_box)?;
            builder.connect_with(addr, connector).await
        }
        (Target::Unix(path), None) => builder.connect_with(path.clone(), UnixConnector).await,
        (Target::Unix(path), Some((config, name))) => {
            let connector = TlsConnector::new(UnixConnector, config, &name).map_err(anyhow_box)?;
            builder.connect_with(path.clone(), connector).await
        }
        (Target::Upgrade(uri), None) => {
            builder
                .connect_with(uri.clone(), UpgradeConnector::new())
                .await
        }
        (Target::Upgrade(uri), Some((config, name))) => {
            let tls = TlsConnector::new(TcpConnector::new(), config, &name).map_err(anyhow_box)?;
            builder
                .connect_with(uri.clone(), UpgradeConnector::with_connector(tls))
                .await
        }
    };
    connected.with_context(|| format!("cannot connect to {addr}"))
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?;
    addrs
        .next()
        .ok_or_else(|| anyhow!("{host} resolved to no address"))
}

fn anyhow_box(e: towerpc::BoxError) -> anyhow::Error {
    anyhow!(e)
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn tls_config(opts: &ConnectOpts) -> Result<Arc<rustls::ClientConfig>> {
    let ca = match &opts.ca {
        Some(path) => read(path, "--ca")?,
        None => system_roots()?,
    };
    let config = match (&opts.cert, &opts.key) {
        (Some(cert), Some(key)) => {
            tls::config::client_with_identity(&ca, &read(cert, "--cert")?, &read(key, "--key")?)
        }
        _ => tls::config::client(&ca),
    };
    config.map_err(|e| anyhow!("TLS configuration: {e}"))
}

/// The system's root certificates, as PEM (what `tls::config::client` takes).
fn system_roots() -> Result<Vec<u8>> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        bail!("no system root certificates found; give the server's CA with --ca FILE");
    }
    let mut pem = Vec::new();
    for cert in found.certs {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.extend_from_slice(chunk);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Target::parse("127.0.0.1:7100").unwrap(),
            Target::Tcp {
                host: "127.0.0.1".into(),
                port: 7100
            }
        );
        assert_eq!(
            Target::parse("[::1]:80").unwrap(),
            Target::Tcp {
                host: "::1".into(),
                port: 80
            }
        );
        assert_eq!(
            Target::parse("unix:/tmp/s").unwrap(),
            Target::Unix("/tmp/s".into())
        );
        assert!(matches!(
            Target::parse("https://h/towerpc").unwrap(),
            Target::Upgrade(_)
        ));
        assert!(Target::parse("localhost").is_err());
        assert!(Target::parse("h:port").is_err());
        assert!(Target::parse(":80").is_err());
        assert!(Target::parse("unix:").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }
}
