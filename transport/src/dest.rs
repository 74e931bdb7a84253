//! The destination driver: accepts a migration's control connection and its data links, and applies it to a fresh
//! guest.
//!
//! Threads, scoped to [`receive`]: the control loop (the caller's thread) handles the vCPU state, verification and
//! commit; a control reader feeds it frames; an acceptor takes data links on every listener, and each data link gets
//! a thread that checks its session id, then reads frames in order, checks each (header, checksum, entry table, then
//! every page entry against the layout), reads raw pages straight into guest memory and applies the rest through the
//! engine's shared [`Receiver`], and acknowledges the frame on the same link; a pre-fault thread faults guest memory
//! in ahead of the pages.
//!
//! The guest is built from the source's Hello by the caller's factory, kept paused, restored from the vCPU state,
//! verified, and resumed only on Commit, after every data thread has ended. A data link that dies is dropped; bad
//! input anywhere ends the migration with a typed error and an Abort to the source. Nothing here panics on input.

use crate::wire::{self, Header, Hello, Kind, Verified, Verify, WireError, HEADER_LEN};
use livemig_engine::encode::{memory_root, PageCounts, PageEntry};
use livemig_engine::guest::{Guest, GuestError};
use livemig_engine::preflight::DestDescription;
use livemig_engine::receive::{ApplyError, ApplyState, InPlaceError, Receiver};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why the destination gave up on a migration. The source keeps its guest.
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
    #[error("guest memory of {asked} bytes exceeds the {max} bytes this destination accepts")]
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
}

impl From<GuestError> for ReceiveError {
    fn from(e: GuestError) -> Self {
        ReceiveError::Guest(e)
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
    /// When the guest was resumed.
    pub resumed_at: Instant,
    /// Whether the verification also compared re-hashed memory (`--verify full`).
    pub full_verify: bool,
}

/// Options of the destination.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// A source silent this long is declared gone.
    pub idle_timeout: Duration,
    /// The largest guest accepted, in bytes. A Hello sizes the destination's tables, so it is bounded before any of
    /// them is allocated. Defaults to this host's physical memory.
    pub max_memory: u64,
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
}

impl Default for DestOptions {
    fn default() -> Self {
        // SAFETY: sysconf only reads system configuration.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        let max_memory = u64::try_from(pages).unwrap_or(0).saturating_mul(u64::try_from(size).unwrap_or(0));
        DestOptions {
            idle_timeout: Duration::from_secs(30),
            max_memory: if max_memory > 0 { max_memory } else { u64::MAX },
            host_cpu: None,
            description: None,
            die_after_bytes: None,
        }
    }
}

impl DestOptions {
    /// What this destination reports about itself.
    pub fn describe(&self) -> DestDescription {
        self.description.clone().unwrap_or_else(|| {
            let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or("destination".into(), |s| s.trim().to_string());
            // MemAvailable, in kB: what the kernel could give a new VM without swapping.
            let free = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:")).map(str::to_owned))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
                .map_or(self.max_memory, |kb| kb * 1024);
            DestDescription {
                name,
                free_memory_bytes: free,
                datastores: Vec::new(),
                port_groups: Vec::new(),
                cpu: self.host_cpu.clone().unwrap_or_else(livemig_engine::cpu::host),
            }
        })
    }
}

/// Reads the source's Hello. Used by a listener to tell a livemig source from a stranger before committing to it.
pub fn read_hello(stream: &TcpStream, opts: &DestOptions) -> Result<Hello, WireError> {
    stream.set_read_timeout(Some(opts.idle_timeout))?;
    let mut buf = Vec::new();
    let h = wire::read_frame(&mut &*stream, &mut buf)?;
    if h.kind != Kind::Hello {
        return Err(WireError::Unexpected { got: h.kind, expected: "Hello" });
    }
    Hello::decode(&buf)
}

