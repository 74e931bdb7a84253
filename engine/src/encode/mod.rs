//! Page encoding: zero pages, codecs, batches, and the per-page hash tables.
//!
//! A scan worker feeds page runs to its [`BatchEncoder`]. For each page the encoder detects an all-zero page with a
//! word-wide check (sent as a marker), records the page's xxh3 in the sender's [`HashTable`], and then either
//! compresses it (when the batch is being compressed and a cheap sample says the page is compressible), or sends it
//! raw. Which codec a batch uses, and whether raw pages are copied or sent in place, is the [`SendPolicy`]'s call
//! ([`policy`]). Full batches go to a sink (the stripe scheduler, then a link).
//!
//! A batch's payload, in wire order, is each entry's bytes and then, when the batch uses zstd, one zstd frame holding
//! all its zstd pages: [`Part`]s of the batch's own buffer (copied raw pages, lz4 blocks, the zstd frame) and, on the
//! in-place send paths, spans of guest memory that the link writes with iovecs.
//!
//! Both sides keep a [`HashTable`]: the sender of what it sent, the receiver of what it applied. A page the guest writes
//! after its dirty bit was cleared is dirty again, so it is sent again in a later round (invariant 3); the last copy
//! of every page is sent with the guest paused. So the tables' roots are equal at switchover exactly when the memories
//! are. A page sent in place can change between its hash and its send; its entry is marked `live`, and the receiver
//! records the hash of what arrived instead of refusing it: the page is dirty and will come again.

pub mod explorer;
mod hash;
pub mod policy;

pub use hash::{memory_root, page_hash, zero_page_hash, HashTable};
pub use policy::{monotonic_nanos, BatchCodec, SendPath, SendPolicy, Stopwatch, PROBE_EVERY, ZSTD_LEVEL};

use crate::dirty::PageRun;
use crate::guest::{host_pages, GuestError, GuestMemory, PAGE_LEN, PAGE_SIZE};

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
    /// One page of the batch's zstd frame (its payload length is 0: the frame follows the entries' payloads).
    Zstd = 3,
}

impl Codec {
    /// The codec for a wire code, if it names one.
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Zero),
            1 => Some(Codec::Raw),
            2 => Some(Codec::Lz4),
            3 => Some(Codec::Zstd),
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
    /// Payload bytes (0 for zero and zstd pages, [`PAGE_SIZE`] for raw ones).
    pub len: u32,
    /// xxh3 of the page's content (decoded). The receiver checks it before applying the page, which makes it both
    /// the payload's integrity check and the value both hash tables record.
    pub hash: u64,
    /// A raw page sent from guest memory in place, which the guest may have written between hash and send. Its hash
    /// may then not match what arrives; the page is dirty again and will be resent.
    pub live: bool,
}

impl PageEntry {
    /// An entry for a page that is not live.
    pub fn new(page: u64, codec: Codec, len: u32, hash: u64) -> Self {
        PageEntry { page, codec, len, hash, live: false }
    }
}

/// Counters over encoded pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Zero pages (sent as markers).
    pub zero: u64,
    /// Pages sent lz4-compressed.
    pub lz4: u64,
    /// Pages sent zstd-compressed.
    pub zstd: u64,
    /// Pages sent raw.
    pub raw: u64,
}

impl PageCounts {
    /// All pages.
    pub fn total(&self) -> u64 {
        self.zero + self.compressed() + self.raw
    }

    /// Pages sent compressed, either codec.
    pub fn compressed(&self) -> u64 {
        self.lz4 + self.zstd
    }

    /// Adds `o` to `self`.
    pub fn add(&mut self, o: &PageCounts) {
        self.zero += o.zero;
        self.lz4 += o.lz4;
        self.zstd += o.zstd;
        self.raw += o.raw;
    }

    /// Counts one page of `codec`.
    pub fn count(&mut self, codec: Codec) {
        match codec {
            Codec::Zero => self.zero += 1,
            Codec::Raw => self.raw += 1,
            Codec::Lz4 => self.lz4 += 1,
            Codec::Zstd => self.zstd += 1,
        }
    }
}

