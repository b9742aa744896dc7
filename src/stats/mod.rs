//! Statistics: connection counters kept by every client and server out of the box, and
//! per-method call stats as a layer for any tower service.
//!
//! Counters are relaxed atomics bumped on the I/O path; [`Stats`] is a plain snapshot of them,
//! taken with `Client::stats`, `Server::stats` or `ServerHandle::stats`. The names follow
//! gorpc's `ConnStats`. [`RpcStatsLayer`] counts calls per method (calls, errors by code, in
//! flight, a latency histogram) on a client, a server, a dispatcher or an axum route alike.

mod classify;
mod io;
mod layer;

pub use self::classify::{ErrorCode, MethodName};
pub(crate) use self::io::{with_dial_counters, CountingIo, MaybeCounted};
pub use self::layer::{MethodSnapshot, ResponseFuture, RpcStats, RpcStatsLayer, Snapshot};

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        /// A snapshot of a client's or server's counters, summed over all its connections.
        ///
        /// # Examples
        ///
        /// ```
        /// # async fn f(client: towerpc::Client) {
        /// let s = client.stats();
        /// println!("{} calls, {:.3} writes per call", s.calls, s.write_calls as f64 / s.calls.max(1) as f64);
        /// # }
        /// ```
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl Stats {
            /// The difference `self - earlier`, counter by counter (saturating at 0).
            pub fn since(&self, earlier: &Stats) -> Stats {
                Stats { $($name: self.$name.saturating_sub(earlier.$name),)* }
            }
        }
    };
}

counters! {
    /// Bytes read from connections.
    bytes_read,
    /// Bytes written to connections.
    bytes_written,
    /// Read calls on the connections that returned data or an error (one syscall each).
    read_calls,
    /// Write calls on the connections that wrote data or failed (one syscall each).
    write_calls,
    /// Reads that failed.
    read_errors,
    /// Writes that failed, or made no progress within the server's write timeout.
    write_errors,
    /// Outgoing connection attempts (client).
    dials,
    /// Outgoing connection attempts that failed, handshake included (client).
    dial_errors,
    /// Connections accepted (server).
    accepts,
    /// Accepts, or handshakes after accept, that failed (server).
    accept_errors,
    /// Connections closed as soon as they were accepted, `max_connections` being open (server).
    refused_connections,
    /// Frames (batches) written.
    frames_written,
    /// Frames (batches) read.
    frames_read,
    /// Calls completed: on a client, calls that ended; on a server, requests handled.
    calls,
    /// Calls that ended with an error (any kind, timeouts included).
    errors,
    /// Calls that ended because their deadline passed.
    timeouts,
    /// One-way messages sent (client) or handled (server).
    one_way,
    /// Handlers that panicked (server).
    panics,
    /// Connections closed because the peer broke the protocol.
    protocol_errors,
}

impl Counters {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}
