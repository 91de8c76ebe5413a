//! The parent process: starts the workers, steps them through the run together, measures the
//! server from `/proc` at the right moments, and sums what the workers report.
//!
//! Workers are copies of this binary (the open-file limit is per process, so connections beyond
//! ~15000 need more processes). They are stopped by PID if the parent fails or returns early.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::histogram::Histogram;
use crate::options::{Options, Scenario};
use crate::procfs;
use crate::report::Report;
use crate::worker::{Ready, WorkerResult, WorkerSpec, WORKER_ENV};

/// Workers, killed and reaped if still running when this is dropped.
struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::Receiver<(usize, Option<String>)>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stdins.clear();
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Workers {
    fn start(options: &Options, count: usize) -> Result<Workers> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let (tx, lines) = mpsc::channel();
        let mut workers = Workers {
            children: Vec::new(),
            stdins: Vec::new(),
            lines,
        };
        for index in 0..count {
            let spec = WorkerSpec {
                options: options.clone(),
                index,
                count,
            };
            let mut child = Command::new(&exe)
                .env(WORKER_ENV, serde_json::to_string(&spec)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {index}"))?;
            let stdout = child.stdout.take().context("worker stdout")?;
            workers
                .stdins
                .push(child.stdin.take().context("worker stdin")?);
            workers.children.push(child);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((index, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, None));
            });
        }
        Ok(workers)
    }

    fn tell_all(&mut self, line: &str) -> Result<()> {
        for (index, stdin) in self.stdins.iter_mut().enumerate() {
            writeln!(stdin, "{line}")
                .and_then(|_| stdin.flush())
                .with_context(|| format!("writing to worker {index}"))?;
        }
        Ok(())
    }

    /// Waits for every worker's line starting with `word`; returns the rest of each, in worker
    /// order. A worker that exits or stays silent past `timeout` fails the run.
    fn collect(&mut self, word: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<String>> = vec![None; self.children.len()];
        while got.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let (index, line) = match self.lines.recv_timeout(left) {
                Ok(message) => message,
                Err(_) => bail!("workers did not report {word} within {timeout:?}"),
            };
            let Some(line) = line else {
                if got[index].is_some() {
                    // Its report arrived before its exit: only the others are still pending.
                    continue;
                }
                let status = self.children[index].wait().map(|s| s.to_string());
                bail!(
                    "worker {index} exited before {word} ({})",
                    status.unwrap_or_default()
                );
            };
            match line.strip_prefix(word) {
                Some(rest) => got[index] = Some(rest.trim().to_string()),
                None => bail!("worker {index} said {line:?} while {word} was expected"),
            }
        }
        Ok(got.into_iter().flatten().collect())
    }
}

pub fn run(options: &Options) -> Result<Report> {
    let pids = &options.server_pids;
    let rss_before = procfs::total_rss_kib(pids).context("server RSS before connecting")?;
    let procs = options.procs();
    let mut workers = Workers::start(options, procs)?;

    let connect_wait = Duration::from_secs_f64(options.connect_timeout + 30.0);
    let mut ready = Ready::default();
    for line in workers.collect("READY", connect_wait)? {
        let r: Ready = serde_json::from_str(&line).context("bad READY line")?;
        ready.connected += r.connected;
        ready.failed += r.failed;
    }
    if options.scenario != Scenario::Churn && ready.connected == 0 {
        bail!("no connection could be opened ({} failed)", ready.failed);
    }
    std::thread::sleep(Duration::from_secs_f64(options.settle));
    let rss_after = procfs::total_rss_kib(pids).context("server RSS after connecting")?;
    let cpu_start = procfs::total_cpu_seconds(pids)?;
    let redis_start = (options.redis_pids.iter())
        .map(|&pid| procfs::cpu_seconds(pid))
        .collect::<Result<Vec<f64>>>()?;

    workers.tell_all("GO")?;
    let run_wait = Duration::from_secs_f64(options.duration + 60.0);
    let mut totals = vec![0u64; options.room_count()];
    for line in workers.collect("PUBLISHED", run_wait)? {
        let counts: Vec<u64> = serde_json::from_str(&line).context("bad PUBLISHED line")?;
        for (total, n) in totals.iter_mut().zip(counts) {
            *total += n;
        }
    }
    workers.tell_all(&format!("EXPECT {}", serde_json::to_string(&totals)?))?;
    let drain_wait = Duration::from_secs_f64(options.drain + 60.0);
    let results: Vec<WorkerResult> = (workers.collect("RESULT", drain_wait)?.iter())
        .map(|line| serde_json::from_str(line).context("bad RESULT line"))
        .collect::<Result<_>>()?;
    let server_cpu = procfs::total_cpu_seconds(pids)? - cpu_start;
    let redis_cpu = (options.redis_pids.iter().zip(&redis_start))
        .map(|(&pid, start)| Ok(procfs::cpu_seconds(pid)? - start))
        .collect::<Result<Vec<f64>>>()?;
    let rss_end = procfs::total_rss_kib(pids)?;
    drop(workers);

    let mut latency = Histogram::default();
    let mut handshake = Histogram::default();
    for r in &results {
        latency.merge(&Histogram::from_sparse(&r.latency_ns));
        handshake.merge(&Histogram::from_sparse(&r.handshake_ns));
    }
    Ok(Report::build(
        options,
        procs,
        &results,
        &latency,
        &handshake,
        crate::report::ServerFigures {
            measured: !pids.is_empty(),
            rss_before_kib: rss_before,
            rss_after_kib: rss_after,
            rss_end_kib: rss_end,
            cpu_seconds: server_cpu,
            redis_cpu_seconds: redis_cpu,
        },
    ))
}
