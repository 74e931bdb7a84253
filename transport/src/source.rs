//! The source driver: runs the engine's pre-copy machine over one connection.
//!
//! Threads, all scoped to [`migrate`]:
//! - the driver (the caller's thread) polls the [`Precopy`] machine, carries out its actions, and feeds it events;
//! - scan workers ([`scan_parallel`]) turn each round's bitmap into encoded batches and hand them to the link;
//! - the writer owns the socket's send side and writes frames in order; the reader owns the receive side and turns
//!   the destination's frames (acks, verdicts) into events.
//!
//! Any failure (a socket error, a frame the protocol does not allow, a stalled peer, a digest mismatch) goes to the
//! machine as `fail`, and before commit the machine answers with `ResumeSource`: the source's vCPUs run again,
//! unthrottled, and the report carries the reason.

use crate::cpu::CpuMeter;
use crate::wire::{self, Hello, Kind, Verified, Verify, WireError};
use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender};
use livemig_engine::dirty::{scan_parallel, Bitmap};
use livemig_engine::encode::{
    memory_root, BatchEncoder, BatchSink, CodecPolicy, EncodeError, EncodedBatch, HashTable, PageCounts, BATCH_PAGES,
};
use livemig_engine::guest::{Guest, GuestError};
use livemig_engine::precopy::{Action, Outcome, Precopy, PrecopyConfig, RoundStats};
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How the switchover checks that the destination's memory equals the source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// Compare roots over the per-page hash tables kept while sending and applying (adds well under 10 ms).
    Tables,
    /// Also re-hash all of memory on both sides and compare (slow; for tests and audits).
    Full,
}

/// Options of a migration from the source side.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// The pre-copy machine's tunables.
    pub precopy: PrecopyConfig,
    /// The switchover check.
    pub verify: VerifyMode,
    /// Scan and encode workers.
    pub workers: usize,
    /// Whether lz4 may be used at all (the policy still decides per batch).
    pub compress: bool,
    /// A destination that acknowledges nothing for this long is declared failed.
    pub peer_timeout: Duration,
    /// The migration's session id.
    pub session: u64,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            precopy: PrecopyConfig::default(),
            verify: VerifyMode::Tables,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            compress: true,
            peer_timeout: Duration::from_secs(10),
            session: session_id(),
        }
    }
}

/// A session id that differs between runs and hosts.
pub fn session_id() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    xxhash_rust::xxh3::xxh3_64(&[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat())
}

/// Why a migration failed. In every case before commit the source guest is running again, unthrottled.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(WireError),
    /// The connection to the destination failed mid-migration.
    #[error("link to the destination failed: {0}")]
    Link(WireError),
    /// The destination acknowledged nothing for too long.
    #[error("destination made no progress for {0:?}")]
    Stalled(Duration),
    /// The destination's digest differs.
    #[error("verification failed: destination roots {theirs}, source roots {ours}")]
    DigestMismatch {
        /// The source's roots.
        ours: String,
        /// The destination's roots.
        theirs: String,
    },
    /// The guest adapter failed.
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
    /// Reported by the state machine (for example a commit that was not acknowledged).
    #[error("{0}")]
    Machine(String),
}

/// Live progress, for a progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// The round being sent.
    pub epoch: u32,
    /// Pages in that round.
    pub round_pages: u64,
    /// Pages of that round delivered so far.
    pub round_pages_done: u64,
    /// Bytes written to the link so far.
    pub bytes_on_wire: u64,
    /// Measured goodput, bytes per second.
    pub rate_bps: f64,
}

/// One round in the report.
#[derive(Debug, Clone)]
pub struct RoundReport {
    /// The machine's figures.
    pub stats: RoundStats,
    /// Pages by codec.
    pub counts: PageCounts,
    /// vCPU throttle during the round, percent.
    pub throttle_pct: f64,
}

/// Where the pause went.
#[derive(Debug, Clone, Copy, Default)]
pub struct DowntimeParts {
    /// Final harvest and the last dirty pages.
    pub last_pages: Duration,
    /// Saving and delivering the vCPU state.
    pub vcpu_state: Duration,
    /// Digest comparison.
    pub verification: Duration,
    /// The commit round trip until the destination runs the guest.
    pub commit: Duration,
}

/// One link in the report.
#[derive(Debug, Clone)]
pub struct LinkReport {
    /// Local → remote address.
    pub name: String,
    /// Bytes written to it.
    pub bytes_on_wire: u64,
    /// Average goodput while the migration ran, bytes per second.
    pub throughput_bps: f64,
    /// Whether the link failed.
    pub failed: bool,
}

