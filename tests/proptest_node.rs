//! A stateful property test of the whole node (issue #11, point 7): random bounded sequences of
//! client operations against an in-process node over real loopback sockets, checked after every
//! step by the model in `node_model` (what it checks is in its doc comment). The same model runs
//! as the libFuzzer target `node_ops`; the committed seeds of that target, crash regressions
//! included, are replayed here too, so `cargo test` covers them without libFuzzer.
//!
//! Each case takes milliseconds (the reactor is stepped on the test thread with zero or 1 ms poll
//! timeouts), so the whole file runs in seconds in debug and release builds.
//! `PROPTEST_CASES=N` runs more cases.

mod node_model;
mod ops_support;

use node_model::{Op, Setup, Stats, CHANNELS, SLOTS};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

fn slot() -> impl Strategy<Value = u8> {
    0..SLOTS as u8
}

fn channel() -> impl Strategy<Value = u8> {
    0..CHANNELS.len() as u8
}

/// Client operations, weighted towards the ones that move messages.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (slot(), any::<bool>(), proptest::option::weighted(0.8, channel()), proptest::bool::weighted(0.25))
            .prop_map(|(slot, json, channel, tiny)| Op::Connect { slot, json, channel, tiny }),
        4 => (slot(), channel()).prop_map(|(slot, channel)| Op::Subscribe { slot, channel }),
        1 => (slot(), channel()).prop_map(|(slot, channel)| Op::Unsubscribe { slot, channel }),
        8 => (
            slot(),
            channel(),
            1..=node_model::MAX_BATCH,
            0..=node_model::MAX_PAD,
            any::<(bool, bool)>(),
            proptest::bool::weighted(0.2),
            any::<u8>(),
            0u8..=125,
            proptest::bool::weighted(0.3),
        )
            .prop_map(
                |(slot, channel, count, pad, (binary, string), fragmented, cut, ping, split)| {
                    Op::Publish {
                        slot,
                        channel,
                        count,
                        pad,
                        binary,
                        string,
                        fragmented,
                        cut,
                        ping,
                        split,
                    }
                }
            ),
        2 => slot().prop_map(|slot| Op::StopReading { slot }),
        1 => slot().prop_map(|slot| Op::ReadAgain { slot }),
        1 => (slot(), 1..=node_model::MAX_PINGS, 0u8..=125)
            .prop_map(|(slot, count, size)| Op::PingFlood { slot, count, size }),
        1 => (slot(), 0..node_model::INVALID_JSON_KINDS)
            .prop_map(|(slot, kind)| Op::InvalidJson { slot, kind }),
        1 => (slot(), any::<bool>()).prop_map(|(slot, fragmented)| Op::Oversized { slot, fragmented }),
        1 => slot().prop_map(|slot| Op::BadUtf8 { slot }),
        1 => (slot(), 0..node_model::PROTOCOL_ERROR_KINDS)
            .prop_map(|(slot, kind)| Op::ProtocolError { slot, kind }),
        1 => (slot(), proptest::sample::select(&node_model::CLOSE_CODES[..]))
            .prop_map(|(slot, code)| Op::Close { slot, code }),
        1 => (slot(), any::<bool>()).prop_map(|(slot, reset)| Op::Drop { slot, reset }),
        1 => (1..=node_model::MAX_IDLE_TURNS).prop_map(|turns| Op::Idle { turns }),
    ]
}

fn case() -> impl Strategy<Value = (Setup, Vec<Op>)> {
    (
        proptest::bool::weighted(0.2).prop_map(|rate_limit| Setup { rate_limit }),
        proptest::collection::vec(op(), 1..40),
    )
}

fn add(total: &mut Stats, case: &Stats) {
    total.ops += case.ops;
    total.deliveries += case.deliveries;
    total.replies += case.replies;
    total.server_ended += case.server_ended;
    for (close, n) in &case.closes {
        *total.closes.entry(close.clone()).or_default() += n;
    }
}