/// A piece of a batch's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `len` bytes of the batch's own buffer from `off`.
    Owned {
        /// Offset in [`EncodedBatch::payload`].
        off: usize,
        /// Length.
        len: usize,
    },
    /// Raw pages sent in place from guest memory.
    Guest(GuestRun),
}

/// A run of whole pages in guest memory that a batch sends in place. Only the encoder makes one, from pages of a
/// live mapping, so safe code cannot point a batch at arbitrary memory:
///
/// ```compile_fail,E0451
/// let forged = livemig_engine::encode::GuestRun { addr: 0x1000, len: 4096 };
/// ```
/// ```
/// fn read(run: &livemig_engine::encode::GuestRun) -> (usize, usize) {
///     (run.addr(), run.len())
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRun {
    addr: usize,
    len: usize,
}

impl GuestRun {
    /// Host virtual address of the run's first byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty run (never made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A batch of encoded pages from one round: the entries, and their payload in parts.
///
/// A batch with [`Part::Guest`] parts points into guest memory, whose mapping it does not keep alive: reading those
/// bytes ([`EncodedBatch::part_slices`]) is `unsafe` for that reason. The source driver keeps every batch inside the
/// migration, which borrows the guest for its whole run.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    /// The round (epoch) the pages were read in.
    pub epoch: u32,
    /// One entry per page.
    pub entries: Vec<PageEntry>,
    /// Bytes the batch owns: copied raw pages, lz4 blocks and the zstd frame.
    pub payload: Vec<u8>,
    /// The payload in wire order.
    pub parts: Vec<Part>,
    /// Bytes of the zstd frame, the payload's last part (0 without zstd pages).
    pub zstd_len: u32,
    /// How raw pages were meant to leave: copied, or in place (vectored or zero-copy).
    pub path: Option<SendPath>,
    /// What the batch holds.
    pub counts: PageCounts,
}

impl EncodedBatch {
    /// An empty batch with room for `pages` pages.
    pub fn with_capacity(pages: usize) -> Self {
        EncodedBatch {
            entries: Vec::with_capacity(pages),
            payload: Vec::with_capacity(pages * PAGE_SIZE),
            parts: Vec::with_capacity(pages),
            ..Default::default()
        }
    }

    /// A batch whose payload is `payload`, owned, in one part (the last `zstd_len` bytes being its zstd frame).
    pub fn owned(epoch: u32, entries: Vec<PageEntry>, payload: Vec<u8>, zstd_len: u32) -> Self {
        let parts = if payload.is_empty() { Vec::new() } else { vec![Part::Owned { off: 0, len: payload.len() }] };
        let mut counts = PageCounts::default();
        entries.iter().for_each(|e| counts.count(e.codec));
        EncodedBatch { epoch, entries, payload, parts, zstd_len, path: None, counts }
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.payload.clear();
        self.parts.clear();
        self.zstd_len = 0;
        self.path = None;
        self.counts = PageCounts::default();
    }

    /// Payload bytes, all parts.
    pub fn payload_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match *p {
                Part::Owned { len, .. } | Part::Guest(GuestRun { len, .. }) => len,
            })
            .sum()
    }

    /// Whether any raw page is sent from guest memory in place.
    pub fn has_guest_parts(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Guest(_)))
    }

    /// Appends `len` bytes just added at the end of `payload` to the parts, merging with the last part.
    fn push_owned(&mut self, len: usize) {
        let off = self.payload.len() - len;
        if let Some(Part::Owned { off: o, len: l }) = self.parts.last_mut() {
            if *o + *l == off {
                *l += len;
                return;
            }
        }
        self.parts.push(Part::Owned { off, len });
    }

    /// Appends a guest page at `addr` (from `host_pages`) to the parts, merging with the last part when contiguous.
    fn push_guest(&mut self, addr: usize) {
        if let Some(Part::Guest(run)) = self.parts.last_mut() {
            if run.addr + run.len == addr {
                run.len += PAGE_SIZE;
                return;
            }
        }
        self.parts.push(Part::Guest(GuestRun { addr, len: PAGE_SIZE }));
    }

    /// Each payload part's bytes, in wire order, for a send.
    ///
    /// ```compile_fail,E0133
    /// let b = livemig_engine::encode::EncodedBatch::default();
    /// assert_eq!(b.part_slices().count(), 0);
    /// ```
    /// ```
    /// let b = livemig_engine::encode::EncodedBatch::default();
    /// // SAFETY: the batch has no guest parts.
    /// assert_eq!(unsafe { b.part_slices() }.count(), 0);
    /// ```
    ///
    /// # Safety
    /// The guest memory this batch's [`Part::Guest`] runs point into must still be mapped while the slices live. The
    /// guest may write those pages meanwhile (their entries are marked live), so their bytes may be handed to the
    /// kernel to send but not read and relied on here.
    pub unsafe fn part_slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.parts.iter().map(move |p| match *p {
            Part::Owned { off, len } => &self.payload[off..off + len],
            // SAFETY: the encoder made the run from host_pages (whole pages of a guest mapping), and the caller keeps
            // that mapping alive (this function's contract).
            Part::Guest(GuestRun { addr, len }) => unsafe { std::slice::from_raw_parts(addr as *const u8, len) },
        })
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

