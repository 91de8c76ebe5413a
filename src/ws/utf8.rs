//! Incremental UTF-8 validation for text messages that arrive in pieces (fragments, reads).
//!
//! RFC 6455 8.1 lets an endpoint fail a connection as soon as a text message stops being valid
//! UTF-8 (Autobahn 6.4.x grades a server that waits for the end of the message NON-STRICT), so a
//! message must be checked as its bytes come, not once it is whole. [`Utf8Validator`] carries
//! the at most 3 bytes of a sequence cut by a chunk boundary and nothing else (4 bytes of state,
//! cheap enough to live in every connection). The bulk of every chunk is checked by
//! `std::str::from_utf8` (vectorised ASCII fast path, RFC 3629 rules: no overlongs, no
//! surrogates, nothing above U+10FFFF); only the few bytes around a chunk boundary are handled
//! here.

use std::fmt;

/// Why a text message is not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utf8Error {
    /// The byte at `at` (an index into the chunk given to [`Utf8Validator::feed`]) cannot be part
    /// of any valid UTF-8 text after what came before it.
    Invalid { at: usize },
    /// The message ended inside a multi-byte sequence.
    Incomplete,
}

impl fmt::Display for Utf8Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Utf8Error::Invalid { at } => write!(f, "invalid UTF-8 at byte {at} of a chunk"),
            Utf8Error::Incomplete => write!(f, "text ends inside a UTF-8 sequence"),
        }
    }
}

impl std::error::Error for Utf8Error {}

/// The state of one text message being validated: the start of a sequence a chunk boundary cut.
///
/// Feed every chunk in order with [`feed`](Self::feed), then call [`finish`](Self::finish) at the
/// end of the message and [`reset`](Self::reset) (or make a new one) before the next message.
/// After an error the validator's verdict on further input is meaningless: fail the message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8Validator {
    /// The incomplete sequence carried over; always a valid prefix of a UTF-8 sequence.
    pending: [u8; 3],
    pending_len: u8,
}

/// Bytes a sequence with this lead byte takes; 0 for a byte that cannot start one.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 0,
    }
}

/// Where the first impossible byte of `bytes` is, given that `bytes[..valid_up_to]` is valid and
/// std found a bad sequence of `error_len` bytes at `valid_up_to`. std reports the longest prefix
/// of a sequence that could still have been valid: when it starts with a proper lead byte, the
/// byte after it is the culprit; otherwise (stray continuation byte, 0xC0, 0xC1, 0xF5..) the byte
/// itself is.
fn culprit(bytes: &[u8], valid_up_to: usize, error_len: usize) -> usize {
    if sequence_len(bytes[valid_up_to]) > 1 {
        valid_up_to + error_len
    } else {
        valid_up_to
    }
}

impl Utf8Validator {
    pub const fn new() -> Utf8Validator {
        Utf8Validator {
            pending: [0; 3],
            pending_len: 0,
        }
    }

