//! Page encoding: zero pages, the compression decision, batches, and the per-page hash tables.
//!
//! A scan worker feeds page runs to its [`BatchEncoder`]. For each page the encoder copies it out of guest memory
//! once, and from that one copy: detects an all-zero page with a word-wide check (sent as a marker), records the
//! page's xxh3 in the sender's [`HashTable`], and, when the batch is being compressed and a cheap sample says the page
//! is compressible, tries lz4. Whether a batch is compressed is the [`CodecPolicy`]'s call: only when compression
//! saves wire time at the measured link rate. Full batches go to a sink (the link).
//!
//! Both sides keep a [`HashTable`]: the sender of what it sent, the receiver of what it applied. Because the copy that
//! is hashed is the copy that is sent, and a page written during its send is dirty again (invariant 3), the two
//! tables' roots are equal at switchover exactly when the memories are.

use crate::dirty::PageRun;
use crate::guest::{host_pages, GuestError, GuestMemory, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// How a page travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// All zero: no payload.
    Zero = 0,
    /// The page's bytes as they are.
    Raw = 1,
    /// An lz4 block that decompresses to exactly one page.
    Lz4 = 2,
}

impl Codec {
    /// The codec for a wire code, if it names one.
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Zero),
            1 => Some(Codec::Raw),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }
}

/// One page of a batch: which page, how it is coded, and how many payload bytes it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// Global page index.
    pub page: u64,
    /// How the payload is coded.
    pub codec: Codec,
    /// Payload bytes (0 for zero pages, [`PAGE_SIZE`] for raw ones).
    pub len: u32,
    /// xxh3 of the page's content (decoded). The receiver checks it before applying the page, which makes it both
    /// the payload's integrity check and the value both hash tables record.
    pub hash: u64,
}

/// Counters over encoded pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Zero pages (sent as markers).
    pub zero: u64,
    /// Pages sent lz4-compressed.
    pub compressed: u64,
    /// Pages sent raw.
    pub raw: u64,
}

impl PageCounts {
    /// All pages.
    pub fn total(&self) -> u64 {
        self.zero + self.compressed + self.raw
    }

    /// Adds `o` to `self`.
    pub fn add(&mut self, o: &PageCounts) {
        self.zero += o.zero;
        self.compressed += o.compressed;
        self.raw += o.raw;
    }
}

/// A batch of encoded pages from one round: the entries, and their payloads back to back in entry order.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    /// The round (epoch) the pages were read in.
    pub epoch: u32,
    /// One entry per page.
    pub entries: Vec<PageEntry>,
    /// The payloads, concatenated.
    pub payload: Vec<u8>,
    /// What the batch holds.
    pub counts: PageCounts,
}

impl EncodedBatch {
    /// An empty batch with room for `pages` pages.
    pub fn with_capacity(pages: usize) -> Self {
        EncodedBatch {
            epoch: 0,
            entries: Vec::with_capacity(pages),
            payload: Vec::with_capacity(pages * PAGE_SIZE),
            counts: PageCounts::default(),
        }
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.payload.clear();
        self.counts = PageCounts::default();
    }
}

