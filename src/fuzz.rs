//! Fuzz targets: what the destination does with bytes that come from the network, one function per target. Each must
//! return, whatever it is given: no panic, no allocation past the frame limits, no hang.
//!
//! - [`frame`]: a frame as it arrives (header checks, then the body decoder of its kind), and the same bytes with
//!   the checksum made right, so that mutations reach the body decoders instead of stopping at the checksum.
//! - [`handshake`]: the bodies of Hello, HelloAck and LinkHello; a Hello that decodes must encode back to itself and
//!   pass or fail the destination's admission check without panicking.
//! - [`state_blob`]: a vCPU state blob restored into a synthetic destination guest, and parsed as a KVM blob.
//! - [`apply`]: a Pages frame applied by a [`Receiver`] to a fresh guest, raw pages read in place as a data link does;
//!   when it applies, every page's hash in the receiver's table is the hash of what the page holds.
//!
//! `tests/fuzz.rs` runs them on stable Rust with [`mutate`] over the corpus in `fuzz/corpus/`, for a bounded number
//! of iterations in the normal test run; `fuzz/` runs the same functions under `cargo fuzz` (libFuzzer, coverage
//! guided) where a nightly toolchain is present.

use livemig_engine::encode::page_hash;
use livemig_engine::guest::{read_page, GuestMemory, MemoryLayout, SyntheticGuest, Vcpus};
use livemig_engine::receive::{ApplyState, Receiver};
use livemig_transport::dest::DestOptions;
use livemig_transport::wire::{self, Hello, Kind, HEADER_LEN};
use std::hash::Hasher;
use std::sync::OnceLock;

/// A fuzz target: takes any bytes, and returns.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as `tests/fuzz.rs` and the corpus directories know them.
pub const TARGETS: [(&str, Target); 4] =
    [("frame", frame), ("handshake", handshake), ("state_blob", state_blob), ("apply", apply)];

/// Rewrites a frame's checksum to match its header and checked body, as far as the bytes reach.
pub fn fix_checksum(f: &mut [u8]) {
    if f.len() < HEADER_LEN {
        return;
    }
    let checked = u32::from_le_bytes(f[20..24].try_into().expect("4 bytes")) as usize;
    let body = &f[HEADER_LEN..];
    let mut x = twox_hash::XxHash3_64::new();
    x.write(&f[..24]);
    x.write(&body[..checked.min(body.len())]);
    let sum = x.finish();
    f[24..32].copy_from_slice(&sum.to_le_bytes());
}

/// A frame from the network, as received and with its checksum made right.
pub fn frame(data: &[u8]) {
    decode_frame(data);
    let mut fixed = data.to_vec();
    fix_checksum(&mut fixed);
    decode_frame(&fixed);
}

