//! fanout-reference-actix: fanout's raw mode written the way actix-web's docs write a
//! WebSocket server with `actix-ws` (sessions without actors), one of the async references
//! fanout is measured against.
//!
//! The raw-mode contract is the same as `benches/reference` (`GET /ws?channel=NAME`, default
//! `chat`: every text or binary message a client sends goes to every client of that channel,
//! the sender included, text as text and binary as binary; messages up to 64 KiB; pings
//! answered; a receiver more than 1024 messages behind its channel is closed 1008).
//!
//! How it is built, following the `actix_ws::handle` docs: `HttpServer` with `--threads`
//! workers (each a single-threaded runtime; actix adds one accept thread that hands sockets
//! to them), one route, and per connection a task spawned on the accepting worker
//! (`actix_web::rt::spawn`) that selects between the client's `AggregatedMessageStream` and
//! its topic's `tokio::sync::broadcast` receiver, writing through the `Session`. actix-ws
//! answers nothing by itself: the task pongs pings and echoes a close, as its docs show.
//! Shutdown is actix's own: it handles SIGTERM/SIGINT, here with no grace period.
//!
//! Usage: `fanout-reference-actix --listen 127.0.0.1:PORT [--threads N]`. The first stdout
//! line is `listening on ADDR` (port 0 picks a free port).

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;

use actix_web::web::{self, Bytes};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError, Session};
use bytestring::ByteString;
use tokio::sync::broadcast;

/// Messages a topic buffers for its slowest receiver before that receiver counts as lagging:
/// the same bound as `benches/reference`.
const TOPIC_CAPACITY: usize = 1024;

/// The largest message or frame a client may send, fanout's default `--max-message`.
const MAX_MESSAGE: usize = 64 * 1024;

/// One published message; cloning it per subscriber clones a shared buffer, not the bytes.
#[derive(Clone)]
enum Published {
    Text(ByteString),
    Binary(Bytes),
}

/// Topics by channel name, created by the first subscriber and removed with the last. Shared by
/// all workers (`web::Data` is an `Arc`), since a channel's clients land on any worker.
type Topics = web::Data<Mutex<HashMap<String, broadcast::Sender<Published>>>>;

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
                println!("usage: fanout-reference-actix --listen IP:PORT [--threads N]");
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
            eprintln!("fanout-reference-actix: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = actix_web::rt::System::new().block_on(serve(options)) {
        eprintln!("fanout-reference-actix: {e}");
        std::process::exit(1);
    }
}

async fn serve(options: Options) -> std::io::Result<()> {
    let topics: Topics = web::Data::new(Mutex::default());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(topics.clone())
            .route("/ws", web::get().to(upgrade))
    })
    .workers(options.threads)
    // Small messages dominate pub/sub traffic: don't let Nagle hold them back.
    .tcp_nodelay(true)
    // A benchmark server stops at once; actix's default waits 30 s for open connections.
    .shutdown_timeout(0)
    .bind(options.listen)?;
    {
        // Scripts wait for this exact line, so flush it before accepting anything.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.addrs()[0])?;
        out.flush()?;
    }
    server.run().await
}

/// The channel a query asks for, or `None` for a bad name.
fn channel_of(query: &str) -> Option<String> {
    let mut channel = "chat".to_string();
    for pair in query.split('&') {
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
    request: HttpRequest,
    body: web::Payload,
    topics: Topics,
) -> actix_web::Result<HttpResponse> {
    let Some(channel) = channel_of(request.query_string()) else {
        return Ok(HttpResponse::BadRequest().body("bad channel name"));
    };
    let (response, session, stream) = actix_ws::handle(&request, body)?;
    let stream = stream
        .max_frame_size(MAX_MESSAGE)
        .aggregate_continuations()
        .max_continuation_size(MAX_MESSAGE);
    actix_web::rt::spawn(connection(session, stream, channel, topics));
    Ok(response)
}

async fn connection(
    mut session: Session,
    mut stream: actix_ws::AggregatedMessageStream,
    channel: String,
    topics: Topics,
) {
    let (sender, mut receiver) = {
        let mut topics = topics.lock().expect("topics lock");
        let sender = topics
            .entry(channel.clone())
            .or_insert_with(|| broadcast::channel(TOPIC_CAPACITY).0)
            .clone();
        let receiver = sender.subscribe();
        (sender, receiver)
    };
    // What to close with when the loop ends: `Some(reason)` (the reason itself may be empty,
    // as in a client's bare close), or `None` when the peer is already gone.
    let close: Option<Option<CloseReason>> = loop {
        tokio::select! {
            incoming = stream.recv() => match incoming {
                // No receivers can't happen (we hold one); ignore the impossible error.
                Some(Ok(AggregatedMessage::Text(text))) => {
                    let _ = sender.send(Published::Text(text));
                }
                Some(Ok(AggregatedMessage::Binary(data))) => {
                    let _ = sender.send(Published::Binary(data));
                }
                Some(Ok(AggregatedMessage::Ping(data))) => {
                    if session.pong(&data).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(AggregatedMessage::Pong(_))) => {}
                // Echo the client's close, as RFC 6455 asks.
                Some(Ok(AggregatedMessage::Close(reason))) => break Some(reason),
                Some(Err(error)) => {
                    let code = match &error {
                        ProtocolError::Overflow => CloseCode::Size,
                        ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                            CloseCode::Invalid
                        }
                        // actix-ws's only other I/O error from a live peer is its continuation
                        // size limit; when the peer is gone the close goes nowhere anyway.
                        ProtocolError::Io(_) => CloseCode::Size,
                        _ => CloseCode::Protocol,
                    };
                    break Some(Some(CloseReason { code, description: Some(error.to_string()) }));
                }
                None => break None,
            },
            outgoing = receiver.recv() => match outgoing {
                // Session::text/binary queue the message into the response body's channel
                // (32 deep); actix's codec then frames it into the connection's write buffer.
                Ok(Published::Text(text)) => {
                    if session.text(text).await.is_err() {
                        break None;
                    }
                }
                Ok(Published::Binary(data)) => {
                    if session.binary(data).await.is_err() {
                        break None;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    break Some(Some(CloseReason {
                        code: CloseCode::Policy,
                        description: Some("slow consumer".into()),
                    }));
                }
                Err(broadcast::error::RecvError::Closed) => break None,
            },
        }
    };
    if let Some(reason) = close {
        let _ = session.close(reason).await;
    }
    drop(receiver);
    let mut topics = topics.lock().expect("topics lock");
    // Our receiver is gone; if nobody else listens, forget the topic.
    if sender.receiver_count() == 0 {
        topics.remove(&channel);
    }
}
