//! Process statistics from Linux `/proc/self`, for the standard `process_*` metrics.

#[derive(Clone, Debug, Default)]
pub struct ProcStats {
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub start_time_seconds: f64,
    pub threads: u64,
}

/// Clock ticks per second used by `/proc/<pid>/stat` on Linux (USER_HZ, 100 on every
/// mainstream architecture).
const USER_HZ: f64 = 100.0;
const PAGE_SIZE: u64 = 4096;

/// Read the current process's statistics; `None` off Linux or if `/proc` is unreadable.
pub fn read() -> Option<ProcStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N-3].
    let num = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    let utime = num(14)?;
    let stime = num(15)?;
    let threads = num(20)?;
    let starttime = num(22)?;
    let vsize = num(23)?;
    let rss_pages = num(24)?;
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    });
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        });
    Some(ProcStats {
        cpu_seconds: (utime + stime) as f64 / USER_HZ,
        open_fds,
        max_fds,
        rss_bytes: rss_pages * PAGE_SIZE,
        vsize_bytes: vsize,
        start_time_seconds: btime.unwrap_or(0) as f64 + starttime as f64 / USER_HZ,
        threads,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn reads_own_process() {
        let p = super::read().expect("/proc readable");
        assert!(p.threads >= 1);
        assert!(p.rss_bytes > 1024 * 1024);
        assert!(p.open_fds >= 3);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds > now - 3600.0 && p.start_time_seconds <= now + 1.0);
    }
}
