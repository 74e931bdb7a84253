//! Per-page tables that cost nothing for pages never touched: [`Chunked`] allocates a chunk of [`CHUNK`] entries
//! (2 MiB of guest memory) the first time one of its pages is written, and reads a page of an untouched chunk as the
//! table's initial value. The page hash tables of both sides and the receiver's epochs are `Chunked`, so a 64 GiB
//! guest with 1.5 GiB touched holds tables for 1.5 GiB, not 64, and builds them without a pass over every page.

use std::sync::OnceLock;

/// Entries per chunk: 512 pages, 2 MiB of guest memory.
pub const CHUNK: u64 = 512;

/// A table of `len` entries of `T`, each starting as `init()`, whose chunks are allocated on first write.
pub struct Chunked<T> {
    len: u64,
    chunks: Vec<OnceLock<Box<[T]>>>,
    init: fn() -> T,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Chunked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunked").field("len", &self.len).field("allocated", &self.allocated()).finish()
    }
}

impl<T> Chunked<T> {
    /// A table of `len` entries, none allocated.
    pub fn new(len: u64, init: fn() -> T) -> Self {
        let chunks = (0..len.div_ceil(CHUNK)).map(|_| OnceLock::new()).collect();
        Chunked { len, chunks, init }
    }

    /// Entries in the table.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a table of no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entry `i` if its chunk has been written; None for an untouched chunk (or past the end).
    pub fn get(&self, i: u64) -> Option<&T> {
        let chunk = self.chunks.get(crate::num::usize_from(i / CHUNK))?.get()?;
        chunk.get(crate::num::usize_from(i % CHUNK))
    }

    /// Entry `i`, allocating its chunk if need be; None past the end.
    pub fn slot(&self, i: u64) -> Option<&T> {
        let c = crate::num::usize_from(i / CHUNK);
        let cell = self.chunks.get(c)?;
        let chunk = cell.get_or_init(|| {
            let n = CHUNK.min(self.len - c as u64 * CHUNK);
            (0..n).map(|_| (self.init)()).collect()
        });
        chunk.get(crate::num::usize_from(i % CHUNK))
    }

    /// Each chunk in order: its entries if written, else None, with the number of entries it covers.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, Option<&[T]>)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .map(|(c, cell)| (CHUNK.min(self.len - c as u64 * CHUNK), cell.get().map(|b| &b[..])))
    }

    /// Chunks allocated so far.
    pub fn allocated(&self) -> usize {
        self.chunks.iter().filter(|c| c.get().is_some()).count()
    }

    /// Bytes the table holds: its chunk index, and the chunks written.
    pub fn bytes(&self) -> u64 {
        let index = self.chunks.len() * std::mem::size_of::<OnceLock<Box<[T]>>>();
        let chunk = crate::num::usize_from(CHUNK) * std::mem::size_of::<T>();
        (index + self.allocated() * chunk) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn untouched_chunks_cost_nothing_and_read_as_absent() {
        let t: Chunked<AtomicU32> = Chunked::new(3 * CHUNK + 10, || AtomicU32::new(7));
        assert_eq!((t.len(), t.allocated()), (3 * CHUNK + 10, 0));
        assert!(t.get(5).is_none());
        t.slot(5).unwrap().store(1, Ordering::Relaxed);
        assert_eq!(t.get(5).unwrap().load(Ordering::Relaxed), 1);
        assert_eq!(t.get(6).unwrap().load(Ordering::Relaxed), 7, "the rest of the chunk starts at init");
        // The last chunk is cut to the table's end.
        t.slot(3 * CHUNK + 9).unwrap();
        assert!(t.slot(3 * CHUNK + 10).is_none() && t.get(3 * CHUNK + 10).is_none());
        let sizes: Vec<(u64, bool)> = t.chunks().map(|(n, c)| (n, c.is_some())).collect();
        assert_eq!(sizes, [(CHUNK, true), (CHUNK, false), (CHUNK, false), (10, true)]);
        assert_eq!(t.chunks().last().unwrap().1.unwrap().len(), 10);
        assert_eq!(t.allocated(), 2);
    }
}