/// The outcome and figures of a migration, as the source saw it.
#[derive(Debug)]
pub struct SourceReport {
    /// `Ok` when the destination runs the guest and its memory was verified equal.
    pub result: Result<(), MigrateError>,
    /// Whether the digests matched at switchover.
    pub verified: bool,
    /// From the start of the handshake to the destination's commit acknowledgement (or the failure).
    pub total_time: Duration,
    /// From the source's pause to the destination's commit acknowledgement, which it sends after resuming.
    pub downtime: Option<Duration>,
    /// The downtime's parts.
    pub downtime_parts: DowntimeParts,
    /// The pause predicted when the machine decided to stop and copy.
    pub predicted_downtime: Option<Duration>,
    /// Source → destination bytes, framing included.
    pub bytes_on_wire: u64,
    /// Pages sent, by codec, all rounds.
    pub pages: PageCounts,
    /// Per round.
    pub rounds: Vec<RoundReport>,
    /// Per link.
    pub links: Vec<LinkReport>,
    /// Highest vCPU throttle, percent.
    pub max_throttle_pct: f64,
}

enum Outgoing {
    Batch { seq: u32, batch: EncodedBatch },
    Frame { kind: Kind, body: Vec<u8> },
}

enum Event {
    Acked { epoch: u32, bytes: u64, pages: u64, at: Instant },
    StateAck,
    Verified(Verified),
    Committed,
    ScanDone { batches: u32, counts: PageCounts, error: Option<EncodeError> },
    Failed(MigrateError),
}

/// The link as the encoders see it: a bounded queue to the writer, and a pool of emptied batch buffers.
struct LinkSink {
    tx: Sender<Outgoing>,
    pool: Receiver<EncodedBatch>,
    seq: AtomicU32,
    round_batches: AtomicU32,
    abort: AtomicBool,
}

impl BatchSink for LinkSink {
    fn submit(&self, batch: EncodedBatch) -> bool {
        if self.abort.load(Ordering::Relaxed) {
            return false;
        }
        self.round_batches.fetch_add(1, Ordering::Relaxed);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Outgoing::Batch { seq, batch }).is_ok()
    }

    fn take_buffer(&self) -> EncodedBatch {
        self.pool.try_recv().unwrap_or_else(|_| EncodedBatch::with_capacity(BATCH_PAGES))
    }
}

/// Batches queued ahead of the writer: enough to keep the socket busy while encoders stall for a moment, and few
/// enough (4 MiB) that a batch does not wait long behind its predecessors.
const QUEUE_BATCHES: usize = 16;

