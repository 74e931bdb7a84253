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
//! sends what it held again on the other links. The migration ends only on the control connection's failure, a
//! source that goes silent, or the source's own Abort.
//!
//! **Switchover.** At `Verify` the destination stops accepting, shuts every data socket down and joins every data and
//! helper thread (within [`MAX_PAUSE`]) before it computes its roots: from then until the guest resumes nothing can
//! write guest memory, so the roots it reports describe exactly the memory it will run. It resumes only on `Commit`
//! after equal roots. Once the guest runs, no error drops it: a failure to send `Committed` is reported in
//! [`DestReport::committed_error`] beside the running guest.

use crate::wire::{self, Deadline, Header, Hello, Kind, Verified, Verify, WireError, HEADER_LEN};
use livemig_engine::encode::{memory_root, PageCounts, PageEntry};
use livemig_engine::guest::{Guest, GuestError, PAGE_SIZE};
use livemig_engine::precopy::MAX_PAUSE;
use livemig_engine::preflight::DestDescription;
use livemig_engine::receive::{ApplyError, ApplyState, InPlaceError, Receiver, MAX_OWNERS};
use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
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
    /// The data threads did not all stop within the bound when the source asked to verify.
    #[error("data links did not stop within {0:?} of Verify")]
    Quiesce(Duration),
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
    /// Set when the guest was resumed but `Committed` could not be sent: the guest runs here, and the source, which
    /// did not hear so, stays paused and reports the outcome as unknown. An operator must stop one side.
    pub committed_error: Option<String>,
}

/// Options of the destination.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// A source silent this long (no control frame and no data) is declared gone.
    pub idle_timeout: Duration,
    /// The largest guest accepted, in bytes. A Hello sizes the destination's tables and guest, so it is checked before
    /// any of them is allocated. Defaults to this host's available memory ([`available_memory`]); an operator may set
    /// more for a sparse guest on an overcommitted host (pre-faulting still stops at what is available).
    pub max_memory: u64,
    /// Connections a migration serves at once: data links and connections still presenting themselves.
    pub max_connections: usize,
    /// This host's CPU, against which a VM's CPU model is checked; read with CPUID unless overridden (tests use a
    /// fixture).
    pub host_cpu: Option<livemig_engine::cpu::CpuDescription>,
    /// What this destination reports about itself for the source's preflight; built from this host (its name, its
    /// available memory, no datastores or port groups) unless given.
    pub description: Option<DestDescription>,
    /// Fault injection for tests: after this many bytes the destination drops the connection without a word, as the
    /// kernel does for a killed process.
    #[doc(hidden)]
    pub die_after_bytes: Option<u64>,
    /// Fault injection for tests: the control connection's sending side fails just before `Committed` is written,
    /// as a network that dies at that moment would make it.
    #[doc(hidden)]
    pub fail_committed: bool,
}

/// Bytes of memory this host could give a new guest without swapping (`MemAvailable`), if the kernel says.
pub fn available_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb.saturating_mul(1024))
}

impl Default for DestOptions {
    fn default() -> Self {
        DestOptions {
            idle_timeout: Duration::from_secs(10),
            max_memory: available_memory().unwrap_or(u64::MAX),
            max_connections: 64,
            host_cpu: None,
            description: None,
            die_after_bytes: None,
            fail_committed: false,
        }
    }
}

impl DestOptions {
    /// What this destination reports about itself.
    pub fn describe(&self) -> DestDescription {
        self.description.clone().unwrap_or_else(|| {
            let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or("destination".into(), |s| s.trim().to_string());
            DestDescription {
                name,
                free_memory_bytes: available_memory().unwrap_or(self.max_memory),
                datastores: Vec::new(),
                port_groups: Vec::new(),
                cpu: self.host_cpu.clone().unwrap_or_else(livemig_engine::cpu::host),
            }
        })
    }

