//! Post-copy's reconnect: dialling again the connections that errored after the switch.
//!
//! After the switch neither side can finish alone, so a connection that is reset (rather than one that goes silent,
//! which post-copy waits out on the same connection) does not end the migration either. Each lost connection is
//! dialled again on a thread of its own, every [`REDIAL_EVERY`], for as long as post-copy waits for the network
//! (`--postcopy-wait`), and what it gets is handed to the driver as an event:
//! - a data link presents the session with a LinkHello, under TLS with the proof that binds it to the first control
//!   session, as at the start; the driver gives the failed link the new connection ([`DataLink::revive`]);
//! - the control connection presents a Resume (the session and the same proof) and waits for the destination's
//!   Resumed; the thread then reads the new connection as the control reader did the old one. The destination
//!   admits a Resume only while its guest runs in post-copy, asks again for every page its faults still wait for,
//!   and the driver sends again the one request it may have been waiting on (Verify, Commit).
//!
//! A destination that refuses the Resume (at its cap of waiting connections, or not running this migration in
//! post-copy any more) is asked again until the wait runs out, and then the migration ends with the outcome unknown. Data links the caller connected
//! itself ([`super::Links::Streams`]) cannot be dialled again.
//!
//! [`DataLink::revive`]: crate::link::data::DataLink::revive

use super::driver::Driver;
use super::{setup, Event, MigrateError};
use crate::stream::Stream;
use crate::tls::{self, Conn, SourceSecurity};
use crate::uring::RingIo;
use crate::wire::{self, postcopy, Kind, WireError};
use crossbeam::channel::Sender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Opens a connection to the destination, as often as asked.
pub(super) type Dial = Arc<dyn Fn() -> std::io::Result<Stream> + Send + Sync>;

/// How often a lost connection is dialled.
const REDIAL_EVERY: Duration = Duration::from_millis(500);

/// How long the destination has to answer a Resume.
const RESUME_ANSWER: Duration = Duration::from_secs(5);

/// What dialling again needs: where each connection went, and how to present it.
pub(super) struct Redialer {
    pub(super) control: Option<Dial>,
    pub(super) links: Vec<Option<Dial>>,
    pub(super) security: SourceSecurity,
    pub(super) session: u64,
    /// The first control connection's binding secret, which every later connection proves it knows.
    pub(super) binding: Option<[u8; 32]>,
    pub(super) ring: Option<RingIo>,
    /// The guest's pages, to bound what the new control connection's reader accepts.
    pub(super) pages: u64,
    /// Set when the migration ends: dialling threads stop, and the last control reader reports nothing.
    pub(super) stop: Arc<AtomicBool>,
}

impl Drop for Redialer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Redialer {
    /// Dials the control connection's peer again (when it has an address), and each link as `links` says.
    pub(super) fn new(
        control: &Conn,
        links: Vec<Option<Dial>>,
        security: &SourceSecurity,
        opts: &super::SourceOptions,
        ring: Option<&crate::uring::Ring>,
        guest: &dyn livemig_engine::guest::Guest,
    ) -> Self {
        let control_dial = control.stream().peer_address().ok().map(|peer| {
            let dial: Dial = Arc::new(move || peer.connect(super::CONNECT_TIMEOUT));
            dial
        });
        Redialer {
            control: control_dial,
            links,
            security: security.clone(),
            session: opts.session,
            binding: control.binding().copied(),
            ring: ring.map(crate::uring::Ring::io),
            pages: guest.memory().total_pages(),
            stop: Arc::default(),
        }
    }

    /// Whether link `i` can be dialled again.
    pub(super) fn can_redial(&self, i: usize) -> bool {
        self.links.get(i).is_some_and(Option::is_some)
    }

    /// Dials data link `i` until it is presented (`Event::LinkBack`) or `until` passes (`Event::RedialGaveUp`).
    pub(super) fn link(&self, i: usize, until: Instant, ev: &Sender<Event>) -> std::io::Result<()> {
        let Some(dial) = self.links.get(i).cloned().flatten() else { return Ok(()) };
        let (security, session, binding, ring, stop, ev) =
            (self.security.clone(), self.session, self.binding, self.ring.clone(), self.stop.clone(), ev.clone());
        std::thread::Builder::new().name(format!("lm-redial{i}")).spawn(move || {
            let index = livemig_engine::num::u32_len(i);
            let event = retry(until, &stop, || {
                let stream = dial().map_err(|e| Failed::Retry(e.to_string()))?;
                setup::present_link(stream, &security, session, binding.as_ref(), index, ring.as_ref())
                    .map_err(Failed::Retry)
            });
            let _ = ev.send(match event {
                Some(Ok(conn)) => Event::LinkBack(i, Box::new(conn)),
                Some(Err(why)) => Event::RedialGaveUp(Some(i), why),
                None => return,
            });
        })?;
        Ok(())
    }

