//! The destination's side of post-copy, driven by the control loop.
//!
//! The source sends the bitmap of the pages it still holds (Missing frames): most of it as it decides to switch,
//! before it pauses, and what its guest wrote since after the pause, with the vCPU state, then Switch. Nothing writes
//! guest memory meanwhile: the vCPUs here have not run, the data links are idle (the source switches only once every
//! earlier page was acknowledged), and the pre-fault helper is stopped at the first Missing frame. The destination
//! drops the old copies of the missing pages as each frame comes; at Switch it takes guest memory under
//! userfaultfd ([`Postcopy::arm`]), makes it the receiver's placer, resumes the vCPUs and answers Switched.
//!
//! From then on a fault thread reads the vCPUs' faults and asks the source for missing pages (PageRequest on the
//! control connection; zero pages are placed at once), the source's answers come back on the control connection as
//! Pages frames applied here, and the push arrives on the data links as before. Every page is placed whole by the
//! kernel, once. At Verify every page must have arrived; the destination sends its figures and its roots (over the
//! tables: the guest runs, so memory itself cannot be re-hashed), and after Commit closes the userfaultfd.
//!
//! If the migration fails after the switch, the guest cannot go back to the source. With every page here it runs
//! on; with pages missing it cannot, and the destination stops its vCPUs and says so. A verification that finds the
//! tables different stops it too: it ran on memory that is not the source's.

use super::{Live, ReceiveError, Shared, MID_FRAME_TIMEOUT};
use crate::tls::Conn;
use crate::wire::{self, postcopy as msg, Header, Kind, Verified, Verify, WireError};
use livemig_engine::dirty::Bitmap;
use livemig_engine::guest::Guest;
use livemig_engine::receive::postcopy::{discard_touched, discard_words, Fault, Postcopy, PostcopyStats};
use livemig_engine::receive::ApplyState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the fault thread waits for a fault before it looks at the stop flag again.
const FAULT_POLL: Duration = Duration::from_millis(20);

/// Post-copy as the control loop sees it.
#[derive(Default)]
pub(super) struct PostcopyState {
    missing: Option<Bitmap>,
    pub(super) armed: Option<Arc<Postcopy>>,
    urgent: ApplyState,
    pub(super) resumed_at: Option<Instant>,
    entries: Vec<livemig_engine::encode::PageEntry>,
    /// Pages that came on the urgent path.
    pub(super) pulled: u64,
    /// The control connection's generation: 0 for the first, one more for each the source reconnected.
    pub(super) generation: u32,
    /// When the control connection was lost after the switch; the source has `postcopy_wait` to reconnect it.
    lost: Option<Instant>,
}

/// Writes one control frame, on the connection the source reconnected if there is one. The fault thread writes on
/// the control connection too, and a plaintext connection's writes are not atomic: every write from the switch on
/// takes the shared lock.
pub(super) fn send(shared: &Shared<'_>, control: &Conn, kind: Kind, body: &[u8]) -> Result<(), WireError> {
    let _w = shared.control_write.lock().unwrap_or_else(|e| e.into_inner());
    let resumed = shared.resumed();
    wire::write_control(resumed.as_deref().unwrap_or(control), kind, body).map(drop).map_err(WireError::from)
}

impl PostcopyState {
    /// A Missing frame: more pages the source holds the only current copy of. Their old copies go at once (the
    /// first frames come before the source pauses, so that little of this is left for the pause).
    pub(super) fn missing(
        &mut self,
        body: &[u8],
        guest: &dyn Guest,
        shared: &Shared<'_>,
        control: &Conn,
    ) -> Result<(), ReceiveError> {
        let pages = guest.memory().total_pages();
        let (first, words) = msg::decode_missing(body, pages)?;
        // From the first Missing frame nothing may fault pages in: a dropped page must stay missing.
        *shared.prefault_stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        shared.postcopy.store(true, Ordering::Relaxed);
        // The vCPUs have not run here yet, and the data links are idle: every page sent before was acknowledged.
        discard_words(guest.memory(), &words, first);
        self.missing.get_or_insert_with(|| Bitmap::new(pages)).or_region(&words, first, pages - first);
        Ok(send(shared, control, Kind::MissingAck, &[])?)
    }

