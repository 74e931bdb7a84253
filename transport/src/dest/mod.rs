//! The destination driver: admits a migration's control connection and its data links, and applies it to a fresh
//! guest.
//!
//! **Admission.** [`accept_migration`] reads each new connection's Hello on its own thread, within
//! [`HELLO_TIMEOUT`] for the whole frame, and checks it (memory cap, CPU model) before anything is allocated for it. A
//! connection that is refused (a stranger, a guest too large, an incompatible CPU, a second source while one is
//! being admitted) gets an Abort naming why and is reported to `refused`; the destination goes on waiting. Pending
//! connections are capped in all ([`MAX_PENDING`]) and per peer address ([`MAX_PENDING_PER_PEER`]), so that a flood
//! costs a bounded number of threads and cannot crowd out a source from another address.
//!
//! **The migration.** Threads, scoped to [`receive`]: the control loop (the caller's thread) handles the vCPU state,
//! verification and commit; a control reader feeds it frames; an acceptor takes connections on every listener and
//! registers each socket before reading a byte; each connection gets a thread that reads its first frame within
//! [`HELLO_TIMEOUT`] (a `LinkHello` with the session joins the migration; a `Hello` is another source and is told the
//! destination is busy), then reads frames in order, checks each (header, checksum, entry table, then every page entry
//! against the layout), reads raw pages straight into guest memory and applies the rest through the engine's shared
//! [`Receiver`], and acknowledges the frame on the same link. A frame, once begun, must be complete within
//! [`MID_FRAME_TIMEOUT`]. A pre-fault thread faults guest memory in ahead of the pages, never more than the host has
//! available.
//!
//! **One bad link is that link's problem.** Bad data on a data link (a checksum, a malformed table, a page that fails
//! its hash) ends that link with an Abort naming the problem; pages it applied before were checked, and the source
//! sends what it held again on the other links. A page whose bytes landed before the problem showed is recorded as it
//! now is, so that if nothing rewrites it the roots differ at switchover. The migration ends only on the control
//! connection's failure, a source that goes silent, the source's own Abort, or that root mismatch.
//!
//! **Switchover.** At `Verify` the destination stops accepting, shuts every data socket down and joins every data and
//! helper thread (within [`MAX_PAUSE`]) before it computes its roots: from then until the guest resumes nothing can
//! write guest memory, so the roots it reports describe exactly the memory it will run. It resumes only on `Commit`
//! after equal roots. Once the guest runs, no error drops it: a failure to send `Committed` is reported in
//! [`DestReport::committed_error`] beside the running guest.

mod admit;
mod devices;
mod link;
mod options;
mod postcopy;

pub use admit::{accept_migration, admit, read_hello, MAX_PENDING, MAX_PENDING_PER_PEER};