    /// Dials the control connection until the destination resumes on it, then reads it as the control reader (of
    /// `generation`) until it ends.
    pub(super) fn control(&self, generation: u32, until: Instant, ev: &Sender<Event>) -> std::io::Result<()> {
        let Some(dial) = self.control.clone() else { return Ok(()) };
        let (security, session, binding, pages, stop, ev) =
            (self.security.clone(), self.session, self.binding, self.pages, self.stop.clone(), ev.clone());
        std::thread::Builder::new().name("lm-redial-control".into()).spawn(move || {
            let event = retry(until, &stop, || {
                let stream = dial().map_err(|e| Failed::Retry(e.to_string()))?;
                resume(stream, &security, session, binding.as_ref(), pages).map_err(|e| match e {
                    WireError::PeerAbort(why) => Failed::Refused(format!("the destination refused the Resume: {why}")),
                    e => Failed::Retry(e.to_string()),
                })
            });
            match event {
                Some(Ok((conn, missing))) => {
                    let conn = Arc::new(conn);
                    if ev.send(Event::ControlBack(conn.clone(), missing)).is_ok() {
                        setup::control_loop(&conn, &ev, &stop, pages, generation);
                    }
                }
                Some(Err(why)) => drop(ev.send(Event::RedialGaveUp(None, why))),
                None => {}
            }
        })?;
        Ok(())
    }
}

/// Why an attempt to dial again failed. Either is tried again: a refusal may pass too (a destination at its cap of
/// waiting connections, under a flood), and one that does not costs only the wait.
enum Failed {
    /// The network, or a connection that died on the way.
    Retry(String),
    /// The destination answered with an Abort.
    Refused(String),
}

/// Calls `attempt` every [`REDIAL_EVERY`] until it succeeds or `until` passes (the last error); None once the
/// migration stopped.
fn retry<T>(until: Instant, stop: &AtomicBool, attempt: impl Fn() -> Result<T, Failed>) -> Option<Result<T, String>> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        let started = Instant::now();
        match attempt() {
            Ok(t) => return Some(Ok(t)),
            Err(Failed::Retry(why) | Failed::Refused(why)) if Instant::now() >= until => return Some(Err(why)),
            Err(Failed::Retry(why)) => tracing::debug!(error = %why, "post-copy: reconnect attempt failed"),
            Err(Failed::Refused(why)) => tracing::warn!(error = %why, "post-copy: reconnect attempt refused"),
        }
        std::thread::sleep(REDIAL_EVERY.saturating_sub(started.elapsed()));
    }
}

/// One attempt at a new control connection: the TLS handshake, the Resume, and the destination's answer.
fn resume(
    stream: Stream,
    security: &SourceSecurity,
    session: u64,
    binding: Option<&[u8; 32]>,
    pages: u64,
) -> Result<(Conn, u64), WireError> {
    let conn = tls::connect(stream, security, super::CONNECT_TIMEOUT)
        .map_err(|e| WireError::Io(std::io::Error::other(e.to_string())))?;
    let proof = binding.zip(conn.binding()).map(|(c, l)| tls::link_proof(c, l));
    let hello = wire::LinkHello { session, link: 0, proof };
    conn.stream().set_write_timeout(Some(RESUME_ANSWER))?;
    wire::write_control(&conn, Kind::Resume, &hello.encode())?;
    let mut buf = Vec::new();
    let mut d = wire::Deadline::new(&conn, Instant::now() + RESUME_ANSWER, "Resumed");
    let h = wire::read_frame(&mut d, &mut buf)?;
    let missing = match h.kind {
        Kind::Resumed => postcopy::decode_resumed(&buf, pages)?,
        Kind::Abort => return Err(WireError::PeerAbort(wire::decode_reason(&buf))),
        got => return Err(WireError::Unexpected { got, expected: "Resumed" }),
    };
    conn.stream().set_read_timeout(None)?;
    let _ = conn.stream().set_nodelay(true);
    Ok((conn, missing))
}

