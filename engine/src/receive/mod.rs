//! The destination's page apply: decode each page, apply it only if it is not older than what the page holds, and
//! record its hash.
//!
//! Frames can arrive out of order once several links carry them, so every page remembers the epoch (round) of the
//! copy it holds. A copy is applied when its epoch is at least that (invariant 1, newest wins). Entries come from the
//! wire, so every field is checked before it is used (invariant 5): the page index against the layout, the length
//! against the codec, an lz4 block must decode to exactly one page, and a frame's zstd frame to exactly its zstd pages.
//!
//! A page's hash is checked before it is applied, except for a raw page the source sent in place from guest memory
//! (`live`): the guest may have written it between the source's hash and its send. Such a page is applied and its
//! table records the hash of what arrived; the guest's write left it dirty, so it comes again, and the last copy of
//! every page is sent with the guest paused. Corruption of a live page is therefore caught at switchover, when the
//! roots differ, instead of at once.

use crate::encode::{page_hash, zero_page_hash, Codec, HashTable, PageCounts, PageEntry};
use crate::guest::{host_pages, GuestMemory, PAGE_SIZE};
use crate::sparse::Chunked;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

pub mod postcopy;
use postcopy::Placer;

/// A page entry the receiver cannot apply.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    /// The page index is past the end of guest memory.
    #[error("page index {page} out of range: the guest has {pages} pages")]
    PageOutOfRange {
        /// The index received.
        page: u64,
        /// Pages the guest has.
        pages: u64,
    },
    /// The payload length does not fit the codec.
    #[error("page {page}: a {codec:?} payload of {len} bytes is impossible")]
    BadLength {
        /// The page.
        page: u64,
        /// Its codec.
        codec: Codec,
        /// The length received.
        len: u32,
    },
    /// The page's content does not hash to the value its entry carries: the payload was corrupted.
    #[error("page {page}: bad checksum: entry says {expected:#018x}, content hashes to {computed:#018x}")]
    BadChecksum {
        /// The page.
        page: u64,
        /// The hash in the entry.
        expected: u64,
        /// The hash of what arrived.
        computed: u64,
    },
    /// An lz4 block did not decode to exactly one page.
    #[error("page {page}: lz4 block does not decode to one page: {reason}")]
    Decompress {
        /// The page.
        page: u64,
        /// What went wrong.
        reason: String,
    },
    /// A frame lists the same page twice.
    #[error("page {page} appears twice in one frame")]
    Duplicate {
        /// The page.
        page: u64,
    },
    /// A frame's zstd frame does not decode to exactly its zstd pages.
    #[error("zstd frame for {pages} pages: {reason}")]
    Zstd {
        /// The frame's zstd pages.
        pages: usize,
        /// What went wrong.
        reason: String,
    },
    /// Post-copy could not place the page (the kernel refused the userfaultfd call).
    #[error("page {page}: post-copy placement failed: {reason}")]
    Place {
        /// The page.
        page: u64,
        /// What the kernel said.
        reason: String,
    },
    /// Another link is reading the page in place. Not a fault in the frame: only a resend racing its original after
    /// a link failure meets it. The receiver does not wait: the caller waits a moment (and, if the page stays busy,
    /// drops the owning link, which the source has given up on), then calls again with the same frame, and the call
    /// resumes where it stopped.
    #[error("page {page} is busy: link {owner} is reading it in place")]
    Busy {
        /// The page.
        page: u64,
        /// The link reading it.
        owner: u32,
    },
}

/// Why a page read in place could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum InPlaceError {
    /// The entry or its content is bad.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Reading the page's bytes failed.
    #[error("reading a page: {0}")]
    Io(std::io::Error),
}

/// The most zstd pages one frame may carry: the decode buffer is sized by it before anything is decoded.
pub const MAX_ZSTD_PAGES: usize = 1024;

/// What one apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The page now holds this copy.
    Written,
    /// The page already held a newer copy; this one was dropped.
    Stale,
}

