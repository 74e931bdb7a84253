//! Idle CPU on this machine, from `/proc/stat`: what the codec policy needs to know whether compression would run on
//! cores that are otherwise idle.

use std::time::{Duration, Instant};

/// Samples the machine's idle time and reports idle cores since the previous sample.
#[derive(Debug)]
pub struct CpuMeter {
    last: Option<(u64, u64)>,
    at: Instant,
    cpus: f64,
    spare: f64,
}

/// Reads (idle, total) jiffies summed over all CPUs.
fn read_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: idle and iowait count as spare.
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((idle, v.iter().take(8).sum()))
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuMeter {
    /// A meter starting now.
    pub fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        CpuMeter { last: read_stat(), at: Instant::now(), cpus, spare: 0.0 }
    }

    /// Idle cores averaged since the previous sample at least `every` ago; the last value in between. Zero where
    /// `/proc/stat` cannot be read, which makes the policy assume a busy machine.
    pub fn spare_cpus(&mut self, every: Duration) -> f64 {
        if self.at.elapsed() >= every {
            self.at = Instant::now();
            let now = read_stat();
            if let (Some((i0, t0)), Some((i1, t1))) = (self.last, now) {
                if t1 > t0 {
                    self.spare = (i1 - i0) as f64 / (t1 - t0) as f64 * self.cpus;
                }
            }
            self.last = now;
        }
        self.spare
    }
}

/// CPU seconds this process has used, user and system, from `getrusage`.
pub fn process_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_SELF)
}

/// CPU seconds, user and system, of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`, the waited-for children).
pub fn rusage_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given and reads nothing else.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut ru) != 0 {
            return 0.0;
        }
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_core_shows() {
        let mut m = CpuMeter::new();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spare = m.spare_cpus(Duration::ZERO);
        // This thread kept one core busy, so at most cpus - 1 (plus rounding) were idle.
        assert!(spare <= m.cpus - 0.8, "spare {spare} of {} cores while one spun", m.cpus);
        assert!(spare >= 0.0);
    }
}