    /// The switch: arms userfaultfd over guest memory, resumes the guest, starts the fault thread, answers Switched.
    pub(super) fn switch<'s, 'e: 's, 'a: 'e>(
        &mut self,
        s: &'s std::thread::Scope<'s, 'e>,
        control: &'e Conn,
        guest: &dyn Guest,
        shared: &'e Shared<'a>,
    ) -> Result<(), ReceiveError> {
        let missing = self.missing.take().unwrap_or_else(|| Bitmap::new(guest.memory().total_pages()));
        let t = Instant::now();
        let touched = discard_touched(guest.memory(), &missing)?;
        let pc = Postcopy::arm(guest.memory(), &missing).map_err(|e| ReceiveError::Postcopy(e.to_string()))?;
        tracing::info!(arm_us = t.elapsed().as_micros(), touched, "post-copy: guest memory under userfaultfd");
        let pc = Arc::new(pc);
        shared.rx.set_placer(pc.clone());
        self.armed = Some(pc.clone());
        let live = shared.enter().ok_or_else(|| ReceiveError::Postcopy("the migration is stopping".into()))?;
        std::thread::Builder::new()
            .name("lm-faults".into())
            .spawn_scoped(s, move || serve_faults(&pc, control, shared, live))
            .map_err(WireError::from)?;
        guest.vcpus().resume();
        self.resumed_at = Some(Instant::now());
        tracing::info!(missing = missing.count_ones(), "post-copy: the guest runs here; pulling what it touches");
        send(shared, control, Kind::Switched, &[])?;
        Ok(())
    }

    /// The control connection failed after the switch. The guest runs here and the source holds its missing pages, so
    /// neither side gives up: the source reconnects (a Resume on any of the migration's listeners) within
    /// `postcopy_wait`, and the data links go on meanwhile.
    pub(super) fn control_lost(&mut self, e: &WireError, opts: &super::DestOptions) {
        if self.lost.is_none() {
            tracing::error!(
                error = %e,
                wait_s = opts.postcopy_wait.as_secs(),
                missing = self.armed.as_ref().map_or(0, |pc| pc.remaining()),
                "post-copy: the control connection was lost; the guest's faults wait until the source reconnects"
            );
            self.lost = Some(Instant::now());
        }
    }

    /// How long the source has left to reconnect a lost control connection.
    pub(super) fn reconnect_left(&self, opts: &super::DestOptions) -> Option<Duration> {
        self.lost.map(|at| (at + opts.postcopy_wait).saturating_duration_since(Instant::now()))
    }

    /// Ends the wait for a reconnect once `postcopy_wait` has passed.
    pub(super) fn check_reconnect(&self, opts: &super::DestOptions) -> Result<(), ReceiveError> {
        match self.reconnect_left(opts) {
            Some(left) if left.is_zero() => Err(ReceiveError::Wire(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the control connection was lost and the source did not reconnect within {:?}",
                    opts.postcopy_wait
                ),
            )))),
            _ => Ok(()),
        }
    }

    /// A Resume: the source's new control connection (checked like a data link: the session, and under TLS the proof
    /// of the first control session) replaces the old one, which is shut if this side still held it open. The source
    /// hears how many pages are still missing, and every page a fault asked for and that has not arrived is asked
    /// again: its answer may have been lost with the old connection.
    pub(super) fn resume<'s, 'e: 's, 'a: 'e>(
        &mut self,
        s: &'s std::thread::Scope<'s, 'e>,
        conn: Arc<Conn>,
        (control, opts): (&Conn, &super::DestOptions),
        shared: &'e Shared<'a>,
        tx: &crossbeam::channel::Sender<super::Msg>,
    ) -> Result<(), ReceiveError> {
        let Some(pc) = self.armed.clone() else {
            return Err(ReceiveError::Unbound("a Resume before the switch"));
        };
        // Shut first: a write blocked on the old connection holds the write lock, and this unblocks it.
        let _ = shared.resumed().as_deref().unwrap_or(control).stream().shutdown(std::net::Shutdown::Both);
        {
            let _w = shared.control_write.lock().unwrap_or_else(|e| e.into_inner());
            *shared.resumed.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        }
        let _ = conn.stream().set_write_timeout(Some(super::WRITE_TIMEOUT));
        let _ = conn.stream().set_read_timeout(None);
        let _ = conn.stream().set_nodelay(true);
        self.generation += 1;
        let (generation, t) = (self.generation, tx.clone());
        std::thread::Builder::new()
            .name("lm-control".into())
            .spawn_scoped(s, move || super::read_control(&conn, &t, shared, generation))
            .map_err(WireError::from)?;
        tracing::warn!(
            missing = pc.remaining(),
            down_s = self.lost.take().map_or(0.0, |at| at.elapsed().as_secs_f64()),
            "post-copy: resumed on the source's new control connection"
        );
        let mut sent = send(shared, control, Kind::Resumed, &msg::encode_resumed(pc.remaining()));
        for pages in pc.awaited().chunks(msg::REQUEST_PAGES) {
            sent = sent.and_then(|()| send(shared, control, Kind::PageRequest, &msg::encode_request(pages)));
        }
        // A new connection that fails at once is lost like the first: the source dials again.
        if let Err(e) = sent {
            self.control_lost(&e, opts);
        }
        Ok(())
    }

    /// Pages the source sent on the control connection in answer to faults.
    pub(super) fn urgent(&mut self, h: &Header, body: &[u8], shared: &Shared<'_>) -> Result<(), ReceiveError> {
        let p = wire::decode_pages(h, body, &mut self.entries)?;
        shared.rx.apply_frame(h.epoch, &self.entries, p.entries, p.zstd, &mut self.urgent)?;
        self.pulled += self.entries.len() as u64;
        Ok(())
    }

    /// Post-copy's Verify: every page must have arrived; the figures go first, then the verdict on the tables (the
    /// guest runs, so memory cannot be re-hashed). Different tables stop the migration here: the guest ran on memory
    /// that is not the source's. Returns whether the verification was a full one (never), or None when the answer
    /// could not be sent: the connection is lost, and the source asks again on its new one.
    pub(super) fn verify(
        &mut self,
        want: &Verify,
        (shared, control, opts): (&Shared<'_>, &Conn, &super::DestOptions),
        guest: &dyn Guest,
    ) -> Result<Option<bool>, ReceiveError> {
        let Some(pc) = &self.armed else { return Ok(None) };
        let left = pc.remaining();
        if left > 0 {
            return Err(ReceiveError::PostcopyIncomplete {
                missing: left,
                reason: "the source asked to verify with pages still missing".into(),
            });
        }
        // Every page is here: reading the guest's counter cannot fault.
        let stats = PostcopyStats { guest_pages_written: guest.vcpus().pages_written().unwrap_or(0), ..pc.stats() };
        let table_root = shared.rx.root();
        let equal = table_root == want.table_root && !want.full;
        let verdict = Verified { equal, table_root, memory_root: 0 }.encode();
        let sent = send(shared, control, Kind::PostcopyStats, &msg::encode_stats(&stats))
            .and_then(|()| send(shared, control, Kind::Verified, &verdict));
        if !equal {
            return Err(ReceiveError::PostcopyMismatch { ours: table_root, theirs: want.table_root });
        }
        match sent {
            Ok(()) => Ok(Some(false)),
            Err(e) => {
                self.control_lost(&e, opts);
                Ok(None)
            }
        }
    }

    /// The figures so far.
    pub(super) fn stats(&self) -> Option<PostcopyStats> {
        self.armed.as_ref().map(|pc| pc.stats())
    }

    /// The end, whatever it was, with every other thread stopped: whether the verification was a full one, and when
    /// post-copy failed with every page here, why it did not finish (the guest runs on: no error may drop it). With
    /// pages missing the guest is stopped and the error says so (to the source too, on the connection it
    /// reconnected, if it did).
    pub(super) fn outcome(
        &self,
        guest: &dyn Guest,
        shared: &Shared<'_>,
        result: Result<bool, ReceiveError>,
    ) -> Result<(bool, Option<String>), ReceiveError> {
        let result = self.stop_guest(guest, result);
        if let (Err(e), Some(c)) = (&result, shared.resumed()) {
            let _ = wire::write_abort(&*c, &e.to_string());
        }
        match (result, self.resumed_at) {
            (Err(e), Some(_))
                if !matches!(e, ReceiveError::PostcopyIncomplete { .. } | ReceiveError::PostcopyMismatch { .. }) =>
            {
                Ok((false, Some(format!("post-copy: every page arrived, but the migration did not finish: {e}"))))
            }
            (r, _) => r.map(|full| (full, None)),
        }
    }

    fn stop_guest<T>(&self, guest: &dyn Guest, result: Result<T, ReceiveError>) -> Result<T, ReceiveError> {
        let Some(pc) = &self.armed else { return result };
        // Closing the descriptor wakes any vCPU still waiting; with pages missing they must not run on.
        pc.finish();
        let left = pc.remaining();
        match result {
            Err(e @ (ReceiveError::PostcopyMismatch { .. } | ReceiveError::PostcopyIncomplete { .. })) => {
                guest.vcpus().pause();
                Err(e)
            }
            Err(e) if left > 0 => {
                guest.vcpus().pause();
                Err(ReceiveError::PostcopyIncomplete { missing: left, reason: e.to_string() })
            }
            r => r,
        }
    }
}

