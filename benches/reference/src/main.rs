//! fanout-reference: the async reference server fanout is measured against.
//!
//! It implements fanout's raw mode (`GET /ws?channel=NAME`, default `chat`: every text or binary
//! message a client sends goes to every client of that channel, the sender included, text as
//! text and binary as binary) the way a typical tokio user would write it: a
//! `tokio::sync::broadcast` channel per topic in a `Mutex<HashMap>`, one task per connection
//! that selects between its socket and its topic receiver, and a `WebSocketConfig` with modest
//! buffers and a 64 KiB message limit. A receiver that lags behind its topic is closed (1008),
//! the same policy fanout applies to slow consumers.
//!
//! It is deliberately not optimised beyond what the tokio-tungstenite documentation suggests, so
//! that benchmark comparisons measure the design, not a straw man or a tuning contest.
//!
//! Usage: `fanout-reference --listen 127.0.0.1:PORT [--threads N]`. The first stdout line is
//! `listening on ADDR` with the bound address (port 0 picks a free port). SIGTERM or SIGINT
//! stops the process.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Messages a topic buffers for its slowest receiver before that receiver counts as lagging.
/// At 64 KiB per message this bounds a topic's backlog like fanout's 1 MiB `--max-queue` does
/// for typical small chat messages.
const TOPIC_CAPACITY: usize = 1024;

/// The largest message or frame a client may send, fanout's default `--max-message`.
const MAX_MESSAGE: usize = 64 * 1024;

/// Topics by channel name. A topic is created by its first subscriber and removed when the last
/// one leaves, so idle channels cost nothing.
type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>;

struct Options {
    listen: SocketAddr,
    threads: usize,
}

fn parse_args() -> Result<Options, String> {
    let mut listen: SocketAddr = "127.0.0.1:8080".parse().expect("valid default address");
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                listen = v
                    .parse()
                    .map_err(|e| format!("--listen {v:?}: {e} (want IP:PORT)"))?;
            }
            "--threads" => {
                let v = value("--threads")?;
                threads = match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("--threads {v:?}: want a positive integer")),
                };
            }
            "--help" | "-h" => {
                println!("usage: fanout-reference --listen IP:PORT [--threads N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Options { listen, threads })
}

fn main() {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fanout-reference: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()
        .expect("build tokio runtime");
    if let Err(e) = runtime.block_on(serve(options.listen)) {
        eprintln!("fanout-reference: {e}");
        std::process::exit(1);
    }
    // Connection tasks still running are simply dropped: a benchmark server needs no drain.
    runtime.shutdown_background();
}

async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    {
        // Scripts wait for this exact line, so flush it before accepting anything.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let topics: Topics = Arc::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(handle(stream, topics.clone()));
                }
                // Out of file descriptors and similar: keep serving the connections we have.
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    }
}

/// The channel a request asks for, or the HTTP status and reason it earns.
fn channel_of(request: &Request) -> Result<String, (StatusCode, &'static str)> {
    let refuse = |status: StatusCode, why: &'static str| (status, why);
    if request.uri().path() != "/ws" {
        return Err(refuse(StatusCode::NOT_FOUND, "not found"));
    }
    let mut channel = "chat".to_string();
    for pair in request.uri().query().unwrap_or("").split('&') {
        if let Some(value) = pair.strip_prefix("channel=") {
            channel = value.to_string();
        }
    }
    let valid = (1..=128).contains(&channel.len())
        && channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if !valid {
        return Err(refuse(StatusCode::BAD_REQUEST, "bad channel name"));
    }
    Ok(channel)
}

async fn handle(stream: TcpStream, topics: Topics) {
    // Small messages dominate pub/sub traffic: don't let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let mut channel = String::new();
    // The large error type is tungstenite's callback signature, not a choice made here.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| match channel_of(request) {
        Ok(name) => {
            channel = name;
            Ok(response)
        }
        Err((status, why)) => {
            let mut refusal = ErrorResponse::new(Some(why.to_string()));
            *refusal.status_mut() = status;
            Err(refusal)
        }
    };
    let ws = match tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
    {
        Ok(ws) => ws,
        Err(_) => return,
    };

    let (sender, mut receiver) = {
        let mut topics = topics.lock().expect("topics lock");
        let sender = topics
            .entry(channel.clone())
            .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
            .clone();
        let receiver = sender.subscribe();
        (sender, receiver)
    };

    let (mut sink, mut source) = ws.split();
    loop {
        tokio::select! {
            incoming = source.next() => match incoming {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    // No receivers can't happen (we hold one); ignore the impossible error.
                    let _ = sender.send(message);
                }
                // tungstenite answers pings and queues the close echo itself; reading on after
                // a close flushes that echo and then ends the stream.
                None => break,
                Some(Err(error)) => {
                    // tungstenite reports a bad frame but leaves telling the peer to us.
                    let code = match error {
                        WsError::Capacity(_) => CloseCode::Size,
                        WsError::Utf8(_) => CloseCode::Invalid,
                        WsError::Protocol(_) => CloseCode::Protocol,
                        _ => break,
                    };
                    let close = CloseFrame { code, reason: error.to_string().into() };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    break;
                }
                Some(Ok(_)) => {}
            },
            outgoing = receiver.recv() => match outgoing {
                Ok(message) => {
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let close = CloseFrame {
                        code: CloseCode::Policy,
                        reason: "slow consumer".into(),
                    };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    drop(receiver);
    let mut topics = topics.lock().expect("topics lock");
    // Our receiver is gone; if nobody else listens, forget the topic.
    if sender.receiver_count() == 0 {
        topics.remove(&channel);
    }
}
