//! Connection tokens: who a client is, checked once when it connects (and when it refreshes its
//! token), never per message.
//!
//! A token is a JWT the application's backend mints: HS256 with `--token-hmac-secret` (or
//! `--token-hmac-secret-file`), RS256 or ES256 with `--token-public-key`. Only the algorithms of
//! the keys configured are accepted, each with its own key, so an HS256 token signed with an RSA
//! public key as the secret (key confusion) and `alg: none` are refused. Claims: `sub` (the user
//! id), `exp` (required with `--auth required`), `nbf`, and fanout's `channels` (patterns the user
//! may subscribe to), `publish` (patterns the user may publish to) and `info` (any JSON, shown
//! with the user's messages).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Seconds of clock difference between the backend and the node tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;
/// Longest token accepted, in bytes: a request head is at most 8 KiB anyway.
const MAX_TOKEN: usize = 4096;

/// The authentication options, flattened into the node's flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// `off`: tokens are optional (a valid one still names the user); `required`: every
    /// WebSocket needs a valid token, HTTP 401 otherwise.
    #[arg(long, env = "FANOUT_AUTH", default_value = "off")]
    pub auth: String,

    /// Secret for HS256 tokens.
    #[arg(long, env = "FANOUT_TOKEN_HMAC_SECRET", hide_env_values = true)]
    pub token_hmac_secret: Option<String>,

    /// File holding the secret for HS256 tokens (one line; surrounding whitespace ignored).
    #[arg(long, env = "FANOUT_TOKEN_HMAC_SECRET_FILE")]
    pub token_hmac_secret_file: Option<String>,

    /// PEM file with the public key for RS256 (RSA) or ES256 (P-256) tokens.
    #[arg(long, env = "FANOUT_TOKEN_PUBLIC_KEY")]
    pub token_public_key: Option<String>,

    /// Most WebSockets one user (token `sub`) may hold on this node; more get HTTP 429. 0: no limit.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS_PER_USER", default_value = "0")]
    pub max_connections_per_user: String,
}

/// Who a connection belongs to, from its token.
#[derive(Debug)]
pub struct Identity {
    pub user: Box<str>,
    /// Patterns the user may subscribe to (`None`: the claim was absent).
    pub channels: Option<Vec<Box<str>>>,
    /// Patterns the user may publish to.
    pub publish: Option<Vec<Box<str>>>,
    /// The `info` claim, verbatim JSON.
    pub info: Option<Box<RawValue>>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Whether one of `patterns` matches `channel` (`*` alone, a `prefix*`, or the exact name).
    pub fn allows(patterns: Option<&[Box<str>]>, channel: &str) -> bool {
        patterns
            .unwrap_or_default()
            .iter()
            .any(|p| pattern_matches(p, channel))
    }
}

/// `*` matches everything, `prefix*` what starts with the prefix, anything else itself.
pub fn pattern_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    channels: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    info: Option<Box<RawValue>>,
}

/// Checks tokens against the configured keys.
pub struct Verifier {
    required: bool,
    keys: Vec<(Algorithm, DecodingKey)>,
    pub max_per_user: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|(a, _)| a).collect();
        write!(
            f,
            "Verifier {{ required: {}, algorithms: {algs:?} }}",
            self.required
        )
    }
}

impl Verifier {
    /// Reads the keys the options name; errors name the option.
    pub fn from_args(args: &AuthArgs) -> anyhow::Result<Arc<Verifier>> {
        let required = match args.auth.trim() {
            "off" => false,
            "required" => true,
            other => bail!("--auth: {other:?} is neither off nor required"),
        };
        let mut keys = Vec::new();
        let secret = match (&args.token_hmac_secret, &args.token_hmac_secret_file) {
            (Some(_), Some(_)) => {
                bail!("--token-hmac-secret-file: give the secret or a file, not both")
            }
            (Some(s), None) if !s.is_empty() => Some(s.clone()),
            (None, Some(path)) if !path.is_empty() => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("--token-hmac-secret-file: cannot read {path}"))?
                    .trim()
                    .to_string(),
            ),
            _ => None,
        };
        if let Some(secret) = secret {
            if secret.len() < 16 {
                bail!("--token-hmac-secret: shorter than 16 bytes; use a long random secret");
            }
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            ));
        }
        if let Some(path) = args.token_public_key.as_deref().filter(|p| !p.is_empty()) {
            keys.push(public_key(Path::new(path)).context("--token-public-key")?);
        }
        if required && keys.is_empty() {
            bail!("--auth: required, but no key: give --token-hmac-secret, --token-hmac-secret-file or --token-public-key");
        }
        let max_per_user: usize = args.max_connections_per_user.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "--max-connections-per-user: {:?} is not a whole number",
                args.max_connections_per_user
            )
        })?;
        Ok(Arc::new(Verifier {
            required,
            keys,
            max_per_user,
        }))
    }

    /// Whether every WebSocket needs a token.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether any key is configured (without one, tokens cannot be checked).
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks a token's signature and times; the error is the reason a client is told.
    pub fn verify(&self, token: &str) -> Result<Identity, String> {
        if token.len() > MAX_TOKEN {
            return Err(format!("token longer than {MAX_TOKEN} bytes"));
        }
        let alg = header_alg(token)?;
        let Some((alg, key)) = self.keys.iter().find(|(a, _)| format!("{a:?}") == alg) else {
            let accepted: Vec<String> = self.keys.iter().map(|(a, _)| format!("{a:?}")).collect();
            return Err(match alg.as_str() {
                "none" | "None" | "NONE" => "unsigned token (alg none) refused".to_string(),
                _ if accepted.is_empty() => "tokens are not accepted: no key configured".into(),
                _ => format!(
                    "algorithm {alg} not accepted (this server accepts {})",
                    accepted.join(", ")
                ),
            });
        };
        let mut validation = Validation::new(*alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(if self.required {
            &["exp", "sub"][..]
        } else {
            &["sub"][..]
        });
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::InvalidSignature => "bad signature".to_string(),
            ErrorKind::ExpiredSignature => "token expired".to_string(),
            ErrorKind::ImmatureSignature => "token not yet valid (nbf)".to_string(),
            ErrorKind::MissingRequiredClaim(c) => format!("token has no {c:?} claim"),
            ErrorKind::InvalidAlgorithm => "algorithm does not match the key".to_string(),
            ErrorKind::Json(e) => format!("malformed claims: {e}"),
            _ => format!("malformed token: {e}"),
        })?;
        let claims = data.claims;
        let user = claims.sub.unwrap_or_default();
        if user.is_empty() || user.len() > 256 {
            return Err("the sub claim must be 1 to 256 bytes".into());
        }
        let boxed =
            |v: Option<Vec<String>>| v.map(|v| v.into_iter().map(String::into_boxed_str).collect());
        Ok(Identity {
            user: user.into_boxed_str(),
            channels: boxed(claims.channels),
            publish: boxed(claims.publish),
            info: claims.info,
            expires_at: claims.exp,
        })
    }
}

