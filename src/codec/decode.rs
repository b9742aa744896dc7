//! The frame decoder: a two-state machine (header, then body) that checks limits before it
//! allocates.

use bytes::{Buf, Bytes, BytesMut};

use super::frame::{
    kind, Frame, Message, ACK_FIXED, CANCEL_FIXED, ERROR_FIXED, FRAGMENT_FIXED, GOAWAY_FIXED,
    PING_FIXED, REQUEST_FIXED, RESPONSE_FIXED,
};
use super::{CodecError, ACK_EVERY, FRAME_HEADER_LEN, MAX_METADATA_LEN};

#[derive(Debug, Clone)]
pub(super) struct FrameDecoder {
    pub(super) max_frame_len: usize,
    state: State,
    /// The message arriving in fragments, if one is (PROTOCOL.md §4.1): at most one at a time.
    partial: Option<Partial>,
    /// Fragment data read and not acknowledged yet (the peer's window in use, as far as we
    /// have read).
    unacked: usize,
}

/// A message being reassembled from its fragments: each piece is copied in as it arrives, while
/// it is still in the cache and so that the read buffer it came in is free for the next read
/// at once. The buffer doubles as the pieces come, up to the message's size: memory follows
/// what arrived, never the message's announced size.
#[derive(Debug, Clone)]
struct Partial {
    whole: Vec<u8>,
    /// The message's size, from its fixed part (checked against the limit on arrival).
    total: usize,
}

impl Partial {
    fn new(total: usize) -> Self {
        Partial {
            whole: Vec::new(),
            total,
        }
    }

    fn len(&self) -> usize {
        self.whole.len()
    }

    /// Appends a piece; the caller has checked that it does not run past `total`.
    fn push(&mut self, data: &[u8]) {
        let need = self.whole.len() + data.len();
        if need > self.whole.capacity() {
            let grown = need.max(2 * self.whole.capacity()).min(self.total);
            self.whole.reserve_exact(grown - self.whole.len());
        }
        self.whole.extend_from_slice(data);
    }

    /// The whole message's bytes.
    fn finish(self) -> Bytes {
        Bytes::from(self.whole)
    }

    fn held(&self) -> usize {
        self.whole.capacity()
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Head,
    Body { len: usize, count: u16 },
}

impl FrameDecoder {
    pub(super) fn new(max_frame_len: usize) -> Self {
        FrameDecoder {
            max_frame_len,
            state: State::Head,
            partial: None,
            unacked: 0,
        }
    }

    /// Fragment data to acknowledge now, if enough has been read since the last ACK.
    pub(super) fn take_ack(&mut self) -> Option<u32> {
        if self.unacked < ACK_EVERY {
            return None;
        }
        // An engine takes its ACK after every frame, so this is a few hundred KiB; a codec
        // user that never does acknowledges in `u32`-sized steps.
        let n = self.unacked.min(u32::MAX as usize);
        self.unacked -= n;
        Some(n as u32)
    }

    /// Whether a message is partly reassembled from its fragments.
    pub(super) fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Memory held by the message being reassembled.
    pub(super) fn partial_capacity(&self) -> usize {
        self.partial.as_ref().map_or(0, Partial::held)
    }

    /// Whether a header has been read and its body not yet.
    pub(super) fn in_frame(&self) -> bool {
        matches!(self.state, State::Body { .. })
    }

    /// The next frame. One that held only pieces of a fragmented message has no messages.
    pub(super) fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let (len, count) = match self.state {
            State::Head => match self.decode_head(src)? {
                Some(head) => head,
                None => return Ok(None),
            },
            State::Body { len, count } => (len, count),
        };
        if src.len() < len {
            // Nothing is reserved on the header's word: a peer that announces 16 MiB and sends
            // nothing more must cost no more than what it sent. The reader grows its buffer as
            // the body arrives (doubling, so a large body still takes few reallocations).
            self.state = State::Body { len, count };
            return Ok(None);
        }
        self.state = State::Head;
        let body = src.split_to(len).freeze();
        self.parse_batch(body, count)
            .map(|messages| Some(Frame::new(messages)))
    }

