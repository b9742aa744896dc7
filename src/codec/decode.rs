//! The frame decoder: a two-state machine (header, then body) that checks limits before it
//! allocates.

use bytes::{Buf, Bytes, BytesMut};

use super::frame::{
    kind, Frame, Message, CANCEL_FIXED, ERROR_FIXED, GOAWAY_FIXED, PING_FIXED, REQUEST_FIXED,
    RESPONSE_FIXED,
};
use super::{CodecError, FRAME_HEADER_LEN, MAX_METADATA_LEN};

#[derive(Debug, Clone)]
pub(super) struct FrameDecoder {
    pub(super) max_frame_len: usize,
    state: State,
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
        }
    }

    /// Whether a header has been read and its body not yet.
    pub(super) fn in_frame(&self) -> bool {
        matches!(self.state, State::Body { .. })
    }

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
        parse_batch(body, count).map(|messages| Some(Frame::new(messages)))
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

/// Parses `count` messages that must fill `body` exactly.
fn parse_batch(mut body: Bytes, count: u16) -> Result<Vec<Message>, CodecError> {
    let mut messages = Vec::with_capacity(count as usize);
    for _ in 0..count {
        messages.push(parse_message(&mut body)?);
    }
    if body.has_remaining() {
        return Err(CodecError::InvalidFrame(
            "bytes left over after the last message",
        ));
    }
    Ok(messages)
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
}
