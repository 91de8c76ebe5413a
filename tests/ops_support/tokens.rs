//! Connection tokens for the tests: HS256 ones minted with a shared secret, RS256 and ES256 ones
//! with keys the `openssl` CLI generates into a temporary directory (removed on drop), and the
//! forged kinds a hostile client would try.

use std::path::PathBuf;
use std::process::Command;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

/// The HS256 secret the tests give `--token-hmac-secret`.
pub const SECRET: &str = "fanout-test-secret-0123456789";

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn hs256(claims: &Value) -> String {
    hs256_with(claims, SECRET.as_bytes())
}

pub fn hs256_with(claims: &Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// An unsigned token (`alg: none`), which no server may accept.
pub fn unsigned(claims: &Value) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

/// An RSA and a P-256 key pair in PEM files.
pub struct KeyPairs {
    dir: PathBuf,
}

impl KeyPairs {
    pub fn generate() -> KeyPairs {
        let dir = std::env::temp_dir().join(format!(
            "fanout-keys-{}-{}",
            std::process::id(),
            super::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ]);
        run(&["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"]);
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ]);
        run(&["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"]);
        KeyPairs { dir }
    }

    pub fn rsa_public(&self) -> String {
        self.dir.join("rsa.pub.pem").display().to_string()
    }

    pub fn ec_public(&self) -> String {
        self.dir.join("ec.pub.pem").display().to_string()
    }

    pub fn rs256(&self, claims: &Value) -> String {
        let pem = std::fs::read(self.dir.join("rsa.pem")).unwrap();
        let key = EncodingKey::from_rsa_pem(&pem).unwrap();
        encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
    }

    pub fn es256(&self, claims: &Value) -> String {
        let pem = std::fs::read(self.dir.join("ec.pem")).unwrap();
        let key = EncodingKey::from_ec_pem(&pem).unwrap();
        encode(&Header::new(Algorithm::ES256), claims, &key).unwrap()
    }

    /// An HS256 token whose "secret" is the RSA public key: the classic key-confusion forgery
    /// against servers that pick the algorithm from the token.
    pub fn key_confused(&self, claims: &Value) -> String {
        let public = std::fs::read(self.dir.join("rsa.pub.pem")).unwrap();
        hs256_with(claims, &public)
    }
}

impl Drop for KeyPairs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