    /// Parses `count` messages that must fill `body` exactly. Fragments are not messages: the
    /// one that completes a message yields it in its place, the others yield nothing.
    fn parse_batch(&mut self, mut body: Bytes, count: u16) -> Result<Vec<Message>, CodecError> {
        let mut messages = Vec::with_capacity(count as usize);
        for _ in 0..count {
            need(&body, 1)?;
            if body[0] == kind::FRAGMENT {
                if let Some(msg) = self.fragment(&mut body)? {
                    messages.push(msg);
                }
            } else {
                messages.push(parse_message(&mut body)?);
            }
        }
        if body.has_remaining() {
            return Err(CodecError::InvalidFrame(
                "bytes left over after the last message",
            ));
        }
        Ok(messages)
    }

    /// Takes one FRAGMENT off `body` and adds it to the message being reassembled; returns the
    /// message once its last piece is in.
    fn fragment(&mut self, body: &mut Bytes) -> Result<Option<Message>, CodecError> {
        need(body, FRAGMENT_FIXED)?;
        body.advance(1);
        let more = match body.get_u8() {
            0 => false,
            1 => true,
            _ => return Err(CodecError::InvalidFrame("fragment flag is not 0 or 1")),
        };
        let len = body.get_u32() as usize;
        if len == 0 {
            return Err(CodecError::InvalidFrame("empty fragment"));
        }
        let mut data = take(body, len)?;
        self.unacked += len;
        let Some(partial) = &mut self.partial else {
            // The first piece: its fixed part says how big the message is, checked now.
            let total = fragmented_len(&data)?;
            if total > self.max_frame_len {
                return Err(CodecError::FrameTooLarge {
                    len: total,
                    max: self.max_frame_len,
                });
            }
            check_piece(data.len(), total, more)?;
            if !more {
                // A message in a single piece: nothing to hold.
                return parse_message(&mut data).map(Some);
            }
            let mut partial = Partial::new(total);
            partial.push(&data);
            self.partial = Some(partial);
            return Ok(None);
        };
        check_piece(partial.len() + data.len(), partial.total, more)?;
        partial.push(&data);
        if more {
            return Ok(None);
        }
        let mut whole = self.partial.take().map(Partial::finish).unwrap_or_default();
        let msg = parse_message(&mut whole)?;
        debug_assert!(whole.is_empty(), "the fixed part gave the exact size");
        Ok(Some(msg))
    }

    fn decode_head(&mut self, src: &mut BytesMut) -> Result<Option<(usize, u16)>, CodecError> {
        if src.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        let flags = src[4];
        let reserved = src[5];
        let count = u16::from_be_bytes([src[6], src[7]]);
        // The limit is checked on the announced length alone, before any memory is reserved or
        // the body is awaited: a peer announcing 4 GiB costs 8 bytes, not 4 GiB.
        if len > self.max_frame_len {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        if flags != 0 {
            return Err(CodecError::InvalidFrame("unknown frame flags"));
        }
        if reserved != 0 {
            return Err(CodecError::InvalidFrame("reserved header byte is not zero"));
        }
        if count == 0 || len == 0 {
            return Err(CodecError::InvalidFrame("empty frame"));
        }
        // Each message is at least 5 bytes: a count that cannot fit is a lie we catch early.
        if (count as usize) * CANCEL_FIXED > len {
            return Err(CodecError::InvalidFrame(
                "message count does not fit the frame length",
            ));
        }
        src.advance(FRAME_HEADER_LEN);
        Ok(Some((len, count)))
    }
}

const PAST_END: CodecError = CodecError::InvalidFrame("fragment runs past the end of its message");
const MORE_AFTER_END: CodecError =
    CodecError::InvalidFrame("fragment completes its message but says more follow");
const ENDS_EARLY: CodecError =
    CodecError::InvalidFrame("last fragment leaves its message incomplete");

/// Whether a piece that brings its message to `have` of `total` bytes may say `more`: it may
/// not run past the end, nor stop short of it, nor say more follow once it is reached.
fn check_piece(have: usize, total: usize, more: bool) -> Result<(), CodecError> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    match (have.cmp(&total), more) {
        (Greater, _) => Err(PAST_END),
        (Equal, true) => Err(MORE_AFTER_END),
        (Less, false) => Err(ENDS_EARLY),
        (Equal, false) | (Less, true) => Ok(()),
    }
}

