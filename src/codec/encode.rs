//! Encoding: single messages, whole frames, and the [`Outbox`] that batches messages from many
//! callers into as few frames (and writes) as possible.

use bytes::{BufMut, BytesMut};

use super::frame::{kind, Message};
use super::{
    CodecError, FRAME_HEADER_LEN, MAX_MESSAGES_PER_FRAME, MAX_METADATA_LEN, MAX_METHOD_LEN,
};

/// Checks the per-field limits that the wire format can express, so that an encoder never writes
/// something the decoder must refuse.
fn check(msg: &Message) -> Result<(), CodecError> {
    match msg {
        Message::Request { id: 0, .. } => Err(CodecError::InvalidFrame("request id 0")),
        Message::Request {
            method, metadata, ..
        }
        | Message::OneWay {
            method, metadata, ..
        } => {
            if method.is_empty() || method.len() > MAX_METHOD_LEN {
                return Err(CodecError::InvalidFrame(
                    "method name must be 1 to 255 bytes",
                ));
            }
            if std::str::from_utf8(method).is_err() {
                return Err(CodecError::InvalidFrame("method name is not UTF-8"));
            }
            if metadata.len() > MAX_METADATA_LEN {
                return Err(CodecError::InvalidFrame("metadata above 16 KiB"));
            }
            Ok(())
        }
        Message::Error { message: text, .. } | Message::GoAway { reason: text, .. } => {
            if text.len() > u16::MAX as usize {
                return Err(CodecError::InvalidFrame("message text above 65535 bytes"));
            }
            if std::str::from_utf8(text).is_err() {
                return Err(CodecError::InvalidFrame("message text is not UTF-8"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Writes one message, which must have passed [`check`].
fn put_message(msg: &Message, dst: &mut BytesMut) {
    match msg {
        Message::Request {
            id,
            timeout_ms,
            method,
            metadata,
            body,
        } => put_request(kind::REQUEST, *id, *timeout_ms, method, metadata, body, dst),
        Message::OneWay {
            timeout_ms,
            method,
            metadata,
            body,
        } => put_request(kind::ONEWAY, 0, *timeout_ms, method, metadata, body, dst),
        Message::Response { id, body } => {
            dst.put_u8(kind::RESPONSE);
            dst.put_u32(*id);
            dst.put_u32(body.len() as u32);
            dst.put_slice(body);
        }
        Message::Error {
            id,
            code,
            message,
            details,
        } => {
            dst.put_u8(kind::ERROR);
            dst.put_u32(*id);
            dst.put_u16(*code);
            dst.put_u16(message.len() as u16);
            dst.put_u32(details.len() as u32);
            dst.put_slice(message);
            dst.put_slice(details);
        }
        Message::Cancel { id } => {
            dst.put_u8(kind::CANCEL);
            dst.put_u32(*id);
        }
        Message::Ping { data } => {
            dst.put_u8(kind::PING);
            dst.put_u64(*data);
        }
        Message::Pong { data } => {
            dst.put_u8(kind::PONG);
            dst.put_u64(*data);
        }
        Message::GoAway { code, reason } => {
            dst.put_u8(kind::GOAWAY);
            dst.put_u16(*code);
            dst.put_u16(reason.len() as u16);
            dst.put_slice(reason);
        }
    }
}

fn put_request(
    kind: u8,
    id: u32,
    timeout_ms: u32,
    method: &[u8],
    metadata: &[u8],
    body: &[u8],
    dst: &mut BytesMut,
) {
    dst.put_u8(kind);
    dst.put_u32(id);
    dst.put_u32(timeout_ms);
    dst.put_u8(method.len() as u8);
    dst.put_u16(metadata.len() as u16);
    dst.put_u32(body.len() as u32);
    dst.put_slice(method);
    dst.put_slice(metadata);
    dst.put_slice(body);
}

fn put_header(dst: &mut [u8], len: usize, count: u16) {
    dst[0..4].copy_from_slice(&(len as u32).to_be_bytes());
    dst[4] = 0;
    dst[5] = 0;
    dst[6..8].copy_from_slice(&count.to_be_bytes());
}

/// Encodes `messages` as one frame, or refuses and writes nothing.
pub(super) fn encode_frame(
    messages: &[Message],
    max_len: usize,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    if messages.is_empty() {
        return Err(CodecError::InvalidFrame("empty frame"));
    }
    if messages.len() > MAX_MESSAGES_PER_FRAME {
        return Err(CodecError::InvalidFrame(
            "more than 65535 messages in a frame",
        ));
    }
    let mut len = 0usize;
    for m in messages {
        check(m)?;
        len = len.saturating_add(m.encoded_len());
    }
    if len > max_len {
        return Err(CodecError::FrameTooLarge { len, max: max_len });
    }
    dst.reserve(FRAME_HEADER_LEN + len);
    let start = dst.len();
    dst.put_bytes(0, FRAME_HEADER_LEN);
    for m in messages {
        put_message(m, dst);
    }
    put_header(&mut dst[start..], len, messages.len() as u16);
    Ok(())
}

/// The write side of a connection: messages from any number of tasks are appended here, packed
/// into frames as they come, and the writer task takes everything at once for one `write`.
///
/// A new frame starts when the current one would pass the peer's `max_frame_len` or 65,535
/// messages, so one take may hold several frames; they still go out in one write.
#[derive(Debug)]
pub(crate) struct Outbox {
    buf: BytesMut,
    /// Offset of the open frame's header in `buf`, if a frame is open.
    open: Option<usize>,
    count: u16,
    max_frame_len: usize,
    /// Messages pushed since the last take.
    queued: usize,
}

impl Outbox {
    pub(crate) fn new(max_frame_len: usize, capacity: usize) -> Self {
        Outbox {
            buf: BytesMut::with_capacity(capacity),
            open: None,
            count: 0,
            max_frame_len,
            queued: 0,
        }
    }

    /// Lowers (or raises) the frame limit for frames opened from now on: the peer's limit,
    /// learnt from its preface.
    pub(crate) fn set_max_frame_len(&mut self, len: usize) {
        self.max_frame_len = len;
        // A frame opened under the old limit must not grow past the new one.
        self.open = None;
    }

    /// Appends one message, or refuses it (writing nothing) if it breaks a limit.
    pub(crate) fn push(&mut self, msg: &Message) -> Result<(), CodecError> {
        check(msg)?;
        let n = msg.encoded_len();
        if n > self.max_frame_len {
            return Err(CodecError::FrameTooLarge {
                len: n,
                max: self.max_frame_len,
            });
        }
        let start = match self.open {
            Some(start)
                if (self.count as usize) < MAX_MESSAGES_PER_FRAME
                    && self.buf.len() - start - FRAME_HEADER_LEN + n <= self.max_frame_len =>
            {
                start
            }
            _ => {
                let start = self.buf.len();
                self.buf.put_bytes(0, FRAME_HEADER_LEN);
                self.open = Some(start);
                self.count = 0;
                start
            }
        };
        put_message(msg, &mut self.buf);
        self.count += 1;
        self.queued += 1;
        let len = self.buf.len() - start - FRAME_HEADER_LEN;
        put_header(&mut self.buf[start..], len, self.count);
        Ok(())
    }

    /// Bytes waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Messages pushed since the last take.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Takes every finished frame, leaving the outbox empty. The next push opens a new frame.
    ///
    /// `spare` is the writer's previous (already written) buffer: handing it back lets the two
    /// buffers alternate, so steady-state batching allocates nothing.
    pub(crate) fn take(&mut self, spare: BytesMut) -> BytesMut {
        self.open = None;
        self.count = 0;
        self.queued = 0;
        let mut spare = spare;
        spare.clear();
        std::mem::replace(&mut self.buf, spare)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn req(id: u32, body: &'static [u8]) -> Message {
        Message::Request {
            id,
            timeout_ms: 0,
            method: Bytes::from_static(b"m"),
            metadata: Bytes::new(),
            body: Bytes::from_static(body),
        }
    }

    #[test]
    fn outbox_packs_messages_into_one_frame() {
        let mut o = Outbox::new(4096, 64);
        o.push(&req(1, b"a")).unwrap();
        o.push(&req(2, b"b")).unwrap();
        let buf = o.take(BytesMut::new());
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert_eq!(len, buf.len() - FRAME_HEADER_LEN);
        assert_eq!(u16::from_be_bytes([buf[6], buf[7]]), 2);
        assert!(o.is_empty());
    }

    #[test]
    fn outbox_opens_a_new_frame_at_the_limit() {
        let mut o = Outbox::new(4096, 64);
        let big = Message::Response {
            id: 1,
            body: Bytes::from(vec![0u8; 3000]),
        };
        o.push(&big).unwrap();
        o.push(&big).unwrap();
        let buf = o.take(BytesMut::new());
        assert_eq!(buf.len(), 2 * (FRAME_HEADER_LEN + 3009));
    }

    #[test]
    fn outbox_refuses_an_oversize_message_and_writes_nothing() {
        let mut o = Outbox::new(4096, 64);
        let big = Message::Response {
            id: 1,
            body: Bytes::from(vec![0u8; 4096]),
        };
        assert!(matches!(
            o.push(&big),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert!(o.is_empty());
    }

    #[test]
    fn encoder_refuses_oversize_frame_and_writes_nothing() {
        let mut dst = BytesMut::new();
        let msgs = vec![Message::Response {
            id: 1,
            body: Bytes::from(vec![0u8; 4096 - 9 + 1]),
        }];
        assert!(encode_frame(&msgs, 4096, &mut dst).is_err());
        assert!(dst.is_empty());
        let msgs = vec![Message::Response {
            id: 1,
            body: Bytes::from(vec![0u8; 4096 - 9]),
        }];
        encode_frame(&msgs, 4096, &mut dst).unwrap();
        assert_eq!(dst.len(), 4096 + FRAME_HEADER_LEN);
    }
}