/// Turns page runs into batches for one worker. Buffers are taken from and returned to the sink, so steady state
/// allocates nothing.
pub struct BatchEncoder<'a, S: BatchSink> {
    mem: &'a dyn GuestMemory,
    hashes: &'a HashTable,
    policy: &'a SendPolicy,
    sink: &'a S,
    epoch: u32,
    max_pages: usize,
    batch: EncodedBatch,
    codec: BatchCodec,
    in_place: bool,
    /// One page copied out of guest memory, when the page must be exactly what is hashed and compressed.
    page: Box<[u8; PAGE_SIZE]>,
    lz: Vec<u8>,
    /// The batch's zstd pages, back to back, compressed at flush.
    zin: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    // Per-batch compression figures for the policy.
    c_in: u64,
    c_out: u64,
    c_nanos: u64,
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

/// Keeps every batch it is given, in order: for tools, benchmarks and tests that encode without a link.
impl BatchSink for std::sync::Mutex<Vec<EncodedBatch>> {
    fn submit(&self, batch: EncodedBatch) -> bool {
        self.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
        true
    }
    fn take_buffer(&self) -> EncodedBatch {
        EncodedBatch::with_capacity(BATCH_PAGES)
    }
}

/// Pages per batch: 128 pages (512 KiB raw). Against 64, half the frames, acks and wakeups per GB: over loopback the
/// reference guest went from 10.2–12.5 to 12.7–13.7 Gbit/s in three runs each. A batch still leaves a gigabit link in
/// about 4 ms, and gives zstd 32 text pages to share between.
pub const BATCH_PAGES: usize = 128;

/// Why encoding stopped early.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The sink refused a batch: the link is gone.
    #[error("the link stopped taking batches")]
    SinkClosed,
    /// Guest memory could not be read.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The zstd library failed.
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
}

impl<'a, S: BatchSink> BatchEncoder<'a, S> {
    /// An encoder for round `epoch`.
    pub fn new(
        mem: &'a dyn GuestMemory,
        hashes: &'a HashTable,
        policy: &'a SendPolicy,
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
            codec: BatchCodec::None,
            in_place: false,
            page: Box::new([0u8; PAGE_SIZE]),
            lz: vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            zin: Vec::new(),
            zstd: None,
            c_in: 0,
            c_out: 0,
            c_nanos: 0,
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
        self.codec = self.policy.choose((self.max_pages * PAGE_SIZE) as u64, self.batches);
        let path = self.policy.path();
        self.batch.path = Some(path);
        self.in_place = path.in_place();
        self.zin.clear();
        (self.c_in, self.c_out, self.c_nanos, self.looked) = (0, 0, 0, 0);
    }

