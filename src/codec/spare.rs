//! Reassembly buffers used again: a message's buffer comes back when the last handle on its
//! bytes is dropped, and the next message that arrives in fragments is copied into it.
//!
//! A message of several MiB reassembled into a fresh allocation lands in memory the allocator
//! has just mapped, and the kernel faults it in page by page as the pieces are copied in (in
//! the benchmark's mixed cell, 190–240 faults per 4 MiB message on each side); freeing it
//! unmaps it again. A buffer kept for the next message is already there. Measured in that cell
//! (docs/benchmarks.md, session 13, three paired rounds): the 4 MiB calls moved 16–26 % more
//! bytes a second, and the small calls beside them made 7–13 % more calls at a 10 % lower p99.
//!
//! What is kept is bounded: at most [`SPARES`] buffers per connection, each one a message's
//! (so no larger than its max_frame_len), and at most [`MAX_KEPT`] bytes in the whole process,
//! however many connections there are; a buffer is used again only for a message of at least
//! half its size (a small message never pins a large buffer in the hands of its caller); the
//! reader gives what it keeps up when asked ([`Spares::release`]: a server connection over the
//! server's memory budget does); and everything kept goes with the connection. A server's
//! budget does not count these buffers: they belong to no connection's traffic, and counted
//! they would hold other connections' reads back while the idle connection that keeps them
//! reads nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;

/// Most buffers kept per connection for messages to come. One already saved most of the faults
/// in the mixed cell; a second, for when the next message arrives while the one before is
/// still with its handler or caller, saved a little more (4 MiB calls 903–905 → 927–929 MB/s,
/// docs/benchmarks.md, session 13). With ten large calls out at once, each holding a buffer
/// until its handler or caller lets go, two left most messages to grow a fresh buffer by
/// doubling (a copy at each step, `realloc` was 2–3 % of each side's CPU beside 200 KiB calls);
/// eight kept (still under [`MAX_KEPT`] in all): 200 KiB calls +3 to +5 % MB/s, small calls/s
/// −1 to +4 %, in two paired rounds; beside 4 MiB calls, where [`MAX_KEPT`] binds first, −2 to
/// −4 % (session 15, where ACKs every 64 KiB made up for it).
pub(super) const SPARES: usize = 8;

/// Most bytes kept in all, across every connection of the process (servers and clients).
pub(super) const MAX_KEPT: usize = 32 * 1024 * 1024;

/// Bytes kept across the process, against [`MAX_KEPT`].
static KEPT: Limit = Limit::new(MAX_KEPT);

/// A cap on bytes that many holders share: the buffers kept by many decoders here, the
/// compression state of many server connections (`server::budget::CompressionBudget`).
#[derive(Debug)]
pub(crate) struct Limit {
    used: AtomicUsize,
    max: usize,
}

impl Limit {
    pub(crate) const fn new(max: usize) -> Self {
        Limit {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes `n` bytes of the cap, if that many are left.
    pub(crate) fn claim(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&u| u <= self.max)
            })
            .is_ok()
    }

    /// Gives back `n` bytes taken with [`claim`](Self::claim).
    pub(crate) fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes taken now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The buffers kept by one decoder. A clone starts with none of its own: a clone is another
/// connection's decoder.
#[derive(Debug)]
pub(super) struct Spares(Arc<Home>);

/// Where a decoder's buffers come back to.
#[derive(Debug)]
struct Home {
    kept: Mutex<Vec<Vec<u8>>>,
    limit: &'static Limit,
}

impl Home {
    fn lock(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        // Nothing done under the lock can panic halfway; a poisoned lock holds a whole list.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `buf` if there is room for it here and under the limit.
    fn keep(&self, mut buf: Vec<u8>) {
        let mut kept = self.lock();
        if kept.len() < SPARES && self.limit.claim(buf.capacity()) {
            buf.clear();
            kept.push(buf);
        }
    }

    /// Frees every buffer kept; returns whether there were any.
    fn release(&self) -> bool {
        let kept = std::mem::take(&mut *self.lock());
        self.limit
            .give_back(kept.iter().map(Vec::capacity).sum::<usize>());
        !kept.is_empty()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        self.release();
    }
}

impl Default for Spares {
    fn default() -> Self {
        Spares::with_limit(&KEPT)
    }
}

impl Clone for Spares {
    fn clone(&self) -> Self {
        Spares::with_limit(self.0.limit)
    }
}

impl Spares {
    /// Buffers kept under `limit` (the process-wide one, [`MAX_KEPT`], by default).
    pub(super) fn with_limit(limit: &'static Limit) -> Self {
        Spares(Arc::new(Home {
            kept: Mutex::new(Vec::new()),
            limit,
        }))
    }

