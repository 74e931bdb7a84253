//! Estimators fed by acknowledgements.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Delivered bytes per second over a sliding window of acknowledgements.
#[derive(Debug, Clone)]
pub struct RateEstimator {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
    in_window: u64,
}

impl RateEstimator {
    /// An estimator over the last `window` of acknowledgements.
    pub fn new(window: Duration) -> Self {
        RateEstimator { window, samples: VecDeque::new(), in_window: 0 }
    }

    /// Records `bytes` delivered at `at`.
    pub fn record(&mut self, at: Instant, bytes: u64) {
        self.samples.push_back((at, bytes));
        self.in_window += bytes;
        while let Some(&(t, b)) = self.samples.front() {
            if at.saturating_duration_since(t) > self.window && self.samples.len() > 2 {
                self.samples.pop_front();
                self.in_window -= b;
            } else {
                break;
            }
        }
    }

    /// Bytes per second, or `None` before two acknowledgements some time apart. The first sample in the window only
    /// marks its start: its bytes were carried before it.
    pub fn rate(&self) -> Option<f64> {
        let (&(t0, b0), &(t1, _)) = (self.samples.front()?, self.samples.back()?);
        let span = t1.saturating_duration_since(t0).as_secs_f64();
        if span <= 0.0 {
            return None;
        }
        Some((self.in_window - b0) as f64 / span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_follows_the_window() {
        let t = Instant::now();
        let mut e = RateEstimator::new(Duration::from_millis(100));
        assert_eq!(e.rate(), None);
        for i in 0..=10u64 {
            e.record(t + Duration::from_millis(i * 10), 1000);
        }
        assert!((e.rate().unwrap() - 100_000.0).abs() < 1.0, "{:?}", e.rate());
        // The link slows to a tenth; after a window the estimate follows.
        for i in 1..=30u64 {
            e.record(t + Duration::from_millis(100 + i * 10), 100);
        }
        assert!((e.rate().unwrap() - 10_000.0).abs() < 1.0, "{:?}", e.rate());
    }
}
