//! The synthetic reference guest (docs/interfaces.md): anonymous memory filled with a fixed page mix, and vCPU threads that
//! rewrite pages of a hot set at a set rate while the migration copies them.

use super::{host_pages, GuestError, GuestMemory, HostRegion, MemoryLayout, MmapRegion, Vcpus, PAGE_SIZE};
use crate::dirty::{AtomicBitmap, Bitmap};
use crate::guest::DirtyLog;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The 64 words text pages are made of.
pub const TEXT_WORDS: [&str; 64] = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her",
    "it", "an", "are", "were", "be", "this", "which", "or", "had", "not", "but", "have", "they", "their", "one", "all",
    "been", "has", "more", "when", "who", "will", "would", "there", "out", "so", "what", "up", "its", "into", "only",
    "time", "about", "than", "other", "two", "some", "could", "after", "first", "also", "them", "then", "new", "these",
    "over", "most",
];

/// A vCPU's throttle time slice. A vCPU throttled to p % runs for (100 − p) % of each slice and sleeps the rest, the
/// way QEMU's auto-converge sleeps a vCPU for part of each 10 ms timer period.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// What a page of the synthetic guest holds, by page index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// All zero bytes.
    Zero,
    /// Words from [`TEXT_WORDS`] separated by single spaces.
    Text,
    /// Random, incompressible bytes.
    Random,
}

impl PageKind {
    /// The kind of page `index` (index % 4: 0 zero, 1 text, 2 and 3 random).
    pub fn of(index: u64) -> PageKind {
        match index % 4 {
            0 => PageKind::Zero,
            1 => PageKind::Text,
            _ => PageKind::Random,
        }
    }
}

/// The synthetic guest's parameters (docs/interfaces.md, "The reference guest").
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Share of RAM written before migration, in percent; the pages `0..touched` are written, the rest never touched.
    pub touched_pct: f64,
    /// Pages per second the vCPUs dirty, all vCPUs together.
    pub dirty_rate: u64,
    /// The dirtied pages are drawn from the first `hot_set_pct` percent of RAM.
    pub hot_set_pct: f64,
    /// vCPU threads.
    pub vcpus: u32,
    /// Seed for page contents and the vCPUs' choices.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            memory_bytes: 2 << 30,
            touched_pct: 75.0,
            dirty_rate: 0,
            hot_set_pct: 10.0,
            vcpus: 1,
            seed: 0x6c69_7665_6d69_6721,
        }
    }
}

/// SplitMix64: small, fast, and good enough for filler bytes and page choices.
#[derive(Debug, Clone, Copy)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Fills `page` with content of `kind`.
fn fill_page(kind: PageKind, page: &mut [u8], rng: &mut Rng) {
    match kind {
        PageKind::Zero => page.fill(0),
        PageKind::Random => {
            for chunk in page.chunks_exact_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        PageKind::Text => {
            let mut pos = 0;
            let mut bits = 0u64;
            let mut left = 0;
            while pos < page.len() {
                if left == 0 {
                    bits = rng.next();
                    left = 10; // ten 6-bit word choices per 64-bit draw
                }
                let word = TEXT_WORDS[(bits & 63) as usize].as_bytes();
                bits >>= 6;
                left -= 1;
                if pos > 0 {
                    page[pos] = b' ';
                    pos += 1;
                }
                let n = word.len().min(page.len() - pos);
                page[pos..pos + n].copy_from_slice(&word[..n]);
                pos += n;
            }
        }
    }
}

/// Memory and dirty log, shared by the guest handle and its vCPU threads.
#[derive(Debug)]
struct Memory {
    maps: Vec<MmapRegion>,
    regions: Vec<HostRegion>,
    dirty: AtomicBitmap,
}

impl GuestMemory for Memory {
    fn regions(&self) -> &[HostRegion] {
        &self.regions
    }
}

impl Memory {
    fn new(layout: &MemoryLayout, huge_pages: bool) -> Result<Self, GuestError> {
        let maps = layout
            .regions
            .iter()
            .map(|&(gpa, len)| MmapRegion::new(gpa, len, huge_pages))
            .collect::<Result<Vec<_>, _>>()?;
        let regions = maps.iter().map(MmapRegion::host_region).collect();
        let dirty = AtomicBitmap::new(layout.total_pages());
        Ok(Memory { maps, regions, dirty })
    }

    /// One page write by a vCPU: the content first, then the dirty bit, as KVM's dirty log sees a guest write.
    fn write_page(&self, page: u64, content: &[u8; PAGE_SIZE]) {
        if let Ok((ptr, _)) = host_pages(self, page, 1) {
            // SAFETY: host_pages points at a whole, page-aligned page of a live mapping; `content` is one page of a
            // separate buffer. The migration may read the page meanwhile, which volatile stores allow.
            unsafe { super::copy_to_guest(content.as_ptr(), ptr) };
            self.dirty.set(page);
        }
    }
}

/// The synthetic guest: memory, dirty log and vCPUs.
pub struct SyntheticGuest {
    mem: Arc<Memory>,
    vcpus: SyntheticVcpus,
}

impl std::fmt::Debug for SyntheticGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticGuest").field("pages", &self.mem.total_pages()).finish()
    }
}

