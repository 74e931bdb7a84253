//! The wire format: frames, the handshake, and the messages of a migration.
//!
//! Every message is one frame: a fixed 32-byte header and a body. The header names the protocol (magic), its version,
//! the frame kind, the round (epoch) and a sequence number, the body length, how much of the body the checksum covers,
//! and an xxh3 over the header's first 24 bytes and that much of the body. A receiver checks magic, version, kind and
//! length before it reads the body, so a stranger or a corrupt stream is refused before any allocation it could size.
//!
//! The checksum covers every body, except the page payload of a Pages frame: there it covers the entry table, and each
//! entry carries the xxh3 of its page's decoded content, which the receiver checks before applying the page. Payload
//! bytes are thus hashed once per side instead of twice, and the check runs end to end through decompression.
//!
//! ```text
//!  source                                              destination
//!    │── Hello {session, layout, vCPUs} ─────────────────▶│  control connection; maps empty guest memory
//!    │◀──────────────────────────────── HelloAck {session}│
//!    ╞═ LinkHello {session, link k} ════════════════════▶│  one connection per data link; a wrong or
//!    │                                                    │  missing session is refused, the rest goes on
//!    ╞═ Pages {epoch r, seq, entries, payload} ═════════▶│  on any data link: apply if epoch ≥ page's epoch
//!    │◀═══════════════════════════ Ack {seq, wire bytes} ═╡  on the same link, after apply
//!    │        … rounds r = 0, 1, 2 …; pause; final round  │
//!    │── VcpuState {blob} ───────────────────────────────▶│  restore (still paused)
//!    │◀─────────────────────────────────────────── StateAck│
//!    │── Verify {mode, table root, memory root} ─────────▶│  compare with its own roots
//!    │◀──────────────────────── Verified {equal, its roots}│  phase 1: prepared
//!    │── Commit ─────────────────────────────────────────▶│  resume the guest
//!    │◀────────────────────────────────────────── Committed│  phase 2: the source stops for good
//!    │◀─────── Abort {reason} ───────▶ (either side, any time before Commit)
//! ```
//!
//! Integers are little-endian. Lengths and counts read from the wire are bounded before use (invariant 5 of docs/architecture.md).

use livemig_engine::encode::{Codec, EncodedBatch, PageEntry};
use livemig_engine::num::u32_len;
use std::hash::Hasher;
use std::io::{IoSlice, Read, Write};
use twox_hash::XxHash3_64;

/// The frame magic: "LMIG".
pub const MAGIC: [u8; 4] = *b"LMIG";
/// The protocol version this build speaks. Version 2 added zstd frames and live (in-place) pages, whose hash a
/// version 1 receiver would wrongly treat as corruption. Version 3 changed the root both sides compare (one digest
/// per 2 MiB chunk of page hashes, so that untouched memory costs nothing), which a version 2 peer would report as
/// a mismatch, and added device state; so only 3 is spoken.
pub const VERSION: u16 = 3;
/// The oldest version this build accepts from a peer.
pub const MIN_VERSION: u16 = 3;
/// Header size in bytes.
pub const HEADER_LEN: usize = 32;
/// The largest body of any frame: a Pages frame of 128 raw pages is about 514 KiB, and a Hello's chunk map for a
/// 64 TiB guest is 4 MiB. Each kind has its own, mostly far smaller, limit ([`Kind::max_body`]).
pub const MAX_BODY: u32 = 4 << 20;
/// The most vCPUs a Hello may announce (KVM's own limit on x86 is 4096).
pub const MAX_VCPUS: u32 = 4096;
/// The longest Abort reason kept; a longer one is cut.
pub const MAX_REASON: usize = 1024;
const MAX_REASON_LEN: u32 = 1024;
const _: () = assert!(MAX_REASON_LEN as usize == MAX_REASON);
/// Bytes per page entry in a Pages frame: page index (40 bits), payload length (16 bits), codec and flags (4 bits
/// each), page hash (64 bits). At 16 bytes, the entries of a 2 GiB guest's 393,216 touched pages take 6 MiB.
pub const ENTRY_LEN: usize = 16;
/// Bytes before a Pages frame's entries: the entry count and the zstd frame's length, 4 bytes each.
pub const TABLE_HEADER_LEN: usize = 8;
/// Page indices are 40 bits: guests up to 4 EiB.
pub const MAX_PAGE_INDEX: u64 = (1 << 40) - 1;
/// Entry flag: a raw page sent in place from guest memory, which may have changed between its hash and its send.
pub const ENTRY_LIVE: u8 = 1;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Source → destination: session and memory layout.
    Hello = 1,
    /// Destination → source: the handshake is accepted.
    HelloAck = 2,
    /// Source → destination: a batch of pages.
    Pages = 3,
    /// Destination → source: a Pages frame was applied.
    Ack = 4,
    /// Source → destination: the vCPU state blob.
    VcpuState = 5,
    /// Destination → source: the vCPU state was restored.
    StateAck = 6,
    /// Source → destination: compare digests.
    Verify = 7,
    /// Destination → source: the digest verdict.
    Verified = 8,
    /// Source → destination: resume the guest.
    Commit = 9,
    /// Destination → source: the guest runs on the destination.
    Committed = 10,
    /// Either way: the migration is off, with a reason.
    Abort = 11,
    /// Source → destination, first frame of a data link: the session it belongs to and the link's index.
    LinkHello = 12,
    /// Source → destination, before the vCPU state: one device's state section (name, version, bytes).
    DeviceState = 13,
    /// Source → destination, post-copy, after the vCPU state: a piece of the bitmap of pages still to come.
    Missing = 14,
    /// Source → destination: resume the guest now, with the missing pages registered (post-copy's switch).
    Switch = 15,
    /// Destination → source: the guest runs here; ask for pages from now on.
    Switched = 16,
    /// Destination → source: pages the guest faulted on, wanted ahead of the push.
    PageRequest = 17,
    /// Destination → source, before Verified in post-copy: what the faults cost.
    PostcopyStats = 18,
    /// Destination → source: the old copies of a Missing frame's pages are dropped.
    MissingAck = 19,
    /// Source → destination, first frame of a new control connection after post-copy lost the old one: the session,
    /// and (under TLS) the proof that binds it to the first control connection, as a LinkHello carries.
    Resume = 20,
    /// Destination → source: the new control connection replaces the old one; the pages still missing here.
    Resumed = 21,
}

