//! The run's figures, summed over workers: printed as a table for people and as one
//! `RESULT {json}` line for scripts (benches/smoke, benches/compare, benches/scale parse it).

use std::collections::BTreeMap;

use clap::ValueEnum;
use serde::Serialize;

use crate::histogram::Histogram;
use crate::options::{Options, Scenario};
use crate::worker::WorkerResult;

pub struct ServerFigures {
    pub measured: bool,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_end_kib: u64,
    pub cpu_seconds: f64,
    /// One figure per `--redis-pid`, in the order given.
    pub redis_cpu_seconds: Vec<f64>,
}

/// Percentiles in microseconds.
#[derive(Serialize, Debug, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram) -> Percentiles {
        let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
        Percentiles {
            count: h.count(),
            p50: us(h.quantile(0.5)),
            p90: us(h.quantile(0.9)),
            p99: us(h.quantile(0.99)),
            p999: us(h.quantile(0.999)),
            max: us(h.max()),
        }
    }
}

#[derive(Serialize, Debug, Default)]
pub struct Report {
    pub scenario: String,
    pub urls: Vec<String>,
    pub procs: usize,
    pub connections: usize,
    pub connected: u64,
    pub connect_failed: u64,
    /// Open at the start of the run, closed or dropped before its end.
    pub dropped: u64,
    pub duration_s: f64,
    pub run_s: f64,
    pub target_rate: f64,
    pub published: u64,
    pub publish_rate: f64,
    pub publish_skipped: u64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub expected: u64,
    pub lost: u64,
    /// Deliveries beyond the expected count (duplicates): should always be 0.
    pub extra: u64,
    pub foreign: u64,
    /// Run with `--compression` (permessage-deflate offered).
    pub compression: bool,
    /// Payload kind (`filler`, `chat-json`) and bytes per message.
    pub payload_kind: String,
    pub size: usize,
    /// Connections whose upgrade agreed permessage-deflate.
    pub deflate_connections: u64,
    /// Deliveries that arrived compressed (RSV1).
    pub compressed_deliveries: u64,
    /// Bytes the subscribers read from their sockets during the run and drain (frame headers
    /// included), and the same per delivery: what a delivery costs on the wire.
    pub wire_bytes: u64,
    pub wire_bytes_per_delivery: f64,
    /// Payload bytes per delivery after inflating, and that over the wire bytes.
    pub payload_bytes_per_delivery: f64,
    pub wire_ratio: f64,
    pub latency_us: Percentiles,
    pub churn_cycles: u64,
    pub churn_per_s: f64,
    pub churn_failed: u64,
    pub handshake_us: Percentiles,
    pub server_measured: bool,
    pub server_rss_before_kib: u64,
    pub server_rss_after_kib: u64,
    pub server_rss_end_kib: u64,
    /// (RSS after connecting − RSS before) / connections.
    pub rss_per_conn_bytes: f64,
    pub server_cpu_s: f64,
    /// Deliveries (pub/sub) or churn cycles per second of server CPU.
    pub per_server_cpu_s: f64,
    /// Server CPU-seconds per million deliveries (pub/sub) or cycles (churn): µs per delivery.
    pub server_cpu_s_per_million: f64,
    /// Summed over every `--redis-pid` (none: null).
    pub redis_cpu_s: Option<f64>,
    /// Each `--redis-pid`'s CPU-seconds, in the order given (the shards of a Redis Cluster).
    pub redis_cpu_s_each: Vec<f64>,
    pub load_cpu_s: f64,
    pub errors: BTreeMap<String, u64>,
    /// Failures a script should treat as a failed run: losses, duplicates, errors.
    pub ok: bool,
}

