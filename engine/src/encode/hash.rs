//! Page hashes and the tables of them that verification compares: one xxh3 per page on each side (what the sender
//! sent, what the receiver applied), and a root over each table.

use crate::guest::{GuestError, GuestMemory, PAGE_SIZE};
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
        if let Some(h) = self.hashes.get(crate::num::usize_from(page)) {
            h.store(hash, Ordering::Relaxed);
        }
    }

    /// Page `page`'s recorded hash.
    pub fn get(&self, page: u64) -> Option<u64> {
        self.hashes.get(crate::num::usize_from(page)).map(|h| h.load(Ordering::Relaxed))
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
        let mut h = XxHash3_64::new();
        let mut buf = [0u8; 8 * 512];
        for chunk in self.hashes.chunks(512) {
            for (i, v) in chunk.iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&v.load(Ordering::Relaxed).to_le_bytes());
            }
            h.write(&buf[..chunk.len() * 8]);
        }
        h.finish()
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