impl SyntheticGuest {
    /// Maps and fills a source guest as `cfg` says, and starts its vCPUs dirtying memory.
    ///
    /// Filling is split over the machine's cores; the untouched tail is never written, so never faulted in.
    pub fn new(cfg: &SyntheticConfig) -> Result<Self, GuestError> {
        let layout = MemoryLayout { regions: vec![(0, cfg.memory_bytes)] };
        // 4 KiB pages on the source, so that the untouched pages really stay unpopulated.
        let mem = Arc::new(Memory::new(&layout, false)?);
        let pages = mem.total_pages();
        let touched = crate::num::u64_saturating(pages as f64 * cfg.touched_pct.clamp(0.0, 100.0) / 100.0).min(pages);
        populate(&mem.maps[0], touched, cfg.seed);
        let hot_pages =
            crate::num::u64_saturating(pages as f64 * cfg.hot_set_pct.clamp(0.0, 100.0) / 100.0).clamp(1, pages);
        let vcpus = SyntheticVcpus::start(mem.clone(), cfg.vcpus.max(1), cfg.dirty_rate, hot_pages, cfg.seed, false)?;
        Ok(SyntheticGuest { mem, vcpus })
    }

    /// An empty destination guest of the given layout, its vCPUs paused until a state blob is restored and resumed.
    /// A blob may bring up to `vcpus` vCPUs (the source's Hello says how many): each is a thread, so a blob from the
    /// wire may not ask for more.
    pub fn destination(layout: &MemoryLayout, vcpus: u32) -> Result<Self, GuestError> {
        let mem = Arc::new(Memory::new(layout, true)?);
        let v = SyntheticVcpus::start(mem.clone(), 0, 0, 1, 0, true)?;
        v.set_limit(vcpus);
        Ok(SyntheticGuest { mem, vcpus: v })
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &SyntheticVcpus {
        &self.vcpus
    }
}

impl GuestMemory for SyntheticGuest {
    fn regions(&self) -> &[HostRegion] {
        &self.mem.regions
    }

    fn prefault(&self, first: u64, count: u64) {
        let (mut page, end) = (first, first.saturating_add(count).min(self.mem.total_pages()));
        while page < end {
            match host_pages(&*self.mem, page, end - page) {
                Ok((ptr, n)) => {
                    super::prefault_host(ptr, n);
                    page += n;
                }
                Err(_) => break,
            }
        }
    }

