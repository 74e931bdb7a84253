//! One io_uring per side, serving the socket I/O of every data link of a migration (`--send-path uring` at the
//! source, `receive --recv-path uring` at the destination).
//!
//! The links keep their threads: each still encodes or seals, paces and parses its frames. What moves to the ring
//! is the system call: a link's [`Conn`](crate::tls::Conn) with a [`RingIo`] attached hands each `sendmsg` or
//! `recvmsg` (iovecs from guest memory when the link is plaintext, record buffers when it is sealed) to the ring's
//! thread, which submits the requests of all links together and wakes each caller with its result.
//!
//! Why the caller waits: the kernel reads and writes the caller's buffers until the request completes, so a caller
//! never returns before its completion, whatever happens. A socket timeout becomes an `IORING_OP_LINK_TIMEOUT`
//! linked to the request (io_uring does not honour `SO_RCVTIMEO`), and a ring that is shutting down cancels every
//! request still in flight and waits for each to come back before its thread ends.

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Submission-queue entries: two per request (the request and its timeout), for more links than a host has NICs.
const ENTRIES: u32 = 256;
/// `user_data` of the eventfd read that wakes the ring's thread. Requests are 8-byte aligned boxes, so their
/// `user_data` is a multiple of 8 and never one of these.
const WAKE: u64 = 2;
/// `user_data` of the cancel-everything request made at shutdown.
const CANCEL: u64 = 4;
/// Low bits marking a request's linked timeout.
const TIMEOUT_BIT: u64 = 1;

/// A request in the ring's hands: the message header and iovecs the kernel reads, and where its result goes.
struct Op {
    fd: RawFd,
    send: bool,
    /// `sendmsg` / `recvmsg` flags.
    flags: u32,
    /// The iovecs `msg` points at, owned here so that they live as long as the request.
    _iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    timeout: Option<types::Timespec>,
    reply: Arc<Reply>,
}

/// Where a request's result goes: the caller parks until it is set (no spinning: on a host whose cores the
/// migration shares, a waiting caller must cost nothing).
struct Reply {
    result: AtomicI64,
    caller: std::thread::Thread,
}

/// `Reply::result` before the result is in.
const PENDING: i64 = i64::MIN;

impl Reply {
    fn set(&self, r: i32) {
        self.result.store(i64::from(r), Ordering::Release);
        self.caller.unpark();
    }
}

// SAFETY: the raw pointers in `iov` and `msg` point at the caller's buffers and at `iov` itself; the caller keeps
// those buffers borrowed until the op's result comes back, and only the ring's thread touches the op meanwhile.
unsafe impl Send for Op {}

struct Shared {
    /// Requests waiting for the ring's thread, and whether it has stopped taking them.
    queue: Mutex<(Vec<Op>, bool)>,
    wake: OwnedFd,
    /// The ring's thread is (about to be) blocked in the kernel and needs the eventfd to wake.
    sleeping: AtomicBool,
    stop: AtomicBool,
    /// Requests completed, for the reports.
    done: AtomicU64,
}

/// The ring and its thread. Dropping it cancels what is in flight, waits for it, and ends the thread.
pub struct Ring {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A handle that links use to submit their socket I/O to a [`Ring`].
#[derive(Clone)]
pub struct RingIo {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RingIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingIo")
    }
}

impl Ring {
    /// Sets up a ring and starts its thread (`name`).
    pub fn new(name: &str) -> std::io::Result<Ring> {
        let setup = |e: std::io::Error| std::io::Error::new(e.kind(), format!("setting up io_uring: {e}"));
        // SAFETY: eventfd takes no pointers; a non-negative return is a new descriptor that we alone own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(setup(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            queue: Mutex::new((Vec::new(), false)),
            wake,
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            done: AtomicU64::new(0),
        });
        let s = shared.clone();
        let (ready, made) = std::sync::mpsc::sync_channel(1);
        // The ring is made on its own thread, the only one that ever submits to it: that is what lets the kernel
        // run completions' work only when that thread asks for them (DEFER_TASKRUN), not by interrupting it.
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let built = IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(ENTRIES);
                match built {
                    Ok(ring) => {
                        let _ = ready.send(Ok(()));
                        run(ring, &s);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })
            .map_err(setup)?;
        let ring = Ring { shared, thread: Some(thread) };
        match made.recv() {
            Ok(Ok(())) => Ok(ring),
            Ok(Err(e)) => Err(setup(e)),
            Err(_) => Err(setup(std::io::Error::other("the ring's thread ended"))),
        }
    }

    /// A handle for the links.
    pub fn io(&self) -> RingIo {
        RingIo { shared: self.shared.clone() }
    }

    /// Requests the ring has completed so far.
    pub fn requests(&self) -> u64 {
        self.shared.done.load(Ordering::Relaxed)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Op>, bool)> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the ring's thread if it sleeps (or is about to).
    fn kick(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local to the eventfd this struct owns.
            unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }
}

