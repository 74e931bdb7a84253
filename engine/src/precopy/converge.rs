//! Convergence control: after each pre-copy round, whether to go on (and at what vCPU throttle), stop and copy, or
//! give up. A trait, so that embedders can bring their own policy, as quinn does with congestion control.

use super::PrecopyConfig;
use std::time::Duration;

/// The hard bound on the pause: no policy may switch over with more predicted, and the driver cancels a final round
/// that runs past it.
pub const MAX_PAUSE: Duration = Duration::from_secs(2);

/// What a timed-out pre-copy does when the target cannot be met (`--on-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum OnTimeout {
    /// Cancel cleanly: the source resumes and keeps the guest.
    #[default]
    Cancel,
    /// Switch over anyway, but only if the predicted pause is within the 2 s pause bound (`MAX_PAUSE`).
    Force,
}

/// What the policy sees after a pre-copy harvest. Every figure is measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Pre-copy rounds done, round 0 included.
    pub rounds_done: u32,
    /// Pages dirty now: what the next round (or the pause) must send.
    pub dirty_pages: u64,
    /// Pages the round just finished sent.
    pub last_round_pages: u64,
    /// Goodput, bytes per second, over the last 500 ms of acks.
    pub bandwidth_bps: Option<f64>,
    /// Pages dirtied per second during the last round, at the throttle then in force.
    pub dirty_rate_pps: f64,
    /// Wire bytes per page in the last round (zero pages and compression included).
    pub bytes_per_page: f64,
    /// The pause predicted for `dirty_pages`, switchover cost included.
    pub predicted_pause: Duration,
    /// Time since the migration started.
    pub elapsed: Duration,
    /// The vCPU throttle in force during the last round, percent.
    pub throttle_pct: f64,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Another round, with the vCPUs throttled to this percentage.
    Continue {
        /// Percent of each time slice the vCPUs sleep.
        throttle_pct: f64,
    },
    /// Pause and send what is left.
    StopAndCopy,
    /// Give up: the source keeps the guest. The reason is shown to the operator.
    Cancel(String),
}

/// A convergence policy.
pub trait Convergence: Send + std::fmt::Debug {
    /// Decides after a pre-copy harvest.
    fn decide(&mut self, o: &Observation, limits: &PrecopyConfig) -> Decision;
}

/// The default policy.
///
/// - Stop and copy when the predicted pause fits the target.
/// - At the round or time limit: cancel, or (with `--on-timeout force`) switch over if the pause fits [`MAX_PAUSE`].
/// - Otherwise go on. When the guest dirties memory faster than [`OUTRUN`] of the bandwidth, throttle to the share
///   that brings its unthrottled dirty rate down to [`AIM`] of the bandwidth: computed from the measured rates, not
///   walked up in steps. The throttle only rises during a migration (lowering it would undo the convergence already
///   paid for), and if a round fails to shrink anyway, it goes half way to 99 %.
#[derive(Debug, Default)]
pub struct DefaultConvergence;

/// Dirty bytes per second, as a share of the bandwidth, above which the guest is throttled.
pub const OUTRUN: f64 = 0.5;
/// The share of the bandwidth the throttle aims the dirty rate at: each round then sends about a quarter of the
/// previous one, so a few rounds reach any reasonable target.
pub const AIM: f64 = 0.25;
/// The highest throttle.
pub const MAX_THROTTLE: f64 = 99.0;

impl Convergence for DefaultConvergence {
    fn decide(&mut self, o: &Observation, l: &PrecopyConfig) -> Decision {
        if o.predicted_pause <= l.downtime_target {
            return Decision::StopAndCopy;
        }
        let timed_out = o.rounds_done >= l.max_rounds || l.max_time.is_some_and(|t| o.elapsed >= t);
        if timed_out {
            let why = if o.rounds_done >= l.max_rounds {
                format!("{} rounds", o.rounds_done)
            } else {
                format!("{:.1} s", o.elapsed.as_secs_f64())
            };
            return match l.on_timeout {
                OnTimeout::Force if o.predicted_pause <= MAX_PAUSE => Decision::StopAndCopy,
                OnTimeout::Force => Decision::Cancel(format!(
                    "downtime target {} ms not met after {why}, and forcing would pause the guest for {} ms, over the \
                     {} ms bound",
                    l.downtime_target.as_millis(),
                    o.predicted_pause.as_millis(),
                    MAX_PAUSE.as_millis()
                )),
                OnTimeout::Cancel => Decision::Cancel(format!(
                    "downtime target {} ms not met after {why}: the predicted pause is {} ms",
                    l.downtime_target.as_millis(),
                    o.predicted_pause.as_millis()
                )),
            };
        }
        if !l.throttle {
            return Decision::Continue { throttle_pct: 0.0 };
        }
        Decision::Continue { throttle_pct: needed_throttle(o) }
    }
}