/// Migrates `guest` over `stream` (connected to a destination running [`crate::dest::receive`]).
///
/// Returns when the destination runs the guest, or when the migration failed and the source guest runs again.
pub fn migrate(
    guest: &dyn Guest,
    stream: TcpStream,
    opts: &SourceOptions,
    progress: &(dyn Fn(&Progress) + Sync),
) -> SourceReport {
    let start = Instant::now();
    let mut report = SourceReport {
        result: Ok(()),
        verified: false,
        total_time: Duration::ZERO,
        downtime: None,
        downtime_parts: DowntimeParts::default(),
        predicted_downtime: None,
        bytes_on_wire: 0,
        pages: PageCounts::default(),
        rounds: Vec::new(),
        links: Vec::new(),
        max_throttle_pct: 0.0,
    };
    let name = match (stream.local_addr(), stream.peer_addr()) {
        (Ok(l), Ok(p)) => format!("{l}>{p}"),
        _ => "link0".to_string(),
    };
    let written = AtomicU64::new(0);
    let initial = match start_logging(guest).and_then(|initial| {
        handshake(guest, &stream, opts, &written, &initial)?;
        Ok(initial)
    }) {
        Ok(initial) => initial,
        Err(e) => {
            report.result = Err(e);
            report.total_time = start.elapsed();
            report.bytes_on_wire = written.load(Ordering::Relaxed);
            return report;
        }
    };
    let (out_tx, out_rx) = bounded::<Outgoing>(QUEUE_BATCHES);
    let (pool_tx, pool_rx) = bounded::<EncodedBatch>(QUEUE_BATCHES * 2);
    let (ev_tx, ev_rx) = crossbeam::channel::unbounded::<Event>();
    let sink = LinkSink {
        tx: out_tx,
        pool: pool_rx,
        seq: AtomicU32::new(0),
        round_batches: AtomicU32::new(0),
        abort: AtomicBool::new(false),
    };
    let done = AtomicBool::new(false);
    let hashes = HashTable::new(guest.memory().total_pages());
    let policy = CodecPolicy::new(opts.compress);
    let (mut wstream, mut rstream) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(r)) => (w, r),
        (Err(e), _) | (_, Err(e)) => {
            report.result = Err(MigrateError::Link(e.into()));
            return report;
        }
    };
    std::thread::scope(|s| {
        let ev = ev_tx.clone();
        let written = &written;
        let spawn = |name: &str| std::thread::Builder::new().name(name.to_string());
        let writer = spawn("lm-writer").spawn_scoped(s, move || write_loop(&mut wstream, out_rx, pool_tx, ev, written));
        let ev = ev_tx.clone();
        let done = &done;
        let reader = spawn("lm-reader").spawn_scoped(s, move || read_loop(&mut rstream, ev, done));
        if let Err(e) = writer.and(reader) {
            report.result = Err(MigrateError::Link(WireError::Io(e)));
            done.store(true, Ordering::SeqCst);
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        let mut d = Driver {
            guest,
            opts,
            machine: None,
            ev_rx: &ev_rx,
            ev_tx: &ev_tx,
            sink: &sink,
            hashes: &hashes,
            policy: &policy,
            error: None,
            round_counts: Vec::new(),
            progress,
            written,
            cpu: CpuMeter::new(),
            last_progress: Instant::now(),
            stream: &stream,
        };
        d.run(&mut report, start, initial);
        done.store(true, Ordering::SeqCst);
        sink.abort.store(true, Ordering::SeqCst);
        // Unblocks the reader and a writer stuck on a full socket; the destination has answered everything by now.
        let _ = stream.shutdown(Shutdown::Both);
        // The writer exits once every sender of its queue is gone.
        drop(sink);
    });
    report.bytes_on_wire = written.load(Ordering::Relaxed);
    report.total_time = start.elapsed();
    let secs = report.total_time.as_secs_f64().max(1e-9);
    report.links.push(LinkReport {
        name,
        bytes_on_wire: report.bytes_on_wire,
        throughput_bps: report.bytes_on_wire as f64 / secs,
        failed: matches!(report.result, Err(MigrateError::Link(_) | MigrateError::Stalled(_))),
    });
    report
}

/// Clears the dirty log, then reads which pages may be non-zero: every write after the clear is harvested later, and
/// a page outside the result was never populated, so reads as zero.
fn start_logging(guest: &dyn Guest) -> Result<Bitmap, MigrateError> {
    let mem = guest.memory();
    let mut scratch = Bitmap::new(mem.total_pages());
    guest.dirty_log().harvest(&mut scratch)?;
    Ok(mem.maybe_nonzero()?)
}

fn handshake(
    guest: &dyn Guest,
    stream: &TcpStream,
    opts: &SourceOptions,
    written: &AtomicU64,
    initial: &Bitmap,
) -> Result<(), MigrateError> {
    let hello = Hello {
        session: opts.session,
        layout: guest.memory().layout(),
        vcpus: guest.vcpu_count(),
        guest_kind: guest.kind().to_string(),
        chunks: wire::chunk_map(initial),
    };
    let body = hello.encode();
    let mut w = stream;
    let n = wire::write_frame(&mut w, Kind::Hello, 0, 0, &[&body]).map_err(|e| MigrateError::Handshake(e.into()))?;
    written.fetch_add(n as u64, Ordering::Relaxed);
    stream.set_read_timeout(Some(opts.peer_timeout)).map_err(|e| MigrateError::Handshake(e.into()))?;
    let mut buf = Vec::new();
    let h = wire::read_frame(&mut &*stream, &mut buf).map_err(MigrateError::Handshake)?;
    match h.kind {
        Kind::HelloAck => {
            let s = wire::decode_session(Kind::HelloAck, &buf).map_err(MigrateError::Handshake)?;
            if s != opts.session {
                return Err(MigrateError::Handshake(WireError::Malformed {
                    kind: Kind::HelloAck,
                    why: format!("session {s:#x} echoed, {:#x} sent", opts.session),
                }));
            }
        }
        Kind::Abort => return Err(MigrateError::Handshake(WireError::PeerAbort(wire::decode_reason(&buf)))),
        got => return Err(MigrateError::Handshake(WireError::Unexpected { got, expected: "HelloAck" })),
    }
    // From here the reader thread blocks on the socket; stalls are detected by the driver's clock instead.
    stream.set_read_timeout(None).map_err(|e| MigrateError::Handshake(e.into()))?;
    Ok(())
}

