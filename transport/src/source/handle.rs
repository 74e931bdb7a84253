//! A migration behind a handle, for an embedder: [`Migration::start`] runs [`super::migrate`] on a thread of its own
//! and returns at once. The handle is `Send + Sync` (share it, or its [`Controls`], with any thread): it reads the
//! status, hands out the event stream, makes live changes, and [`Migration::wait`]s for the report. Every change goes
//! through the same [`Controls`] the CLI's signal handler and control socket use, so it reaches the sans-IO machine
//! as an input at the driver's next event.

use super::controls::{Change, ChangeError, Controls, MigrationEvent, Status};
use super::{run, Links, SourceOptions, SourceReport};
use crate::stream::Stream;
use crate::tls::SourceSecurity;
use crossbeam::channel::Receiver;
use livemig_engine::guest::Guest;
use std::sync::Arc;
use std::time::Duration;

/// A running migration.
#[derive(Debug)]
pub struct Migration {
    controls: Arc<Controls>,
    events: Receiver<MigrationEvent>,
    thread: Option<std::thread::JoinHandle<SourceReport>>,
}

impl Migration {
    /// Starts migrating `guest` to the destination at the other end of `control`, over `links`, and returns its
    /// handle. The migration uses `opts.controls` when the caller shares one (a signal handler's, say), else its own.
    /// Fails only when the thread cannot be started or the controls served an earlier migration; everything else
    /// ends up in the report.
    pub fn start(
        guest: Arc<dyn Guest>,
        control: impl Into<Stream>,
        links: Links,
        mut opts: SourceOptions,
        security: SourceSecurity,
    ) -> std::io::Result<Migration> {
        let controls = opts.controls.get_or_insert_with(Default::default).clone();
        if controls.has_ended() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "these controls served a migration that has ended; each migration needs its own",
            ));
        }
        controls.publish(Status { phase: "starting", ..Status::default() });
        let events = controls.subscribe();
        let control = control.into();
        let closer = CloseEvents(controls.clone());
        let thread = std::thread::Builder::new().name("lm-migration".into()).spawn(move || {
            let _closer = closer;
            run(&*guest, control, links, &opts, &security, &|_| {})
        })?;
        Ok(Migration { controls, events, thread: Some(thread) })
    }

    /// How it stands now (published at least every 100 ms while it runs).
    pub fn status(&self) -> Status {
        self.controls.status()
    }

    /// Its events, from the start, in order; [`MigrationEvent::Finished`] is the last, and the stream ends after it
    /// (iterating it ends). Clone the receiver to read them on another thread.
    pub fn events(&self) -> &Receiver<MigrationEvent> {
        &self.events
    }

    /// Calls it off: the source guest keeps running, unthrottled, and the destination discards what it received.
    /// Too late once Commit is sent (the destination may run the guest): then it completes, and the report says so.
    pub fn cancel(&self) {
        self.controls.cancel("cancelled by the embedder");
    }

    /// A new downtime target (above 0, at most 60 s).
    pub fn set_downtime_target(&self, target: Duration) -> Result<(), ChangeError> {
        self.controls.push(Change::DowntimeTarget(target))
    }

    /// A new bandwidth cap over all links, bytes per second; None lifts it.
    pub fn set_max_bandwidth(&self, bytes_per_second: Option<u64>) -> Result<(), ChangeError> {
        self.controls.push(Change::MaxBandwidth(bytes_per_second))
    }

    /// A new throttle ceiling, percent (0 to 99); a throttle in force above it is lowered at once.
    pub fn set_max_throttle(&self, pct: f64) -> Result<(), ChangeError> {
        self.controls.push(Change::MaxThrottle(pct))
    }

    /// Switches over at the end of the round in flight, whatever the downtime target, once the pause it predicts
    /// fits the 2 s bound.
    pub fn switchover_now(&self) {
        // A switchover carries no value to refuse.
        let _ = self.controls.push(Change::SwitchoverNow);
    }

    /// Switches to post-copy at the end of the round in flight: the destination runs the guest from then on and pulls
    /// the pages it touches first (QEMU's `migrate-start-postcopy`). Nothing happens once pre-copy is over.
    pub fn postcopy(&self) {
        let _ = self.controls.push(Change::PostcopyNow);
    }

    /// The controls it runs under, to hand to another thread (a signal handler, a control socket).
    pub fn controls(&self) -> Arc<Controls> {
        self.controls.clone()
    }

    /// True once it has ended (the report is ready).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(std::thread::JoinHandle::is_finished)
    }

    /// Waits for the end and returns the report.
    pub fn wait(mut self) -> SourceReport {
        self.join()
    }

    fn join(&mut self) -> SourceReport {
        let thread = self.thread.take().expect("joined once: wait consumes the handle, drop joins only if not");
        match thread.join() {
            Ok(report) => report,
            // A panic in the driver is a bug; the guest's state cannot be vouched for, so it is not papered over.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// A handle dropped before the end cancels the migration and waits for it, so that none runs on unowned.
impl Drop for Migration {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.controls.cancel("the embedder dropped the migration's handle");
            if !std::thread::panicking() {
                drop(self.join());
            }
        }
    }
}

/// Ends the event streams when the migration's thread ends, however it ends (a panic included), so that no watcher
/// waits for ever.
struct CloseEvents(Arc<Controls>);

impl Drop for CloseEvents {
    fn drop(&mut self) {
        self.0.close_events();
    }
}
