//! The server-wide byte budget (`Server::max_buffered_bytes`): reply bytes queued or being
//! written and request bytes held by running handlers, all connections together.
//!
//! Each connection accounts what it holds into the shared total at the points where its reader
//! or its writer already look at their queues (once per read in the middle of a frame, once
//! per frame read, once per batch taken), so calls pay nothing for it. While the total is over the budget, the readers of connections
//! holding more than an even share stop reading: the connections that hold the most wait, a
//! light (honest) one goes on. Replies of calls already running still arrive while a reader
//! waits; if the total keeps growing to half as much again as the budget, the connections
//! holding more than their share are closed (GOAWAY RESOURCE_EXHAUSTED).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::codec::Limit;

/// How often a reader paused on the budget looks again, besides being woken: bytes are freed in
/// many places (other connections' handlers and writers), not all of which wake it.
pub(super) const RECHECK: Duration = Duration::from_millis(10);

/// The budget shared by every connection of a server.
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    used: AtomicUsize,
    conns: AtomicUsize,
    /// A connection released bytes while the total was over the budget.
    pub(super) freed: Notify,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Budget {
            max,
            used: AtomicUsize::new(0),
            conns: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Bytes accounted by all connections now.
    #[cfg(test)]
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether the total is over the budget.
    pub(super) fn is_over(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.max
    }

    /// Whether a connection holding `mine` must stop reading: the total is over the budget and
    /// it holds more than an even share.
    pub(super) fn over(&self, mine: usize) -> bool {
        self.is_over() && mine > self.share()
    }

    /// Whether a connection holding `mine` must be closed: pausing its reader was not enough
    /// (the replies of calls it already started keep coming, and its client does not read
    /// them), the total is half as much again as the budget, and it holds more than an even
    /// share.
    pub(super) fn must_close(&self, mine: usize) -> bool {
        self.used.load(Ordering::Relaxed) > self.max.saturating_add(self.max / 2)
            && mine > self.share()
    }

    fn share(&self) -> usize {
        self.max / self.conns.load(Ordering::Relaxed).max(1)
    }
}

/// One connection's account in the [`Budget`].
#[derive(Debug)]
pub(super) struct Account {
    held: AtomicUsize,
}

impl Account {
    pub(super) fn open(budget: &Budget) -> Self {
        budget.conns.fetch_add(1, Ordering::Relaxed);
        Account {
            held: AtomicUsize::new(0),
        }
    }

    /// The connection holds `now` bytes: the total moves by the difference.
    pub(super) fn set(&self, budget: &Budget, now: usize) {
        let before = self.held.swap(now, Ordering::AcqRel);
        if before == now {
            return;
        }
        // Wrapping: a decrease adds the two's complement.
        let total = budget
            .used
            .fetch_add(now.wrapping_sub(before), Ordering::AcqRel)
            .wrapping_add(now.wrapping_sub(before));
        if now < before && total.wrapping_add(before - now) > budget.max {
            budget.freed.notify_waiters();
        }
    }

    /// The connection is gone: everything it held is released.
    pub(super) fn close(&self, budget: &Budget) {
        self.set(budget, 0);
        budget.conns.fetch_sub(1, Ordering::Relaxed);
        budget.freed.notify_waiters();
    }
}

/// The memory all connections' stream compression may take (`Server::max_compression_bytes`).
///
/// Each compressed connection reserves its state when it is negotiated, for its whole life,
/// counted at what the peer can make it hold, not at what it holds now (a few hundred bytes of
/// zstd fill an 8 MiB window): lz4 and deflate their bound at once, zstd the state with the
/// window towerpc's encoder uses, grown to each frame's declared window before the decoder
/// takes it on. A connection whose reservation does not fit is served uncompressed (the
/// server answers `00`, PROTOCOL.md §3.3); a window that does not fit closes the connection
/// (GOAWAY RESOURCE_EXHAUSTED).
#[derive(Debug)]
pub(crate) struct CompressionBudget(Limit);

impl CompressionBudget {
    pub(crate) fn new(max: usize) -> Self {
        CompressionBudget(Limit::new(max))
    }

    /// Reserves `n` bytes, if they fit; they go back when the reservation is dropped.
    pub(super) fn reserve(self: &Arc<Self>, n: usize) -> Option<Reservation> {
        self.0.claim(n).then(|| Reservation {
            budget: self.clone(),
            n: AtomicUsize::new(n),
        })
    }
}

/// Bytes of a [`CompressionBudget`] held by one connection.
#[derive(Debug)]
pub(super) struct Reservation {
    budget: Arc<CompressionBudget>,
    n: AtomicUsize,
}

impl Reservation {
    /// Grows the reservation to `n` bytes (a larger zstd window), if the budget has room;
    /// `true` when it holds that much now. It never shrinks: the decoder keeps its largest
    /// window.
    #[cfg_attr(not(any(feature = "compression-zstd", test)), allow(dead_code))]
    pub(super) fn grow_to(&self, n: usize) -> bool {
        let held = self.n.load(Ordering::Acquire);
        if n <= held {
            return true;
        }
        if !self.budget.0.claim(n - held) {
            return false;
        }
        self.n.fetch_add(n - held, Ordering::AcqRel);
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.0.give_back(*self.n.get_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heaviest_connection_pauses_and_a_light_one_goes_on() {
        let budget = Budget::new(100);
        let heavy = Account::open(&budget);
        let light = Account::open(&budget);
        heavy.set(&budget, 90);
        light.set(&budget, 5);
        assert!(!budget.over(90));
        heavy.set(&budget, 120);
        assert_eq!(budget.used(), 125);
        assert!(budget.over(120), "over its share of 50");
        assert!(!budget.over(5), "under its share");
        assert!(!budget.must_close(120), "not yet half as much again");
        heavy.set(&budget, 150);
        assert!(budget.must_close(150));
        assert!(!budget.must_close(5));
        heavy.set(&budget, 30);
        assert_eq!(budget.used(), 35);
        assert!(!budget.over(30));
        heavy.close(&budget);
        light.close(&budget);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn compression_reservations_fit_the_budget_and_go_back_when_dropped() {
        let budget = Arc::new(CompressionBudget::new(25));
        let a = budget.reserve(10).expect("fits");
        let b = budget.reserve(10).expect("fits");
        assert!(budget.reserve(10).is_none(), "30 > 25");
        assert!(budget.reserve(usize::MAX).is_none(), "no overflow");
        let c = budget.reserve(5).expect("exactly the budget");
        drop(a);
        let d = budget.reserve(10).expect("a's bytes came back");
        drop((b, c, d));
        assert_eq!(budget.0.used(), 0);
    }

    #[test]
    fn a_reservation_grows_while_the_budget_has_room_and_gives_all_back() {
        let budget = Arc::new(CompressionBudget::new(30));
        let a = budget.reserve(10).unwrap();
        let b = budget.reserve(10).unwrap();
        assert!(a.grow_to(15), "5 more fit");
        assert!(a.grow_to(12), "less than it holds: nothing to take");
        assert!(!b.grow_to(16), "6 more do not");
        assert_eq!(budget.0.used(), 25);
        drop(a);
        assert!(b.grow_to(16));
        drop(b);
        assert_eq!(budget.0.used(), 0);
    }
}
