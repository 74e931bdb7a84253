//! Deadlines per frame rather than per read: a reader that gives a whole frame one deadline, so that a peer that
//! trickles a byte now and then cannot hold a thread for ever, and the frame readers built on it.

use super::{check_sum, read_body, read_full, Header, WireError, HEADER_LEN};
use crate::tls::Conn;
use std::io::Read;

/// A reader that gives a whole frame (or any sequence of reads) one deadline, rather than each read its own timeout:
/// a peer that trickles a byte now and then cannot hold a reader past `deadline`. The socket's read timeout is set
/// to the time left, and lowered again as that shrinks (at most one `setsockopt` per [`DEADLINE_SLACK`] of waiting).
#[derive(Debug)]
pub struct Deadline<'a> {
    conn: &'a Conn,
    at: std::time::Instant,
    what: &'static str,
    /// The read timeout set on the socket, if this reader set one.
    set: Option<std::time::Duration>,
}

/// How far past its deadline a [`Deadline`] read may end.
pub const DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_millis(50);

impl<'a> Deadline<'a> {
    /// Reads from `stream` until `at`; `what` names the wait in the timeout's message.
    pub fn new(conn: &'a Conn, at: std::time::Instant, what: &'static str) -> Self {
        Deadline { conn, at, what, set: None }
    }

    /// Sets the socket's timeout to the time left, when it is more than [`DEADLINE_SLACK`] over it.
    fn arm(&mut self) -> std::io::Result<()> {
        let left = self.at.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{} not complete in time", self.what),
            ));
        }
        if self.set.is_none_or(|s| s > left + DEADLINE_SLACK) {
            self.conn.set_read_timeout(Some(left))?;
            self.set = Some(left);
        }
        Ok(())
    }

    fn timed_out(&self, e: std::io::Error) -> std::io::Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{} not complete in time", self.what))
            }
            _ => e,
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        (&*self.conn).read(buf).map_err(|e| self.timed_out(e))
    }

    fn read_vectored(&mut self, bufs: &mut [std::io::IoSliceMut<'_>]) -> std::io::Result<usize> {
        self.arm()?;
        (&*self.conn).read_vectored(bufs).map_err(|e| self.timed_out(e))
    }
}

/// Reads one frame from `stream`: waits for its first byte without a deadline (between frames a peer may be quiet for
/// long; the caller judges silence), then gives the rest of the frame `within`.
pub fn read_frame_within(
    stream: &Conn,
    body: &mut Vec<u8>,
    within: std::time::Duration,
    what: &'static str,
) -> Result<Header, WireError> {
    read_frame_after(stream, body, &|| within, what)
}

/// [`read_frame_within`] with the time the frame is given asked for when its first byte arrives: a reader waiting
/// for the next frame learns of a change made meanwhile.
pub fn read_frame_after(
    stream: &Conn,
    body: &mut Vec<u8>,
    within: &dyn Fn() -> std::time::Duration,
    what: &'static str,
) -> Result<Header, WireError> {
    let (raw, header) = read_header_after(stream, within, what)?;
    let mut d = Deadline::new(stream, std::time::Instant::now() + within(), what);
    read_body(&mut d, body, header.len as usize)?;
    check_sum(&raw, &header, &body[..header.checked_len as usize])?;
    Ok(header)
}

/// Reads a frame header as [`read_frame_within`] does: the first byte whenever it comes, the rest `within`.
pub fn read_header_within(
    stream: &Conn,
    within: std::time::Duration,
    what: &'static str,
) -> Result<([u8; HEADER_LEN], Header), WireError> {
    read_header_after(stream, &|| within, what)
}

/// [`read_header_within`] with the time asked for when the first byte arrives (see [`read_frame_after`]).
pub fn read_header_after(
    stream: &Conn,
    within: &dyn Fn() -> std::time::Duration,
    what: &'static str,
) -> Result<([u8; HEADER_LEN], Header), WireError> {
    let mut h = [0u8; HEADER_LEN];
    // A previous frame's deadline may have left a timeout on the socket.
    stream.set_read_timeout(None)?;
    if read_full(&mut &*stream, &mut h[..1])? == 0 {
        return Err(WireError::Closed);
    }
    let mut d = Deadline::new(stream, std::time::Instant::now() + within(), what);
    let got = 1 + read_full(&mut d, &mut h[1..])?;
    if got < HEADER_LEN {
        return Err(WireError::Truncated { part: "header", needed: HEADER_LEN, got });
    }
    let header = Header::decode(&h)?;
    Ok((h, header))
}
