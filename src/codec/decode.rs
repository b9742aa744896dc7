//! The frame decoder: a two-state machine (header, then body) that checks limits before it
//! allocates.

use bytes::{Buf, Bytes, BytesMut};

use super::frame::{
    kind, Frame, Message, ACK_FIXED, CANCEL_FIXED, ERROR_FIXED, FRAGMENT_FIXED, GOAWAY_FIXED,
    PING_FIXED, REQUEST_FIXED, RESPONSE_FIXED,
};
use super::spare::Spares;
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
    /// FRAGMENTs taken in so far.
    pub(super) fragments: u64,
    /// Buffers of reassembled messages, back from their handlers or callers for the next one.
    spares: Spares,
}

/// A message being reassembled from its fragments: each piece is copied in as it arrives, while
/// it is still in the cache and so that the read buffer it came in is free for the next read
/// at once. The buffer doubles as the pieces come, up to the message's size: memory follows
/// what arrived, never the message's announced size. (A buffer kept from an earlier message,
/// [`Spares`], is used instead when one fits.)
#[derive(Debug, Clone)]
struct Partial {
    whole: Vec<u8>,
    /// The message's size, from its fixed part (checked against the limit on arrival).
    total: usize,
}

impl Partial {
    /// A message of `total` bytes, copied into `spare` if one is given (empty, and able to
    /// hold it all).
    fn new(total: usize, spare: Option<Vec<u8>>) -> Self {
        Partial {
            whole: spare.unwrap_or_default(),
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

    /// The whole message's bytes; its buffer comes back to `spares` once they are dropped.
    fn finish(self, spares: &Spares) -> Bytes {
        spares.lend(self.whole)
    }

    fn held(&self) -> usize {
        self.whole.capacity()
    }
}

/// A frame whose body has arrived and been checked, its messages not taken out yet (with
/// [`FrameDecoder::next_message`]).
#[derive(Debug)]
pub(crate) struct Incoming {
    body: Bytes,
    /// Messages (fragments included) still in `body`.
    left: u16,
    /// The whole body's size: what a message taken out of it as a slice keeps alive.
    len: usize,
}

impl Incoming {
    /// Messages (fragments included) still in the frame.
    pub(crate) fn left(&self) -> usize {
        self.left as usize
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
            fragments: 0,
            spares: Spares::default(),
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

    /// Memory kept for messages to come (buffers of reassembled messages, back from their
    /// handlers or callers).
    #[cfg(test)]
    pub(super) fn spare_capacity(&self) -> usize {
        self.spares.held()
    }

    /// Frees the memory kept for messages to come; returns whether there was any.
    pub(super) fn release_spares(&self) -> bool {
        self.spares.release()
    }

    /// The message being reassembled, as (bytes so far, total), if one is.
    fn progress(&self) -> Option<(usize, usize)> {
        self.partial.as_ref().map(|p| (p.len(), p.total))
    }

    /// Whether a header has been read and its body not yet.
    pub(super) fn in_frame(&self) -> bool {
        matches!(self.state, State::Body { .. })
    }

    /// The next frame, whole and checked: every message in it is well formed and its
    /// fragments follow on from the message being reassembled, so a reader acts on none of a
    /// frame's messages unless it may act on all of them. The messages are taken out one at a
    /// time with [`next_message`](Self::next_message): no collection of them is built, so a
    /// frame of 65,535 five-byte messages costs the bytes that came, not 65,535 decoded ones.
    pub(super) fn decode_frame(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<Incoming>, CodecError> {
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
        self.check_batch(&src[..len], count)?;
        Ok(Some(Incoming {
            body: src.split_to(len).freeze(),
            left: count,
            len,
        }))
    }

    /// The next message of `frame`, `None` once it has no more. A FRAGMENT is not a message:
    /// the one that completes a message yields it in its place, the others nothing. Only a
    /// message reassembled from fragments can fail here (its whole is seen only once its last
    /// piece is in); everything else was checked with the frame.
    pub(super) fn next_message(
        &mut self,
        frame: &mut Incoming,
    ) -> Result<Option<Message>, CodecError> {
        while frame.left > 0 {
            frame.left -= 1;
            if frame.body[0] == kind::FRAGMENT {
                if let Some(msg) = self.fragment(&mut frame.body)? {
                    return Ok(Some(msg));
                }
            } else {
                let whole = (frame.len > DETACH_ABOVE).then(|| frame.body.clone());
                let msg = parse_message(&mut frame.body);
                if let Some(whole) = whole {
                    let used = whole.len() - frame.body.len();
                    if used < frame.len / DETACH_SHARE {
                        // A small message must not keep a large frame's buffer alive: budgets
                        // count the message, not the frame. A copy of its bytes, parsed again.
                        let mut own = Bytes::copy_from_slice(&whole[..used]);
                        return Ok(Some(parse_message(&mut own)));
                    }
                }
                return Ok(Some(msg));
            }
        }
        Ok(None)
    }

    /// The next frame with all its messages (the [`Decoder`](tokio_util::codec::Decoder)
    /// behind [`FrameCodec`](super::FrameCodec)).
    pub(super) fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(mut frame) = self.decode_frame(src)? else {
            return Ok(None);
        };
        let mut messages = Vec::with_capacity(frame.left as usize);
        while let Some(msg) = self.next_message(&mut frame)? {
            messages.push(msg);
        }
        Ok(Some(Frame::new(messages)))
    }

    /// Checks that `count` messages fill `body` exactly, each well formed, and that its
    /// fragments carry on the message being reassembled (and start, continue or end one
    /// properly). Allocates nothing and touches no state: the frame is taken apart afterwards.
    fn check_batch(&self, body: &[u8], count: u16) -> Result<(), CodecError> {
        let mut rest = body;
        let mut partial = self.progress();
        for _ in 0..count {
            let used = if rest.first() == Some(&kind::FRAGMENT) {
                let piece = check_fragment(rest, partial, self.max_frame_len)?;
                partial = piece.after;
                piece.used
            } else {
                check_message(rest)?
            };
            rest = &rest[used..];
        }
        if !rest.is_empty() {
            return Err(CodecError::InvalidFrame(
                "bytes left over after the last message",
            ));
        }
        Ok(())
    }

    /// Takes one FRAGMENT (checked with its frame) off `body` and adds it to the message being
    /// reassembled; returns the message once its last piece is in. Kept out of line: small
    /// messages, the common case, pass it by in `next_message`'s loop.
    #[inline(never)]
    fn fragment(&mut self, body: &mut Bytes) -> Result<Option<Message>, CodecError> {
        let piece = check_fragment(body, self.progress(), self.max_frame_len)?;
        body.advance(FRAGMENT_FIXED);
        let mut data = body.split_to(piece.used - FRAGMENT_FIXED);
        self.unacked += data.len();
        self.fragments += 1;
        match (self.partial.take(), piece.after) {
            // A message in a single piece: nothing to hold, and checked whole with its frame.
            (None, None) => Ok(Some(parse_message(&mut data))),
            (partial, Some((_, total))) => {
                let mut partial =
                    partial.unwrap_or_else(|| Partial::new(total, self.spares.take(total)));
                partial.push(&data);
                self.partial = Some(partial);
                Ok(None)
            }
            (Some(mut partial), None) => {
                partial.push(&data);
                let mut whole = partial.finish(&self.spares);
                // The message is seen whole for the first time: its own checks run now.
                if check_message(&whole)? != whole.len() {
                    // The fixed part gave the total, so the two agree; refused all the same.
                    return Err(ENDS_EARLY);
                }
                Ok(Some(parse_message(&mut whole)))
            }
        }
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

/// Frames larger than this (more than an outbox packs; a single large message, or a peer's
/// own framing) have their small messages copied out, see [`DETACH_SHARE`].
const DETACH_ABOVE: usize = super::encode::FRAME_TARGET;

/// A message taking less than this fraction (1/8) of such a frame is copied out of it rather
/// than sliced: a handler holding a slice holds the whole buffer, and what the server's budgets
/// count is the message. A peer that sends a 20-byte request to a slow handler and a 16 MiB
/// one-way it drops in one frame would otherwise pin 16 MiB for 20 bytes counted; now what a
/// message pins is at most eight times what it counts.
const DETACH_SHARE: usize = 8;

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
    announced_len(first)
}

/// The size of the message at the start of `b` as its fixed part announces it (the fixed part
/// must be there).
fn announced_len(b: &[u8]) -> Result<usize, CodecError> {
    need(b, 1)?;
    // Sums of at most three u32-sized fields: no overflow on 64-bit targets, and saturating
    // elsewhere (refused afterwards, as too large or running past the frame).
    Ok(match b[0] {
        kind::REQUEST | kind::ONEWAY => {
            need(b, REQUEST_FIXED)?;
            REQUEST_FIXED
                .saturating_add(b[9] as usize)
                .saturating_add(u16_at(b, 10) as usize)
                .saturating_add(u32_at(b, 12) as usize)
        }
        kind::RESPONSE => {
            need(b, RESPONSE_FIXED)?;
            RESPONSE_FIXED.saturating_add(u32_at(b, 5) as usize)
        }
        kind::ERROR => {
            need(b, ERROR_FIXED)?;
            ERROR_FIXED
                .saturating_add(u16_at(b, 7) as usize)
                .saturating_add(u32_at(b, 9) as usize)
        }
        kind::CANCEL => CANCEL_FIXED,
        kind::PING | kind::PONG => PING_FIXED,
        kind::ACK => ACK_FIXED,
        kind::GOAWAY => {
            need(b, GOAWAY_FIXED)?;
            GOAWAY_FIXED + u16_at(b, 3) as usize
        }
        _ => return Err(CodecError::InvalidFrame("unknown message kind")),
    })
}

/// What [`check_fragment`] found a FRAGMENT to be.
struct Piece {
    /// Bytes it takes in its frame, FRAGMENT header included.
    used: usize,
    /// The message being reassembled after it, as (bytes so far, total): `None` once this
    /// piece completes one, or when it is a whole message on its own.
    after: Option<(usize, usize)>,
}

/// Checks the FRAGMENT at the start of `rest` against the message being reassembled
/// (`partial`: bytes so far and total). A first piece must hold its message's fixed part and
/// announce a size within `max`; a piece may not run past its message nor stop short of it
/// with `more` = 0; a message in a single piece is checked whole here.
fn check_fragment(
    rest: &[u8],
    partial: Option<(usize, usize)>,
    max: usize,
) -> Result<Piece, CodecError> {
    need(rest, FRAGMENT_FIXED)?;
    let more = match rest[1] {
        0 => false,
        1 => true,
        _ => return Err(CodecError::InvalidFrame("fragment flag is not 0 or 1")),
    };
    let len = u32_at(rest, 2) as usize;
    if len == 0 {
        return Err(CodecError::InvalidFrame("empty fragment"));
    }
    need(rest, FRAGMENT_FIXED.saturating_add(len))?;
    let data = &rest[FRAGMENT_FIXED..FRAGMENT_FIXED + len];
    let (have, total) = match partial {
        Some((have, total)) => (have + len, total),
        None => {
            // The first piece: its fixed part says how big the message is, checked now.
            let total = fragmented_len(data)?;
            if total > max {
                return Err(CodecError::FrameTooLarge { len: total, max });
            }
            (len, total)
        }
    };
    check_piece(have, total, more)?;
    if partial.is_none() && !more {
        check_message(data)?;
    }
    Ok(Piece {
        used: FRAGMENT_FIXED + len,
        after: more.then_some((have, total)),
    })
}

fn need(body: &[u8], n: usize) -> Result<(), CodecError> {
    if body.len() < n {
        Err(CodecError::InvalidFrame(
            "message runs past the end of the frame",
        ))
    } else {
        Ok(())
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Checks that the `len` bytes at `at` (within `body`) are UTF-8.
fn utf8_at(body: &[u8], at: usize, len: usize, what: &'static str) -> Result<(), CodecError> {
    std::str::from_utf8(&body[at..at + len])
        .map(drop)
        .map_err(|_| CodecError::InvalidFrame(what))
}

/// Checks the message at the start of `body` (everything PROTOCOL.md §5 and §12 ask of one
/// on its own) and returns its size; [`parse_message`] takes only what this accepted.
fn check_message(body: &[u8]) -> Result<usize, CodecError> {
    let size = announced_len(body)?;
    // Every field read below lies within the message.
    need(body, size)?;
    match body[0] {
        kind::REQUEST | kind::ONEWAY => {
            let id = u32_at(body, 1);
            let method_len = body[9] as usize;
            if method_len == 0 {
                return Err(CodecError::InvalidFrame("empty method name"));
            }
            if u16_at(body, 10) as usize > MAX_METADATA_LEN {
                return Err(CodecError::InvalidFrame("metadata above 16 KiB"));
            }
            utf8_at(body, REQUEST_FIXED, method_len, "method name is not UTF-8")?;
            if body[0] == kind::REQUEST && id == 0 {
                return Err(CodecError::InvalidFrame("request id 0"));
            }
            if body[0] == kind::ONEWAY && id != 0 {
                return Err(CodecError::InvalidFrame("one-way message with an id"));
            }
        }
        kind::ERROR => {
            let msg_len = u16_at(body, 7) as usize;
            utf8_at(body, ERROR_FIXED, msg_len, "error message is not UTF-8")?;
        }
        kind::ACK if u32_at(body, 1) == 0 => {
            return Err(CodecError::InvalidFrame("ack of 0 bytes"));
        }
        kind::GOAWAY => {
            let len = u16_at(body, 3) as usize;
            utf8_at(body, GOAWAY_FIXED, len, "goaway reason is not UTF-8")?;
        }
        _ => {}
    }
    Ok(size)
}

/// Takes the message at the start of `body` off it. Only for a message [`check_message`]
/// accepted: the fields are read without checks.
fn parse_message(body: &mut Bytes) -> Message {
    let kind = body.get_u8();
    match kind {
        kind::REQUEST | kind::ONEWAY => {
            let id = body.get_u32();
            let timeout_ms = body.get_u32();
            let method_len = body.get_u8() as usize;
            let meta_len = body.get_u16() as usize;
            let body_len = body.get_u32() as usize;
            let method = body.split_to(method_len);
            let metadata = body.split_to(meta_len);
            let payload = body.split_to(body_len);
            if kind == kind::REQUEST {
                Message::Request {
                    id,
                    timeout_ms,
                    method,
                    metadata,
                    body: payload,
                }
            } else {
                Message::OneWay {
                    timeout_ms,
                    method,
                    metadata,
                    body: payload,
                }
            }
        }
        kind::RESPONSE => {
            let id = body.get_u32();
            let len = body.get_u32() as usize;
            Message::Response {
                id,
                body: body.split_to(len),
            }
        }
        kind::ERROR => {
            let id = body.get_u32();
            let code = body.get_u16();
            let msg_len = body.get_u16() as usize;
            let details_len = body.get_u32() as usize;
            let message = body.split_to(msg_len);
            let details = body.split_to(details_len);
            Message::Error {
                id,
                code,
                message,
                details,
            }
        }
        kind::CANCEL => Message::Cancel { id: body.get_u32() },
        kind::PING => Message::Ping {
            data: body.get_u64(),
        },
        kind::PONG => Message::Pong {
            data: body.get_u64(),
        },
        kind::ACK => Message::Ack {
            bytes: body.get_u32(),
        },
        kind::GOAWAY => {
            let code = body.get_u16();
            let len = body.get_u16() as usize;
            Message::GoAway {
                code,
                reason: body.split_to(len),
            }
        }
        _ => unreachable!("check_message refuses unknown kinds"),
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
        let whole = big_response(1, 1 << 20);
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

    /// Decodes `whole` (an encoded message) sent in pieces of 1,000 bytes; the message.
    fn in_pieces(d: &mut FrameDecoder, whole: &[u8]) -> Message {
        let mut got = Vec::new();
        let mut arrived = 0;
        for chunk in whole.chunks(1000) {
            arrived += chunk.len();
            let mut src = piece(chunk, arrived < whole.len());
            got.extend(d.decode(&mut src).unwrap().unwrap().into_messages());
        }
        assert_eq!(got.len(), 1);
        got.pop().unwrap()
    }

    /// A RESPONSE with a `len`-byte body, encoded ([`response`]).
    fn big_response(id: u32, len: usize) -> Vec<u8> {
        let body: Vec<u8> = (0..len).map(|i| (i as u8) ^ (id as u8)).collect();
        response(id, &body)
    }

    #[test]
    fn a_reassembled_message_gives_its_buffer_to_the_next_once_dropped() {
        let mut d = FrameDecoder::new(16 << 20);
        let first = big_response(1, 100_000);
        let Message::Response { body: b1, .. } = in_pieces(&mut d, &first) else {
            panic!()
        };
        assert_eq!(b1[..], first[RESPONSE_FIXED..]);
        let at = b1.as_ptr();
        assert_eq!(d.spare_capacity(), 0, "the message still holds its buffer");
        drop(b1);
        assert!(d.spare_capacity() >= first.len(), "kept once dropped");
        // A message of about the same size lands in it; one under half its size does not.
        let small = big_response(2, 30_000);
        let Message::Response { body: b2, .. } = in_pieces(&mut d, &small) else {
            panic!()
        };
        assert_ne!(b2.as_ptr(), at);
        assert_eq!(b2[..], small[RESPONSE_FIXED..]);
        let second = big_response(3, 90_000);
        let Message::Response { body: b3, .. } = in_pieces(&mut d, &second) else {
            panic!()
        };
        assert_eq!(b3.as_ptr(), at, "copied into the kept buffer");
        assert_eq!(b3[..], second[RESPONSE_FIXED..]);
        assert_eq!(d.partial_capacity(), 0);
        drop((b2, b3));
        assert!(d.release_spares());
        assert_eq!(d.spare_capacity(), 0);
    }

    /// A frame of `msgs`, each already encoded.
    fn frame_of(msgs: &[&[u8]]) -> BytesMut {
        let len: usize = msgs.iter().map(|m| m.len()).sum();
        let mut f = head(len as u32, 0, 0, msgs.len() as u16);
        for m in msgs {
            f.put_slice(m);
        }
        f
    }

    fn response(id: u32, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind::RESPONSE];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn fragment(data: &[u8], more: bool) -> Vec<u8> {
        let mut m = vec![kind::FRAGMENT, more as u8];
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        m
    }

    #[test]
    fn a_small_message_does_not_keep_a_large_frame_alive() {
        let big = vec![7u8; 512 * 1024];
        let mut d = FrameDecoder::new(1 << 20);
        // Frames of a 4-byte reply and a large one, 13 + 9 bytes of their own.
        for (frame_len, small_copied) in [(300 * 1024, true), (64 * 1024, false)] {
            let mut src = frame_of(&[&response(1, b"tiny"), &response(2, &big[..frame_len - 22])]);
            let mut frame = d.decode_frame(&mut src).unwrap().unwrap();
            assert_eq!(frame.len, frame_len);
            let at = frame.body.as_ptr() as usize;
            let buffer = at..at + frame_len;
            let mut inside = Vec::new();
            while let Some(msg) = d.next_message(&mut frame).unwrap() {
                let Message::Response { body, .. } = msg else {
                    panic!("{msg:?}")
                };
                inside.push(buffer.contains(&(body.as_ptr() as usize)));
            }
            // Above 64 KiB the small reply is a copy; the large one, and everything in an
            // outbox-sized frame, are slices.
            assert_eq!(inside, [!small_copied, true], "{frame_len}");
        }
    }

    #[test]
    fn a_frame_is_refused_whole_when_any_message_in_it_is_bad() {
        let good = response(1, b"ok");
        // An ERROR whose message is not UTF-8, after a good reply and before another.
        let bad = [kind::ERROR, 0, 0, 0, 2, 0, 2, 0, 1, 0, 0, 0, 0, 0xFF];
        let mut src = frame_of(&[&good, &bad, &response(3, b"")]);
        let mut d = FrameDecoder::new(4096);
        assert!(matches!(
            d.decode_frame(&mut src),
            Err(CodecError::InvalidFrame("error message is not UTF-8"))
        ));
    }

    #[test]
    fn messages_come_out_one_at_a_time_in_wire_order() {
        let replies: Vec<Vec<u8>> = (1..=1000u32).map(|id| response(id, &[id as u8])).collect();
        let refs: Vec<&[u8]> = replies.iter().map(|r| &r[..]).collect();
        let mut src = frame_of(&refs);
        let mut d = FrameDecoder::new(1 << 20);
        let mut frame = d.decode_frame(&mut src).unwrap().unwrap();
        assert!(src.is_empty());
        for id in 1..=1000u32 {
            assert_eq!(frame.left(), (1001 - id) as usize);
            let msg = d.next_message(&mut frame).unwrap();
            assert_eq!(
                msg,
                Some(Message::Response {
                    id,
                    body: Bytes::copy_from_slice(&[id as u8])
                })
            );
        }
        assert_eq!(d.next_message(&mut frame).unwrap(), None);
    }

    #[test]
    fn fragments_are_checked_with_their_frame_against_the_message_in_progress() {
        let whole = response(7, &[0xAB; 100]);
        let mut d = FrameDecoder::new(4096);
        let mut first = frame_of(&[&fragment(&whole[..60], true)]);
        let mut frame = d.decode_frame(&mut first).unwrap().unwrap();
        assert_eq!(d.next_message(&mut frame).unwrap(), None);
        assert!(d.in_message());
        // The rest is 49 bytes: a piece of 50 runs past the message, and is refused before the
        // PING in front of it is taken out.
        let ping = [kind::PING, 0, 0, 0, 0, 0, 0, 0, 9];
        let mut over = whole[60..].to_vec();
        over.push(0);
        let mut src = frame_of(&[&ping, &fragment(&over, false)]);
        assert!(matches!(
            d.clone().decode_frame(&mut src),
            Err(CodecError::InvalidFrame(_))
        ));
        // The right piece completes it, after the PING.
        let mut src = frame_of(&[&ping, &fragment(&whole[60..], false)]);
        let mut frame = d.decode_frame(&mut src).unwrap().unwrap();
        assert_eq!(
            d.next_message(&mut frame).unwrap(),
            Some(Message::Ping { data: 9 })
        );
        assert_eq!(
            d.next_message(&mut frame).unwrap(),
            Some(Message::Response {
                id: 7,
                body: Bytes::copy_from_slice(&[0xAB; 100])
            })
        );
        assert_eq!(d.next_message(&mut frame).unwrap(), None);
        assert!(!d.in_message());
    }

    #[test]
    fn a_reassembled_message_is_checked_when_its_last_piece_is_in() {
        // A REQUEST whose method is not UTF-8, in two pieces: no frame alone shows it.
        let mut req = vec![kind::REQUEST, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0];
        req.extend_from_slice(&[0xC3, 0x28]);
        let mut d = FrameDecoder::new(4096);
        let mut src = frame_of(&[&fragment(&req[..17], true)]);
        let mut frame = d.decode_frame(&mut src).unwrap().unwrap();
        assert_eq!(d.next_message(&mut frame).unwrap(), None);
        let mut src = frame_of(&[&fragment(&req[17..], false)]);
        let mut frame = d.decode_frame(&mut src).unwrap().unwrap();
        assert!(matches!(
            d.next_message(&mut frame),
            Err(CodecError::InvalidFrame("method name is not UTF-8"))
        ));
    }
}
