//! Who published a message, carried through Redis: nodes receive only the payload, so a message
//! from an authenticated client travels with a small header naming its user, which the
//! receiving node strips before any subscriber sees the message.
//!
//! Wire form: `MAGIC` + `{"user":"42","info":{...}}` + `\n` + the payload. A payload that
//! happens to begin like any fanout header (`MAGIC_PREFIX`) is wrapped (with an empty header) even when anonymous, so no
//! client can forge a user by publishing bytes that look like a header. Other Redis clients
//! publish plain payloads, which reach subscribers as they are.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::Identity;

/// Starts every wrapped payload; NUL bytes make it unlikely in any text a client sends.
pub const MAGIC: &[u8] = b"\0fanout-origin\0";
/// How every header fanout puts in a Redis payload starts (this one, and the history offset of
/// [`crate::broker::streams`]): a client payload that starts so is always wrapped.
pub const MAGIC_PREFIX: &[u8] = b"\0fanout-";

/// The payload to PUBLISH for a message `from` published (shared, not copied, when there is
/// nothing to add).
pub fn wrap(payload: Bytes, from: Option<&Identity>) -> Bytes {
    if from.is_none() && !payload.starts_with(MAGIC_PREFIX) {
        return payload;
    }
    let mut header = Vec::with_capacity(64);
    header.push(b'{');
    if let Some(from) = from {
        header.extend_from_slice(b"\"user\":");
        serde_json::to_writer(&mut header, &*from.user).expect("writing to a Vec cannot fail");
        if let Some(info) = &from.info {
            header.extend_from_slice(b",\"info\":");
            header.extend_from_slice(info.get().as_bytes());
        }
    }
    header.push(b'}');
    let mut out = BytesMut::with_capacity(MAGIC.len() + header.len() + 1 + payload.len());
    out.put_slice(MAGIC);
    out.put_slice(&header);
    out.put_u8(b'\n');
    out.put_slice(&payload);
    out.freeze()
}

#[derive(Deserialize)]
struct Header {
    user: Option<String>,
    info: Option<Box<RawValue>>,
}

/// Splits what Redis delivered into its publisher and the payload (a slice of the same
/// buffer). A header that does not parse leaves the message as it came.
pub fn unwrap(payload: Bytes) -> (Option<Arc<Identity>>, Bytes) {
    if !payload.starts_with(MAGIC) {
        return (None, payload);
    }
    let rest = &payload[MAGIC.len()..];
    let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
        return (None, payload);
    };
    let Ok(header) = serde_json::from_slice::<Header>(&rest[..newline]) else {
        return (None, payload);
    };
    let body = payload.slice(MAGIC.len() + newline + 1..);
    let from = header.user.map(|user| {
        Arc::new(Identity {
            user: user.into_boxed_str(),
            channels: None,
            publish: None,
            info: header.info,
            expires_at: None,
        })
    });
    (from, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(user: &str, info: Option<&str>) -> Identity {
        Identity {
            user: user.into(),
            channels: None,
            publish: None,
            info: info.map(|i| RawValue::from_string(i.to_string()).unwrap()),
            expires_at: None,
        }
    }

    #[test]
    fn round_trip() {
        let plain = Bytes::from_static(b"hello");
        assert_eq!(wrap(plain.clone(), None), plain);
        assert_eq!(unwrap(plain.clone()).1, plain);
        let from = identity("4\"2", Some(r#"{"name":"Ann"}"#));
        let (got, body) = unwrap(wrap(plain.clone(), Some(&from)));
        let got = got.unwrap();
        assert_eq!((&*got.user, body), ("4\"2", plain));
        assert_eq!(got.info.as_ref().unwrap().get(), r#"{"name":"Ann"}"#);
    }

    #[test]
    fn a_forged_header_is_only_data() {
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(b"{\"user\":\"admin\"}\nhi");
        let forged = Bytes::from(forged);
        let sent = wrap(forged.clone(), None);
        let (from, body) = unwrap(sent);
        assert!(from.is_none());
        assert_eq!(body, forged);
    }
}
