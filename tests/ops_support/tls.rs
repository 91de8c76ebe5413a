//! Redis with TLS for the `rediss://` tests: a throwaway CA and server certificates made by the
//! `openssl` CLI in a temporary directory ([`Certs`]), and a `redis-server` that serves TLS on one
//! port and plain RESP on another ([`TlsRedis`]). The plain port is the test's own: PUBLISH,
//! PUBSUB NUMSUB and CLIENT LIST through [`RedisConn`], while the nodes use the TLS port.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{free_port, Redis};

/// A temporary directory with a test CA (`ca.pem`, `ca.key`); removed when dropped.
pub struct Certs {
    pub dir: PathBuf,
    /// The CA certificate, for `--redis-ca-file`.
    pub ca: PathBuf,
    ca_key: PathBuf,
}

/// A server certificate and its key, signed by a [`Certs`] CA.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("the openssl CLI must be installed (tests/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OpenSSL config for `req`: no prompts, a CA extension section.
const REQ_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
";

impl Certs {
    /// A new CA (ECDSA P-256, valid for 30 days) in a fresh temporary directory.
    pub fn new() -> Certs {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fanout-tls-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("req.cnf"), REQ_CONFIG).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-new",
                "-nodes",
                "-config",
                "req.cnf",
                "-extensions",
                "v3_ca",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-sha256",
                "-days",
                "30",
                "-subj",
                "/CN=fanout test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        );
        Certs {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            dir,
        }
    }

    /// A server certificate `NAME.pem` (key `NAME.key`) for the subjectAltName `san`, e.g.
    /// `IP:127.0.0.1,DNS:localhost`, signed by this CA. It may also serve as a client's (the
    /// nodes of a TLS Redis Cluster present it to each other on the cluster bus).
    pub fn server(&self, name: &str, san: &str) -> ServerCert {
        let ext = format!(
            "basicConstraints = CA:FALSE\n\
             keyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = serverAuth,clientAuth\n\
             subjectAltName = {san}\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid\n"
        );
        let (ext_file, csr, cert, key) = (
            format!("{name}.ext"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.key"),
        );
        std::fs::write(self.dir.join(&ext_file), ext).unwrap();
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-nodes",
                "-config",
                "req.cnf",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        let serial = format!(
            "0x{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                self.ca.to_str().unwrap(),
                "-CAkey",
                self.ca_key.to_str().unwrap(),
                "-set_serial",
                &serial,
                "-sha256",
                "-days",
                "30",
                "-extfile",
                &ext_file,
                "-out",
                &cert,
            ],
        );
        ServerCert {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        }
    }

    /// A file in the certificate directory with `contents` (for bad `--redis-ca-file`s).
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Default for Certs {
    fn default() -> Certs {
        Certs::new()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` with TLS on `tls_port` (server certificate `cert`, no client certificates
/// asked for) and plain RESP on `redis.port` for the test's own commands; stopped by PID when
/// dropped. `redis.kill()` / `redis.restart()` stop and start it on the same two ports.
pub struct TlsRedis {
    pub redis: Redis,
    pub tls_port: u16,
}

impl TlsRedis {
    pub fn start(certs: &Certs, cert: &ServerCert) -> TlsRedis {
        let tls_port = free_port();
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let args = vec![
            "--tls-port".to_string(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            path(&cert.cert),
            "--tls-key-file".into(),
            path(&cert.key),
            "--tls-ca-cert-file".into(),
            path(&certs.ca),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        TlsRedis {
            redis: Redis::start_with_args(free_port(), args),
            tls_port,
        }
    }

    /// `rediss://127.0.0.1:TLS_PORT`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port)
    }

    /// Lines of `CLIENT LIST` of the links named `fanout` that came in on the TLS port.
    pub fn fanout_tls_links(&self) -> Vec<String> {
        let laddr = format!(" laddr=127.0.0.1:{} ", self.tls_port);
        self.redis
            .fanout_links()
            .into_iter()
            .filter(|l| l.contains(&laddr))
            .collect()
    }
}
