//! The configuration file (`--config PATH`, `FANOUT_CONFIG`) against the real binary, with real
//! files in a temporary directory: values from the file are used, a flag and an environment
//! variable each win over the file, and every kind of bad file (unknown key, bad value, bad
//! namespace, bad TOML, unreadable) stops the node with exit status 2 and a message naming the
//! file and the key or line, before it listens.

mod ops_support;

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;

use ops_support::*;

/// A temporary directory of configuration files for one test; removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("fanout-config-file-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    /// Writes `text` to `name` in the directory; returns its path.
    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends a text message of `len` bytes and returns what comes back to the sender, a subscriber
/// of the channel it publishes on: the message itself (`Ok(len)`) or a close (`Err((code,
/// reason))`).
fn round_trip(ws: &mut Ws, len: usize) -> Result<usize, (u16, String)> {
    ws.send_text(&"x".repeat(len));
    let frame = ws.next("the message or a close");
    match frame.close_code() {
        Some(close) => Err(close),
        None => Ok(frame.payload.len()),
    }
}

#[test]
fn max_message_from_the_file_is_used() {
    let dir = Dir::new("used");
    let config = dir.file("fanout.toml", "threads = 1\nmax_message = 1024\n");
    let server = Server::start(&["--config", &config]);
    let mut ws = server.ws("/ws?channel=c");
    assert_eq!(
        round_trip(&mut ws, 1000),
        Ok(1000),
        "under the file's limit"
    );
    let (code, reason) = round_trip(&mut ws, 2000).expect_err("over the file's 1024");
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("1024"), "{reason:?}");
    drop(ws);
    assert_eq!(
        server.wait_metric("fanout_connections_open", 0.0, PATIENCE),
        0.0
    );
}

#[test]
fn a_flag_wins_over_the_file() {
    let dir = Dir::new("flag");
    let config = dir.file("fanout.toml", "threads = 1\nmax_message = 1024\n");
    let server = Server::start(&["--config", &config, "--max-message", "4096"]);
    let mut ws = server.ws("/ws?channel=c");
    assert_eq!(
        round_trip(&mut ws, 2000),
        Ok(2000),
        "the flag's 4096 applies"
    );
    let (code, reason) = round_trip(&mut ws, 5000).expect_err("over the flag's 4096");
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("4096"), "{reason:?}");
}

/// `Server::start` passes no environment, so the check is made where the two values disagree:
/// with the file's max_message (1024) the file's max_queue (2048) is fine; with the
/// environment's (4096) the node must refuse to start, naming the file's max_queue and 4096.
#[test]
fn the_environment_wins_over_the_file() {
    let dir = Dir::new("env");
    let config = dir.file("fanout.toml", "max_message = 1024\nmax_queue = 2048\n");
    let args = [
        "--config",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
    ];
    let (code, stdout, stderr) = run_to_exit(&args, &[("FANOUT_MAX_MESSAGE", "4096")]);
    assert_eq!(code, Some(2), "stderr {stderr:?}");
    assert!(!stdout.contains("listening on"), "{stdout}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "fanout: {config}: line 2: max_queue: 2048 is smaller than --max-message 4096; one message must fit"
        )
    );
    // FANOUT_CONFIG names the file as --config does; a flag wins over it the same way.
    let env = [
        ("FANOUT_CONFIG", config.as_str()),
        ("FANOUT_LISTEN", "127.0.0.1:0"),
    ];
    let (code, _, stderr) = run_to_exit(&["--max-message", "4096", "--threads", "1"], &env);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "fanout: {config}: line 2: max_queue: 2048 is smaller than --max-message 4096"
        )),
        "{stderr:?}"
    );
}

#[test]
fn booleans_and_lists_from_the_file() {
    let dir = Dir::new("kinds");
    let config = dir.file(
        "fanout.toml",
        "threads = 1\ncompression = true\nallowed_origins = [\"https://a.example\", \"https://b.example\"]\n",
    );
    let server = Server::start(&["--config", &config]);
    let offer = |origin: &str| {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let extra = format!("Origin: {origin}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n");
        s.write_all(&upgrade_request("/ws?channel=c", &[], &extra))
            .unwrap();
        read_head(&mut s)
    };
    let head = offer("https://b.example");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Extensions: permessage-deflate"),
        "compression = true: {head}"
    );
    let head = offer("https://evil.example");
    assert!(
        head.starts_with("HTTP/1.1 403"),
        "an origin not in the list: {head}"
    );
}