    /// A kept buffer for a message of `total` bytes, empty: one that holds it and is at most
    /// twice its size, if one is kept.
    pub(super) fn take(&self, total: usize) -> Option<Vec<u8>> {
        let mut kept = self.0.lock();
        let at = kept
            .iter()
            .position(|b| b.capacity() >= total && b.capacity() / 2 <= total)?;
        let buf = kept.swap_remove(at);
        self.0.limit.give_back(buf.capacity());
        Some(buf)
    }

    /// `buf`, holding a whole message, as the message's bytes; `buf` comes back here when they
    /// are dropped, if this decoder is still there and has room for it.
    pub(super) fn lend(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Lent {
            buf,
            home: Arc::downgrade(&self.0),
        })
    }

    /// Memory kept.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.0.lock().iter().map(Vec::capacity).sum()
    }

    /// Frees every buffer kept; returns whether there were any.
    pub(super) fn release(&self) -> bool {
        self.0.release()
    }
}

/// A reassembled message's buffer while its bytes are out ([`Bytes::from_owner`]).
struct Lent {
    buf: Vec<u8>,
    home: Weak<Home>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(home) = self.home.upgrade() {
            home.keep(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spares under a limit of their own, out of the process-wide one's way.
    fn unlimited() -> Spares {
        Spares::with_limit(Box::leak(Box::new(Limit::new(usize::MAX))))
    }

    #[test]
    fn a_buffer_comes_back_when_its_bytes_are_dropped() {
        let spares = unlimited();
        let buf = vec![7u8; 1000];
        let at = buf.as_ptr();
        let bytes = spares.lend(buf);
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(spares.held(), 0, "a slice still holds it");
        drop(part);
        assert_eq!(spares.held(), 1000);
        let again = spares.take(1000).expect("kept");
        assert_eq!(again.as_ptr(), at);
        assert!(again.is_empty());
        assert_eq!(spares.held(), 0);
    }

    #[test]
    fn a_buffer_serves_messages_from_half_its_size_up_to_its_size() {
        let spares = unlimited();
        drop(spares.lend(Vec::with_capacity(1000)));
        assert!(spares.take(1001).is_none(), "too small");
        assert!(spares.take(499).is_none(), "a small message would pin it");
        assert!(spares.take(500).is_some());
    }

    #[test]
    fn at_most_spares_are_kept_and_release_frees_them() {
        let spares = unlimited();
        let out: Vec<Bytes> = (0..SPARES + 2)
            .map(|_| spares.lend(Vec::with_capacity(100)))
            .collect();
        drop(out);
        assert_eq!(spares.held(), SPARES * 100);
        assert!(spares.release());
        assert_eq!(spares.held(), 0);
        assert!(!spares.release());
    }

    #[test]
    fn bytes_outliving_their_decoder_are_freed() {
        let spares = unlimited();
        let bytes = spares.lend(vec![1u8; 100]);
        drop(spares);
        assert_eq!(&bytes[..3], &[1, 1, 1]);
        drop(bytes);
    }

    #[test]
    fn what_all_decoders_keep_stays_under_their_limit() {
        let limit: &'static Limit = Box::leak(Box::new(Limit::new(250)));
        let (a, b) = (Spares::with_limit(limit), Spares::with_limit(limit));
        drop(a.lend(Vec::with_capacity(100)));
        drop(b.lend(Vec::with_capacity(100)));
        drop(b.lend(Vec::with_capacity(100)));
        assert_eq!(a.held() + b.held(), 200, "the third would pass the limit");
        assert!(a.take(100).is_some());
        drop(b.lend(Vec::with_capacity(100)));
        assert_eq!(b.held(), 200, "taken, its room is free again");
        drop(b);
        drop(a.lend(Vec::with_capacity(100)));
        drop(a.lend(Vec::with_capacity(100)));
        assert_eq!(a.held(), 200, "a dropped decoder's room is free again");
    }

    #[test]
    fn a_clone_keeps_its_own() {
        let spares = unlimited();
        drop(spares.lend(Vec::with_capacity(100)));
        let other = spares.clone();
        assert_eq!(other.held(), 0);
        assert_eq!(spares.held(), 100);
    }
}
