//! fanout-load: drives a running fanout-compatible server (raw mode) over real sockets.
//!
//! Scenarios: `idle` (hold connections, server RSS per connection), `broadcast` (one channel,
//! K publishers), `rooms` (chat: N clients in R channels, all publishing), `churn`
//! (connect + upgrade + close per second). Every run is bounded by `--duration`, `--drain` and
//! `--connect-timeout`. Output: a table, then one line `RESULT {json}` (see [`report::Report`]).
//!
//! Layout: the parent ([`coordinator`]) re-executes this binary as worker processes
//! ([`worker`]: one mio event loop each, no thread per connection), because the open-file limit
//! is per process. The wire pieces are in [`client`], latency math in [`histogram`], server
//! measurements in [`procfs`].

mod client;
mod coordinator;
mod histogram;
mod options;
mod procfs;
mod report;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(worker::WORKER_ENV) {
        return match worker::run(&spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fanout-load worker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let options = options::Options::parse();
    if let Err(e) = options.validate() {
        eprintln!("fanout-load: {e:#}");
        return ExitCode::from(2);
    }
    match coordinator::run(&options) {
        Ok(report) => {
            report.print();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fanout-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