    /// Checks a Hello against this destination before anything is allocated for it: the memory cap and the CPU model.
    pub fn check(&self, hello: &Hello) -> Result<(), ReceiveError> {
        let asked = hello.layout.total_bytes();
        if asked > self.max_memory {
            return Err(ReceiveError::TooLarge { asked, max: self.max_memory });
        }
        if let Some(vm) = &hello.cpu {
            let host = self.host_cpu.clone().unwrap_or_else(livemig_engine::cpu::host);
            let why = livemig_engine::cpu::incompatibilities(vm, &host);
            if !why.is_empty() {
                return Err(ReceiveError::Incompatible(why));
            }
        }
        Ok(())
    }
}

/// How long a new connection has to present its first frame (a Hello, or a data link's LinkHello), whole.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a frame on the control connection or a data link may take once its first byte has arrived. Raw pages
/// are read into guest memory with the pages marked busy, so a link that stalls mid-frame would otherwise keep them
/// busy; past this the link is dropped, the marks cleared, and the source sends the frame again on another link. A
/// resend that finds a page busy does not wait for this: it has the stalled link dropped at once (see
/// `Receiver::with_evict`). So this only needs to be longer than any stall the source itself tolerates (its link
/// timeout, 3 s by default, and the 2 s pause bound).
pub const MID_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write to the source may block (an Ack, a control answer) before the connection counts as dead.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that have not yet presented a Hello, all peers together.
pub const MAX_PENDING: usize = 64;
/// Connections that have not yet presented a Hello or LinkHello, from one peer address.
pub const MAX_PENDING_PER_PEER: usize = 8;

/// Memory the pre-fault leaves to the rest of the host: it never populates more than what is available less this.
const PREFAULT_RESERVE: u64 = 256 << 20;

/// Whether an `accept` error is the kind that passes (a connection reset before it was accepted, a descriptor or
/// buffer shortage, a signal): the listener is fine, and the next accept may work.
fn transient_accept_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
                | libc::ETIMEDOUT
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::ENETDOWN
        )
    )
}

/// Pause after a transient accept error, so that a listener whose backlog cannot be served (no descriptors left)
/// does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);

/// Writes an Abort naming `e` on a connection that is being refused. Bounded, and best effort.
fn refuse(stream: &TcpStream, e: &ReceiveError) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    let _ = wire::write_abort(stream, &e.to_string());
}

/// Counts connections still presenting themselves, in all and per peer address, and refuses past the caps.
#[derive(Debug, Default)]
struct Admission {
    pending: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A connection's place in the [`Admission`] count, given back when dropped.
struct Ticket {
    adm: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Ticket> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let per = p.1.get(&ip).copied().unwrap_or(0);
        if p.0 >= max || per >= MAX_PENDING_PER_PEER {
            return None;
        }
        p.0 += 1;
        p.1.insert(ip, per + 1);
        Some(Ticket { adm: self.clone(), ip })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut p = self.adm.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.0 = p.0.saturating_sub(1);
        if let Some(n) = p.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                p.1.remove(&self.ip);
            }
        }
    }
}

/// Reads the source's Hello from a new connection, the whole frame within [`HELLO_TIMEOUT`] (or the idle timeout, if
/// shorter). Used by a listener to tell a livemig source from a stranger before committing to it.
pub fn read_hello(stream: &TcpStream, opts: &DestOptions) -> Result<Hello, WireError> {
    let mut buf = Vec::new();
    let mut d = Deadline::new(stream, Instant::now() + HELLO_TIMEOUT.min(opts.idle_timeout), "Hello");
    let h = wire::read_frame(&mut d, &mut buf)?;
    stream.set_read_timeout(None)?;
    match h.kind {
        Kind::Hello => Hello::decode(&buf),
        Kind::Abort => Err(WireError::PeerAbort(wire::decode_reason(&buf))),
        got => Err(WireError::Unexpected { got, expected: "Hello" }),
    }
}

