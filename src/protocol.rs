//! Protocol rules both ends share, next to the codec: the preface negotiation (PROTOCOL.md §3),
//! the mapping between [`Status`] and the ERROR and GOAWAY messages (§5.3, §5.6, §10), and the
//! budgets of control messages (§11). The client and the server engines call these rather than
//! each keeping its own copy.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::codec::{CodecError, Compression, Message, Preface, Role};
use crate::error::{Code, Status};

/// Why a peer's preface is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PrefaceRefusal {
    /// It came from the wrong side.
    Role,
    /// It speaks another protocol version. A server still answers with its own preface, so
    /// that the client learns what it speaks (§13).
    Version(u8),
    /// A server chose a compression the client did not offer, or more than one.
    NotOffered,
    /// A server chose a compression this build lacks.
    Unknown,
}

impl std::fmt::Display for PrefaceRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefaceRefusal::Role => f.write_str("peer preface is from the wrong side"),
            PrefaceRefusal::Version(v) => {
                write!(f, "unsupported version: peer speaks protocol version {v}")
            }
            PrefaceRefusal::NotOffered => {
                f.write_str("server chose a compression that was not offered")
            }
            PrefaceRefusal::Unknown => f.write_str("server chose a compression this build lacks"),
        }
    }
}

/// A server's answer to a client's preface: its own preface, with the compression it chose
/// from the client's offer (the first of `accepted` offered, or none).
pub(crate) fn answer_client(
    client: &Preface,
    max_frame_len: usize,
    accepted: &[Compression],
) -> Result<(Preface, Option<Compression>), (Preface, PrefaceRefusal)> {
    let mut ours = Preface::new(Role::Server, max_frame_len);
    if client.role != Role::Client {
        return Err((ours, PrefaceRefusal::Role));
    }
    if client.version != ours.version {
        return Err((ours, PrefaceRefusal::Version(client.version)));
    }
    let compression = Compression::choose(accepted, client.compression);
    ours.compression = compression.map_or(0, Compression::bit);
    Ok((ours, compression))
}

/// A client's check of the server's answer to its preface `ours`: the compression the server
/// chose, which must be one offered.
pub(crate) fn check_server(
    ours: &Preface,
    server: &Preface,
) -> Result<Option<Compression>, PrefaceRefusal> {
    if server.version != ours.version {
        return Err(PrefaceRefusal::Version(server.version));
    }
    if server.role != Role::Server {
        return Err(PrefaceRefusal::Role);
    }
    match server.compression {
        0 => Ok(None),
        bit if bit & ours.compression == bit && bit.count_ones() == 1 => Compression::from_bit(bit)
            .map(Some)
            .ok_or(PrefaceRefusal::Unknown),
        _ => Err(PrefaceRefusal::NotOffered),
    }
}

/// The ERROR message that answers request `id` with `status`. A message longer than the
/// field allows is cut, on a character boundary so that it stays UTF-8.
pub(crate) fn error_message(id: u32, status: &Status) -> Message {
    let mut text = status.message().as_bytes();
    if text.len() > u16::MAX as usize {
        let mut end = u16::MAX as usize;
        while !status.message().is_char_boundary(end) {
            end -= 1;
        }
        text = &text[..end];
    }
    Message::Error {
        id,
        code: status.code().as_u16(),
        message: Bytes::copy_from_slice(text),
        details: status.details().clone(),
    }
}

/// The status an ERROR message carries.
pub(crate) fn error_status(code: u16, message: &[u8], details: Bytes) -> Status {
    Status::new(
        Code::from_u16(code),
        String::from_utf8_lossy(message).into_owned(),
    )
    .with_details(details)
}

/// The GOAWAY that closes a connection over a broken protocol rule.
pub(crate) fn goaway_protocol(e: &CodecError) -> Message {
    Message::GoAway {
        code: e.wire_code(),
        reason: Bytes::from(e.to_string()),
    }
}

/// PINGs a peer may send per second before the connection is closed with GOAWAY
/// RESOURCE_EXHAUSTED "too many pings" (PROTOCOL.md §11): a server's budget for each client,
/// and a client's for its server.
pub(crate) const MAX_PINGS_PER_SEC: u32 = 100;

/// Useless CANCELs (for an id not in flight, or within 100 ms of their request) a client may
/// send per second beyond the calls answered in that second, before a server closes the
/// connection with GOAWAY RESOURCE_EXHAUSTED "too many cancels" (PROTOCOL.md §11).
pub(crate) const MAX_USELESS_CANCELS_PER_SEC: u32 = 1000;

/// CANCELs a client sends per second at most; past it a given-up call's CANCEL is left out
/// (it is a hint, PROTOCOL.md §8: the server runs the handler on and its reply is dropped).
/// Half the server's allowance for useless ones: the two sides' one-second windows do not
/// line up, and any second of the server's overlaps at most two of the client's, so a client
/// within this never makes a server count more than [`MAX_USELESS_CANCELS_PER_SEC`], however
/// its CANCELs fall. A client that gives up calls that fast (a stuck server, a caller that
/// drops calls in bulk) would otherwise have the connection closed, and every other call on
/// it failed, for honest CANCELs.
pub(crate) const MAX_CANCELS_PER_SEC: u32 = MAX_USELESS_CANCELS_PER_SEC / 2;

