//! A server connection's handshake, on the connection's own task and under one deadline: TLS,
//! the `on_connect` hook and the preface exchange (PROTOCOL.md §3), then the connection proper.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::budget::Reservation;
use super::Config;
use crate::codec::{Compression, Preface};
use crate::conn::{read_preface, WindowGate};
use crate::error::{Error, Kind};
use crate::protocol::PrefaceRefusal;
use crate::stats::{Counters, CountingIo};
use crate::transport::{ConnectInfo, Connected};
use crate::{BoxError, Request, Response};

/// Serves one connection. `svc` is this connection's own stack: the user's layers around the
/// concurrency limits around the user's service.
pub(super) async fn run<S, IO>(
    io: IO,
    svc: S,
    config: Arc<Config>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) where
    S: Service<Request, Response = Response> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
{
    let info = io.connect_info();
    // Counted beneath TLS and compression: the stats are what crossed the wire.
    let io = CountingIo::new(io, counters.clone());
    // The whole handshake (TLS, hook, preface) runs on this connection's task under one bound:
    // a peer that sends nothing, or a ClientHello a byte a second, costs a timer here and
    // never holds up the accept loop.
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let handoff = Handoff {
        info,
        deadline,
        svc,
        config,
        counters,
        shutdown,
    };
    #[cfg(feature = "tls")]
    if let Some(acceptor) = handoff.config.tls.clone() {
        // Boxed: a TLS connection's state (rustls's, inline in its futures) is several KB,
        // which every plain connection's task would reserve too (8 KB a task instead of 3).
        return Box::pin(with_tls(acceptor, io, handoff)).await;
    }
    established(io, handoff).await
}

/// What a connection's handshake carries through to the connection proper.
struct Handoff<S> {
    info: ConnectInfo,
    /// The handshake's one bound.
    deadline: tokio::time::Instant,
    svc: S,
    config: Arc<Config>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
}

/// The TLS handshake, then the rest over TLS.
#[cfg(feature = "tls")]
async fn with_tls<S, IO>(acceptor: tokio_rustls::TlsAcceptor, io: IO, mut handoff: Handoff<S>)
where
    S: Service<Request, Response = Response> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let accept = acceptor.accept(io);
    let tls = match handshake_step(handoff.deadline, "TLS handshake", accept).await {
        Ok(tls) => tls,
        Err(err) => return refused(&handoff.config, &handoff.counters, &handoff.info, err),
    };
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
    handoff.info = handoff.info.with_peer_certificates(certs);
    established(tls, handoff).await
}

/// The rest of the handshake (the hook, the prefaces), then the connection proper.
async fn established<S, IO>(mut io: IO, handoff: Handoff<S>)
where
    S: Service<Request, Response = Response> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // The reservation is held until the connection is over (and by the zstd reader's gate).
    let Some((peer, compression, reservation)) = negotiate(
        &mut io,
        &handoff.info,
        handoff.deadline,
        &handoff.config,
        &handoff.counters,
    )
    .await
    else {
        return;
    };
    let gate = window_gate(compression, reservation.as_ref());
    super::connection::serve(
        io,
        handoff.info,
        peer,
        compression,
        gate,
        handoff.svc,
        handoff.config,
        handoff.counters,
        handoff.shutdown,
    )
    .await;
    drop(reservation);
}

/// Runs one step of the handshake under the connection's handshake deadline: its failure, or
/// the deadline passing first, is a handshake error.
async fn handshake_step<T, E>(
    deadline: tokio::time::Instant,
    what: &'static str,
    step: impl Future<Output = std::result::Result<T, E>>,
) -> std::result::Result<T, Error>
where
    E: Into<BoxError>,
{
    match tokio::time::timeout_at(deadline, step).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::new(Kind::Handshake).with(e)),
        Err(_) => Err(Error::new(Kind::Handshake).with(format!("{what} timed out"))),
    }
}

/// Counts and reports a connection refused during its handshake.
fn refused(config: &Config, counters: &Counters, info: &ConnectInfo, err: Error) {
    Counters::inc(&counters.accept_errors);
    tracing::debug!(peer = ?info.remote_addr(), error = %err, "connection refused");
    if let Some(report) = &config.on_connection_error {
        report(info, &err);
    }
}

/// The hook and the preface exchange. Returns the client's preface and the compression chosen,
/// or `None` when the connection was refused (and reported).
async fn negotiate<IO>(
    io: &mut IO,
    info: &ConnectInfo,
    deadline: tokio::time::Instant,
    config: &Config,
    counters: &Counters,
) -> Option<(Preface, Option<Compression>, Option<Arc<Reservation>>)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = async {
        if let Some(hook) = &config.on_connect {
            hook(info.clone()).await?;
        }
        read_preface(io).await.map_err(BoxError::from)
    };
    let peer = match handshake_step(deadline, "handshake", handshake).await {
        Ok(p) => p,
        Err(err) => {
            refused(config, counters, info, err);
            return None;
        }
    };
    let (mut ours, mut compression) =
        match crate::protocol::answer_client(&peer, config.max_frame_len, &config.compression) {
            Ok(answer) => answer,
            Err((ours, why)) => {
                if let PrefaceRefusal::Version(_) = why {
                    // Tell the client what we speak, then hang up.
                    let _ = io.write_all(&ours.to_bytes()).await;
                    let _ = io.shutdown().await;
                }
                let err = Error::new(Kind::Handshake).with(why.to_string());
                refused(config, counters, info, err);
                return None;
            }
        };
    // The compression state's bound, reserved for the connection's life; served plain when
    // it does not fit (see `Server::max_compression_bytes`).
    let reservation = compression.and_then(|c| {
        let reserved = config.compression_budget.reserve(c.memory_at_start());
        reserved.map(Arc::new)
    });
    if reservation.is_none() && compression.take().is_some() {
        tracing::debug!(peer = ?info.remote_addr(), "compression budget spent: served uncompressed");
        ours.compression = 0;
    }
    if io.write_all(&ours.to_bytes()).await.is_err() {
        Counters::inc(&counters.accept_errors);
        return None;
    }
    Some((peer, compression, reservation))
}

/// The zstd reader's gate: each frame's window grows the connection's reservation first (see
/// `Server::max_compression_bytes`). Other algorithms reserve their bound at once.
fn window_gate(
    compression: Option<Compression>,
    reservation: Option<&Arc<Reservation>>,
) -> Option<WindowGate> {
    match (compression, reservation) {
        #[cfg(feature = "compression-zstd")]
        (Some(Compression::Zstd), Some(reservation)) => {
            let reservation = reservation.clone();
            Some(Box::new(move |window| {
                reservation.grow_to(crate::codec::zstd_memory(window))
            }))
        }
        _ => None,
    }
}
