//! Page hashes and the tables of them that verification compares: one xxh3 per page on each side (what the sender
//! sent, what the receiver applied), and a root over each table.

use crate::guest::{GuestError, GuestMemory, PAGE_SIZE};
use crate::sparse::Chunked;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use twox_hash::XxHash3_64;

/// The xxh3 of a page.
pub fn page_hash(page: &[u8]) -> u64 {
    XxHash3_64::oneshot(page)
}

/// The xxh3 of an all-zero page.
pub fn zero_page_hash() -> u64 {
    static H: OnceLock<u64> = OnceLock::new();
    *H.get_or_init(|| XxHash3_64::oneshot(&[0u8; PAGE_SIZE]))
}

/// One xxh3 per guest page: what the sender sent, or what the receiver applied. Starts as all-zero pages, which is
/// what both sides hold for a page never sent, and holds memory only for the 2 MiB chunks where a page with other
/// content was recorded ([`Chunked`]).
#[derive(Debug)]
pub struct HashTable {
    hashes: Chunked<AtomicU64>,
}

impl HashTable {
    /// A table of `pages` zero pages; it allocates nothing per page.
    pub fn new(pages: u64) -> Self {
        HashTable { hashes: Chunked::new(pages, || AtomicU64::new(zero_page_hash())) }
    }

    /// Records page `page`'s hash. Each page is set by one worker at a time (a round sends a page once), so a relaxed
    /// store is enough; the round barrier orders rounds. A zero page in a chunk never written needs no record: the
    /// chunk already reads as zero pages (and a page that held anything else has its chunk).
    pub fn set(&self, page: u64, hash: u64) {
        if hash == zero_page_hash() && self.hashes.get(page).is_none() {
            return;
        }
        if let Some(h) = self.hashes.slot(page) {
            h.store(hash, Ordering::Relaxed);
        }
    }

    /// Page `page`'s recorded hash.
    pub fn get(&self, page: u64) -> Option<u64> {
        (page < self.len()).then(|| self.hashes.get(page).map_or(zero_page_hash(), |h| h.load(Ordering::Relaxed)))
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.hashes.len()
    }

    /// True for an empty table.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Bytes the table holds (its chunk index and the chunks written).
    pub fn bytes(&self) -> u64 {
        self.hashes.bytes()
    }

    /// The digest the two sides compare: an xxh3 over one xxh3 per chunk of the table's hashes, in page order. A chunk
    /// never written has the digest of a chunk of zero pages, so the root depends on the hashes alone, not on which
    /// side allocated what; only the written chunks are read (8 bytes a page: 4 MiB for a 2 GiB guest).
    pub fn root(&self) -> u64 {
        static ZERO_CHUNK: OnceLock<u64> = OnceLock::new();
        let zero_digest = |n: u64| {
            let mut h = XxHash3_64::new();
            for _ in 0..n {
                h.write(&zero_page_hash().to_le_bytes());
            }
            h.finish()
        };
        let mut root = XxHash3_64::new();
        let mut buf = [0u8; 8 * crate::num::usize_from(crate::sparse::CHUNK)];
        for (n, chunk) in self.hashes.chunks() {
            let digest = match chunk {
                None if n == crate::sparse::CHUNK => *ZERO_CHUNK.get_or_init(|| zero_digest(n)),
                None => zero_digest(n),
                Some(c) => {
                    for (i, v) in c.iter().enumerate() {
                        buf[i * 8..i * 8 + 8].copy_from_slice(&v.load(Ordering::Relaxed).to_le_bytes());
                    }
                    XxHash3_64::oneshot(&buf[..c.len() * 8])
                }
            };
            root.write(&digest.to_le_bytes());
        }
        root.finish()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::CHUNK;

    #[test]
    fn the_root_depends_on_the_hashes_alone_not_on_which_chunks_were_allocated() {
        let pages = 5 * CHUNK + 100;
        let (a, b) = (HashTable::new(pages), HashTable::new(pages));
        // Zero pages recorded into untouched chunks allocate nothing.
        a.set(7, zero_page_hash());
        assert_eq!(a.bytes(), HashTable::new(pages).bytes());
        // A chunk that held data and went back to zero pages is allocated on one side only.
        b.set(3 * CHUNK + 1, 42);
        b.set(3 * CHUNK + 1, zero_page_hash());
        b.set(pages - 1, 9);
        b.set(pages - 1, zero_page_hash());
        assert!(b.bytes() > a.bytes());
        assert_eq!(a.root(), b.root());
        // Any hash that differs shows.
        a.set(2 * CHUNK, 1);
        assert_ne!(a.root(), b.root());
        b.set(2 * CHUNK, 1);
        assert_eq!(a.root(), b.root());
        assert_eq!((a.get(2 * CHUNK), a.get(4 * CHUNK), a.get(pages)), (Some(1), Some(zero_page_hash()), None));
    }

    #[test]
    fn a_table_holds_memory_for_the_chunks_written_only() {
        // 64 GiB of guest, 16 Mi pages: 8 bytes a page would be 128 MiB.
        let t = HashTable::new(16 << 20);
        let empty = t.bytes();
        assert!(empty < 1 << 20, "{empty} bytes for an empty table");
        t.set(12_345, 1);
        assert_eq!(t.bytes(), empty + 8 * CHUNK);
    }
}