use crate::stream::{Listen, Peer, Stream};
use crate::tls::{Conn, DestSecurity};
use crate::uring::Ring;
use crate::wire::{self, Header, Hello, Kind, Verified, Verify, WireError};
use admit::Admission;
use devices::DeviceSections;
use link::accept_links;
use livemig_engine::encode::{memory_root, PageCounts};
use livemig_engine::guest::{Guest, GuestError, PAGE_SIZE};
use livemig_engine::precopy::MAX_PAUSE;
use livemig_engine::receive::{ApplyError, ApplyState, Receiver, MAX_OWNERS};
pub use options::{available_memory, DestOptions};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why the destination gave up on a migration, or refused one. The source keeps its guest.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The connection or a frame was bad.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A page entry could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The destination guest could not be built, restored or resumed. (Not a `source`: the message carries it.)
    #[error("guest: {0}")]
    Guest(GuestError),
    /// The source's guest is larger than this destination accepts.
    #[error("guest memory of {asked} bytes exceeds the {max} bytes this destination accepts (receive --max-memory)")]
    TooLarge {
        /// Bytes the Hello describes.
        asked: u64,
        /// The destination's limit.
        max: u64,
    },
    /// Fault injection ([`DestOptions::die_after_bytes`]): the destination dropped the connection as if killed.
    #[error("destination killed by fault injection after {0} bytes")]
    Killed(u64),
    /// The VM cannot run here; the reasons name the vendor or the missing CPU features.
    #[error("refused: {}", .0.join("; "))]
    Incompatible(Vec<String>),
    /// The source asked to commit before the digests were found equal.
    #[error("commit requested before a successful verification")]
    CommitBeforeVerify,
    /// Another source is migrating to (or being admitted by) this destination.
    #[error("destination busy: it is receiving another migration")]
    Busy,
    /// More connections are open or waiting than this destination serves.
    #[error("too many connections {0}")]
    TooManyConnections(&'static str),
    /// The source called the migration off before any data link joined it (its preflight failed, for one): nothing
    /// was applied, and the destination can wait for another source.
    #[error("the source called the migration off at the handshake: {0}")]
    RefusedBySource(String),
    /// Post-copy could not start here (userfaultfd unavailable or refused); the guest did not run here.
    #[error("post-copy: {0}")]
    Postcopy(String),
    /// Post-copy ended with pages that never arrived: the guest ran here without them and cannot go on. Its vCPUs are
    /// stopped; the source holds the only complete copy of its memory.
    #[error(
        "post-copy incomplete: {missing} pages never arrived ({reason}); the guest cannot continue here and is \
         stopped, and the source holds the only complete copy of its memory"
    )]
    PostcopyIncomplete {
        /// Pages still missing.
        missing: u64,
        /// What ended the transfer.
        reason: String,
    },
    /// Post-copy's verification found the guest's memory different from the source's, after the guest had run here:
    /// it is stopped, and the source keeps the only trustworthy copy.
    #[error(
        "post-copy: the guest's memory differs from the source's (tables {ours:#018x} here, {theirs:#018x} there) \
         after it ran here; it is stopped"
    )]
    PostcopyMismatch {
        /// This side's root.
        ours: u64,
        /// The source's.
        theirs: u64,
    },
    /// The data threads did not all stop within the bound when the source asked to verify.
    #[error("data links did not stop within {0:?} of Verify")]
    Quiesce(Duration),
    /// The connection's TLS handshake failed: no certificate, one the CA did not sign or that expired, or a peer
    /// that does not speak TLS.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A data link that is not bound to this migration's control session: another session's link (even one with a
    /// valid certificate), or a plaintext one joining an encrypted migration.
    #[error("data link refused: {0}")]
    Unbound(&'static str),
}

impl From<GuestError> for ReceiveError {
    fn from(e: GuestError) -> Self {
        ReceiveError::Guest(e)
    }
}

impl ReceiveError {
    /// True for an attempt refused at the handshake, before any page moved: the destination is unchanged and may
    /// wait for another source (`livemig receive` does).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ReceiveError::TooLarge { .. }
                | ReceiveError::Incompatible(_)
                | ReceiveError::Busy
                | ReceiveError::TooManyConnections(_)
                | ReceiveError::RefusedBySource(_)
                | ReceiveError::Tls(_)
        )
    }
}

/// What the destination saw.
#[derive(Debug, Clone)]
pub struct DestReport {
    /// The source's handshake.
    pub hello: Hello,
    /// Pages applied, by codec.
    pub pages: PageCounts,
    /// Page copies dropped because the page already held a newer one.
    pub stale: u64,
    /// Pages sent in place whose content changed between the source's hash and their send (the guest wrote them in
    /// flight); each is dirty again and was resent.
    pub torn: u64,
    /// Bytes read from the data links.
    pub bytes_received: u64,
    /// Per data link (its index, bytes received), for the links that presented the session.
    pub links: Vec<(u32, u64)>,
    /// Data links ended for bad data: (the link's index, why). The source sent what they held again on the others.
    pub link_errors: Vec<(u32, String)>,
    /// When the guest was resumed.
    pub resumed_at: Instant,
    /// Whether the verification also compared re-hashed memory (`--verify full`).
    pub full_verify: bool,
    /// Whether the tables were compared and found equal: false only after a post-copy switch whose source was lost
    /// once every page had arrived (the guest runs on here, unverified; `committed_error` says why).
    pub verified: bool,
    /// Set when the guest was resumed but `Committed` could not be sent: the guest runs here, and the source, which
    /// did not hear so, stays paused and reports the outcome as unknown. An operator must stop one side.
    pub committed_error: Option<String>,
    /// The control connection's security: mode, cipher, the source certificate's subject.
    pub security: crate::tls::SecurityInfo,
    /// Socket requests the side's io_uring completed (`recv_uring`; 0 otherwise).
    pub uring_requests: u64,
    /// Bytes of the per-page tables (hashes and epochs, allocated per chunk of written pages).
    pub table_bytes: u64,
    /// Post-copy's figures, when the migration switched to it, and the pages that came on the urgent path.
    pub postcopy: Option<(livemig_engine::receive::postcopy::PostcopyStats, u64)>,
}

