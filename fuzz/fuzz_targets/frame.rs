//! The frame codec on arbitrary bytes, arriving in chunks of a size the input picks: it never
//! panics, and every frame it decodes encodes back to bytes that decode to the same messages
//! (a message that arrived in fragments, whole).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};
use towerpc::codec::{Frame, FrameCodec};

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // The first byte is the chunk size (1..=256); the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut codec = FrameCodec::builder().max_frame_len(MAX).new_codec();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    'read: for piece in stream.chunks(chunk as usize + 1) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                // An error ends the connection: nothing after it is read.
                Err(_) => break 'read,
            }
        }
    }
    for frame in frames {
        let messages = frame.messages().to_vec();
        if messages.is_empty() {
            // It held only pieces of a message in fragments.
            continue;
        }
        // A frame may hold, besides up to MAX bytes of whole messages, one message reassembled
        // from fragments (up to MAX too): re-encoded whole, they need twice the room.
        let mut codec = FrameCodec::builder()
            .max_frame_len(2 * MAX)
            .max_send_len(2 * MAX)
            .new_codec();
        let mut out = BytesMut::new();
        codec
            .encode(Frame::new(messages.clone()), &mut out)
            .expect("a frame that decoded encodes again");
        let again = codec
            .decode(&mut out)
            .expect("re-encoded bytes decode")
            .expect("into a whole frame");
        assert_eq!(again.messages(), &messages[..]);
        assert!(out.is_empty(), "bytes left over");
    }
});
