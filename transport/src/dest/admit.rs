//! Admission: telling a source from a stranger before anything is allocated for it, refusing with an Abort that says
//! why, and bounding what a flood of connections can cost (threads, descriptors, time).

use super::{DestOptions, ReceiveError, HELLO_TIMEOUT};
use crate::stream::{Listen, Peer, Stream};
use crate::tls::{self, Conn, DestSecurity};
use crate::wire::{self, Deadline, Hello, Kind, WireError};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connections that have not yet presented a Hello, all peers together.
pub const MAX_PENDING: usize = 64;
/// Connections that have not yet presented a Hello or LinkHello, from one peer address.
pub const MAX_PENDING_PER_PEER: usize = 8;

/// Whether an `accept` error is the kind that passes (a connection reset before it was accepted, a descriptor or
/// buffer shortage, a signal): the listener is fine, and the next accept may work.
pub(super) fn transient_accept_error(e: &std::io::Error) -> bool {
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
pub(super) const ACCEPT_RETRY: Duration = Duration::from_millis(20);

/// Writes an Abort naming `e` on a connection that is being refused (sealed, once its TLS handshake is done).
/// Bounded, and best effort.
pub(super) fn refuse(conn: &Conn, e: &ReceiveError) {
    let _ = conn.stream().set_write_timeout(Some(Duration::from_millis(500)));
    let _ = wire::write_abort(conn, &e.to_string());
}

/// Counts connections still presenting themselves, in all and per peer address, and refuses past the caps.
#[derive(Debug, Default)]
pub(super) struct Admission {
    pending: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A connection's place in the [`Admission`] count, given back when dropped.
pub(super) struct Ticket {
    adm: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Ticket> {
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
pub fn read_hello(conn: &Conn, opts: &DestOptions) -> Result<Hello, WireError> {
    let mut buf = Vec::new();
    let mut d = Deadline::new(conn, Instant::now() + HELLO_TIMEOUT.min(opts.idle_timeout), "Hello");
    let h = wire::read_frame(&mut d, &mut buf)?;
    conn.stream().set_read_timeout(None)?;
    match h.kind {
        Kind::Hello => Hello::decode(&buf),
        Kind::Abort => Err(WireError::PeerAbort(wire::decode_reason(&buf))),
        got => Err(WireError::Unexpected { got, expected: "Hello" }),
    }
}

/// Waits on `listener` for a source whose Hello this destination accepts, and returns its control connection and
/// Hello. Under [`DestSecurity::Mtls`] each connection first completes a mutual TLS handshake (within
/// [`HELLO_TIMEOUT`]): one without a certificate the CA signed never gets to say Hello. Every other connection is
/// refused with an Abort naming why (or, at the handshake, a TLS alert), reported to `refused`, and closed, and the
/// wait goes on: a stranger, a wrong version, one that says nothing for [`HELLO_TIMEOUT`], a guest over
/// [`DestOptions::max_memory`], a CPU model this host lacks, and a second source that finishes its Hello after the one
/// admitted (it is told the destination is busy). Each Hello is read on its own thread, so a silent stranger cannot
/// hold up the real source; those threads are capped ([`MAX_PENDING`], [`MAX_PENDING_PER_PEER`]) and each ends
/// within [`HELLO_TIMEOUT`], after this returns if need be. Transient accept errors (out of descriptors, a reset
/// connection) are retried.
pub fn accept_migration<L: Listen>(
    listener: &L,
    opts: &DestOptions,
    security: &DestSecurity,
    refused: &(dyn Fn(&Peer, &ReceiveError) + Sync),
) -> std::io::Result<(Conn, Hello)> {
    type Found = Result<(Conn, Hello), (Peer, ReceiveError)>;
    let refused = &|peer: &Peer, e: &ReceiveError| {
        tracing::warn!(%peer, error = %e, "connection refused");
        refused(peer, e);
    };
    let (tx, rx) = crossbeam::channel::unbounded::<Found>();
    // Set by the first reader whose Hello is accepted; any later one is told the destination is busy.
    let taken = Arc::new(AtomicBool::new(false));
    let admission = Arc::new(Admission::default());
    listener.set_nonblocking(true)?;
    // Starts a reader for a new connection, or refuses it when too many are waiting already.
    let start_reader = |stream: Stream, peer: Peer| {
        let Some(ticket) = admission.admit(peer.ip(), MAX_PENDING) else {
            let e = ReceiveError::TooManyConnections("waiting to present a Hello");
            refuse(&Conn::plain(stream), &e);
            refused(&peer, &e);
            return;
        };
        let (tx, taken, opts, security) = (tx.clone(), taken.clone(), opts.clone(), security.clone());
        let who = peer.clone();
        let spawned = std::thread::Builder::new().name("lm-hello".into()).spawn(move || {
            let _ticket = ticket;
            let _ = tx.send(hello_of(stream, &security, &opts, &taken).map_err(|e| (peer, e)));
        });
        if let Err(e) = spawned {
            refused(&who, &ReceiveError::Wire(WireError::Io(e)));
        }
    };
    let found = loop {
        match rx.try_recv() {
            Ok(Ok(hit)) => break Ok(hit),
            Ok(Err((peer, e))) => {
                refused(&peer, &e);
                continue;
            }
            Err(_) => {}
        }
        match listener.accept_stream() {
            Ok((stream, peer)) => start_reader(stream, peer),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Wakes as soon as a reader reports; else polls accept again in 5 ms.
                match rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(Ok(hit)) => break Ok(hit),
                    Ok(Err((peer, e))) => refused(&peer, &e),
                    Err(_) => {}
                }
            }
            Err(e) if transient_accept_error(&e) => std::thread::sleep(ACCEPT_RETRY),
            Err(e) => break Err(e),
        }
    };
    // Readers that finish later find `taken` set (by the winner) and tell their source the destination is busy; on
    // an accept error nobody won, so close the door for them here. Connections already waiting in the backlog get
    // such a reader too (as many as may wait at once, so that a flood cannot keep this from returning), so that a
    // source that arrived before this returns hears why it was not taken.
    taken.store(true, Ordering::SeqCst);
    for _ in 0..MAX_PENDING {
        let Ok((stream, peer)) = listener.accept_stream() else { break };
        start_reader(stream, peer);
    }
    for r in rx.try_iter() {
        if let Err((peer, e)) = r {
            refused(&peer, &e);
        }
    }
    listener.set_nonblocking(false)?;
    found
}

/// Reads a connection's Hello (within [`HELLO_TIMEOUT`]) and checks it against this destination; a refused one gets
/// an Abort that says why. For a caller that serves one known source (as `livemig demo` does); a listener open to a
/// network should use [`accept_migration`].
pub fn admit(
    stream: impl Into<Stream>,
    opts: &DestOptions,
    security: &DestSecurity,
) -> Result<(Conn, Hello), ReceiveError> {
    let stream = stream.into();
    stream.set_nonblocking(false).map_err(WireError::from)?;
    let conn = tls::accept(stream, security, HELLO_TIMEOUT)?;
    match read_checked_hello(&conn, opts) {
        Ok(h) => Ok((conn, h)),
        Err(e) => {
            refuse(&conn, &e);
            Err(e)
        }
    }
}

fn read_checked_hello(conn: &Conn, opts: &DestOptions) -> Result<Hello, ReceiveError> {
    conn.stream().set_nonblocking(false).map_err(WireError::from)?;
    let hello = read_hello(conn, opts)?;
    opts.check(&hello)?;
    let _ = conn.stream().set_nodelay(true);
    Ok(hello)
}

/// One connection of those waiting at the door: its TLS handshake, then its Hello, read and checked; a refusal after
/// the handshake is told to the source.
fn hello_of(
    stream: Stream,
    security: &DestSecurity,
    opts: &DestOptions,
    taken: &AtomicBool,
) -> Result<(Conn, Hello), ReceiveError> {
    let conn = tls::accept(stream, security, HELLO_TIMEOUT)?;
    match admit_source(&conn, opts, taken) {
        Ok(h) => Ok((conn, h)),
        Err(e) => {
            refuse(&conn, &e);
            Err(e)
        }
    }
}

/// Reads and checks one connection's Hello; the first accepted one takes the destination.
fn admit_source(conn: &Conn, opts: &DestOptions, taken: &AtomicBool) -> Result<Hello, ReceiveError> {
    let hello = read_checked_hello(conn, opts)?;
    if taken.swap(true, Ordering::SeqCst) {
        return Err(ReceiveError::Busy);
    }
    Ok(hello)
}
