//! A connection's idle timeout and keepalive PINGs (PROTOCOL.md §9, §11), on one timer that is
//! never reset per frame: the reader only notes when frames and requests arrive, and the timer
//! checks those notes when it fires.

use std::time::Duration;

use tokio::time::Instant;

/// What the timer asks the connection to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Nothing yet; the timer was moved on.
    Nothing,
    /// Quiet for the keepalive interval: send a PING.
    Ping,
    /// A PING went unanswered (nothing arrived) for the keepalive timeout: the peer is gone.
    Dead,
    /// Nothing in flight and no request for the idle timeout: close gracefully.
    Idle,
}

/// The settings and the notes.
#[derive(Debug)]
pub(super) struct Keepalive {
    idle_timeout: Option<Duration>,
    interval: Option<Duration>,
    timeout: Duration,
    /// When the last frame (of any kind) arrived.
    last_read: Instant,
    /// When the last request arrived, or the last call was seen in flight.
    last_busy: Instant,
    /// When our PING went out, while it is unanswered.
    ping_sent: Option<Instant>,
}

impl Keepalive {
    pub(super) fn new(
        idle_timeout: Option<Duration>,
        interval: Option<Duration>,
        timeout: Duration,
        now: Instant,
    ) -> Self {
        Keepalive {
            idle_timeout,
            interval,
            timeout,
            last_read: now,
            last_busy: now,
            ping_sent: None,
        }
    }

    /// Whether there is anything to time at all.
    pub(super) fn enabled(&self) -> bool {
        self.idle_timeout.is_some() || self.interval.is_some()
    }

    /// A frame arrived at `now`; `request` if it held a request.
    pub(super) fn read(&mut self, now: Instant, request: bool) {
        self.last_read = now;
        if request {
            self.last_busy = now;
        }
    }

    /// When the timer should next fire.
    pub(super) fn next(&self) -> Instant {
        let far = self.last_read + Duration::from_secs(86_400 * 365);
        let ping = match (self.ping_sent, self.interval) {
            (Some(sent), _) => Some(sent + self.timeout),
            (None, Some(interval)) => Some(self.last_read + interval),
            (None, None) => None,
        };
        let idle = self.idle_timeout.map(|t| self.last_busy + t);
        [ping, idle].into_iter().flatten().min().unwrap_or(far)
    }

    /// The timer fired at `now`; `in_flight` says whether calls are running.
    pub(super) fn fire(&mut self, now: Instant, in_flight: bool) -> Due {
        if in_flight {
            self.last_busy = now;
        }
        if let Some(sent) = self.ping_sent {
            if self.last_read >= sent {
                // Something arrived since (or in the same instant): the peer is alive.
                self.ping_sent = None;
            } else if now >= sent + self.timeout {
                return Due::Dead;
            }
        }
        if let Some(idle) = self.idle_timeout {
            if !in_flight && now >= self.last_busy + idle {
                // Not again until another idle period has passed (a drain is underway).
                self.last_busy = now;
                return Due::Idle;
            }
        }
        if let (None, Some(interval)) = (self.ping_sent, self.interval) {
            if now >= self.last_read + interval {
                self.ping_sent = Some(now);
                return Due::Ping;
            }
        }
        Due::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_quiet_peer_is_pinged_and_closed_if_it_stays_silent() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, Some(10 * S), 2 * S, t0);
        assert_eq!(k.next(), t0 + 10 * S);
        assert_eq!(k.fire(t0 + 10 * S, false), Due::Ping);
        assert_eq!(k.next(), t0 + 12 * S);
        assert_eq!(k.fire(t0 + 12 * S, false), Due::Dead);
    }

    #[test]
    fn any_frame_answers_a_ping() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, Some(10 * S), 2 * S, t0);
        assert_eq!(k.fire(t0 + 10 * S, false), Due::Ping);
        k.read(t0 + 11 * S, false);
        assert_eq!(k.fire(t0 + 12 * S, false), Due::Nothing);
        assert_eq!(k.next(), t0 + 21 * S);
    }

    #[test]
    fn frames_put_the_ping_off_without_moving_the_timer() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, Some(10 * S), 2 * S, t0);
        k.read(t0 + 5 * S, false);
        assert_eq!(k.fire(t0 + 10 * S, false), Due::Nothing);
        assert_eq!(k.next(), t0 + 15 * S);
    }

    #[test]
    fn idle_counts_from_the_last_request_and_not_while_calls_run() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(Some(60 * S), None, 2 * S, t0);
        k.read(t0 + 30 * S, true);
        // Pings and pongs are not work.
        k.read(t0 + 50 * S, false);
        assert_eq!(k.next(), t0 + 90 * S);
        // A call still running keeps the connection.
        assert_eq!(k.fire(t0 + 90 * S, true), Due::Nothing);
        assert_eq!(k.next(), t0 + 150 * S);
        assert_eq!(k.fire(t0 + 150 * S, false), Due::Idle);
    }

    #[test]
    fn disabled_does_nothing() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, None, 2 * S, t0);
        assert!(!k.enabled());
        assert_eq!(k.fire(t0 + 1000 * S, false), Due::Nothing);
    }
}
