//! Fuzzes the JSON command parser, the replies that echo a client's `id`, and the delivery
//! envelope.
//!
//! Any text frame a JSON-mode client sends must parse to a command or an error reply; every
//! reply and every envelope fanout builds from client input must itself be valid JSON, whatever
//! the `id` or the payload bytes were.
#![no_main]

use fanout::protocol::{self, Command};
use fanout::ws::FrameHeader;
use libfuzzer_sys::fuzz_target;

/// The JSON body of a server text frame built by the protocol module.
fn body(frame: &[u8]) -> &[u8] {
    let header = FrameHeader::parse(frame, false, u64::MAX >> 1)
        .expect("server frame parses")
        .expect("server frame is complete");
    assert_eq!(
        header.header_len as u64 + header.payload_len,
        frame.len() as u64
    );
    &frame[header.header_len..]
}

/// Valid JSON text (RFC 8259) in valid UTF-8. Not `serde_json::Value`: it refuses numbers beyond
/// f64 range such as `1e999`, which JSON allows and browsers parse (the fuzzer found that).
fn assert_json(bytes: &[u8]) {
    if let Err(e) = std::str::from_utf8(bytes) {
        panic!("not UTF-8 ({e}): {:?}", String::from_utf8_lossy(bytes));
    }
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(bytes));
    }
}

fuzz_target!(|data: &[u8]| {
    match protocol::parse_command(data) {
        Ok(request) => {
            assert_json(body(&protocol::ok_reply(request.id)));
            let channel = match &request.command {
                Command::Subscribe { channel, .. }
                | Command::Unsubscribe { channel }
                | Command::History { channel, .. }
                | Command::Presence { channel }
                | Command::PresenceStats { channel } => channel,
                Command::Publish { channel, payload } => {
                    let mut scratch = Vec::new();
                    let frame = protocol::envelope(channel.as_bytes(), payload, &mut scratch);
                    assert_json(body(&frame));
                    channel
                }
                // A token is checked by the reactor's verifier, not by the parser.
                Command::Refresh { .. } => return,
            };
            protocol::validate_channel(channel.as_bytes()).expect("parsed channel is valid");
        }
        Err(error) => assert_json(body(&protocol::error_reply(error.id, &error.message))),
    }
    // The same bytes as a raw-mode payload published into a JSON subscriber's channel.
    let mut scratch = Vec::new();
    assert_json(body(&protocol::envelope(b"fuzz", data, &mut scratch)));
    // And as a channel name.
    let _ = protocol::validate_channel(data);
});
