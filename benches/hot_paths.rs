//! Criterion benchmarks of fanout's per-message work, without sockets: WebSocket frame parsing
//! and encoding, RESP Pub/Sub decoding, the JSON command protocol, permessage-deflate (one
//! compression per message, whatever the number of subscribers), and the in-process fanout of
//! one message to 1, 100 and 10000 local subscribers (so the per-recipient cost is visible).
//!
//! Run: `cargo bench --bench hot_paths` (add `-- --quick` for a fast pass).

use std::collections::VecDeque;
use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fanout::broker::channels::Channels;
use fanout::broker::{fanout, Message};
use fanout::protocol;
use fanout::ws::deflate::{Compressor, Inflater};
use fanout::ws::frame::apply_mask;
use fanout::ws::{FrameHeader, OpCode};
use redis_protocol::resp3::decode::complete::decode_bytes_mut;

fn masked_frame(len: usize) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = Vec::new();
    FrameHeader::write(&mut out, OpCode::Binary, len, Some(mask));
    let at = out.len();
    out.extend((0..len).map(|i| (i % 251) as u8));
    apply_mask(&mut out[at..], mask, 0);
    out
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_frame");
    for (name, len) in [("64B", 64usize), ("64KiB", 64 * 1024)] {
        let wire = masked_frame(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("parse_unmask_{name}"), |b| {
            let mut payload = vec![0u8; len];
            b.iter(|| {
                let h = FrameHeader::parse(black_box(&wire), true, u64::MAX >> 1)
                    .unwrap()
                    .unwrap();
                payload.copy_from_slice(&wire[h.header_len..]);
                apply_mask(&mut payload, h.mask.unwrap(), 0);
                black_box(&payload);
            })
        });
        let payload = vec![b'x'; len];
        let channel = Bytes::from_static(b"room");
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| black_box(Message::new(channel.clone(), black_box(&payload), false)))
        });
    }
    g.finish();
}

fn resp(c: &mut Criterion) {
    let mut g = c.benchmark_group("resp3");
    let payload = "p".repeat(64);
    let one = format!(
        ">3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n${}\r\n{payload}\r\n",
        payload.len()
    );
    let batch: Vec<u8> = one.repeat(100).into_bytes();
    g.throughput(Throughput::Elements(100));
    g.bench_function("decode_pubsub_message_x100", |b| {
        b.iter_batched(
            || BytesMut::from(&batch[..]),
            |mut buf| {
                while let Some((frame, _, _)) = decode_bytes_mut(&mut buf).unwrap() {
                    black_box(frame);
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn json(c: &mut Criterion) {
    let mut g = c.benchmark_group("json");
    let cmd = br#"{"op":"publish","channel":"room-42","data":{"author":"ana","text":"hello there, how are you?","ts":1732451234567},"id":17}"#;
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_publish", |b| {
        b.iter(|| black_box(protocol::parse_command(black_box(cmd)).unwrap()))
    });
    let json_payload = br#"{"author":"ana","text":"hello there, how are you?","ts":1732451234567}"#;
    let mut scratch = Vec::new();
    g.bench_function("envelope_json_payload", |b| {
        b.iter(|| {
            black_box(protocol::envelope(
                b"room-42",
                black_box(json_payload),
                &mut scratch,
            ))
        })
    });
    g.bench_function("envelope_text_payload", |b| {
        b.iter(|| {
            black_box(protocol::envelope(
                b"room-42",
                black_box(b"hello there, how are you?"),
                &mut scratch,
            ))
        })
    });
    g.finish();
}

/// A chat message of about 1 KiB as the chat page would publish it: JSON, mostly prose.
fn chat_json_1kib() -> Vec<u8> {
    let mut text = String::new();
    let words = [
        "hello", "there,", "how", "are", "you?", "the", "meeting", "moved", "to", "3pm;", "bring",
        "the", "slides", "and", "coffee.", "ok!",
    ];
    let mut i = 0;
    while text.len() < 900 {
        text.push_str(words[i * 7 % words.len()]);
        text.push(' ');
        i += 1;
    }
    format!(r#"{{"user":"ana","text":"{text}","ts":1764043200000,"cid":"k3j9x0a1"}}"#).into_bytes()
}

fn deflate(c: &mut Criterion) {
    let mut g = c.benchmark_group("permessage_deflate");
    let msg = chat_json_1kib();
    g.throughput(Throughput::Bytes(msg.len() as u64));
    let mut compressor = Compressor::default();
    // The whole per-message cost of compression: deflate from an empty dictionary and the
    // RSV1 frame every deflate subscriber then gets a clone of.
    g.bench_function("compress_once_1KiB_json", |b| {
        b.iter(|| black_box(compressor.frame(black_box(&msg), true, 15)))
    });
    let frame = compressor.frame(&msg, true, 15);
    let head = FrameHeader::parse_ext(&frame, false, u64::MAX >> 1, true)
        .unwrap()
        .unwrap();
    let compressed = frame[head.header_len..].to_vec();
    assert!(
        compressed.len() < msg.len(),
        "the test message must compress"
    );
    let mut inflater = Inflater::new();
    let mut out = Vec::with_capacity(msg.len() + 64);
    g.bench_function("inflate_1KiB_json", |b| {
        b.iter(|| {
            out.clear();
            inflater
                .inflate(black_box(&compressed), &mut out, 1 << 20)
                .unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

fn in_process_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for n in [1usize, 100, 10_000] {
        let mut channels = Channels::default();
        let mut queues: Vec<VecDeque<Bytes>> = Vec::with_capacity(n);
        for conn in 0..n {
            channels.subscribe(b"room", conn, false);
            queues.push(VecDeque::with_capacity(4));
        }
        let mut scratch = Vec::new();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("raw_64B_to_{n}"), |b| {
            b.iter(|| {
                // A message enters the reactor, is framed once, and is queued to every subscriber.
                let msg = Message::new(Bytes::from_static(b"room"), &[b'x'; 64], true);
                fanout(&channels, &msg, &mut scratch, None, |conn, frame| {
                    queues[conn].push_back(frame.clone())
                });
                // The flush that follows pops each queue; here the frames are simply released.
                for q in queues.iter_mut() {
                    q.clear();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, frames, resp, json, deflate, in_process_fanout);
criterion_main!(benches);
