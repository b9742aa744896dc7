//! Budgets for control messages, which cost the server work but carry none.

use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{PerSecond, MAX_PINGS_PER_SEC, MAX_USELESS_CANCELS_PER_SEC};

/// Control messages cost the server work but carry none, so they are budgeted, the way h2
/// counts resets since CVE-2023-44487 ("rapid reset"): per one-second window a peer may send
/// [`MAX_PINGS_PER_SEC`] pings, and useless cancels (for an id not in flight, or within
/// [`RAPID_CANCEL`] of their request) up to [`MAX_USELESS_CANCELS_PER_SEC`] plus the number of
/// calls answered in that window. An honest client pings only when a reply is overdue and
/// cancels calls that ran a while; a flood of pings, of cancels for ids not in flight, or of
/// (request, cancel) pairs blows the budget and the connection is closed with GOAWAY
/// `RESOURCE_EXHAUSTED`.
#[derive(Debug)]
pub(super) struct Flood {
    pings: PerSecond,
    cancels: PerSecond,
    /// `Conn::answered` when the cancels' window began.
    answered_at_start: u64,
}

/// A cancel this soon after its request counts against the cancel budget.
pub(super) const RAPID_CANCEL: Duration = Duration::from_millis(100);

impl Flood {
    pub(super) fn new(now: Instant) -> Self {
        Flood {
            pings: PerSecond::new(now),
            cancels: PerSecond::new(now),
            answered_at_start: 0,
        }
    }

    /// A ping arrived; `Some(why)` when the peer is past its budget.
    pub(super) fn ping(&mut self, now: Instant) -> Option<&'static str> {
        (!self.pings.admit(now, MAX_PINGS_PER_SEC)).then_some("too many pings")
    }

    /// A useless cancel arrived; `Some(why)` when the peer is past its budget.
    pub(super) fn cancel(&mut self, now: Instant, answered: u64) -> Option<&'static str> {
        if self.cancels.count(now) {
            self.answered_at_start = answered;
        }
        let earned = answered.saturating_sub(self.answered_at_start);
        let allowed = u64::from(MAX_USELESS_CANCELS_PER_SEC) + earned;
        (u64::from(self.cancels.so_far()) > allowed).then_some("too many cancels")
    }
}
