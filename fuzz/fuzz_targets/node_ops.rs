//! Fuzzes a whole node: the bytes are decoded into a sequence of client operations (connect,
//! subscribe, publish, stop reading, ping floods, malformed frames, close, reset, ...) that run
//! against an in-process node over real loopback sockets, checked step by step by the same
//! model as tests/proptest_node.rs (see tests/node_model/mod.rs for what it checks and for the
//! input format). A property the model finds broken panics, which libFuzzer records as a crash.
//!
//! Much slower per input than the parser targets (a node and its sockets per input), so
//! `fuzz/run smoke` gives it fewer runs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/ops_support/mod.rs"]
mod ops_support;

#[path = "../../tests/node_model/mod.rs"]
mod node_model;

fuzz_target!(|data: &[u8]| {
    let (setup, ops) = node_model::decode(data);
    if let Err(e) = node_model::run(setup, &ops) {
        panic!("{setup:?} {ops:?}: {e}");
    }
});