impl Shared<'_> {
    /// How long a frame may take once its first byte is in: longer once post-copy is coming, when neither side can
    /// finish alone and both wait out a network that went away.
    pub(super) fn frame_timeout(&self) -> Duration {
        if self.postcopy.load(Ordering::Relaxed) {
            self.postcopy_wait.max(MID_FRAME_TIMEOUT)
        } else {
            MID_FRAME_TIMEOUT
        }
    }
}

/// The fault thread: reads faults, asks the source for missing pages, until the migration stops.
fn serve_faults(pc: &Postcopy, control: &Conn, shared: &Shared<'_>, live: Live<'_, '_>) {
    let _live = live;
    while !shared.stop.load(Ordering::Relaxed) {
        let faults = match pc.next_faults(FAULT_POLL, msg::REQUEST_PAGES) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "post-copy: reading faults failed");
                return;
            }
        };
        let asked: Vec<u64> =
            faults.iter().filter_map(|f| if let Fault::Request(p) = f { Some(*p) } else { None }).collect();
        if asked.is_empty() {
            continue;
        }
        if let Err(e) = send(shared, control, Kind::PageRequest, &msg::encode_request(&asked)) {
            // The control loop sees the connection fail too, and waits for the source to reconnect; these pages are
            // asked again on the new connection.
            tracing::warn!(error = %e, "post-copy: a page request could not be sent");
        }
    }
}
