//! A migration's data links: accepting every connection on the data listeners, checking that it presents the
//! session, and reading, checking, applying and acknowledging its Pages frames. Bad data ends the link it came on.

use super::admit::{refuse, transient_accept_error, Ticket, ACCEPT_RETRY};
use super::{Msg, ReceiveError, Shared, HELLO_TIMEOUT, WRITE_TIMEOUT};
use crate::stream::{Listen, Peer, Stream};
use crate::tls::{self, Conn};
use crate::wire::{self, Deadline, Header, Kind, WireError, HEADER_LEN};
use livemig_engine::encode::PageEntry;
use livemig_engine::num::u32_len;
use livemig_engine::receive::{ApplyError, ApplyState, InPlaceError};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Accepts connections on every listener until the migration stops, each on its own thread.
pub(super) fn accept_links<'s, 'e: 's, L: Listen>(
    s: &'s std::thread::Scope<'s, 'e>,
    listeners: &'e [&'e L],
    shared: &'s Shared<'e>,
    tx: &crossbeam::channel::Sender<Msg>,
    refused: &'e (dyn Fn(&Peer, &ReceiveError) + Sync),
) {
    while !shared.stop.load(Ordering::SeqCst) {
        let mut idle = true;
        for l in listeners {
            match l.accept_stream() {
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
                            refuse(&Conn::plain(stream), &e);
                            refused(&peer, &e);
                            continue;
                        }
                    };
                    let link_tx = tx.clone();
                    let who = peer.clone();
                    let spawned = std::thread::Builder::new().name("lm-data".into()).spawn_scoped(s, move || {
                        let _live = live;
                        data_link(stream, peer, owner, ticket, shared, &link_tx, refused)
                    });
                    if let Err(e) = spawned {
                        // The connection's socket and count went with the closure; the migration goes on.
                        refused(&who, &ReceiveError::Wire(WireError::Io(e)));
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

/// What a new connection on the migration's listeners presented itself as.
enum Presented {
    /// A data link, with its index at the source.
    Link(u32),
    /// The source's new control connection, after post-copy lost the first one.
    Resume,
}

/// Reads a new connection's first frame, within [`HELLO_TIMEOUT`], and says what it is: a data link (LinkHello) or,
/// once post-copy runs, the source's new control connection (Resume). Either must present the session and, under
/// TLS, the proof that it belongs to this migration's first control session. Another source's Hello is told the
/// destination is busy; anything else is refused for what it is.
fn present(conn: &Conn, shared: &Shared<'_>) -> Result<Presented, ReceiveError> {
    let mut body = Vec::new();
    let mut d = Deadline::new(conn, Instant::now() + HELLO_TIMEOUT, "LinkHello");
    let h = wire::read_frame(&mut d, &mut body)?;
    let what = match h.kind {
        Kind::LinkHello => "link",
        Kind::Resume if shared.rx.is_placing() => "control connection",
        Kind::Resume => return Err(ReceiveError::Unbound("a Resume, and no post-copy runs here to resume")),
        Kind::Hello => return Err(ReceiveError::Busy),
        got => return Err(WireError::Unexpected { got, expected: "LinkHello" }.into()),
    };
    let l = wire::LinkHello::decode_as(h.kind, &body)?;
    if l.session != shared.session {
        return Err(WireError::WrongSession { got: l.session }.into());
    }
    if let Some(control) = &shared.binding {
        let (Some(link), Some(proof)) = (conn.binding(), &l.proof) else {
            return Err(ReceiveError::Unbound("it carries no proof of this migration's control session"));
        };
        if !tls::check_link_proof(control, link, proof) {
            tracing::warn!(what, "a connection's proof does not match this migration's control session");
            return Err(ReceiveError::Unbound(
                "its proof does not match this migration's control session (a connection of another session)",
            ));
        }
    }
    Ok(match h.kind {
        Kind::Resume => Presented::Resume,
        _ => Presented::Link(l.link),
    })
}

/// One connection: checks that it presents the session, then applies and acknowledges Pages frames until it closes.
/// A link that dies just ends; bad data ends the link, with an Abort that says why, and not the migration.
fn data_link(
    stream: Stream,
    peer: Peer,
    owner: u32,
    ticket: Ticket,
    shared: &Shared<'_>,
    tx: &crossbeam::channel::Sender<Msg>,
    refused: &(dyn Fn(&Peer, &ReceiveError) + Sync),
) {
    let prepared = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .map_err(|e| ReceiveError::Wire(e.into()));
    let conn = match prepared.and_then(|()| Ok(tls::accept(stream, &shared.security, HELLO_TIMEOUT)?)) {
        Ok(c) => c,
        // Refused at the handshake: a plaintext source was told so in plaintext; a TLS peer got an alert.
        Err(e) => {
            drop(ticket);
            refused(&peer, &e);
            return;
        }
    };
    let presented = present(&conn, shared);
    drop(ticket);
    let link = match presented {
        Ok(Presented::Link(link)) => link,
        Ok(Presented::Resume) => {
            // The control loop takes the connection over; this thread and its place in the count end here (so that
            // stopping the data links at the end leaves it open for Committed).
            tracing::warn!(%peer, "post-copy: the source reconnected its control connection");
            let _ = tx.send(Msg::Resumed(std::sync::Arc::new(conn)));
            return;
        }
        Err(e) => {
            refuse(&conn, &e);
            refused(&peer, &e);
            return;
        }
    };
    let stream = match &shared.ring {
        Some(r) => conn.with_ring(r.io(), Some(WRITE_TIMEOUT)),
        None => conn,
    };
    tracing::info!(%peer, link, sealed = stream.is_sealed(), uring = stream.on_ring(), "data link joined");
    shared.joined.store(true, Ordering::SeqCst);
    let _ = stream.set_read_timeout(None);
    let _ = stream.stream().set_nodelay(true);
    let mut st = ApplyState::default();
    let mut received = 0u64;
    let result = serve_frames(&stream, owner, shared, &mut st, &mut received);
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
            // Pages this link applied before were each checked; any whose bytes landed unchecked is recorded as it is
            // now (the receiver's claims), and what the link held unacknowledged, the source resends.
            tracing::warn!(%peer, link, error = %e, "data link ended for bad data");
            shared.link_error(link, &e);
            refuse(&stream, &e);
            refused(&peer, &e);
        }
    }
    // The link is done either way; its clone in `conns` must not keep the connection open.
    let _ = stream.stream().shutdown(Shutdown::Both);
}

/// Reads, applies and acknowledges a presented link's Pages frames until it closes (Ok) or brings bad data (Err),
/// adding its bytes to `received`.
fn serve_frames(
    stream: &Conn,
    owner: u32,
    shared: &Shared<'_>,
    st: &mut ApplyState,
    received: &mut u64,
) -> Result<(), ReceiveError> {
    let mut frame = FrameBuffers::default();
    loop {
        let (raw, h) = match wire::read_header_after(stream, &|| shared.frame_timeout(), "Pages frame") {
            Ok(x) => x,
            // The link died or was closed: the source sends its batches again elsewhere.
            Err(e) if e.is_link_loss() => return Ok(()),
            Err(e) => return Err(ReceiveError::from(e)),
        };
        let len = (HEADER_LEN as u64) + u64::from(h.len);
        *received += len;
        let total = shared.bytes.fetch_add(len, Ordering::Relaxed) + len;
        if shared.die_after.is_some_and(|n| total >= n) {
            return Err(ReceiveError::Killed(total));
        }
        if h.kind != Kind::Pages {
            return Err(WireError::Unexpected { got: h.kind, expected: "Pages on a data link" }.into());
        }
        // Inside a frame the bytes are already on their way: a frame that stops arriving is a dead link, and this
        // thread may be holding pages busy that other links wait for (see read_pages).
        let mut r = Deadline::new(stream, Instant::now() + shared.frame_timeout(), "Pages frame");
        match read_pages(&mut r, &raw, &h, owner, shared, st, &mut frame) {
            Ok(()) => {}
            Err(None) => return Ok(()),
            Err(Some(e)) => return Err(e),
        }
        let ack = wire::Ack { bytes: len, pages: u32_len(frame.entries.len()) };
        if wire::write_frame(&mut &*stream, Kind::Ack, h.epoch, h.seq, &[&ack.encode()]).is_err() {
            return Ok(());
        }
    }
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
    shared: &Shared<'_>,
    st: &mut ApplyState,
    f: &mut FrameBuffers,
) -> Result<(), Option<ReceiveError>> {
    let fatal = |e: ReceiveError| Some(e);
    let dead_or = |e: WireError| if e.is_link_loss() { None } else { Some(e.into()) };
    f.table.resize(h.checked_len as usize, 0);
    wire::read_part(r, &mut f.table, "entry table").map_err(dead_or)?;
    wire::check_sum(raw, h, &f.table).map_err(|e| fatal(e.into()))?;
    let zstd_len = wire::decode_table(h, &f.table, &mut f.entries).map_err(|e| fatal(e.into()))?;
    let mut waited = Duration::ZERO;
    loop {
        let applied = shared.rx.apply_frame_in_place(h.epoch, &f.entries, zstd_len as usize, link, st, |iov| {
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
        return match applied {
            Ok(()) => Ok(()),
            // A sealed record that failed to open is bad data; any other read error is a lost link.
            Err(InPlaceError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(fatal(WireError::Io(e).into()))
            }
            Err(InPlaceError::Io(_)) => Err(None),
            Err(InPlaceError::Apply(ApplyError::Busy { owner, .. })) => {
                // A resend racing its original: the link reading the page needs a moment, or, if it stays busy, is
                // one the source has given up on (stalled mid-page) and is dropped, which clears its marks.
                std::thread::sleep(BUSY_WAIT);
                waited += BUSY_WAIT;
                if waited >= BUSY_PATIENCE {
                    shared.drop_link(owner);
                    waited = Duration::ZERO;
                }
                continue;
            }
            Err(InPlaceError::Apply(a)) => Err(fatal(a.into())),
        };
    }
}

/// How long a frame that finds a page busy waits before it tries again.
const BUSY_WAIT: Duration = Duration::from_micros(200);
/// How long a frame waits for a busy page before it has the owning link dropped. Only a resend racing its original
/// finds a page busy, and the source resends only what a link it has given up on held.
const BUSY_PATIENCE: Duration = Duration::from_millis(20);