/// The size of the message whose first piece is `first`, from its fixed part, which the first
/// piece must hold whole; only the four kinds with a body may be sent in fragments.
fn fragmented_len(first: &[u8]) -> Result<usize, CodecError> {
    let fixed = match first[0] {
        kind::REQUEST | kind::ONEWAY => REQUEST_FIXED,
        kind::RESPONSE => RESPONSE_FIXED,
        kind::ERROR => ERROR_FIXED,
        _ => {
            return Err(CodecError::InvalidFrame(
                "only a request, one-way, response or error may be sent in fragments",
            ))
        }
    };
    if first.len() < fixed {
        return Err(CodecError::InvalidFrame(
            "first fragment does not hold its message's fixed part",
        ));
    }
    let u16_at = |i: usize| u16::from_be_bytes([first[i], first[i + 1]]) as usize;
    let u32_at = |i: usize| {
        u32::from_be_bytes([first[i], first[i + 1], first[i + 2], first[i + 3]]) as usize
    };
    // Sums of at most three u32-sized fields: no overflow on 64-bit targets, and saturating
    // elsewhere (the limit check refuses the result either way).
    Ok(match first[0] {
        kind::REQUEST | kind::ONEWAY => REQUEST_FIXED
            .saturating_add(first[9] as usize)
            .saturating_add(u16_at(10))
            .saturating_add(u32_at(12)),
        kind::RESPONSE => RESPONSE_FIXED.saturating_add(u32_at(5)),
        _ => ERROR_FIXED
            .saturating_add(u16_at(7))
            .saturating_add(u32_at(9)),
    })
}

fn need(body: &Bytes, n: usize) -> Result<(), CodecError> {
    if body.len() < n {
        Err(CodecError::InvalidFrame(
            "message runs past the end of the frame",
        ))
    } else {
        Ok(())
    }
}

fn take(body: &mut Bytes, n: usize) -> Result<Bytes, CodecError> {
    need(body, n)?;
    Ok(body.split_to(n))
}

fn utf8(bytes: Bytes, what: &'static str) -> Result<Bytes, CodecError> {
    match std::str::from_utf8(&bytes) {
        Ok(_) => Ok(bytes),
        Err(_) => Err(CodecError::InvalidFrame(what)),
    }
}