/// An epoch slot holds the stamp (epoch + 1) of the page's copy in its low 24 bits, and, while one link reads the page
/// in place ([`Receiver::apply_raw_in_place`]), that link's index + 1 above them.
const OWNER_SHIFT: u32 = 24;
const STAMP_MASK: u32 = (1 << OWNER_SHIFT) - 1;
/// The most links a receiver tells apart as owners of busy pages.
pub const MAX_OWNERS: u32 = 255;

fn stamp_of(epoch: u32) -> u32 {
    epoch.saturating_add(1).min(STAMP_MASK)
}

/// The link reading the page in place, if any.
fn owner_of(slot: u32) -> Option<u32> {
    (slot >> OWNER_SHIFT).checked_sub(1)
}

/// Pages per lock stripe: 2 MiB, so a frame of consecutive pages takes one lock, not one per page.
pub const STRIPE_PAGES: u64 = 512;
const STRIPES: usize = 1024;

/// One apply thread's own state: decode buffers and counters, so that threads share nothing but the page locks.
pub struct ApplyState {
    scratch: Box<[u8; PAGE_SIZE]>,
    zbuf: Vec<u8>,
    // Buffers of apply_frame_in_place, kept from frame to frame.
    claims: Vec<Claim>,
    parts: Vec<(usize, usize)>,
    payload: Vec<u8>,
    zin: Vec<u8>,
    stale_buf: Vec<u8>,
    others: Vec<PageEntry>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// Where a frame that met a busy page stopped, so that the same call again goes on from there.
    resume: Option<Resume>,
    /// An in-place frame whose bytes were read, settled, but whose other pages met a busy page: (its key, entries).
    rest_pending: Option<FrameKey>,
    /// Pages applied, by codec.
    pub counts: PageCounts,
    /// Copies dropped because the page held a newer one.
    pub stale: u64,
    /// Live pages whose content had changed between the source's hash and its send.
    pub torn: u64,
}

impl std::fmt::Debug for ApplyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyState").field("counts", &self.counts).field("stale", &self.stale).finish()
    }
}

impl Default for ApplyState {
    fn default() -> Self {
        ApplyState {
            scratch: Box::new([0u8; PAGE_SIZE]),
            zbuf: Vec::new(),
            claims: Vec::new(),
            parts: Vec::new(),
            payload: Vec::new(),
            zin: Vec::new(),
            stale_buf: Vec::new(),
            others: Vec::new(),
            zstd: None,
            resume: None,
            rest_pending: None,
            counts: PageCounts::default(),
            stale: 0,
            torn: 0,
        }
    }
}

impl ApplyState {
    /// Decodes a frame's zstd frame into `pages` pages.
    fn unzstd(&mut self, frame: &[u8], pages: usize) -> Result<(), ApplyError> {
        let err = |reason: String| ApplyError::Zstd { pages, reason };
        if pages > MAX_ZSTD_PAGES {
            return Err(err(format!("more than {MAX_ZSTD_PAGES} pages")));
        }
        if pages == 0 || frame.is_empty() {
            return if pages == 0 && frame.is_empty() {
                Ok(())
            } else {
                Err(err(format!("{} bytes of zstd data", frame.len())))
            };
        }
        let d = match &mut self.zstd {
            Some(d) => d,
            None => self.zstd.insert(zstd::bulk::Decompressor::new().map_err(|e| err(e.to_string()))?),
        };
        self.zbuf.resize(pages * PAGE_SIZE, 0);
        // The buffer bounds the output: a frame that would decode to more fails instead of growing it.
        let n = d.decompress_to_buffer(frame, &mut self.zbuf[..]).map_err(|e| err(e.to_string()))?;
        if n != pages * PAGE_SIZE {
            return Err(err(format!("decoded to {n} bytes, not {}", pages * PAGE_SIZE)));
        }
        Ok(())
    }
}

/// What tells a frame apart when a call resumes it: a caller that met [`ApplyError::Busy`] must call again with the
/// same frame, and a different one (which should not happen) starts afresh instead of skipping checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameKey {
    epoch: u32,
    entries: usize,
    first: Option<u64>,
    bytes: usize,
}

