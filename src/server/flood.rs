//! Budgets for control messages, which cost the server work but carry none.

use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::MAX_PINGS_PER_SEC;

/// Control messages cost the server work but carry none, so they are budgeted, the way h2
/// counts resets since CVE-2023-44487 ("rapid reset"): per one-second window a peer may send
/// [`MAX_PINGS_PER_SEC`] pings, and useless cancels (for an id not in flight, or within
/// [`RAPID_CANCEL`] of their request) up to [`CANCEL_ALLOWANCE_PER_SEC`] plus the number of
/// calls answered in that window. An honest client pings only when a reply is overdue and
/// cancels calls that ran a while; a flood of pings, of cancels for ids not in flight, or of
/// (request, cancel) pairs blows the budget and the connection is closed with GOAWAY
/// `RESOURCE_EXHAUSTED`.
#[derive(Debug)]
pub(super) struct Flood {
    window: Instant,
    pings: u32,
    cancels: u64,
    /// `Conn::answered` when the window began.
    answered_at_start: u64,
}

/// Cancels a client may send per second beyond the calls answered in that second; only
/// cancels for ids not in flight, or sent within [`RAPID_CANCEL`] of their request, count.
const CANCEL_ALLOWANCE_PER_SEC: u64 = 1000;

/// A cancel this soon after its request counts against the cancel budget.
pub(super) const RAPID_CANCEL: Duration = Duration::from_millis(100);

impl Flood {
    pub(super) fn new(now: Instant) -> Self {
        Flood {
            window: now,
            pings: 0,
            cancels: 0,
            answered_at_start: 0,
        }
    }

    fn roll(&mut self, now: Instant, answered: u64) {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            *self = Flood {
                window: now,
                pings: 0,
                cancels: 0,
                answered_at_start: answered,
            };
        }
    }

    /// A ping arrived; `Some(why)` when the peer is past its budget.
    pub(super) fn ping(&mut self, now: Instant, answered: u64) -> Option<&'static str> {
        self.roll(now, answered);
        self.pings += 1;
        (self.pings > MAX_PINGS_PER_SEC).then_some("too many pings")
    }

    /// A useless cancel arrived; `Some(why)` when the peer is past its budget.
    pub(super) fn cancel(&mut self, now: Instant, answered: u64) -> Option<&'static str> {
        self.roll(now, answered);
        self.cancels += 1;
        let earned = answered.saturating_sub(self.answered_at_start);
        (self.cancels > CANCEL_ALLOWANCE_PER_SEC + earned).then_some("too many cancels")
    }
}