/// Events counted in one-second windows against a budget: the budgets of control messages
/// (PROTOCOL.md §11), kept by each side for what its peer sends and by a client for the
/// CANCELs it sends. A window starts with the first event after the last one ended.
#[derive(Debug)]
pub(crate) struct PerSecond {
    window: Instant,
    count: u32,
}

impl PerSecond {
    pub(crate) fn new(now: Instant) -> Self {
        PerSecond {
            window: now,
            count: 0,
        }
    }

    /// Counts an event at `now`; returns whether it started a new window.
    pub(crate) fn count(&mut self, now: Instant) -> bool {
        let rolled = now.duration_since(self.window) >= Duration::from_secs(1);
        if rolled {
            *self = PerSecond::new(now);
        }
        self.count = self.count.saturating_add(1);
        rolled
    }

    /// Events counted in the current window, the last one included.
    pub(crate) fn so_far(&self) -> u32 {
        self.count
    }

    /// Counts an event at `now`; returns whether it is within `max` for its window.
    pub(crate) fn admit(&mut self, now: Instant, max: u32) -> bool {
        self.count(now);
        self.count <= max
    }
}

/// The GOAWAY with `code` and `reason`: OK starts a graceful close (§10.1), any other code
/// closes the connection.
pub(crate) fn goaway(code: u16, reason: &'static str) -> Message {
    Message::GoAway {
        code,
        reason: Bytes::from_static(reason.as_bytes()),
    }
}

/// The status a closing GOAWAY (code not OK) carries.
pub(crate) fn goaway_status(code: u16, reason: &[u8]) -> Status {
    Status::new(
        Code::from_u16(code),
        String::from_utf8_lossy(reason).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::code;

    #[tokio::test(start_paused = true)]
    async fn a_budget_is_counted_per_second_from_the_first_event_after_the_last_window() {
        let mut pings = PerSecond::new(Instant::now());
        for _ in 0..MAX_PINGS_PER_SEC {
            assert!(pings.admit(Instant::now(), MAX_PINGS_PER_SEC));
        }
        assert!(!pings.admit(Instant::now(), MAX_PINGS_PER_SEC), "one past");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(pings.count(Instant::now()), "a new window");
        assert_eq!(pings.so_far(), 1);
        for _ in 1..MAX_PINGS_PER_SEC {
            assert!(
                pings.admit(Instant::now(), MAX_PINGS_PER_SEC),
                "a new second"
            );
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!pings.count(Instant::now()), "still that window");
        assert!(
            !pings.admit(Instant::now(), MAX_PINGS_PER_SEC),
            "still that second"
        );
    }

    #[test]
    fn server_answers_with_the_first_accepted_compression_offered() {
        let client = Preface::new(Role::Client, 1 << 20);
        let (ours, chosen) = answer_client(&client, 1 << 20, &[]).unwrap();
        assert_eq!(
            (ours.role, ours.compression, chosen),
            (Role::Server, 0, None)
        );
        let mut old = client;
        old.version = 9;
        let (ours, why) = answer_client(&old, 1 << 20, &[]).unwrap_err();
        assert_eq!(why, PrefaceRefusal::Version(9));
        assert_eq!(ours.version, crate::codec::PROTOCOL_VERSION);
        let server = Preface::new(Role::Server, 1 << 20);
        assert_eq!(
            answer_client(&server, 1 << 20, &[]).unwrap_err().1,
            PrefaceRefusal::Role
        );
    }

    #[test]
    fn client_refuses_a_compression_it_did_not_offer() {
        let ours = Preface::new(Role::Client, 1 << 20);
        let mut server = Preface::new(Role::Server, 1 << 20);
        assert_eq!(check_server(&ours, &server), Ok(None));
        server.compression = 0x01;
        assert_eq!(
            check_server(&ours, &server),
            Err(PrefaceRefusal::NotOffered)
        );
        let mut offering = ours;
        offering.compression = 0x03;
        server.compression = 0x03;
        assert_eq!(
            check_server(&offering, &server),
            Err(PrefaceRefusal::NotOffered)
        );
        let client_side = Preface::new(Role::Client, 1 << 20);
        assert_eq!(check_server(&ours, &client_side), Err(PrefaceRefusal::Role));
    }

    #[test]
    fn errors_round_trip_and_long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(40_000); // 80,000 bytes
        let status = Status::new(Code::NotFound, long).with_details(Bytes::from_static(b"d"));
        let Message::Error {
            id,
            code,
            message,
            details,
        } = error_message(7, &status)
        else {
            panic!("not an ERROR");
        };
        assert_eq!(id, 7);
        assert!(message.len() <= u16::MAX as usize);
        assert!(std::str::from_utf8(&message).is_ok());
        let back = error_status(code, &message, details);
        assert_eq!(back.code(), Code::NotFound);
        assert_eq!(&back.details()[..], b"d");
        assert_eq!(goaway_status(code::REFUSED, b"bye").code(), Code::Refused);
    }
}