fn parse_message(body: &mut Bytes) -> Result<Message, CodecError> {
    need(body, 1)?;
    let kind = body[0];
    match kind {
        kind::REQUEST | kind::ONEWAY => {
            need(body, REQUEST_FIXED)?;
            body.advance(1);
            let id = body.get_u32();
            let timeout_ms = body.get_u32();
            let method_len = body.get_u8() as usize;
            let meta_len = body.get_u16() as usize;
            let body_len = body.get_u32() as usize;
            if method_len == 0 {
                return Err(CodecError::InvalidFrame("empty method name"));
            }
            if meta_len > MAX_METADATA_LEN {
                return Err(CodecError::InvalidFrame("metadata above 16 KiB"));
            }
            let method = utf8(take(body, method_len)?, "method name is not UTF-8")?;
            let metadata = take(body, meta_len)?;
            let payload = take(body, body_len)?;
            if kind == kind::REQUEST {
                if id == 0 {
                    return Err(CodecError::InvalidFrame("request id 0"));
                }
                Ok(Message::Request {
                    id,
                    timeout_ms,
                    method,
                    metadata,
                    body: payload,
                })
            } else {
                if id != 0 {
                    return Err(CodecError::InvalidFrame("one-way message with an id"));
                }
                Ok(Message::OneWay {
                    timeout_ms,
                    method,
                    metadata,
                    body: payload,
                })
            }
        }
        kind::RESPONSE => {
            need(body, RESPONSE_FIXED)?;
            body.advance(1);
            let id = body.get_u32();
            let len = body.get_u32() as usize;
            let payload = take(body, len)?;
            Ok(Message::Response { id, body: payload })
        }
        kind::ERROR => {
            need(body, ERROR_FIXED)?;
            body.advance(1);
            let id = body.get_u32();
            let code = body.get_u16();
            let msg_len = body.get_u16() as usize;
            let details_len = body.get_u32() as usize;
            let message = utf8(take(body, msg_len)?, "error message is not UTF-8")?;
            let details = take(body, details_len)?;
            Ok(Message::Error {
                id,
                code,
                message,
                details,
            })
        }
        kind::CANCEL => {
            need(body, CANCEL_FIXED)?;
            body.advance(1);
            Ok(Message::Cancel { id: body.get_u32() })
        }
        kind::PING | kind::PONG => {
            need(body, PING_FIXED)?;
            body.advance(1);
            let data = body.get_u64();
            Ok(if kind == kind::PING {
                Message::Ping { data }
            } else {
                Message::Pong { data }
            })
        }
        kind::ACK => {
            need(body, ACK_FIXED)?;
            body.advance(1);
            match body.get_u32() {
                0 => Err(CodecError::InvalidFrame("ack of 0 bytes")),
                bytes => Ok(Message::Ack { bytes }),
            }
        }
        kind::GOAWAY => {
            need(body, GOAWAY_FIXED)?;
            body.advance(1);
            let code = body.get_u16();
            let len = body.get_u16() as usize;
            let reason = utf8(take(body, len)?, "goaway reason is not UTF-8")?;
            Ok(Message::GoAway { code, reason })
        }
        _ => Err(CodecError::InvalidFrame("unknown message kind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn head(len: u32, flags: u8, reserved: u8, count: u16) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&[flags, reserved]);
        b.extend_from_slice(&count.to_be_bytes());
        b
    }

    #[test]
    fn oversize_is_rejected_from_the_header_alone() {
        let mut d = FrameDecoder::new(4096);
        let mut src = head(4097, 0, 0, 1);
        let err = d.decode(&mut src).unwrap_err();
        assert!(matches!(
            err,
            CodecError::FrameTooLarge {
                len: 4097,
                max: 4096
            }
        ));
        // Nothing was reserved for the body.
        assert!(src.capacity() < 4096);
    }

    #[test]
    fn max_len_is_accepted_and_waits_for_the_body() {
        let mut d = FrameDecoder::new(4096);
        let mut src = head(4096, 0, 0, 1);
        assert!(d.decode(&mut src).unwrap().is_none());
        assert!(matches!(
            d.state,
            State::Body {
                len: 4096,
                count: 1
            }
        ));
    }

    #[test]
    fn an_announced_body_reserves_nothing() {
        let mut d = FrameDecoder::new(16 << 20);
        let mut src = head(16 << 20, 0, 0, 1);
        let before = src.capacity();
        assert!(d.decode(&mut src).unwrap().is_none());
        assert!(
            src.capacity() <= before,
            "memory reserved on the header's word"
        );
    }

    #[test]
    fn header_checks() {
        for (h, why) in [
            (head(5, 1, 0, 1), "flags"),
            (head(5, 0, 1, 1), "reserved"),
            (head(5, 0, 0, 0), "count 0"),
            (head(0, 0, 0, 1), "len 0"),
            (head(9, 0, 0, 2), "count too big"),
        ] {
            let mut src = h;
            let mut d = FrameDecoder::new(4096);
            assert!(
                matches!(d.decode(&mut src), Err(CodecError::InvalidFrame(_))),
                "{why}"
            );
        }
    }

    #[test]
    fn u32_max_length_is_rejected() {
        let mut d = FrameDecoder::new(16 << 20);
        let mut src = head(u32::MAX, 0, 0, 1);
        assert!(matches!(
            d.decode(&mut src),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    /// A frame holding one FRAGMENT with `data`.
    fn piece(data: &[u8], more: bool) -> BytesMut {
        let mut f = head((FRAGMENT_FIXED + data.len()) as u32, 0, 0, 1);
        f.put_u8(kind::FRAGMENT);
        f.put_u8(more as u8);
        f.put_u32(data.len() as u32);
        f.put_slice(data);
        f
    }

    #[test]
    fn a_message_in_pieces_holds_what_arrived_not_what_it_announced() {
        let body = 1 << 20;
        let mut whole = vec![kind::RESPONSE, 0, 0, 0, 1];
        whole.extend_from_slice(&(body as u32).to_be_bytes());
        whole.extend((0..body).map(|i| i as u8));
        let mut d = FrameDecoder::new(16 << 20);
        let mut arrived = 0;
        let mut got = Vec::new();
        for chunk in whole.chunks(1000) {
            arrived += chunk.len();
            let mut src = piece(chunk, arrived < whole.len());
            let frame = d.decode(&mut src).unwrap().unwrap();
            got.extend(frame.into_messages());
            if arrived < whole.len() {
                let held = d.partial_capacity();
                assert!(
                    held >= arrived && held <= 2 * arrived,
                    "{held} held for {arrived}"
                );
            }
        }
        assert_eq!(d.partial_capacity(), 0);
        let [Message::Response { id: 1, body: b }] = &got[..] else {
            panic!("{got:?}");
        };
        assert_eq!(b[..], whole[RESPONSE_FIXED..]);
    }
}
