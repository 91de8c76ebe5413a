//! fanout-reference-fastwebsockets: fanout's raw mode written the way fastwebsockets' docs and
//! examples write a server, one of the async references fanout is measured against.
//!
//! The raw-mode contract is the same as `benches/reference` (`GET /ws?channel=NAME`, default
//! `chat`: every text or binary message a client sends goes to every client of that channel,
//! the sender included, text as text and binary as binary; messages up to 64 KiB; pings
//! answered; a receiver more than 1024 messages behind its channel is closed 1008).
//!
//! How it is built, following fastwebsockets' `echo_server_split` example: hyper 1 serves the
//! HTTP/1.1 upgrade (`fastwebsockets::upgrade`), the upgraded stream is split
//! (`WebSocket::split(tokio::io::split)`, the `unstable-split` feature), and each connection
//! gets two tasks: a reader that publishes into a `tokio::sync::broadcast` channel per topic,
//! and a writer that owns the write half and selects between that topic and the reader's
//! obligated replies (pong, close echo). Two tasks because fastwebsockets' `read_frame` is not
//! cancel-safe (it consumes a frame header before the payload has arrived), so it cannot sit in
//! a `select!` next to the topic receiver. Writes are unbuffered, as in fastwebsockets: one
//! `write` (payload ≤ 1 KiB, copied behind the header) or one `writev` (larger) per frame.
//!
//! Usage: `fanout-reference-fastwebsockets --listen 127.0.0.1:PORT [--threads N]`. The first
//! stdout line is `listening on ADDR` (port 0 picks a free port). SIGTERM or SIGINT stops it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fastwebsockets::{upgrade, Frame, OpCode, Payload, WebSocketError, WebSocketRead};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::ReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{broadcast, mpsc};

/// Messages a topic buffers for its slowest receiver before that receiver counts as lagging:
/// the same bound as `benches/reference`.
const TOPIC_CAPACITY: usize = 1024;

/// The largest message a client may send, fanout's default `--max-message`.
const MAX_MESSAGE: usize = 64 * 1024;

/// One published message, shared by every subscriber's writer (a `Bytes` clone, no copy).
#[derive(Clone)]
struct Published {
    opcode: OpCode,
    data: Bytes,
}

/// Topics by channel name, created by the first subscriber and removed with the last.
type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Published>>>>;

