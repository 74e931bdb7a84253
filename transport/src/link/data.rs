//! A data link as the source drives it: a bounded queue to its writer thread, the batches written and not yet
//! acknowledged, the frame bytes it holds and the goodput the driver measured for it. The writer sends each batch the
//! way it was encoded for (vectored, or `MSG_ZEROCOPY`); the reader takes acks and returns emptied buffers.
//!
//! Batches are shared (`Arc`) between a link's queue, its writer and its unacknowledged list, so a batch is never
//! copied: when a link fails, the driver takes back its queue and its unacknowledged list and routes those same
//! batches again. Acks come back in order on each link, so the unacknowledged list is a FIFO.
//!
//! After a post-copy switch a failed link can be given a new connection ([`DataLink::revive`]): its writer and reader
//! threads, which wait once their connection fails, go on with the new one. Each connection is a generation, and
//! what a thread meets on an older one (the error of a connection already replaced) is not reported.

use super::zerocopy::{Buffers, ZeroCopy, ZeroCopyStats};
use crate::stripe::pacer::Pacer;
use crate::tls::Conn;
use crate::wire::{self, Kind, WireError, HEADER_LEN};
use crossbeam::channel::{bounded, Receiver, SendTimeoutError, Sender};
use livemig_engine::encode::{EncodedBatch, SendPath, BATCH_PAGES};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A batch on its way: its sequence number and the shared batch.
pub type Queued = (u32, Arc<EncodedBatch>);

/// Batches queued ahead of each link's writer: enough to keep a socket busy while the encoders stall for a moment,
/// few enough (4 MiB of 512 KiB batches) that a batch does not wait long behind its predecessors or strand much on a
/// link that dies.
pub const QUEUE_BATCHES: usize = 8;

/// Wire bytes of a batch's Pages frame.
pub fn frame_len(b: &EncodedBatch) -> u64 {
    (HEADER_LEN + wire::TABLE_HEADER_LEN + b.entries.len() * wire::ENTRY_LEN + b.payload_len()) as u64
}

/// A Pages frame in the zero-copy path's hands: header, entry table and the batch, kept until the kernel is done.
struct ZcFrame {
    header: [u8; HEADER_LEN],
    table: Vec<u8>,
    batch: Arc<EncodedBatch>,
}

impl Buffers for ZcFrame {
    fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut v = Vec::with_capacity(self.batch.parts.len() + 2);
        v.push(IoSlice::new(&self.header));
        v.push(IoSlice::new(&self.table));
        // SAFETY: a ZcFrame is made by a link's writer for a batch of the running migration, which borrows the guest
        // (and so its mapping) for its whole run, and ZeroCopy::send slices it only then; afterwards it is kept until
        // the kernel is done, or leaked, but never sliced again.
        v.extend(unsafe { self.batch.part_slices() }.map(IoSlice::new));
        v
    }
}

/// What a link's reader and writer tell the driver.
#[derive(Debug)]
pub enum LinkEvent {
    /// A batch was applied by the destination.
    Acked {
        /// Link index.
        link: usize,
        /// The batch's round.
        epoch: u32,
        /// Its wire bytes.
        bytes: u64,
        /// Its pages.
        pages: u64,
        /// When the ack arrived.
        at: Instant,
    },
    /// The link failed.
    Failed {
        /// Link index.
        link: usize,
        /// Why.
        error: WireError,
    },
}

/// One data link as the scheduler and the driver see it.
pub struct DataLink {
    /// For reports.
    name: String,
    tx: Sender<Queued>,
    rx: Receiver<Queued>,
    /// The connection, replaced when the link is revived; `generation` counts the replacements.
    stream: RwLock<Arc<Conn>>,
    generation: AtomicU32,
    unacked: Mutex<VecDeque<Queued>>,
    /// Frame bytes handed to the link and not yet acknowledged.
    held: AtomicU64,
    rate_bps: AtomicU64,
    /// Bytes written to the socket.
    written: AtomicU64,
    failed: AtomicBool,
    /// Silent, after a post-copy switch: takes no batch until it acknowledges one again (see [`DataLink::suspend`]).
    suspended: AtomicBool,
    /// Failed after a post-copy switch and being dialled again (see [`DataLink::revive`]).
    dialing: AtomicBool,
    stop: AtomicBool,
    writer_done: AtomicBool,
    /// Set by whichever of the writer and the reader reports the link's failure first, with the reason.
    reported: AtomicBool,
    error: Mutex<Option<String>>,
    /// Zero-copy counters, and why zero-copy could not be used (then the link sends vectored).
    zerocopy: Mutex<(ZeroCopyStats, Option<String>)>,
}

