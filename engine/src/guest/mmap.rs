//! Anonymous guest RAM mappings, and which of their pages the kernel has ever populated.

use super::{GuestError, HostRegion, PAGE_SIZE};
use crate::dirty::Bitmap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

/// Private anonymous memory, mapped lazily: a page costs nothing until it is first touched.
#[derive(Debug)]
pub struct MmapRegion {
    region: HostRegion,
}

impl MmapRegion {
    /// Maps `bytes` of zeroed memory at guest-physical `guest_addr`.
    ///
    /// With `huge_pages`, the range is marked for transparent huge pages: a destination that receives hundreds of
    /// megabytes faults them in 2 MiB at a time instead of 4 KiB at a time, which is most of its apply cost.
    pub fn new(guest_addr: u64, bytes: u64, huge_pages: bool) -> Result<Self, GuestError> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE as u64) {
            return Err(GuestError::BadSize(bytes));
        }
        let len = usize::try_from(bytes).map_err(|_| GuestError::BadSize(bytes))?;
        // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(GuestError::Map { bytes, source: std::io::Error::last_os_error() });
        }
        if huge_pages {
            // SAFETY: advice on the mapping just created; failure only means no huge pages, which is not an error.
            unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap returned a null mapping");
        // SAFETY: the mapping is valid for `len` bytes until Drop unmaps it, and `len` is a whole number of pages.
        let region = unsafe { HostRegion::new(guest_addr, ptr, len) };
        Ok(MmapRegion { region })
    }

    /// The mapping as a [`HostRegion`].
    pub fn region(&self) -> &HostRegion {
        &self.region
    }

    /// Another [`HostRegion`] for the same mapping, for a memory object that keeps this map alive beside its list of
    /// regions (the list is what [`super::GuestMemory::regions`] lends out).
    pub fn host_region(&self) -> HostRegion {
        let r = &self.region;
        // SAFETY: the same range `new` vouched for; the caller keeps `self`, and so the mapping, at least as long.
        unsafe { HostRegion::new(r.guest_addr(), NonNull::new(r.as_ptr()).expect("a mapping is never null"), r.len()) }
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in new(); no HostRegion copy outlives its owner by contract.
        unsafe { libc::munmap(self.region.as_ptr().cast(), self.region.len()) };
    }
}

/// Faults `pages` pages at `ptr` in for writing without changing their content (`MADV_POPULATE_WRITE`, Linux 5.14).
/// On older kernels this does nothing and pages fault in on first write as usual.
pub fn prefault_host(ptr: *mut u8, pages: u64) {
    // SAFETY: the advice only populates page tables of an existing mapping; it reads and writes no data, and a range
    // that is not mapped makes it fail with an error that is ignored.
    unsafe { libc::madvise(ptr.cast(), crate::num::usize_from(pages) * PAGE_SIZE, libc::MADV_POPULATE_WRITE) };
}

/// Pages of a private anonymous mapping that the kernel has populated (present in RAM or in swap).
///
/// A page of such a mapping that was never populated reads as zero, so the migration need not read or send it. This
/// asks `/proc/self/pagemap` rather than `mincore`, because `mincore` calls a swapped-out page absent and that page
/// is not zero. Only valid for private anonymous memory: a shared or file-backed mapping keeps data in the page cache
/// that is not mapped here.
///
/// The `PAGEMAP_SCAN` ioctl (Linux 6.7) returns the populated ranges alone, so untouched memory costs nothing; on an
/// older kernel, the pagemap is read instead, 8 bytes for every page.
pub fn resident_pages(region: &HostRegion) -> Result<Bitmap, GuestError> {
    let file = File::open("/proc/self/pagemap").map_err(GuestError::PageMap)?;
    match resident_by_scan(&file, region) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => resident_by_read(region),
        r => r.map_err(GuestError::PageMap),
    }
}

/// `struct pm_scan_arg` of `<linux/fs.h>`.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` of `<linux/fs.h>`: `start..end`, bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xC000_0000 | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16) | 0x6610;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;