/// Runs a migration whose Hello has been read from `control`: builds the guest with `make_guest`, accepts the
/// source's data links on `listeners` (a connection without the session id is reported to `refused` and closed),
/// applies what they carry, and returns the running guest after Commit.
///
/// A data link that dies is dropped (the source sends its batches again on the others). Bad data on any link, or the
/// loss of the control connection, ends the migration with an error and an Abort to the source.
pub fn receive<G: Guest>(
    listeners: &[&TcpListener],
    control: &TcpStream,
    hello: Hello,
    make_guest: impl FnOnce(&Hello) -> Result<G, GuestError>,
    opts: &DestOptions,
    refused: &(dyn Fn(SocketAddr, &WireError) + Sync),
) -> Result<(G, DestReport), ReceiveError> {
    let result: Result<(G, DestReport), ReceiveError> = (|| {
        let asked = hello.layout.total_bytes();
        if asked > opts.max_memory {
            return Err(ReceiveError::TooLarge { asked, max: opts.max_memory });
        }
        if let Some(vm) = &hello.cpu {
            let host = opts.host_cpu.clone().unwrap_or_else(livemig_engine::cpu::host);
            let why = livemig_engine::cpu::incompatibilities(vm, &host);
            if !why.is_empty() {
                return Err(ReceiveError::Incompatible(why));
            }
        }
        let guest = make_guest(&hello)?;
        let mut w = control;
        let me = opts.describe();
        wire::write_frame(&mut w, Kind::HelloAck, 0, 0, &[&wire::encode_hello_ack(hello.session, &me)])
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
        let mut w = control;
        let _ = wire::write_frame(&mut w, Kind::Abort, 0, 0, &[e.to_string().as_bytes()]);
    }
    result
}

/// What the threads of a migration share.
struct Shared<'a> {
    rx: Receiver<'a>,
    session: u64,
    stop: AtomicBool,
    /// Data sockets with their link index: to close them all at the end, or one that keeps a page busy.
    links: std::sync::Arc<Mutex<Vec<(u32, TcpStream)>>>,
    /// Per link (index, bytes received).
    received: Mutex<Vec<(u32, u64)>>,
    totals: Mutex<ApplyState>,
    die_after: Option<u64>,
    bytes: AtomicU64,
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
    refused: &(dyn Fn(SocketAddr, &WireError) + Sync),
) -> Result<DestReport, ReceiveError> {
    let links: std::sync::Arc<Mutex<Vec<(u32, TcpStream)>>> = Default::default();
    let evict_from = links.clone();
    // A page still busy when its resend arrives is held by a link the source has given up on: drop that link.
    let evict = move |link: u32| {
        for (k, s) in evict_from.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if *k == link {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    };
    let shared = Shared {
        rx: Receiver::new(guest.memory()).with_evict(evict),
        session: hello.session,
        stop: AtomicBool::new(false),
        links,
        received: Mutex::new(Vec::new()),
        totals: Mutex::new(ApplyState::default()),
        die_after: opts.die_after_bytes,
        bytes: AtomicU64::new(0),
    };
    let (tx, msgs) = crossbeam::channel::unbounded::<Msg>();
    // The Hello was read with a short timeout; from here silence is judged by the control loop, which counts data.
    control.set_read_timeout(None).map_err(WireError::from)?;
    for l in listeners {
        l.set_nonblocking(true).map_err(WireError::from)?;
    }
    let outcome = std::thread::scope(|s| {
        let (shared, chunks) = (&shared, &hello.chunks);
        let spawn = |name: &str| std::thread::Builder::new().name(name.to_string());
        // Faulting fresh memory in (the kernel zeroes each page) costs more than copying data into it, and would
        // otherwise stall the apply threads; a helper faults the chunks round 0 will fill, ahead of the pages.
        spawn("lm-prefault")
            .spawn_scoped(s, move || {
                chunks.for_each_run(|run| {
                    for c in run.first..run.first + run.count {
                        if shared.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        guest.memory().prefault(c * wire::CHUNK_PAGES, wire::CHUNK_PAGES);
                    }
                });
            })
            .map_err(WireError::from)?;
        let t = tx.clone();
        spawn("lm-accept")
            .spawn_scoped(s, move || accept_links(s, listeners, shared, &t, refused))
            .map_err(WireError::from)?;
        let t = tx.clone();
        spawn("lm-control")
            .spawn_scoped(s, move || {
                let mut buf = Vec::new();
                loop {
                    let r = wire::read_frame(&mut &*control, &mut buf).map(|h| (h, std::mem::take(&mut buf)));
                    let end = r.is_err();
                    if t.send(Msg::Control(r)).is_err() || end {
                        return;
                    }
                }
            })
            .map_err(WireError::from)?;
        let result = control_loop(control, guest, shared, &msgs, opts);
        // Stop every helper and data thread before the guest may run: a late write from a dead link's thread must
        // not land in memory the resumed guest owns.
        shared.stop.store(true, Ordering::SeqCst);
        for (_, l) in shared.links.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = l.shutdown(Shutdown::Both);
        }
        let _ = control.shutdown(Shutdown::Read);
        result
    });
    for l in listeners {
        let _ = l.set_nonblocking(false);
    }
    let full_verify = outcome?;
    // Every data thread has been joined: resume, then tell the source.
    guest.vcpus().resume();
    let resumed_at = Instant::now();
    let mut w = control;
    wire::write_frame(&mut w, Kind::Committed, 0, 0, &[]).map_err(WireError::from)?;
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
        resumed_at,
        full_verify,
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
                let table_root = shared.rx.root();
                let memory_root = if want.full { memory_root(guest.memory())? } else { 0 };
                let equal = table_root == want.table_root && (!want.full || memory_root == want.memory_root);
                verified = equal.then_some(want.full);
                let v = Verified { equal, table_root, memory_root };
                wire::write_frame(&mut w, Kind::Verified, 0, 0, &[&v.encode()]).map_err(WireError::from)?;
            }
            Kind::Commit => return verified.ok_or(ReceiveError::CommitBeforeVerify),
            Kind::Abort => return Err(WireError::PeerAbort(wire::decode_reason(&body)).into()),
            got => return Err(WireError::Unexpected { got, expected: "a control frame" }.into()),
        }
    }
}