impl FrameKey {
    fn of(epoch: u32, entries: &[PageEntry], bytes: usize) -> Self {
        FrameKey { epoch, entries: entries.len(), first: entries.first().map(|e| e.page), bytes }
    }
}

/// How far a frame's apply got before a busy page stopped it.
#[derive(Debug, Clone, Copy)]
struct Resume {
    key: FrameKey,
    index: usize,
    off: usize,
    zoff: usize,
}

/// One raw page of a frame read in place: its entry, its place in guest memory (None when the page holds a newer
/// copy and the bytes go to scratch), and its slot as it was before the claim.
#[derive(Debug, Clone, Copy)]
struct Claim {
    entry: usize,
    page: u64,
    place: Option<usize>,
    held: u32,
}

/// A frame's claimed pages. Those not yet settled (checked and stamped) are put back when this is dropped, on every
/// way out: an error while claiming, a failed read, a page that fails its hash. Each keeps its old epoch, so that a
/// resend of the frame applies, but its table entry becomes the hash of what the page holds now: some of the frame's
/// bytes may have landed, and if nothing resends the page (the bytes came from a rogue link, or Verify stopped the
/// link), the roots must differ rather than describe memory the page no longer holds.
struct Claims<'r, 'a> {
    rx: &'r Receiver<'a>,
    list: Vec<Claim>,
    /// Claims before this index are settled.
    settled: usize,
}