    fn maybe_nonzero(&self) -> Result<Bitmap, GuestError> {
        // The maps are private and anonymous, so a never-populated page is zero.
        let mut out = Bitmap::new(self.mem.total_pages());
        let mut base = 0;
        for r in &self.mem.regions {
            super::resident_pages(r)?.for_each_run(|run| {
                for p in run.first..run.first + run.count {
                    out.set(base + p);
                }
            });
            base += r.pages();
        }
        Ok(out)
    }
}

impl DirtyLog for SyntheticGuest {
    fn harvest(&self, out: &mut Bitmap) -> Result<(), GuestError> {
        self.mem.dirty.harvest_into(out);
        Ok(())
    }
}

/// Writes pages `0..touched` of `map` with the reference page mix.
fn populate(map: &MmapRegion, touched: u64, seed: u64) {
    // SAFETY: the map was just created and nothing else has seen it yet.
    unsafe { fill_mix(map.region(), 0..touched, seed) };
}

/// Writes pages `pages` of `region` with the reference page mix (the kind by page index), on all cores. Page `i`'s content
/// depends only on the seed and `i`, so the result does not depend on how the work was split. Pages past the region's
/// end are ignored.
///
/// ```compile_fail,E0133
/// let m = livemig_engine::guest::MmapRegion::new(0, 4096, false).unwrap();
/// livemig_engine::guest::fill_mix(m.region(), 0..1, 7);
/// ```
/// ```
/// let m = livemig_engine::guest::MmapRegion::new(0, 4096, false).unwrap();
/// // SAFETY: nothing else has seen the new map.
/// unsafe { livemig_engine::guest::fill_mix(m.region(), 0..1, 7) };
/// ```
///
/// # Safety
/// For guests being built: nothing else may read or write those pages meanwhile (no vCPU runs, no migration reads).
pub unsafe fn fill_mix(region: &HostRegion, pages: std::ops::Range<u64>, seed: u64) {
    let (first, last) = (pages.start, pages.end.min(region.pages()));
    let count = last.saturating_sub(first);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let per = count.div_ceil(workers.max(1)).max(1);
    let base = region.as_ptr() as usize;
    std::thread::scope(|s| {
        for w in 0..workers {
            let (start, end) = (first + w * per, (first + (w + 1) * per).min(last));
            s.spawn(move || {
                for page in start..end {
                    // SAFETY: pages start..end of the region (clamped to it above), disjoint between workers, and by
                    // this function's contract nobody else reads or writes them meanwhile.
                    let slice = unsafe {
                        std::slice::from_raw_parts_mut(
                            (base + crate::num::usize_from(page) * PAGE_SIZE) as *mut u8,
                            PAGE_SIZE,
                        )
                    };
                    let mut rng = Rng(seed ^ page.wrapping_mul(0x2545_f491_4f6c_dd1d));
                    fill_page(PageKind::of(page), slice, &mut rng);
                }
            });
        }
    });
}

/// What the vCPU threads share with the handle that controls them.
#[derive(Debug)]
struct Control {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// Checked by the vCPUs between page writes; set together with `Ctl::paused` or `Ctl::stop`.
    pause_req: AtomicBool,
    /// Throttle in thousandths of a percent.
    throttle_milli: AtomicU32,
    pages_written: AtomicU64,
}

#[derive(Debug)]
struct Ctl {
    paused: bool,
    stop: bool,
    parked: usize,
    rate: u64,
    hot_pages: u64,
    /// The most vCPUs a restored state may bring.
    limit: usize,
    /// Per vCPU: RNG state and pages written. The state blob; each vCPU stores its own here when it parks.
    states: Vec<(u64, u64)>,
}

/// The synthetic guest's vCPU threads.
pub struct SyntheticVcpus {
    mem: Arc<Memory>,
    control: Arc<Control>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for SyntheticVcpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticVcpus").field("throttle", &self.throttle()).finish()
    }
}

const STATE_MAGIC: &[u8; 4] = b"LMSV";
const STATE_VERSION: u32 = 1;

impl SyntheticVcpus {
    fn start(mem: Arc<Memory>, n: u32, rate: u64, hot_pages: u64, seed: u64, paused: bool) -> Result<Self, GuestError> {
        let states = (0..u64::from(n)).map(|i| (seed.wrapping_add(i.wrapping_mul(0x9e37_79b9)), 0)).collect();
        let control = Arc::new(Control {
            ctl: Mutex::new(Ctl { paused, stop: false, parked: 0, rate, hot_pages, limit: n as usize, states }),
            cv: Condvar::new(),
            pause_req: AtomicBool::new(paused),
            throttle_milli: AtomicU32::new(0),
            pages_written: AtomicU64::new(0),
        });
        let v = SyntheticVcpus { mem, control, threads: Mutex::new(Vec::new()) };
        v.spawn_threads(n as usize)?;
        Ok(v)
    }

