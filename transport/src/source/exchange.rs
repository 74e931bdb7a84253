//! The driver's side of the control connection: writing frames, waiting for their answers (feeding every other
//! event to the driver meanwhile), and telling the destination why a migration is off. After a post-copy switch the
//! connection may be replaced by a reconnect (see `reconnect`), and a request is sent again on the new one.

use super::driver::Driver;
use super::{Event, MigrateError};
use crate::tls::Conn;
use crate::wire::{self, Kind};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Driver<'_> {
    /// Best effort: tells the destination why the migration is off, so that it reports the reason rather than a
    /// closed connection. Bounded, because the destination may be the thing that stopped reading.
    pub(super) fn tell_destination(&self, reason: &str) {
        let _ = self.ctl().stream().set_write_timeout(Some(Duration::from_millis(200)));
        let _ = wire::write_abort(self.ctl(), reason);
    }

    /// The control connection: the first, or the one post-copy's reconnect made.
    pub(super) fn ctl(&self) -> &Conn {
        self.pc.control.as_deref().unwrap_or(self.control)
    }

    /// Writes a control frame. A failure ends the migration, except after a post-copy switch, when the connection is
    /// dialled again (see `reconnect`). False when the frame did not go out.
    pub(super) fn send_control(&mut self, kind: Kind, body: &[u8]) -> bool {
        match wire::write_control(self.ctl(), kind, body) {
            Ok(n) => {
                self.control_written.fetch_add(n as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.control_lost(MigrateError::Link(e.into()));
                false
            }
        }
    }

    /// Waits for the event `want` picks out, handling failures and the peer timeout. None after a failure.
    pub(super) fn wait_for<T>(&mut self, want: impl Fn(&Event) -> Option<T>) -> Option<T> {
        self.exchange(None, want)
    }

    /// Sends a control frame and waits for the answer `want` picks out. A control connection that post-copy lost on
    /// the way is waited for, and the frame sent again on the new one: the answer may have been lost with the old.
    pub(super) fn ask<T>(&mut self, kind: Kind, body: &[u8], want: impl Fn(&Event) -> Option<T>) -> Option<T> {
        self.exchange(Some((kind, body)), want)
    }

    fn exchange<T>(&mut self, frame: Option<(Kind, &[u8])>, want: impl Fn(&Event) -> Option<T>) -> Option<T> {
        self.machine.heard(Instant::now());
        let mut sent_on = None;
        loop {
            if let Some((kind, body)) = frame {
                if sent_on != Some(self.pc.generation) && self.pc.lost.is_none() {
                    sent_on = Some(self.pc.generation);
                    self.send_control(kind, body);
                }
            }
            if self.error.is_some() {
                return None;
            }
            if let Some(e) = self.next_event() {
                if let Some(t) = want(&e) {
                    return Some(t);
                }
                self.handle(e);
            }
        }
    }
}
