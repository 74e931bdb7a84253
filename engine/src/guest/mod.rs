//! Guest abstractions: memory, dirty log and vCPUs, and the synthetic guest that implements them.
//!
//! The engine reads a guest only through three small traits, so that a KVM adapter, a vm-memory adapter and the
//! synthetic guest are interchangeable:
//! - [`GuestMemory`] hands out host mappings of guest RAM ([`HostRegion`]s). Pages are numbered globally, regions
//!   concatenated in order, and the engine copies pages out of (source) or into (destination) those mappings.
//! - [`DirtyLog`] harvests the pages written since the last harvest and clears them, as KVM's dirty log does.
//! - [`Vcpus`] throttles, pauses, resumes, and saves or restores an opaque state blob.

mod mmap;
mod synthetic;
pub mod uffd;

pub use mmap::{prefault_host, resident_pages, MmapRegion};
pub use synthetic::{fill_mix, PageKind, SyntheticConfig, SyntheticGuest, SyntheticVcpus, TEXT_WORDS, THROTTLE_SLICE};

use crate::dirty::Bitmap;
use std::ptr::NonNull;

/// The page size the engine moves. Guests with larger pages present them as runs of 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as the wire's 32-bit length fields carry it.
pub const PAGE_LEN: u32 = 4096;
const _: () = assert!(PAGE_LEN as usize == PAGE_SIZE);

/// Errors from guest adapters.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Mapping guest memory failed.
    #[error("mapping {bytes} bytes of guest memory failed: {source}")]
    Map {
        /// Size asked for.
        bytes: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The guest's memory size is not a whole number of pages, or is zero.
    #[error("guest memory of {0} bytes is not a non-zero multiple of the {PAGE_SIZE}-byte page size")]
    BadSize(u64),
    /// A page range reaches past the end of guest memory.
    #[error("pages {first}..{end} are outside guest memory of {pages} pages")]
    OutOfRange {
        /// First page asked for.
        first: u64,
        /// One past the last page asked for.
        end: u64,
        /// Pages the guest has.
        pages: u64,
    },
    /// A saved vCPU state blob could not be restored.
    #[error("vCPU state blob rejected: {0}")]
    BadState(String),
    /// A vCPU thread could not be started.
    #[error("starting a vCPU thread failed: {0}")]
    Thread(std::io::Error),
    /// Reading the kernel's page map failed.
    #[error("reading /proc/self/pagemap failed: {0}")]
    PageMap(std::io::Error),
}

/// A host mapping of one contiguous range of guest-physical memory.
///
/// Neither `Copy` nor `Clone`: one is made only by [`HostRegion::new`], whose caller vouches for the mapping, and
/// lives inside the memory object that owns that mapping, so it cannot be kept past it by safe code:
///
/// ```compile_fail,E0599
/// fn keep(r: &livemig_engine::guest::HostRegion) -> livemig_engine::guest::HostRegion {
///     r.clone()
/// }
/// ```
/// ```
/// fn look(r: &livemig_engine::guest::HostRegion) -> usize {
///     r.len()
/// }
/// ```
#[derive(Debug)]
pub struct HostRegion {
    guest_addr: u64,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a HostRegion is an address range, not an owner; the memory object that hands it out guarantees the mapping
// outlives it and is shared between threads by design (guest memory is written by vCPUs and read by the migration).
unsafe impl Send for HostRegion {}
// SAFETY: as for Send; all access through it goes through raw-pointer copies.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Describes `len` bytes of host memory at `ptr`, holding guest-physical `guest_addr..guest_addr + len`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as the [`GuestMemory`] that returns this
    /// region is alive, and `len` must be a multiple of [`PAGE_SIZE`].
    pub unsafe fn new(guest_addr: u64, ptr: NonNull<u8>, len: usize) -> Self {
        debug_assert_eq!(len % PAGE_SIZE, 0);
        HostRegion { guest_addr, ptr, len }
    }

    /// Guest-physical address of the region's first byte.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Host address of the region's first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// The shape of guest memory, as the handshake carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// (guest-physical address, length in bytes) per region, in page-numbering order.
    pub regions: Vec<(u64, u64)>,
}

impl MemoryLayout {
    /// Total pages over all regions.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|&(_, len)| len / PAGE_SIZE as u64).sum()
    }

    /// Total bytes over all regions.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|&(_, len)| len).sum()
    }
}

/// Guest RAM as host mappings.
pub trait GuestMemory: Send + Sync {
    /// The regions, in page-numbering order.
    fn regions(&self) -> &[HostRegion];

