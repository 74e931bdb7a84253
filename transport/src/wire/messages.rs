//! The messages of the handshake and the control connection, each a struct with `encode` and `decode`: Hello,
//! HelloAck, LinkHello, Ack, Verify and Verified, a device's state section, and the Abort's reason. Every decoder reads through [`Body`], which
//! bounds each field by what is left of the body before it is used.

use super::{write_frame, Body, Kind, WireError, MAX_BODY, MAX_REASON, MAX_VCPUS};
use livemig_engine::cpu::CpuDescription;
use livemig_engine::dirty::Bitmap;
use livemig_engine::guest::{DeviceSection, MemoryLayout};
use livemig_engine::num::u32_len;
use livemig_engine::preflight::DestDescription;
use std::io::Write;

/// The source's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Identifies the migration; every later connection of it presents the same id.
    pub session: u64,
    /// The guest's memory layout.
    pub layout: MemoryLayout,
    /// vCPUs of the guest.
    pub vcpus: u32,
    /// The guest adapter kind ("synthetic", "kvm"), so the destination builds a matching guest.
    pub guest_kind: String,
    /// One bit per [`CHUNK_PAGES`] pages: set where round 0 will send data, so the destination can fault those
    /// chunks in ahead of the pages.
    pub chunks: Bitmap,
    /// The VM's CPU model (vendor and the features it may use), checked by the destination before any page moves.
    pub cpu: Option<CpuDescription>,
    /// The VM's NIC MACs, which the destination announces after it resumes the guest.
    pub macs: Vec<[u8; 6]>,
}

/// Pages per chunk of [`Hello::chunks`]: 2 MiB, a transparent huge page.
pub const CHUNK_PAGES: u64 = 512;

/// The chunk map of a page bitmap: a chunk is set when any of its pages is.
pub fn chunk_map(pages: &Bitmap) -> Bitmap {
    let mut chunks = Bitmap::new(pages.len().div_ceil(CHUNK_PAGES));
    pages.for_each_run(|run| {
        for c in run.first / CHUNK_PAGES..=(run.first + run.count - 1) / CHUNK_PAGES {
            chunks.set(c);
        }
    });
    chunks
}

/// The most regions a Hello may describe.
pub const MAX_REGIONS: u32 = 1024;

impl Hello {
    /// Serializes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.session.to_le_bytes());
        b.extend_from_slice(&livemig_engine::guest::PAGE_LEN.to_le_bytes());
        b.extend_from_slice(&self.vcpus.to_le_bytes());
        b.push(u8::try_from(self.guest_kind.len()).expect("guest kind name over 255 bytes"));
        b.extend_from_slice(self.guest_kind.as_bytes());
        b.extend_from_slice(&u32_len(self.layout.regions.len()).to_le_bytes());
        for &(gpa, len) in &self.layout.regions {
            b.extend_from_slice(&gpa.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        b.extend_from_slice(&u32_len(self.chunks.words().len()).to_le_bytes());
        for w in self.chunks.words() {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.push(u8::try_from(self.macs.len()).expect("at most 255 NICs"));
        for m in &self.macs {
            b.extend_from_slice(m);
        }
        encode_cpu(&mut b, self.cpu.as_ref());
        b
    }

    /// Parses and checks a body: the page size must be ours, and regions whole pages.
    pub fn decode(body: &[u8]) -> Result<Hello, WireError> {
        let mut r = Body { kind: Kind::Hello, b: body };
        let bad = |why: String| WireError::Malformed { kind: Kind::Hello, why };
        let session = r.u64("session")?;
        let page_size = r.u32("page size")?;
        if page_size as usize != livemig_engine::guest::PAGE_SIZE {
            return Err(bad(format!("page size {page_size}, this build moves 4096-byte pages")));
        }
        let vcpus = r.u32("vCPU count")?;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(bad(format!("{vcpus} vCPUs (1..={MAX_VCPUS} allowed)")));
        }
        let n = r.u8("guest kind length")?;
        let guest_kind = String::from_utf8(r.take(n.into(), "guest kind")?.to_vec())
            .map_err(|_| bad("guest kind is not UTF-8".into()))?;
        let count = r.u32("region count")?;
        if count == 0 || count > MAX_REGIONS {
            return Err(bad(format!("{count} memory regions (1..={MAX_REGIONS} allowed)")));
        }
        let mut regions = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (gpa, len) = (r.u64("region address")?, r.u64("region length")?);
            if len == 0 || len % page_size as u64 != 0 || gpa % page_size as u64 != 0 {
                return Err(bad(format!("region {gpa:#x}+{len:#x} is not whole pages")));
            }
            regions.push((gpa, len));
        }
        let layout = MemoryLayout { regions };
        let chunk_bits = layout.total_pages().div_ceil(CHUNK_PAGES);
        let words = r.u32("chunk map length")? as usize;
        if words as u64 != chunk_bits.div_ceil(64) {
            return Err(bad(format!("chunk map of {words} words for {chunk_bits} chunks")));
        }
        // take() bounds the map by the body before anything is allocated for it.
        let raw = r.take(words * 8, "chunk map")?;
        let chunks = Bitmap::from_words(
            raw.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))).collect(),
            chunk_bits,
        );
        let nics = r.u8("NIC count")?;
        let mut macs = Vec::with_capacity(nics.into());
        for _ in 0..nics {
            macs.push(<[u8; 6]>::try_from(r.take(6, "MAC")?).expect("6 bytes"));
        }
        let cpu = decode_cpu(&mut r)?;
        r.end()?;
        Ok(Hello { session, chunks, layout, vcpus, guest_kind, cpu, macs })
    }
}