impl DataLink {
    /// How long a write may block from now on.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.conn().set_write_timeout(t)
    }

    /// The link's connection now, and its generation.
    fn current(&self) -> (Arc<Conn>, u32) {
        let c = self.stream.read().unwrap_or_else(|e| e.into_inner());
        (c.clone(), self.generation.load(Ordering::SeqCst))
    }

    fn conn(&self) -> Arc<Conn> {
        self.current().0
    }

    /// Marks the link as being dialled again, or no longer.
    pub fn set_dialing(&self, on: bool) {
        self.dialing.store(on, Ordering::SeqCst);
    }

    /// Whether the link is being dialled again: failed, but batches may wait for it.
    pub fn is_dialing(&self) -> bool {
        self.dialing.load(Ordering::SeqCst)
    }

    /// Gives a failed link a new connection (post-copy's reconnect), once the driver has taken its batches back: its
    /// threads go on with it, and it takes batches again.
    pub fn revive(&self, stream: Conn) {
        self.set_dialing(false);
        *self.stream.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(stream);
        self.unacked().clear();
        self.held.store(0, Ordering::Relaxed);
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.reported.store(false, Ordering::SeqCst);
        self.suspended.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.failed.store(false, Ordering::SeqCst);
    }

    /// Waits until the link is revived past `generation` (true) or the migration ends (false).
    fn await_revival(&self, generation: u32, done: &AtomicBool) -> bool {
        loop {
            if self.stop.load(Ordering::SeqCst) || done.load(Ordering::SeqCst) {
                return false;
            }
            if self.generation.load(Ordering::SeqCst) != generation && !self.is_failed() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wraps a connected data socket.
    pub fn new(name: String, stream: Conn) -> Self {
        let (tx, rx) = bounded(QUEUE_BATCHES);
        DataLink {
            name,
            tx,
            rx,
            stream: RwLock::new(Arc::new(stream)),
            generation: AtomicU32::new(0),
            unacked: Mutex::new(VecDeque::new()),
            held: AtomicU64::new(0),
            rate_bps: AtomicU64::new(0),
            written: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            suspended: AtomicBool::new(false),
            dialing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            writer_done: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            error: Mutex::new(None),
            zerocopy: Mutex::new((ZeroCopyStats::default(), None)),
        }
    }

    /// Whether the link has been declared failed.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Stops routing batches to a link that went silent without failing it: its connection stays open, its writer
    /// may still be blocked in a write, and the first acknowledgement it reads makes it usable again. Post-copy uses
    /// this, since a network that went away comes back to the same connections. The caller takes its batches back
    /// ([`DataLink::take_back`]) and sends them elsewhere; a copy the link delivers late is placed once all the same.
    pub fn suspend(&self) {
        self.suspended.store(true, Ordering::SeqCst);
    }

    /// Whether the link is suspended ([`DataLink::suspend`]).
    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::SeqCst)
    }

    /// Frame bytes the link holds.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The driver's measurement of the link's goodput.
    pub fn set_rate(&self, bps: f64) {
        self.rate_bps.store(livemig_engine::num::u64_saturating(bps), Ordering::Relaxed);
    }

    /// The link's name, for reports: `IFACE LOCAL>REMOTE`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes written to the socket so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The link's zero-copy counters, and why it could not send zero-copy, when it was asked to.
    pub fn zerocopy(&self) -> (ZeroCopyStats, Option<String>) {
        self.zerocopy.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What the scheduler weighs: whether the link can take batches, the bytes it holds, its measured goodput.
    pub fn load(&self) -> LinkLoad {
        LinkLoad {
            open: !self.is_failed() && !self.is_suspended() && !self.writer_done.load(Ordering::SeqCst),
            held: self.held(),
            rate_bps: self.rate_bps.load(Ordering::Relaxed),
        }
    }

    /// Queues `item` (`bytes` on the wire) for the writer, waiting at most `wait` for room. Gives it back when the
    /// queue stayed full or the writer is gone.
    pub fn offer(&self, item: Queued, bytes: u64, wait: Duration) -> Result<(), Queued> {
        self.held.fetch_add(bytes, Ordering::Relaxed);
        match self.tx.send_timeout(item, wait) {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Timeout(back) | SendTimeoutError::Disconnected(back)) => {
                self.held.fetch_sub(bytes.min(self.held()), Ordering::Relaxed);
                Err(back)
            }
        }
    }

    fn unacked(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.unacked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes queued batches to the socket until the link fails or the queue closes. Runs on the link's writer thread.
    ///
    /// Each batch goes out the way it was encoded for: one vectored write of header, entry table and payload parts
    /// (raw pages copied into the batch, or in place in guest memory), or, for the zero-copy path, the same iovecs
    /// with `MSG_ZEROCOPY`.
    pub fn write_loop(
        &self,
        index: usize,
        pacer: &Pacer,
        events: &(dyn Fn(LinkEvent) + Sync),
        kernel_copied: &(dyn Fn() + Sync),
    ) {
        loop {
            let (conn, generation) = self.current();
            self.writer_done.store(false, Ordering::SeqCst);
            self.write_session(&conn, generation, index, pacer, events, kernel_copied);
            self.writer_done.store(true, Ordering::SeqCst);
            if !self.await_revival(generation, &self.stop) {
                return;
            }
        }
    }

    /// The writer on one connection, until it fails or the link stops.
    fn write_session(
        &self,
        conn: &Conn,
        generation: u32,
        index: usize,
        pacer: &Pacer,
        events: &(dyn Fn(LinkEvent) + Sync),
        kernel_copied: &(dyn Fn() + Sync),
    ) {
        let mut table = Vec::with_capacity(wire::TABLE_HEADER_LEN + BATCH_PAGES * wire::ENTRY_LEN);
        let mut w = conn;
        let mut zc: Option<ZeroCopy> = None;
        let mut zc_tried = false;
        while !self.is_failed() && !self.stop.load(Ordering::SeqCst) {
            let Ok((seq, batch)) = self.rx.recv_timeout(Duration::from_millis(50)) else {
                if let Some(z) = zc.as_mut() {
                    let _ = z.reap();
                    self.zerocopy.lock().unwrap_or_else(|e| e.into_inner()).0 = z.stats;
                }
                continue;
            };
            // Its slot under the bandwidth cap, shared with the other links.
            pacer.wait(frame_len(&batch), || self.is_failed() || self.stop.load(Ordering::SeqCst));
            // Listed before it is written, so that a failure mid-write leaves it where the driver will look.
            self.unacked().push_back((seq, batch.clone()));
            let zero_copy = batch.path == Some(SendPath::ZeroCopy) && batch.has_guest_parts();
            if zero_copy && !zc_tried {
                zc_tried = true;
                zc = self.start_zero_copy(conn);
            }
            let result = match zc.as_mut().filter(|_| zero_copy) {
                Some(z) => {
                    let mut own = Vec::with_capacity(wire::TABLE_HEADER_LEN + BATCH_PAGES * wire::ENTRY_LEN);
                    wire::encode_entries(&batch, &mut own);
                    // SAFETY: the batch belongs to the running migration, which borrows the guest for its whole run.
                    let parts: Vec<&[u8]> = unsafe { batch.part_slices() }.collect();
                    let header = wire::pages_header(batch.epoch, seq, &own, &parts);
                    z.send(Box::new(ZcFrame { header, table: own, batch: batch.clone() }))
                }
                None => {
                    wire::encode_entries(&batch, &mut table);
                    // SAFETY: the batch belongs to the running migration, which borrows the guest for its whole run.
                    let parts: Vec<&[u8]> = unsafe { batch.part_slices() }.collect();
                    wire::write_pages(&mut w, batch.epoch, seq, &table, &parts)
                }
            };
            if zc.as_ref().is_some_and(|z| z.stats.copied > 0) {
                kernel_copied();
            }
            match result {
                Ok(n) => {
                    self.written.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    // A destination that ends a link says why in an Abort before it closes, and the write that
                    // meets the closed socket can come first: give the reader a moment to report the reason.
                    let until = Instant::now() + WHY_GRACE;
                    while !self.reported.load(Ordering::SeqCst) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    self.report_failure(index, generation, e.into(), events);
                    break;
                }
            }
        }
        if let Some(mut z) = zc {
            z.drain();
            self.zerocopy.lock().unwrap_or_else(|e| e.into_inner()).0 = z.stats;
        }
    }

    /// Turns on `MSG_ZEROCOPY` for the link's socket, or records why it stays off.
    fn start_zero_copy(&self, conn: &Conn) -> Option<ZeroCopy> {
        let refused = if conn.is_sealed() {
            // Sealing copies each page into the record buffer it is encrypted in: the kernel has nothing of the
            // guest's left to send from.
            "zero-copy does not apply to an encrypted link; sending vectored".to_string()
        } else {
            match ZeroCopy::new(conn.stream()) {
                Ok(z) => return Some(z),
                Err(e) => format!("SO_ZEROCOPY refused ({e}); sending vectored"),
            }
        };
        self.zerocopy.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(refused);
        None
    }

    /// Reads the destination's acks until the link fails or closes. Runs on the link's reader thread; returns emptied
    /// batch buffers to `pool`.
    pub fn read_loop(
        &self,
        index: usize,
        events: &(dyn Fn(LinkEvent) + Sync),
        pool: &Sender<EncodedBatch>,
        done: &AtomicBool,
    ) {
        loop {
            let (conn, generation) = self.current();
            self.read_session(&conn, generation, index, events, pool, done);
            if !self.await_revival(generation, done) {
                return;
            }
        }
    }

    /// The reader on one connection, until it fails or closes.
    fn read_session(
        &self,
        conn: &Conn,
        generation: u32,
        index: usize,
        events: &(dyn Fn(LinkEvent) + Sync),
        pool: &Sender<EncodedBatch>,
        done: &AtomicBool,
    ) {
        let mut buf = Vec::new();
        let mut r = conn;
        loop {
            let result = wire::read_frame(&mut r, &mut buf).and_then(|h| match h.kind {
                Kind::Ack => wire::Ack::decode(&buf).map(|a| (h, a.bytes, u64::from(a.pages))),
                Kind::Abort => Err(WireError::PeerAbort(wire::decode_reason(&buf))),
                got => Err(WireError::Unexpected { got, expected: "an Ack on a data link" }),
            });
            let (h, bytes, pages) = match result {
                Ok(x) => {
                    // The link answers again: it takes batches from now on.
                    self.suspended.store(false, Ordering::SeqCst);
                    x
                }
                Err(error) => {
                    if !done.load(Ordering::SeqCst) && !self.is_failed() && !self.stop.load(Ordering::SeqCst) {
                        self.report_failure(index, generation, error, events);
                    }
                    return;
                }
            };
            let batch = {
                let mut list = self.unacked();
                match list.iter().position(|(s, _)| *s == h.seq) {
                    // Acks come in order: anything before it was acknowledged already or never will be on this link.
                    Some(i) => list.remove(i).map(|(_, b)| b),
                    None => None,
                }
            };
            // An ack for a batch not on the list (a duplicate) changes nothing.
            let Some(batch) = batch else { continue };
            self.held.fetch_sub(frame_len(&batch).min(self.held()), Ordering::Relaxed);
            events(LinkEvent::Acked { link: index, epoch: h.epoch, bytes, pages, at: Instant::now() });
            if let Ok(b) = Arc::try_unwrap(batch) {
                let _ = pool.try_send(b);
            }
        }
    }

    /// Reports the failure of the link's connection `generation` once, whichever of its threads meets it first, and
    /// keeps the reason: the driver may have finished (the control connection failed at the same moment) before it
    /// reads the event. A connection already replaced is not reported.
    fn report_failure(&self, index: usize, generation: u32, error: WireError, events: &(dyn Fn(LinkEvent) + Sync)) {
        if self.generation.load(Ordering::SeqCst) != generation || self.reported.swap(true, Ordering::SeqCst) {
            return;
        }
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        events(LinkEvent::Failed { link: index, error });
    }

    /// Why the link failed, as its own threads saw it.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Declares the link failed and closes its socket, which ends its reader and writer.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        let _ = self.conn().stream().shutdown(Shutdown::Both);
    }

    /// Stops the writer and closes the socket at the end of a migration.
    pub fn close(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.conn().stream().shutdown(Shutdown::Both);
    }

    /// Takes back every batch the failed link holds, queued or unacknowledged, once its writer has stopped (so that
    /// none is in its hands; a suspended link's writer may be in a write for long, and keeps its own reference to the
    /// batch). Batches routed to it later are taken by later calls.
    pub fn take_back(&self) -> Vec<Queued> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.writer_done.load(Ordering::SeqCst) && !self.is_suspended() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out: Vec<Queued> = self.unacked().drain(..).collect();
        out.extend(self.rx.try_iter());
        self.held.store(0, Ordering::Relaxed);
        out
    }
}

/// How long a writer whose write failed waits for the reader to report the peer's reason (its Abort) instead.
const WHY_GRACE: Duration = Duration::from_millis(100);

/// A link as the scheduler weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkLoad {
    /// The link takes batches: not failed, its writer still running.
    pub open: bool,
    /// Frame bytes it holds, queued or unacknowledged.
    pub held: u64,
    /// Its measured goodput in bytes per second; 0 before it is measured.
    pub rate_bps: u64,
}