#[test]
fn random_client_sequences_keep_every_delivery_property() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        // The failing case is printed (shrunk); there is no source file to persist it beside.
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let total = std::cell::RefCell::new(Stats::default());
    let result = runner.run(&case(), |(setup, ops)| {
        let stats = node_model::run(setup, &ops).map_err(TestCaseError::fail)?;
        add(&mut total.borrow_mut(), &stats);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let total = total.into_inner();
    println!("{cases} cases: {total:?}");
    // A driver that never got a message through, or never made the server close anyone, would
    // pass every check above without testing anything.
    assert!(total.deliveries > 0, "no message was delivered: {total:?}");
    assert!(total.replies > 0, "no JSON reply was read: {total:?}");
    assert!(
        !total.closes.is_empty(),
        "the server closed no client: {total:?}"
    );
}

/// The committed seeds of the `node_ops` fuzz target (crash regressions among them) as cases.
#[test]
fn fuzz_seeds_replay_cleanly() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/node_ops");
    let mut seeds: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {dir}");
    for path in seeds {
        let data = std::fs::read(&path).unwrap();
        let (setup, ops) = node_model::decode(&data);
        match node_model::run(setup, &ops) {
            Ok(stats) => println!("{}: {setup:?} {ops:?}\n  {stats:?}", path.display()),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

/// A tiny-buffer client that stops reading while another floods its channel must be closed as a
/// slow consumer, and everything else about the case must still hold.
#[test]
fn a_client_that_stops_reading_is_closed_not_skipped() {
    let mut ops = vec![
        Op::Connect {
            slot: 0,
            json: false,
            channel: Some(0),
            tiny: true,
        },
        Op::StopReading { slot: 0 },
        Op::Connect {
            slot: 1,
            json: true,
            channel: Some(0),
            tiny: false,
        },
    ];
    for _ in 0..12 {
        ops.push(Op::Publish {
            slot: 1,
            channel: 0,
            count: node_model::MAX_BATCH,
            pad: node_model::MAX_PAD,
            binary: false,
            string: false,
            fragmented: false,
            cut: 0,
            ping: 0,
            split: false,
        });
    }
    ops.push(Op::ReadAgain { slot: 0 });
    let stats =
        node_model::run(Setup { rate_limit: false }, &ops).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stats.server_ended >= 1,
        "the client that stopped reading was never closed: {stats:?}"
    );
}

/// RFC 6455 5.4: a ping may come between the frames of a fragmented message, and its payload is
/// not part of the message: a 450 + 50-byte message with a 125-byte ping between is accepted
/// under `--max-message 512` (the node model found fanout counting the ping against it).
#[test]
fn a_ping_between_fragments_does_not_count_against_the_message() {
    use ops_support::{client_frame, client_frame_with, PING, PONG, TEXT};
    use std::io::Write;
    use std::time::Duration;
    let server = ops_support::Server::start(&["--threads", "1", "--max-message", "512"]);
    let mut ws = server.ws("/ws?channel=frag");
    let first = vec![b'x'; 450];
    let ping = vec![b'p'; 125];
    let mut bytes = client_frame_with(TEXT, &first, [1, 2, 3, 4]);
    bytes.extend(client_frame(PING, &ping));
    bytes.extend(client_frame_with(0x80, &[b'y'; 50], [5, 6, 7, 8]));
    ws.stream.write_all(&bytes).unwrap();
    let pong = ws.recv_frame(Duration::from_secs(10)).unwrap();
    assert_eq!(
        (pong.opcode, pong.payload),
        (PONG, ping),
        "the ping is answered"
    );
    let message = ws.recv_frame(Duration::from_secs(10)).unwrap();
    assert_eq!(
        message.opcode, TEXT,
        "the 500-byte message is delivered, not refused: {message:?}"
    );
    assert_eq!(message.payload.len(), 500);
}
