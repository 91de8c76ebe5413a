//! Fuzzes the WebSocket frame header parser with arbitrary bytes.
//!
//! The first byte picks the parser's settings (mask required or not, the size limit), the rest is
//! the wire. Beyond "never panics", it checks that an accepted header is self-consistent, that
//! re-encoding it gives a header the parser reads back identically, that a header cut short is
//! "need more" rather than an error, and that unmasking is its own inverse at any offset.
#![no_main]

use fanout::ws::frame::{apply_mask, FrameHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&settings, wire)) = data.split_first() else {
        return;
    };
    let require_mask = settings & 1 == 1;
    let max_payload = match settings >> 1 {
        0 => u64::MAX >> 1,
        n => 1u64 << (n % 40),
    };
    let header = match FrameHeader::parse(wire, require_mask, max_payload) {
        Ok(Some(header)) => header,
        Ok(None) => {
            assert!(wire.len() < 14, "need-more on a full-size header");
            return;
        }
        Err(_) => return,
    };
    assert!((2..=14).contains(&header.header_len));
    assert!(header.header_len <= wire.len());
    assert!(header.payload_len <= max_payload);
    assert!(!require_mask || header.mask.is_some());
    if header.opcode.is_control() {
        assert!(header.fin && header.payload_len <= 125);
    }
    // Every strict prefix of an accepted header is "need more".
    for cut in 0..header.header_len {
        assert_eq!(
            FrameHeader::parse(&wire[..cut], require_mask, max_payload),
            Ok(None)
        );
    }
    // Re-encoding gives back the same header (the shortest length form, so compare fields).
    let Ok(len) = usize::try_from(header.payload_len) else {
        return;
    };
    let mut encoded = Vec::new();
    FrameHeader::write(&mut encoded, header.opcode, len, header.mask);
    if !header.fin {
        encoded[0] &= 0x7F;
    }
    assert_eq!(
        encoded.len(),
        FrameHeader::encoded_len(len, header.mask.is_some())
    );
    let again = FrameHeader::parse(&encoded, require_mask, max_payload)
        .expect("re-encoded header parses")
        .expect("re-encoded header is complete");
    assert_eq!(again.fin, header.fin);
    assert_eq!(again.opcode, header.opcode);
    assert_eq!(again.mask, header.mask);
    assert_eq!(again.payload_len, header.payload_len);
    // Unmasking whatever payload bytes arrived, in two pieces, then masking again is identity.
    if let Some(mask) = header.mask {
        let payload = &wire[header.header_len..];
        let mut buf = payload.to_vec();
        let split = usize::from(settings) % (buf.len() + 1);
        let (a, b) = buf.split_at_mut(split);
        apply_mask(a, mask, 0);
        apply_mask(b, mask, split);
        apply_mask(&mut buf, mask, 0);
        assert_eq!(buf, payload);
    }
});
