//! The bandwidth cap shared by all of a migration's data links: a token bucket kept as a virtual clock. Each frame,
//! before its writer sends it, reserves the time its bytes take at the cap after the frames reserved before it, and
//! waits until its slot begins. Links that drain faster come back for slots sooner, so the cap spreads over the links
//! by their capacity, as the scheduler does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Credit an idle pacer may save up: after a pause, this much may go out at once.
const BURST: Duration = Duration::from_millis(20);

/// A shared token bucket; a rate of 0 means no cap.
#[derive(Debug)]
pub struct Pacer {
    rate: AtomicU64,
    /// When the next reservation may begin.
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer at `rate` bytes per second (None: no cap).
    pub fn new(rate: Option<u64>) -> Self {
        Pacer { rate: AtomicU64::new(rate.unwrap_or(0)), next: Mutex::new(None) }
    }

    /// Changes the cap; reservations from now on follow it.
    pub fn set_rate(&self, rate: Option<u64>) {
        self.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    /// The cap in bytes per second, if any.
    pub fn rate(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    /// Reserves `bytes` at `now`; returns when they may start to go out (`now` or later).
    pub fn reserve(&self, bytes: u64, now: Instant) -> Instant {
        let Some(rate) = self.rate() else { return now };
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = match *next {
            Some(n) => n.max(now.checked_sub(BURST).unwrap_or(now)),
            None => now,
        };
        *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
        start
    }

    /// Reserves `bytes` and sleeps until they may go out, in short naps so that `stop` ends the wait at once.
    pub fn wait(&self, bytes: u64, stop: impl Fn() -> bool) {
        let at = self.reserve(bytes, Instant::now());
        loop {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() || stop() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_the_rate_after_a_short_burst() {
        let p = Pacer::new(Some(1_000_000));
        let t0 = Instant::now() + Duration::from_secs(1);
        // 100 kB frames at 1 MB/s: one slot every 100 ms, the first at once.
        let starts: Vec<u128> = (0..5).map(|_| p.reserve(100_000, t0).duration_since(t0).as_millis()).collect();
        assert_eq!(starts, [0, 100, 200, 300, 400]);
        // Idle for a second: at most 20 ms of credit is kept, so the next frame waits only for that.
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(p.reserve(100_000, later), later - BURST);
        // Doubling the rate halves the slots from here on.
        p.set_rate(Some(2_000_000));
        let next = p.reserve(100_000, later);
        assert_eq!(next.duration_since(later).as_millis(), 80);
        assert_eq!(p.reserve(100_000, later).duration_since(next).as_millis(), 50);
        // No cap: everything may go at once.
        p.set_rate(None);
        assert_eq!(p.reserve(u64::MAX, later), later);
    }
}
