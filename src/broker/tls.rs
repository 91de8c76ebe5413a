//! TLS to Redis (`rediss://`): the byte stream a [`RedisLink`](super::redis::RedisLink) speaks
//! RESP over, either the plain mio `TcpStream` or a rustls `ClientConnection` on top of it.
//!
//! Why by hand, and not a TLS stream from an async runtime or a blocking wrapper: the link lives
//! on the Redis reactor's own mio `Poll` (reactor 0), which must never block and starts no
//! threads. So the TLS session is driven from that loop's readiness events like the plain socket
//! is: [`Stream::read`] feeds what the socket has to rustls and hands back the plaintext,
//! [`Stream::write`] encrypts what fits and writes the records, [`Stream::flush`] pushes records
//! that are still pending (the handshake's included) on a writable event. Both directions end in
//! `WouldBlock` exactly where the socket does, so mio's edge-triggered readiness keeps working.
//!
//! Backpressure: rustls's own buffers (plaintext written before the handshake is done, and TLS
//! records not yet on the socket) are capped at [`TLS_BUFFER`] by `set_buffer_limit`; a write
//! that does not fit takes only part, or fails with `WouldBlock`, so the link's write buffer stays
//! the one place that holds the backlog (and the one its `MAX_BACKLOG` bounds).
//!
//! Errors say exactly what failed: a certificate that does not verify is an `io::Error` whose
//! message is `TLS: invalid peer certificate: UnknownIssuer`, an alert from the server
//! `TLS: received fatal alert: ...`. Each link has its own `Stream` and session; only the
//! [`ClientConfig`] (trusted roots, protocol versions) is built once per node, by
//! [`client_config`], and shared by every link (one per Redis Cluster shard).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::CertificateDer;

/// Cap on rustls's buffered outgoing data (plaintext waiting for the handshake, or TLS records
/// waiting for the socket). Four full records: enough for one writev to fill a socket buffer.
pub const TLS_BUFFER: usize = 64 * 1024;

/// Bytes read from the socket per system call before they are handed to rustls (rustls itself
/// asks for at most 4 KiB per read).
const SOCKET_READ: usize = 64 * 1024;

/// The trusted roots for `rediss://`: the operating system's (rustls-native-certs), plus every
/// certificate of the PEM file `ca_file` (`--redis-ca-file`). Errors name the file and what was
/// wrong with it; system roots that fail to load are only logged (the CA file may be all that
/// is needed).
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        log::debug!("redis: TLS: cannot load a system root certificate: {e}");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    log::debug!("redis: TLS: {added} system root certificates ({ignored} unusable)");
    if let Some(path) = ca_file {
        let added = add_pem_file(&mut roots, path)?;
        log::debug!(
            "redis: TLS: {added} CA certificates from {}",
            path.display()
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS: no protocol version supported")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Adds every certificate of a PEM file to `roots`; returns how many.
fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> anyhow::Result<usize> {
    let name = path.display();
    let pem = std::fs::read(path).with_context(|| format!("cannot read {name}"))?;
    let mut added = 0;
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let n = i + 1;
        let cert = cert.map_err(|e| match e {
            pem::Error::MissingSectionEnd { end_marker } => anyhow::anyhow!(
                "{name}: certificate {n}: no -----END {}----- line",
                String::from_utf8_lossy(&end_marker)
            ),
            e => anyhow::anyhow!("{name}: certificate {n}: bad PEM: {e}"),
        })?;
        roots.add(cert).map_err(|e| {
            let why = match e {
                rustls::Error::InvalidCertificate(e) => format!("{e:?}"),
                e => e.to_string(),
            };
            anyhow::anyhow!("{name}: certificate {n} is not a usable CA certificate: {why}")
        })?;
        added += 1;
    }
    if added == 0 {
        bail!("{name} holds no PEM certificate (no -----BEGIN CERTIFICATE----- section)");
    }
    Ok(added)
}

/// The name a Redis server's certificate must carry: a DNS name or an IP address (as written in
/// the URL, without brackets for IPv6).
pub fn server_name(host: &str) -> anyhow::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| anyhow::anyhow!("{host:?} is not a DNS name or IP address for TLS: {e}"))
}

/// A connection to Redis: plain TCP, or TLS over it. Both are nonblocking.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// A rustls client session over a nonblocking socket.
pub struct TlsStream {
    tcp: TcpStream,
    conn: ClientConnection,
    /// Where the socket goes, for error messages (`peer_addr` fails once it is reset).
    peer: SocketAddr,
    /// Bytes read from the socket and not yet taken by rustls: `rx[rx_at..rx_len]`.
    rx: Box<[u8]>,
    rx_at: usize,
    rx_len: usize,
}

