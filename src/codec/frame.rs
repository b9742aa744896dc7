//! Frames and messages as values.

use bytes::Bytes;

/// Message kinds: the first byte of every message.
pub(crate) mod kind {
    pub(crate) const REQUEST: u8 = 0x01;
    pub(crate) const ONEWAY: u8 = 0x02;
    pub(crate) const RESPONSE: u8 = 0x03;
    pub(crate) const ERROR: u8 = 0x04;
    pub(crate) const CANCEL: u8 = 0x05;
    pub(crate) const PING: u8 = 0x06;
    pub(crate) const PONG: u8 = 0x07;
    pub(crate) const GOAWAY: u8 = 0x08;
    /// A piece of a larger message (PROTOCOL.md §4.1). Never a [`Message`](super::Message): the
    /// codec cuts and reassembles them.
    pub(crate) const FRAGMENT: u8 = 0x09;
    pub(crate) const ACK: u8 = 0x0A;
}

/// Wire error codes (see [`Code`](crate::Code) for the public view).
pub(crate) mod code {
    pub(crate) const OK: u16 = 0;
    pub(crate) const CANCELLED: u16 = 1;
    pub(crate) const UNKNOWN: u16 = 2;
    pub(crate) const INVALID_ARGUMENT: u16 = 3;
    pub(crate) const DEADLINE_EXCEEDED: u16 = 4;
    pub(crate) const NOT_FOUND: u16 = 5;
    pub(crate) const REFUSED: u16 = 6;
    pub(crate) const RESOURCE_EXHAUSTED: u16 = 7;
    pub(crate) const INTERNAL: u16 = 8;
    pub(crate) const UNAVAILABLE: u16 = 9;
    pub(crate) const APPLICATION: u16 = 10;
    pub(crate) const PROTOCOL_ERROR: u16 = 11;
    pub(crate) const FRAME_TOO_LARGE: u16 = 12;
    pub(crate) const UNSUPPORTED_VERSION: u16 = 13;
    pub(crate) const STALLED: u16 = 14;
}

/// One message inside a frame. The layouts are in `PROTOCOL.md`.
///
/// Byte fields (`method`, `metadata`, `body`, ...) are [`Bytes`], so a decoded message shares the
/// read buffer instead of copying it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// A call that expects exactly one reply (client to server).
    Request {
        /// Request id, nonzero, unique among this connection's calls awaiting a reply.
        id: u32,
        /// Relative deadline in milliseconds; 0 means none.
        timeout_ms: u32,
        /// Method name, 1 to 255 bytes of UTF-8.
        method: Bytes,
        /// Opaque request metadata, at most 16 KiB.
        metadata: Bytes,
        /// The request payload.
        body: Bytes,
    },
    /// A one-way message: the server runs the handler and sends nothing back.
    OneWay {
        /// Relative deadline in milliseconds; 0 means none.
        timeout_ms: u32,
        /// Method name, 1 to 255 bytes of UTF-8.
        method: Bytes,
        /// Opaque request metadata, at most 16 KiB.
        metadata: Bytes,
        /// The request payload.
        body: Bytes,
    },
    /// A successful reply (server to client).
    Response {
        /// The id of the request this answers.
        id: u32,
        /// The response payload.
        body: Bytes,
    },
    /// A failed reply (server to client).
    Error {
        /// The id of the request this answers.
        id: u32,
        /// Error code (see [`Code`](crate::Code)).
        code: u16,
        /// Human-readable message, UTF-8.
        message: Bytes,
        /// Opaque details, msgpack by convention.
        details: Bytes,
    },
    /// Asks the server to stop a request (a best-effort hint).
    Cancel {
        /// The id of the request to stop.
        id: u32,
    },
    /// Asks the peer to answer with [`Message::Pong`].
    Ping {
        /// Echoed in the pong.
        data: u64,
    },
    /// The answer to a [`Message::Ping`].
    Pong {
        /// The ping's data.
        data: u64,
    },
    /// Gives the peer back window for `bytes` of fragment data this side has read (PROTOCOL.md
    /// §4.1, §5.8).
    Ack {
        /// Fragment data bytes read since this side's last ACK; at least 1.
        bytes: u32,
    },
    /// The sender is draining (code 0) or closing the connection because of an error.
    GoAway {
        /// Error code; 0 means a graceful drain.
        code: u16,
        /// Why, UTF-8.
        reason: Bytes,
    },
}

impl Message {
    /// Encoded size of this message in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Message::Request {
                method,
                metadata,
                body,
                ..
            }
            | Message::OneWay {
                method,
                metadata,
                body,
                ..
            } => REQUEST_FIXED + method.len() + metadata.len() + body.len(),
            Message::Response { body, .. } => RESPONSE_FIXED + body.len(),
            Message::Error {
                message, details, ..
            } => ERROR_FIXED + message.len() + details.len(),
            Message::Cancel { .. } => CANCEL_FIXED,
            Message::Ping { .. } | Message::Pong { .. } => PING_FIXED,
            Message::Ack { .. } => ACK_FIXED,
            Message::GoAway { reason, .. } => GOAWAY_FIXED + reason.len(),
        }
    }
}

pub(crate) const REQUEST_FIXED: usize = 16;
pub(crate) const RESPONSE_FIXED: usize = 9;
pub(crate) const ERROR_FIXED: usize = 13;
pub(crate) const CANCEL_FIXED: usize = 5;
pub(crate) const PING_FIXED: usize = 9;
pub(crate) const GOAWAY_FIXED: usize = 5;
pub(crate) const FRAGMENT_FIXED: usize = 6;
pub(crate) const ACK_FIXED: usize = 5;

/// One frame: a batch of one or more messages.
///
/// A decoded frame whose only messages were pieces of a message sent in fragments (PROTOCOL.md
/// §4.1) holds no messages: the reassembled message comes in the frame of its last piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    messages: Vec<Message>,
}

impl Frame {
    /// A frame holding `messages` (checked when it is encoded).
    pub fn new(messages: Vec<Message>) -> Self {
        Frame { messages }
    }

    /// The messages, in wire order.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Takes the messages out.
    pub fn into_messages(self) -> Vec<Message> {
        self.messages
    }
}