impl Report {
    pub fn build(
        options: &Options,
        procs: usize,
        results: &[WorkerResult],
        latency: &Histogram,
        handshake: &Histogram,
        server: ServerFigures,
    ) -> Report {
        let sum = |f: fn(&WorkerResult) -> u64| results.iter().map(f).sum::<u64>();
        let run_s = results.iter().map(|r| r.run_seconds).fold(0.0, f64::max);
        let per_s = |n: u64| if run_s > 0.0 { n as f64 / run_s } else { 0.0 };
        let mut errors = BTreeMap::new();
        for r in results {
            for (what, n) in &r.errors {
                *errors.entry(what.clone()).or_default() += n;
            }
        }
        let (deliveries, expected) = (sum(|r| r.received), sum(|r| r.expected));
        let connected = sum(|r| r.connected);
        let churn_cycles = sum(|r| r.churn_cycles);
        let server_work = if options.scenario == Scenario::Churn {
            churn_cycles
        } else {
            deliveries
        };
        let rss_growth = server.rss_after_kib.saturating_sub(server.rss_before_kib);
        let wire_bytes = sum(|r| r.wire_bytes);
        let payload_bytes = sum(|r| r.payload_bytes);
        let per_delivery = |n: u64| {
            if deliveries > 0 {
                n as f64 / deliveries as f64
            } else {
                0.0
            }
        };
        let mut report = Report {
            scenario: format!("{:?}", options.scenario).to_lowercase(),
            urls: options.urls.clone(),
            procs,
            connections: options.connections,
            connected,
            connect_failed: sum(|r| r.connect_failed),
            dropped: sum(|r| r.dropped),
            duration_s: options.duration,
            run_s,
            target_rate: options.rate,
            published: sum(|r| r.published),
            publish_rate: per_s(sum(|r| r.published)),
            publish_skipped: sum(|r| r.publish_skipped),
            deliveries,
            deliveries_per_s: per_s(deliveries),
            expected,
            lost: expected.saturating_sub(deliveries),
            extra: deliveries.saturating_sub(expected),
            foreign: sum(|r| r.foreign),
            compression: options.compression,
            payload_kind: (options.payload_kind.to_possible_value())
                .map_or_else(String::new, |v| v.get_name().to_string()),
            size: options.size,
            deflate_connections: sum(|r| r.deflate_connections),
            compressed_deliveries: sum(|r| r.compressed_deliveries),
            wire_bytes,
            wire_bytes_per_delivery: per_delivery(wire_bytes),
            payload_bytes_per_delivery: per_delivery(payload_bytes),
            wire_ratio: if wire_bytes > 0 {
                payload_bytes as f64 / wire_bytes as f64
            } else {
                0.0
            },
            latency_us: Percentiles::of(latency),
            churn_cycles,
            churn_per_s: per_s(churn_cycles),
            churn_failed: sum(|r| r.churn_failed),
            handshake_us: Percentiles::of(handshake),
            server_measured: server.measured,
            server_rss_before_kib: server.rss_before_kib,
            server_rss_after_kib: server.rss_after_kib,
            server_rss_end_kib: server.rss_end_kib,
            rss_per_conn_bytes: if connected > 0 && options.scenario != Scenario::Churn {
                (rss_growth * 1024) as f64 / connected as f64
            } else {
                0.0
            },
            server_cpu_s: server.cpu_seconds,
            per_server_cpu_s: if server.cpu_seconds > 0.0 {
                server_work as f64 / server.cpu_seconds
            } else {
                0.0
            },
            server_cpu_s_per_million: if server_work > 0 {
                server.cpu_seconds * 1e6 / server_work as f64
            } else {
                0.0
            },
            redis_cpu_s: (!server.redis_cpu_seconds.is_empty())
                .then(|| server.redis_cpu_seconds.iter().sum()),
            redis_cpu_s_each: server.redis_cpu_seconds.clone(),
            load_cpu_s: results.iter().map(|r| r.cpu_seconds).sum(),
            errors,
            ok: false,
        };
        let did_work = match options.scenario {
            Scenario::Idle => report.connected > 0,
            Scenario::Broadcast | Scenario::Rooms => report.deliveries > 0,
            Scenario::Churn => report.churn_cycles > 0,
        };
        report.ok = did_work
            && report.lost == 0
            && report.extra == 0
            && report.connect_failed == 0
            && report.dropped == 0
            && report.churn_failed == 0
            && report.publish_skipped == 0
            && report.errors.is_empty();
        report
    }