    fn spawn_threads(&self, n: usize) -> Result<(), GuestError> {
        let mut threads = self.threads.lock().expect("vcpu thread list poisoned");
        for i in threads.len()..n {
            let (mem, control) = (self.mem.clone(), self.control.clone());
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_loop(i, &mem, &control))
                .map_err(GuestError::Thread)?;
            threads.push(h);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.control.ctl.lock().expect("vcpu control poisoned")
    }

    /// Pages the vCPUs have written since they started, all together.
    pub fn pages_written(&self) -> u64 {
        self.control.pages_written.load(Ordering::Relaxed)
    }

    /// Number of vCPUs.
    pub fn count(&self) -> usize {
        self.lock().states.len()
    }

    /// Sets the most vCPUs a state blob may bring (a destination's, from the source's Hello).
    pub fn set_limit(&self, vcpus: u32) {
        self.lock().limit = vcpus as usize;
    }
}

impl Vcpus for SyntheticVcpus {
    fn set_throttle(&self, pct: f64) {
        let milli = crate::num::u32_saturating(pct.clamp(0.0, 99.0) * 1000.0);
        self.control.throttle_milli.store(milli, Ordering::Relaxed);
    }

    fn throttle(&self) -> f64 {
        f64::from(self.control.throttle_milli.load(Ordering::Relaxed)) / 1000.0
    }

    fn pause(&self) {
        let mut ctl = self.lock();
        ctl.paused = true;
        self.control.pause_req.store(true, Ordering::SeqCst);
        self.control.cv.notify_all();
        let threads = self.threads.lock().expect("vcpu thread list poisoned").len();
        while ctl.parked < threads {
            ctl = self.control.cv.wait(ctl).expect("vcpu control poisoned");
        }
    }

    fn resume(&self) {
        let mut ctl = self.lock();
        ctl.paused = false;
        self.control.pause_req.store(false, Ordering::SeqCst);
        self.control.cv.notify_all();
    }

    fn is_paused(&self) -> bool {
        self.lock().paused
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        let ctl = self.lock();
        let mut out = Vec::with_capacity(28 + ctl.states.len() * 16);
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&crate::num::u32_len(ctl.states.len()).to_le_bytes());
        out.extend_from_slice(&ctl.rate.to_le_bytes());
        out.extend_from_slice(&ctl.hot_pages.to_le_bytes());
        for &(rng, written) in &ctl.states {
            out.extend_from_slice(&rng.to_le_bytes());
            out.extend_from_slice(&written.to_le_bytes());
        }
        Ok(out)
    }

    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let bad = |why: &str| GuestError::BadState(why.to_string());
        let u32_at = |o: usize| blob.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        let u64_at = |o: usize| blob.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if blob.get(..4) != Some(STATE_MAGIC) {
            return Err(bad("not a synthetic-guest vCPU state (bad magic)"));
        }
        match u32_at(4) {
            Some(STATE_VERSION) => {}
            Some(v) => return Err(GuestError::BadState(format!("unknown state version {v}"))),
            None => return Err(bad("truncated header")),
        }
        let n = u32_at(8).ok_or_else(|| bad("truncated header"))? as usize;
        let limit = self.lock().limit;
        if n > limit {
            return Err(GuestError::BadState(format!("state for {n} vCPUs, this guest was built for {limit}")));
        }
        let (rate, hot) = (u64_at(12).ok_or_else(|| bad("truncated"))?, u64_at(20).ok_or_else(|| bad("truncated"))?);
        if blob.len() != 28 + n * 16 {
            return Err(GuestError::BadState(format!("{} bytes for {n} vCPUs, expected {}", blob.len(), 28 + n * 16)));
        }
        if hot == 0 || hot > self.mem.total_pages() {
            return Err(GuestError::BadState(format!("hot set of {hot} pages does not fit the guest")));
        }
        let states =
            (0..n).map(|i| (u64_at(28 + i * 16).unwrap_or(0), u64_at(36 + i * 16).unwrap_or(0))).collect::<Vec<_>>();
        let written: u64 = states.iter().map(|s| s.1).sum();
        {
            let mut ctl = self.lock();
            if !ctl.paused {
                return Err(bad("vCPUs must be paused to restore their state"));
            }
            ctl.rate = rate;
            ctl.hot_pages = hot;
            ctl.states = states;
        }
        self.control.pages_written.store(written, Ordering::Relaxed);
        self.spawn_threads(n)?;
        // Wait for new threads to park so that a following resume() finds them in their paused state.
        let mut ctl = self.lock();
        while ctl.parked < n {
            ctl = self.control.cv.wait(ctl).expect("vcpu control poisoned");
        }
        Ok(())
    }

    fn pages_written(&self) -> Option<u64> {
        Some(SyntheticVcpus::pages_written(self))
    }
}

