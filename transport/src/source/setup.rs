//! Opening a migration: the dirty log cleared and the populated pages read, the handshake on the control
//! connection, the data links connected and presented; and the control connection's reader.

use super::reconnect::Dial;
use super::Links;
use super::{Event, MigrateError, SourceOptions, CONNECT_TIMEOUT};
use crate::link::data::DataLink;
use crate::stream::Stream;
use crate::tls::{self, Conn, SourceSecurity};
use crate::uring::{Ring, RingIo};
use crate::wire::{self, postcopy, Hello, Kind, Verified, WireError};
use crossbeam::channel::Sender;
use livemig_engine::dirty::Bitmap;
use livemig_engine::encode::SendPath;
use livemig_engine::guest::Guest;
use livemig_engine::precopy::PostcopyMode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Clears the dirty log, then reads which pages may be non-zero: every write after the clear is harvested later, and
/// a page outside the result was never populated, so reads as zero.
pub(super) fn start_logging(guest: &dyn Guest) -> Result<Bitmap, MigrateError> {
    let mem = guest.memory();
    let mut scratch = Bitmap::new(mem.total_pages());
    guest.dirty_log().harvest(&mut scratch)?;
    Ok(mem.maybe_nonzero()?)
}

/// Opens the migration on the control connection; returns the Hello's round-trip time.
pub(super) fn handshake(
    guest: &dyn Guest,
    stream: &Conn,
    opts: &SourceOptions,
    written: &AtomicU64,
    initial: &Bitmap,
) -> Result<Duration, MigrateError> {
    let sent = Instant::now();
    let hello = Hello {
        session: opts.session,
        layout: guest.memory().layout(),
        vcpus: guest.vcpu_count(),
        guest_kind: guest.kind().to_string(),
        chunks: wire::chunk_map(initial),
        cpu: opts.vm_cpu.clone(),
        macs: opts.macs.clone(),
    };
    let body = hello.encode();
    let sock = stream.stream();
    sock.set_write_timeout(Some(opts.precopy.peer_timeout)).map_err(|e| MigrateError::Handshake(e.into()))?;
    let n = wire::write_control(stream, Kind::Hello, &body).map_err(|e| MigrateError::Handshake(e.into()))?;
    written.fetch_add(n as u64, Ordering::Relaxed);
    sock.set_read_timeout(Some(opts.precopy.peer_timeout)).map_err(|e| MigrateError::Handshake(e.into()))?;
    let mut buf = Vec::new();
    let h = wire::read_frame(&mut &*stream, &mut buf).map_err(MigrateError::Handshake)?;
    // The Hello's answer also waited for the destination to admit the connection and build its guest; the
    // switchover's round trips are the network's.
    let rtt = crate::link::tcp_rtt(sock).map_or(sent.elapsed(), |k| k.min(sent.elapsed()));
    match h.kind {
        Kind::HelloAck => {
            let wire::HelloAck { session, dest } = wire::HelloAck::decode(&buf).map_err(MigrateError::Handshake)?;
            if session != opts.session {
                return Err(MigrateError::Handshake(WireError::Malformed {
                    kind: Kind::HelloAck,
                    why: format!("session {session:#x} echoed, {:#x} sent", opts.session),
                }));
            }
            if let (Some(why), true) = (&dest.postcopy_unavailable, opts.precopy.postcopy != PostcopyMode::Off) {
                let e = MigrateError::Machine(format!(
                    "the destination cannot take post-copy ({why}); migrate with --postcopy off, or fix the \
                     destination"
                ));
                let _ = wire::write_abort(stream, &e.to_string());
                return Err(e);
            }
            if let Some(vm) = &opts.manifest {
                let failures = livemig_engine::preflight::check(vm, &dest);
                if !failures.is_empty() {
                    let e = MigrateError::Preflight(failures);
                    let _ = wire::write_abort(stream, &e.to_string());
                    return Err(e);
                }
            }
        }
        Kind::Abort => return Err(MigrateError::Handshake(WireError::PeerAbort(wire::decode_reason(&buf)))),
        got => return Err(MigrateError::Handshake(WireError::Unexpected { got, expected: "HelloAck" })),
    }
    // From here the control reader blocks on the socket; stalls are detected by the driver's clock instead.
    sock.set_read_timeout(None).map_err(|e| MigrateError::Handshake(e.into()))?;
    let _ = sock.set_nodelay(true);
    Ok(rtt)
}

/// The data links, why any could not be used (by index), their ring (`--send-path uring`), and how to dial each
/// again (None for a stream the caller connected).
pub(super) type DataLinks = (Vec<DataLink>, Vec<Option<String>>, Option<Ring>, Vec<Option<Dial>>);

