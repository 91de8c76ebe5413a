//! The server API's keys (`--api-key`, repeatable) and the check of `Authorization: apikey KEY`.
//!
//! The comparison takes the same time wherever the presented key first differs: every byte of
//! every configured key is compared, the differences are OR-ed together, and the answer is read
//! only at the end, so the time a request takes says nothing about how much of a key it guessed.
//! (A key's length is not hidden; keys are at least [`MIN_KEY_LEN`] bytes.)

use anyhow::bail;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted, in bytes (a request head is at most 8 KiB anyway).
pub const MAX_KEY_LEN: usize = 1024;

/// The keys the backend may present.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Vec<Box<[u8]>>,
}

impl std::fmt::Debug for ApiKeys {
    /// Never prints a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

impl ApiKeys {
    /// Validates `--api-key` values; errors name the option and never echo a key.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> anyhow::Result<ApiKeys> {
        let mut out = Vec::new();
        for (i, key) in keys.into_iter().enumerate() {
            let n = i + 1;
            if key.len() < MIN_KEY_LEN {
                bail!(
                    "--api-key: key #{n} is {} bytes; a key has at least {MIN_KEY_LEN}",
                    key.len()
                );
            }
            if key.len() > MAX_KEY_LEN {
                bail!("--api-key: key #{n} is longer than {MAX_KEY_LEN} bytes");
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                bail!(
                    "--api-key: key #{n} holds a character other than printable ASCII (no spaces)"
                );
            }
            out.push(key.as_bytes().into());
        }
        Ok(ApiKeys { keys: out })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether an `Authorization` header value is `apikey KEY` with one of the keys (the scheme
    /// in any case). Every key is compared in full, whichever matches.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(presented) = authorization.and_then(credentials) else {
            return false;
        };
        let mut accepted = false;
        for key in &self.keys {
            accepted |= constant_time_eq(key, presented);
        }
        accepted
    }
}

/// The credentials of `apikey KEY` (surrounding spaces and tabs ignored).
fn credentials(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let scheme = header.get(..6)?;
    if !scheme.eq_ignore_ascii_case(b"apikey") {
        return None;
    }
    let rest = header.get(6..)?;
    // The scheme must end there: `apikeyX` is another scheme.
    if !rest.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return None;
    }
    Some(rest.trim_ascii())
}

/// `a == b` in time that depends only on the lengths, not on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        // Past the end of `b` compare with 0: the lengths already differ, and the loop still
        // runs over all of `a`.
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef-key";

    #[test]
    fn equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a\0", b"a"));
    }

    #[test]
    fn header_check() {
        let keys = ApiKeys::new([KEY, "another-key-0123456789"]).unwrap();
        let ok = |h: &str| keys.accepts(Some(h.as_bytes()));
        assert!(ok(&format!("apikey {KEY}")));
        assert!(ok(&format!("ApiKey  {KEY} ")));
        assert!(ok("apikey another-key-0123456789"));
        assert!(!ok(&format!("Bearer {KEY}")));
        assert!(!ok(&format!("apikey{KEY}")));
        assert!(!ok(&format!("apikey {KEY}x")));
        assert!(!ok("apikey "));
        assert!(!ok("apikey"));
        assert!(!ok(""));
        assert!(!keys.accepts(None));
    }

    #[test]
    fn bad_keys_are_named_not_echoed() {
        for bad in ["short", "has a space in it!!", &"k".repeat(MAX_KEY_LEN + 1)] {
            let err = ApiKeys::new([bad]).unwrap_err().to_string();
            assert!(err.starts_with("--api-key:"), "{err}");
            assert!(!err.contains(bad), "{err} echoes the key");
        }
        assert_eq!(
            format!("{:?}", ApiKeys::new([KEY]).unwrap()),
            "ApiKeys(1 keys)"
        );
    }
}