/// Appends a CPU model (or its absence): a flag byte, then the name, vendor, family, model, stepping and features.
/// Strings are cut to 255 bytes, the feature list to 65535 names.
fn encode_cpu(b: &mut Vec<u8>, cpu: Option<&CpuDescription>) {
    let short = |b: &mut Vec<u8>, s: &str| {
        let s = &s.as_bytes()[..s.len().min(255)];
        b.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
        b.extend_from_slice(s);
    };
    match cpu {
        None => b.push(0),
        Some(c) => {
            b.push(1);
            short(b, &c.name);
            short(b, &c.vendor);
            for v in [c.family, c.model, c.stepping] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&u16::try_from(c.features.len()).unwrap_or(u16::MAX).to_le_bytes());
            for f in c.features.iter().take(u16::MAX as usize) {
                short(b, f);
            }
        }
    }
}

/// Reads what [`encode_cpu`] wrote; every string must be UTF-8.
fn decode_cpu(r: &mut Body<'_>) -> Result<Option<CpuDescription>, WireError> {
    let kind = r.kind;
    let bad = |why: String| WireError::Malformed { kind, why };
    match r.u8("CPU model flag")? {
        0 => Ok(None),
        1 => {
            let mut short = |what: &str| -> Result<String, WireError> {
                let n = r.u8(what)?;
                String::from_utf8(r.take(n.into(), what)?.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
            };
            let name = short("CPU model name")?;
            let vendor = short("CPU vendor")?;
            let (family, model, stepping) = (r.u32("CPU family")?, r.u32("CPU model")?, r.u32("CPU stepping")?);
            let count = u16::from_le_bytes(r.take(2, "feature count")?.try_into().expect("2 bytes"));
            let mut features = std::collections::BTreeSet::new();
            for _ in 0..count {
                let n = r.u8("feature name length")?;
                let f = r.take(n.into(), "feature name")?;
                features.insert(String::from_utf8(f.to_vec()).map_err(|_| bad("a feature name is not UTF-8".into()))?);
            }
            Ok(Some(CpuDescription { name, vendor, family, model, stepping, features }))
        }
        v => Err(bad(format!("CPU model flag {v}"))),
    }
}

/// The Verify body: how thorough, and the source's roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verify {
    /// Whether both sides also re-hash all of memory.
    pub full: bool,
    /// Root over the source's table of sent pages.
    pub table_root: u64,
    /// Root over the source's memory as it is (only with `full`).
    pub memory_root: u64,
}

/// The Verified body: the destination's verdict and its roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// True when every compared root matched.
    pub equal: bool,
    /// Root over the destination's table of applied pages.
    pub table_root: u64,
    /// Root over the destination's memory (only with a full verify).
    pub memory_root: u64,
}