fn decode_frame(data: &[u8]) {
    let mut body = Vec::new();
    let Ok(h) = wire::read_frame(&mut &data[..], &mut body) else { return };
    assert!(body.len() <= h.kind.max_body() as usize, "a {:?} body over its limit was read", h.kind);
    match h.kind {
        Kind::Hello | Kind::HelloAck | Kind::LinkHello => handshake(&body),
        Kind::Pages => {
            let mut entries = Vec::new();
            if let Ok(p) = wire::decode_pages(&h, &body, &mut entries) {
                let total: usize = entries.iter().map(|e| e.len as usize).sum();
                assert_eq!(total, p.entries.len(), "the entries' lengths disagree with the payload they were given");
            }
        }
        Kind::Ack => drop(wire::Ack::decode(&body)),
        Kind::Verify => drop(wire::Verify::decode(&body)),
        Kind::Verified => drop(wire::Verified::decode(&body)),
        Kind::Abort => assert!(wire::decode_reason(&body).len() <= 3 * wire::MAX_REASON),
        Kind::VcpuState => state_blob(&body),
        Kind::DeviceState => {
            if let Ok(d) = wire::decode_device(&body) {
                assert_eq!(wire::decode_device(&wire::encode_device(&d)).ok(), Some(d), "a device section round trip");
            }
        }
        Kind::Missing => {
            const PAGES: u64 = 1 << 20;
            if let Ok((first, words)) = wire::postcopy::decode_missing(&body, PAGES) {
                // What it names survives encoding again, and lies inside the guest.
                let mut into = livemig_engine::dirty::Bitmap::new(PAGES);
                into.or_region(&words, first, PAGES.saturating_sub(first));
                let mut again = livemig_engine::dirty::Bitmap::new(PAGES);
                for b in wire::postcopy::encode_missing(&into) {
                    let (f, w) = wire::postcopy::decode_missing(&b, PAGES).expect("an encoded bitmap decodes");
                    again.or_region(&w, f, PAGES - f);
                }
                assert_eq!(again.words(), into.words(), "a Missing bitmap does not survive encode and decode");
                let named: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                assert_eq!(into.count_ones(), named, "a Missing body named a page past the guest");
            }
        }
        Kind::PageRequest => {
            if let Ok(p) = wire::postcopy::decode_request(&body, 1 << 20) {
                assert!(p.iter().all(|&p| p < 1 << 20) && p.len() <= wire::postcopy::REQUEST_PAGES);
            }
        }
        Kind::PostcopyStats => {
            if let Ok(s) = wire::postcopy::decode_stats(&body) {
                let again = wire::postcopy::decode_stats(&wire::postcopy::encode_stats(&s)).ok();
                assert_eq!(again, Some(s), "post-copy stats round trip");
            }
        }
        Kind::Resume => {
            if let Ok(r) = wire::LinkHello::decode_as(Kind::Resume, &body) {
                assert_eq!(wire::LinkHello::decode_as(Kind::Resume, &r.encode()).ok(), Some(r), "a Resume round trip");
            }
        }
        Kind::Resumed => {
            if let Ok(n) = wire::postcopy::decode_resumed(&body, 1 << 20) {
                assert!(n <= 1 << 20, "a Resumed count past the guest was accepted");
            }
        }
        Kind::StateAck | Kind::Commit | Kind::Committed | Kind::Switch | Kind::Switched | Kind::MissingAck => {}
    }
}

fn host_cpu() -> &'static livemig_engine::cpu::CpuDescription {
    static CPU: OnceLock<livemig_engine::cpu::CpuDescription> = OnceLock::new();
    CPU.get_or_init(livemig_engine::cpu::host)
}

/// Handshake bodies: Hello, HelloAck, LinkHello.
pub fn handshake(data: &[u8]) {
    if let Ok(h) = Hello::decode(data) {
        let again = Hello::decode(&h.encode()).expect("a Hello that decoded must re-encode to one that decodes");
        assert_eq!(again, h, "a Hello does not survive encode and decode");
        let opts = DestOptions { max_memory: 1 << 30, host_cpu: Some(host_cpu().clone()), ..Default::default() };
        let _ = opts.check(&h);
    }
    let _ = wire::HelloAck::decode(data);
    let _ = wire::LinkHello::decode(data);
}

/// A vCPU state blob: restored into a synthetic destination guest built for four vCPUs, and parsed as a KVM one.
pub fn state_blob(data: &[u8]) {
    static GUEST: OnceLock<SyntheticGuest> = OnceLock::new();
    let g = GUEST.get_or_init(|| {
        SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, 64 * 4096)] }, 4).expect("a small guest")
    });
    if g.vcpus().restore_state(data).is_ok() {
        assert!(g.vcpus().count() <= 4, "a blob brought {} vCPUs to a guest built for 4", g.vcpus().count());
    }
    let _ = livemig_kvm::state::parse(data);
}

/// Pages a fuzzed Pages frame may address.
const APPLY_PAGES: u64 = 64;

/// A Pages frame (the first four bytes are its round) applied to a fresh guest, its checksum made right.
pub fn apply(data: &[u8]) {
    applies(data);
}