impl Kind {
    /// The largest body a frame of this kind may have: each is bounded by what it can legitimately hold, so that a
    /// peer cannot make the receiver buffer megabytes for a frame that carries a few bytes.
    pub fn max_body(self) -> u32 {
        use Kind::*;
        match self {
            Hello | Pages | VcpuState | DeviceState => MAX_BODY,
            // The session and the destination's description (JSON: its name, datastores, port groups, CPU).
            HelloAck => 256 << 10,
            Abort => MAX_REASON_LEN,
            Ack => 12,
            // Session and link index, then (under TLS) the 32-byte proof that binds the link to the control session.
            LinkHello | Resume => 44,
            Resumed => 8,
            Verify | Verified => 17,
            StateAck | Commit | Committed | Switch | Switched | MissingAck => 0,
            Missing => postcopy::MISSING_MAX_BODY,
            PageRequest => postcopy::REQUEST_MAX_BODY,
            PostcopyStats => postcopy::STATS_LEN,
        }
    }

    fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Pages,
            4 => Ack,
            5 => VcpuState,
            6 => StateAck,
            7 => Verify,
            8 => Verified,
            9 => Commit,
            10 => Committed,
            11 => Abort,
            12 => LinkHello,
            13 => DeviceState,
            14 => Missing,
            15 => Switch,
            16 => Switched,
            17 => PageRequest,
            18 => PostcopyStats,
            19 => MissingAck,
            20 => Resume,
            21 => Resumed,
            _ => return None,
        })
    }
}

