//! The zero-copy send path: `sendmsg(MSG_ZEROCOPY)` on a link's socket, and its completions from the error queue.
//!
//! Why `MSG_ZEROCOPY` and not io_uring's `SendZc`: a Pages frame is a header, an entry table and a batch's guest
//! pages in runs, which one `sendmsg` takes as iovecs; `SendZc` sends one buffer per request, and its fixed-buffer form
//! would mean registering all of guest memory, whose registrations are capped at 1 GiB each and pinned for the whole
//! migration. `MSG_ZEROCOPY` pins only the pages in flight, needs no ring or extra crate, and runs on the link's writer
//! thread as the other paths do. QEMU's multifd `zero-copy-send` made the same choice.
//!
//! The kernel numbers each successful zero-copy `sendmsg` on a socket 0, 1, 2, … and, once the data is acknowledged
//! and the pages are released, queues a notification for a range of those numbers on the socket's error queue. Until
//! then the bytes must not change or be freed. Guest pages are allowed to change (a page written in flight is dirty
//! again, and its entry says it is live); the frame header and entry table are owned here, and the batch (its
//! compressed payload) is held, until the notification for their send arrives. A notification also says when the
//! kernel copied instead (`SO_EE_CODE_ZEROCOPY_COPIED`), as it does for loopback and for veth peers on this host,
//! which deliver to a local socket: the link report counts those.

use std::collections::VecDeque;
use std::io::{Error, ErrorKind, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// `sock_extended_err.ee_origin` of a zero-copy notification.
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `sock_extended_err.ee_code` bit: the kernel copied the data after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// `SO_ZEROCOPY` (include/uapi/asm-generic/socket.h).
const SO_ZEROCOPY: libc::c_int = 60;

/// Sends still waiting for their notification beyond this many make the writer wait for some.
const MAX_PENDING: usize = 256;
/// How long the writer waits for notifications before it gives up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters of a link's zero-copy sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroCopyStats {
    /// `sendmsg(MSG_ZEROCOPY)` calls that sent data.
    pub sends: u64,
    /// Sends whose notification arrived.
    pub completed: u64,
    /// Of those, sends the kernel copied instead.
    pub copied: u64,
}

/// What one zero-copy send sends: it owns every buffer but guest memory, and stays here, untouched, until the kernel
/// has released them. It lives in a `Box`, so moving it does not move the bytes the iovecs point at.
pub trait Buffers: Send {
    /// The bytes to send, in order.
    fn slices(&self) -> Vec<IoSlice<'_>>;
}

/// One socket's zero-copy sender. Dropping it with sends still pending leaks their buffers (see [`ZeroCopy::drain`]).
pub struct ZeroCopy {
    fd: RawFd,
    /// The number the kernel gives the next successful send.
    next_id: u32,
    pending: VecDeque<(u32, Box<dyn Buffers>)>,
    /// Counters.
    pub stats: ZeroCopyStats,
}

