//! The one real `redis-server` the tests start (ephemeral loopback port, no persistence, an
//! optional password, stopped by PID) and the one RESP2 client they use to look at it: PUBLISH
//! from outside, PUBSUB NUMSUB / CHANNELS, CLIENT LIST, ACL.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, PATIENCE};

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Reply {
    pub fn int(&self) -> i64 {
        match self {
            Reply::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    pub fn text(&self) -> String {
        match self {
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Simple(s) => s.clone(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(items) => items,
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

/// A command as a RESP array of bulk strings.
pub fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one whole reply.
pub fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(io::Error::other(format!("truncated reply line {line:?}")));
    }
    let line = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
    let (kind, rest) = line.split_at(1);
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| io::Error::other(format!("bad length in {line:?}")))
    };
    Ok(match kind {
        "+" => Reply::Simple(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(number()?),
        "$" => match number()? {
            n if n < 0 => Reply::Bulk(None),
            n => {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Reply::Bulk(Some(buf))
            }
        },
        "*" => {
            let n = number()?.max(0);
            let mut items = Vec::new();
            for _ in 0..n {
                items.push(read_reply(r)?);
            }
            Reply::Array(items)
        }
        _ => return Err(io::Error::other(format!("unknown reply {line:?}"))),
    })
}

/// One connection to a test Redis; `AUTH`s first when a password is given.
pub struct RedisConn {
    reader: BufReader<TcpStream>,
}

impl RedisConn {
    pub fn try_open(port: u16, password: Option<&str>) -> io::Result<RedisConn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(PATIENCE))?;
        let mut conn = RedisConn {
            reader: BufReader::new(stream),
        };
        if let Some(pw) = password {
            conn.send(&[b"AUTH", pw.as_bytes()])?;
            match conn.read()? {
                Reply::Simple(ok) if ok == "OK" => {}
                other => return Err(io::Error::other(format!("AUTH: {other:?}"))),
            }
        }
        Ok(conn)
    }

    pub fn open(port: u16, password: Option<&str>) -> RedisConn {
        RedisConn::try_open(port, password).expect("connect to the test's redis-server")
    }

    pub fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        self.reader.get_mut().write_all(&resp_command(args))
    }

    pub fn read(&mut self) -> io::Result<Reply> {
        read_reply(&mut self.reader)
    }

    pub fn call(&mut self, args: &[&[u8]]) -> Reply {
        self.send(args).expect("write to redis");
        self.read().expect("redis reply")
    }
}

/// The lines of a `CLIENT LIST` reply for connections named `fanout`.
pub fn fanout_client_lines(client_list: &str) -> Vec<String> {
    client_list
        .lines()
        .filter(|l| l.contains(" name=fanout "))
        .map(str::to_string)
        .collect()
}

/// The channel on which nodes tell each other what their server API was asked (after
/// `--redis-prefix`); no client channel can have this name.
pub const CONTROL_CHANNEL: &str = "__fanout/control";

/// A throwaway redis-server on a loopback port; killed (by PID) when dropped.
pub struct Redis {
    pub port: u16,
    password: Option<String>,
    /// More `redis-server` arguments (the TLS fixture's `--tls-port` and certificates).
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        Redis::start_with_args(port, Vec::new())
    }

    /// A Redis on plain port `port` with more `redis-server` arguments.
    pub fn start_with_args(port: u16, extra_args: Vec<String>) -> Redis {
        let mut r = Redis {
            port,
            password: None,
            extra_args,
            child: None,
        };
        r.restart();
        r
    }

    /// A Redis that refuses every command before `AUTH password` (`--requirepass`).
    pub fn start_with_password(password: &str) -> Redis {
        let mut r = Redis {
            port: free_port(),
            password: Some(password.to_string()),
            extra_args: Vec::new(),
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis://AUTH@127.0.0.1:PORT/DB`, AUTH being `:password` or `user:password`.
    pub fn url_with(&self, auth: &str, db: u32) -> String {
        format!("redis://{auth}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut args = vec![
                "--port".to_string(),
                self.port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
                "--protected-mode".into(),
                "no".into(),
            ];
            if let Some(pw) = &self.password {
                args.extend(["--requirepass".to_string(), pw.clone()]);
            }
            args.extend(self.extra_args.iter().cloned());
            let mut child = Command::new("redis-server")
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (tests/setup installs it)");
            // A port taken meanwhile makes redis-server exit: try again (same port: the test
            // asked for it, e.g. to restart Redis where the nodes expect it).
            let up_by = Instant::now() + Duration::from_secs(3);
            while Instant::now() < up_by {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                if self.ping() {
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills Redis hard (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn ping(&self) -> bool {
        let Ok(mut c) = RedisConn::try_open(self.port, self.password.as_deref()) else {
            return false;
        };
        let _ = c
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(500)));
        c.send(&[b"PING"]).is_ok() && matches!(c.read(), Ok(Reply::Simple(p)) if p == "PONG")
    }

    /// A new connection, authenticated when the server has a password.
    pub fn conn(&self) -> RedisConn {
        RedisConn::open(self.port, self.password.as_deref())
    }

    /// One command on a new connection.
    pub fn call(&self, args: &[&[u8]]) -> Reply {
        self.conn().call(args)
    }

    /// Sends one command and returns the raw reply bytes.
    pub fn command(&self, args: &[&str]) -> Vec<u8> {
        let mut c = self.conn();
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        c.send(&args).expect("write to redis");
        let mut buf = vec![0u8; 4096];
        let n = c.reader.read(&mut buf).unwrap_or(0);
        buf.truncate(n);
        buf
    }

    /// `PUBLISH`; returns how many Redis subscribers (node reactor links) received it.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        self.call(&[b"PUBLISH", channel.as_bytes(), payload]).int()
    }

    pub fn numsub(&self, channel: &str) -> i64 {
        self.call(&[b"PUBSUB", b"NUMSUB", channel.as_bytes()])
            .items()[1]
            .int()
    }

    /// Polls `PUBSUB NUMSUB` until it equals `want`; returns the last value seen.
    pub fn wait_numsub(&self, channel: &str, want: i64, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.numsub(channel);
            if n == want || Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The channels Redis lists for its subscribers, without the nodes' own control channel
    /// ([`CONTROL_CHANNEL`], which every fanout node subscribes to whatever its clients do).
    pub fn pubsub_channels(&self) -> Vec<String> {
        self.call(&[b"PUBSUB", b"CHANNELS"])
            .items()
            .iter()
            .map(Reply::text)
            .filter(|c| !c.ends_with(CONTROL_CHANNEL))
            .collect()
    }

    /// Lines of `CLIENT LIST` for connections named `fanout` (what every reactor link calls
    /// itself).
    pub fn fanout_links(&self) -> Vec<String> {
        fanout_client_lines(&self.call(&[b"CLIENT", b"LIST"]).text())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