/// Waits on `listener` for a source whose Hello this destination accepts, and returns its control connection and
/// Hello. Every other connection is refused with an Abort naming why, reported to `refused`, and closed, and the
/// wait goes on: a stranger, a wrong version, one that says nothing for [`HELLO_TIMEOUT`], a guest over
/// [`DestOptions::max_memory`], a CPU model this host lacks, and a second source that finishes its Hello after the one
/// admitted (it is told the destination is busy). Each Hello is read on its own thread, so a silent stranger cannot
/// hold up the real source; those threads are capped ([`MAX_PENDING`], [`MAX_PENDING_PER_PEER`]) and each ends
/// within [`HELLO_TIMEOUT`], after this returns if need be. Transient accept errors (out of descriptors, a reset
/// connection) are retried.
pub fn accept_migration(
    listener: &TcpListener,
    opts: &DestOptions,
    refused: &(dyn Fn(SocketAddr, &ReceiveError) + Sync),
) -> std::io::Result<(TcpStream, Hello)> {
    type Found = Result<(TcpStream, Hello), (SocketAddr, ReceiveError)>;
    let (tx, rx) = crossbeam::channel::unbounded::<Found>();
    // Set by the first reader whose Hello is accepted; any later one is told the destination is busy.
    let taken = Arc::new(AtomicBool::new(false));
    let admission = Arc::new(Admission::default());
    listener.set_nonblocking(true)?;
    let found = loop {
        match rx.try_recv() {
            Ok(Ok(hit)) => break Ok(hit),
            Ok(Err((peer, e))) => {
                refused(peer, &e);
                continue;
            }
            Err(_) => {}
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let Some(ticket) = admission.admit(peer.ip(), MAX_PENDING) else {
                    let e = ReceiveError::TooManyConnections("waiting to present a Hello");
                    refuse(&stream, &e);
                    refused(peer, &e);
                    continue;
                };
                let (tx, taken, opts) = (tx.clone(), taken.clone(), opts.clone());
                let spawned = std::thread::Builder::new().name("lm-hello".into()).spawn(move || {
                    let _ticket = ticket;
                    let r = admit_source(&stream, &opts, &taken);
                    if let Err(e) = &r {
                        refuse(&stream, e);
                    }
                    let _ = tx.send(r.map(|h| (stream, h)).map_err(|e| (peer, e)));
                });
                if let Err(e) = spawned {
                    refused(peer, &ReceiveError::Wire(WireError::Io(e)));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Wakes as soon as a reader reports; else polls accept again in 5 ms.
                match rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(Ok(hit)) => break Ok(hit),
                    Ok(Err((peer, e))) => refused(peer, &e),
                    Err(_) => {}
                }
            }
            Err(e) if transient_accept_error(&e) => std::thread::sleep(ACCEPT_RETRY),
            Err(e) => break Err(e),
        }
    };
    // Readers that finish later find `taken` set (by the winner) and tell their source the destination is busy; on
    // an accept error nobody won, so close the door for them here.
    taken.store(true, Ordering::SeqCst);
    for r in rx.try_iter() {
        if let Err((peer, e)) = r {
            refused(peer, &e);
        }
    }
    listener.set_nonblocking(false)?;
    found
}

/// Reads a connection's Hello (within [`HELLO_TIMEOUT`]) and checks it against this destination; a refused one gets
/// an Abort that says why. For a caller that serves one known source (as `livemig demo` does); a listener open to a
/// network should use [`accept_migration`].
pub fn admit(stream: &TcpStream, opts: &DestOptions) -> Result<Hello, ReceiveError> {
    let r = read_checked_hello(stream, opts);
    if let Err(e) = &r {
        refuse(stream, e);
    }
    r
}

fn read_checked_hello(stream: &TcpStream, opts: &DestOptions) -> Result<Hello, ReceiveError> {
    stream.set_nonblocking(false).map_err(WireError::from)?;
    let hello = read_hello(stream, opts)?;
    opts.check(&hello)?;
    let _ = stream.set_nodelay(true);
    Ok(hello)
}