/// How long a new connection has to present its first frame (a Hello, or a data link's LinkHello), whole.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a frame on the control connection or a data link may take once its first byte has arrived. Raw pages
/// are read into guest memory with the pages marked busy, so a link that stalls mid-frame would otherwise keep them
/// busy; past this the link is dropped, the marks cleared, and the source sends the frame again on another link. A
/// resend that finds a page busy does not wait for this: it has the stalled link dropped at once (see
/// `read_pages` in `link.rs`). So this only needs to be longer than any stall the source itself tolerates (its link
/// timeout, 3 s by default, and the 2 s pause bound).
pub const MID_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write to the source may block (an Ack, a control answer) before the connection counts as dead.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Memory the pre-fault leaves to the rest of the host: it never populates more than what is available less this.
const PREFAULT_RESERVE: u64 = 256 << 20;

/// Runs a migration whose Hello has been read from `control`: builds the guest with `make_guest`, accepts the
/// source's data links on `listeners`, applies what they carry, and returns the running guest after Commit.
///
/// Pass the control listener among `listeners` (as `livemig receive` does) so that a second source that connects
/// during the migration is told at once that the destination is busy. Every connection that is refused or ended for
/// bad input is reported to `refused`. A data link that dies or carries bad data is dropped (the source sends its
/// batches again on the others); the loss of the control connection, a silent source, or the source's Abort ends
/// the migration with an error (and an Abort to the source).
pub fn receive<G: Guest, L: Listen>(
    listeners: &[&L],
    control: &Conn,
    hello: Hello,
    make_guest: impl FnOnce(&Hello) -> Result<G, GuestError>,
    opts: &DestOptions,
    security: &DestSecurity,
    refused: &(dyn Fn(&Peer, &ReceiveError) + Sync),
) -> Result<(G, DestReport), ReceiveError> {
    let _span = tracing::info_span!("migration", role = "destination", session = %format_args!("{:#x}", hello.session))
        .entered();
    let result: Result<(G, DestReport), ReceiveError> = (|| {
        opts.check(&hello)?;
        if control.is_sealed() != matches!(security, DestSecurity::Mtls(_)) {
            return Err(ReceiveError::Unbound("the control connection's security differs from the destination's"));
        }
        control.stream().set_write_timeout(Some(WRITE_TIMEOUT)).map_err(WireError::from)?;
        let guest = make_guest(&hello)?;
        let ack = wire::HelloAck { session: hello.session, dest: opts.describe() };
        wire::write_control(control, Kind::HelloAck, &ack.encode()).map_err(WireError::from)?;
        let report = run(listeners, control, &guest, hello, opts, security, refused)?;
        Ok((guest, report))
    })();
    match &result {
        Ok(_) => tracing::info!("guest resumed here"),
        Err(e) => tracing::warn!(error = %e, "migration not received"),
    }
    if let Err(e) = &result {
        if matches!(e, ReceiveError::Killed(_)) {
            let _ = control.stream().shutdown(Shutdown::Both);
            return result;
        }
        // Best effort: the source may be gone already.
        let _ = wire::write_abort(control, &e.to_string());
    }
    result
}

/// The connections of a migration and the threads that serve it, as the switchover must see them: every socket is
/// here from its accept, so that stopping the data links reaches all of them, and `live` counts the threads that may
/// still write guest memory (data threads, the acceptor, the pre-fault helper).
#[derive(Default)]
struct Conns {
    /// (connection id, owner id for busy pages, the socket).
    sockets: Vec<(u64, u32, Stream)>,
    next_id: u64,
    live: usize,
}