    /// Pages that may hold non-zero data. Pages outside it are known to be zero and round 0 skips them. The default
    /// claims every page, which is always safe.
    fn maybe_nonzero(&self) -> Result<Bitmap, GuestError> {
        Ok(Bitmap::full(self.total_pages()))
    }

    /// Faults pages `first..first + count` in for writing, ahead of the receiver, so that applying a page does not
    /// wait for the kernel to find and zero fresh memory. Content is unchanged. The default does nothing.
    fn prefault(&self, first: u64, count: u64) {
        let _ = (first, count);
    }

    /// Total pages over all regions.
    fn total_pages(&self) -> u64 {
        self.regions().iter().map(HostRegion::pages).sum()
    }

    /// The layout for the handshake.
    fn layout(&self) -> MemoryLayout {
        MemoryLayout { regions: self.regions().iter().map(|r| (r.guest_addr, r.len as u64)).collect() }
    }
}

/// Where a run of pages lives in host memory.
///
/// Returns the host pointer of page `first` and how many of the `count` pages follow it contiguously in the same
/// region (a run that crosses a region boundary is served in pieces), or an error when `first` is out of range.
pub fn host_pages(mem: &dyn GuestMemory, first: u64, count: u64) -> Result<(*mut u8, u64), GuestError> {
    let mut base = 0u64;
    for r in mem.regions() {
        let pages = r.pages();
        if first < base + pages {
            let off = crate::num::usize_from(first - base) * PAGE_SIZE;
            // SAFETY: off < r.len, inside the mapping HostRegion::new vouched for.
            let ptr = unsafe { r.as_ptr().add(off) };
            return Ok((ptr, count.min(base + pages - first)));
        }
        base += pages;
    }
    Err(GuestError::OutOfRange { first, end: first + count, pages: base })
}

