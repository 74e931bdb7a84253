//! The record layer that carries every byte of an authenticated connection: AES-256-GCM (ring, with the CPU's AES
//! instructions) under keys exported from the connection's TLS 1.3 session, one key per direction.
//!
//! A record is `[len: u32 LE][ciphertext: len bytes][tag: 16 bytes]`, with `len` as the AEAD's associated data. Its
//! nonce is never sent: it is the direction's 4-byte prefix and a 64-bit count of the records sealed before it, so a
//! nonce never repeats under a key, and a record that is replayed, reordered, dropped, altered or cut short fails to
//! open (or to arrive whole), which ends the connection. The two directions are independent ([`Sealer`] and
//! [`Opener`]), so a link's writer and reader threads each own one and never wait for each other.
//!
//! Why not rustls' own records: the data path writes frames with vectored writes from guest memory and reads pages
//! straight into guest memory, from two threads per link. Sealing here reads each page once, into the record
//! buffer it is encrypted in, and opening writes the plaintext straight into the reader's buffers (guest pages).

use crate::wire::read_full as read_upto;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use std::io::{IoSlice, IoSliceMut, Read, Write};

/// The most plaintext one record carries. A record is opened whole before any of it is used, so this bounds what
/// an on-path attacker can make the reader buffer; 64 KiB keeps a record in the L2 cache while it is sealed.
pub const MAX_RECORD: usize = 64 << 10;
/// Bytes an AES-GCM tag adds.
pub const TAG_LEN: usize = 16;
const LEN_LEN: usize = 4;
/// Parts shorter than a page are headers and tables, which [`Sealer::write_all_parts`] keeps out of payload records.
const SMALL_PART: usize = 4096;

/// What one direction needs: its key and nonce prefix.
#[derive(Clone)]
pub struct DirectionKey {
    key: [u8; 32],
    prefix: [u8; 4],
}

impl std::fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectionKey(..)")
    }
}

impl DirectionKey {
    /// A key from 36 bytes of exported keying material: 32 of key, 4 of nonce prefix.
    pub fn from_material(m: &[u8; 36]) -> Self {
        let mut key = [0u8; 32];
        let mut prefix = [0u8; 4];
        key.copy_from_slice(&m[..32]);
        prefix.copy_from_slice(&m[32..]);
        DirectionKey { key, prefix }
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("a 32-byte key fits AES-256-GCM"))
    }
}

fn nonce(prefix: [u8; 4], counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&prefix);
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn io_err(kind: std::io::ErrorKind, why: String) -> std::io::Error {
    std::io::Error::new(kind, why)
}

/// The sending direction: seals plaintext into records.
pub struct Sealer {
    key: LessSafeKey,
    prefix: [u8; 4],
    sealed: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("sealed", &self.sealed).finish()
    }
}

impl Sealer {
    /// A sealer under `k`, starting at record 0.
    pub fn new(k: &DirectionKey) -> Self {
        Sealer { key: k.aead(), prefix: k.prefix, sealed: 0, buf: Vec::new() }
    }

    /// Seals all of `parts` (in order) into records in this sealer's buffer, and writes them to `w` in one go.
    /// Returns the plaintext bytes taken.
    ///
    /// Small parts that come before a page-sized one (a frame's header and entry table, before its payload) get a
    /// record of their own, so that the payload's records start with it: the receiver can then open a record straight
    /// into the guest pages it reads the payload into.
    pub fn write_all_parts(&mut self, w: &mut impl Write, parts: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        self.buf.clear();
        self.buf.reserve(total + (total.div_ceil(MAX_RECORD) + 1) * (LEN_LEN + TAG_LEN));
        // The open record: where its length prefix starts, and whether it holds only small parts so far.
        let mut open: Option<(usize, bool)> = None;
        for part in parts {
            let mut rest: &[u8] = part;
            if rest.len() >= SMALL_PART {
                if let Some((start, true)) = open {
                    self.seal_tail(start)?;
                    open = None;
                }
            }
            while !rest.is_empty() {
                let (start, small) = *open.get_or_insert_with(|| {
                    let start = self.buf.len();
                    self.buf.extend_from_slice(&[0; LEN_LEN]);
                    (start, true)
                });
                let room = MAX_RECORD - (self.buf.len() - start - LEN_LEN);
                let k = rest.len().min(room);
                // The one read of each source byte.
                self.buf.extend_from_slice(&rest[..k]);
                rest = &rest[k..];
                open = Some((start, small && part.len() < SMALL_PART));
                if k == room {
                    self.seal_tail(start)?;
                    open = None;
                }
            }
        }
        if let Some((start, _)) = open {
            self.seal_tail(start)?;
        }
        w.write_all(&self.buf)?;
        Ok(total)
    }