impl RingIo {
    /// `sendmsg(fd, bufs, MSG_NOSIGNAL)` through the ring; `timeout` as `SO_SNDTIMEO` would give it.
    pub fn send(&self, fd: RawFd, bufs: &[IoSlice<'_>], timeout: Option<Duration>) -> std::io::Result<usize> {
        let iov = bufs.iter().map(|b| libc::iovec { iov_base: b.as_ptr().cast_mut().cast(), iov_len: b.len() });
        // SAFETY: the iovecs describe `bufs`, which stay borrowed until `submit` returns, after the op completed;
        // the kernel only reads them.
        unsafe { self.submit(fd, true, libc::MSG_NOSIGNAL, iov.collect(), timeout) }
    }

    /// `recvmsg(fd, bufs)` through the ring; `timeout` as `SO_RCVTIMEO` would give it. With `all`, the request
    /// completes only when `bufs` are full (`MSG_WAITALL`), the stream ends or the timeout passes: one completion
    /// instead of one per segment, for a reader that knows how many bytes come next.
    pub fn recv(
        &self,
        fd: RawFd,
        bufs: &mut [IoSliceMut<'_>],
        all: bool,
        timeout: Option<Duration>,
    ) -> std::io::Result<usize> {
        let iov = bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() });
        let flags = if all { libc::MSG_WAITALL } else { 0 };
        // SAFETY: the iovecs describe `bufs`, borrowed mutably until `submit` returns, after the op completed.
        unsafe { self.submit(fd, false, flags, iov.collect(), timeout) }
    }

    /// Queues one request and waits for its result.
    ///
    /// # Safety
    /// `iov` must describe memory valid for the kernel to read (send) or write (recv) until this returns.
    unsafe fn submit(
        &self,
        fd: RawFd,
        send: bool,
        flags: libc::c_int,
        mut iov: Vec<libc::iovec>,
        timeout: Option<Duration>,
    ) -> std::io::Result<usize> {
        let reply = Arc::new(Reply { result: AtomicI64::new(PENDING), caller: std::thread::current() });
        // SAFETY: msghdr is plain data for which all zeroes is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        let timeout = timeout.map(|t| types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos()));
        let flags = u32::try_from(flags).unwrap_or(0);
        let op = Op { fd, send, flags, _iov: iov, msg, timeout, reply: reply.clone() };
        {
            let mut q = self.shared.lock();
            if q.1 {
                return Err(std::io::Error::other("io_uring ring has shut down"));
            }
            q.0.push(op);
        }
        self.shared.kick();
        // The ring's thread answers every op it took, and takes every op queued before it stops (see `run`); a
        // wake-up without the result (park may return early) just parks again.
        let res = loop {
            let r = reply.result.load(Ordering::Acquire);
            if r != PENDING {
                break i32::try_from(r).unwrap_or(-libc::EIO);
            }
            std::thread::park();
        };
        match res {
            r if r >= 0 => Ok(usize::try_from(r).unwrap_or(0)),
            // Cut short by its linked timeout: what a socket timeout would have said.
            r if -r == libc::ECANCELED && timeout.is_some() => Err(std::io::ErrorKind::WouldBlock.into()),
            r => Err(std::io::Error::from_raw_os_error(-r)),
        }
    }
}