/// Everything that can be wrong with what arrives on a connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The first bytes are not livemig's magic: not a livemig peer, or a corrupt stream.
    #[error("bad magic {0:02x?}: not a livemig frame")]
    BadMagic([u8; 4]),
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {found} (this build speaks {MIN_VERSION}..={VERSION})")]
    UnsupportedVersion {
        /// The version received.
        found: u16,
    },
    /// The frame kind is not one this version defines.
    #[error("unknown frame type {0}")]
    UnknownKind(u16),
    /// The body is larger than a frame of its kind may be.
    #[error("{kind:?} frame body of {len} bytes exceeds the {}-byte limit for its kind", kind.max_body())]
    TooLarge {
        /// The frame kind.
        kind: Kind,
        /// The length the header claims.
        len: u32,
    },
    /// The checksum does not match the frame.
    #[error("bad checksum: frame says {expected:#018x}, content hashes to {computed:#018x}")]
    BadChecksum {
        /// The checksum carried by the header.
        expected: u64,
        /// The checksum of what arrived.
        computed: u64,
    },
    /// The connection ended inside a frame.
    #[error("truncated frame: connection ended {got} bytes into a {needed}-byte {part}")]
    Truncated {
        /// "header" or "body".
        part: &'static str,
        /// Bytes the part needs.
        needed: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A body's structure is inconsistent (counts, lengths, codes).
    #[error("malformed {kind:?} frame: {why}")]
    Malformed {
        /// The frame kind.
        kind: Kind,
        /// What is inconsistent.
        why: String,
    },
    /// A frame arrived that the protocol does not allow at this point.
    #[error("unexpected {got:?} frame while waiting for {expected}")]
    Unexpected {
        /// The frame kind that arrived.
        got: Kind,
        /// What was expected.
        expected: &'static str,
    },
    /// A data link presented another migration's session id.
    #[error("data link presented session {got:#x}, not this migration's")]
    WrongSession {
        /// The id presented.
        got: u64,
    },
    /// The peer closed the connection between frames.
    #[error("peer closed the connection")]
    Closed,
    /// The peer called the migration off.
    #[error("peer aborted: {0}")]
    PeerAbort(String),
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// True when the connection itself is gone (closed, reset, timed out, cut inside a frame): on a data link that is a
    /// link lost, whose batches go out again on the others, not bad data.
    pub fn is_link_loss(&self) -> bool {
        match self {
            // A sealed record that fails to open was altered, replayed or forged: bad data, not a lost link.
            WireError::Io(e) => e.kind() != std::io::ErrorKind::InvalidData,
            WireError::Closed | WireError::Truncated { .. } => true,
            _ => false,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The protocol version of the frame.
    pub version: u16,
    /// Frame kind.
    pub kind: Kind,
    /// Round number (Pages frames), else 0.
    pub epoch: u32,
    /// Batch sequence number (Pages and Ack frames), else 0.
    pub seq: u32,
    /// Body length.
    pub len: u32,
    /// Leading body bytes covered by the checksum: all of them, but for Pages frames only the entry table.
    pub checked_len: u32,
    /// xxh3 over header bytes 0..24 and the checked part of the body.
    pub checksum: u64,
}

impl Header {
    /// Serializes the header of a frame whose body is `checked` followed by `unchecked`, computing the checksum over
    /// `checked`.
    pub fn encode(kind: Kind, epoch: u32, seq: u32, checked: &[&[u8]], unchecked: &[&[u8]]) -> [u8; HEADER_LEN] {
        let sum_len = |parts: &[&[u8]]| parts.iter().map(|b| b.len()).sum::<usize>();
        let checked_len = u32::try_from(sum_len(checked)).expect("frame body over 4 GiB");
        let len = u32::try_from(sum_len(checked) + sum_len(unchecked)).expect("frame body over 4 GiB");
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
        h[8..12].copy_from_slice(&epoch.to_le_bytes());
        h[12..16].copy_from_slice(&seq.to_le_bytes());
        h[16..20].copy_from_slice(&len.to_le_bytes());
        h[20..24].copy_from_slice(&checked_len.to_le_bytes());
        let sum = checksum(&h[..24], checked);
        h[24..32].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Parses and checks a header: magic, version, kind and length, in that order.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        let magic: [u8; 4] = h[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16_at(4);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(WireError::UnsupportedVersion { found: version });
        }
        let kind = Kind::from_u16(u16_at(6)).ok_or(WireError::UnknownKind(u16_at(6)))?;
        let len = u32_at(16);
        if len > kind.max_body() {
            return Err(WireError::TooLarge { kind, len });
        }
        let checked_len = u32_at(20);
        // Only a Pages payload may go unchecked here, because its pages carry their own hashes.
        if checked_len > len || (kind != Kind::Pages && checked_len != len) {
            return Err(WireError::Malformed {
                kind,
                why: format!("checksum covers {checked_len} of {len} body bytes"),
            });
        }
        Ok(Header {
            version,
            kind,
            epoch: u32_at(8),
            seq: u32_at(12),
            len,
            checked_len,
            checksum: u64::from_le_bytes(h[24..32].try_into().expect("8 bytes")),
        })
    }
}

fn checksum(head: &[u8], body: &[&[u8]]) -> u64 {
    let mut x = XxHash3_64::new();
    x.write(head);
    for b in body {
        x.write(b);
    }
    x.finish()
}

/// Reads until `buf` is full; on a clean or unclean end of stream reports how much arrived.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame: the header, checked, then the body into `body` (resized to fit), checked against the checksum.
pub fn read_frame(r: &mut impl Read, body: &mut Vec<u8>) -> Result<Header, WireError> {
    let (raw, header) = read_header(r)?;
    read_body(r, body, header.len as usize)?;
    check_sum(&raw, &header, &body[..header.checked_len as usize])?;
    Ok(header)
}

/// Bytes a body buffer grows by as its bytes arrive.
const BODY_STEP: usize = 64 << 10;

/// Reads a body of `len` bytes into `body`, growing it as the bytes arrive rather than to the length the header
/// claims: a peer that announces a large frame and sends little makes the receiver hold only what it sent.
pub(crate) fn read_body(r: &mut impl Read, body: &mut Vec<u8>, len: usize) -> Result<(), WireError> {
    body.clear();
    while body.len() < len {
        let start = body.len();
        body.resize(start + BODY_STEP.min(len - start), 0);
        let got = read_full(r, &mut body[start..])?;
        if start + got < body.len() {
            return Err(WireError::Truncated { part: "body", needed: len, got: start + got });
        }
    }
    Ok(())
}

/// Reads and checks a frame header; returns its bytes (for [`check_sum`]) and the parsed header. The body is left
/// on the stream, for a receiver that reads parts of it straight to where they belong.
pub fn read_header(r: &mut impl Read) -> Result<([u8; HEADER_LEN], Header), WireError> {
    let mut h = [0u8; HEADER_LEN];
    match read_full(r, &mut h)? {
        0 => return Err(WireError::Closed),
        n if n < HEADER_LEN => return Err(WireError::Truncated { part: "header", needed: HEADER_LEN, got: n }),
        _ => {}
    }
    Ok((h, Header::decode(&h)?))
}

/// Reads exactly `buf.len()` bytes of a frame's `part`; a stream that ends first is a truncated frame.
pub fn read_part(r: &mut impl Read, buf: &mut [u8], part: &'static str) -> Result<(), WireError> {
    let got = read_full(r, buf)?;
    if got < buf.len() {
        return Err(WireError::Truncated { part, needed: buf.len(), got });
    }
    Ok(())
}

/// Checks the frame checksum over the header bytes `raw` and the body's checked part.
pub fn check_sum(raw: &[u8; HEADER_LEN], h: &Header, checked: &[u8]) -> Result<(), WireError> {
    let computed = checksum(&raw[..24], &[checked]);
    if computed != h.checksum {
        return Err(WireError::BadChecksum { expected: h.checksum, computed });
    }
    Ok(())
}

/// Writes one frame whose whole body the checksum covers.
pub fn write_frame(w: &mut impl Write, kind: Kind, epoch: u32, seq: u32, body: &[&[u8]]) -> std::io::Result<usize> {
    write_parts(w, &Header::encode(kind, epoch, seq, body, &[]), body)
}

/// Writes a Pages frame: the entry table (from [`encode_entries`]), covered by the frame checksum, and the payload
/// parts, covered by the hashes in the entries.
pub fn write_pages(
    w: &mut impl Write,
    epoch: u32,
    seq: u32,
    table: &[u8],
    payload: &[&[u8]],
) -> std::io::Result<usize> {
    let h = pages_header(epoch, seq, table, payload);
    let mut parts = Vec::with_capacity(payload.len() + 1);
    parts.push(table);
    parts.extend_from_slice(payload);
    write_parts(w, &h, &parts)
}

/// The header of a Pages frame with this entry table and payload.
pub fn pages_header(epoch: u32, seq: u32, table: &[u8], payload: &[&[u8]]) -> [u8; HEADER_LEN] {
    Header::encode(Kind::Pages, epoch, seq, &[table], payload)
}

/// Writes a header and body parts with vectored writes (no staging copy of the body).
fn write_parts(w: &mut impl Write, h: &[u8; HEADER_LEN], body: &[&[u8]]) -> std::io::Result<usize> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(body.len() + 1);
    slices.push(IoSlice::new(h));
    slices.extend(body.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(b)));
    let total = slices.iter().map(|s| s.len()).sum();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Bounded little-endian reader over a frame body.
struct Body<'a> {
    kind: Kind,
    b: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Malformed { kind: self.kind, why: format!("body ends inside {what}") });
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed { kind: self.kind, why: format!("{} trailing bytes", self.b.len()) })
        }
    }
}