/// Reads and checks one connection's Hello; the first accepted one takes the destination.
fn admit_source(stream: &TcpStream, opts: &DestOptions, taken: &AtomicBool) -> Result<Hello, ReceiveError> {
    let hello = read_checked_hello(stream, opts)?;
    if taken.swap(true, Ordering::SeqCst) {
        return Err(ReceiveError::Busy);
    }
    Ok(hello)
}

/// Runs a migration whose Hello has been read from `control`: builds the guest with `make_guest`, accepts the
/// source's data links on `listeners`, applies what they carry, and returns the running guest after Commit.
///
/// Pass the control listener among `listeners` (as `livemig receive` does) so that a second source that connects
/// during the migration is told at once that the destination is busy. Every connection that is refused or ended for
/// bad input is reported to `refused`. A data link that dies or carries bad data is dropped (the source sends its
/// batches again on the others); the loss of the control connection, a silent source, or the source's Abort ends
/// the migration with an error (and an Abort to the source).
pub fn receive<G: Guest>(
    listeners: &[&TcpListener],
    control: &TcpStream,
    hello: Hello,
    make_guest: impl FnOnce(&Hello) -> Result<G, GuestError>,
    opts: &DestOptions,
    refused: &(dyn Fn(SocketAddr, &ReceiveError) + Sync),
) -> Result<(G, DestReport), ReceiveError> {
    let result: Result<(G, DestReport), ReceiveError> = (|| {
        opts.check(&hello)?;
        control.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(WireError::from)?;
        let guest = make_guest(&hello)?;
        let me = opts.describe();
        wire::write_frame(&mut &*control, Kind::HelloAck, 0, 0, &[&wire::encode_hello_ack(hello.session, &me)])
            .map_err(WireError::from)?;
        let report = run(listeners, control, &guest, hello, opts, refused)?;
        Ok((guest, report))
    })();
    if let Err(e) = &result {
        if matches!(e, ReceiveError::Killed(_)) {
            let _ = control.shutdown(Shutdown::Both);
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
    sockets: Vec<(u64, u32, TcpStream)>,
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
    fn register(&self, stream: &TcpStream) -> Result<(Live<'_, 'a>, u32), ReceiveError> {
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
    Control(Result<(Header, Vec<u8>), WireError>),
    Fatal(ReceiveError),
}

fn run(
    listeners: &[&TcpListener],
    control: &TcpStream,
    guest: &dyn Guest,
    hello: Hello,
    opts: &DestOptions,
    refused: &(dyn Fn(SocketAddr, &ReceiveError) + Sync),
) -> Result<DestReport, ReceiveError> {
    let conns: Arc<Mutex<Conns>> = Default::default();
    let evict_from = conns.clone();
    // A page still busy when its resend arrives is held by a link the source has given up on: drop that link.
    let evict = move |owner: u32| {
        for (_, o, s) in evict_from.lock().unwrap_or_else(|e| e.into_inner()).sockets.iter() {
            if *o == owner {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    };
    let shared = Shared {
        rx: Receiver::new(guest.memory()).with_evict(evict),
        session: hello.session,
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
    };
    let (tx, msgs) = crossbeam::channel::unbounded::<Msg>();
    // The Hello was read under a deadline; from here silence is judged by the control loop, which counts data.
    control.set_read_timeout(None).map_err(WireError::from)?;
    for l in listeners {
        l.set_nonblocking(true).map_err(WireError::from)?;
    }
    // Faulting fresh memory in (the kernel zeroes each page) costs more than copying data into it, and would
    // otherwise stall the apply threads; a helper faults the chunks round 0 will fill, ahead of the pages, as far as
    // the host has memory to spare.
    let prefault_chunks =
        available_memory().unwrap_or(0).saturating_sub(PREFAULT_RESERVE) / (PAGE_SIZE as u64) / wire::CHUNK_PAGES;
    let outcome = std::thread::scope(|s| {
        let (shared, chunks) = (&shared, &hello.chunks);
        let spawn = |name: &str| std::thread::Builder::new().name(name.to_string());
        if let Some(live) = shared.enter() {
            spawn("lm-prefault")
                .spawn_scoped(s, move || {
                    let _live = live;
                    let mut budget = prefault_chunks;
                    chunks.for_each_run(|run| {
                        for c in run.first..run.first + run.count {
                            if shared.stop.load(Ordering::Relaxed) || budget == 0 {
                                return;
                            }
                            budget -= 1;
                            guest.memory().prefault(c * wire::CHUNK_PAGES, wire::CHUNK_PAGES);
                        }
                    });
                })
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
        spawn("lm-control")
            .spawn_scoped(s, move || {
                let mut buf = Vec::new();
                loop {
                    let r = wire::read_frame_within(control, &mut buf, MID_FRAME_TIMEOUT, "control frame")
                        .map(|h| (h, std::mem::take(&mut buf)));
                    let end = r.is_err();
                    if t.send(Msg::Control(r)).is_err() || end {
                        return;
                    }
                }
            })
            .map_err(WireError::from)?;
        let result = control_loop(control, guest, shared, &msgs, opts);
        // However the loop ended, every data thread and helper stops before the guest may run (it already has, after
        // a successful Verify) and before this scope joins them.
        let stopped = shared.quiesce(MAX_PAUSE);
        let _ = control.shutdown(Shutdown::Read);
        let full_verify = result?;
        stopped.map(|()| full_verify)
    });
    for l in listeners {
        let _ = l.set_nonblocking(false);
    }
    let full_verify = outcome?;
    // Every data thread has been joined: resume. From here the guest runs, and no error may drop it.
    guest.vcpus().resume();
    let resumed_at = Instant::now();
    if opts.fail_committed {
        let _ = control.shutdown(Shutdown::Write);
    }
    let committed_error =
        wire::write_frame(&mut &*control, Kind::Committed, 0, 0, &[]).err().map(|e| format!("sending Committed: {e}"));
    let totals = shared.totals.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut links = shared.received.into_inner().unwrap_or_else(|e| e.into_inner());
    links.sort_unstable();
    Ok(DestReport {
        hello,
        pages: totals.counts,
        stale: totals.stale,
        torn: totals.torn,
        bytes_received: shared.bytes.load(Ordering::Relaxed),
        links,
        link_errors: shared.link_errors.into_inner().unwrap_or_else(|e| e.into_inner()),
        resumed_at,
        full_verify,
        committed_error,
    })
}

/// The control connection's side of the migration: vCPU state, verification, commit. Returns whether the
/// verification was a full one, once Commit arrives after equal digests.
fn control_loop(
    control: &TcpStream,
    guest: &dyn Guest,
    shared: &Shared<'_>,
    msgs: &crossbeam::channel::Receiver<Msg>,
    opts: &DestOptions,
) -> Result<bool, ReceiveError> {
    let mut w = control;
    let mut verified: Option<bool> = None;
    // Rounds can keep the control connection quiet for long: the source is silent only when the data links are too.
    let mut seen = shared.bytes.load(Ordering::Relaxed);
    loop {
        let msg = match msgs.recv_timeout(opts.idle_timeout) {
            Ok(m) => m,
            Err(_) => {
                let now = shared.bytes.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    continue;
                }
                return Err(WireError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("source silent for {:?}", opts.idle_timeout),
                ))
                .into());
            }
        };
        let (h, body) = match msg {
            Msg::Fatal(e) => return Err(e),
            Msg::Control(r) => r?,
        };
        match h.kind {
            Kind::VcpuState => {
                guest.vcpus().restore_state(&body)?;
                wire::write_frame(&mut w, Kind::StateAck, 0, 0, &[]).map_err(WireError::from)?;
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
                wire::write_frame(&mut w, Kind::Verified, 0, 0, &[&v.encode()]).map_err(WireError::from)?;
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

/// Accepts connections on every listener until the migration stops, each on its own thread.
fn accept_links<'s, 'e: 's>(
    s: &'s std::thread::Scope<'s, 'e>,
    listeners: &'e [&'e TcpListener],
    shared: &'s Shared<'e>,
    tx: &crossbeam::channel::Sender<Msg>,
    refused: &'e (dyn Fn(SocketAddr, &ReceiveError) + Sync),
) {
    while !shared.stop.load(Ordering::SeqCst) {
        let mut idle = true;
        for l in listeners {
            match l.accept() {
                Ok((stream, peer)) => {
                    idle = false;
                    let admitted = shared
                        .admission
                        .admit(peer.ip(), shared.max_connections)
                        .ok_or(ReceiveError::TooManyConnections("from this address waiting to present themselves"));
                    let registered = admitted.and_then(|ticket| Ok((ticket, shared.register(&stream)?)));
                    let (ticket, (live, owner)) = match registered {
                        Ok(x) => x,
                        Err(e) => {
                            refuse(&stream, &e);
                            refused(peer, &e);
                            continue;
                        }
                    };
                    let link_tx = tx.clone();
                    let spawned = std::thread::Builder::new().name("lm-data".into()).spawn_scoped(s, move || {
                        let _live = live;
                        data_link(stream, peer, owner, ticket, shared, &link_tx, refused)
                    });
                    if let Err(e) = spawned {
                        // The connection's socket and count went with the closure; the migration goes on.
                        refused(peer, &ReceiveError::Wire(WireError::Io(e)));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if transient_accept_error(&e) => std::thread::sleep(ACCEPT_RETRY),
                Err(e) => {
                    let _ = tx.send(Msg::Fatal(WireError::Io(e).into()));
                    return;
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Reads a new connection's first frame, within [`HELLO_TIMEOUT`], and returns the link index its LinkHello
/// presents. Another source's Hello is told the destination is busy; anything else is refused for what it is.
fn present(stream: &TcpStream, session: u64) -> Result<u32, ReceiveError> {
    stream.set_nonblocking(false).map_err(WireError::from)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(WireError::from)?;
    let mut body = Vec::new();
    let mut d = Deadline::new(stream, Instant::now() + HELLO_TIMEOUT, "LinkHello");
    let h = wire::read_frame(&mut d, &mut body)?;
    match h.kind {
        Kind::LinkHello => {
            let (got, link) = wire::decode_link_hello(&body)?;
            if got != session {
                return Err(WireError::WrongSession { got }.into());
            }
            Ok(link)
        }
        Kind::Hello => Err(ReceiveError::Busy),
        got => Err(WireError::Unexpected { got, expected: "LinkHello" }.into()),
    }
}

/// One connection: checks that it presents the session, then applies and acknowledges Pages frames until it closes.
/// A link that dies just ends; bad data ends the link, with an Abort that says why, and not the migration.
fn data_link(
    stream: TcpStream,
    peer: SocketAddr,
    owner: u32,
    ticket: Ticket,
    shared: &Shared<'_>,
    tx: &crossbeam::channel::Sender<Msg>,
    refused: &(dyn Fn(SocketAddr, &ReceiveError) + Sync),
) {
    let presented = present(&stream, shared.session);
    drop(ticket);
    let link = match presented {
        Ok(link) => link,
        Err(e) => {
            refuse(&stream, &e);
            refused(peer, &e);
            return;
        }
    };
    shared.joined.store(true, Ordering::SeqCst);
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_nodelay(true);
    let mut st = ApplyState::default();
    let mut frame = FrameBuffers::default();
    let mut received = 0u64;
    let result = loop {
        let (raw, h) = match wire::read_header_within(&stream, MID_FRAME_TIMEOUT, "Pages frame") {
            Ok(x) => x,
            // The link died or was closed: the source sends its batches again elsewhere.
            Err(WireError::Closed | WireError::Io(_) | WireError::Truncated { .. }) => break Ok(()),
            Err(e) => break Err(ReceiveError::from(e)),
        };
        let len = (HEADER_LEN as u64) + u64::from(h.len);
        received += len;
        let total = shared.bytes.fetch_add(len, Ordering::Relaxed) + len;
        if shared.die_after.is_some_and(|n| total >= n) {
            break Err(ReceiveError::Killed(total));
        }
        if h.kind != Kind::Pages {
            break Err(WireError::Unexpected { got: h.kind, expected: "Pages on a data link" }.into());
        }
        // Inside a frame the bytes are already on their way: a frame that stops arriving is a dead link, and this
        // thread may be holding pages busy that other links wait for (see read_pages).
        let mut r = Deadline::new(&stream, Instant::now() + MID_FRAME_TIMEOUT, "Pages frame");
        match read_pages(&mut r, &raw, &h, owner, &shared.rx, &mut st, &mut frame) {
            Ok(()) => {}
            Err(None) => break Ok(()),
            Err(Some(e)) => break Err(e),
        }
        let ack = wire::encode_ack(len, frame.entries.len() as u32);
        if wire::write_frame(&mut &stream, Kind::Ack, h.epoch, h.seq, &[&ack]).is_err() {
            break Ok(());
        }
    };
    {
        let mut t = shared.totals.lock().unwrap_or_else(|e| e.into_inner());
        t.counts.add(&st.counts);
        t.stale += st.stale;
        t.torn += st.torn;
    }
    shared.received.lock().unwrap_or_else(|e| e.into_inner()).push((link, received));
    match result {
        Ok(()) => {}
        Err(e @ ReceiveError::Killed(_)) => {
            // Reported before the links close: the close may make the source drop the control connection, and the
            // control loop must learn the real reason first. Then, as a killed process would, drop every connection.
            let _ = tx.send(Msg::Fatal(e));
            for (_, _, l) in shared.lock_conns().sockets.iter() {
                let _ = l.shutdown(Shutdown::Both);
            }
        }
        Err(e) => {
            // Pages this link applied before were each checked; what it held unacknowledged, the source resends.
            shared.link_error(link, &e);
            refuse(&stream, &e);
            refused(peer, &e);
        }
    }
    // The link is done either way; its clone in `conns` must not keep the connection open.
    let _ = stream.shutdown(Shutdown::Both);
}

/// A data link's buffers for the frame being read, kept from frame to frame.
#[derive(Default)]
struct FrameBuffers {
    table: Vec<u8>,
    entries: Vec<PageEntry>,
}

/// Reads the rest of a Pages frame whose header is `raw`/`h` and applies it. The entry table is read and checked
/// (checksum, structure, every entry against the layout) before any payload byte; then the payload is read with
/// vectored reads, raw pages straight into their place in guest memory and the other pages' bytes (lz4 blocks, the
/// zstd frame) into buffers applied at the end. `Err(None)`: the link died mid-frame, which is not the migration's
/// failure (its batches are resent).
fn read_pages(
    r: &mut impl std::io::Read,
    raw: &[u8; HEADER_LEN],
    h: &Header,
    link: u32,
    rx: &Receiver<'_>,
    st: &mut ApplyState,
    f: &mut FrameBuffers,
) -> Result<(), Option<ReceiveError>> {
    let fatal = |e: ReceiveError| Some(e);
    let dead_or = |e: WireError| match e {
        WireError::Io(_) | WireError::Truncated { .. } | WireError::Closed => None,
        e => Some(e.into()),
    };
    f.table.resize(h.checked_len as usize, 0);
    wire::read_part(r, &mut f.table, "entry table").map_err(dead_or)?;
    wire::check_sum(raw, h, &f.table).map_err(|e| fatal(e.into()))?;
    let zstd_len = wire::decode_table(h, &f.table, &mut f.entries).map_err(|e| fatal(e.into()))?;
    let applied = rx.apply_frame_in_place(h.epoch, &f.entries, zstd_len as usize, link, st, |iov| {
        let mut rest = iov;
        while !rest.is_empty() {
            match std::io::Read::read_vectored(r, rest) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => std::io::IoSliceMut::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    match applied {
        Ok(()) => Ok(()),
        Err(InPlaceError::Io(_)) => Err(None),
        Err(InPlaceError::Apply(a)) => Err(fatal(a.into())),
    }
}