impl Drop for SyntheticVcpus {
    fn drop(&mut self) {
        {
            let mut ctl = self.lock();
            ctl.stop = true;
            self.control.pause_req.store(true, Ordering::SeqCst);
            self.control.cv.notify_all();
        }
        for h in self.threads.lock().expect("vcpu thread list poisoned").drain(..) {
            let _ = h.join();
        }
    }
}

/// One vCPU: rewrites random hot-set pages at its share of the dirty rate, sleeping the throttled share of each
/// [`THROTTLE_SLICE`], and parks whenever a pause is asked for.
fn vcpu_loop(id: usize, mem: &Memory, control: &Control) {
    let mut buf = Box::new([0u8; PAGE_SIZE]);
    let (mut rng, mut written) = (Rng(0), 0u64);
    let mut ctl = control.ctl.lock().expect("vcpu control poisoned");
    // Start parked so that the first iteration loads this vCPU's state.
    let mut must_park = true;
    loop {
        if must_park || control.pause_req.load(Ordering::Acquire) {
            if let Some(s) = ctl.states.get_mut(id) {
                if !must_park {
                    *s = (rng.0, written);
                }
            }
            ctl.parked += 1;
            control.cv.notify_all();
            while ctl.paused && !ctl.stop {
                ctl = control.cv.wait(ctl).expect("vcpu control poisoned");
            }
            ctl.parked -= 1;
            if ctl.stop {
                return;
            }
            must_park = false;
            let Some(&(r, w)) = ctl.states.get(id) else {
                return;
            };
            (rng, written) = (Rng(r), w);
        }
        let n = ctl.states.len().max(1) as u64;
        let (rate, hot) = (ctl.rate / n + u64::from(id as u64 % n < ctl.rate % n), ctl.hot_pages);
        if rate == 0 {
            ctl = control.cv.wait(ctl).expect("vcpu control poisoned");
            continue;
        }
        drop(ctl);
        // One throttle slice: write at `rate` during the running share, then sleep the throttled share.
        let slice_start = Instant::now();
        let throttle = f64::from(control.throttle_milli.load(Ordering::Relaxed)) / 100_000.0;
        let run_for = THROTTLE_SLICE.mul_f64(1.0 - throttle);
        let mut done_in_slice = 0u64;
        loop {
            if control.pause_req.load(Ordering::Acquire) {
                break;
            }
            let elapsed = slice_start.elapsed();
            if elapsed >= run_for {
                break;
            }
            // Pages due by now in this slice; the first is due at its start.
            let due = crate::num::u64_saturating(rate as f64 * elapsed.as_secs_f64()) + 1;
            if due <= done_in_slice {
                std::thread::sleep(Duration::from_micros(200).min(run_for - elapsed));
                continue;
            }
            let owed = (due - done_in_slice).min(64);
            for _ in 0..owed {
                let page = rng.next() % hot;
                fill_page(PageKind::of(page), &mut buf[..], &mut rng);
                mem.write_page(page, &buf);
                written += 1;
                done_in_slice += 1;
            }
            control.pages_written.fetch_add(owed, Ordering::Relaxed);
        }
        ctl = control.ctl.lock().expect("vcpu control poisoned");
        let slice_end = slice_start + THROTTLE_SLICE;
        let now = Instant::now();
        if now < slice_end && !control.pause_req.load(Ordering::Acquire) {
            ctl = control.cv.wait_timeout(ctl, slice_end - now).expect("vcpu control poisoned").0;
        }
    }
}

impl super::Guest for SyntheticGuest {
    fn memory(&self) -> &dyn GuestMemory {
        self
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }
    fn vcpus(&self) -> &dyn Vcpus {
        &self.vcpus
    }
    fn kind(&self) -> &'static str {
        "synthetic"
    }
    fn vcpu_count(&self) -> u32 {
        crate::num::u32_len(self.vcpus.count())
    }
}
