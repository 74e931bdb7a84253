//! Dirty bitmaps and the bitmap scan.
//!
//! A [`Bitmap`] holds one bit per guest page (global page index, regions concatenated in layout order). Guest
//! adapters fill one on every harvest. The scan turns a bitmap into [`PageRun`]s a 64-bit word at a time
//! (trailing-zero counts), and [`scan_parallel`] splits the word range across worker threads so that the scan and the
//! page encoding that consumes its runs both spread over all cores.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A plain (non-atomic) bitmap with one bit per page.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
}

/// A run of consecutive pages: `first`, `first + 1`, …, `first + count - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// Global index of the first page.
    pub first: u64,
    /// Number of pages in the run (at least 1).
    pub count: u64,
}

fn words_for(bits: u64) -> usize {
    usize::try_from(bits.div_ceil(64)).expect("bitmap larger than the address space")
}

impl Bitmap {
    /// An all-clear bitmap of `bits` pages.
    pub fn new(bits: u64) -> Self {
        Bitmap { words: vec![0; words_for(bits)], bits }
    }

    /// An all-set bitmap of `bits` pages.
    pub fn full(bits: u64) -> Self {
        let mut b = Bitmap { words: vec![u64::MAX; words_for(bits)], bits };
        b.mask_tail();
        b
    }

    /// Builds a bitmap from raw words (as KVM's dirty log hands them out). Bits past `bits` are dropped.
    pub fn from_words(words: Vec<u64>, bits: u64) -> Self {
        let mut b = Bitmap { words, bits };
        b.words.resize(words_for(bits), 0);
        b.mask_tail();
        b
    }

