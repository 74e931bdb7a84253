//! Post-copy's control frames: the missing-page bitmap sent at the switch, the destination's page requests, its
//! figures at the end, and its answer to a Resume (the pages it still lacks). Each body is bounded by what it can hold, and checked against the guest's layout.

use super::{Body, Kind, WireError};
use livemig_engine::dirty::Bitmap;
use livemig_engine::num::usize_from;
use livemig_engine::receive::postcopy::{PostcopyStats, LATENCY_BUCKETS};

/// Bitmap words one Missing frame carries at most (4 Mi pages, 16 GiB of guest).
pub const MISSING_WORDS: usize = 1 << 16;
/// A Missing body: the first word's index, then the words.
pub const MISSING_MAX_BODY: u32 = 8 + 8 * (1 << 16);
/// Pages one PageRequest asks for at most.
pub const REQUEST_PAGES: usize = 256;
/// A PageRequest body: the pages, 8 bytes each.
pub const REQUEST_MAX_BODY: u32 = 8 * 256;
/// A PostcopyStats body: five counts, three latencies, the histogram.
pub const STATS_LEN: u32 = 8 * (5 + 3 + 26);
const _: () = assert!(
    MISSING_MAX_BODY as usize == 8 + 8 * MISSING_WORDS
        && REQUEST_MAX_BODY as usize == 8 * REQUEST_PAGES
        && STATS_LEN as usize == 8 * (5 + 3 + LATENCY_BUCKETS)
);

/// The Missing frames' bodies for `pages`: only pieces with a page in them are sent.
pub fn encode_missing(pages: &Bitmap) -> Vec<Vec<u8>> {
    let words = pages.words();
    let mut out = Vec::new();
    for (i, chunk) in words.chunks(MISSING_WORDS).enumerate() {
        if chunk.iter().all(|&w| w == 0) {
            continue;
        }
        let mut b = Vec::with_capacity(8 + 8 * chunk.len());
        b.extend_from_slice(&((i * MISSING_WORDS) as u64).to_le_bytes());
        chunk.iter().for_each(|w| b.extend_from_slice(&w.to_le_bytes()));
        out.push(b);
    }
    out
}

/// Parses a Missing body for a guest of `pages` pages: the first page its words cover, and the words (bit `i` of
/// word `k` is page `first + 64k + i`). Every set bit must name a page of the guest.
pub fn decode_missing(body: &[u8], pages: u64) -> Result<(u64, Vec<u64>), WireError> {
    let bad = |why: String| WireError::Malformed { kind: Kind::Missing, why };
    let mut r = Body { kind: Kind::Missing, b: body };
    let first = r.u64("first word")?.checked_mul(64).ok_or_else(|| bad("first word out of range".into()))?;
    if r.b.is_empty() || !r.b.len().is_multiple_of(8) {
        return Err(bad(format!("{} bytes of words", r.b.len())));
    }
    let mut words = Vec::with_capacity(r.b.len() / 8);
    while !r.b.is_empty() {
        let w = r.u64("word")?;
        let base = first.saturating_add(words.len() as u64 * 64);
        // The bits a guest of `pages` pages has in this word; any other set bit names a page past its end.
        let valid = match pages.saturating_sub(base) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        };
        if w & !valid != 0 {
            let page = base + u64::from((w & !valid).trailing_zeros());
            return Err(bad(format!("page {page} past the guest's {pages}")));
        }
        words.push(w);
    }
    Ok((first, words))
}

/// A PageRequest body.
pub fn encode_request(pages: &[u64]) -> Vec<u8> {
    pages.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Parses a PageRequest body; every page must lie inside a guest of `total` pages.
pub fn decode_request(body: &[u8], total: u64) -> Result<Vec<u64>, WireError> {
    let bad = |why: String| WireError::Malformed { kind: Kind::PageRequest, why };
    if body.is_empty() || !body.len().is_multiple_of(8) || body.len() > usize_from(u64::from(REQUEST_MAX_BODY)) {
        return Err(bad(format!("{} bytes", body.len())));
    }
    let mut r = Body { kind: Kind::PageRequest, b: body };
    let mut out = Vec::with_capacity(body.len() / 8);
    while !r.b.is_empty() {
        let p = r.u64("page")?;
        if p >= total {
            return Err(bad(format!("page {p} past the guest's {total}")));
        }
        out.push(p);
    }
    Ok(out)
}

/// A PostcopyStats body.
pub fn encode_stats(s: &PostcopyStats) -> Vec<u8> {
    let mut b = Vec::with_capacity(usize_from(u64::from(STATS_LEN)));
    for v in [s.faults, s.zero_faults, s.placed, s.already_present, s.guest_pages_written] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    s.latency_us.iter().for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
    (0..LATENCY_BUCKETS).for_each(|i| b.extend_from_slice(&s.histogram.get(i).copied().unwrap_or(0).to_le_bytes()));
    b
}

/// Parses a PostcopyStats body.
pub fn decode_stats(body: &[u8]) -> Result<PostcopyStats, WireError> {
    let mut r = Body { kind: Kind::PostcopyStats, b: body };
    let mut s = PostcopyStats {
        faults: r.u64("faults")?,
        zero_faults: r.u64("zero faults")?,
        placed: r.u64("placed")?,
        already_present: r.u64("already present")?,
        guest_pages_written: r.u64("guest pages written")?,
        ..Default::default()
    };
    for v in &mut s.latency_us {
        *v = f64::from_bits(r.u64("latency")?);
        if !v.is_finite() || *v < 0.0 {
            return Err(WireError::Malformed { kind: Kind::PostcopyStats, why: format!("latency {v}") });
        }
    }
    s.histogram = (0..LATENCY_BUCKETS).map(|_| r.u64("histogram")).collect::<Result<_, _>>()?;
    r.end()?;
    Ok(s)
}

/// A Resumed body: the pages the destination still lacks when it takes the new control connection.
pub fn encode_resumed(missing: u64) -> [u8; 8] {
    missing.to_le_bytes()
}

/// Parses a Resumed body; the count cannot exceed the guest's `pages`.
pub fn decode_resumed(body: &[u8], pages: u64) -> Result<u64, WireError> {
    let mut r = Body { kind: Kind::Resumed, b: body };
    let missing = r.u64("missing pages")?;
    r.end()?;
    if missing > pages {
        return Err(WireError::Malformed {
            kind: Kind::Resumed,
            why: format!("{missing} pages missing of a {pages}-page guest"),
        });
    }
    Ok(missing)
}
