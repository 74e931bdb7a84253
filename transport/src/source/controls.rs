//! Live changes to a running migration, from any thread: cancel, the downtime target, the bandwidth cap. The driver
//! takes them at its next event (within 50 ms) and hands each to the sans-IO machine as an input, as it does acks;
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
}

/// The changes asked for and not yet taken. Share it (in an `Arc`) between the caller of `migrate`, through
/// [`crate::source::SourceOptions::controls`], and whoever drives the migration: an operator's signal, a control
/// socket, the embedder's own API.
#[derive(Debug, Default)]
pub struct Controls {
    pending: Mutex<Vec<Change>>,
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

    /// The changes asked for since the last call, oldest first.
    pub(crate) fn take(&self) -> Vec<Change> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
