//! A connection's idle timeout and keepalive PINGs (PROTOCOL.md §9, §11), and when a quiet
//! connection lets go of its buffers, on one timer that is never reset per frame: the reader
//! only notes when frames and requests arrive, and the timer checks those notes when it fires.

use std::time::Duration;

use tokio::time::Instant;

/// How long a connection goes without a frame before it lets go of its buffers (one second):
/// the read buffer (64 KiB) and the writer's two batch buffers, each as large as the largest
/// batch lately. Kept, they made 2,000 connections idle after one 60 KB call each hold 264 MiB,
/// uncounted by any budget; a peer could park the server's memory on as many connections as
/// `max_connections` allows. A busy connection's timer fires once a second for it.
pub(super) const QUIET: Duration = Duration::from_secs(1);

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
    /// No frame for [`QUIET`]: the connection's buffers can go until the next one.
    Quiet,
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
    /// Whether the buffers went since the last frame ([`Due::Quiet`]).
    quiet: bool,
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
            quiet: false,
        }
    }

    /// A frame arrived at `now`; `request` if it held a request.
    pub(super) fn read(&mut self, now: Instant, request: bool) {
        self.last_read = now;
        self.quiet = false;
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
        let quiet = (!self.quiet).then(|| self.last_read + QUIET);
        [ping, idle, quiet]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(far)
    }

    /// The timer fired at `now`; `in_flight` says whether calls are running.
    pub(super) fn fire(&mut self, now: Instant, in_flight: bool) -> Due {
        if let Some(sent) = self.ping_sent {
            if self.last_read >= sent {
                // Something arrived since (or in the same instant): the peer is alive.
                self.ping_sent = None;
            } else if now >= sent + self.timeout {
                return Due::Dead;
            }
        }
        if let Some(idle) = self.idle_timeout {
            if now >= self.last_busy + idle {
                // Busy until now, or a drain is underway: not again until another idle period
                // has passed.
                self.last_busy = now;
                if !in_flight {
                    return Due::Idle;
                }
            }
        }
        if let (None, Some(interval)) = (self.ping_sent, self.interval) {
            if now >= self.last_read + interval {
                self.ping_sent = Some(now);
                return Due::Ping;
            }
        }
        if !self.quiet && now >= self.last_read + QUIET {
            self.quiet = true;
            return Due::Quiet;
        }
        Due::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// `k`, its buffers let go [`QUIET`] after the frame (or start) at `last_read`.
    fn quieted(k: &mut Keepalive, last_read: Instant) {
        assert_eq!(k.next(), last_read + QUIET);
        assert_eq!(k.fire(last_read + QUIET, false), Due::Quiet);
    }

    #[test]
    fn a_quiet_peer_is_pinged_and_closed_if_it_stays_silent() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, Some(10 * S), 2 * S, t0);
        quieted(&mut k, t0);
        assert_eq!(k.next(), t0 + 10 * S);
        assert_eq!(k.fire(t0 + 10 * S, false), Due::Ping);
        assert_eq!(k.next(), t0 + 12 * S);
        assert_eq!(k.fire(t0 + 12 * S, false), Due::Dead);
    }

    #[test]
    fn any_frame_answers_a_ping() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, Some(10 * S), 2 * S, t0);
        quieted(&mut k, t0);
        assert_eq!(k.fire(t0 + 10 * S, false), Due::Ping);
        k.read(t0 + 11 * S, false);
        quieted(&mut k, t0 + 11 * S);
        assert_eq!(k.fire(t0 + 13 * S, false), Due::Nothing);
        assert_eq!(k.next(), t0 + 21 * S);
    }

    #[test]
    fn frames_put_the_ping_off_without_moving_the_timer() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, Some(10 * S), 2 * S, t0);
        quieted(&mut k, t0);
        k.read(t0 + 5 * S, false);
        // The timer, armed for the ping at 10 s, fires then: the buffers go, no ping.
        assert_eq!(k.fire(t0 + 10 * S, false), Due::Quiet);
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
        quieted(&mut k, t0 + 50 * S);
        assert_eq!(k.next(), t0 + 90 * S);
        // A call still running keeps the connection.
        assert_eq!(k.fire(t0 + 90 * S, true), Due::Nothing);
        assert_eq!(k.next(), t0 + 150 * S);
        assert_eq!(k.fire(t0 + 150 * S, false), Due::Idle);
    }

    #[test]
    fn with_no_keepalive_only_the_buffers_are_timed() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, None, 2 * S, t0);
        quieted(&mut k, t0);
        assert_eq!(k.fire(t0 + 1000 * S, false), Due::Nothing);
        assert!(k.next() > t0 + 1000 * S);
    }

    #[test]
    fn a_connection_goes_quiet_once_per_silence() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, None, 2 * S, t0);
        k.read(t0 + S / 2, true);
        // The timer armed at the start fires at 1 s: the frame at 0.5 s put the release off.
        assert_eq!(k.fire(t0 + S, false), Due::Nothing);
        quieted(&mut k, t0 + S / 2);
        assert_eq!(k.fire(t0 + 3 * S, false), Due::Nothing, "already let go");
        k.read(t0 + 4 * S, false);
        quieted(&mut k, t0 + 4 * S);
    }
}