    pub fn print(&self) {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        row(
            "scenario",
            format!("{} ({} worker processes)", self.scenario, self.procs),
        );
        row("targets", self.urls.join(" "));
        row(
            "connections",
            format!(
                "{} open of {} requested, {} failed, {} dropped during the run",
                self.connected, self.connections, self.connect_failed, self.dropped
            ),
        );
        row("run", format!("{:.2} s", self.run_s));
        row(
            "compression",
            if self.compression {
                format!(
                    "permessage-deflate offered, agreed on {} of {} connections",
                    self.deflate_connections, self.connected
                )
            } else {
                "off (not offered)".into()
            },
        );
        if self.scenario == "broadcast" || self.scenario == "rooms" {
            let target = if self.target_rate > 0.0 {
                format!("{:.0}/s", self.target_rate)
            } else {
                "max".into()
            };
            row(
                "published",
                format!(
                    "{} ({:.0}/s, target {target}, {} skipped)",
                    self.published, self.publish_rate, self.publish_skipped
                ),
            );
            if self.target_rate > 0.0 && self.publish_rate < 0.9 * self.target_rate {
                // The publisher shares the event loop with the receivers: when they cannot
                // keep up (inflating, on starved cores), publishing slows with them.
                row(
                    "warning",
                    "publishing fell behind the target: the load tool, not the server, \
                     limited this run (lower --rate or add --procs)"
                        .into(),
                );
            }
            row(
                "deliveries",
                format!(
                    "{} ({:.0}/s), expected {}, lost {}, extra {}",
                    self.deliveries, self.deliveries_per_s, self.expected, self.lost, self.extra
                ),
            );
            row(
                "wire bytes",
                format!(
                    "{:.1} B read per delivery ({} payload {} B, {:.1} B after inflating; \
                     {} of {} deliveries compressed; payload / wire {:.2})",
                    self.wire_bytes_per_delivery,
                    self.payload_kind,
                    self.size,
                    self.payload_bytes_per_delivery,
                    self.compressed_deliveries,
                    self.deliveries,
                    self.wire_ratio
                ),
            );
            row("latency µs", percentiles(&self.latency_us));
        }
        if self.scenario == "churn" {
            row(
                "churn cycles",
                format!(
                    "{} ({:.0}/s), {} failed",
                    self.churn_cycles, self.churn_per_s, self.churn_failed
                ),
            );
        }
        row("handshake µs", percentiles(&self.handshake_us));
        if self.server_measured {
            row(
                "server RSS",
                format!(
                    "{} KiB before, {} KiB after connecting ({:.0} B/conn), {} KiB at end",
                    self.server_rss_before_kib,
                    self.server_rss_after_kib,
                    self.rss_per_conn_bytes,
                    self.server_rss_end_kib
                ),
            );
            let unit = if self.scenario == "churn" {
                "cycles"
            } else {
                "deliveries"
            };
            row(
                "server CPU",
                format!(
                    "{:.2} s ({:.0} {unit} per CPU-second, {:.3} CPU-s per million)",
                    self.server_cpu_s, self.per_server_cpu_s, self.server_cpu_s_per_million
                ),
            );
        }
        if let Some(redis) = self.redis_cpu_s {
            if self.redis_cpu_s_each.len() > 1 {
                let each: Vec<String> = (self.redis_cpu_s_each.iter())
                    .map(|s| format!("{s:.2}"))
                    .collect();
                row(
                    "redis CPU",
                    format!("{redis:.2} s ({} s per process)", each.join(" + ")),
                );
            } else {
                row("redis CPU", format!("{redis:.2} s"));
            }
        }
        row("load tool CPU", format!("{:.2} s", self.load_cpu_s));
        for (what, n) in &self.errors {
            row("error", format!("{n} × {what}"));
        }
        row("verdict", if self.ok { "ok" } else { "FAILED" }.into());
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        for (k, v) in rows {
            println!("{k:<width$}  {v}");
        }
        match serde_json::to_string(self) {
            Ok(json) => println!("RESULT {json}"),
            Err(e) => eprintln!("fanout-load: cannot encode the result: {e}"),
        }
    }
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
        p.p50, p.p90, p.p99, p.p999, p.max, p.count
    )
}