fn encode_roots(flag: bool, a: u64, b: u64) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = u8::from(flag);
    out[1..9].copy_from_slice(&a.to_le_bytes());
    out[9..17].copy_from_slice(&b.to_le_bytes());
    out
}

fn decode_roots(kind: Kind, body: &[u8]) -> Result<(bool, u64, u64), WireError> {
    let mut r = Body { kind, b: body };
    let flag = match r.u8("flag")? {
        0 => false,
        1 => true,
        v => return Err(WireError::Malformed { kind, why: format!("flag byte {v}") }),
    };
    let (a, b) = (r.u64("root")?, r.u64("root")?);
    r.end()?;
    Ok((flag, a, b))
}

impl Verify {
    /// Serializes the body.
    pub fn encode(&self) -> [u8; 17] {
        encode_roots(self.full, self.table_root, self.memory_root)
    }
    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<Verify, WireError> {
        let (full, table_root, memory_root) = decode_roots(Kind::Verify, body)?;
        Ok(Verify { full, table_root, memory_root })
    }
}

impl Verified {
    /// Serializes the body.
    pub fn encode(&self) -> [u8; 17] {
        encode_roots(self.equal, self.table_root, self.memory_root)
    }
    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<Verified, WireError> {
        let (equal, table_root, memory_root) = decode_roots(Kind::Verified, body)?;
        Ok(Verified { equal, table_root, memory_root })
    }
}

/// The Ack body: a Pages frame was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Wire bytes of the acknowledged frame.
    pub bytes: u64,
    /// Pages it carried.
    pub pages: u32,
}

impl Ack {
    /// Serializes the body.
    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&self.bytes.to_le_bytes());
        out[8..].copy_from_slice(&self.pages.to_le_bytes());
        out
    }

    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<Ack, WireError> {
        let mut r = Body { kind: Kind::Ack, b: body };
        let ack = Ack { bytes: r.u64("byte count")?, pages: r.u32("page count")? };
        r.end()?;
        Ok(ack)
    }
}

/// The HelloAck body: the session echoed, and the destination's description of itself (JSON) for the source's
/// preflight.
#[derive(Debug, Clone, PartialEq)]
pub struct HelloAck {
    /// The Hello's session.
    pub session: u64,
    /// What the destination says about itself.
    pub dest: DestDescription,
}

impl HelloAck {
    /// Serializes the body.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.dest).expect("a description serializes");
        let mut b = Vec::with_capacity(12 + json.len());
        b.extend_from_slice(&self.session.to_le_bytes());
        b.extend_from_slice(&u32_len(json.len()).to_le_bytes());
        b.extend_from_slice(&json);
        b
    }

    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<HelloAck, WireError> {
        let mut r = Body { kind: Kind::HelloAck, b: body };
        let session = r.u64("session")?;
        let n = r.u32("description length")? as usize;
        let json = r.take(n, "description")?;
        r.end()?;
        let dest = serde_json::from_slice(json)
            .map_err(|e| WireError::Malformed { kind: Kind::HelloAck, why: format!("destination description: {e}") })?;
        Ok(HelloAck { session, dest })
    }
}

/// The LinkHello body, first on every data link: the session it belongs to and the link's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkHello {
    /// The migration's session.
    pub session: u64,
    /// The link's index at the source (its `--link` order).
    pub link: u32,
    /// Under TLS, the proof that this link belongs to the control connection's session ([`crate::tls::link_proof`]).
    pub proof: Option<[u8; 32]>,
}

impl LinkHello {
    /// Serializes the body: 12 bytes, or 44 with a proof.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44);
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&self.link.to_le_bytes());
        if let Some(p) = &self.proof {
            out.extend_from_slice(p);
        }
        out
    }

    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<LinkHello, WireError> {
        Self::decode_as(Kind::LinkHello, body)
    }

    /// Parses the body of a frame that carries a LinkHello's fields: a LinkHello, or a [`Kind::Resume`] (whose link
    /// index is 0 and unused).
    pub fn decode_as(kind: Kind, body: &[u8]) -> Result<LinkHello, WireError> {
        let mut r = Body { kind, b: body };
        let (session, link) = (r.u64("session")?, r.u32("link index")?);
        let proof = if body.len() > 12 {
            let mut p = [0u8; 32];
            p.copy_from_slice(r.take(32, "link proof")?);
            Some(p)
        } else {
            None
        };
        r.end()?;
        Ok(LinkHello { session, link, proof })
    }
}

