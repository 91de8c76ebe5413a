//! fanout-reference-axum: fanout's raw mode written the way axum's docs and its `chat` example
//! write a WebSocket broadcast server, one of the async references fanout is measured against.
//!
//! The raw-mode contract is the same as `benches/reference` (`GET /ws?channel=NAME`, default
//! `chat`: every text or binary message a client sends goes to every client of that channel,
//! the sender included, text as text and binary as binary; messages up to 64 KiB; pings
//! answered; a receiver more than 1024 messages behind its channel is closed 1008).
//!
//! How it is built, following axum's `chat` example: a `Router` with one route whose handler
//! takes the `WebSocketUpgrade` extractor; the upgraded `WebSocket` (tokio-tungstenite under
//! the hood) is split into a sink and a stream, and each connection gets two tasks, a sender
//! that forwards its topic's `tokio::sync::broadcast` receiver into the sink and a receiver
//! that publishes what the client sends; when either ends, the other is aborted. The buffer
//! settings are the ones `benches/reference` uses (4 KiB read buffer, no write batching,
//! 1 MiB write limit), set through axum's `WebSocketUpgrade` builder.
//!
//! Differences that don't matter for the benchmark: a malformed frame ends the connection
//! without a close code (axum wraps tungstenite's error type, and its examples just stop).
//!
//! Usage: `fanout-reference-axum --listen 127.0.0.1:PORT [--threads N]`. The first stdout line
//! is `listening on ADDR` (port 0 picks a free port). SIGTERM or SIGINT stops it.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;

/// Messages a topic buffers for its slowest receiver before that receiver counts as lagging:
/// the same bound as `benches/reference`.
const TOPIC_CAPACITY: usize = 1024;

/// The largest message or frame a client may send, fanout's default `--max-message`.
const MAX_MESSAGE: usize = 64 * 1024;

/// Topics by channel name, created by the first subscriber and removed with the last.
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
                println!("usage: fanout-reference-axum --listen IP:PORT [--threads N]");
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
            eprintln!("fanout-reference-axum: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()
        .expect("build tokio runtime");
    if let Err(e) = runtime.block_on(serve(options.listen)) {
        eprintln!("fanout-reference-axum: {e}");
        std::process::exit(1);
    }
    // Connection tasks still running are dropped: a benchmark server needs no drain.
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
    // Small messages dominate pub/sub traffic: don't let Nagle hold them back (axum's docs
    // show exactly this `tap_io`).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new()
        .route("/ws", get(upgrade))
        .with_state(Topics::default());
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // Not `with_graceful_shutdown`: it would wait for open connections, and a benchmark
    // server stops at once.
    tokio::select! {
        served = axum::serve(listener, app) => served,
        _ = sigterm.recv() => Ok(()),
        _ = sigint.recv() => Ok(()),
    }
}

/// The channel a query asks for, or `None` for a bad name.
fn channel_of(query: Option<&str>) -> Option<String> {
    let mut channel = "chat".to_string();
    for pair in query.unwrap_or("").split('&') {
        if let Some(value) = pair.strip_prefix("channel=") {
            channel = value.to_string();
        }
    }
    let valid = (1..=128).contains(&channel.len())
        && channel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    valid.then_some(channel)
}

async fn upgrade(
    ws: WebSocketUpgrade,
    RawQuery(query): RawQuery,
    State(topics): State<Topics>,
) -> Response {
    let Some(channel) = channel_of(query.as_deref()) else {
        return (StatusCode::BAD_REQUEST, "bad channel name").into_response();
    };
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| connection(socket, channel, topics))
}

async fn connection(socket: WebSocket, channel: String, topics: Topics) {
    let (sender, mut receiver) = {
        let mut topics = topics.lock().expect("topics lock");
        let sender = topics
            .entry(channel.clone())
            .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
            .clone();
        let receiver = sender.subscribe();
        (sender, receiver)
    };
    let (mut sink, mut stream) = socket.split();

    let mut send_task = tokio::spawn(async move {
        loop {
            match receiver.recv().await {
                // A clone of the shared `Bytes`; tungstenite copies it into this
                // connection's frame buffer when it writes.
                Ok(message) => {
                    if sink.send(message).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let close = CloseFrame {
                        code: 1008,
                        reason: "slow consumer".into(),
                    };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });

    let publish = sender.clone();
    let mut recv_task = tokio::spawn(async move {
        // tungstenite answers pings and queues the close echo itself; reading on after a
        // close flushes that echo and then ends the stream.
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Text(_) | Message::Binary(_)) {
                // No receivers can't happen (our sender task holds one).
                let _ = publish.send(message);
            }
        }
    });

    // Whichever half finishes first ends the connection, as in axum's chat example. The
    // aborted one is awaited so that its topic receiver is gone before receivers are counted.
    tokio::select! {
        _ = &mut send_task => {
            recv_task.abort();
            let _ = recv_task.await;
        }
        _ = &mut recv_task => {
            send_task.abort();
            let _ = send_task.await;
        }
    }
    let mut topics = topics.lock().expect("topics lock");
    // If nobody else listens, forget the topic.
    if sender.receiver_count() == 0 {
        topics.remove(&channel);
    }
}