/// What the threads of a migration share.
struct Shared<'a> {
    rx: Receiver<'a>,
    session: u64,
    /// Set at Verify (or at the end): no connection is accepted, and every data thread ends.
    stop: AtomicBool,
    conns: Arc<Mutex<Conns>>,
    /// Signalled when a thread counted in `Conns::live` ends.
    ended: Condvar,
    /// Per link (index, bytes received).
    received: Mutex<Vec<(u32, u64)>>,
    /// Data links ended for bad data.
    link_errors: Mutex<Vec<(u32, String)>>,
    /// Whether any data link presented the session: until one has, an Abort from the source is a refusal.
    joined: AtomicBool,
    totals: Mutex<ApplyState>,
    die_after: Option<u64>,
    bytes: AtomicU64,
    max_connections: usize,
    admission: Arc<Admission>,
    /// How data links must authenticate, and the control session's binding secret their proofs are checked against.
    security: DestSecurity,
    binding: Option<[u8; 32]>,
    /// The ring the data links' I/O goes through, when asked for; dropped with this, after every link thread.
    ring: Option<Ring>,
    /// Set at a post-copy switch, under the lock the pre-fault holds while it faults a chunk in: no page is faulted in
    /// once the switch has begun.
    prefault_stopped: Mutex<bool>,
    /// Held by every control write from a post-copy switch on.
    control_write: Mutex<()>,
    /// Set at the first Missing frame: post-copy is coming, and from then a frame may take as long as post-copy waits
    /// for the network (`postcopy_wait`) rather than [`MID_FRAME_TIMEOUT`].
    postcopy: AtomicBool,
    postcopy_wait: Duration,
    /// The control connection the source reconnected after post-copy lost the first one; writes go to it.
    resumed: Mutex<Option<Arc<Conn>>>,
}

/// A thread counted in `Conns::live`; dropping it (however the thread ends) gives its place back.
struct Live<'s, 'a> {
    shared: &'s Shared<'a>,
    /// The connection this thread serves, to forget its socket at the end.
    conn: Option<u64>,
}

impl Drop for Live<'_, '_> {
    fn drop(&mut self) {
        let mut c = self.shared.lock_conns();
        if let Some(id) = self.conn {
            c.sockets.retain(|(i, _, _)| *i != id);
        }
        c.live -= 1;
        self.shared.ended.notify_all();
    }
}