fn resident_by_scan(pagemap: &File, region: &HostRegion) -> std::io::Result<Bitmap> {
    use std::os::fd::AsRawFd;
    let base = region.as_ptr() as u64;
    let end = base + region.len() as u64;
    let mut out = Bitmap::new(region.pages());
    let mut found = vec![PageRegion::default(); 1024];
    let mut at = base;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: at,
            end,
            walk_end: 0,
            vec: found.as_mut_ptr() as u64,
            vec_len: found.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: 0,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` page regions into `found`, which lives across
        // the call, and `walk_end` into `arg`; it only reads this process's page tables.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg as *mut PmScanArg) };
        let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
        for r in &found[..n.min(found.len())] {
            let (first, last) = (r.start.max(base), r.end.min(end));
            for p in (first - base) / PAGE_SIZE as u64..(last - base).div_ceil(PAGE_SIZE as u64) {
                out.set(p);
            }
        }
        if arg.walk_end <= at {
            return Err(std::io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        at = arg.walk_end;
    }
    Ok(out)
}

/// The fallback: every page's pagemap entry, read.
fn resident_by_read(region: &HostRegion) -> Result<Bitmap, GuestError> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pages = region.pages();
    let mut out = Bitmap::new(pages);
    let file = File::open("/proc/self/pagemap").map_err(GuestError::PageMap)?;
    let first_vpn = region.as_ptr() as u64 / PAGE_SIZE as u64;
    let mut buf = vec![0u8; 8 * 65536];
    let mut done = 0u64;
    while done < pages {
        let n = (pages - done).min(65536);
        let bytes = &mut buf[..n as usize * 8];
        file.read_exact_at(bytes, (first_vpn + done) * 8).map_err(GuestError::PageMap)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(entry.try_into().expect("chunks_exact(8)"));
            if e & (PRESENT | SWAPPED) != 0 {
                out.set(done + i as u64);
            }
        }
        done += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_pages_are_not_resident() {
        let m = MmapRegion::new(0, 64 * PAGE_SIZE as u64, false).unwrap();
        for p in [3usize, 40, 41] {
            // SAFETY: inside the 64-page mapping owned by `m`.
            unsafe { m.region().as_ptr().add(p * PAGE_SIZE).write_volatile(7) };
        }
        let r = resident_pages(m.region()).unwrap();
        assert_eq!(r.count_ones(), 3);
        assert!(r.get(3) && r.get(40) && r.get(41));
        // The scan and the read of every entry agree.
        assert_eq!(resident_by_read(m.region()).unwrap().words(), r.words());
    }

    #[test]
    fn a_scan_over_a_large_sparse_mapping_finds_just_what_was_touched() {
        // 4 GiB, six pages touched, some in runs across the scan's batches.
        let m = MmapRegion::new(0, 4 << 30, false).unwrap();
        // SAFETY: advice on the test's own mapping: 4 KiB pages, so that a touch populates one page whatever the
        // host's transparent huge page setting.
        unsafe { libc::madvise(m.region().as_ptr().cast(), m.region().len(), libc::MADV_NOHUGEPAGE) };
        let touched = [0u64, 1, 2, 513, 700_000, (1 << 20) - 1];
        for &p in &touched {
            // SAFETY: inside the mapping owned by `m`.
            unsafe { m.region().as_ptr().add(crate::num::usize_from(p) * PAGE_SIZE).write_volatile(1) };
        }
        let file = File::open("/proc/self/pagemap").unwrap();
        match resident_by_scan(&file, m.region()) {
            Ok(r) => {
                let got: Vec<u64> = touched.iter().copied().filter(|&p| r.get(p)).collect();
                assert_eq!((got.as_slice(), r.count_ones()), (&touched[..], 6));
            }
            Err(e) => println!("SKIPPED: PAGEMAP_SCAN is not supported here ({e}); the pagemap is read instead"),
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(MmapRegion::new(0, 0, false), Err(GuestError::BadSize(0))));
        assert!(matches!(MmapRegion::new(0, 100, false), Err(GuestError::BadSize(100))));
    }
}
