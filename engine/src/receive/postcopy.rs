//! The destination's side of post-copy: guest memory under userfaultfd, the pages still missing, and the faults.
//!
//! Before the switch the destination learns which pages the source still holds the only current copy of, and
//! [`discard`]s whatever older copy of them guest memory holds (`MADV_DONTNEED`). At the switch [`Postcopy::arm`]
//! registers every region in missing mode and is handed to the [`super::Receiver`] as its [`Placer`]: from then on
//! every page the receiver applies is placed whole by the kernel (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`), which wakes any
//! vCPU waiting on it, and a page already present is left alone (so a page pushed and also pulled is placed once, and
//! never over a write the guest made). The receiver reads such frames whole into buffers first
//! ([`super::Receiver::apply_frame_in_place`] does so once a placer is set).
//!
//! A vCPU that touches a page not populated stops in the kernel and the fault comes out of the descriptor
//! ([`Postcopy::next_faults`]). A page still missing is asked of the source (the driver sends the request); any other
//! unpopulated page holds zeros (the source sent it as a zero page, which fresh memory already is, or never sent it)
//! and is placed as one at once. The time from a fault's arrival to its page's placement is the fault latency.
//!
//! When every page has arrived the driver [`Postcopy::finish`]es: the descriptor is closed and the guest's memory
//! behaves as plain memory again.

use super::{ApplyError, ApplyState, FrameKey, InPlaceError};
use crate::dirty::{runs_in_words, Bitmap};
use crate::encode::PageEntry;
use crate::guest::uffd::{Placed, Uffd, UffdError};
use crate::guest::{host_pages, GuestError, GuestMemory, PAGE_SIZE};
use crate::num::usize_from;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Where the receiver puts a checked page in post-copy, instead of writing it in place.
pub trait Placer: Send + Sync {
    /// Places page `page` of guest memory: `data` (one page), or zeros for None.
    fn place(&self, page: u64, data: Option<&[u8]>) -> Result<Placed, ApplyError>;
}

/// What one fault calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A missing page, not yet asked for: ask the source for it.
    Request(u64),
    /// A missing page already asked for, or one placed meanwhile: nothing to do.
    Waiting(u64),
    /// A page that holds zeros: placed at once.
    Zero(u64),
}

/// Fault latency histogram buckets: the upper bound of bucket `i` is `2^i` microseconds; the last takes the rest.
pub const LATENCY_BUCKETS: usize = 26;

/// What post-copy did on the destination.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostcopyStats {
    /// Faults on pages that were missing (each asked of the source once).
    pub faults: u64,
    /// Faults on pages that hold zeros, placed locally.
    pub zero_faults: u64,
    /// Pages placed (each page once, however it came).
    pub placed: u64,
    /// Copies that found their page already present (a push racing its pull).
    pub already_present: u64,
    /// The guest's own count of pages written, read when every page had arrived (0 where the guest keeps none).
    pub guest_pages_written: u64,
    /// Fault latency in microseconds, from the fault's arrival to its page's placement: p50, p99 and max.
    pub latency_us: [f64; 3],
    /// Fault latency histogram ([`LATENCY_BUCKETS`] buckets, powers of two in microseconds).
    pub histogram: Vec<u64>,
}

/// The most fault latencies kept whole for the percentiles; past it, only the histogram counts.
const MAX_SAMPLES: usize = 1 << 20;

/// Guest memory under post-copy.
#[derive(Debug)]
pub struct Postcopy {
    /// Closed by [`Postcopy::finish`]; placements hold it shared.
    uffd: RwLock<Option<Uffd>>,
    /// Per region: host address, length, first page.
    regions: Vec<(usize, usize, u64)>,
    /// Pages not yet placed, one bit each.
    missing: Vec<AtomicU64>,
    remaining: AtomicU64,
    /// Missing pages asked for, and when their first fault arrived; a bit per page says which are in the map, so that
    /// placing a page nobody asked for (most of the push) takes no lock.
    asked: Mutex<HashMap<u64, Instant>>,
    asked_bits: Vec<AtomicU64>,
    latencies: Mutex<(Vec<u32>, Vec<u64>)>,
    faults: AtomicU64,
    zero_faults: AtomicU64,
    placed: AtomicU64,
    already: AtomicU64,
}