    /// Encodes every page of `run`, submitting batches as they fill.
    pub fn push_run(&mut self, run: PageRun) -> Result<(), EncodeError> {
        let mut page = run.first;
        let end = run.first + run.count;
        while page < end {
            let (ptr, n) = host_pages(self.mem, page, end - page)?;
            for i in 0..crate::num::usize_from(n) {
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

    /// Encodes the page at `src`. Whatever is hashed must be what is sent, so every page is first copied once out of
    /// guest memory (with volatile loads: a vCPU may be writing it), and everything is decided from that copy. A raw
    /// page sent in place is hashed from the copy and sent from guest memory, where it may still change: its entry is
    /// marked live. On the copy path the one copy goes straight into the batch.
    fn encode_page(&mut self, index: u64, src: *const u8) {
        if self.codec == BatchCodec::None && !self.in_place {
            let b = &mut self.batch;
            let start = b.payload.len();
            b.payload.reserve(PAGE_SIZE);
            // SAFETY: `src` is one page-aligned page of live guest memory (see push_run); the reserve made room for a
            // page past `start`, which the copy fills before the length covers it.
            unsafe {
                crate::guest::copy_from_guest(src, b.payload.as_mut_ptr().add(start));
                b.payload.set_len(start + PAGE_SIZE);
            }
            if is_zero(&b.payload[start..]) {
                b.payload.truncate(start);
                return self.push_zero(index);
            }
            let hash = page_hash(&b.payload[start..]);
            self.hashes.set(index, hash);
            return self.push_copied(index, hash);
        }
        // SAFETY: as above; `self.page` is one page of this encoder's own.
        unsafe { crate::guest::copy_from_guest(src, self.page.as_mut_ptr()) };
        if is_zero(&self.page[..]) {
            return self.push_zero(index);
        }
        let hash = page_hash(&self.page[..]);
        self.hashes.set(index, hash);
        if self.codec != BatchCodec::None && looks_compressible(&self.page[..]) {
            self.looked += 1;
            if self.compress_page(index, hash) {
                return;
            }
        }
        if self.in_place {
            return self.push_in_place(index, src, hash);
        }
        self.batch.payload.extend_from_slice(&self.page[..]);
        self.push_copied(index, hash);
    }

    /// A raw page whose bytes were just appended to the batch's payload.
    fn push_copied(&mut self, index: u64, hash: u64) {
        let b = &mut self.batch;
        b.push_owned(PAGE_SIZE);
        b.entries.push(PageEntry::new(index, Codec::Raw, PAGE_LEN, hash));
        b.counts.raw += 1;
    }

    /// A raw page left in guest memory at `src` for the writer to send from there; `hash` may be older than what is
    /// sent, so the entry is marked live.
    fn push_in_place(&mut self, index: u64, src: *const u8, hash: u64) {
        let b = &mut self.batch;
        b.push_guest(src as usize);
        b.entries.push(PageEntry { page: index, codec: Codec::Raw, len: PAGE_LEN, hash, live: true });
        b.counts.raw += 1;
    }

    fn push_zero(&mut self, index: u64) {
        let hash = zero_page_hash();
        self.hashes.set(index, hash);
        self.batch.entries.push(PageEntry::new(index, Codec::Zero, 0, hash));
        self.batch.counts.zero += 1;
    }

    /// Compresses the copied page with the batch's codec; false when it is to be sent raw after all.
    fn compress_page(&mut self, index: u64, hash: u64) -> bool {
        let b = &mut self.batch;
        match self.codec {
            BatchCodec::Zstd => {
                // Compressed together at flush: across a batch's pages zstd finds far more to share than in one page.
                self.zin.extend_from_slice(&self.page[..]);
                b.entries.push(PageEntry::new(index, Codec::Zstd, 0, hash));
                b.counts.zstd += 1;
                true
            }
            BatchCodec::Lz4 => {
                let t = self.policy.stopwatch();
                let n = lz4_flex::block::compress_into(&self.page[..], &mut self.lz).unwrap_or(PAGE_SIZE);
                self.c_nanos += self.policy.stopwatch().saturating_sub(t);
                self.c_in += PAGE_SIZE as u64;
                self.c_out += n.min(PAGE_SIZE) as u64;
                // Keep the compressed form only when it saves at least an eighth: below that, the receiver's decode
                // costs more than the wire bytes saved.
                if n > PAGE_SIZE - PAGE_SIZE / 8 {
                    return false;
                }
                b.payload.extend_from_slice(&self.lz[..n]);
                b.push_owned(n);
                b.entries.push(PageEntry::new(index, Codec::Lz4, crate::num::u32_len(n), hash));
                b.counts.lz4 += 1;
                true
            }
            BatchCodec::None => false,
        }
    }

    /// Compresses the batch's zstd pages into one frame at the end of the payload.
    fn finish_zstd(&mut self) -> Result<(), EncodeError> {
        if self.zin.is_empty() {
            return Ok(());
        }
        let t = self.policy.stopwatch();
        let z = match &mut self.zstd {
            Some(z) => z,
            None => self.zstd.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(EncodeError::Zstd)?),
        };
        let b = &mut self.batch;
        let start = b.payload.len();
        b.payload.resize(start + zstd::zstd_safe::compress_bound(self.zin.len()), 0);
        let n = z.compress_to_buffer(&self.zin, &mut b.payload[start..]).map_err(EncodeError::Zstd)?;
        b.payload.truncate(start + n);
        b.push_owned(n);
        b.zstd_len = crate::num::u32_len(n);
        self.c_nanos += self.policy.stopwatch().saturating_sub(t);
        self.c_in += self.zin.len() as u64;
        self.c_out += n as u64;
        Ok(())
    }

    /// Submits the current batch if it holds any pages.
    pub fn flush(&mut self) -> Result<(), EncodeError> {
        if self.batch.entries.is_empty() {
            return Ok(());
        }
        self.finish_zstd()?;
        if self.codec != BatchCodec::None {
            let nonzero = self.batch.counts.compressed() + self.batch.counts.raw;
            self.policy.record(self.codec, self.c_in, self.c_out, self.c_nanos, self.looked, nonzero);
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

    /// The page hash is on the wire, so it must stay XXH3-64 (seed 0) whichever SIMD path the CPU takes: known answers
    /// from the reference algorithm (the empty input's is in xxHash's own test suite; the others came from the
    /// xxhash-rust crate, an independent implementation).
    #[test]
    fn page_hash_is_xxh3_64() {
        assert_eq!(page_hash(&[]), 0x2d06_8005_38d3_94c2);
        assert_eq!(zero_page_hash(), 0x93d7_6fe1_48c6_89ba);
        let pattern: Vec<u8> = (0..PAGE_LEN).map(|i| (i * 31 % 251).to_le_bytes()[0]).collect();
        assert_eq!(page_hash(&pattern), 0xf250_6e94_c3d1_2d24);
    }

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
                x.to_le_bytes()[0]
            })
            .collect();
        assert!(!looks_compressible(&random));
    }

    /// A clock that moves 1 µs per reading.
    fn ticking() -> u64 {
        static NOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        NOW.fetch_add(1000, std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn compression_is_timed_on_the_policy_s_clock() {
        use crate::guest::{SyntheticConfig, SyntheticGuest};
        let cfg = SyntheticConfig { memory_bytes: 8 << 20, touched_pct: 100.0, ..Default::default() };
        let guest = SyntheticGuest::new(&cfg).unwrap();
        let hashes = HashTable::new(guest.total_pages());
        let sink = std::sync::Mutex::new(Vec::new());
        // lz4 reads the clock around each page it tries; zstd around each batch's one frame.
        let lz4 = SendPolicy::pinned(BatchCodec::Lz4, SendPath::Copy).with_stopwatch(ticking);
        let mut enc = BatchEncoder::new(&guest, &hashes, &lz4, &sink, 0);
        enc.push_run(PageRun { first: 0, count: guest.total_pages() }).unwrap();
        enc.flush().unwrap();
        // The mix's random pages fail the probe and are not tried; its text pages are, and all of them shrink.
        assert!(enc.counts.lz4 > 0 && enc.counts.raw > 0, "{:?}", enc.counts);
        assert_eq!(lz4.compress_nanos(), 1000 * enc.counts.lz4);
        let zstd = SendPolicy::pinned(BatchCodec::Zstd, SendPath::Copy).with_stopwatch(ticking);
        let mut enc = BatchEncoder::new(&guest, &hashes, &zstd, &sink, 0);
        enc.push_run(PageRun { first: 0, count: guest.total_pages() }).unwrap();
        enc.flush().unwrap();
        let frames = sink.lock().unwrap().iter().filter(|b| b.zstd_len > 0).count() as u64;
        assert!(frames > 0);
        assert_eq!(zstd.compress_nanos(), 1000 * frames);
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