impl Drop for Claims<'_, '_> {
    fn drop(&mut self) {
        for c in &self.list[self.settled.min(self.list.len())..] {
            if let Some(addr) = c.place {
                let _guard = self.rx.stripe(c.page);
                // SAFETY: one whole page of the live mapping, still marked busy by this claim, so no other apply
                // writes it; the destination's vCPUs are paused until the migration commits.
                let now = page_hash(unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) });
                self.rx.hashes.set(c.page, now);
                if let Ok(slot) = self.rx.epoch(c.page) {
                    slot.store(c.held, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The payload of a frame in wire order, as (address, length) of disjoint buffers: raw pages at their claimed place
/// in guest memory (or in scratch when stale), lz4 blocks in `st.payload`, the zstd frame in `st.zin`. Adjacent
/// buffers are merged, so a run of consecutive pages is one iovec.
fn payload_parts(
    entries: &[PageEntry],
    claims: &[Claim],
    zstd_len: usize,
    st: &mut ApplyState,
    parts: &mut Vec<(usize, usize)>,
) {
    parts.clear();
    let push = |parts: &mut Vec<(usize, usize)>, addr: usize, len: usize| match parts.last_mut() {
        Some((a, l)) if *a + *l == addr => *l += len,
        _ => parts.push((addr, len)),
    };
    let (mut raw, mut other_off, mut stale_off) = (claims.iter(), 0usize, 0usize);
    for e in entries {
        if e.codec == Codec::Raw {
            let c = raw.next().expect("one claim per raw entry");
            match c.place {
                Some(addr) => push(parts, addr, PAGE_SIZE),
                None => {
                    push(parts, st.stale_buf.as_mut_ptr() as usize + stale_off, PAGE_SIZE);
                    stale_off += PAGE_SIZE;
                }
            }
        } else if e.len > 0 {
            push(parts, st.payload.as_mut_ptr() as usize + other_off, e.len as usize);
            other_off += e.len as usize;
        }
    }
    if zstd_len > 0 {
        push(parts, st.zin.as_mut_ptr() as usize, zstd_len);
    }
}

/// The destination's view of guest memory during a migration, shared by the apply threads of all links.
///
/// A page's epoch check and its write happen under the lock of the page's 2 MiB stripe, or, for a raw page read
/// straight from the network, under a busy mark set and cleared under that lock; so two links carrying copies of the
/// same page can never interleave: whichever applies last, the newer copy stays.
pub struct Receiver<'a> {
    mem: &'a dyn GuestMemory,
    pages: u64,
    /// Per page: 0 if never applied, else epoch + 1 of the copy it holds, and the owner while it is read in place
    /// (see [`OWNER_SHIFT`]). Only touched under the page's stripe lock. Chunks are allocated as pages arrive.
    epochs: Chunked<AtomicU32>,
    stripes: Vec<Mutex<()>>,
    hashes: HashTable,
    /// Set at a post-copy switch: pages are placed through it, never written or read in place.
    placer: OnceLock<Arc<dyn Placer>>,
}

impl<'a> Receiver<'a> {
    /// A receiver writing into `mem`, which must be all zero (freshly mapped).
    pub fn new(mem: &'a dyn GuestMemory) -> Self {
        let pages = mem.total_pages();
        Receiver {
            mem,
            pages,
            epochs: Chunked::new(pages, || AtomicU32::new(0)),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hashes: HashTable::new(pages),
            placer: OnceLock::new(),
        }
    }

    /// Checks an entry against the layout and its codec, before any of its payload is touched.
    pub fn check_entry(&self, e: &PageEntry) -> Result<(), ApplyError> {
        if e.page >= self.pages {
            return Err(ApplyError::PageOutOfRange { page: e.page, pages: self.pages });
        }
        let ok = match e.codec {
            Codec::Zero => e.len == 0,
            Codec::Raw => e.len as usize == PAGE_SIZE,
            Codec::Lz4 => e.len > 0 && (e.len as usize) <= lz4_flex::block::get_maximum_output_size(PAGE_SIZE),
            Codec::Zstd => e.len == 0,
        };
        if ok {
            Ok(())
        } else {
            Err(ApplyError::BadLength { page: e.page, codec: e.codec, len: e.len })
        }
    }

    /// Makes `held` the lock of `page`'s stripe, keeping it when it already is: consecutive pages of a frame mostly
    /// share a stripe, so a frame takes a lock per 2 MiB, not per page. Releases before taking the next: holding two
    /// stripes could deadlock against another link.
    fn hold<'s>(&'s self, held: &mut Option<(u64, MutexGuard<'s, ()>)>, page: u64) {
        let stripe = page / STRIPE_PAGES;
        if held.as_ref().is_none_or(|(s, _)| *s != stripe) {
            drop(held.take());
            *held = Some((stripe, self.stripe(page)));
        }
    }

    fn stripe(&self, page: u64) -> MutexGuard<'_, ()> {
        // The guarded data is (); a panic while holding it leaves nothing inconsistent.
        self.stripes[(page / STRIPE_PAGES) as usize % STRIPES].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one frame's pages, read in round `epoch`: `payload` holds the entries' payloads back to back, and
    /// `zstd` the frame's zstd frame. Every entry is checked, and the zstd frame decoded, before any page is applied; a
    /// page whose content fails its hash ends the frame with an error (the migration is then abandoned, so pages
    /// applied before it do not matter). On [`ApplyError::Busy`] the pages before the busy one are applied; calling
    /// again with the same frame goes on from the busy page.
    pub fn apply_frame(
        &self,
        epoch: u32,
        entries: &[PageEntry],
        payload: &[u8],
        zstd: &[u8],
        st: &mut ApplyState,
    ) -> Result<(), ApplyError> {
        let key = FrameKey::of(epoch, entries, payload.len() + zstd.len());
        let mut at = match st.resume.take() {
            Some(r) if r.key == key => r,
            _ => {
                self.check_frame(entries, payload, zstd, st)?;
                Resume { key, index: 0, off: 0, zoff: 0 }
            }
        };
        let mut held: Option<(u64, MutexGuard<'_, ()>)> = None;
        while let Some(e) = entries.get(at.index) {
            self.hold(&mut held, e.page);
            let r = if e.codec == Codec::Zstd {
                // Moved out for the call, which needs the state mutably; the page is copied before it comes back.
                let zbuf = std::mem::take(&mut st.zbuf);
                let r = self.apply_locked(epoch, e, &zbuf[at.zoff..at.zoff + PAGE_SIZE], st);
                st.zbuf = zbuf;
                r
            } else {
                self.apply_locked(epoch, e, &payload[at.off..at.off + e.len as usize], st)
            };
            if let Err(busy @ ApplyError::Busy { .. }) = r {
                st.resume = Some(at);
                return Err(busy);
            }
            r?;
            if e.codec == Codec::Zstd {
                at.zoff += PAGE_SIZE;
            } else {
                at.off += e.len as usize;
            }
            at.index += 1;
        }
        Ok(())
    }

    /// Checks every entry of a frame and its payload's length, and decodes its zstd frame into `st`.
    fn check_frame(
        &self,
        entries: &[PageEntry],
        payload: &[u8],
        zstd: &[u8],
        st: &mut ApplyState,
    ) -> Result<(), ApplyError> {
        let (mut total, mut zpages) = (0usize, 0usize);
        for e in entries {
            self.check_entry(e)?;
            total += e.len as usize;
            zpages += usize::from(e.codec == Codec::Zstd);
        }
        if total != payload.len() {
            let e = entries.first().copied().unwrap_or(PageEntry::new(0, Codec::Zero, 0, 0));
            let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
            return Err(ApplyError::BadLength { page: e.page, codec: e.codec, len });
        }
        st.unzstd(zstd, zpages)
    }

    /// Applies a frame whose payload is still on the wire: `read` gets one set of buffers covering the whole payload
    /// in wire order and must fill them exactly. Raw pages are read straight into their place in guest memory (a stale
    /// copy into scratch), which saves copying them out of a frame buffer; lz4 blocks and the zstd frame go to buffers
    /// and are applied afterwards, as [`Receiver::apply_frame`] does.
    ///
    /// The stripe locks are not held while `read` waits on the network: each raw page is marked busy by `owner` (the
    /// reading link's index, below [`MAX_OWNERS`]) instead, and any other apply of it (only a resend racing its original
    /// after a link failure) gets [`ApplyError::Busy`] until the mark is cleared. When this call meets a busy page, it
    /// returns that error too, and calling again with the same frame goes on: before `read` (the frame's claims are
    /// given back, nothing was read) or after it (the bytes stay, and `read` is not called again).
    /// The caller must bound `read`, so that a link dying mid-frame cannot keep pages busy for good. If `read` fails,
    /// or a page (not live) fails its hash after landing, the frame's unsettled pages keep their old epochs, and their
    /// table entries become the hashes of what they hold now: the frame was not acknowledged, so the source sends it
    /// again and the pages are rewritten whole; and where nothing resends them, the roots differ at switchover and the
    /// source keeps its guest.
    pub fn apply_frame_in_place(
        &self,
        epoch: u32,
        entries: &[PageEntry],
        zstd_len: usize,
        owner: u32,
        st: &mut ApplyState,
        read: impl FnOnce(&mut [std::io::IoSliceMut<'_>]) -> std::io::Result<()>,
    ) -> Result<(), InPlaceError> {
        let key = FrameKey::of(epoch, entries, zstd_len);
        if st.rest_pending.take() == Some(key) {
            return self.apply_rest(key, st);
        }
        if self.is_placing() {
            return self.apply_frame_buffered(key, entries, zstd_len, st, read);
        }
        let mut others_len = 0usize;
        for e in entries {
            self.check_entry(e)?;
            if e.codec != Codec::Raw {
                others_len += e.len as usize;
            }
        }
        let mut claims = Claims { rx: self, list: std::mem::take(&mut st.claims), settled: 0 };
        claims.list.clear();
        let stale_pages = self.claim_raw(entries, stamp_of(epoch), owner, &mut claims)?;
        st.payload.resize(others_len, 0);
        st.zin.resize(zstd_len, 0);
        st.stale_buf.resize(stale_pages * PAGE_SIZE, 0);
        let mut parts = std::mem::take(&mut st.parts);
        payload_parts(entries, &claims.list, zstd_len, st, &mut parts);
        // SAFETY: every part is a distinct range: a claimed guest page (one whole page of the live mapping, marked busy
        // so that no other apply touches it), a page of stale_buf, or a range of payload or zin, all sized above and
        // not resized until the slices are gone.
        let mut iov: Vec<std::io::IoSliceMut<'_>> = parts
            .iter()
            .map(|&(a, l)| std::io::IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(a as *mut u8, l) }))
            .collect();
        let filled = read(&mut iov);
        drop(iov);
        st.parts = parts;
        // On a failed read the claims go back as they were (the guard), and the source resends the frame.
        filled.map_err(InPlaceError::Io)?;
        // On a page that fails its hash the guard puts back the claims not yet settled (the buffer goes with it).
        self.settle(entries, stamp_of(epoch), &mut claims, st)?;
        st.claims = std::mem::take(&mut claims.list);
        st.others.clear();
        st.others.extend(entries.iter().filter(|e| e.codec != Codec::Raw));
        self.apply_rest(key, st)
    }

    /// Applies the pages of an in-place frame that were not raw, from the buffers its read filled.
    fn apply_rest(&self, key: FrameKey, st: &mut ApplyState) -> Result<(), InPlaceError> {
        let (others, payload, zin) =
            (std::mem::take(&mut st.others), std::mem::take(&mut st.payload), std::mem::take(&mut st.zin));
        let r = self.apply_frame(key.epoch, &others, &payload, &zin, st);
        (st.payload, st.zin, st.others) = (payload, zin, others);
        if matches!(r, Err(ApplyError::Busy { .. })) {
            st.rest_pending = Some(key);
        }
        Ok(r?)
    }

    /// Claims every raw page of a frame for an in-place read by `owner`, in entry order: a page already holding a
    /// newer copy is claimed stale (its bytes will go to scratch), any other is marked busy. Waits for a page another
    /// link is reading. Returns how many were stale. On an error (a page listed twice) the guard gives back what was
    /// claimed.
    fn claim_raw(
        &self,
        entries: &[PageEntry],
        stamp: u32,
        owner: u32,
        claims: &mut Claims<'_, '_>,
    ) -> Result<usize, ApplyError> {
        let owner = owner.min(MAX_OWNERS - 1);
        let mark = (owner + 1) << OWNER_SHIFT;
        let mut stale = 0;
        let mut lock: Option<(u64, MutexGuard<'_, ()>)> = None;
        for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.codec == Codec::Raw) {
            // check_entry bounded the index, so only a layout that lies fails here.
            let (ptr, _) = host_pages(self.mem, e.page, 1)
                .map_err(|_| ApplyError::PageOutOfRange { page: e.page, pages: self.pages })?;
            let slot = self.epoch(e.page)?;
            self.hold(&mut lock, e.page);
            let held = slot.load(Ordering::Relaxed);
            let place = match owner_of(held) {
                None if held > stamp => None,
                None => Some(ptr as usize),
                Some(o) if o == owner => return Err(ApplyError::Duplicate { page: e.page }),
                Some(o) => return Err(ApplyError::Busy { page: e.page, owner: o }),
            };
            match place {
                Some(_) => slot.store(held | mark, Ordering::Relaxed),
                None => stale += 1,
            }
            claims.list.push(Claim { entry: i, page: e.page, place, held });
        }
        Ok(stale)
    }

    /// Checks each claimed page where it landed and records it: the stamp of this round and the hash of what arrived.
    /// A page whose content fails its hash (and is not live) ends the frame with an error; the guard puts it and every
    /// later claim back as they were.
    fn settle(
        &self,
        entries: &[PageEntry],
        stamp: u32,
        claims: &mut Claims<'_, '_>,
        st: &mut ApplyState,
    ) -> Result<(), ApplyError> {
        let mut lock: Option<(u64, MutexGuard<'_, ()>)> = None;
        while let Some(&c) = claims.list.get(claims.settled) {
            let e = &entries[c.entry];
            if let Some(addr) = c.place {
                // SAFETY: the page is one whole page of the live mapping, still marked busy by this call.
                let computed = page_hash(unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE_SIZE) });
                if computed != e.hash && !e.live {
                    return Err(ApplyError::BadChecksum { page: e.page, expected: e.hash, computed });
                }
                self.hold(&mut lock, e.page);
                st.torn += u64::from(computed != e.hash);
                self.epoch(e.page)?.store(stamp, Ordering::Relaxed);
                self.hashes.set(e.page, computed);
                st.counts.raw += 1;
            } else {
                st.stale += 1;
            }
            claims.settled += 1;
        }
        Ok(())
    }

    /// Applies one page copy read in round `epoch`. `payload` is the entry's `len` bytes. On [`ApplyError::Busy`]
    /// nothing was applied.
    pub fn apply(&self, epoch: u32, e: &PageEntry, payload: &[u8], st: &mut ApplyState) -> Result<Applied, ApplyError> {
        self.check_entry(e)?;
        if payload.len() != e.len as usize || e.codec == Codec::Zstd {
            let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
            return Err(ApplyError::BadLength { page: e.page, codec: e.codec, len });
        }
        let _guard = self.stripe(e.page);
        self.apply_locked(epoch, e, payload, st)
    }

    /// The apply proper; the caller checked the entry and holds the page's stripe lock. [`ApplyError::Busy`] when
    /// another link is reading the page in place: that link needs the lock to finish, so the caller lets it go.
    fn apply_locked(
        &self,
        epoch: u32,
        e: &PageEntry,
        payload: &[u8],
        st: &mut ApplyState,
    ) -> Result<Applied, ApplyError> {
        let stamp = stamp_of(epoch);
        let slot = self.epoch(e.page)?;
        let held = slot.load(Ordering::Relaxed);
        if let Some(owner) = owner_of(held) {
            return Err(ApplyError::Busy { page: e.page, owner });
        }
        if held > stamp {
            st.stale += 1;
            return Ok(Applied::Stale);
        }
        let data: &[u8] = match e.codec {
            Codec::Zero => {
                st.scratch.fill(0);
                &st.scratch[..]
            }
            Codec::Raw | Codec::Zstd => payload,
            Codec::Lz4 => {
                let n = lz4_flex::block::decompress_into(payload, &mut st.scratch[..])
                    .map_err(|err| ApplyError::Decompress { page: e.page, reason: err.to_string() })?;
                if n != PAGE_SIZE {
                    return Err(ApplyError::Decompress {
                        page: e.page,
                        reason: format!("decoded to {n} bytes, not {PAGE_SIZE}"),
                    });
                }
                &st.scratch[..]
            }
        };
        // Checked before anything is written: a corrupt page never reaches guest memory.
        let computed = if e.codec == Codec::Zero { zero_page_hash() } else { page_hash(data) };
        if computed != e.hash {
            if !(e.live && e.codec == Codec::Raw) {
                return Err(ApplyError::BadChecksum { page: e.page, expected: e.hash, computed });
            }
            st.torn += 1;
        }
        if let Some(p) = self.placer.get() {
            // Post-copy: the kernel places the page whole (a zero page too: a vCPU may be waiting on it).
            p.place(e.page, (e.codec != Codec::Zero).then_some(data))?;
        } else if e.codec != Codec::Zero || held != 0 {
            // (Fresh destination memory is already zero: writing a zero page there would only fault it in.)
            let (ptr, _) = host_pages(self.mem, e.page, 1)
                .map_err(|_| ApplyError::PageOutOfRange { page: e.page, pages: self.pages })?;
            // SAFETY: host_pages points at one whole page of the destination's live mapping. Its vCPUs are paused
            // until the migration commits, and the stripe lock held by the caller excludes every other apply of it.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, PAGE_SIZE) };
        }
        slot.store(stamp, Ordering::Relaxed);
        self.hashes.set(e.page, computed);
        st.counts.count(e.codec);
        Ok(Applied::Written)
    }

    /// Page `page`'s epoch slot (its chunk allocated if need be).
    fn epoch(&self, page: u64) -> Result<&AtomicU32, ApplyError> {
        self.epochs.slot(page).ok_or(ApplyError::PageOutOfRange { page, pages: self.pages })
    }

    /// Bytes of per-page state the receiver holds: epochs and hashes, for the chunks written.
    pub fn table_bytes(&self) -> u64 {
        self.epochs.bytes() + self.hashes.bytes()
    }

    /// The receiver's hash table.
    pub fn hashes(&self) -> &HashTable {
        &self.hashes
    }

    /// The root over the hashes of every page applied so far.
    pub fn root(&self) -> u64 {
        self.hashes.root()
    }
}

#[cfg(test)]
mod tests;