/// Drops whatever copy guest memory holds of `pages` (`MADV_DONTNEED`), so that once [`Postcopy::arm`]ed a touch of
/// one faults instead of reading stale bytes. Call it with nothing reading or writing those pages: the vCPUs paused
/// (or not yet started) and no page being applied. It costs a system call per run of pages (about a microsecond
/// here), so the destination drops the pages it learns of before the source pauses, and only the rest in the pause.
pub fn discard(mem: &dyn GuestMemory, pages: &Bitmap) {
    discard_words(mem, pages.words(), 0);
}

/// [`discard`] for the pages of bitmap words whose first bit is page `base` (a Missing frame's, as it came).
pub fn discard_words(mem: &dyn GuestMemory, words: &[u64], base: u64) {
    runs_in_words(words, base, |run| {
        let mut page = run.first;
        let end = run.first + run.count;
        while page < end {
            let Ok((addr, n)) = host_pages(mem, page, end - page) else { return };
            // SAFETY: the range lies inside a live anonymous private mapping of guest memory, and nothing reads or
            // writes it now (the caller's contract); dropping its pages only makes them read as missing (or zero).
            unsafe { libc::madvise(addr.cast(), usize_from(n) * PAGE_SIZE, libc::MADV_DONTNEED) };
            page += n;
        }
    });
}

/// Drops again any of `missing` that came back since [`discard`] (something read or wrote it: a guest's restore that
/// looks at its memory), so that every missing page faults once armed. Returns how many there were.
pub fn discard_touched(mem: &dyn GuestMemory, missing: &Bitmap) -> Result<u64, GuestError> {
    let mut present = Bitmap::new(missing.len());
    let mut base = 0u64;
    for r in mem.regions() {
        let resident = crate::guest::resident_pages(r)?;
        present.or_region(resident.words(), base, r.pages());
        base += r.pages();
    }
    present.and_assign(missing);
    discard(mem, &present);
    Ok(present.count_ones())
}

/// Per region: host address, length, first page.
fn regions_of(mem: &dyn GuestMemory) -> Vec<(usize, usize, u64)> {
    let mut regions = Vec::new();
    let mut base = 0u64;
    for r in mem.regions() {
        regions.push((r.as_ptr() as usize, r.len(), base));
        base += r.pages();
    }
    regions
}