/// [`apply`], saying whether the frame applied (its table then checked against memory).
pub fn applies(data: &[u8]) -> bool {
    if data.len() < 4 + HEADER_LEN {
        return false;
    }
    let epoch = u32::from_le_bytes(data[..4].try_into().expect("4 bytes"));
    let mut f = data[4..].to_vec();
    fix_checksum(&mut f);
    let Ok(h) = wire::Header::decode(f[..HEADER_LEN].try_into().expect("a header")) else { return false };
    if h.kind != Kind::Pages {
        return false;
    }
    let rest = &f[HEADER_LEN..];
    let table_len = (h.checked_len as usize).min(rest.len());
    let (table, payload) = rest.split_at(table_len);
    let mut entries = Vec::new();
    let Ok(zstd_len) = wire::decode_table(&h, table, &mut entries) else { return false };
    let guest = SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, APPLY_PAGES * 4096)] }, 1)
        .expect("a small guest");
    let rx = Receiver::new(&guest);
    let mut st = ApplyState::default();
    let applied = rx.apply_frame_in_place(epoch, &entries, zstd_len as usize, 0, &mut st, |iov| {
        let mut off = 0;
        for b in iov.iter_mut() {
            let n = b.len();
            let src = payload.get(off..off + n).ok_or(std::io::ErrorKind::UnexpectedEof)?;
            b.copy_from_slice(src);
            off += n;
        }
        Ok(())
    });
    if applied.is_ok() {
        let mut page = vec![0u8; 4096];
        for p in 0..guest.total_pages() {
            read_page(&guest, p, &mut page).expect("a page of the guest");
            assert_eq!(rx.hashes().get(p), Some(page_hash(&page)), "page {p}: the table does not describe memory");
        }
    }
    applied.is_ok()
}

/// A small deterministic generator for [`mutate`] (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: usize) -> usize {
        crate::engine::num::usize_from(self.bits() % n as u64)
    }
}

/// Values that sit on the edges of what a decoder bounds: lengths, counts, page indices.
const INTERESTING: [u64; 14] =
    [0, 1, 2, 7, 8, 12, 16, 255, 4096, 65535, 1 << 20, wire::MAX_BODY as u64, u32::MAX as u64, u64::MAX];

/// Derives a new input from `base` (and another corpus entry, `other`, for splices) with one to four mutations: bit
/// flips, interesting bytes and integers (at random offsets and at the header's length fields), insertions,
/// deletions, truncation, duplication and splicing.
pub fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(10) {
            0 | 1 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            2 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            3 | 4 if d.len() >= 4 => {
                // An integer of 2, 4 or 8 bytes, often at one of the header's fields (length, checked length).
                let v = INTERESTING[rng.below(INTERESTING.len())].wrapping_add(rng.below(3) as u64).wrapping_sub(1);
                let w = [2usize, 4, 8][rng.below(3)].min(d.len());
                let at = match rng.below(3) {
                    0 if d.len() >= 24 => [16usize, 20][rng.below(2)],
                    _ => rng.below(d.len() - w + 1),
                };
                let at = at.min(d.len() - w);
                d[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            5 => {
                let i = rng.below(d.len() + 1);
                let n = 1 + rng.below(16);
                let fill = rng.bits().to_le_bytes()[0];
                d.splice(i..i, std::iter::repeat_n(fill, n));
            }
            6 if !d.is_empty() => {
                let i = rng.below(d.len());
                let n = (1 + rng.below(16)).min(d.len() - i);
                d.drain(i..i + n);
            }
            7 if !d.is_empty() => d.truncate(rng.below(d.len())),
            8 if !d.is_empty() && d.len() < 1 << 20 => {
                let i = rng.below(d.len());
                let n = (1 + rng.below(64)).min(d.len() - i);
                let chunk = d[i..i + n].to_vec();
                let at = rng.below(d.len() + 1);
                d.splice(at..at, chunk);
            }
            _ if !other.is_empty() => {
                let cut = rng.below(d.len() + 1);
                let from = rng.below(other.len());
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    d
}