    fn mask_tail(&mut self) {
        let rem = self.bits % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Number of pages the bitmap covers.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True when the bitmap covers no pages.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Sets page `i`'s bit. Out-of-range indices are ignored: callers validate indices from untrusted sources.
    pub fn set(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clears page `i`'s bit.
    pub fn clear(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// Page `i`'s bit (false when out of range).
    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// The backing words, bit `i % 64` of word `i / 64` being page `i`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Keeps only the bits also set in `other` (both must cover the same number of pages).
    pub fn and_assign(&mut self, other: &Bitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= o;
        }
    }

    /// Clears every bit set in `other` (both must cover the same number of pages).
    pub fn and_not_assign(&mut self, other: &Bitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
    }

    /// ORs `other` into `self` (both must cover the same number of pages).
    pub fn or_assign(&mut self, other: &Bitmap) {
        debug_assert_eq!(self.bits, other.bits);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// ORs a region's own bitmap into `self`: bit 0 of `words[0]` is page `base`, and bits past the region's `pages`
    /// (the padding of its last word) are ignored. How an adapter joins per-region dirty logs (one per KVM slot or
    /// vm-memory region) into the guest's.
    pub fn or_region(&mut self, words: &[u64], base: u64, pages: u64) {
        runs_in_words(words, base, |run| {
            for p in run.first..(run.first + run.count).min(base + pages) {
                self.set(p);
            }
        });
    }

    /// Calls `f` for each run of set bits, in page order.
    pub fn for_each_run(&self, f: impl FnMut(PageRun)) {
        runs_in_words(&self.words, 0, f);
    }
}

/// Calls `f` for every run of set bits in `words`, where bit 0 of `words[0]` is page `base`.
///
/// Works a word at a time: all-zero words cost one compare, and inside a word each run costs two trailing-zero counts.
/// Runs that span word boundaries are merged.
pub fn runs_in_words(words: &[u64], base: u64, mut f: impl FnMut(PageRun)) {
    let mut open: Option<PageRun> = None;
    // Extends the open run when `first` continues it, else reports the open run and starts a new one. A run is only
    // reported once something non-adjacent follows, which is what merges runs across word boundaries.
    let mut push = |first: u64, count: u64, open: &mut Option<PageRun>| match open {
        Some(run) if run.first + run.count == first => run.count += count,
        _ => {
            if let Some(run) = open.replace(PageRun { first, count }) {
                f(run);
            }
        }
    };
    for (wi, &word) in words.iter().enumerate() {
        let word_base = base + wi as u64 * 64;
        let mut w = word;
        while w != 0 {
            let start = w.trailing_zeros();
            // The bits above the run's end are zero after the shift, so this counts the run and never exceeds 64.
            let len = (!(w >> start)).trailing_zeros();
            push(word_base + u64::from(start), u64::from(len), &mut open);
            if start + len >= 64 {
                break;
            }
            w &= !(((1u64 << len) - 1) << start);
        }
    }
    if let Some(run) = open {
        f(run);
    }
}

/// Words handed to a scan worker at a time: 64 words are 4096 pages (16 MiB of 4 KiB pages), small enough to balance
/// two to a few dozen workers and large enough that the shared cursor is touched rarely.
pub const SCAN_CHUNK_WORDS: usize = 64;

/// Scans `bitmap` on `workers` threads. Each worker builds its own state with `init(worker_index)`, receives the runs
/// of the chunks it claims through `each`, and the states are returned in worker order.
///
/// Chunks are claimed from a shared cursor, so a worker that meets dense words (and so more encoding work) takes
/// fewer chunks. A run that crosses a chunk boundary is reported as two runs.
pub fn scan_parallel<S, I, E>(bitmap: &Bitmap, workers: usize, init: I, each: E) -> Vec<S>
where
    S: Send,
    I: Fn(usize) -> S + Sync,
    E: Fn(&mut S, PageRun) + Sync,
{
    let workers = workers.max(1);
    let words = bitmap.words();
    let cursor = AtomicUsize::new(0);
    let work = |idx: usize| {
        let mut state = init(idx);
        loop {
            let start = cursor.fetch_add(SCAN_CHUNK_WORDS, Ordering::Relaxed);
            if start >= words.len() {
                break;
            }
            let end = (start + SCAN_CHUNK_WORDS).min(words.len());
            runs_in_words(&words[start..end], start as u64 * 64, |run| each(&mut state, run));
        }
        state
    };
    if workers == 1 {
        return vec![work(0)];
    }
    crossbeam::thread::scope(|s| {
        let handles: Vec<_> =
            (1..workers).map(|i| s.builder().name(format!("lm-scan{i}")).spawn(move |_| work(i))).collect();
        let mut states = vec![work(0)];
        states.extend(
            handles.into_iter().map(|h| h.expect("spawning a scan worker").join().expect("scan worker panicked")),
        );
        states
    })
    .expect("scan worker panicked")
}

/// A bitmap that guest writers set concurrently and the migration harvests, as KVM's dirty log behaves.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// An all-clear bitmap of `bits` pages.
    pub fn new(bits: u64) -> Self {
        AtomicBitmap { words: (0..words_for(bits)).map(|_| AtomicU64::new(0)).collect(), bits }
    }

    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True when it covers no pages.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Marks page `i` dirty. Writers call this *after* the write, so a harvest that clears the bit before the page is
    /// read can never lose the write (invariant 3).
    pub fn set(&self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
        }
    }

    /// Moves every set bit into `out` (ORed) and clears it here, word by word with an atomic swap.
    pub fn harvest_into(&self, out: &mut Bitmap) {
        debug_assert_eq!(out.len(), self.bits);
        for (dst, src) in out.words.iter_mut().zip(&self.words) {
            // Skip the swap (a write to the cache line) on clean words, which are the common case.
            if src.load(Ordering::Relaxed) != 0 {
                *dst |= src.swap(0, Ordering::AcqRel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs_of(b: &Bitmap) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        b.for_each_run(|r| v.push((r.first, r.count)));
        v
    }

    fn naive_runs(b: &Bitmap) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for i in 0..b.len() {
            if b.get(i) {
                match v.last_mut() {
                    Some((f, c)) if *f + *c == i => *c += 1,
                    _ => v.push((i, 1)),
                }
            }
        }
        v
    }

    #[test]
    fn a_region_s_bits_land_at_its_base_and_its_padding_is_ignored() {
        let mut b = Bitmap::new(200);
        // A 70-page region at page 100: pages 0, 63, 64 and 69 set, and 70..128 (padding) set too.
        let words = [1 | 1 << 63, 1 | 1 << 5 | !0u64 << 6];
        b.or_region(&words, 100, 70);
        let set: Vec<u64> = (0..200).filter(|&i| b.get(i)).collect();
        assert_eq!(set, [100, 163, 164, 169]);
    }

    #[test]
    fn runs_match_a_bit_by_bit_scan() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for bits in [1u64, 63, 64, 65, 128, 1000, 4096 * 3 + 17] {
            for density in [1u64, 8, 32, 60, 64] {
                let mut b = Bitmap::new(bits);
                for i in 0..bits {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    if (seed >> 58) < density {
                        b.set(i);
                    }
                }
                assert_eq!(runs_of(&b), naive_runs(&b), "bits {bits} density {density}");
            }
        }
    }

    #[test]
    fn runs_cross_word_boundaries_and_edges() {
        let mut b = Bitmap::new(200);
        for i in 60..140 {
            b.set(i);
        }
        b.set(199);
        b.set(0);
        assert_eq!(runs_of(&b), vec![(0, 1), (60, 80), (199, 1)]);
        assert_eq!(runs_of(&Bitmap::full(130)), vec![(0, 130)]);
        assert_eq!(runs_of(&Bitmap::new(130)), vec![]);
    }

    #[test]
    fn parallel_scan_covers_every_set_page_once() {
        let bits = 64 * SCAN_CHUNK_WORDS as u64 * 5 + 77;
        let mut b = Bitmap::new(bits);
        for i in (0..bits).filter(|i| i % 7 < 3 || (i / 1000) % 2 == 0) {
            b.set(i);
        }
        let states = scan_parallel(&b, 3, |_| Vec::new(), |v: &mut Vec<PageRun>, r| v.push(r));
        let mut seen = Bitmap::new(bits);
        for r in states.iter().flatten() {
            for p in r.first..r.first + r.count {
                assert!(!seen.get(p), "page {p} reported twice");
                seen.set(p);
            }
        }
        assert_eq!(seen, b);
    }

    #[test]
    fn harvest_moves_and_clears() {
        let a = AtomicBitmap::new(130);
        a.set(3);
        a.set(129);
        a.set(500); // out of range: ignored
        let mut out = Bitmap::new(130);
        a.harvest_into(&mut out);
        assert_eq!(runs_of(&out), vec![(3, 1), (129, 1)]);
        let mut again = Bitmap::new(130);
        a.harvest_into(&mut again);
        assert_eq!(again.count_ones(), 0);
    }
}