    /// Checks the next chunk of the message. Fails at the first byte that no valid UTF-8 text
    /// could contain at that point; a chunk that ends inside a sequence is fine (the start of the
    /// sequence is carried to the next call).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), Utf8Error> {
        let mut rest = bytes;
        let mut consumed = 0;
        if self.pending_len > 0 {
            // Complete the carried sequence by hand: it needs at most 3 more bytes.
            let have = self.pending_len as usize;
            let need = sequence_len(self.pending[0]);
            let take = need.saturating_sub(have).min(rest.len());
            let mut seq = [0u8; 4];
            seq[..have].copy_from_slice(&self.pending[..have]);
            seq[have..have + take].copy_from_slice(&rest[..take]);
            match std::str::from_utf8(&seq[..have + take]) {
                Ok(_) => self.pending_len = 0,
                Err(e) => match e.error_len() {
                    // Still a valid prefix: the chunk was too short to finish the sequence.
                    None => {
                        self.pending[..have + take].copy_from_slice(&seq[..have + take]);
                        self.pending_len = (have + take) as u8;
                        return Ok(());
                    }
                    // The pending bytes were a valid prefix, so the culprit is in this chunk.
                    Some(len) => {
                        let at = culprit(&seq, 0, len);
                        return Err(Utf8Error::Invalid {
                            at: at.saturating_sub(have),
                        });
                    }
                },
            }
            rest = &rest[take..];
            consumed = take;
        }
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) => {
                let valid = e.valid_up_to();
                match e.error_len() {
                    // A valid prefix of a sequence ends the chunk (1 to 3 bytes): carry it.
                    None => {
                        let tail = &rest[valid..];
                        let n = tail.len().min(3);
                        self.pending[..n].copy_from_slice(&tail[..n]);
                        self.pending_len = n as u8;
                        Ok(())
                    }
                    Some(len) => Err(Utf8Error::Invalid {
                        at: consumed + culprit(rest, valid, len),
                    }),
                }
            }
        }
    }

    /// The message is over: fails if it ended inside a sequence.
    pub fn finish(&self) -> Result<(), Utf8Error> {
        if self.pending_len == 0 {
            Ok(())
        } else {
            Err(Utf8Error::Incomplete)
        }
    }

    /// True when no sequence is open (the bytes so far are complete UTF-8 text).
    pub fn is_complete(&self) -> bool {
        self.pending_len == 0
    }

    /// Forgets any carried bytes, ready for the next message.
    pub fn reset(&mut self) {
        *self = Utf8Validator::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Index of the first byte after which `b` is no longer a prefix of valid UTF-8, computed
    /// independently of the validator: the shortest prefix std calls definitely invalid.
    fn first_impossible(b: &[u8]) -> Option<usize> {
        (0..b.len())
            .find(|&i| std::str::from_utf8(&b[..=i]).is_err_and(|e| e.error_len().is_some()))
    }

    fn whole(b: &[u8]) -> Result<(), Utf8Error> {
        let mut v = Utf8Validator::new();
        v.feed(b)?;
        v.finish()
    }

    /// Feeds `b` cut at `cuts` (sorted, deduplicated); checks that chunks before the one holding
    /// the first impossible byte pass, that one fails at exactly that byte, and the end verdict.
    fn check_split(b: &[u8], cuts: &[usize]) {
        let expect_ok = std::str::from_utf8(b).is_ok();
        let bad = first_impossible(b);
        let mut v = Utf8Validator::new();
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().copied().filter(|&c| c < b.len()).collect();
        bounds.push(b.len());
        for end in bounds {
            if end < start {
                continue;
            }
            let r = v.feed(&b[start..end]);
            match bad {
                Some(i) if i < end => {
                    assert_eq!(
                        r,
                        Err(Utf8Error::Invalid { at: i - start }),
                        "{b:02x?} cut at {cuts:?}"
                    );
                    return;
                }
                _ => assert_eq!(r, Ok(()), "{b:02x?} cut at {cuts:?}, chunk {start}..{end}"),
            }
            start = end;
        }
        assert!(bad.is_none());
        assert_eq!(v.finish().is_ok(), expect_ok, "{b:02x?} cut at {cuts:?}");
        if !expect_ok {
            assert_eq!(v.finish(), Err(Utf8Error::Incomplete));
        }
    }

    /// Every way to cut a short byte string into pieces.
    fn check_every_split(b: &[u8]) {
        assert!(b.len() <= 10);
        let n = b.len().saturating_sub(1);
        for mask in 0u32..(1 << n) {
            let cuts: Vec<usize> = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| i + 1)
                .collect();
            check_split(b, &cuts);
        }
    }

    #[test]
    fn state_is_four_bytes() {
        assert_eq!(std::mem::size_of::<Utf8Validator>(), 4);
    }

    #[test]
    fn accepts_valid_text_and_boundaries_of_every_length() {
        for c in [
            '\0',
            'a',
            '\u{7F}',
            '\u{80}',
            'é',
            '\u{7FF}',
            '\u{800}',
            'κ',
            '\u{D7FF}',
            '\u{E000}',
            '\u{FFFD}',
            '\u{FFFF}',
            '\u{10000}',
            '😀',
            '\u{10FFFF}',
        ] {
            let s = format!("x{c}y{c}");
            check_every_split(s.as_bytes());
            assert_eq!(whole(s.as_bytes()), Ok(()));
        }
        check_split("Hello-µ@ßöäüàá-UTF-8!!".as_bytes(), &[1, 7, 8, 9, 20]);
        assert_eq!(whole(b""), Ok(()));
    }

    #[test]
    fn rejects_rfc3629_violations_at_the_first_impossible_byte() {
        let cases: &[(&[u8], usize)] = &[
            (b"\x80", 0),             // stray continuation byte
            (b"a\xBF", 1),            //
            (b"\xC0\x80", 0),         // overlong lead, never valid
            (b"\xC1\xBF", 0),         //
            (b"\xE0\x80\x80", 1),     // overlong 3-byte (U+0000)
            (b"\xE0\x9F\xBF", 1),     // overlong 3-byte (U+07FF)
            (b"\xED\xA0\x80", 1),     // surrogate U+D800
            (b"\xED\xBF\xBF", 1),     // surrogate U+DFFF
            (b"\xF0\x80\x80\x80", 1), // overlong 4-byte
            (b"\xF0\x8F\xBF\xBF", 1), //
            (b"\xF4\x90\x80\x80", 1), // U+110000
            (b"\xF5\x80\x80\x80", 0), // lead above F4
            (b"\xFF", 0),             //
            (b"\xC2\x41", 1),         // continuation missing
            (b"\xE2\x82\x41", 2),     //
            (b"\xF0\x9F\x98\x41", 3), //
            (
                b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80",
                12,
            ), // Autobahn 6.x
        ];
        for &(b, at) in cases {
            assert_eq!(first_impossible(b), Some(at), "{b:02x?}");
            assert_eq!(whole(b), Err(Utf8Error::Invalid { at }), "{b:02x?}");
            check_every_split(&b[..b.len().min(10)]);
        }
    }

    #[test]
    fn incomplete_at_the_end_fails_only_at_finish() {
        for b in [
            &b"\xC2"[..],
            b"\xE2\x82",
            b"\xF0\x9F\x98",
            b"ab\xF4\x8F\xBF",
        ] {
            let mut v = Utf8Validator::new();
            assert_eq!(v.feed(b), Ok(()));
            assert!(!v.is_complete());
            assert_eq!(v.finish(), Err(Utf8Error::Incomplete));
            v.reset();
            assert_eq!(v.finish(), Ok(()));
        }
    }

    #[test]
    fn carried_bytes_survive_empty_and_one_byte_chunks() {
        let mut v = Utf8Validator::new();
        for chunk in [&b"\xF0"[..], b"", b"\x9F", b"", b"\x98", b"\x80", b""] {
            assert_eq!(v.feed(chunk), Ok(()));
        }
        assert_eq!(v.finish(), Ok(()));
        // The impossible byte is reported relative to the chunk it arrives in.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"ok\xED"), Ok(()));
        assert_eq!(v.feed(b"\xA0\x80"), Err(Utf8Error::Invalid { at: 0 }));
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xE2\x82"), Ok(()));
        assert_eq!(v.feed(b"\xACz\xFF"), Err(Utf8Error::Invalid { at: 2 }));
    }

    #[test]
    fn all_one_and_two_byte_strings_match_std_at_every_cut() {
        for a in 0..=255u8 {
            check_every_split(&[a]);
            for b in 0..=255u8 {
                check_every_split(&[a, b]);
            }
        }
    }

    #[test]
    fn three_and_four_byte_leads_against_every_second_byte() {
        let thirds = [
            0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xF0, 0xFF,
        ];
        for a in 0xC0..=0xFFu8 {
            for b in 0..=255u8 {
                for &c in &thirds {
                    check_every_split(&[a, b, c]);
                    if a >= 0xF0 {
                        check_every_split(&[a, b, c, 0x80]);
                    }
                }
            }
        }
    }

    fn texty_bytes() -> impl Strategy<Value = Vec<u8>> {
        // Mostly real text with now and then a random byte: invalid strings whose first bad byte
        // sits anywhere, not only at the start.
        let piece = prop_oneof![
            4 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
            1 => any::<u8>().prop_map(|b| vec![b]),
            1 => prop::collection::vec(0x80u8..=0xFF, 1..4),
        ];
        prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_split_gives_the_verdict_of_std_on_the_whole(
            b in texty_bytes(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(b.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            check_split(&b, &cuts);
            prop_assert_eq!(whole(&b).is_ok(), std::str::from_utf8(&b).is_ok());
        }

        #[test]
        fn random_bytes_split_anywhere(
            b in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(b.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            check_split(&b, &cuts);
        }
    }
}
