//! Live changes to a running migration, from any thread (cancel, switchover now, the downtime target, the bandwidth
//! cap, the throttle ceiling), and what whoever watches it sees: the status and a stream of events. The driver
//! takes the changes at its next event (within 50 ms) and hands each to the sans-IO machine as an input, as it does acks;
//! so what a change does is the machine's to decide, and the simulator tests it. The driver publishes the status at
//! least every 100 ms and sends each event as it happens.

use crossbeam::channel::{Receiver, Sender, TrySendError};
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
    /// Switch to post-copy at the end of the round in flight (QEMU's `migrate-start-postcopy`).
    PostcopyNow,
    /// A new throttle ceiling, percent; a throttle in force above it is lowered at once.
    MaxThrottle(f64),
}

/// A change asked for with a value out of its range; nothing was changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ChangeError(pub String);

/// The longest downtime target a change may set.
pub const MAX_DOWNTIME_TARGET: Duration = Duration::from_secs(60);

impl Change {
    /// Whether the value is one the machine takes as it is (out-of-range values are refused, not clamped).
    pub fn check(&self) -> Result<(), ChangeError> {
        let bad = |why: &str| Err(ChangeError(why.into()));
        match *self {
            Change::DowntimeTarget(t) if t.is_zero() || t > MAX_DOWNTIME_TARGET => {
                bad("downtime target: above 0 and at most 60000 ms")
            }
            Change::MaxBandwidth(Some(0)) => bad("bandwidth cap: above 0 (lift it with none)"),
            Change::MaxThrottle(p) if !(0.0..=livemig_engine::precopy::MAX_THROTTLE).contains(&p) => {
                bad("throttle ceiling: 0 to 99 percent")
            }
            _ => Ok(()),
        }
    }
}

/// Something that happened to a running migration, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationEvent {
    /// The phase changed ([`Status::phase`]'s names).
    Phase(&'static str),
    /// A round started: its number, the pages it sends, the throttle in force.
    RoundStarted {
        /// The round.
        round: u32,
        /// Pages in it.
        pages: u64,
        /// The vCPU throttle, percent.
        throttle_pct: f64,
    },
    /// Every page of a round was acknowledged.
    RoundDone {
        /// The round.
        round: u32,
        /// Its wire bytes, all links.
        bytes: u64,
    },
    /// A data link failed; its batches go out on the others.
    LinkFailed {
        /// The link's index.
        link: usize,
        /// Its name.
        name: String,
        /// Why.
        error: String,
    },
    /// The vCPU throttle changed, percent.
    Throttle(f64),
    /// A live change was taken (and handed to the machine, which may refuse it: a cancel after Commit).
    Changed(Change),
    /// The migration ended: "completed", "failed" or "cancelled", with the error if any. The last event.
    Finished {
        /// How it ended.
        status: &'static str,
        /// Why, if it did not complete.
        error: Option<String>,
    },
}

/// Events a watcher may fall behind by before newer ones are dropped for it (the status stays current).
const EVENT_BACKLOG: usize = 4096;

/// How a running migration stands, as the driver last published it (at least every 100 ms while it runs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    /// "starting", "precopy", "switchover" (the source is paused), "postcopy" (the destination runs the guest and
    /// pulls what it lacks), "postcopy-paused" (no link delivers, or the control connection is being reconnected;
    /// both sides wait for the network) or "done".
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
    /// The throttle ceiling in force, percent.
    pub max_throttle_pct: f64,
    /// Throughput per data link as the acknowledgements show it, bytes per second (0 for a failed link).
    pub link_throughput_bps: Vec<f64>,
}

/// The changes asked for and not yet taken. Share it (in an `Arc`) between the caller of `migrate`, through
/// [`crate::source::SourceOptions::controls`], and whoever drives the migration: an operator's signal, a control
/// socket, the embedder's own API. One serves one migration: when it ends, its event streams close for good.
#[derive(Debug, Default)]
pub struct Controls {
    pending: Mutex<Vec<Change>>,
    status: Mutex<Status>,
    watchers: Mutex<Vec<Sender<MigrationEvent>>>,
    /// Set when the migration has ended: a later subscriber's stream is over at once.
    ended: std::sync::atomic::AtomicBool,
}

impl Controls {
    /// Asks for `change`, or refuses it when its value is out of range ([`Change::check`]).
    pub fn push(&self, change: Change) -> Result<(), ChangeError> {
        change.check()?;
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push(change);
        Ok(())
    }

    /// Asks to cancel, saying why.
    pub fn cancel(&self, reason: impl Into<String>) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push(Change::Cancel(reason.into()));
    }

    /// How the migration stands.
    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn publish(&self, s: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// A stream of the events from now on, ending after the last. A watcher that falls [`EVENT_BACKLOG`] events
    /// behind misses newer ones (the migration never waits for it); one that drops its receiver is forgotten.
    pub fn subscribe(&self) -> Receiver<MigrationEvent> {
        let (tx, rx) = crossbeam::channel::bounded(EVENT_BACKLOG);
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if !self.ended.load(std::sync::atomic::Ordering::SeqCst) {
            watchers.push(tx);
        }
        rx
    }

    /// True once the migration these controls served has ended.
    pub fn has_ended(&self) -> bool {
        self.ended.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends every watcher's stream (after the last event): a receiver sees it disconnected once it has read all.
    pub(crate) fn close_events(&self) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        watchers.clear();
    }

    pub(crate) fn emit(&self, event: MigrationEvent) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(|w| !matches!(w.try_send(event.clone()), Err(TrySendError::Disconnected(_))));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_streams_end_after_the_last_event_even_for_a_late_subscriber() {
        let c = Controls::default();
        let early = c.subscribe();
        c.emit(MigrationEvent::Phase("precopy"));
        c.emit(MigrationEvent::Finished { status: "completed", error: None });
        c.close_events();
        let late = c.subscribe();
        // Iterating ends (it would block for ever on a stream that never closes).
        assert_eq!(early.iter().count(), 2);
        assert_eq!(late.iter().count(), 0);
    }

    #[test]
    fn out_of_range_changes_are_refused_and_change_nothing() {
        let c = Controls::default();
        assert!(c.push(Change::DowntimeTarget(Duration::ZERO)).is_err());
        assert!(c.push(Change::DowntimeTarget(Duration::from_secs(61))).is_err());
        assert!(c.push(Change::MaxBandwidth(Some(0))).is_err());
        assert!(c.push(Change::MaxThrottle(99.5)).is_err());
        assert!(c.push(Change::MaxThrottle(f64::NAN)).is_err());
        assert!(c.take().is_empty());
        c.push(Change::MaxThrottle(0.0)).unwrap();
        c.push(Change::MaxBandwidth(None)).unwrap();
        assert_eq!(c.take().len(), 2);
    }
}
