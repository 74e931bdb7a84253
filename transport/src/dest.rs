//! The destination driver: accepts a migration on one connection and applies it to a fresh guest.
//!
//! One thread reads frames in order, checks each (header, checksum, body structure, then every page entry against
//! the layout), applies its pages through the engine's [`Receiver`] and acknowledges it. The guest is built from the
//! source's Hello by the caller's factory, kept paused, restored from the vCPU state, verified, and resumed only on
//! Commit. Any bad input ends the migration with a typed error and an Abort frame to the source; it never panics.

use crate::wire::{self, Hello, Kind, Verified, Verify, WireError, HEADER_LEN};
use livemig_engine::encode::{memory_root, PageCounts};
use livemig_engine::guest::{Guest, GuestError};
use livemig_engine::receive::{ApplyError, Receiver};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why the destination gave up on a migration. The source keeps its guest.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The connection or a frame was bad.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// A page entry could not be applied.
    #[error("{0}")]
    Apply(#[from] ApplyError),
    /// The destination guest could not be built, restored or resumed.
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
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
    /// The source asked to commit before the digests were found equal.
    #[error("commit requested before a successful verification")]
    CommitBeforeVerify,
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
    /// Bytes read from the connection.
    pub bytes_received: u64,
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
            die_after_bytes: None,
        }
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

/// Runs a migration whose Hello has been read: builds the guest with `make_guest`, applies everything the source
/// sends, and returns the running guest after Commit.
pub fn receive<G: Guest>(
    stream: &TcpStream,
    hello: Hello,
    make_guest: impl FnOnce(&Hello) -> Result<G, GuestError>,
    opts: &DestOptions,
) -> Result<(G, DestReport), ReceiveError> {
    let result: Result<(G, DestReport), ReceiveError> = (|| {
        let asked = hello.layout.total_bytes();
        if asked > opts.max_memory {
            return Err(ReceiveError::TooLarge { asked, max: opts.max_memory });
        }
        let guest = make_guest(&hello)?;
        let mut w = stream;
        wire::write_frame(&mut w, Kind::HelloAck, 0, 0, &[&hello.session.to_le_bytes()]).map_err(WireError::from)?;
        let stop = AtomicBool::new(false);
        let report = std::thread::scope(|s| {
            let (guest, chunks, stop) = (&guest, &hello.chunks, &stop);
            // Faulting fresh memory in (the kernel zeroes each page) costs more than copying data into it, and would
            // otherwise stall the apply loop; a helper thread does it ahead of the pages, in the order they come.
            let _ = std::thread::Builder::new().name("lm-prefault".into()).spawn_scoped(s, move || {
                chunks.for_each_run(|run| {
                    for c in run.first..run.first + run.count {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        guest.memory().prefault(c * wire::CHUNK_PAGES, wire::CHUNK_PAGES);
                    }
                });
            });
            let r = apply_stream(stream, guest, hello.clone(), opts);
            stop.store(true, Ordering::Relaxed);
            r
        })?;
        Ok((guest, report))
    })();
    if let Err(e) = &result {
        if matches!(e, ReceiveError::Killed(_)) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return result;
        }
        // Best effort: the source may be gone already.
        let mut w = stream;
        let _ = wire::write_frame(&mut w, Kind::Abort, 0, 0, &[e.to_string().as_bytes()]);
    }
    result
}

fn apply_stream(
    stream: &TcpStream,
    guest: &dyn Guest,
    hello: Hello,
    opts: &DestOptions,
) -> Result<DestReport, ReceiveError> {
    stream.set_read_timeout(Some(opts.idle_timeout)).map_err(WireError::from)?;
    let mut rx = Receiver::new(guest.memory());
    let mut body = Vec::new();
    let mut entries = Vec::new();
    let mut received = 0u64;
    let mut verified = false;
    let mut full_verify = false;
    // Unbuffered: a buffer would add a copy of every page; frames are large enough that two reads each are cheap.
    let mut r = stream;
    let mut w = stream;
    loop {
        let h = match wire::read_frame(&mut r, &mut body) {
            Err(WireError::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                return Err(WireError::Io(std::io::Error::new(
                    e.kind(),
                    format!("source silent for {:?}", opts.idle_timeout),
                ))
                .into())
            }
            other => other?,
        };
        received += (HEADER_LEN + body.len()) as u64;
        if opts.die_after_bytes.is_some_and(|n| received >= n) {
            return Err(ReceiveError::Killed(received));
        }
        match h.kind {
            Kind::Pages => {
                let payload = wire::decode_pages(&h, &body, &mut entries)?;
                // Check the whole frame before applying any of it, so a bad frame changes nothing.
                for e in &entries {
                    rx.check_entry(e)?;
                }
                let mut off = 0;
                for e in &entries {
                    let len = e.len as usize;
                    rx.apply(h.epoch, e, &payload[off..off + len])?;
                    off += len;
                }
                let ack = wire::encode_ack((HEADER_LEN + body.len()) as u64, entries.len() as u32);
                wire::write_frame(&mut w, Kind::Ack, h.epoch, h.seq, &[&ack]).map_err(WireError::from)?;
            }
            Kind::VcpuState => {
                guest.vcpus().restore_state(&body)?;
                wire::write_frame(&mut w, Kind::StateAck, 0, 0, &[]).map_err(WireError::from)?;
            }
            Kind::Verify => {
                let want = Verify::decode(&body)?;
                let table_root = rx.root();
                let memory_root = if want.full { memory_root(guest.memory())? } else { 0 };
                let equal = table_root == want.table_root && (!want.full || memory_root == want.memory_root);
                verified = equal;
                full_verify = want.full;
                let v = Verified { equal, table_root, memory_root };
                wire::write_frame(&mut w, Kind::Verified, 0, 0, &[&v.encode()]).map_err(WireError::from)?;
            }
            Kind::Commit => {
                if !verified {
                    return Err(ReceiveError::CommitBeforeVerify);
                }
                guest.vcpus().resume();
                let resumed_at = Instant::now();
                wire::write_frame(&mut w, Kind::Committed, 0, 0, &[]).map_err(WireError::from)?;
                let _ = w.flush();
                return Ok(DestReport {
                    hello,
                    pages: rx.counts,
                    stale: rx.stale,
                    bytes_received: received,
                    resumed_at,
                    full_verify,
                });
            }
            Kind::Abort => return Err(WireError::PeerAbort(wire::decode_reason(&body)).into()),
            got => return Err(WireError::Unexpected { got, expected: "a source frame" }.into()),
        }
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