    /// Seals the record whose length prefix starts at `start` and whose plaintext runs to the end of the buffer,
    /// filling in the length first.
    fn seal_tail(&mut self, start: usize) -> std::io::Result<()> {
        let len = livemig_engine::num::u32_len(self.buf.len() - start - LEN_LEN);
        self.buf[start..start + LEN_LEN].copy_from_slice(&len.to_le_bytes());
        let n = nonce(self.prefix, self.sealed);
        self.sealed = self
            .sealed
            .checked_add(1)
            .ok_or_else(|| io_err(std::io::ErrorKind::InvalidData, "2^64 records sealed under one key".into()))?;
        let (head, body) = self.buf.split_at_mut(start + LEN_LEN);
        let aad: [u8; LEN_LEN] = head[start..].try_into().expect("4 bytes");
        let tag = self
            .key
            .seal_in_place_separate_tag(n, Aad::from(aad), body)
            .map_err(|_| io_err(std::io::ErrorKind::InvalidData, "sealing a record failed".into()))?;
        self.buf.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// The receiving direction: opens records and hands out their plaintext.
pub struct Opener {
    key: LessSafeKey,
    prefix: [u8; 4],
    opened: u64,
    buf: Vec<u8>,
    /// Plaintext not yet handed out: `buf[pos..end]`.
    pos: usize,
    end: usize,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("opened", &self.opened).finish()
    }
}

impl Opener {
    /// An opener under `k`, expecting record 0 first.
    pub fn new(k: &DirectionKey) -> Self {
        Opener { key: k.aead(), prefix: k.prefix, opened: 0, buf: Vec::new(), pos: 0, end: 0 }
    }

    /// Reads the next record's length from `r`: `Ok(None)` at a clean end of stream (between records).
    fn next_len(&mut self, r: &mut impl Read) -> std::io::Result<Option<(usize, [u8; LEN_LEN])>> {
        let mut len = [0u8; LEN_LEN];
        let got = read_upto(r, &mut len)?;
        if got == 0 {
            return Ok(None);
        }
        if got < LEN_LEN {
            return Err(io_err(std::io::ErrorKind::UnexpectedEof, "a record cut short in its length".into()));
        }
        let n = livemig_engine::num::usize_from(u64::from(u32::from_le_bytes(len)));
        if n == 0 || n > MAX_RECORD {
            return Err(io_err(
                std::io::ErrorKind::InvalidData,
                format!("a record of {n} bytes (at most {MAX_RECORD}): the stream is corrupt or not livemig's"),
            ));
        }
        Ok(Some((n, len)))
    }

    fn failed(&self) -> std::io::Error {
        io_err(
            std::io::ErrorKind::InvalidData,
            format!("record {} failed authentication: altered, replayed, reordered or forged on the way", self.opened),
        )
    }

    fn cut(got: usize, want: usize) -> std::io::Error {
        io_err(std::io::ErrorKind::UnexpectedEof, format!("a record cut short: {got} of {want} bytes"))
    }

    /// Opens a record of `n` bytes into this opener's buffer.
    fn open_buffered(&mut self, r: &mut impl Read, n: usize, len: [u8; LEN_LEN]) -> std::io::Result<()> {
        self.buf.resize(n + TAG_LEN, 0);
        let got = read_upto(r, &mut self.buf)?;
        if got < n + TAG_LEN {
            return Err(Self::cut(got, n + TAG_LEN));
        }
        let nonce = nonce(self.prefix, self.opened);
        if self.key.open_in_place(nonce, Aad::from(len), &mut self.buf).is_err() {
            return Err(self.failed());
        }
        self.opened += 1;
        (self.pos, self.end) = (0, n);
        Ok(())
    }

    /// Opens a record of `n` bytes straight into `out` (at least `n` long): the ciphertext is read there and
    /// decrypted where it lies, which saves copying the plaintext out of a buffer. On failure `out` holds garbage;
    /// the caller's reads fail, so it treats `out` as it treats a read that failed part-way.
    fn open_direct(&mut self, r: &mut impl Read, n: usize, len: [u8; LEN_LEN], out: &mut [u8]) -> std::io::Result<()> {
        let got = read_upto(r, &mut out[..n])?;
        let mut tag = [0u8; TAG_LEN];
        let got_tag = if got == n { read_upto(r, &mut tag)? } else { 0 };
        if got + got_tag < n + TAG_LEN {
            return Err(Self::cut(got + got_tag, n + TAG_LEN));
        }
        let nonce = nonce(self.prefix, self.opened);
        let opened = self.key.open_in_place_separate_tag(nonce, Aad::from(len), tag.into(), &mut out[..n], 0..);
        if opened.is_err() {
            return Err(self.failed());
        }
        self.opened += 1;
        Ok(())
    }

    /// Fills `bufs` from opened plaintext, opening records from `r` as needed; returns the bytes given (0 at a clean
    /// end of stream). Gives at most one record's plaintext per call, at least one byte. A record that fits in the
    /// first buffer is opened straight into it.
    pub fn read_vectored_from(&mut self, r: &mut impl Read, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Ok(0);
        };
        let bufs = &mut bufs[first..];
        if self.pos == self.end {
            let Some((n, len)) = self.next_len(r)? else {
                return Ok(0);
            };
            if bufs[0].len() >= n {
                self.open_direct(r, n, len, &mut bufs[0])?;
                return Ok(n);
            }
            self.open_buffered(r, n, len)?;
        }
        Ok(give(&self.buf[..self.end], &mut self.pos, bufs))
    }
}