impl ZeroCopy {
    /// Enables `SO_ZEROCOPY` on `sock`. Fails where the kernel or socket does not support it.
    pub fn new(sock: &impl AsRawFd) -> Result<Self, Error> {
        let fd = sock.as_raw_fd();
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads `one` (an int of the given size) for the call's duration only.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_ZEROCOPY,
                (&one as *const libc::c_int).cast(),
                super::socklen_of::<libc::c_int>(),
            )
        };
        if rc != 0 {
            return Err(Error::last_os_error());
        }
        Ok(ZeroCopy { fd, next_id: 0, pending: VecDeque::new(), stats: ZeroCopyStats::default() })
    }

    /// Sends all of `bufs` with `MSG_ZEROCOPY`, and keeps them until the kernel releases the last of their bytes.
    /// Returns the bytes sent.
    pub fn send(&mut self, bufs: Box<dyn Buffers>) -> Result<usize, Error> {
        let mut slices = bufs.slices();
        let total: usize = slices.iter().map(|b| b.len()).sum();
        let mut rest = &mut slices[..];
        let mut sent = 0;
        let result = loop {
            if rest.is_empty() {
                break Ok(sent);
            }
            if self.pending.len() >= MAX_PENDING {
                if let Err(e) = self.wait_some() {
                    break Err(e);
                }
            }
            // SAFETY: msghdr is plain data; the iovec array points at `rest`, which lives across the call, and IoSlice
            // is ABI-compatible with iovec.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = rest.as_mut_ptr().cast();
                msg.msg_iovlen = rest.len().min(1024) as _;
                libc::sendmsg(self.fd, &msg, libc::MSG_ZEROCOPY | libc::MSG_NOSIGNAL)
            };
            if n < 0 {
                let e = Error::last_os_error();
                match e.kind() {
                    ErrorKind::Interrupted => continue,
                    // Out of option memory for notifications: let some complete, then go on.
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => match self.wait_some() {
                        Ok(()) => continue,
                        Err(e) => break Err(e),
                    },
                    _ => break Err(e),
                }
            }
            if n == 0 {
                break Err(ErrorKind::WriteZero.into());
            }
            self.next_id = self.next_id.wrapping_add(1);
            self.stats.sends += 1;
            sent += n as usize;
            IoSlice::advance_slices(&mut rest, n as usize);
        };
        drop(slices);
        if sent > 0 {
            // The last send of this frame: everything it referenced is released once its number completes. Kept even
            // when a later part failed, since the kernel may still read the parts it took.
            self.pending.push_back((self.next_id.wrapping_sub(1), bufs));
        }
        let sent = result?;
        self.reap()?;
        debug_assert_eq!(sent, total);
        Ok(sent)
    }

    /// Reads every notification queued on the error queue, without blocking, and releases what they complete.
    pub fn reap(&mut self) -> Result<(), Error> {
        loop {
            let mut control = [0u64; 16];
            // SAFETY: msghdr is plain data; the control buffer outlives the call and its length is given.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&control) as _;
                let n = libc::recvmsg(self.fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT);
                if n >= 0 {
                    self.parse(&msg);
                }
                n
            };
            if n < 0 {
                let e = Error::last_os_error();
                return match e.kind() {
                    ErrorKind::WouldBlock => Ok(()),
                    ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
        }
    }

    /// Handles the notifications in one error-queue message's control data.
    ///
    /// # Safety
    /// `msg` was just filled by `recvmsg`, and its control buffer is live.
    unsafe fn parse(&mut self, msg: &libc::msghdr) {
        // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled, within msg_controllen (this function's
        // contract); the first header is null or inside it.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
        while !c.is_null() {
            // SAFETY: `c` is a non-null cmsg header inside the filled control buffer.
            let (level, ty) = unsafe { ((*c).cmsg_level, (*c).cmsg_type) };
            let is_err = (level == libc::SOL_IP && ty == libc::IP_RECVERR)
                || (level == libc::SOL_IPV6 && ty == libc::IPV6_RECVERR);
            if is_err {
                // SAFETY: a cmsg of this level and type carries a sock_extended_err as its data, read unaligned.
                let ee: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::sock_extended_err>()) };
                if ee.ee_errno == 0 && ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                    self.complete(ee.ee_info, ee.ee_data, ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0);
                }
            }
            // SAFETY: `c` is a header inside `msg`'s control buffer; the macro returns the next one or null.
            c = unsafe { libc::CMSG_NXTHDR(msg, c) };
        }
    }

    /// Sends `lo..=hi` are done.
    fn complete(&mut self, lo: u32, hi: u32, copied: bool) {
        let n = u64::from(hi.wrapping_sub(lo)) + 1;
        self.stats.completed += n;
        if copied {
            self.stats.copied += n;
        }
        // Pending sends are in number order, and TCP releases data in sequence order (its acks are cumulative), so
        // everything at or before `hi` is done. Numbers wrap after 2^32 sends.
        while let Some(&(id, _)) = self.pending.front() {
            if (hi.wrapping_sub(id) as i32) < 0 {
                break;
            }
            self.pending.pop_front();
        }
    }

    /// Waits until at least one pending send completes (or [`DRAIN_TIMEOUT`] passes).
    fn wait_some(&mut self) -> Result<(), Error> {
        let before = self.pending.len();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.pending.len() == before && before > 0 {
            if !self.poll_err(deadline)? {
                return Err(Error::new(ErrorKind::TimedOut, "zero-copy completions stopped arriving"));
            }
            self.reap()?;
        }
        Ok(())
    }

    /// Waits for every pending send to complete, up to 2 s. Whatever is still pending then is leaked: the kernel may
    /// still read it, so freeing it could send freed (and reused) memory.
    pub fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.pending.is_empty() {
            if self.reap().is_err() || !self.poll_err(deadline).unwrap_or(false) {
                break;
            }
        }
        let _ = self.reap();
        self.leak_pending();
    }

    /// Gives up on the sends still pending without freeing what they send: the kernel may still read those buffers
    /// (a send not yet acknowledged by the peer is pinned, not copied), so they are leaked rather than reused.
    fn leak_pending(&mut self) {
        for (_, bufs) in self.pending.drain(..) {
            std::mem::forget(bufs);
        }
    }

    /// Waits for the error queue to have something; false at the deadline.
    fn poll_err(&self, deadline: Instant) -> Result<bool, Error> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // POLLERR is always reported; asking for nothing else waits for the error queue alone.
            let mut p = libc::pollfd { fd: self.fd, events: 0, revents: 0 };
            // SAFETY: one pollfd, valid for the call.
            let rc = unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 100) as libc::c_int) };
            if rc < 0 {
                let e = Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if p.revents & libc::POLLERR != 0 {
                return Ok(true);
            }
            if p.revents & (libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Ok(false);
            }
        }
    }
}