impl Stream {
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream::Plain(tcp)
    }

    /// A TLS client session for `host` (the name the certificate must carry) on `tcp`, a socket
    /// connecting to `peer`. Nothing is sent yet: the ClientHello goes out on the first
    /// [`Stream::write`] or [`Stream::flush`].
    pub fn tls(
        tcp: TcpStream,
        peer: SocketAddr,
        config: Arc<ClientConfig>,
        host: &str,
    ) -> io::Result<Stream> {
        let name = server_name(host)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS: {e}")))?;
        let mut conn = ClientConnection::new(config, name).map_err(tls_error)?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        Ok(Stream::Tls(Box::new(TlsStream {
            tcp,
            conn,
            peer,
            rx: vec![0; SOCKET_READ].into_boxed_slice(),
            rx_at: 0,
            rx_len: 0,
        })))
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &tls.tcp,
        }
    }

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &mut tls.tcp,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Whether the TLS handshake is still going on (never, for a plain stream).
    pub fn is_handshaking(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(tls) => tls.conn.is_handshaking(),
        }
    }

    /// Whether a nonblocking connect has completed: `Ok(true)` connected, `Ok(false)` still
    /// under way (wait for the next event), `Err` failed (refused, unreachable). Call it on the
    /// socket's first readiness events.
    pub fn connect_done(&mut self) -> io::Result<bool> {
        let tcp = self.tcp();
        if let Some(e) = tcp.take_error()? {
            return Err(e);
        }
        match tcp.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.tcp().set_nodelay(nodelay)
    }

    /// Why the connection failed, as the link logs it: during a TLS handshake
    /// `TLS handshake with ADDR failed: REASON` (whatever the reason: a certificate refused, an
    /// alert, a server that never answers because the port speaks no TLS), otherwise `why`.
    pub fn explain(&self, why: &str) -> String {
        match self {
            Stream::Tls(tls) if tls.conn.is_handshaking() => {
                let reason = why.strip_prefix("TLS: ").unwrap_or(why);
                format!("TLS handshake with {} failed: {reason}", tls.peer)
            }
            _ => why.to_string(),
        }
    }
}

/// An `io::Error` naming what rustls refused, e.g. `TLS: invalid peer certificate: UnknownIssuer`.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsStream {
    /// Writes pending TLS records until none is left (`Ok(true)`) or the socket is full
    /// (`Ok(false)`: a writable event follows).
    fn send_records(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Hands rustls more TLS bytes: from what the last socket read left, else from one new
    /// socket read. `Ok(0)` means the socket reached EOF (rustls has been told).
    fn receive(&mut self) -> io::Result<usize> {
        if self.rx_at == self.rx_len {
            let n = loop {
                match self.tcp.read(&mut self.rx) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                // rustls learns of the EOF from a reader that has nothing more.
                return self.conn.read_tls(&mut io::empty());
            }
            (self.rx_at, self.rx_len) = (0, n);
        }
        // Never an empty slice here: rustls would take it for EOF.
        let mut unread = &self.rx[self.rx_at..self.rx_len];
        let n = self.conn.read_tls(&mut unread)?;
        self.rx_at += n;
        Ok(n)
    }
}

impl Read for Stream {
    /// Plaintext from Redis. For TLS: reads the socket into rustls, processes the records
    /// (handshake included) and returns what they decrypt to; `WouldBlock` only once the socket
    /// has nothing more, `Ok(0)` at the end of the connection (with or without close_notify:
    /// Redis often closes without one, and a link treats either as the link going down).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let tls = match self {
            Stream::Plain(tcp) => return tcp.read(buf),
            Stream::Tls(tls) => tls,
        };
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match tls.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match tls.receive() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Answers the records just processed may call for (the handshake's next
                    // flight, a key update) go out now, not only when the link has data to write.
                    tls.send_records()?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
            if let Err(e) = tls.conn.process_new_packets() {
                // rustls queued an alert telling the server why; send it if the socket takes it.
                let _ = tls.send_records();
                return Err(tls_error(e));
            }
        }
    }
}

impl Write for Stream {
    /// Takes as much of `buf` as the socket (plain) or rustls's capped buffer (TLS) accepts;
    /// `WouldBlock` when nothing fits. For TLS the records are written at once, as far as the
    /// socket takes them; before the handshake completes the plaintext waits inside rustls
    /// (bounded by [`TLS_BUFFER`]) and goes out when it does.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let tls = match self {
            Stream::Plain(tcp) => return tcp.write(buf),
            Stream::Tls(tls) => tls,
        };
        if buf.is_empty() {
            return Ok(0);
        }
        tls.send_records()?;
        let n = tls.conn.writer().write(buf)?;
        tls.send_records()?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Writes TLS records still pending (the handshake's too); `WouldBlock` if the socket could
    /// not take them all (a writable event follows). Nothing to do for a plain stream.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(tls) => match tls.send_records()? {
                true => Ok(()),
                false => Err(io::ErrorKind::WouldBlock.into()),
            },
        }
    }
}