/// The ring's thread: takes queued requests, submits them, hands out results, until stopped and quiet.
fn run(mut ring: IoUring, shared: &Shared) {
    let mut wake_buf = Box::new([0u8; 8]);
    let mut wake_armed = false;
    let mut inflight = 0usize;
    let mut cancelled = false;
    loop {
        let stopping = shared.stop.load(Ordering::SeqCst);
        if !wake_armed && !stopping {
            let read = opcode::Read::new(types::Fd(shared.wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8);
            wake_armed = push(&mut ring, &[read.build().user_data(WAKE)]);
        }
        let taken = {
            let mut q = shared.lock();
            q.1 |= stopping;
            std::mem::take(&mut q.0)
        };
        for op in taken {
            if stopping {
                op.reply.set(-libc::ECANCELED);
            } else if let Some(op) = start(&mut ring, Box::new(op)) {
                op.reply.set(-libc::EAGAIN);
            } else {
                inflight += 1;
            }
        }
        if stopping && !cancelled && (inflight > 0 || wake_armed) {
            let all = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(CANCEL);
            cancelled = push(&mut ring, &[all]);
        }
        if stopping && inflight == 0 && !wake_armed {
            return;
        }
        shared.sleeping.store(true, Ordering::SeqCst);
        // Checked after `sleeping` is set: a request queued, or a stop asked for, before this point was not woken
        // for (its kick found `sleeping` false), so it must be seen here.
        if !shared.lock().0.is_empty() || shared.stop.load(Ordering::SeqCst) != stopping {
            shared.sleeping.store(false, Ordering::SeqCst);
            continue;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            // The ring itself failed. Callers' buffers stay borrowed until their requests complete, so the thread
            // may not leave while any is in flight: it says so and keeps trying.
            Err(e) => {
                tracing::error!(error = %e, inflight, "io_uring_enter failed; retrying");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        shared.sleeping.store(false, Ordering::SeqCst);
        for cqe in ring.completion() {
            if finish(&cqe, &mut inflight, &mut wake_armed) {
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Hands a completion to its caller; says whether it was a caller's request.
fn finish(cqe: &cqueue::Entry, inflight: &mut usize, wake_armed: &mut bool) -> bool {
    match cqe.user_data() {
        WAKE => *wake_armed = false,
        CANCEL => {}
        ud if ud & 7 == TIMEOUT_BIT => {}
        ud => {
            // SAFETY: `ud` is the pointer `start` leaked for this request, and a request completes once.
            let op = unsafe { Box::from_raw(ud as *mut Op) };
            *inflight = inflight.saturating_sub(1);
            op.reply.set(cqe.result());
            return true;
        }
    }
    false
}

/// Submits one request (and its timeout); gives it back if the submission queue has no room even after a submit.
fn start(ring: &mut IoUring, op: Box<Op>) -> Option<Box<Op>> {
    let op = Box::into_raw(op);
    let ud = op as u64;
    // SAFETY: `op` is a live box this thread owns until its completion; the kernel reads its msghdr and iovecs
    // (and its timespec, copied when the timeout is prepared) while the request runs.
    let (first, timeout) = unsafe {
        let o = &mut *op;
        let sqe = if o.send {
            opcode::SendMsg::new(types::Fd(o.fd), &o.msg).flags(o.flags).build()
        } else {
            opcode::RecvMsg::new(types::Fd(o.fd), &mut o.msg).flags(o.flags).build()
        };
        let timeout = o.timeout.as_ref().map(|ts| opcode::LinkTimeout::new(ts).build().user_data(ud | TIMEOUT_BIT));
        (sqe.user_data(ud), timeout)
    };
    let entries: Vec<squeue::Entry> = match timeout {
        Some(t) => vec![first.flags(squeue::Flags::IO_LINK), t],
        None => vec![first],
    };
    if push(ring, &entries) {
        None
    } else {
        // SAFETY: not submitted, so still ours alone.
        Some(unsafe { Box::from_raw(op) })
    }
}

/// Pushes entries that must go together (a request and its linked timeout), submitting first if the queue is full.
fn push(ring: &mut IoUring, entries: &[squeue::Entry]) -> bool {
    for attempt in 0..2 {
        {
            let mut sq = ring.submission();
            if sq.capacity() - sq.len() >= entries.len() {
                for e in entries {
                    // SAFETY: every entry's buffers are kept alive by its owner until it completes (see `start`).
                    if unsafe { sq.push(e) }.is_err() {
                        return false;
                    }
                }
                return true;
            }
        }
        if attempt == 0 && ring.submit().is_err() {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn sends_and_receives_vectored_through_one_ring_for_several_sockets() {
        let ring = Ring::new("lm-uring-test").unwrap();
        let io = ring.io();
        let pairs: Vec<(UnixStream, UnixStream)> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        std::thread::scope(|s| {
            for (i, (a, b)) in pairs.iter().enumerate() {
                let io = io.clone();
                s.spawn(move || {
                    let head = [u8::try_from(i).unwrap(); 3];
                    let body = vec![0xa0 | head[0]; 70_000];
                    let mut sent = 0;
                    while sent < 3 + body.len() {
                        let bufs = [IoSlice::new(&head), IoSlice::new(&body)];
                        let mut rest: &mut [IoSlice<'_>] = &mut bufs.clone();
                        IoSlice::advance_slices(&mut rest, sent);
                        sent += io.send(a.as_raw_fd(), rest, None).unwrap();
                    }
                    let mut got = vec![0u8; 3 + body.len()];
                    let mut n = 0;
                    while n < got.len() {
                        n += (&*b).read(&mut got[n..]).unwrap();
                    }
                    assert_eq!(&got[..3], &head);
                    assert!(got[3..].iter().all(|&x| x == 0xa0 | head[0]));
                    (&*b).write_all(b"ok").unwrap();
                    let mut back = [0u8; 2];
                    let n = io.recv(a.as_raw_fd(), &mut [IoSliceMut::new(&mut back)], true, None).unwrap();
                    assert_eq!(&back[..n], &b"ok"[..n]);
                });
            }
        });
    }

    #[test]
    fn a_receive_that_waits_past_its_timeout_ends_as_a_socket_timeout_would() {
        let ring = Ring::new("lm-uring-test").unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        let t = std::time::Instant::now();
        let e = ring.io().recv(a.as_raw_fd(), &mut [IoSliceMut::new(&mut buf)], false, Some(Duration::from_millis(50)));
        assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn dropping_the_ring_answers_a_receive_still_waiting() {
        let ring = Ring::new("lm-uring-test").unwrap();
        let io = ring.io();
        let (a, _b) = UnixStream::pair().unwrap();
        let waiter = std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            io.recv(a.as_raw_fd(), &mut [IoSliceMut::new(&mut buf)], false, None)
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(ring);
        let e = waiter.join().unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECANCELED), "{e}");
    }
}