impl Drop for ZeroCopy {
    fn drop(&mut self) {
        self.leak_pending();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A buffer that counts its drops: a drop while the kernel may still read it is what must not happen.
    struct Counted(Vec<u8>, Arc<AtomicUsize>);

    impl Buffers for Counted {
        fn slices(&self) -> Vec<IoSlice<'_>> {
            vec![IoSlice::new(&self.0)]
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A connection whose peer reads nothing, with small buffers, and a non-blocking sending end.
    fn stalled_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        peer.set_recv_buffer_size(4096).unwrap();
        peer.connect(&l.local_addr().unwrap().into()).unwrap();
        let (tx, _) = l.accept().unwrap();
        socket2::SockRef::from(&tx).set_send_buffer_size(4096).unwrap();
        tx.set_nonblocking(true).unwrap();
        (tx, peer.into())
    }

    #[test]
    fn a_frame_whose_later_part_fails_is_kept_for_the_kernel_not_freed() {
        let (tx, _peer) = stalled_pair();
        let Ok(mut z) = ZeroCopy::new(&tx) else {
            eprintln!("SKIPPED: SO_ZEROCOPY is not available here");
            return;
        };
        let drops = Arc::new(AtomicUsize::new(0));
        // Far more than the buffers hold: the first sendmsg takes part of it, a later one finds no room.
        let r = z.send(Box::new(Counted(vec![7u8; 8 << 20], drops.clone())));
        assert!(r.is_err(), "8 MiB fit into a stalled connection: {r:?}");
        assert!(z.stats.sends > 0, "no part was sent zero-copy");
        drop(z);
        assert_eq!(drops.load(Ordering::SeqCst), 0, "a buffer the kernel may still read was freed");
    }

    #[test]
    fn sends_still_pending_after_the_drain_are_leaked_not_freed() {
        let (tx, _peer) = stalled_pair();
        let Ok(mut z) = ZeroCopy::new(&tx) else {
            eprintln!("SKIPPED: SO_ZEROCOPY is not available here");
            return;
        };
        // Fill the peer's window with plain writes, so that what follows stays unacknowledged in the send queue.
        let mut w = &tx;
        while std::io::Write::write(&mut w, &[1u8; 4096]).is_ok() {}
        std::thread::sleep(Duration::from_millis(100));
        // Only buffers that were sent count: one the kernel refused outright is free to go.
        let mut sent = Vec::new();
        for _ in 0..64 {
            let drops = Arc::new(AtomicUsize::new(0));
            if z.send(Box::new(Counted(vec![9u8; 64], drops.clone()))).is_ok() {
                sent.push(drops);
            }
        }
        assert!(!sent.is_empty() && !z.pending.is_empty(), "nothing stayed pending ({} sends)", sent.len());
        let pending = z.pending.len();
        z.drain();
        let freed = sent.iter().filter(|d| d.load(Ordering::SeqCst) > 0).count();
        assert!(freed <= sent.len() - pending, "{freed} of {pending} pending zero-copy buffers were freed");
    }
}