/// Copies one page of guest memory at `src` to `dst`, with volatile loads: vCPUs may write the page meanwhile (it
/// is shared with them, as vm-memory's `VolatileSlice` treats it), so the compiler must neither assume its bytes
/// stay put nor read them twice. The copy may see the page mid-write; the writer sets the page's dirty bit after
/// writing, so such a copy is always sent again. 16-byte loads, so that it costs about what a plain copy does.
///
/// # Safety
/// `src` is page-aligned and valid for reads of [`PAGE_SIZE`] bytes (a page of a live guest mapping), and `dst` is
/// valid for writes of [`PAGE_SIZE`] bytes and does not overlap it.
pub unsafe fn copy_from_guest(src: *const u8, dst: *mut u8) {
    debug_assert_eq!(src as usize % PAGE_SIZE, 0);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__m128i;
        let (s, d) = (src.cast::<__m128i>(), dst.cast::<__m128i>());
        for i in 0..PAGE_SIZE / 16 {
            // SAFETY: by the contract, both are in bounds; `s` is 16-byte aligned (a page), `d` written unaligned.
            unsafe { d.add(i).write_unaligned(s.add(i).read_volatile()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let (s, d) = (src.cast::<u64>(), dst.cast::<u64>());
        for i in 0..PAGE_SIZE / 8 {
            // SAFETY: by the contract, both are in bounds; `s` is 8-byte aligned (a page), `d` written unaligned.
            unsafe { d.add(i).write_unaligned(s.add(i).read_volatile()) };
        }
    }
}

/// Copies one page from `src` into guest memory at `dst` with volatile stores, as a vCPU's write would land: other
/// threads (the migration) may read the page meanwhile.
///
/// # Safety
/// `dst` is page-aligned and valid for writes of [`PAGE_SIZE`] bytes (a page of a live guest mapping), and `src` is
/// valid for reads of [`PAGE_SIZE`] bytes and does not overlap it.
pub unsafe fn copy_to_guest(src: *const u8, dst: *mut u8) {
    debug_assert_eq!(dst as usize % PAGE_SIZE, 0);
    let (s, d) = (src.cast::<u64>(), dst.cast::<u64>());
    for i in 0..PAGE_SIZE / 8 {
        // SAFETY: by the contract, both are in bounds; `d` is 8-byte aligned (a page), `s` read unaligned.
        unsafe { d.add(i).write_volatile(s.add(i).read_unaligned()) };
    }
}

/// Copies page `page` of guest memory into `out` (exactly one page long). The page may be written meanwhile (see
/// [`copy_from_guest`]).
pub fn read_page(mem: &dyn GuestMemory, page: u64, out: &mut [u8]) -> Result<(), GuestError> {
    assert_eq!(out.len(), PAGE_SIZE);
    let (ptr, _) = host_pages(mem, page, 1)?;
    // SAFETY: host_pages returned a page-aligned pointer to a whole page inside a live mapping; `out` is a distinct
    // Rust buffer of one page.
    unsafe { copy_from_guest(ptr, out.as_mut_ptr()) };
    Ok(())
}

/// Copies `data` (exactly one page) into page `page` of guest memory.
///
/// ```compile_fail,E0133
/// # use livemig_engine::guest::*;
/// let g = SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, 4096)] }, 1).unwrap();
/// write_page(&g, 0, &[1u8; PAGE_SIZE]).unwrap();
/// ```
/// ```
/// # use livemig_engine::guest::*;
/// let g = SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, 4096)] }, 1).unwrap();
/// // SAFETY: the guest's vCPUs are paused (a destination's start so), and nothing else touches its memory.
/// unsafe { write_page(&g, 0, &[1u8; PAGE_SIZE]) }.unwrap();
/// ```
///
/// # Safety
/// Nothing else may read or write that page meanwhile: not the guest's vCPUs (a destination's are paused until the
/// migration commits) and not another apply of the same page.
pub unsafe fn write_page(mem: &dyn GuestMemory, page: u64, data: &[u8]) -> Result<(), GuestError> {
    assert_eq!(data.len(), PAGE_SIZE);
    let (ptr, _) = host_pages(mem, page, 1)?;
    // SAFETY: host_pages points at a whole page of a live mapping; the caller excludes every other access to it.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, PAGE_SIZE) };
    Ok(())
}

/// Harvests written pages, the way KVM's dirty log does.
pub trait DirtyLog: Send + Sync {
    /// ORs every page written since the previous harvest into `out` and clears those pages in the log.
    fn harvest(&self, out: &mut Bitmap) -> Result<(), GuestError>;
}

/// The guest's virtual CPUs, as the migration controls them.
pub trait Vcpus: Send + Sync {
    /// Makes the vCPUs sleep `pct` percent (0–99) of each time slice. 0 means unthrottled.
    fn set_throttle(&self, pct: f64);
    /// The throttle in force, in percent.
    fn throttle(&self) -> f64;
    /// Stops every vCPU and returns once none of them can write guest memory any more.
    fn pause(&self);
    /// Lets the vCPUs run again.
    fn resume(&self);
    /// True while paused.
    fn is_paused(&self) -> bool;
    /// The vCPU state as an opaque, versioned blob. Call while paused.
    fn save_state(&self) -> Result<Vec<u8>, GuestError>;
    /// Loads a blob from [`Vcpus::save_state`] on the destination, before [`Vcpus::resume`].
    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError>;
    /// How far the guest has got, in pages written since it was made, where the guest keeps count (carried over by
    /// the state blob, so a destination goes on from the source's count); None where it does not.
    fn pages_written(&self) -> Option<u64> {
        None
    }
}

/// One device's saved state, as the VMM's device model hands it over: a name unique within the VM, the version of
/// its format (for the destination's restore code to accept or refuse), and the bytes, opaque to livemig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    /// The device's name ("virtio-net0", "serial").
    pub name: String,
    /// Its format's version.
    pub version: u32,
    /// The state.
    pub data: Vec<u8>,
}

/// The VMM's devices, whose state crosses at the switchover beside the vCPUs'.
pub trait Devices: Send + Sync {
    /// Saves every device's state. Called once on the source, with the vCPUs paused and the last pages sent.
    fn save(&self) -> Result<Vec<DeviceSection>, GuestError>;
    /// Restores the sections the source saved, on the destination, before its vCPUs resume. An error (a section
    /// missing, unknown, or of a version this side cannot read) fails the migration before the commit: the source
    /// keeps the guest.
    fn restore(&self, sections: &[DeviceSection]) -> Result<(), GuestError>;
}

/// A whole guest as the drivers see it: memory, dirty log and vCPUs, and any devices with state.
pub trait Guest: Send + Sync {
    /// Guest RAM.
    fn memory(&self) -> &dyn GuestMemory;
    /// The dirty log over that RAM.
    fn dirty_log(&self) -> &dyn DirtyLog;
    /// The vCPUs.
    fn vcpus(&self) -> &dyn Vcpus;
    /// The adapter's name, carried in the handshake ("synthetic", "kvm").
    fn kind(&self) -> &'static str;
    /// Number of vCPUs.
    fn vcpu_count(&self) -> u32;
    /// The devices whose state migrates with the guest; none by default.
    fn devices(&self) -> Option<&dyn Devices> {
        None
    }
}