/// Accepts data links on every listener until the migration ends, each on its own thread.
fn accept_links<'s, 'e: 's>(
    s: &'s std::thread::Scope<'s, 'e>,
    listeners: &'e [&'e TcpListener],
    shared: &'s Shared<'e>,
    tx: &crossbeam::channel::Sender<Msg>,
    refused: &'e (dyn Fn(SocketAddr, &WireError) + Sync),
) {
    while !shared.stop.load(Ordering::SeqCst) {
        let mut idle = true;
        for l in listeners {
            match l.accept() {
                Ok((stream, peer)) => {
                    idle = false;
                    let link_tx = tx.clone();
                    let spawned = std::thread::Builder::new()
                        .name("lm-data".into())
                        .spawn_scoped(s, move || data_link(stream, peer, shared, &link_tx, refused));
                    if let Err(e) = spawned {
                        let _ = tx.send(Msg::Fatal(WireError::Io(e).into()));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
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

/// One data link: checks its session, then applies and acknowledges Pages frames until it closes. A link that dies
/// just ends; bad data is fatal to the migration.
fn data_link(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared<'_>,
    tx: &crossbeam::channel::Sender<Msg>,
    refused: &(dyn Fn(SocketAddr, &WireError) + Sync),
) {
    let mut body = Vec::new();
    let first = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(HELLO_TIMEOUT)))
        .map_err(WireError::from)
        .and_then(|()| wire::read_frame(&mut &stream, &mut body))
        .and_then(|h| match h.kind {
            Kind::LinkHello => wire::decode_link_hello(&body),
            got => Err(WireError::Unexpected { got, expected: "LinkHello" }),
        })
        .and_then(
            |(session, link)| {
                if session == shared.session {
                    Ok(link)
                } else {
                    Err(WireError::WrongSession { got: session })
                }
            },
        );
    let link = match first {
        Ok(link) => link,
        Err(e) => {
            refused(peer, &e);
            let mut w = &stream;
            let _ = wire::write_frame(&mut w, Kind::Abort, 0, 0, &[e.to_string().as_bytes()]);
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_nodelay(true);
    if let Ok(c) = stream.try_clone() {
        shared.links.lock().unwrap_or_else(|e| e.into_inner()).push((link, c));
    }
    // The list may have been closed just before this link was added to it.
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let mut st = ApplyState::default();
    let mut frame = FrameBuffers::default();
    let mut received = 0u64;
    let (mut r, mut w) = (&stream, &stream);
    let result = loop {
        let (raw, h) = match wire::read_header(&mut r) {
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
        // thread may be holding a page lock that other links wait for (see read_pages).
        let _ = stream.set_read_timeout(Some(MID_FRAME_TIMEOUT));
        let read = read_pages(&mut r, &raw, &h, link, &shared.rx, &mut st, &mut frame);
        let _ = stream.set_read_timeout(None);
        match read {
            Ok(()) => {}
            Err(None) => break Ok(()),
            Err(Some(e)) => break Err(e),
        }
        let ack = wire::encode_ack(len, frame.entries.len() as u32);
        if wire::write_frame(&mut w, Kind::Ack, h.epoch, h.seq, &[&ack]).is_err() {
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
    if let Err(e) = result {
        let killed = matches!(e, ReceiveError::Killed(_));
        // Reported before the link closes: the close may make the source drop the control connection, and the
        // control loop must learn the real reason first.
        let _ = tx.send(Msg::Fatal(e));
        if killed {
            // As a killed process would: every connection drops at once.
            for (_, l) in shared.links.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = l.shutdown(Shutdown::Both);
            }
        }
    }
    // The link is done either way; its clone in `links` must not keep the connection open.
    let _ = stream.shutdown(Shutdown::Both);
}

/// How long a data link may stall in the middle of a frame before it counts as dead. Raw pages are read into guest
/// memory with the pages marked busy, so a link that dies mid-frame would otherwise keep them busy for good; past
/// this, the link is dropped, the marks cleared, and the source sends the frame again on another link (half-written
/// pages are rewritten whole, as the batch was not acknowledged). A resend that finds a page busy does not wait for
/// this: it has the stalled link dropped at once (see `Receiver::with_evict`). So this only needs to be longer than
/// any stall the source itself tolerates (its link timeout, 3 s by default, and the 2 s pause bound).
const MID_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

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
    r: &mut &TcpStream,
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

/// How long a new connection has to present its Hello. A livemig source sends it right after connecting.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections on `listener` until one opens with a valid Hello, and returns it. A connection that does not
/// (a stranger, a port scanner, a wrong version, one that says nothing) is reported to `refused` and closed. Each
/// connection's Hello is read on its own thread, so a silent stranger cannot hold up the real source.
pub fn accept_migration(
    listener: &std::net::TcpListener,
    opts: &DestOptions,
    refused: &dyn Fn(std::net::SocketAddr, &WireError),
) -> std::io::Result<(TcpStream, Hello)> {
    let (tx, rx) = crossbeam::channel::unbounded::<Result<(TcpStream, Hello), (std::net::SocketAddr, WireError)>>();
    let hello_opts = DestOptions { idle_timeout: HELLO_TIMEOUT.min(opts.idle_timeout), ..opts.clone() };
    // Non-blocking accept, so that this loop also sees the readers' results. Readers are detached threads that end on
    // their own within HELLO_TIMEOUT; once a source is found, nobody takes their results.
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
                let (tx, hello_opts) = (tx.clone(), hello_opts.clone());
                std::thread::spawn(move || {
                    let hello = stream
                        .set_nonblocking(false)
                        .map_err(WireError::from)
                        .and_then(|()| read_hello(&stream, &hello_opts));
                    match hello {
                        Ok(hello) => {
                            let _ = stream.set_nodelay(true);
                            let _ = tx.send(Ok((stream, hello)));
                        }
                        Err(e) => {
                            let mut w = &stream;
                            let _ = wire::write_frame(&mut w, Kind::Abort, 0, 0, &[e.to_string().as_bytes()]);
                            let _ = tx.send(Err((peer, e)));
                        }
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Wakes as soon as a reader reports; else polls accept again in 5 ms.
                match rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(Ok(hit)) => break Ok(hit),
                    Ok(Err((peer, e))) => refused(peer, &e),
                    Err(_) => {}
                }
            }
            Err(e) => break Err(e),
        }
    };
    listener.set_nonblocking(false)?;
    found
}