/// The throttle that brings the guest's dirty rate to [`AIM`] of the bandwidth (never lower than the current one).
pub fn needed_throttle(o: &Observation) -> f64 {
    let Some(bw) = o.bandwidth_bps.filter(|&b| b > 0.0) else { return o.throttle_pct };
    let running = (1.0 - o.throttle_pct / 100.0).max(0.01);
    // What the guest would dirty unthrottled, in wire bytes per second.
    let unthrottled = o.dirty_rate_pps * o.bytes_per_page / running;
    let mut pct = o.throttle_pct;
    if unthrottled > OUTRUN * bw {
        pct = pct.max((1.0 - AIM * bw / unthrottled) * 100.0);
    }
    if o.throttle_pct > 0.0 && o.dirty_pages >= o.last_round_pages {
        // Throttled, yet not shrinking: the estimate was off (the rate moved, or the link slowed). Go further.
        pct = pct.max(o.throttle_pct + (MAX_THROTTLE - o.throttle_pct) / 2.0);
    }
    pct.clamp(0.0, MAX_THROTTLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(dirty_rate_pps: f64, throttle_pct: f64) -> Observation {
        Observation {
            rounds_done: 2,
            dirty_pages: 20_000,
            last_round_pages: 40_000,
            bandwidth_bps: Some(125e6),
            dirty_rate_pps,
            bytes_per_page: 4096.0,
            predicted_pause: Duration::from_millis(700),
            elapsed: Duration::from_secs(3),
            throttle_pct,
        }
    }

    fn limits() -> PrecopyConfig {
        PrecopyConfig::default()
    }

    #[test]
    fn throttle_is_computed_from_the_rates() {
        // 60000 pages/s of 4 KiB is 246 MB/s against 125 MB/s: aim at 31 MB/s, so run 12.7 % of the time.
        let Decision::Continue { throttle_pct } = DefaultConvergence.decide(&obs(60_000.0, 0.0), &limits()) else {
            panic!()
        };
        assert!((throttle_pct - 87.3).abs() < 0.2, "{throttle_pct}");
        // Measured at that throttle, the same guest needs the same throttle: it does not creep.
        let measured = 60_000.0 * (1.0 - throttle_pct / 100.0);
        let again = needed_throttle(&obs(measured, throttle_pct));
        assert!((again - throttle_pct).abs() < 0.01, "{again}");
        // A guest well under the link is left alone.
        assert_eq!(DefaultConvergence.decide(&obs(5_000.0, 0.0), &limits()), Decision::Continue { throttle_pct: 0.0 });
    }

    #[test]
    fn a_round_that_does_not_shrink_raises_the_throttle() {
        let mut o = obs(1000.0, 50.0);
        o.dirty_pages = o.last_round_pages;
        assert_eq!(needed_throttle(&o), 74.5);
    }

    #[test]
    fn timeouts_cancel_or_force_within_the_bound() {
        let mut o = obs(60_000.0, 90.0);
        o.rounds_done = 30;
        assert!(matches!(DefaultConvergence.decide(&o, &limits()), Decision::Cancel(r) if r.contains("30 rounds")));
        let force = PrecopyConfig { on_timeout: OnTimeout::Force, ..limits() };
        assert_eq!(DefaultConvergence.decide(&o, &force), Decision::StopAndCopy);
        o.predicted_pause = Duration::from_millis(2500);
        assert!(matches!(DefaultConvergence.decide(&o, &force), Decision::Cancel(r) if r.contains("2000 ms bound")));
        let timed = PrecopyConfig { max_time: Some(Duration::from_secs(2)), ..limits() };
        let mut o = obs(60_000.0, 90.0);
        o.elapsed = Duration::from_secs(3);
        assert!(matches!(DefaultConvergence.decide(&o, &timed), Decision::Cancel(r) if r.contains("3.0 s")));
    }

    #[test]
    fn no_throttle_means_none() {
        let l = PrecopyConfig { throttle: false, ..limits() };
        assert_eq!(DefaultConvergence.decide(&obs(60_000.0, 0.0), &l), Decision::Continue { throttle_pct: 0.0 });
    }
}