fn write_loop(
    w: &mut TcpStream,
    rx: Receiver<Outgoing>,
    pool: Sender<EncodedBatch>,
    ev: Sender<Event>,
    written: &AtomicU64,
) {
    let mut table = Vec::with_capacity(8 + BATCH_PAGES * wire::ENTRY_LEN);
    for out in rx {
        let res = match &out {
            Outgoing::Batch { seq, batch } => {
                wire::encode_entries(batch, &mut table);
                wire::write_pages(w, batch.epoch, *seq, &table, &batch.payload)
            }
            Outgoing::Frame { kind, body } => wire::write_frame(w, *kind, 0, 0, &[body]),
        };
        match res {
            Ok(n) => {
                written.fetch_add(n as u64, Ordering::Relaxed);
                if let Outgoing::Batch { batch, .. } = out {
                    let _ = pool.try_send(batch);
                }
            }
            Err(e) => {
                let _ = ev.send(Event::Failed(MigrateError::Link(e.into())));
                return;
            }
        }
    }
    let _ = w.flush();
}

fn read_loop(r: &mut TcpStream, ev: Sender<Event>, done: &AtomicBool) {
    let mut buf = Vec::new();
    loop {
        let h = match wire::read_frame(r, &mut buf) {
            Ok(h) => h,
            Err(e) => {
                if !done.load(Ordering::SeqCst) {
                    let _ = ev.send(Event::Failed(MigrateError::Link(e)));
                }
                return;
            }
        };
        let event = match h.kind {
            Kind::Ack => match wire::decode_ack(&buf) {
                Ok((bytes, pages)) => Event::Acked { epoch: h.epoch, bytes, pages, at: Instant::now() },
                Err(e) => Event::Failed(MigrateError::Link(e)),
            },
            Kind::StateAck => Event::StateAck,
            Kind::Verified => match Verified::decode(&buf) {
                Ok(v) => Event::Verified(v),
                Err(e) => Event::Failed(MigrateError::Link(e)),
            },
            Kind::Committed => Event::Committed,
            Kind::Abort => Event::Failed(MigrateError::Link(WireError::PeerAbort(wire::decode_reason(&buf)))),
            got => Event::Failed(MigrateError::Link(WireError::Unexpected { got, expected: "an acknowledgement" })),
        };
        let stop = matches!(event, Event::Failed(_) | Event::Committed);
        if ev.send(event).is_err() || stop {
            return;
        }
    }
}

struct Driver<'a> {
    guest: &'a dyn Guest,
    opts: &'a SourceOptions,
    machine: Option<Precopy>,
    ev_rx: &'a Receiver<Event>,
    ev_tx: &'a Sender<Event>,
    sink: &'a LinkSink,
    hashes: &'a HashTable,
    policy: &'a CodecPolicy,
    error: Option<MigrateError>,
    round_counts: Vec<(PageCounts, f64)>,
    progress: &'a (dyn Fn(&Progress) + Sync),
    written: &'a AtomicU64,
    cpu: CpuMeter,
    last_progress: Instant,
    stream: &'a TcpStream,
}