/// Registration is that of the socket underneath.
impl Source for Stream {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.tcp_mut().register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.tcp_mut().reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.tcp_mut().deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in the temporary directory (named after the process, so runs do not collide).
    fn temp_file(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("fanout-tls-unit-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// The error `client_config` gives for `path` (removed afterwards if it is a temporary file).
    fn error_of(path: &Path) -> String {
        let err = format!("{:#}", client_config(Some(path)).unwrap_err());
        if path.starts_with(std::env::temp_dir()) {
            let _ = std::fs::remove_file(path);
        }
        err
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let path = Path::new("/nonexistent/fanout-ca.pem");
        let err = error_of(path);
        assert!(
            err.contains("/nonexistent/fanout-ca.pem") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        for (name, contents) in [
            ("empty.pem", &b""[..]),
            ("text.pem", b"just some text\n"),
            (
                "key.pem",
                b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
            ),
        ] {
            let path = temp_file(name, contents);
            let err = error_of(&path);
            assert!(
                err.contains(&path.display().to_string()) && err.contains("no PEM certificate"),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn a_broken_certificate_is_named_with_its_file() {
        let unterminated = temp_file("unterminated.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n");
        let err = error_of(&unterminated);
        assert!(
            err.contains("unterminated.pem") && err.contains("certificate 1"),
            "{err}"
        );
        // Valid PEM and base64, but not DER of a certificate.
        let garbage = temp_file(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
        );
        let err = error_of(&garbage);
        assert!(
            err.contains("garbage.pem") && err.contains("certificate 1"),
            "{err}"
        );
    }

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        assert!(server_name("redis.example").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("::1").is_ok());
        assert!(server_name("not a name").is_err());
    }

    #[test]
    fn system_roots_alone_make_a_config() {
        client_config(None).expect("a config without --redis-ca-file");
    }

    /// Runs the `openssl` CLI in `dir`.
    fn openssl(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl CLI (tests/setup installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA (`ca.pem`) and a certificate for 127.0.0.1 it signed (`server.pem`, `server.key`).
    fn loopback_certs(dir: &Path) {
        std::fs::write(
            dir.join("req.cnf"),
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n[v3_ca]\n\
             basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("server.ext"),
            "basicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n\
             subjectAltName = IP:127.0.0.1\n",
        )
        .unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec!["req", "-x509", "-new", "-nodes", "-config", "req.cnf"];
        ca.extend(["-extensions", "v3_ca", "-days", "2", "-subj", "/CN=unit CA"]);
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        openssl(dir, &ca);
        let mut csr = vec![
            "req", "-new", "-nodes", "-config", "req.cnf", "-subj", "/CN=s",
        ];
        csr.extend(ec);
        csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
        openssl(dir, &csr);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                "7",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        );
    }

    /// Polls `poll` once (100 ms at most; nothing is timed, the callers loop until done).
    fn turn(poll: &mut mio::Poll, events: &mut mio::Events) {
        poll.poll(events, Some(std::time::Duration::from_millis(100)))
            .unwrap();
    }

    /// Drives a `Stream` the way a link does, against a blocking rustls server on a thread:
    /// the handshake completes on events alone (nothing to write), a writer that outruns a
    /// server that does not read gets partial writes and then `WouldBlock` with a bounded amount
    /// accepted, everything arrives once the server reads, and the server's answer is read back.
    #[test]
    fn a_tls_stream_handshakes_and_applies_backpressure_on_a_nonblocking_socket() {
        use rustls::pki_types::PrivateKeyDer;
        use std::sync::mpsc;

        const TOTAL: usize = 8 << 20;
        let dir = std::env::temp_dir().join(format!("fanout-tls-stream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        loopback_certs(&dir);

        let certs: Vec<_> = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let server_config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&listener)
            .set_recv_buffer_size(64 * 1024)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (go, wait_go) = mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(server_config).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            // Handshake, then one byte from the client: proof the session works.
            let mut first = [0u8; 1];
            tls.read_exact(&mut first).unwrap();
            assert_eq!(first[0], b'!');
            // Read nothing more until told, so the client's socket fills.
            wait_go.recv().unwrap();
            let (mut got, mut sum) = (0usize, 0u64);
            let mut buf = vec![0u8; 64 * 1024];
            while got < TOTAL {
                let n = tls.read(&mut buf).unwrap();
                assert!(n > 0, "EOF after {got} bytes");
                sum = buf[..n]
                    .iter()
                    .fold(sum, |s, &b| s.wrapping_mul(31).wrapping_add(b as u64));
                got += n;
            }
            tls.write_all(format!("{got} {sum}\n").as_bytes()).unwrap();
            tls.flush().unwrap();
        });

        let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let want_sum = data
            .iter()
            .fold(0u64, |s, &b| s.wrapping_mul(31).wrapping_add(b as u64));
        let config = client_config(Some(&dir.join("ca.pem"))).unwrap();
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(16);
        let tcp = TcpStream::connect(addr).unwrap();
        socket2::SockRef::from(&tcp)
            .set_send_buffer_size(64 * 1024)
            .unwrap();
        let mut stream = Stream::tls(tcp, addr, config, "127.0.0.1").unwrap();
        let token = Token(1);
        poll.registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .unwrap();

        // Connect, then handshake on readiness events with nothing to write: only `flush`
        // (on writable) and `read` (on readable) run, as in a link with an empty write buffer.
        while !stream.connect_done().unwrap() {
            turn(&mut poll, &mut events);
        }
        let mut scratch = [0u8; 1024];
        while stream.is_handshaking() {
            turn(&mut poll, &mut events);
            match stream.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("flush during the handshake: {e}"),
            }
            match stream.read(&mut scratch) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("read during the handshake: {other:?}"),
            }
        }
        assert_eq!(stream.write(b"!").unwrap(), 1);

        // The server reads nothing now: writes are partial (rustls takes at most TLS_BUFFER at
        // once), then refused with WouldBlock once the socket is full.
        let mut sent = 0;
        let mut partial = false;
        loop {
            match stream.write(&data[sent..]) {
                Ok(n) => {
                    assert!(n <= TLS_BUFFER, "rustls took {n} bytes at once");
                    partial |= n < data.len() - sent;
                    sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
            assert!(sent < TOTAL, "a server that reads nothing took everything");
        }
        assert!(partial, "no partial write");
        // What was accepted is on the sockets or in rustls's capped buffer, nothing more.
        assert!(
            sent < 4 << 20,
            "{sent} bytes accepted with the server not reading"
        );
        assert!(
            matches!(stream.write(&data[sent..]), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "still full"
        );

        // The server reads: the rest goes out as writable events come, then its answer comes back.
        go.send(()).unwrap();
        let mut answer = Vec::new();
        let mut eof = false;
        while !answer.ends_with(b"\n") {
            if eof {
                // Gone before answering: the server thread's panic says why.
                server.join().unwrap();
                panic!("EOF before the answer; got {answer:?}");
            }
            turn(&mut poll, &mut events);
            while sent < TOTAL {
                match stream.write(&data[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write: {e}"),
                }
            }
            if sent == TOTAL {
                match stream.flush() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("flush: {e}"),
                }
            }
            // The server answers and hangs up: the answer and the EOF may come in one turn.
            while !eof {
                match stream.read(&mut scratch) {
                    Ok(0) => eof = true,
                    Ok(n) => answer.extend_from_slice(&scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            format!("{TOTAL} {want_sum}\n")
        );
        server.join().unwrap();
        // The server is gone (EOF, with or without close_notify): the stream reports the end.
        while !eof {
            match stream.read(&mut scratch) {
                Ok(0) => eof = true,
                Ok(n) => panic!("{n} unexpected bytes"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => turn(&mut poll, &mut events),
                Err(e) => panic!("read at the end: {e}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A certificate from a CA the client does not trust fails the handshake with an error
    /// that says so, and `explain` phrases it for the log.
    #[test]
    fn an_untrusted_certificate_is_a_named_error() {
        use rustls::pki_types::PrivateKeyDer;

        let dir = std::env::temp_dir().join(format!("fanout-tls-untrusted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        loopback_certs(&dir);
        let certs: Vec<_> = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let server_config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(server_config).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut byte = [0u8; 1];
            // The client refuses the certificate: the server sees an alert or EOF.
            assert!(tls.read_exact(&mut byte).is_err());
        });
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(16);
        let tcp = TcpStream::connect(addr).unwrap();
        // System roots only: they do not know the unit test's CA.
        let mut stream = Stream::tls(tcp, addr, client_config(None).unwrap(), "127.0.0.1").unwrap();
        poll.registry()
            .register(
                &mut stream,
                Token(1),
                Interest::READABLE | Interest::WRITABLE,
            )
            .unwrap();
        let mut scratch = [0u8; 64];
        let error = loop {
            turn(&mut poll, &mut events);
            if !stream.connect_done().unwrap() {
                continue;
            }
            match stream.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break e,
            }
            match stream.read(&mut scratch) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break e,
                Ok(n) => panic!("read {n} bytes from an untrusted server"),
            }
        };
        assert_eq!(
            error.to_string(),
            "TLS: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(
            stream.explain(&error.to_string()),
            format!("TLS handshake with {addr} failed: invalid peer certificate: UnknownIssuer")
        );
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
