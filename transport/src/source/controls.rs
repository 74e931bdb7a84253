//! Live changes to a running migration, from any thread (cancel, switchover now, the downtime target, the bandwidth
//! cap), and its status for whoever watches it. The driver
//! takes the changes at its next event (within 50 ms) and hands each to the sans-IO machine as an input, as it does acks;
//! so what a change does is the machine's to decide, and the simulator tests it.

use std::sync::Mutex;
use std::time::Duration;

/// One change, as the driver takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Call the migration off; the source resumes, unthrottled. Too late once Commit is sent.
    Cancel(String),
    /// A new downtime target.
    DowntimeTarget(Duration),
    /// A new bandwidth cap over all links, bytes per second (None lifts it).
    MaxBandwidth(Option<u64>),
    /// Switch over at the end of the round in flight, whatever the target, once the pause fits the 2 s bound.
    SwitchoverNow,
}

/// How a running migration stands, as the driver last published it (at least every 100 ms while it runs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    /// "starting", "precopy", "switchover" (the source is paused) or "done".
    pub phase: &'static str,
    /// The round in flight.
    pub round: u32,
    /// Pages of the round in flight not yet acknowledged.
    pub remaining_pages: u64,
    /// The guest's dirty rate, pages per second, as last sampled.
    pub dirty_rate_pps: f64,
    /// The bandwidth the acknowledgements show, all links together, bytes per second.
    pub throughput_bps: f64,
    /// The pause the machine last predicted, milliseconds.
    pub predicted_downtime_ms: Option<f64>,
    /// The vCPU throttle, percent.
    pub throttle_pct: f64,
    /// Seconds until the round in flight is sent, plus the predicted pause; None before a rate is measured.
    pub eta_s: Option<f64>,
    /// Bytes written so far, all connections.
    pub bytes_on_wire: u64,
    /// The downtime target in force, milliseconds.
    pub downtime_target_ms: f64,
    /// The bandwidth cap in force, bytes per second.
    pub max_bandwidth: Option<u64>,
}

/// The changes asked for and not yet taken. Share it (in an `Arc`) between the caller of `migrate`, through
/// [`crate::source::SourceOptions::controls`], and whoever drives the migration: an operator's signal, a control
/// socket, the embedder's own API.
#[derive(Debug, Default)]
pub struct Controls {
    pending: Mutex<Vec<Change>>,
    status: Mutex<Status>,
}

impl Controls {
    /// Asks for `change`.
    pub fn push(&self, change: Change) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push(change);
    }

    /// Asks to cancel, saying why.
    pub fn cancel(&self, reason: impl Into<String>) {
        self.push(Change::Cancel(reason.into()));
    }

    /// How the migration stands.
    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn publish(&self, s: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The changes asked for since the last call, oldest first.
    pub(crate) fn take(&self) -> Vec<Change> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The changes asked for and not yet taken, taking them: for tests of what produces changes.
    #[doc(hidden)]
    pub fn take_for_test(&self) -> Vec<Change> {
        self.take()
    }
}