/// Serializes a batch's entry table: a count and the zstd frame's length, then [`ENTRY_LEN`] bytes per page (index,
/// payload length, codec, flags, hash).
pub fn encode_entries(batch: &EncodedBatch, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&u32_len(batch.entries.len()).to_le_bytes());
    out.extend_from_slice(&batch.zstd_len.to_le_bytes());
    for e in &batch.entries {
        assert!(e.page <= MAX_PAGE_INDEX && e.len <= u32::from(u16::MAX), "entry {e:?} does not fit the wire format");
        out.extend_from_slice(&e.page.to_le_bytes()[..5]);
        out.extend_from_slice(&u16::try_from(e.len).unwrap_or(u16::MAX).to_le_bytes());
        out.push(e.codec as u8 | if e.live { ENTRY_LIVE << 4 } else { 0 });
        out.extend_from_slice(&e.hash.to_le_bytes());
    }
}

/// A parsed Pages body's payload: the entries' bytes back to back, and the zstd frame that follows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagesPayload<'a> {
    /// The entries' payloads, in entry order.
    pub entries: &'a [u8],
    /// The batch's zstd frame (empty without zstd pages).
    pub zstd: &'a [u8],
}

/// Parses a Pages body into its entries (into `entries`) and returns the payload (see [`decode_table`]).
pub fn decode_pages<'a>(
    h: &Header,
    body: &'a [u8],
    entries: &mut Vec<PageEntry>,
) -> Result<PagesPayload<'a>, WireError> {
    let split = (h.checked_len as usize).min(body.len());
    let (table, payload) = body.split_at(split);
    let header = Header { len: u32_len(body.len()), ..*h };
    let zstd_len = decode_table(&header, table, entries)? as usize;
    let (entries_part, zstd) = payload.split_at(payload.len() - zstd_len);
    Ok(PagesPayload { entries: entries_part, zstd })
}

