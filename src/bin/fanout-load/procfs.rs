//! What the load tool reads about the processes it measures: resident memory and CPU time.
//!
//! Read from `/proc` rather than asked of the server, so any server (fanout, the reference, a
//! peer) is measured the same way and the numbers include everything the kernel charges it.

use anyhow::{bail, Context, Result};

/// Clock ticks per second for `/proc/PID/stat` times. Linux fixes USER_HZ at 100 on every
/// architecture this tool targets, so it is not worth a libc dependency to ask.
const TICKS_PER_SECOND: f64 = 100.0;

/// Resident set size in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_rss_kib(&status).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU seconds the process has used so far (all its threads).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_seconds(&stat).with_context(|| format!("unexpected format of {path}"))
}

/// Same as [`cpu_seconds`] for this process.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

fn parse_cpu_seconds(stat: &str) -> Result<f64> {
    // The command name (field 2) may contain spaces and parentheses: fields after it are counted
    // from the last ')'. utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    let Some(close) = stat.rfind(')') else {
        bail!("no ')' in stat line");
    };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    if fields.len() < 13 {
        bail!("only {} fields after the command name", fields.len());
    }
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    Ok((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// Sums over several processes; a process that is gone is an error, not a silent zero.
pub fn total_rss_kib(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| rss_kib(p)).sum()
}

pub fn total_cpu_seconds(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_name() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_cpu_seconds(stat).unwrap(), 3.0);
        assert!(parse_cpu_seconds("1234 (x) S 1").is_err());
    }

    #[test]
    fn parses_rss() {
        let status = "Name:\tfanout\nVmPeak:\t  9000 kB\nVmRSS:\t    8872 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status), Some(8872));
        assert_eq!(parse_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }
}
