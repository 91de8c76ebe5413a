//! Fuzzes the RESP3 decoding path fanout's Redis link uses, with arbitrary bytes as the reply
//! stream.
//!
//! fanout reads Redis replies into one `BytesMut` and splits frames off it with
//! `resp3::decode::complete::decode_bytes_mut` until it answers "need more" or an error. A
//! hostile or broken peer on the Redis port must not be able to panic the reactor, a "need more"
//! must leave the buffer untouched, and decoding the stream in two pieces must split it into the
//! same frames (same kinds, same byte lengths) as decoding it at once. Frames are not compared
//! for equality: a RESP3 map with a duplicate key keeps one of the values, and which one varies
//! between runs (the fuzzer found that; fanout never reads map contents). (fanout's own push interpretation, `RedisLink::on_push`, is
//! private and needs a live link; the pub/sub shape checks it relies on are exercised here.)
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use redis_protocol::resp3::decode::complete::decode_bytes_mut;
use redis_protocol::resp3::types::{BytesFrame, FrameKind, Resp3Frame};

/// Decodes frames like the Redis link's read loop; records each frame's kind and wire length,
/// and returns whether decoding failed.
fn decode_all(buf: &mut BytesMut, out: &mut Vec<(FrameKind, usize)>) -> bool {
    // Each frame takes at least one byte, so this bound is never what stops a valid stream.
    for _ in 0..=buf.len() {
        let before = buf.clone();
        match decode_bytes_mut(buf) {
            Ok(Some((frame, consumed, _))) => {
                assert!(consumed > 0 && consumed <= before.len());
                assert_eq!(buf.len(), before.len() - consumed);
                if let BytesFrame::Push { data, .. } = &frame {
                    let _ = frame.is_normal_pubsub_message();
                    let _ = frame.is_pattern_pubsub_message();
                    let _ = frame.is_shard_pubsub_message();
                    let _ = data.len();
                }
                out.push((frame.kind(), consumed));
            }
            Ok(None) => {
                assert_eq!(*buf, before, "need-more consumed bytes");
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let mut whole = BytesMut::from(stream);
    let mut frames = Vec::new();
    let failed = decode_all(&mut whole, &mut frames);

    // The same bytes arriving in two reads: a valid stream must decode the same way.
    if failed {
        return;
    }
    let cut = usize::from(cut) % (stream.len() + 1);
    let mut split = BytesMut::from(&stream[..cut]);
    let mut split_frames = Vec::new();
    assert!(
        !decode_all(&mut split, &mut split_frames),
        "a prefix of a valid stream failed to decode"
    );
    split.extend_from_slice(&stream[cut..]);
    assert!(!decode_all(&mut split, &mut split_frames));
    assert_eq!(frames, split_frames);
    assert_eq!(whole, split);
});
