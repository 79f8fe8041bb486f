//! Figures for `make bench`: percentiles and latency summaries, and the CPU and memory of processes, read
//! from /proc. Shared by every benchmark so their JSON files mean the same thing.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The `p` quantile (0..=1) of `sorted` by nearest rank; NaN (null in JSON) when there is no sample.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `{"n", "p50_ms", "p99_ms", "max_ms"}` of latencies in milliseconds.
pub fn summary_ms(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({
        "n": ms.len(),
        "p50_ms": percentile(&ms, 0.5),
        "p99_ms": percentile(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
    })
}

/// Resident memory of process `pid` (`"self"` for this one) in KiB; 0 when it cannot be read.
pub fn rss_kib(pid: &str) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A KiB field of /proc/PID/status (`VmRSS`, `RssAnon`, `VmHWM`, ...); 0 when it cannot be read.
pub fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).map_or(0, |s| status_field_kib(&s, field))
}

/// A `Name:   N kB` field of a `/proc/PID/status` text, in KiB (0 when absent).
fn status_field_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The CPU one process has used so far, from /proc/PID: each live thread's run time with nanosecond
/// precision (`task/TID/schedstat`), and the process's and its reaped children's user+system time (every
/// thread, exited ones too; clock-tick resolution on the total).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessCpu {
    /// Run time of each live thread, by thread id, in nanoseconds.
    pub threads_ns: BTreeMap<u32, u64>,
    /// The process's own user+system seconds.
    pub own_s: f64,
    /// Its reaped children's user+system seconds (the tools it ran and waited for).
    pub children_s: f64,
}

impl ProcessCpu {
    /// The process's own CPU seconds between `earlier` and this sample: from the threads' nanosecond
    /// counters when every thread of `earlier` still runs (threads started since count whole), otherwise
    /// (a thread exited, taking its counter along) from user+system time.
    pub fn own_since(&self, earlier: &ProcessCpu) -> f64 {
        if earlier.threads_ns.is_empty()
            || !earlier.threads_ns.keys().all(|t| self.threads_ns.contains_key(t))
        {
            return self.own_s - earlier.own_s;
        }
        let ns: u64 = self
            .threads_ns
            .iter()
            .map(|(t, n)| n.saturating_sub(earlier.threads_ns.get(t).copied().unwrap_or(0)))
            .sum();
        ns as f64 / 1e9
    }

    /// The CPU seconds of the children reaped between `earlier` and this sample.
    pub fn children_since(&self, earlier: &ProcessCpu) -> f64 {
        self.children_s - earlier.children_s
    }
}

/// [`ProcessCpu`] of process `pid`; all zero when it cannot be read.
pub fn process_cpu(pid: u32) -> ProcessCpu {
    let mut out = ProcessCpu::default();
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        && let Some((_, rest)) = stat.rsplit_once(") ")
    {
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        // After the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14), in clock ticks.
        if f.len() > 14 {
            out.own_s = (f[11] + f[12]) / 100.0;
            out.children_s = (f[13] + f[14]) / 100.0;
        }
    }
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let ns = std::fs::read_to_string(entry.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        if let Some(ns) = ns {
            out.threads_ns.insert(tid, ns);
        }
    }
    out
}

/// Busy CPU seconds of the whole machine so far (all cores; user, system, irq, softirq), from /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = cpu
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / 100.0
}

/// CPU seconds used so far by processes whose command name starts with one of `names`: (own, reaped
/// children's), from /proc/PID/stat.
pub fn process_cpu_seconds(names: &[&str]) -> (f64, f64) {
    let (mut own, mut children) = (0.0, 0.0);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        if !names.iter().any(|n| comm.starts_with(n)) {
            continue;
        }
        let fields: Vec<f64> = stat[close + 2..]
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        // After the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14), in clock ticks.
        if fields.len() > 14 {
            own += (fields[11] + fields[12]) / 100.0;
            children += (fields[13] + fields[14]) / 100.0;
        }
    }
    (own, children)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_summaries_use_nearest_rank_and_say_when_there_is_no_sample() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), 51.0);
        assert_eq!(percentile(&xs, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
        let s = summary_ms(vec![3.0, 1.0, 2.0]);
        assert_eq!(s["n"], 3);
        assert_eq!(s["p50_ms"], 2.0);
        assert_eq!(s["max_ms"], 3.0);
        assert!(summary_ms(vec![])["p50_ms"].is_null());
    }

    #[test]
    fn this_process_has_memory_and_the_machine_has_used_cpu() {
        assert!(rss_kib("self") > 0);
        // One reading for both: other test threads may grow the resident set between two.
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        assert!(status_field_kib(&status, "VmHWM") >= status_field_kib(&status, "VmRSS"));
        assert!(status_kib("self", "VmRSS") > 0);
        assert_eq!(status_kib("self", "NoSuchField"), 0);
        assert!(machine_busy_seconds() > 0.0);
    }

    #[test]
    fn a_process_cpu_sample_counts_its_threads_and_grows_with_work() {
        let pid = std::process::id();
        let before = process_cpu(pid);
        assert!(!before.threads_ns.is_empty());
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = process_cpu(pid);
        assert!(after.own_since(&before) > 0.0);
        assert!(after.children_since(&before) >= 0.0);
        // A thread that exited takes its counter along: the tick-based total is used instead.
        let gone = ProcessCpu {
            threads_ns: [(u32::MAX, 1)].into(),
            ..before.clone()
        };
        assert_eq!(after.own_since(&gone), after.own_s - before.own_s);
    }
}