/// The chat example of the README's "Configuration file" section is a valid file (its Redis
/// and listen address overridden by flags, so nothing outside the test is reached).
#[test]
fn the_readme_example_is_a_valid_file() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("### Configuration file")
        .nth(1)
        .expect("a Configuration file section");
    let example = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a TOML example in the section");
    assert!(example.contains("[[namespace]]"), "{example}");
    let dir = Dir::new("readme");
    let config = dir.file("fanout.toml", example);
    let server = Server::start(&["--config", &config, "--redis=", "--threads", "1"]);
    assert_eq!(server.get("/healthz"), (200, "ok\n".to_string()));
    let mut ws = server.ws("/ws?channel=public:lobby");
    assert_eq!(round_trip(&mut ws, 100), Ok(100));
}

/// A file the node must refuse, and what the message must say besides the file's path.
struct Refused {
    what: &'static str,
    text: &'static str,
    message: &'static str,
}

#[test]
fn bad_files_exit_2_naming_the_file_and_the_key_or_line() {
    let cases = [
        Refused {
            what: "unknown key",
            text: "threads = 1\nmax_mesage = 65536\n",
            message: r#": line 2: unknown key "max_mesage" (did you mean "max_message"?)"#,
        },
        Refused {
            what: "bad value",
            text: "max_message = \"abc\"\n",
            message: r#": line 1: max_message: "abc" is not a whole number"#,
        },
        Refused {
            what: "value the option's parser refuses",
            text: "\nthreads = \"many\"\n",
            message: ": line 2: threads: invalid value 'many' for '--threads",
        },
        Refused {
            what: "wrong type",
            text: "max_message = [1024]\n",
            message: ": line 1: max_message: takes one value, not an array",
        },
        Refused {
            what: "hidden option",
            text: "fault_panic_reactor = 0\n",
            message: r#": line 1: unknown key "fault_panic_reactor""#,
        },
        Refused {
            what: "bad TOML",
            text: "threads = 1\n\nmax_message = \n",
            message: ": line 3: not valid TOML: ",
        },
        Refused {
            what: "unknown rule",
            text: "[[namespace]]\nname = \"public:*\"\n\n[[namespace]]\nname = \"user:*\"\nsubscribe = \"everyone\"\n",
            message: r#": line 6: namespace #2: subscribe: "everyone" is not one of anyone, token, owner"#,
        },
        Refused {
            what: "unknown namespace key",
            text: "[[namespace]]\nname = \"a:*\"\npublsh = \"server\"\n",
            message: r#": line 3: namespace #1: unknown key "publsh" (did you mean "publish"?)"#,
        },
        Refused {
            what: "empty namespace name",
            text: "[[namespace]]\nname = \"\"\n",
            message: ": line 2: namespace #1: name: must not be empty",
        },
    ];
    let dir = Dir::new("bad");
    for (i, case) in cases.iter().enumerate() {
        let path = dir.file(&format!("bad{i}.toml"), case.text);
        let (code, stdout, stderr) =
            run_to_exit(&["--config", &path, "--listen", "127.0.0.1:0"], &[]);
        assert_eq!(code, Some(2), "{}: stderr {stderr:?}", case.what);
        assert!(
            !stdout.contains("listening on"),
            "{}: started: {stdout}",
            case.what
        );
        let want = format!("fanout: {path}{}", case.message);
        assert!(
            stderr.starts_with(&want),
            "{}: expected {want:?}, got {stderr:?}",
            case.what
        );
    }
    // Unreadable: a file that does not exist, and a directory.
    for path in [dir.0.join("missing.toml"), dir.0.clone()] {
        let path = path.to_str().unwrap();
        let (code, _, stderr) = run_to_exit(&["--config", path, "--listen", "127.0.0.1:0"], &[]);
        assert_eq!(code, Some(2), "{path}: stderr {stderr:?}");
        assert!(
            stderr.starts_with(&format!("fanout: {path}: cannot read: ")),
            "{stderr:?}"
        );
    }
}