/// Connects the data links (or takes the caller's) and presents the session on each (under TLS: a handshake of its
/// own, and the proof that binds it to the control connection's session). A link that cannot connect is kept,
/// failed, so the report shows it; the migration needs at least one.
pub(super) fn connect_links(
    control: &Conn,
    links: Links,
    opts: &SourceOptions,
    security: &SourceSecurity,
) -> Result<DataLinks, MigrateError> {
    let handshake_error = |e: std::io::Error| MigrateError::Handshake(e.into());
    let ring = match opts.send_path {
        Some(SendPath::Uring) => Some(Ring::new("lm-uring").map_err(|e| MigrateError::Link(WireError::Io(e)))?),
        _ => None,
    };
    let ring_io = ring.as_ref().map(Ring::io);
    // Each link's name, how to dial it, and the caller's stream if it gave one: links connect one by one, in order.
    let mut openers: Vec<(String, Option<Dial>, Option<Stream>)> = Vec::new();
    match links {
        Links::Connect(specs) if specs.is_empty() => {
            let peer = control.stream().peer_address().map_err(handshake_error)?;
            let name = peer.to_string();
            openers.push((name, Some(Arc::new(move || peer.connect(CONNECT_TIMEOUT))), None));
        }
        Links::Connect(specs) => {
            for spec in specs {
                let name = spec.name();
                openers.push((name, Some(Arc::new(move || spec.connect(CONNECT_TIMEOUT).map(Stream::Tcp))), None));
            }
        }
        Links::Streams(streams) => {
            for (i, s) in streams.into_iter().enumerate() {
                let name = s.peer().map_or_else(|_| format!("stream {i}"), |p| format!("stream {i} to {p}"));
                openers.push((name, None, Some(s)));
            }
        }
    }
    if openers.is_empty() {
        return Err(MigrateError::AllLinksFailed("no data link given".into()));
    }
    let (mut links, mut errors, mut dials) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_error = String::new();
    for (i, (name, dial, given)) in openers.into_iter().enumerate() {
        let stream = match (given, &dial) {
            (Some(s), _) => Ok(s),
            (None, Some(d)) => d().map_err(|e| e.to_string()),
            (None, None) => Err("nothing to connect".to_string()),
        };
        let index = livemig_engine::num::u32_len(i);
        let opened = stream.and_then(|stream| {
            present_link(stream, security, opts.session, control.binding(), index, ring_io.as_ref())
        });
        match opened {
            Ok(stream) => {
                links.push(DataLink::new(name, stream));
                errors.push(None);
            }
            Err(e) => {
                last_error = e;
                // A placeholder that is failed from the start keeps link indices and report rows in --link order.
                let (a, _b) = std::os::unix::net::UnixStream::pair().map_err(handshake_error)?;
                let l = DataLink::new(name, Conn::plain(a));
                l.fail();
                links.push(l);
                errors.push(Some(last_error.clone()));
            }
        }
        dials.push(dial);
    }
    if errors.iter().all(Option::is_some) {
        return Err(MigrateError::AllLinksFailed(last_error));
    }
    Ok((links, errors, ring, dials))
}

/// Presents a new data link: its TLS handshake, then the LinkHello with the session, the link's index and (under
/// TLS) the proof of the control session whose binding secret is `binding`.
pub(super) fn present_link(
    stream: Stream,
    security: &SourceSecurity,
    session: u64,
    binding: Option<&[u8; 32]>,
    index: u32,
    ring: Option<&RingIo>,
) -> Result<Conn, String> {
    let conn = tls::connect(stream, security, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
    let proof = binding.zip(conn.binding()).map(|(c, l)| tls::link_proof(c, l));
    let hello = wire::LinkHello { session, link: index, proof };
    wire::write_control(&conn, Kind::LinkHello, &hello.encode()).map_err(|e| e.to_string())?;
    Ok(match ring {
        Some(io) => conn.with_ring(io.clone(), Some(crate::link::WRITE_TIMEOUT)),
        None => conn,
    })
}

/// Reads the control connection (of `generation`: 0 for the first, one more for each post-copy reconnected) and
/// hands the driver what arrives, until it fails, closes, or Committed comes.
pub(super) fn control_loop(r: &Conn, ev: &Sender<Event>, done: &AtomicBool, pages: u64, generation: u32) {
    let mut buf = Vec::new();
    let mut r = r;
    loop {
        let h = match wire::read_frame(&mut r, &mut buf) {
            Ok(h) => h,
            Err(e) => {
                if !done.load(Ordering::SeqCst) {
                    let _ = ev.send(Event::ControlEnded(generation, MigrateError::Link(e)));
                }
                return;
            }
        };
        let event = match h.kind {
            Kind::StateAck => Event::StateAck,
            Kind::Verified => match Verified::decode(&buf) {
                Ok(v) => Event::Verified(v),
                Err(e) => Event::ControlFailed(MigrateError::Link(e)),
            },
            Kind::Committed => Event::Committed,
            Kind::Switched => Event::Switched,
            Kind::MissingAck => Event::MissingAck,
            Kind::PageRequest => match postcopy::decode_request(&buf, pages) {
                Ok(p) => Event::PageRequest(p),
                Err(e) => Event::ControlFailed(MigrateError::Link(e)),
            },
            Kind::PostcopyStats => match postcopy::decode_stats(&buf) {
                Ok(s) => Event::PostcopyStats(s),
                Err(e) => Event::ControlFailed(MigrateError::Link(e)),
            },
            Kind::Abort => Event::ControlFailed(MigrateError::Link(WireError::PeerAbort(wire::decode_reason(&buf)))),
            got => {
                Event::ControlFailed(MigrateError::Link(WireError::Unexpected { got, expected: "a control answer" }))
            }
        };
        let stop = matches!(event, Event::ControlFailed(_) | Event::Committed);
        if ev.send(event).is_err() || stop {
            return;
        }
    }
}