/// True when every byte of `page` is zero. Checks 64 bytes per step with OR-reduced words, which the compiler turns
/// into vector loads, and exits at the first non-zero block.
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    for b in &mut blocks {
        let mut acc = 0u64;
        for w in b.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8-byte chunk"));
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// A cheap guess whether lz4 will shrink `page`: counts distinct byte values over 128 bytes sampled at a stride.
/// Random data shows about 100 distinct values in such a sample, text or structured data far fewer. Costs about as
/// much as reading 128 bytes, against several microseconds for a failed lz4 attempt.
pub fn looks_compressible(page: &[u8]) -> bool {
    let mut seen = [0u64; 4];
    let stride = (page.len() / 128).max(1);
    for &b in page.iter().step_by(stride) {
        seen[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    let distinct: u32 = seen.iter().map(|w| w.count_ones()).sum();
    distinct <= 64
}

/// The xxh3 of a page.
pub fn page_hash(page: &[u8]) -> u64 {
    xxh3_64(page)
}

/// The xxh3 of an all-zero page.
pub fn zero_page_hash() -> u64 {
    static H: OnceLock<u64> = OnceLock::new();
    *H.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
}

/// One xxh3 per guest page: what the sender sent, or what the receiver applied. Starts as all-zero pages, which is
/// what both sides hold for a page never sent.
#[derive(Debug)]
pub struct HashTable {
    hashes: Vec<AtomicU64>,
}

impl HashTable {
    /// A table of `pages` zero pages.
    pub fn new(pages: u64) -> Self {
        let z = zero_page_hash();
        HashTable { hashes: (0..pages).map(|_| AtomicU64::new(z)).collect() }
    }

    /// Records page `page`'s hash. Each page is set by one worker at a time (a round sends a page once), so a relaxed
    /// store is enough; the round barrier orders rounds.
    pub fn set(&self, page: u64, hash: u64) {
        if let Some(h) = self.hashes.get(page as usize) {
            h.store(hash, Ordering::Relaxed);
        }
    }

    /// Page `page`'s recorded hash.
    pub fn get(&self, page: u64) -> Option<u64> {
        self.hashes.get(page as usize).map(|h| h.load(Ordering::Relaxed))
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// True for an empty table.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// An xxh3 over the whole table, in page order: the digest the two sides compare. 4 MiB for a 2 GiB guest, a few
    /// hundred microseconds.
    pub fn root(&self) -> u64 {
        let mut h = Xxh3::new();
        let mut buf = [0u8; 8 * 512];
        for chunk in self.hashes.chunks(512) {
            for (i, v) in chunk.iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&v.load(Ordering::Relaxed).to_le_bytes());
            }
            h.update(&buf[..chunk.len() * 8]);
        }
        h.digest()
    }
}

/// A root over the hashes of guest memory as it is now: what `--verify full` compares. Reads every page.
pub fn memory_root(mem: &dyn GuestMemory) -> Result<u64, GuestError> {
    let pages = mem.total_pages();
    let table = HashTable::new(pages);
    let mut scratch = vec![0u8; PAGE_SIZE];
    for p in 0..pages {
        crate::guest::read_page(mem, p, &mut scratch)?;
        table.set(p, page_hash(&scratch));
    }
    Ok(table.root())
}

/// What the encoders know about the link, the machine and the codec, shared between them and the driver that
/// measures the link.
///
/// Whether compression pays depends on what a wire byte costs, and that is not only wire time: each byte is copied,
/// segmented, shaped and copied again by CPUs that may also be the ones compressing. On loopback a byte saved is cheap
/// and lz4 costs more than it saves; over shaped veth links a byte saved is worth far more CPU, and lz4 pays. So the
/// policy decides by measuring the outcome:
///
/// - A model gives the first answer: compress when the CPU time is less than the wire time saved, or when idle cores
///   (from the OS) can do it while keeping pace with the link. Its inputs are measured: the link rate from acks,
///   idle cores from `/proc/stat`, the codec's speed and ratio from the batches it compressed (every
///   [`PROBE_EVERY`]th batch of a worker is compressed to keep those current).
/// - Then the [`Explorer`] tries both: [`TRIAL`] without compression and [`TRIAL`] with it, comparing guest pages
///   acknowledged per second, keeps the winner for [`EXPLOIT`], and tries again. Its clock is the acks' timestamps.
#[derive(Debug)]
pub struct CodecPolicy {
    enabled: bool,
    /// 0: the model decides; 1: never (trial or verdict); 2: always.
    forced: std::sync::atomic::AtomicU8,
    explorer: std::sync::Mutex<Explorer>,
    link_rate_bps: AtomicU64,
    /// Idle cores, in thousandths, as the OS reports them.
    spare_milli_cpus: AtomicU64,
    /// Compression cost in picoseconds per input byte, smoothed.
    compress_ps_per_byte: AtomicU64,
    /// Compressed size over input size for pages that looked compressible, in thousandths, smoothed.
    ratio_milli: AtomicU64,
    /// Share of non-zero pages that look compressible, in thousandths, smoothed.
    compressible_milli: AtomicU64,
}

/// One batch in this many is compressed to measure the codec, whatever the policy says.
pub const PROBE_EVERY: u64 = 32;

/// How long each side of a trial runs, in ack time.
pub const TRIAL: std::time::Duration = std::time::Duration::from_millis(200);
/// The start of each trial that is not counted: batches encoded before the switch are still being acknowledged.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(60);
/// How long a verdict holds before the next trial.
pub const EXPLOIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Tries sending without and with compression, and keeps whichever delivered guest pages faster.
#[derive(Debug, Default)]
pub struct Explorer {
    phase: ExplorePhase,
    since: Option<Instant>,
    pages: u64,
    off_rate: f64,
    won_on: u32,
    won_off: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ExplorePhase {
    #[default]
    Start,
    Off,
    On,
    Exploit,
}

impl Explorer {
    /// Counts `pages` acknowledged at `at`; returns the mode to force from now on (1 off, 2 on) when it changes.
    pub fn observe(&mut self, pages: u64, at: Instant) -> Option<u8> {
        let since = *self.since.get_or_insert(at);
        let elapsed = at.saturating_duration_since(since);
        if elapsed >= SETTLE {
            self.pages += pages;
        }
        let rate = || self.pages as f64 / (elapsed - SETTLE).as_secs_f64().max(1e-6);
        let (next, mode) = match self.phase {
            ExplorePhase::Start => (ExplorePhase::Off, 1),
            ExplorePhase::Off if elapsed >= TRIAL => {
                self.off_rate = rate();
                (ExplorePhase::On, 2)
            }
            // A compression trial that is clearly losing ends early: on a CPU-bound host it costs real time.
            ExplorePhase::On if elapsed >= SETTLE + TRIAL / 4 && rate() < self.off_rate * 0.8 => {
                self.won_off += 1;
                (ExplorePhase::Exploit, 1)
            }
            ExplorePhase::On if elapsed >= TRIAL => {
                // Compression must win clearly: it also costs CPU that other work on the host could use.
                let on = rate() > self.off_rate * 1.03;
                if on {
                    self.won_on += 1;
                } else {
                    self.won_off += 1;
                }
                (ExplorePhase::Exploit, if on { 2 } else { 1 })
            }
            ExplorePhase::Exploit if elapsed >= EXPLOIT => (ExplorePhase::Off, 1),
            _ => return None,
        };
        self.phase = next;
        self.since = Some(at);
        self.pages = 0;
        Some(mode)
    }
}

impl CodecPolicy {
    /// A policy with no measurements yet. With `enabled` false nothing is ever compressed.
    pub fn new(enabled: bool) -> Self {
        CodecPolicy {
            enabled,
            forced: std::sync::atomic::AtomicU8::new(0),
            explorer: std::sync::Mutex::new(Explorer::default()),
            link_rate_bps: AtomicU64::new(0),
            spare_milli_cpus: AtomicU64::new(0),
            // lz4's usual speed, until measured: about 1.5 ns per byte.
            compress_ps_per_byte: AtomicU64::new(1500),
            ratio_milli: AtomicU64::new(700),
            compressible_milli: AtomicU64::new(500),
        }
    }

    /// The driver's latest measurements: link goodput in bytes per second, and idle cores on this machine.
    pub fn set_link(&self, rate_bps: u64, spare_cpus: f64) {
        self.link_rate_bps.store(rate_bps, Ordering::Relaxed);
        self.spare_milli_cpus.store((spare_cpus.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Whether compressing the next batch of about `batch_bytes` raw bytes pays.
    pub fn should_compress(&self, batch_bytes: u64) -> bool {
        if !self.enabled {
            return false;
        }
        match self.forced.load(Ordering::Relaxed) {
            1 => return false,
            2 => return self.ratio_milli.load(Ordering::Relaxed) < 950,
            _ => {}
        }
        let rate = self.link_rate_bps.load(Ordering::Relaxed);
        if rate == 0 {
            // Nothing measured yet: the link is not known to be the bottleneck.
            return false;
        }
        let ratio = self.ratio_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        if ratio >= 0.95 {
            return false;
        }
        let share = self.compressible_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let cpu_s = batch_bytes as f64 * share * self.compress_ps_per_byte.load(Ordering::Relaxed) as f64 * 1e-12;
        let saved_s = batch_bytes as f64 * share * (1.0 - ratio) / rate as f64;
        if cpu_s < saved_s {
            return true;
        }
        // Half a core or less idle is noise, or another thread's share of this pipeline.
        let spare = self.spare_milli_cpus.load(Ordering::Relaxed) as f64 / 1000.0;
        let wire_s = batch_bytes as f64 / rate as f64;
        spare >= 0.5 && cpu_s / spare <= wire_s
    }

    /// `pages` guest pages were acknowledged at `at`: drives the trials.
    pub fn observe(&self, pages: u64, at: Instant) {
        if !self.enabled {
            return;
        }
        let mut ex = self.explorer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mode) = ex.observe(pages, at) {
            self.forced.store(mode, Ordering::Relaxed);
        }
    }

    /// The explorer's verdicts so far: (trials won by compression, trials won without).
    pub fn verdicts(&self) -> (u32, u32) {
        let ex = self.explorer.lock().unwrap_or_else(|e| e.into_inner());
        (ex.won_on, ex.won_off)
    }

    /// Folds one compressed batch's figures into the estimates.
    fn record(&self, input: u64, output: u64, nanos: u64, looked: u64, nonzero: u64) {
        fn blend(a: &AtomicU64, sample: u64) {
            let old = a.load(Ordering::Relaxed);
            a.store((old * 7 + sample) / 8, Ordering::Relaxed);
        }
        if let (Some(ps), Some(ratio)) = ((nanos * 1000).checked_div(input), (output * 1000).checked_div(input)) {
            blend(&self.compress_ps_per_byte, ps);
            blend(&self.ratio_milli, ratio);
        }
        if let Some(share) = (looked * 1000).checked_div(nonzero) {
            blend(&self.compressible_milli, share);
        }
    }
}

/// Turns page runs into batches for one worker. Buffers are taken from and returned to the sink, so steady state
/// allocates nothing.
pub struct BatchEncoder<'a, S: BatchSink> {
    mem: &'a dyn GuestMemory,
    hashes: &'a HashTable,
    policy: &'a CodecPolicy,
    sink: &'a S,
    epoch: u32,
    max_pages: usize,
    batch: EncodedBatch,
    compress: bool,
    lz: Vec<u8>,
    // Per-batch compression figures for the policy.
    lz_in: u64,
    lz_out: u64,
    lz_nanos: u64,
    looked: u64,
    batches: u64,
    /// Everything this worker encoded.
    pub counts: PageCounts,
}

/// Where full batches go, and where empty buffers come from.
pub trait BatchSink: Sync {
    /// Takes a full batch. False means the link is gone and encoding should stop.
    fn submit(&self, batch: EncodedBatch) -> bool;
    /// An empty batch buffer to fill.
    fn take_buffer(&self) -> EncodedBatch;
}

/// Pages per batch: 64 pages (256 KiB raw) keeps the per-frame overhead under 0.5 % and a batch's send well under a
/// millisecond on gigabit links.
pub const BATCH_PAGES: usize = 64;

/// Why encoding stopped early.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The sink refused a batch: the link is gone.
    #[error("the link stopped taking batches")]
    SinkClosed,
    /// Guest memory could not be read.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl<'a, S: BatchSink> BatchEncoder<'a, S> {
    /// An encoder for round `epoch`.
    pub fn new(
        mem: &'a dyn GuestMemory,
        hashes: &'a HashTable,
        policy: &'a CodecPolicy,
        sink: &'a S,
        epoch: u32,
    ) -> Self {
        let mut e = BatchEncoder {
            mem,
            hashes,
            policy,
            sink,
            epoch,
            max_pages: BATCH_PAGES,
            batch: EncodedBatch::default(),
            compress: false,
            lz: vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            lz_in: 0,
            lz_out: 0,
            lz_nanos: 0,
            looked: 0,
            batches: 0,
            counts: PageCounts::default(),
        };
        e.start_batch();
        e
    }

    fn start_batch(&mut self) {
        self.batch = self.sink.take_buffer();
        self.batch.clear();
        self.batch.epoch = self.epoch;
        self.batches += 1;
        self.compress = self.policy.enabled
            && (self.batches % PROBE_EVERY == 1 || self.policy.should_compress((self.max_pages * PAGE_SIZE) as u64));
        (self.lz_in, self.lz_out, self.lz_nanos, self.looked) = (0, 0, 0, 0);
    }

    /// Encodes every page of `run`, submitting batches as they fill.
    pub fn push_run(&mut self, run: PageRun) -> Result<(), EncodeError> {
        let mut page = run.first;
        let end = run.first + run.count;
        while page < end {
            let (ptr, n) = host_pages(self.mem, page, end - page)?;
            for i in 0..n as usize {
                // SAFETY: host_pages vouches for `n` contiguous pages at `ptr` in a live mapping.
                let src = unsafe { ptr.add(i * PAGE_SIZE) };
                self.encode_page(page + i as u64, src);
                if self.batch.entries.len() >= self.max_pages {
                    self.flush()?;
                }
            }
            page += n;
        }
        Ok(())
    }

    /// Copies the page at `src` into the batch payload, the only copy the encoder makes, and decides its codec from
    /// that copy: the guest may rewrite the page meanwhile, and hash, zero check and compression must all describe
    /// the bytes that are sent.
    fn encode_page(&mut self, index: u64, src: *const u8) {
        let b = &mut self.batch;
        let off = b.payload.len();
        b.payload.reserve(PAGE_SIZE);
        // SAFETY: `src` is one page of live guest memory (see push_run) and `reserve` made room for a page past
        // `off`; set_len covers exactly the bytes just written. A torn copy of a page the guest is writing is fine: the
        // write leaves the page dirty, so it is sent again (invariant 3).
        unsafe {
            std::ptr::copy_nonoverlapping(src, b.payload.as_mut_ptr().add(off), PAGE_SIZE);
            b.payload.set_len(off + PAGE_SIZE);
        }
        let page = &b.payload[off..];
        if is_zero(page) {
            b.payload.truncate(off);
            let hash = zero_page_hash();
            self.hashes.set(index, hash);
            b.entries.push(PageEntry { page: index, codec: Codec::Zero, len: 0, hash });
            b.counts.zero += 1;
            return;
        }
        let hash = page_hash(page);
        self.hashes.set(index, hash);
        if self.compress && looks_compressible(page) {
            self.looked += 1;
            let t = Instant::now();
            let n = lz4_flex::block::compress_into(page, &mut self.lz).unwrap_or(PAGE_SIZE);
            self.lz_nanos += t.elapsed().as_nanos() as u64;
            self.lz_in += PAGE_SIZE as u64;
            self.lz_out += n.min(PAGE_SIZE) as u64;
            // Keep the compressed form only when it saves at least an eighth: below that, the receiver's decode costs
            // more than the wire bytes saved.
            if n <= PAGE_SIZE - PAGE_SIZE / 8 {
                b.payload.truncate(off);
                b.payload.extend_from_slice(&self.lz[..n]);
                b.entries.push(PageEntry { page: index, codec: Codec::Lz4, len: n as u32, hash });
                b.counts.compressed += 1;
                return;
            }
        }
        b.entries.push(PageEntry { page: index, codec: Codec::Raw, len: PAGE_SIZE as u32, hash });
        b.counts.raw += 1;
    }

    /// Submits the current batch if it holds any pages.
    pub fn flush(&mut self) -> Result<(), EncodeError> {
        if self.batch.entries.is_empty() {
            return Ok(());
        }
        if self.compress {
            let nonzero = self.batch.counts.compressed + self.batch.counts.raw;
            self.policy.record(self.lz_in, self.lz_out, self.lz_nanos, self.looked, nonzero);
        }
        self.counts.add(&self.batch.counts);
        let batch = std::mem::take(&mut self.batch);
        let ok = self.sink.submit(batch);
        self.start_batch();
        if ok {
            Ok(())
        } else {
            Err(EncodeError::SinkClosed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_finds_any_set_byte() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        for i in [0, 63, 64, 2047, PAGE_SIZE - 1] {
            p[i] = 1;
            assert!(!is_zero(&p), "byte {i}");
            p[i] = 0;
        }
        assert!(is_zero(&[0u8; 13]) && !is_zero(&[0, 0, 0, 9]));
    }

    #[test]
    fn probe_tells_text_from_random() {
        let text: Vec<u8> = b"the of and to in is was for on that ".iter().copied().cycle().take(PAGE_SIZE).collect();
        assert!(looks_compressible(&text));
        let mut x = 88172645463325252u64;
        let random: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!looks_compressible(&random));
    }

    #[test]
    fn policy_compresses_only_when_it_pays() {
        let p = CodecPolicy::new(true);
        assert!(!p.should_compress(1 << 18), "no link measurement yet");
        // 1 Gbit/s, no idle core: half of 256 KiB at 1.5 ns/B costs 0.2 ms of CPU and saves 0.3 × 1 ms of wire.
        p.set_link(125_000_000, 0.0);
        assert!(p.should_compress(1 << 18));
        // 2 GB/s and a busy machine: the wire is faster than the codec, and no core is free to hide it.
        p.set_link(2_000_000_000, 0.2);
        assert!(!p.should_compress(1 << 18));
        // The same link with one idle core: 0.2 ms of compression there keeps up with 0.13 ms of wire only on two.
        p.set_link(2_000_000_000, 1.0);
        assert!(!p.should_compress(1 << 18));
        p.set_link(2_000_000_000, 2.0);
        assert!(p.should_compress(1 << 18));
        assert!(!CodecPolicy::new(false).should_compress(1 << 18));
    }

    #[test]
    fn explorer_keeps_the_faster_mode() {
        use std::time::Duration;
        // Simulated acks every 5 ms; `on_faster` says which mode delivers more pages per ack.
        let run = |on_faster: bool| {
            let p = CodecPolicy::new(true);
            let t0 = Instant::now();
            for i in 0..400u64 {
                let mode = p.forced.load(Ordering::Relaxed);
                let pages = match (mode, on_faster) {
                    (2, true) | (1, false) => 120,
                    _ => 100,
                };
                p.observe(pages, t0 + Duration::from_millis(5 * i));
            }
            (p.verdicts(), p.forced.load(Ordering::Relaxed))
        };
        let ((on, off), mode) = run(true);
        assert!(on >= 1 && off == 0 && mode == 2, "{on} {off} {mode}");
        let ((on, off), mode) = run(false);
        assert!(off >= 1 && on == 0 && mode == 1, "{on} {off} {mode}");
    }

    #[test]
    fn incompressible_data_turns_compression_off() {
        let p = CodecPolicy::new(true);
        p.set_link(125_000_000, 4.0);
        assert!(p.should_compress(1 << 18));
        for _ in 0..40 {
            p.record(4096, 4090, 3000, 1, 1);
        }
        assert!(!p.should_compress(1 << 18));
    }

    #[test]
    fn table_root_changes_with_any_page() {
        let t = HashTable::new(1000);
        let r0 = t.root();
        t.set(999, 5);
        assert_ne!(t.root(), r0);
        t.set(999, zero_page_hash());
        assert_eq!(t.root(), r0);
    }
}