impl<'a> Shared<'a> {
    /// Ends the connection whose busy marks carry `owner`: its thread's read fails, and its claims are given back.
    fn drop_link(&self, owner: u32) {
        for (_, o, s) in self.conns.lock().unwrap_or_else(|e| e.into_inner()).sockets.iter() {
            if *o == owner {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    fn new(
        guest: &'a dyn Guest,
        session: u64,
        opts: &DestOptions,
        security: &DestSecurity,
        binding: Option<[u8; 32]>,
        ring: Option<Ring>,
    ) -> Self {
        let conns: Arc<Mutex<Conns>> = Default::default();
        Shared {
            rx: Receiver::new(guest.memory()),
            session,
            stop: AtomicBool::new(false),
            conns,
            ended: Condvar::new(),
            received: Mutex::new(Vec::new()),
            link_errors: Mutex::new(Vec::new()),
            joined: AtomicBool::new(false),
            totals: Mutex::new(ApplyState::default()),
            die_after: opts.die_after_bytes,
            bytes: AtomicU64::new(0),
            max_connections: opts.max_connections.max(1),
            admission: Arc::new(Admission::default()),
            security: security.clone(),
            binding,
            ring,
            prefault_stopped: Mutex::new(false),
            control_write: Mutex::new(()),
            postcopy: AtomicBool::new(false),
            postcopy_wait: opts.postcopy_wait,
            resumed: Mutex::new(None),
        }
    }

    /// What the destination saw, once every thread has ended.
    fn report(
        self,
        hello: Hello,
        resumed_at: Instant,
        full_verify: bool,
        committed_error: Option<String>,
    ) -> DestReport {
        let totals = self.totals.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut links = self.received.into_inner().unwrap_or_else(|e| e.into_inner());
        links.sort_unstable();
        // A link the source dialled again (post-copy) came on several connections: one row per link.
        links.dedup_by(|later, first| {
            let same = later.0 == first.0;
            if same {
                first.1 += later.1;
            }
            same
        });
        DestReport {
            hello,
            pages: totals.counts,
            stale: totals.stale,
            torn: totals.torn,
            bytes_received: self.bytes.load(Ordering::Relaxed),
            links,
            link_errors: self.link_errors.into_inner().unwrap_or_else(|e| e.into_inner()),
            resumed_at,
            full_verify,
            verified: true,
            committed_error,
            security: crate::tls::SecurityInfo::default(),
            uring_requests: self.ring.as_ref().map_or(0, Ring::requests),
            table_bytes: self.rx.table_bytes(),
            postcopy: None,
        }
    }

    /// The control connection the source reconnected, if post-copy lost the first.
    fn resumed(&self) -> Option<Arc<Conn>> {
        self.resumed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_conns(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a helper thread before it starts; None once the migration is stopping.
    fn enter(&self) -> Option<Live<'_, 'a>> {
        let mut c = self.lock_conns();
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        c.live += 1;
        Some(Live { shared: self, conn: None })
    }

    /// Registers an accepted connection and counts its thread, or says why not.
    fn register(&self, stream: &Stream) -> Result<(Live<'_, 'a>, u32), ReceiveError> {
        let mut c = self.lock_conns();
        if self.stop.load(Ordering::SeqCst) {
            return Err(ReceiveError::Busy);
        }
        if c.sockets.len() >= self.max_connections {
            return Err(ReceiveError::TooManyConnections("for this migration"));
        }
        // Busy marks name their link by owner id; ids of live connections must differ.
        let owner = (0..MAX_OWNERS - 1).find(|o| c.sockets.iter().all(|(_, x, _)| x != o));
        let (Some(owner), Ok(clone)) = (owner, stream.try_clone()) else {
            return Err(ReceiveError::TooManyConnections("for this migration"));
        };
        let id = c.next_id;
        c.next_id += 1;
        c.sockets.push((id, owner, clone));
        c.live += 1;
        Ok((Live { shared: self, conn: Some(id) }, owner))
    }

    /// Stops every data thread and helper and waits until none is left, within `within`: from then on nothing
    /// writes guest memory. Called at Verify and at the end; the second call finds nothing to do.
    fn quiesce(&self, within: Duration) -> Result<(), ReceiveError> {
        let deadline = Instant::now() + within;
        let mut c = self.lock_conns();
        self.stop.store(true, Ordering::SeqCst);
        for (_, _, s) in &c.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        while c.live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReceiveError::Quiesce(within));
            }
            c = self.ended.wait_timeout(c, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }

    /// Records a data link ended for bad data.
    fn link_error(&self, link: u32, e: &ReceiveError) {
        self.link_errors.lock().unwrap_or_else(|e| e.into_inner()).push((link, e.to_string()));
    }
}

enum Msg {
    /// A frame (or the end) of the control connection of this generation: 0 is the first, and each Resume makes a
    /// new one, so that the last words of a replaced connection are told apart.
    Control(u32, Result<(Header, Vec<u8>), WireError>),
    Fatal(ReceiveError),
    /// Post-copy: the source's new control connection, presented with a Resume.
    Resumed(Arc<Conn>),
}

fn run<L: Listen>(
    listeners: &[&L],
    control: &Conn,
    guest: &dyn Guest,
    hello: Hello,
    opts: &DestOptions,
    security: &DestSecurity,
    refused: &(dyn Fn(&Peer, &ReceiveError) + Sync),
) -> Result<DestReport, ReceiveError> {
    let ring = if opts.recv_uring { Some(Ring::new("lm-uring").map_err(WireError::from)?) } else { None };
    let shared = Shared::new(guest, hello.session, opts, security, control.binding().copied(), ring);
    let (tx, msgs) = crossbeam::channel::unbounded::<Msg>();
    // The Hello was read under a deadline; from here silence is judged by the control loop, which counts data.
    control.stream().set_read_timeout(None).map_err(WireError::from)?;
    for l in listeners {
        l.set_nonblocking(true).map_err(WireError::from)?;
    }
    let mut pc = postcopy::PostcopyState::default();
    let outcome = std::thread::scope(|s| {
        let (shared, pc) = (&shared, &mut pc);
        let spawn = |name: &str| std::thread::Builder::new().name(name.to_string());
        if let Some(live) = shared.enter() {
            let chunks = &hello.chunks;
            spawn("lm-prefault")
                .spawn_scoped(s, move || prefault(guest, chunks, shared, live))
                .map_err(WireError::from)?;
        }
        if let Some(live) = shared.enter() {
            let t = tx.clone();
            spawn("lm-accept")
                .spawn_scoped(s, move || {
                    let _live = live;
                    accept_links(s, listeners, shared, &t, refused)
                })
                .map_err(WireError::from)?;
        }
        let t = tx.clone();
        spawn("lm-control").spawn_scoped(s, move || read_control(control, &t, shared, 0)).map_err(WireError::from)?;
        let result = control_loop(s, control, guest, shared, (&tx, &msgs), opts, pc);
        // However the loop ended, every data thread and helper stops before the guest may run (it already has, after
        // a successful Verify or a post-copy switch) and before this scope joins them.
        let stopped = shared.quiesce(MAX_PAUSE);
        for c in [Some(control), shared.resumed().as_deref()].into_iter().flatten() {
            let _ = c.stream().shutdown(Shutdown::Read);
        }
        let full_verify = result?;
        stopped.map(|()| full_verify)
    });
    for l in listeners {
        let _ = l.set_nonblocking(false);
    }
    let (full_verify, unfinished) = pc.outcome(guest, &shared, outcome)?;
    // After a Resume the source listens on the new connection: answers go there.
    let resumed = shared.resumed();
    let control = resumed.as_deref().unwrap_or(control);
    // Every data thread has been joined: resume. From here the guest runs, and no error may drop it.
    let resumed_at = pc.resumed_at.unwrap_or_else(|| {
        guest.vcpus().resume();
        Instant::now()
    });
    if opts.fail_committed {
        let _ = control.stream().shutdown(Shutdown::Write);
    }
    let verified = unfinished.is_none();
    let committed_error = match unfinished {
        Some(why) => Some(why),
        None => wire::write_control(control, Kind::Committed, &[]).err().map(|e| format!("sending Committed: {e}")),
    };
    let mut report = shared.report(hello, resumed_at, full_verify, committed_error);
    (report.security, report.verified) = (control.info(), verified);
    report.postcopy = pc.stats().map(|s| (s, pc.pulled));
    Ok(report)
}

/// Faulting fresh memory in (the kernel zeroes each page) costs more than copying data into it, and would otherwise
/// stall the apply threads: this helper faults the chunks round 0 will fill, ahead of the pages, as far as the host
/// has memory to spare, and stops when the migration does.
fn prefault(guest: &dyn Guest, chunks: &livemig_engine::dirty::Bitmap, shared: &Shared<'_>, live: Live<'_, '_>) {
    let _live = live;
    let mut budget =
        available_memory().unwrap_or(0).saturating_sub(PREFAULT_RESERVE) / (PAGE_SIZE as u64) / wire::CHUNK_PAGES;
    chunks.for_each_run(|run| {
        for c in run.first..run.first + run.count {
            let stopped = shared.prefault_stopped.lock().unwrap_or_else(|e| e.into_inner());
            if *stopped || shared.stop.load(Ordering::Relaxed) || budget == 0 {
                return;
            }
            budget -= 1;
            guest.memory().prefault(c * wire::CHUNK_PAGES, wire::CHUNK_PAGES);
            drop(stopped);
        }
    });
}

/// Reads control frames (each complete within the frame timeout once begun: [`MID_FRAME_TIMEOUT`], or post-copy's
/// wait) and hands them to the control loop, until the connection fails or closes.
fn read_control(control: &Conn, to: &crossbeam::channel::Sender<Msg>, shared: &Shared<'_>, generation: u32) {
    let mut buf = Vec::new();
    loop {
        let r = wire::read_frame_after(control, &mut buf, &|| shared.frame_timeout(), "control frame")
            .map(|h| (h, std::mem::take(&mut buf)));
        let end = r.is_err();
        if to.send(Msg::Control(generation, r)).is_err() || end {
            return;
        }
    }
}

/// The control loop's next message, within the source's silence bound (None: the bound passed, but data came in
/// meanwhile). After the switch the source may be silent as long as post-copy waits for the network, and has that
/// long to reconnect a lost control connection.
fn next_msg(
    msgs: &crossbeam::channel::Receiver<Msg>,
    shared: &Shared<'_>,
    opts: &DestOptions,
    pc: &postcopy::PostcopyState,
    seen: &mut u64,
) -> Result<Option<Msg>, ReceiveError> {
    let silence = if pc.armed.is_some() { opts.postcopy_wait.max(opts.idle_timeout) } else { opts.idle_timeout };
    if let Ok(m) = msgs.recv_timeout(pc.reconnect_left(opts).map_or(silence, |left| left.min(silence))) {
        return Ok(Some(m));
    }
    pc.check_reconnect(opts)?;
    let now = shared.bytes.load(Ordering::Relaxed);
    if now != *seen {
        *seen = now;
        return Ok(None);
    }
    Err(WireError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("source silent for {silence:?}")))
        .into())
}

/// The control connection's side of the migration: device and vCPU state, verification, commit. Returns whether the
/// verification was a full one, once Commit arrives after equal digests.
fn control_loop<'s, 'e: 's, 'a: 'e>(
    s: &'s std::thread::Scope<'s, 'e>,
    control: &'e Conn,
    guest: &dyn Guest,
    shared: &'e Shared<'a>,
    (tx, msgs): (&crossbeam::channel::Sender<Msg>, &crossbeam::channel::Receiver<Msg>),
    opts: &DestOptions,
    pc: &mut postcopy::PostcopyState,
) -> Result<bool, ReceiveError> {
    let mut verified: Option<bool> = None;
    let mut devices = DeviceSections::default();
    // Rounds can keep the control connection quiet for long: the source is silent only when the data links are too.
    let mut seen = shared.bytes.load(Ordering::Relaxed);
    loop {
        let Some(msg) = next_msg(msgs, shared, opts, pc, &mut seen)? else { continue };
        let (h, body) = match msg {
            Msg::Fatal(e) => return Err(e),
            Msg::Control(generation, _) if generation != pc.generation => continue,
            // After the switch a lost control connection is waited for: the source reconnects it.
            Msg::Control(_, Err(e)) if pc.armed.is_some() => {
                pc.control_lost(&e, opts);
                continue;
            }
            Msg::Control(_, r) => r?,
            Msg::Resumed(conn) => {
                pc.resume(s, conn, (control, opts), shared, tx)?;
                continue;
            }
        };
        match h.kind {
            Kind::DeviceState if !devices.restored => devices.add(wire::decode_device(&body)?)?,
            Kind::VcpuState if !devices.restored => {
                devices.restore(guest)?;
                guest.vcpus().restore_state(&body)?;
                wire::write_control(control, Kind::StateAck, &[]).map_err(WireError::from)?;
            }
            Kind::Missing if pc.armed.is_none() => pc.missing(&body, guest, shared, control)?,
            Kind::Switch if devices.restored && pc.armed.is_none() => pc.switch(s, control, guest, shared)?,
            Kind::Pages if pc.armed.is_some() => pc.urgent(&h, &body, shared)?,
            Kind::Verify if pc.armed.is_some() => {
                let answered = pc.verify(&Verify::decode(&body)?, (shared, control, opts), guest)?;
                verified = answered.or(verified);
            }
            Kind::Verify => {
                let want = Verify::decode(&body)?;
                // Nothing may write guest memory between these roots and the resume.
                shared.quiesce(MAX_PAUSE)?;
                let table_root = shared.rx.root();
                let memory_root = if want.full { memory_root(guest.memory())? } else { 0 };
                let equal = table_root == want.table_root && (!want.full || memory_root == want.memory_root);
                verified = equal.then_some(want.full);
                let v = Verified { equal, table_root, memory_root };
                wire::write_control(control, Kind::Verified, &v.encode()).map_err(WireError::from)?;
            }
            Kind::Commit => return verified.ok_or(ReceiveError::CommitBeforeVerify),
            Kind::Abort => {
                let reason = wire::decode_reason(&body);
                return Err(if shared.joined.load(Ordering::SeqCst) {
                    WireError::PeerAbort(reason).into()
                } else {
                    ReceiveError::RefusedBySource(reason)
                });
            }
            got => return Err(WireError::Unexpected { got, expected: "a control frame" }.into()),
        }
    }
}