/// Copies `src[*pos..]` into `bufs` in order, as far as they hold; advances `pos` and returns the bytes given.
pub(crate) fn give(src: &[u8], pos: &mut usize, bufs: &mut [IoSliceMut<'_>]) -> usize {
    let mut given = 0;
    for b in bufs.iter_mut() {
        let k = b.len().min(src.len() - *pos);
        b[..k].copy_from_slice(&src[*pos..*pos + k]);
        *pos += k;
        given += k;
        if *pos == src.len() {
            break;
        }
    }
    given
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Opener) {
        let k = DirectionKey::from_material(&[7u8; 36]);
        (Sealer::new(&k), Opener::new(&k))
    }

    fn read_all(o: &mut Opener, mut wire: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1000];
        loop {
            let n = o.read_vectored_from(&mut wire, &mut [IoSliceMut::new(&mut buf)])?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn records_carry_any_split_of_the_plaintext_and_hide_it() {
        let (mut s, mut o) = pair();
        let a: Vec<u8> = b"the quick brown fox ".iter().copied().cycle().take(150_000).collect();
        let mut wire = Vec::new();
        s.write_all_parts(&mut wire, &[IoSlice::new(&a[..10]), IoSlice::new(&a[10..])]).unwrap();
        s.write_all_parts(&mut wire, &[IoSlice::new(b"tail")]).unwrap();
        // The 10-byte head gets a record of its own (it comes before a big part), 149 990 bytes make three more,
        // and the tail one.
        assert_eq!(wire.len(), 150_004 + 5 * (LEN_LEN + TAG_LEN));
        assert_eq!(u32::from_le_bytes(wire[..4].try_into().unwrap()), 10);
        assert!(!wire.windows(9).any(|w| w == b"quick bro"), "plaintext on the wire");
        let got = read_all(&mut o, &wire).unwrap();
        assert_eq!(&got[..150_000], &a[..]);
        assert_eq!(&got[150_000..], b"tail");
    }

    #[test]
    fn a_flipped_bit_a_replay_a_reorder_and_a_cut_each_end_the_stream() {
        let (mut s, _) = pair();
        let mut recs = Vec::new();
        for m in [&b"first"[..], b"second", b"third"] {
            let mut w = Vec::new();
            s.write_all_parts(&mut w, &[IoSlice::new(m)]).unwrap();
            recs.push(w);
        }
        let fresh = || pair().1;
        let err = |wire: Vec<u8>| read_all(&mut fresh(), &wire).unwrap_err().to_string();
        let mut flipped = recs.concat();
        flipped[LEN_LEN + 1] ^= 0x20;
        assert!(err(flipped).contains("record 0 failed authentication"));
        let replayed = [recs[0].clone(), recs[0].clone()].concat();
        assert!(err(replayed).contains("record 1 failed authentication"));
        let reordered = [recs[0].clone(), recs[2].clone()].concat();
        assert!(err(reordered).contains("record 1 failed authentication"));
        let all = recs.concat();
        assert!(err(all[..all.len() - 3].to_vec()).contains("cut short"));
        assert!(err([&all[..], &[0xff, 0xff, 0xff, 0x7f]].concat()).contains("at most"));
        // Whole records, in order, open.
        assert_eq!(read_all(&mut fresh(), &all).unwrap(), b"firstsecondthird");
    }

    #[test]
    fn a_record_that_fits_the_reader_s_buffer_opens_straight_into_it() {
        let (mut s, mut o) = pair();
        let page: Vec<u8> = (0..8192u32).map(|i| (i % 251).to_le_bytes()[0]).collect();
        let mut wire = Vec::new();
        s.write_all_parts(&mut wire, &[IoSlice::new(b"header"), IoSlice::new(&page)]).unwrap();
        let (mut head, mut out) = ([0u8; 6], vec![0u8; 8192]);
        let mut r = &wire[..];
        assert_eq!(o.read_vectored_from(&mut r, &mut [IoSliceMut::new(&mut head)]).unwrap(), 6);
        // The page's record opens into `out` whole, in one call.
        assert_eq!(o.read_vectored_from(&mut r, &mut [IoSliceMut::new(&mut out)]).unwrap(), 8192);
        assert_eq!((&head, &out), (b"header", &page));
        // Tampered, it fails there too.
        let (mut s, mut o) = pair();
        let mut wire = Vec::new();
        s.write_all_parts(&mut wire, &[IoSlice::new(&page)]).unwrap();
        wire[100] ^= 1;
        let e = o.read_vectored_from(&mut &wire[..], &mut [IoSliceMut::new(&mut out)]).unwrap_err();
        assert!(e.to_string().contains("record 0 failed authentication"), "{e}");
    }

    #[test]
    fn the_other_direction_s_key_opens_nothing() {
        let mut s = Sealer::new(&DirectionKey::from_material(&[1u8; 36]));
        let mut o = Opener::new(&DirectionKey::from_material(&[2u8; 36]));
        let mut w = Vec::new();
        s.write_all_parts(&mut w, &[IoSlice::new(b"hello")]).unwrap();
        assert!(read_all(&mut o, &w).is_err());
    }
}
