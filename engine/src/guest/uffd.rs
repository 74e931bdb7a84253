//! userfaultfd: the kernel interface post-copy is built on (`receive::postcopy` drives it).
//!
//! A destination that resumes its guest before every page has arrived registers the guest's memory with a
//! [`Uffd`] in missing mode. A vCPU (a thread of the synthetic guest, or KVM on behalf of a real one) that touches a
//! page not yet populated is held by the kernel, and the fault comes out of the descriptor ([`Uffd::next_fault`]).
//! The page is then placed whole and the waiter woken in one call: [`Uffd::copy`] with the page's bytes, or
//! [`Uffd::zero`] for a zero page. Placement is atomic, so a page is never seen half written, and a page already
//! present is refused with `EEXIST` ([`Placed::AlreadyThere`]): a page pushed in the background and also asked for
//! by a fault is placed once, and the second copy cannot overwrite what the guest has written since.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Why userfaultfd could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The kernel refused to make one: without `CAP_SYS_PTRACE`, kernel-mode faults (KVM's) need
    /// `vm.unprivileged_userfaultfd = 1`.
    #[error("userfaultfd: {0} (needs root, or vm.unprivileged_userfaultfd = 1)")]
    Create(std::io::Error),
    /// An ioctl on it failed.
    #[error("userfaultfd {what}: {source}")]
    Ioctl {
        /// Which call.
        what: &'static str,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// Reading a fault event failed, or what was read was not one.
    #[error("userfaultfd read: {0}")]
    Read(std::io::Error),
}

/// What a placement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page was placed and any thread waiting on it woken.
    Now,
    /// The page was already present (placed before, or written by the guest after an earlier placement); nothing
    /// changed.
    AlreadyThere,
}