impl Postcopy {
    /// Takes `mem` under userfaultfd with `missing` pages still to come, which must have been [`discard`]ed. Call it
    /// with nothing writing guest memory: the vCPUs paused and no page being applied.
    pub fn arm(mem: &dyn GuestMemory, missing: &Bitmap) -> Result<Postcopy, UffdError> {
        let uffd = Uffd::new()?;
        let regions = regions_of(mem);
        for &(addr, len, _) in &regions {
            // SAFETY: each region is a whole, page-aligned anonymous private mapping that outlives this object (the
            // guest owns it for the migration and after).
            unsafe { uffd.register_missing(addr as *mut u8, len) }?;
        }
        let words: Vec<AtomicU64> = missing.words().iter().map(|&w| AtomicU64::new(w)).collect();
        let asked_bits = missing.words().iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Postcopy {
            uffd: RwLock::new(Some(uffd)),
            regions,
            missing: words,
            remaining: AtomicU64::new(missing.count_ones()),
            asked: Mutex::new(HashMap::new()),
            asked_bits,
            latencies: Mutex::new((Vec::new(), vec![0; LATENCY_BUCKETS])),
            faults: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            placed: AtomicU64::new(0),
            already: AtomicU64::new(0),
        })
    }

    /// Pages not yet placed.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    fn is_missing(&self, page: u64) -> bool {
        self.missing.get(usize_from(page / 64)).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Waits up to `within` for faults, then takes every other fault already queued (up to `max`), and says what each
    /// calls for. Zero pages are placed here. Empty when none came, or once [`Postcopy::finish`] ran.
    pub fn next_faults(&self, within: Duration, max: usize) -> Result<Vec<Fault>, UffdError> {
        let mut out = Vec::new();
        let mut wait = within;
        while out.len() < max {
            let addr = {
                let u = self.uffd.read().unwrap_or_else(|e| e.into_inner());
                let Some(u) = u.as_ref() else { break };
                // Holding the lock shared while polling only delays finish() by the poll.
                match u.next_fault(wait)? {
                    Some(a) => a,
                    None => break,
                }
            };
            wait = Duration::ZERO;
            let Some(page) = self.page_of(addr) else { continue };
            out.push(self.fault(page)?);
        }
        Ok(out)
    }

    /// What the fault on `page` calls for (and the zero page placed, if that is it).
    fn fault(&self, page: u64) -> Result<Fault, UffdError> {
        if self.is_missing(page) {
            let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
            if asked.contains_key(&page) || !self.is_missing(page) {
                return Ok(Fault::Waiting(page));
            }
            asked.insert(page, Instant::now());
            if let Some(w) = self.asked_bits.get(usize_from(page / 64)) {
                w.fetch_or(1 << (page % 64), Ordering::AcqRel);
            }
            self.faults.fetch_add(1, Ordering::Relaxed);
            return Ok(Fault::Request(page));
        }
        if let Some(addr) = host_addr(&self.regions, page) {
            let u = self.uffd.read().unwrap_or_else(|e| e.into_inner());
            if let Some(u) = u.as_ref() {
                // SAFETY: one page inside a registered region of guest memory; the kernel places it atomically.
                if unsafe { u.zero(addr as *mut u8, PAGE_SIZE) }? == Placed::Now {
                    self.zero_faults.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(Fault::Zero(page))
    }

    fn page_of(&self, addr: u64) -> Option<u64> {
        let addr = usize::try_from(addr).ok()?;
        self.regions
            .iter()
            .find(|&&(a, l, _)| addr >= a && addr < a + l)
            .map(|&(a, _, first)| first + ((addr - a) / PAGE_SIZE) as u64)
    }

    /// Pages asked of the source and not placed yet, in order. After the connection the requests went on was lost,
    /// they are asked again on the new one: the answers may have been lost with it.
    pub fn awaited(&self) -> Vec<u64> {
        let asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        let mut pages: Vec<u64> = asked.keys().copied().filter(|&p| self.is_missing(p)).collect();
        pages.sort_unstable();
        pages
    }

    /// Closes the descriptor: any vCPU still waiting retries, and from now on memory faults in as plain memory. Call
    /// it when every page has arrived, or, when the migration failed, with the vCPUs paused.
    pub fn finish(&self) {
        drop(self.uffd.write().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// What post-copy did so far.
    pub fn stats(&self) -> PostcopyStats {
        let (samples, histogram) = {
            let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
            (l.0.clone(), l.1.clone())
        };
        PostcopyStats {
            faults: self.faults.load(Ordering::Relaxed),
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            placed: self.placed.load(Ordering::Relaxed),
            already_present: self.already.load(Ordering::Relaxed),
            guest_pages_written: 0,
            latency_us: percentiles(samples),
            histogram,
        }
    }

    fn record_latency(&self, page: u64) {
        let bit = 1 << (page % 64);
        let asked =
            self.asked_bits.get(usize_from(page / 64)).is_some_and(|w| w.fetch_and(!bit, Ordering::AcqRel) & bit != 0);
        if !asked {
            return;
        }
        let Some(at) = self.asked.lock().unwrap_or_else(|e| e.into_inner()).remove(&page) else { return };
        let us = u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX);
        let bucket = (32 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if l.0.len() < MAX_SAMPLES {
            l.0.push(us);
        }
        l.1[bucket] += 1;
    }
}

impl Placer for Postcopy {
    fn place(&self, page: u64, data: Option<&[u8]>) -> Result<Placed, ApplyError> {
        let Some(dst) = host_addr(&self.regions, page) else {
            return Err(ApplyError::Place { page, reason: "not in guest memory".into() });
        };
        if data.is_some_and(|d| d.len() != PAGE_SIZE) {
            return Err(ApplyError::Place { page, reason: "not one page of data".into() });
        }
        let dst = dst as *mut u8;
        let placed = {
            let u = self.uffd.read().unwrap_or_else(|e| e.into_inner());
            let Some(u) = u.as_ref() else {
                return Err(ApplyError::Place { page, reason: "post-copy already finished".into() });
            };
            let r = match data {
                // SAFETY: `dst` is page `page` of a registered region of guest memory and `d` one page; the kernel
                // places it atomically and never over a present page.
                Some(d) => unsafe { u.copy(dst, d) },
                // SAFETY: as above, for one page of zeros.
                None => unsafe { u.zero(dst, PAGE_SIZE) },
            };
            r.map_err(|e| ApplyError::Place { page, reason: e.to_string() })?
        };
        if let Some(w) = self.missing.get(usize_from(page / 64)) {
            let bit = 1 << (page % 64);
            if w.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                self.remaining.fetch_sub(1, Ordering::AcqRel);
            }
        }
        match placed {
            Placed::Now => self.placed.fetch_add(1, Ordering::Relaxed),
            Placed::AlreadyThere => self.already.fetch_add(1, Ordering::Relaxed),
        };
        self.record_latency(page);
        Ok(placed)
    }
}

impl super::Receiver<'_> {
    /// Switches to post-copy: from now on every page is placed through `placer`. Call it with no frame being
    /// applied. False if a placer was already set.
    pub fn set_placer(&self, placer: Arc<dyn Placer>) -> bool {
        self.placer.set(placer).is_ok()
    }

    /// Whether post-copy has switched: pages go through a placer.
    pub fn is_placing(&self) -> bool {
        self.placer.get().is_some()
    }

    /// Post-copy's form of [`Receiver::apply_frame_in_place`]: a page must be placed whole by the kernel, so the whole
    /// payload is read into buffers first and the frame applied from them.
    pub(super) fn apply_frame_buffered(
        &self,
        key: FrameKey,
        entries: &[PageEntry],
        zstd_len: usize,
        st: &mut ApplyState,
        read: impl FnOnce(&mut [std::io::IoSliceMut<'_>]) -> std::io::Result<()>,
    ) -> Result<(), InPlaceError> {
        let mut len = 0usize;
        for e in entries {
            self.check_entry(e)?;
            len += e.len as usize;
        }
        st.payload.resize(len, 0);
        st.zin.resize(zstd_len, 0);
        read(&mut [std::io::IoSliceMut::new(&mut st.payload), std::io::IoSliceMut::new(&mut st.zin)])
            .map_err(InPlaceError::Io)?;
        st.others.clear();
        st.others.extend_from_slice(entries);
        self.apply_rest(key, st)
    }
}

/// The host address of page `page`.
fn host_addr(regions: &[(usize, usize, u64)], page: u64) -> Option<usize> {
    regions.iter().find_map(|&(addr, len, first)| {
        (page >= first && page < first + (len / PAGE_SIZE) as u64).then(|| addr + usize_from(page - first) * PAGE_SIZE)
    })
}

/// p50, p99 and max of `samples` (zeros when there are none).
fn percentiles(mut samples: Vec<u32>) -> [f64; 3] {
    if samples.is_empty() {
        return [0.0; 3];
    }
    samples.sort_unstable();
    let last = samples.len() - 1;
    // The rank of quantile q, in integers: q in hundredths.
    let at = |q: usize| f64::from(samples[(last * q + 50) / 100]);
    [at(50), at(99), at(100)]
}