/// The `alg` of a token's header, read before verifying so the error can say what was wrong.
fn header_alg(token: &str) -> Result<String, String> {
    let header = token.split('.').next().unwrap_or("");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| "malformed token: the header is not base64url".to_string())?;
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let h: Header = serde_json::from_slice(&bytes)
        .map_err(|_| "malformed token: the header is not JSON with an alg".to_string())?;
    if token.split('.').count() != 3 {
        return Err("malformed token: not three dot-separated parts".into());
    }
    Ok(h.alg)
}

fn public_key(path: &Path) -> anyhow::Result<(Algorithm, DecodingKey)> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((Algorithm::ES256, key));
    }
    bail!(
        "{} holds neither an RSA nor an EC (P-256) public key in PEM",
        path.display()
    )
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "a-test-secret-of-some-length";

    fn verifier(required: bool) -> Arc<Verifier> {
        Verifier::from_args(&AuthArgs {
            auth: if required { "required" } else { "off" }.into(),
            token_hmac_secret: Some(SECRET.into()),
            max_connections_per_user: "0".into(),
            ..AuthArgs::default()
        })
        .unwrap()
    }

    fn mint(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn good_and_bad_tokens() {
        let v = verifier(true);
        let exp = unix_now() + 60;
        let id = v
            .verify(&mint(
                serde_json::json!({"sub":"42","exp":exp,"channels":["user:#42","public:*"],"info":{"name":"Ann"}}),
                SECRET,
            ))
            .unwrap();
        assert_eq!(&*id.user, "42");
        assert!(Identity::allows(id.channels.as_deref(), "public:x"));
        assert!(!Identity::allows(id.channels.as_deref(), "user:#43"));
        assert_eq!(id.info.unwrap().get(), r#"{"name":"Ann"}"#);
        let cases = [
            (
                mint(
                    serde_json::json!({"sub":"1","exp":exp}),
                    "another-secret-entirely",
                ),
                "bad signature",
            ),
            (
                mint(serde_json::json!({"sub":"1","exp":unix_now() - 60}), SECRET),
                "expired",
            ),
            (mint(serde_json::json!({"sub":"1"}), SECRET), "\"exp\""),
            (mint(serde_json::json!({"exp":exp}), SECRET), "\"sub\""),
            (
                mint(
                    serde_json::json!({"sub":"1","exp":exp,"nbf":unix_now() + 60}),
                    SECRET,
                ),
                "not yet valid",
            ),
            (
                "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.".to_string(),
                "alg none",
            ),
            ("garbage".to_string(), "malformed"),
        ];
        for (token, why) in cases {
            let err = v.verify(&token).unwrap_err();
            assert!(err.contains(why), "{token}: {err} lacks {why}");
        }
        // Auth off: exp is optional.
        assert!(verifier(false)
            .verify(&mint(serde_json::json!({"sub":"1"}), SECRET))
            .is_ok());
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "x"));
        assert!(pattern_matches("user:*", "user:#1"));
        assert!(!pattern_matches("user:*", "users"));
        assert!(pattern_matches("lobby", "lobby"));
        assert!(!pattern_matches("lobby", "lobby2"));
    }

    #[test]
    fn options_are_checked() {
        let bad = |args: AuthArgs| format!("{:#}", Verifier::from_args(&args).unwrap_err());
        let base = AuthArgs {
            auth: "off".into(),
            max_connections_per_user: "0".into(),
            ..AuthArgs::default()
        };
        assert!(bad(AuthArgs {
            auth: "maybe".into(),
            ..base.clone()
        })
        .contains("--auth"));
        assert!(bad(AuthArgs {
            auth: "required".into(),
            ..base.clone()
        })
        .contains("no key"));
        assert!(bad(AuthArgs {
            token_hmac_secret: Some("short".into()),
            ..base.clone()
        })
        .contains("16 bytes"));
        assert!(bad(AuthArgs {
            token_public_key: Some("/nonexistent.pem".into()),
            ..base.clone()
        })
        .contains("--token-public-key"));
    }
}