/// A frame the reader owes the peer (pong, close echo, close with an error code), handed to
/// the writer task because only it may write.
struct Reply {
    opcode: OpCode,
    payload: Vec<u8>,
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

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
                println!("usage: fanout-reference-fastwebsockets --listen IP:PORT [--threads N]");
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
            eprintln!("fanout-reference-fastwebsockets: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()
        .expect("build tokio runtime");
    if let Err(e) = runtime.block_on(serve(options.listen)) {
        eprintln!("fanout-reference-fastwebsockets: {e}");
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
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let topics: Topics = Arc::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_http(stream, topics.clone()));
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

async fn serve_http(stream: TcpStream, topics: Topics) {
    // Small messages dominate pub/sub traffic: don't let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| route(request, topics.clone()));
    // `with_upgrades` hands the socket over to the WebSocket once the 101 is written.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// The channel a request asks for, or the HTTP status and reason it earns.
fn channel_of(request: &Request<Incoming>) -> Result<String, (StatusCode, &'static str)> {
    if request.uri().path() != "/ws" {
        return Err((StatusCode::NOT_FOUND, "not found"));
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
        return Err((StatusCode::BAD_REQUEST, "bad channel name"));
    }
    Ok(channel)
}

async fn route(
    mut request: Request<Incoming>,
    topics: Topics,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let channel = match channel_of(&request) {
        Ok(channel) => channel,
        Err((status, why)) => return Ok(plain(status, why)),
    };
    if !upgrade::is_upgrade_request(&request) {
        return Ok(plain(
            StatusCode::UPGRADE_REQUIRED,
            "websocket upgrade required",
        ));
    }
    match upgrade::upgrade(&mut request) {
        Ok((response, upgraded)) => {
            tokio::spawn(async move {
                if let Ok(ws) = upgraded.await {
                    connection(ws, channel, topics).await;
                }
            });
            Ok(response.map(|_| Full::default()))
        }
        Err(_) => Ok(plain(StatusCode::BAD_REQUEST, "bad websocket handshake")),
    }
}

/// The writer half of one connection; the reader runs as a second task.
async fn connection(mut ws: fastwebsockets::WebSocket<Upgraded>, channel: String, topics: Topics) {
    // fastwebsockets refuses a frame of `max_message_size` bytes or more; fanout accepts
    // exactly 64 KiB, hence the +1. Pongs and close echoes stay automatic (the defaults).
    ws.set_max_message_size(MAX_MESSAGE + 1);
    let (sender, mut receiver) = {
        let mut topics = topics.lock().expect("topics lock");
        let sender = topics
            .entry(channel.clone())
            .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
            .clone();
        let receiver = sender.subscribe();
        (sender, receiver)
    };
    let (read, mut write) = ws.split(tokio::io::split);
    // A handful of owed replies is plenty: the reader waits when the writer is behind.
    let (replies_tx, mut replies) = mpsc::channel::<Reply>(8);
    let reader = tokio::spawn(read_loop(read, sender.clone(), replies_tx));

    loop {
        tokio::select! {
            reply = replies.recv() => match reply {
                Some(Reply { opcode, payload }) => {
                    let frame = Frame::new(true, opcode, None, Payload::Owned(payload));
                    if write.write_frame(frame).await.is_err() || opcode == OpCode::Close {
                        break;
                    }
                }
                // The reader ended without owing a close (EOF, reset): nothing left to say.
                None => break,
            },
            published = receiver.recv() => match published {
                Ok(Published { opcode, data }) => {
                    // Borrowed: the shared buffer is written (small payloads are copied once
                    // into this connection's header buffer), never cloned into a Vec first.
                    let frame = Frame::new(true, opcode, None, Payload::Borrowed(&data));
                    if write.write_frame(frame).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = write.write_frame(Frame::close(1008, b"slow consumer")).await;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    reader.abort();
    drop(receiver);
    let mut topics = topics.lock().expect("topics lock");
    // Our receiver is gone; if nobody else listens, forget the topic.
    if sender.receiver_count() == 0 {
        topics.remove(&channel);
    }
}

/// A message being reassembled from fragments.
struct Partial {
    opcode: OpCode,
    data: Vec<u8>,
}

/// Reads frames, publishes complete messages, and passes owed replies to the writer.
///
/// Fragments are reassembled here rather than with `FragmentCollectorRead`, because that
/// collector bounds each frame but not the message it assembles, and the contract is a
/// 64 KiB limit per message.
async fn read_loop(
    mut read: WebSocketRead<ReadHalf<Upgraded>>,
    topic: broadcast::Sender<Published>,
    replies: mpsc::Sender<Reply>,
) {
    let mut partial: Option<Partial> = None;
    loop {
        let owed = replies.clone();
        let mut send_fn = move |frame: Frame<'_>| {
            let reply = Reply {
                opcode: frame.opcode,
                payload: frame.payload.to_vec(),
            };
            let owed = owed.clone();
            // Only the error's existence matters: a gone writer means the connection is over.
            async move {
                owed.send(reply)
                    .await
                    .map_err(|_| WebSocketError::ConnectionClosed)
            }
        };
        let frame = match read.read_frame(&mut send_fn).await {
            Ok(frame) => frame,
            Err(error) => {
                let code = match error {
                    WebSocketError::FrameTooLarge => 1009,
                    WebSocketError::InvalidUTF8 => 1007,
                    WebSocketError::IoError(_)
                    | WebSocketError::UnexpectedEOF
                    | WebSocketError::ConnectionClosed
                    | WebSocketError::SendError(_) => return,
                    _ => 1002,
                };
                let _ = replies.send(close_reply(code, &error.to_string())).await;
                return;
            }
        };
        let (opcode, fin) = (frame.opcode, frame.fin);
        match opcode {
            OpCode::Text | OpCode::Binary if partial.is_some() => {
                let _ = replies
                    .send(close_reply(1002, "expected a continuation"))
                    .await;
                return;
            }
            OpCode::Text | OpCode::Binary if fin => {
                // Complete text frames were UTF-8-checked by fastwebsockets.
                let data = match frame.payload {
                    Payload::Bytes(bytes) => bytes.freeze(),
                    other => Bytes::from(other.to_vec()),
                };
                let _ = topic.send(Published { opcode, data });
            }
            OpCode::Text | OpCode::Binary => {
                partial = Some(Partial {
                    opcode,
                    data: frame.payload.to_vec(),
                });
            }
            OpCode::Continuation => {
                let Some(mut message) = partial.take() else {
                    let _ = replies
                        .send(close_reply(1002, "unexpected continuation"))
                        .await;
                    return;
                };
                if message.data.len() + frame.payload.len() > MAX_MESSAGE {
                    let _ = replies.send(close_reply(1009, "message too big")).await;
                    return;
                }
                message.data.extend_from_slice(&frame.payload);
                if !fin {
                    partial = Some(message);
                    continue;
                }
                if message.opcode == OpCode::Text && std::str::from_utf8(&message.data).is_err() {
                    let _ = replies.send(close_reply(1007, "invalid UTF-8")).await;
                    return;
                }
                let _ = topic.send(Published {
                    opcode: message.opcode,
                    data: Bytes::from(message.data),
                });
            }
            // The close echo has already gone to the writer as an owed reply.
            OpCode::Close => return,
            OpCode::Ping | OpCode::Pong => {}
        }
    }
}

fn close_reply(code: u16, reason: &str) -> Reply {
    let mut payload = code.to_be_bytes().to_vec();
    // A close frame carries at most 123 bytes of reason; cut on a character boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    Reply {
        opcode: OpCode::Close,
        payload,
    }
}