/// Parses a Pages frame's entry table (the checksummed head of its body) into `entries`, and returns the length of
/// the zstd frame at the payload's end. Checks that the count fits the table, the checksum covered exactly the table,
/// every codec and flag is known, and the payload lengths and the zstd frame add up to exactly the rest of the body
/// (`h.len - h.checked_len`); page indices, per-codec lengths and page hashes are the receiver's to check.
pub fn decode_table(h: &Header, table: &[u8], entries: &mut Vec<PageEntry>) -> Result<u32, WireError> {
    let mut r = Body { kind: Kind::Pages, b: table };
    let bad = |why: String| WireError::Malformed { kind: Kind::Pages, why };
    let count = r.u32("page count")? as usize;
    let zstd_len = r.u32("zstd frame length")?;
    if count > (table.len() - TABLE_HEADER_LEN) / ENTRY_LEN {
        return Err(bad(format!("{count} entries do not fit a {}-byte table", table.len())));
    }
    if h.checked_len as usize != TABLE_HEADER_LEN + count * ENTRY_LEN {
        return Err(bad(format!(
            "checksum covers {} bytes, the entry table is {}",
            h.checked_len,
            TABLE_HEADER_LEN + count * ENTRY_LEN
        )));
    }
    entries.clear();
    let mut total = 0u64;
    for _ in 0..count {
        let mut p = [0u8; 8];
        p[..5].copy_from_slice(r.take(5, "entry page")?);
        let page = u64::from_le_bytes(p);
        let l = r.take(2, "entry length")?;
        let len = u32::from(u16::from_le_bytes([l[0], l[1]]));
        let cf = r.u8("entry codec")?;
        let (code, flags) = (cf & 0xf, cf >> 4);
        let codec = Codec::from_u8(code).ok_or_else(|| bad(format!("unknown page codec {code}")))?;
        if flags & !ENTRY_LIVE != 0 {
            return Err(bad(format!("unknown entry flags {flags:#04x}")));
        }
        let hash = r.u64("entry hash")?;
        total += u64::from(len);
        entries.push(PageEntry { page, codec, len, hash, live: flags & ENTRY_LIVE != 0 });
    }
    let payload = u64::from(h.len.saturating_sub(h.checked_len));
    if total + u64::from(zstd_len) != payload {
        return Err(bad(format!(
            "entries claim {total} payload bytes and a {zstd_len}-byte zstd frame, frame carries {payload}"
        )));
    }
    Ok(zstd_len)
}

mod deadline;
mod messages;
pub mod postcopy;
pub use deadline::{
    read_frame_after, read_frame_within, read_header_after, read_header_within, Deadline, DEADLINE_SLACK,
};
pub use messages::{
    check_devices, chunk_map, decode_device, decode_reason, encode_device, write_abort, write_control, Ack, Hello,
    HelloAck, LinkHello, Verified, Verify, CHUNK_PAGES, MAX_DEVICE_BYTES, MAX_DEVICE_NAME, MAX_DEVICE_SECTIONS,
    MAX_REGIONS,
};

#[cfg(test)]
mod tests;
