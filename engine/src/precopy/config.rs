//! A migration's tunables: the downtime target, the timeout rule, the throttle and bandwidth limits, post-copy.

use super::{OnTimeout, MAX_THROTTLE};
use std::time::Duration;

/// Tunables of a migration.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecopyConfig {
    /// The pause the migration aims for.
    pub downtime_target: Duration,
    /// Pre-copy rounds (round 0 included) after which the timeout rule applies.
    pub max_rounds: u32,
    /// Pre-copy time after which the timeout rule applies.
    pub max_time: Option<Duration>,
    /// What the timeout rule does.
    pub on_timeout: OnTimeout,
    /// Whether the vCPUs may be throttled.
    pub throttle: bool,
    /// The switchover's fixed cost (vCPU state, verification, commit round trip), added to every prediction until
    /// the driver measures it ([`Precopy::set_switchover_cost`]).
    pub switchover_cost: Duration,
    /// A destination that shows no progress for this long, while the driver waits on it, is declared gone.
    pub peer_timeout: Duration,
    /// The most bytes per second all links together may carry (`--max-bandwidth`); None for no cap. The driver
    /// paces the links to it, and the machine predicts with it: a measured rate above the cap is not one the
    /// migration will see.
    pub max_bandwidth: Option<u64>,
    /// The highest vCPU throttle the machine may ask for, percent (`--max-throttle`; at most [`MAX_THROTTLE`]). A
    /// guest that cannot converge under it reaches the timeout rule instead of being starved further.
    pub max_throttle: f64,
    /// Whether and when to switch to post-copy (`--postcopy`).
    pub postcopy: PostcopyMode,
    /// After the switch, how long a destination may stay silent (every link down) before the migration is given up:
    /// neither side can finish alone, so both wait for the network to come back (`--postcopy-wait`).
    pub postcopy_wait: Duration,
}

/// How long post-copy waits for a network that went away, by default.
pub const POSTCOPY_WAIT: Duration = Duration::from_secs(600);

/// When the machine switches to post-copy: the destination runs the guest before every page has arrived, and pulls
/// what it touches first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PostcopyMode {
    /// Never: pre-copy converges (throttling the guest up to the limit) or the timeout rule applies.
    #[default]
    Off,
    /// When pre-copy cannot meet the downtime target under the throttle limit: the guest would need a higher
    /// throttle than [`PrecopyConfig::max_throttle`], or the timeout rule would cancel.
    Auto,
    /// After round 0.
    Always,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            downtime_target: Duration::from_millis(300),
            max_rounds: 30,
            max_time: None,
            on_timeout: OnTimeout::Cancel,
            throttle: true,
            switchover_cost: Duration::from_millis(5),
            peer_timeout: Duration::from_secs(10),
            max_bandwidth: None,
            max_throttle: MAX_THROTTLE,
            postcopy: PostcopyMode::Off,
            postcopy_wait: POSTCOPY_WAIT,
        }
    }
}