/// An Abort body's reason, made printable whatever bytes arrived.
pub fn decode_reason(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(MAX_REASON)]).into_owned()
}

/// Writes an Abort frame with `reason` (cut to [`MAX_REASON`] bytes) on `w`. Best effort, for the caller to ignore
/// or report: the peer may be gone already.
pub fn write_abort(w: impl Write, reason: &str) -> std::io::Result<usize> {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    write_control(w, Kind::Abort, &reason.as_bytes()[..end])
}

/// Writes a control frame (no round, no sequence number) whose whole body is `body`; returns the bytes written.
pub fn write_control(mut w: impl Write, kind: Kind, body: &[u8]) -> std::io::Result<usize> {
    write_frame(&mut w, kind, 0, 0, &[body])
}

/// The longest device name a section may carry.
pub const MAX_DEVICE_NAME: usize = 128;
/// The most device sections a migration may carry.
pub const MAX_DEVICE_SECTIONS: usize = 256;
/// The most device-state bytes a migration may carry, all sections together.
pub const MAX_DEVICE_BYTES: u64 = 64 << 20;

/// A DeviceState body: the name's length (u16) and the name (UTF-8), the version (u32), then the state.
pub fn encode_device(s: &DeviceSection) -> Vec<u8> {
    assert!(s.name.len() <= MAX_DEVICE_NAME, "device name {:?} over {MAX_DEVICE_NAME} bytes", s.name);
    let mut out = Vec::with_capacity(6 + s.name.len() + s.data.len());
    out.extend_from_slice(&u16::try_from(s.name.len()).expect("checked above").to_le_bytes());
    out.extend_from_slice(s.name.as_bytes());
    out.extend_from_slice(&s.version.to_le_bytes());
    out.extend_from_slice(&s.data);
    out
}

/// Parses a DeviceState body.
pub fn decode_device(body: &[u8]) -> Result<DeviceSection, WireError> {
    let mut r = Body { kind: Kind::DeviceState, b: body };
    let bad = |why: String| WireError::Malformed { kind: Kind::DeviceState, why };
    let len = usize::from(r.u16("the name's length")?);
    if len == 0 || len > MAX_DEVICE_NAME {
        return Err(bad(format!("a device name of {len} bytes (1 to {MAX_DEVICE_NAME})")));
    }
    let name = std::str::from_utf8(r.take(len, "the name")?).map_err(|_| bad("a device name not in UTF-8".into()))?;
    let version = r.u32("the version")?;
    let data = r.take(r.b.len(), "the state")?.to_vec();
    Ok(DeviceSection { name: name.to_string(), version, data })
}

/// Whether the wire can carry these sections (the source checks before it sends): names of 1 to
/// [`MAX_DEVICE_NAME`] bytes, each once, each section within a frame, and the number and total size within the
/// destination's bounds.
pub fn check_devices(sections: &[DeviceSection]) -> Result<(), String> {
    if sections.len() > MAX_DEVICE_SECTIONS {
        return Err(format!("{} device sections, over {}", sections.len(), MAX_DEVICE_SECTIONS));
    }
    let total: u64 = sections.iter().map(|s| s.data.len() as u64).sum();
    if total > MAX_DEVICE_BYTES {
        return Err(format!("device state of {total} bytes, over {}", MAX_DEVICE_BYTES));
    }
    for (i, s) in sections.iter().enumerate() {
        if s.name.is_empty() || s.name.len() > MAX_DEVICE_NAME {
            return Err(format!("device name {:?}: 1 to {} bytes", s.name, MAX_DEVICE_NAME));
        }
        if sections[..i].iter().any(|x| x.name == s.name) {
            return Err(format!("device {:?} saved twice", s.name));
        }
        if s.data.len() + 6 + s.name.len() > MAX_BODY as usize {
            return Err(format!("device {:?}: {} bytes of state, over one frame's {}", s.name, s.data.len(), MAX_BODY));
        }
    }
    Ok(())
}
