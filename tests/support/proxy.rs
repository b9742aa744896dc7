//! A fault-injecting TCP proxy on 127.0.0.1:0: it forwards each accepted connection to an
//! upstream address and, per direction, delays, splits into small chunks, stalls, half-closes,
//! resets or corrupts the byte stream. netem's job, in the test support code.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What happens to the bytes of one direction. Offsets count the direction's bytes from the
/// start of the connection (prefaces included).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Forward at most this many bytes per write (1: byte by byte).
    pub chunk: Option<usize>,
    /// Wait this long before each write.
    pub delay: Option<Duration>,
    /// Forward nothing more once this many bytes went through (the connection stays open).
    pub stall_after: Option<u64>,
    /// Close this direction's write side (a FIN, a half-close) once this many bytes went
    /// through.
    pub half_close_after: Option<u64>,
    /// Reset the whole connection (RST both ways) once this many bytes went through.
    pub reset_after: Option<u64>,
    /// Flip every bit of the byte at this offset.
    pub corrupt_at: Option<u64>,
}

impl Faults {
    fn none(&self) -> bool {
        self.stall_after.is_none()
            && self.half_close_after.is_none()
            && self.reset_after.is_none()
            && self.corrupt_at.is_none()
    }
}

/// A running proxy; dropping it stops accepting (connections already made run on).
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Proxies to `upstream` with `to_server` applied to what clients send and `to_client` to
    /// what the server sends. Only the first `faulty` connections get the faults that break a
    /// connection (stall, half-close, reset, corruption); chunking and delays apply to all.
    pub async fn start(
        upstream: SocketAddr,
        to_server: Faults,
        to_client: Faults,
        faulty: usize,
    ) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let n = count.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let keep = |f: &Faults| {
                    if n < faulty {
                        f.clone()
                    } else {
                        Faults {
                            chunk: f.chunk,
                            delay: f.delay,
                            ..Faults::default()
                        }
                    }
                };
                tokio::spawn(connection(
                    client,
                    server,
                    keep(&to_server),
                    keep(&to_client),
                ));
            }
        });
        Proxy {
            addr,
            accepted,
            task,
        }
    }
}

/// What ended one direction.
enum Ended {
    /// EOF or an error: pass the close on.
    Closed,
    /// Reset the connection.
    Reset,
}

async fn connection(client: TcpStream, server: TcpStream, up: Faults, down: Faults) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let resets = up.reset_after.is_some() || down.reset_after.is_some();
    if resets {
        // Closing with a zero linger sends RST instead of FIN (and does not block).
        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
        let _ = socket2::SockRef::from(&server).set_linger(Some(Duration::ZERO));
    }
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut upward = tokio::spawn(pump(cr, sw, up));
    let mut downward = tokio::spawn(pump(sr, cw, down));
    // A reset in either direction drops all four halves at once; otherwise each direction
    // ends on its own (a half-close stays half).
    let first = tokio::select! {
        r = &mut upward => r,
        r = &mut downward => r,
    };
    if let Ok(Ended::Reset) = first {
        upward.abort();
        downward.abort();
        return;
    }
    let _ = upward.await;
    let _ = downward.await;
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, faults: Faults) -> Ended {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent: u64 = 0;
    let plain = faults.none();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Ended::Closed;
            }
            Ok(n) => n,
        };
        let mut data = &mut buf[..n];
        while !data.is_empty() {
            let mut len = faults.chunk.unwrap_or(data.len()).min(data.len());
            if !plain {
                // Stop each write at the next offset where something happens.
                for at in [
                    faults.stall_after,
                    faults.half_close_after,
                    faults.reset_after,
                ]
                .into_iter()
                .flatten()
                {
                    if at > sent && at - sent < len as u64 {
                        len = (at - sent) as usize;
                    }
                }
                if faults.stall_after == Some(sent) {
                    // Hold the connection open, forwarding nothing, until the other side goes.
                    std::future::pending::<()>().await;
                }
                if faults.half_close_after == Some(sent) {
                    let _ = to.shutdown().await;
                    // Keep reading (and dropping) so the sender is not blocked.
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    return Ended::Closed;
                }
                if faults.reset_after == Some(sent) {
                    return Ended::Reset;
                }
                if let Some(at) = faults.corrupt_at {
                    if at >= sent && at < sent + len as u64 {
                        data[(at - sent) as usize] ^= 0xFF;
                    }
                }
            }
            if let Some(delay) = faults.delay {
                tokio::time::sleep(delay).await;
            }
            if to.write_all(&data[..len]).await.is_err() {
                return Ended::Closed;
            }
            sent += len as u64;
            data = &mut data[len..];
        }
    }
}