impl Driver<'_> {
    fn run(&mut self, report: &mut SourceReport, start: Instant, initial: Bitmap) {
        self.machine = Some(Precopy::new(self.opts.precopy.clone(), initial, start));
        let vcpus = self.guest.vcpus();
        let mut marks: [Option<Instant>; 4] = [None; 4];
        while let Some(action) = self.machine().poll() {
            match action {
                Action::SendRound { epoch, pages, last } => {
                    let throttle = vcpus.throttle();
                    report.max_throttle_pct = report.max_throttle_pct.max(throttle);
                    let counts = self.send_round(epoch, &pages);
                    self.round_counts.push((counts, throttle));
                    if last {
                        marks[0] = Some(Instant::now());
                    }
                }
                Action::Harvest => {
                    let mut bm = Bitmap::new(self.guest.memory().total_pages());
                    match self.guest.dirty_log().harvest(&mut bm) {
                        Ok(()) => self.machine().harvested(bm, Instant::now()),
                        Err(e) => self.fail(e.into()),
                    }
                }
                Action::Pause => {
                    report.predicted_downtime = self.machine().last_prediction();
                    vcpus.pause();
                    self.machine().paused(Instant::now());
                }
                Action::SendState => {
                    match vcpus.save_state() {
                        Ok(blob) => {
                            self.send_frame(Kind::VcpuState, blob);
                            if self.wait_for(|e| matches!(e, Event::StateAck).then_some(())).is_some() {
                                self.machine().state_delivered();
                            }
                        }
                        Err(e) => self.fail(e.into()),
                    }
                    marks[1] = Some(Instant::now());
                }
                Action::Verify => {
                    if let Some(ok) = self.verify() {
                        report.verified = ok;
                        self.machine().verified(ok);
                    }
                    marks[2] = Some(Instant::now());
                }
                Action::Commit => {
                    self.send_frame(Kind::Commit, Vec::new());
                    if self.wait_for(|e| matches!(e, Event::Committed).then_some(())).is_some() {
                        self.machine().committed();
                    }
                    marks[3] = Some(Instant::now());
                }
                Action::ResumeSource => {
                    vcpus.set_throttle(0.0);
                    vcpus.resume();
                }
                Action::Done(outcome) => {
                    if let Outcome::Failed(reason) = outcome {
                        report.result = Err(self.error.take().unwrap_or(MigrateError::Machine(reason)));
                    }
                    break;
                }
            }
        }
        let m = self.machine.take().expect("machine exists");
        let mut rounds = m.rounds().to_vec();
        if rounds.len() < self.round_counts.len() {
            rounds.push(m.unfinished_round(Instant::now()));
        }
        report.rounds = rounds
            .iter()
            .zip(&self.round_counts)
            .map(|(s, &(counts, throttle_pct))| RoundReport { stats: s.clone(), counts, throttle_pct })
            .collect();
        for r in &report.rounds {
            report.pages.add(&r.counts);
        }
        if let (Some(paused), Ok(())) = (m.paused_at(), &report.result) {
            let at = |i: usize| marks[i].unwrap_or(paused);
            report.downtime = Some(at(3).saturating_duration_since(paused));
            report.downtime_parts = DowntimeParts {
                last_pages: at(0).saturating_duration_since(paused),
                vcpu_state: at(1).saturating_duration_since(at(0)),
                verification: at(2).saturating_duration_since(at(1)),
                commit: at(3).saturating_duration_since(at(2)),
            };
        }
    }

    fn machine(&mut self) -> &mut Precopy {
        self.machine.as_mut().expect("machine exists")
    }

    fn fail(&mut self, e: MigrateError) {
        let reason = e.to_string();
        if self.error.is_none() {
            self.error = Some(e);
        }
        self.sink.abort.store(true, Ordering::SeqCst);
        // Unblocks a writer stuck on a peer that stopped reading, and with it any encoder waiting on the queue.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(m) = self.machine.as_mut() {
            m.fail(reason);
        }
    }

    fn send_frame(&mut self, kind: Kind, body: Vec<u8>) {
        if self.sink.tx.send(Outgoing::Frame { kind, body }).is_err() {
            self.fail(MigrateError::Link(WireError::Closed));
        }
    }

    /// Waits for the event `want` picks out, handling failures and the peer timeout. None after a failure.
    fn wait_for<T>(&mut self, want: impl Fn(&Event) -> Option<T>) -> Option<T> {
        self.last_progress = Instant::now();
        loop {
            match self.next_event() {
                Some(Event::Failed(e)) => {
                    self.fail(e);
                    return None;
                }
                Some(e) => {
                    if let Some(t) = want(&e) {
                        return Some(t);
                    }
                }
                None => {
                    if self.error.is_some() {
                        return None;
                    }
                }
            }
        }
    }

    /// The next event, or None after 50 ms without one; fails the migration when the peer has been silent too long.
    fn next_event(&mut self) -> Option<Event> {
        match self.ev_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(e) => {
                if matches!(e, Event::Acked { .. } | Event::StateAck | Event::Verified(_) | Event::Committed) {
                    self.last_progress = Instant::now();
                }
                Some(e)
            }
            Err(RecvTimeoutError::Timeout) => {
                if self.last_progress.elapsed() > self.opts.peer_timeout {
                    self.fail(MigrateError::Stalled(self.opts.peer_timeout));
                }
                None
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.fail(MigrateError::Link(WireError::Closed));
                None
            }
        }
    }

    /// Scans, encodes and sends one round, and waits until the destination has applied all of it.
    fn send_round(&mut self, epoch: u32, pages: &Bitmap) -> PageCounts {
        let total_pages = pages.count_ones();
        self.sink.round_batches.store(0, Ordering::SeqCst);
        self.last_progress = Instant::now();
        let (mem, hashes, policy, sink, workers) =
            (self.guest.memory(), self.hashes, self.policy, self.sink, self.opts.workers);
        let ev_tx = self.ev_tx.clone();
        let mut counts = PageCounts::default();
        std::thread::scope(|s| {
            let scan = std::thread::Builder::new().name("lm-scan".into()).spawn_scoped(s, move || {
                let states = scan_parallel(
                    pages,
                    workers,
                    |_| (BatchEncoder::new(mem, hashes, policy, sink, epoch), None::<EncodeError>),
                    |(enc, err), run| {
                        if err.is_none() {
                            *err = enc.push_run(run).err();
                        }
                    },
                );
                let mut counts = PageCounts::default();
                let mut error = None;
                for (mut enc, err) in states {
                    let err = err.or_else(|| enc.flush().err());
                    counts.add(&enc.counts);
                    error = error.or(err);
                }
                let batches = sink.round_batches.load(Ordering::SeqCst);
                let _ = ev_tx.send(Event::ScanDone { batches, counts, error });
            });
            if let Err(e) = scan {
                self.fail(MigrateError::Link(WireError::Io(e)));
                return;
            }
            let mut scan_done: Option<u32> = None;
            let (mut acked, mut pages_done, mut last_report) = (0u32, 0u64, Instant::now());
            // Even after a failure, wait for the scan to finish: its threads borrow from this frame.
            while scan_done.is_none() || (self.error.is_none() && acked < scan_done.unwrap_or(u32::MAX)) {
                match self.next_event() {
                    Some(Event::Acked { epoch: e, bytes, pages, at }) if e == epoch => {
                        acked += 1;
                        pages_done += pages;
                        self.machine().delivered(bytes, at);
                        let rate = self.machine().bandwidth().unwrap_or(0.0);
                        let spare = self.cpu.spare_cpus(Duration::from_millis(100));
                        self.policy.set_link(rate as u64, spare);
                        if last_report.elapsed() > Duration::from_millis(50) {
                            last_report = Instant::now();
                            (self.progress)(&Progress {
                                epoch,
                                round_pages: total_pages,
                                round_pages_done: pages_done,
                                bytes_on_wire: self.written.load(Ordering::Relaxed),
                                rate_bps: rate,
                            });
                        }
                    }
                    Some(Event::ScanDone { batches, counts: c, error, .. }) => {
                        scan_done = Some(batches);
                        counts = c;
                        if let Some(e) = error {
                            if self.error.is_none() {
                                self.fail(match e {
                                    EncodeError::Guest(g) => MigrateError::Guest(g),
                                    EncodeError::SinkClosed => MigrateError::Link(WireError::Closed),
                                });
                            }
                        }
                    }
                    Some(Event::Failed(e)) => self.fail(e),
                    Some(_) => {}
                    None => {}
                }
                if self.error.is_some() {
                    // Make blocked encoders give up: the writer drains nothing more once the link is down.
                    self.sink.abort.store(true, Ordering::SeqCst);
                }
            }
        });
        if self.error.is_none() {
            self.machine().round_delivered(Instant::now());
        }
        counts
    }

    /// Sends the source's roots and returns whether the destination's match.
    fn verify(&mut self) -> Option<bool> {
        let table_root = self.hashes.root();
        let memory_root = match self.opts.verify {
            VerifyMode::Tables => 0,
            VerifyMode::Full => match memory_root(self.guest.memory()) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(e.into());
                    return None;
                }
            },
        };
        let ours = Verify { full: self.opts.verify == VerifyMode::Full, table_root, memory_root };
        self.send_frame(Kind::Verify, ours.encode().to_vec());
        let theirs = self.wait_for(|e| if let Event::Verified(v) = e { Some(*v) } else { None })?;
        let ok = theirs.equal && theirs.table_root == table_root && (!ours.full || theirs.memory_root == memory_root);
        if !ok {
            self.error = Some(MigrateError::DigestMismatch {
                ours: format!("table {table_root:#018x} memory {memory_root:#018x}"),
                theirs: format!("table {:#018x} memory {:#018x}", theirs.table_root, theirs.memory_root),
            });
        }
        Some(ok)
    }
}