/// The error a migration ends with when a connection could not be dialled again.
pub(super) fn gave_up(link: Option<usize>, why: &str, wait: Duration) -> MigrateError {
    let what = link.map_or_else(|| "the control connection".to_string(), |i| format!("data link {i}"));
    MigrateError::Machine(format!("post-copy: {what} could not be reconnected within {wait:?}: {why}"))
}

impl Driver<'_> {
    /// The control connection failed. Before a post-copy switch (Switched heard) that ends the migration; after it
    /// the connection is dialled again, and meanwhile the push goes on and fault requests wait on the destination.
    pub(super) fn control_lost(&mut self, e: MigrateError) {
        if self.pc.lost.is_some() {
            return;
        }
        if self.machine.switched_at().is_none() || self.pc.redial.control.is_none() {
            self.fail(e);
            return;
        }
        let wait = self.opts.precopy.postcopy_wait;
        tracing::error!(
            error = %e,
            wait_s = wait.as_secs(),
            "post-copy: the control connection was lost; reconnecting (the destination's faults wait meanwhile)"
        );
        // A connection still open on this side is dead to it from now: its reader's last words are ignored.
        let _ = self.ctl().stream().shutdown(std::net::Shutdown::Both);
        let now = Instant::now();
        self.pc.lost = Some(now);
        self.pc.generation += 1;
        if let Err(e) = self.pc.redial.control(self.pc.generation, now + wait, self.ev_tx) {
            self.fail(MigrateError::Link(WireError::Io(e)));
        }
    }

    /// The destination resumed on a new control connection: it replaces the old one.
    pub(super) fn control_back(&mut self, conn: Arc<Conn>, missing: u64) {
        let _ = conn.set_write_timeout(Some(self.opts.precopy.postcopy_wait));
        let down = self.pc.lost.take().map_or(0.0, |at| at.elapsed().as_secs_f64());
        tracing::warn!(down_s = down, missing, "post-copy: the control connection was reconnected");
        self.pc.control = Some(conn);
        if let Some(r) = self.pc.report.as_mut() {
            r.reconnects += 1;
        }
        self.machine.heard(Instant::now());
    }

    /// Starts dialling data link `i` again, unless it cannot be (a stream the caller gave) or already is. Returns
    /// whether it is being dialled.
    pub(super) fn redial_link(&mut self, i: usize) -> bool {
        if self.stripe.links[i].is_dialing() {
            return true;
        }
        if !self.pc.redial.can_redial(i) {
            return false;
        }
        let until = Instant::now() + self.opts.precopy.postcopy_wait;
        match self.pc.redial.link(i, until, self.ev_tx) {
            Ok(()) => {
                tracing::warn!(link = i, "post-copy: dialling the data link again");
                self.stripe.links[i].set_dialing(true);
                true
            }
            Err(e) => {
                tracing::warn!(link = i, error = %e, "post-copy: cannot dial the data link again");
                false
            }
        }
    }

    /// Data link `i` was dialled again and presented: it takes batches again.
    pub(super) fn link_back(&mut self, i: usize, conn: Box<Conn>) {
        if self.error.is_some() {
            self.stripe.links[i].set_dialing(false);
            return;
        }
        let _ = conn.set_write_timeout(Some(self.opts.precopy.postcopy_wait));
        let link = &self.stripe.links[i];
        tracing::warn!(link = i, name = link.name(), "post-copy: data link reconnected");
        link.revive(*conn);
        self.link_errors[i] = None;
        self.link_progress[i] = Instant::now();
        if let Some(r) = self.pc.report.as_mut() {
            r.reconnects += 1;
        }
        self.repace();
    }

    /// A connection could not be dialled again in time: the control connection, or the last hope of a data link.
    pub(super) fn gave_up(&mut self, link: Option<usize>, why: &str) {
        let wait = self.opts.precopy.postcopy_wait;
        match link {
            None => self.fail(gave_up(None, why, wait)),
            Some(i) => {
                self.stripe.links[i].set_dialing(false);
                tracing::warn!(link = i, error = %why, "post-copy: the data link could not be reconnected");
                if !self.stripe.links_left() {
                    self.fail(gave_up(link, why, wait));
                }
            }
        }
    }
}