const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `_IOWR(0xAA, nr, size)` as `<linux/userfaultfd.h>` defines the calls.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
/// `struct uffd_msg`: the event byte, padding, then for a page fault its flags and address.
const MSG_LEN: usize = 32;

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Makes a descriptor (non-blocking: [`Uffd::next_fault`] waits with a deadline) and agrees on the API.
    pub fn new() -> Result<Uffd, UffdError> {
        // SAFETY: the syscall takes flags only; a non-negative result is a new descriptor that we alone own.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        let fd = i32::try_from(fd).unwrap_or(-1);
        if fd < 0 {
            return Err(UffdError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let u = Uffd { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API reads and writes exactly this struct.
        unsafe { u.ioctl(UFFDIO_API, (&raw mut api).cast(), "API") }?;
        Ok(u)
    }

    /// # Safety
    /// `arg` must point at the struct that `req` reads and writes, valid for the call.
    unsafe fn ioctl(&self, req: u64, arg: *mut libc::c_void, what: &'static str) -> Result<(), UffdError> {
        // SAFETY: the caller vouches for `arg`; the descriptor is ours.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), req, arg) } < 0 {
            return Err(UffdError::Ioctl { what, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Registers `len` bytes at `addr` (page aligned, an anonymous private mapping) in missing mode: from now on a
    /// touch of a page there that is not populated waits for [`Uffd::copy`] or [`Uffd::zero`].
    ///
    /// # Safety
    /// The range must be a mapping the caller owns for as long as it stays registered; a thread that faults there
    /// waits until a page is placed, so the caller must serve the faults.
    pub unsafe fn register_missing(&self, addr: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr as u64, len: len as u64 },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly this struct.
        unsafe { self.ioctl(UFFDIO_REGISTER, (&raw mut reg).cast(), "REGISTER") }
    }

    /// The address of the next page fault, waiting at most `within`; `None` when none came.
    pub fn next_fault(&self, within: Duration) -> Result<Option<u64>, UffdError> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(within.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: polls one descriptor described by a live local.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted { Ok(None) } else { Err(UffdError::Read(e)) };
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = [0u8; MSG_LEN];
        // SAFETY: reads at most MSG_LEN bytes into a live local buffer of that size.
        let got = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), MSG_LEN) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            // Another reader took it, or the fault went away (the waiter was woken by a placement).
            return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(None) } else { Err(UffdError::Read(e)) };
        }
        if usize::try_from(got).ok() != Some(MSG_LEN) || msg[0] != UFFD_EVENT_PAGEFAULT {
            let why = format!("an event of {got} bytes, kind {:#x}, where a page fault was expected", msg[0]);
            return Err(UffdError::Read(std::io::Error::new(std::io::ErrorKind::InvalidData, why)));
        }
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&msg[16..24]);
        Ok(Some(u64::from_ne_bytes(addr)))
    }

    /// Places `src` (whole pages) at `dst` and wakes whoever waits there.
    ///
    /// # Safety
    /// `dst` must be page aligned inside a range registered with this descriptor, `src.len()` a multiple of the
    /// page size.
    pub unsafe fn copy(&self, dst: *mut u8, src: &[u8]) -> Result<Placed, UffdError> {
        let mut c = UffdioCopy { dst: dst as u64, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        // SAFETY: UFFDIO_COPY reads `src` (a live slice) and this struct, and writes the struct's result.
        Self::placed(unsafe { self.ioctl(UFFDIO_COPY, (&raw mut c).cast(), "COPY") })
    }

    /// Places zero pages over `len` bytes at `dst` and wakes whoever waits there.
    ///
    /// # Safety
    /// As for [`Uffd::copy`].
    pub unsafe fn zero(&self, dst: *mut u8, len: usize) -> Result<Placed, UffdError> {
        let mut z = UffdioZeropage { range: UffdioRange { start: dst as u64, len: len as u64 }, ..Default::default() };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes exactly this struct.
        Self::placed(unsafe { self.ioctl(UFFDIO_ZEROPAGE, (&raw mut z).cast(), "ZEROPAGE") })
    }

    fn placed(r: Result<(), UffdError>) -> Result<Placed, UffdError> {
        match r {
            Ok(()) => Ok(Placed::Now),
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(Placed::AlreadyThere)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{MmapRegion, PAGE_SIZE};

    /// A descriptor, or a visible skip where this host refuses one.
    fn uffd() -> Option<Uffd> {
        match Uffd::new() {
            Ok(u) => Some(u),
            Err(e) => {
                eprintln!("SKIP: {e}");
                None
            }
        }
    }

    fn page_at(r: &MmapRegion, i: usize) -> usize {
        r.region().as_ptr() as usize + i * PAGE_SIZE
    }

    #[test]
    fn a_thread_that_touches_a_missing_page_waits_until_it_is_placed_whole() {
        let Some(u) = uffd() else { return };
        let mem = MmapRegion::new(0, 16 * PAGE_SIZE as u64, false).unwrap();
        // SAFETY: the mapping is ours and outlives the registration; the faults are served below.
        unsafe { u.register_missing(mem.region().as_ptr(), 16 * PAGE_SIZE) }.unwrap();
        let at = page_at(&mem, 3);
        let reader = std::thread::spawn(move || {
            // SAFETY: reads one byte of a live page of the mapping (placed by the main thread before this returns).
            let first = unsafe { std::ptr::read_volatile(at as *const u8) };
            // SAFETY: as above; the page is present now.
            let last = unsafe { std::ptr::read_volatile((at + PAGE_SIZE - 1) as *const u8) };
            (first, last)
        });
        let fault = u.next_fault(Duration::from_secs(5)).unwrap().expect("the reader's fault");
        assert_eq!(fault & !(PAGE_SIZE as u64 - 1), at as u64);
        assert!(!reader.is_finished(), "the reader went on without its page");
        let page = vec![0x5a; PAGE_SIZE];
        // SAFETY: a page-aligned address inside the registered range, one whole page.
        assert_eq!(unsafe { u.copy(at as *mut u8, &page) }.unwrap(), Placed::Now);
        assert_eq!(reader.join().unwrap(), (0x5a, 0x5a));
        // A second placement of the same page (a pushed copy racing the fault's) changes nothing.
        // SAFETY: as above.
        assert_eq!(unsafe { u.copy(at as *mut u8, &[0u8; PAGE_SIZE]) }.unwrap(), Placed::AlreadyThere);
        // SAFETY: the page is present.
        assert_eq!(unsafe { std::ptr::read_volatile(at as *const u8) }, 0x5a);
    }

    #[test]
    fn a_zero_page_is_placed_without_data_and_a_written_page_is_never_overwritten() {
        let Some(u) = uffd() else { return };
        let mem = MmapRegion::new(0, 4 * PAGE_SIZE as u64, false).unwrap();
        // SAFETY: as in the test above.
        unsafe { u.register_missing(mem.region().as_ptr(), 4 * PAGE_SIZE) }.unwrap();
        let (zero, data) = (page_at(&mem, 0), page_at(&mem, 1));
        let writer = std::thread::spawn(move || {
            // SAFETY: writes one byte of a page of the mapping, which waits until the page is placed.
            unsafe { std::ptr::write_volatile(data as *mut u8, 7) };
            // SAFETY: reads a page of the mapping, placed as zeros before this can return.
            unsafe { std::ptr::read_volatile((zero + 100) as *const u8) }
        });
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let f = u.next_fault(Duration::from_secs(5)).unwrap().expect("the writer's faults");
            let page = f & !(PAGE_SIZE as u64 - 1);
            seen.push(page);
            // SAFETY: page-aligned addresses inside the registered range, one page each.
            let placed = unsafe {
                if page == zero as u64 {
                    u.zero(zero as *mut u8, PAGE_SIZE)
                } else {
                    u.copy(data as *mut u8, &[1u8; PAGE_SIZE])
                }
            };
            assert_eq!(placed.unwrap(), Placed::Now);
        }
        assert_eq!(writer.join().unwrap(), 0, "the zero page reads as zeros");
        // The writer's byte landed on the placed page, and a late copy of the page does not undo it.
        // SAFETY: page-aligned, inside the range, present.
        assert_eq!(unsafe { u.copy(data as *mut u8, &[1u8; PAGE_SIZE]) }.unwrap(), Placed::AlreadyThere);
        // SAFETY: the page is present.
        let (b0, b1) =
            unsafe { (std::ptr::read_volatile(data as *const u8), std::ptr::read_volatile((data + 1) as *const u8)) };
        assert_eq!((b0, b1), (7, 1));
        assert_eq!(u.next_fault(Duration::from_millis(20)).unwrap(), None, "no fault left");
    }
}
