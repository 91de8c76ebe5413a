//! The server API's options, `--api-listen` and `--api-key`, checked at start (errors name the
//! option). Kept apart from the API's loop so the configuration depends only on this.

use std::net::SocketAddr;

use anyhow::{bail, Context};

use super::keys::ApiKeys;

/// `--api-listen` and `--api-key`, validated.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub keys: ApiKeys,
}

impl ApiConfig {
    /// `None` without `--api-listen`. Keys are checked either way; at least one is needed with
    /// `--api-listen`. Errors name the option.
    pub fn from_args(listen: Option<&str>, keys: &[String]) -> anyhow::Result<Option<ApiConfig>> {
        let keys = ApiKeys::new(
            keys.iter()
                .flat_map(|k| k.split(','))
                .map(str::trim)
                .filter(|k| !k.is_empty()),
        )?;
        let listen = match listen.map(str::trim) {
            None | Some("") => return Ok(None),
            Some(addr) => addr.parse::<SocketAddr>().with_context(|| {
                format!("--api-listen: {addr:?} is not an IP:PORT address (e.g. 127.0.0.1:8081)")
            })?,
        };
        if keys.is_empty() {
            bail!("--api-key: --api-listen needs at least one API key (--api-key KEY or FANOUT_API_KEY)");
        }
        Ok(Some(ApiConfig { listen, keys }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let key = "0123456789abcdef".to_string();
        assert!(ApiConfig::from_args(None, &[]).unwrap().is_none());
        assert!(ApiConfig::from_args(Some(""), std::slice::from_ref(&key))
            .unwrap()
            .is_none());
        let api = ApiConfig::from_args(Some("127.0.0.1:0"), &[format!("{key},{key}x")])
            .unwrap()
            .unwrap();
        assert_eq!(api.keys.len(), 2);
        let err = |listen: Option<&str>, keys: &[String]| {
            format!("{:#}", ApiConfig::from_args(listen, keys).unwrap_err())
        };
        assert!(err(Some("127.0.0.1:0"), &[]).starts_with("--api-key:"));
        assert!(err(Some("nowhere"), std::slice::from_ref(&key)).starts_with("--api-listen:"));
        assert!(err(None, &["short".into()]).starts_with("--api-key:"));
    }
}
