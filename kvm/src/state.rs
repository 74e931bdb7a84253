//! The vCPU state blob: every piece of a KVM vCPU's state, saved and restored in an order whose reasons are written
//! down, and carried across the wire as a versioned list of tagged sections.
//!
//! Save order:
//! 1. `mp_state` first: `KVM_GET_MP_STATE` makes KVM process pending INIT/SIPI events into the LAPIC, so the state
//!    read after it is the settled one.
//! 2. `regs`, `sregs`, `xsave`, `xcrs`, `debugregs`: plain register files.
//! 3. `lapic`, then the MSRs: the TSC-deadline MSR reads as 0 unless the LAPIC timer is in deadline mode.
//! 4. `vcpu_events` last: pending exceptions, NMIs and the interrupt shadow, as they stand after everything else.
//!
//! Restore order (after CPUID, which the VM set when it created the vCPU: KVM sizes xsave and checks MSRs against it):
//! 1. `mp_state`, so the vCPU is runnable (or halted) before its registers are loaded.
//! 2. `regs`, then `sregs`: sregs carry CR0/CR4/EFER and the APIC base, which decide how what follows is checked.
//! 3. `xsave`, then `xcrs` (as Firecracker does): XCR0 must be set after CR4.OSXSAVE is on (in sregs).
//! 4. `debugregs`.
//! 5. `lapic` after sregs: a LAPIC state loaded while the APIC base MSR says "disabled" is dropped.
//! 6. MSRs after the LAPIC: KVM accepts `IA32_TSC_DEADLINE` only with the timer in deadline mode.
//! 7. `vcpu_events` last: setting registers can clear the interrupt shadow and pending events.
//!
//! Each KVM structure is a plain C struct of integers (no pointers), copied as its bytes.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;

const MAGIC: &[u8; 4] = b"LMKV";
const VERSION: u32 = 1;

/// The MSRs saved, where KVM supports them: TSC, SYSENTER, PAT, the syscall MSRs, TSC_AUX, MISC_ENABLE, TSC_DEADLINE.
pub const MSRS: [u32; 13] = [
    0x10,
    0x174,
    0x175,
    0x176,
    0x277,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0xc000_0103,
    0x1a0,
    0x6e0,
];

#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    MpState = 1,
    Regs = 2,
    Sregs = 3,
    Xsave = 4,
    Xcrs = 5,
    DebugRegs = 6,
    Lapic = 7,
    Msrs = 8,
    Events = 9,
    /// Not vCPU state: the host-side pacing of the test guest (pages per second), so the destination keeps it.
    Pacing = 10,
}

/// What went wrong with a state blob or a state ioctl.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The blob is not one this build wrote.
    #[error("vCPU state blob: {0}")]
    Blob(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// The bytes of a plain C struct.
fn bytes_of<T>(v: &T) -> &[u8] {
    // SAFETY: T is one of the kvm-bindings structs above: `repr(C)`, integers and arrays of integers only (kvm_xsave's
    // trailing flexible array is zero-sized here), so every byte is initialized plain data, padding included as
    // bindgen makes it explicit, and none is a pointer.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// A plain C struct from exactly its size in bytes.
fn from_bytes<T>(b: &[u8], what: &str) -> Result<T, StateError> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(StateError::Blob(format!("{what}: {} bytes, expected {}", b.len(), std::mem::size_of::<T>())));
    }
    // SAFETY: the length matches; T is integers only (see bytes_of), so any bit pattern is a valid T, and
    // read_unaligned copes with the slice's alignment.
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

fn section(out: &mut Vec<u8>, tag: Tag, body: &[u8]) {
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(&livemig_engine::num::u32_len(body.len()).to_le_bytes());
    out.extend_from_slice(body);
}

/// Saves a (stopped) vCPU's state, in the order above, with the guest's pacing.
pub fn save(vcpu: &VcpuFd, msrs: &[u32], pacing: u64) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::with_capacity(8 << 10);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    section(&mut out, Tag::MpState, bytes_of(&vcpu.get_mp_state().map_err(kvm("mp_state"))?));
    section(&mut out, Tag::Regs, bytes_of(&vcpu.get_regs().map_err(kvm("regs"))?));
    section(&mut out, Tag::Sregs, bytes_of(&vcpu.get_sregs().map_err(kvm("sregs"))?));
    section(&mut out, Tag::Xsave, bytes_of(&vcpu.get_xsave().map_err(kvm("xsave"))?));
    section(&mut out, Tag::Xcrs, bytes_of(&vcpu.get_xcrs().map_err(kvm("xcrs"))?));
    section(&mut out, Tag::DebugRegs, bytes_of(&vcpu.get_debug_regs().map_err(kvm("debugregs"))?));
    section(&mut out, Tag::Lapic, bytes_of(&vcpu.get_lapic().map_err(kvm("lapic"))?));
    let entries: Vec<kvm_msr_entry> = msrs.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut list = Msrs::from_entries(&entries).map_err(|e| StateError::Blob(format!("MSR list: {e:?}")))?;
    let n = vcpu.get_msrs(&mut list).map_err(kvm("msrs"))?;
    if n != entries.len() {
        return Err(StateError::Blob(format!("read {n} of {} MSRs", entries.len())));
    }
    let mut m = Vec::with_capacity(n * 12);
    for e in list.as_slice() {
        m.extend_from_slice(&e.index.to_le_bytes());
        m.extend_from_slice(&e.data.to_le_bytes());
    }
    section(&mut out, Tag::Msrs, &m);
    section(&mut out, Tag::Events, bytes_of(&vcpu.get_vcpu_events().map_err(kvm("vcpu_events"))?));
    section(&mut out, Tag::Pacing, &pacing.to_le_bytes());
    Ok(out)
}

/// The sections of a blob, checked: magic, version, each tag once, lengths within the blob.
fn sections(blob: &[u8]) -> Result<Vec<(Tag, &[u8])>, StateError> {
    if blob.get(..4) != Some(MAGIC) {
        return Err(StateError::Blob("not a KVM vCPU state (bad magic)".into()));
    }
    let version = blob.get(4..8).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    if version != Some(VERSION) {
        return Err(StateError::Blob(format!("unsupported version {version:?}, this build reads {VERSION}")));
    }
    let mut rest = &blob[8..];
    let mut out: Vec<(Tag, &[u8])> = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 6 {
            return Err(StateError::Blob("truncated section header".into()));
        }
        let tag = u16::from_le_bytes([rest[0], rest[1]]);
        let len = u32::from_le_bytes(rest[2..6].try_into().expect("4 bytes")) as usize;
        let body = rest.get(6..6 + len).ok_or_else(|| StateError::Blob(format!("section {tag} overruns the blob")))?;
        let tag = match tag {
            1 => Tag::MpState,
            2 => Tag::Regs,
            3 => Tag::Sregs,
            4 => Tag::Xsave,
            5 => Tag::Xcrs,
            6 => Tag::DebugRegs,
            7 => Tag::Lapic,
            8 => Tag::Msrs,
            9 => Tag::Events,
            10 => Tag::Pacing,
            t => return Err(StateError::Blob(format!("unknown section {t}"))),
        };
        if out.iter().any(|(t, _)| *t == tag) {
            return Err(StateError::Blob(format!("section {tag:?} twice")));
        }
        out.push((tag, body));
        rest = &rest[6 + len..];
    }
    Ok(out)
}

/// A state blob parsed and checked, ready to load into a vCPU.
#[derive(Debug)]
pub struct Parsed {
    mp: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    dregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    msrs: Msrs,
    msr_count: usize,
    /// The guest's pacing, carried beside its registers.
    pub pacing: u64,
}

/// Parses and checks a blob from the wire without touching any vCPU: every section present once, each of its
/// structure's exact size, the MSR list whole. A bad blob is an error here and changes nothing.
pub fn parse(blob: &[u8]) -> Result<Parsed, StateError> {
    let s = sections(blob)?;
    let get = |t: Tag| {
        s.iter()
            .find(|(tag, _)| *tag == t)
            .map(|(_, b)| *b)
            .ok_or_else(|| StateError::Blob(format!("no {t:?} section")))
    };
    let m = get(Tag::Msrs)?;
    if m.len() % 12 != 0 {
        return Err(StateError::Blob(format!("MSR section of {} bytes", m.len())));
    }
    let entries: Vec<kvm_msr_entry> = m
        .chunks_exact(12)
        .map(|c| kvm_msr_entry {
            index: u32::from_le_bytes(c[..4].try_into().expect("4 bytes")),
            data: u64::from_le_bytes(c[4..].try_into().expect("8 bytes")),
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Blob(format!("MSR list: {e:?}")))?;
    Ok(Parsed {
        mp: from_bytes(get(Tag::MpState)?, "mp_state")?,
        regs: from_bytes(get(Tag::Regs)?, "regs")?,
        sregs: from_bytes(get(Tag::Sregs)?, "sregs")?,
        xsave: from_bytes(get(Tag::Xsave)?, "xsave")?,
        xcrs: from_bytes(get(Tag::Xcrs)?, "xcrs")?,
        dregs: from_bytes(get(Tag::DebugRegs)?, "debugregs")?,
        lapic: from_bytes(get(Tag::Lapic)?, "lapic")?,
        events: from_bytes(get(Tag::Events)?, "vcpu_events")?,
        msrs,
        msr_count: entries.len(),
        pacing: get(Tag::Pacing).ok().and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0),
    })
}

/// Restores a vCPU (created with CPUID set, not running) from a blob, in the order above. Returns the pacing.
pub fn restore(vcpu: &VcpuFd, blob: &[u8]) -> Result<u64, StateError> {
    // Parse everything before touching the vCPU: a bad blob changes nothing.
    apply(vcpu, &parse(blob)?)
}

/// Loads a parsed blob into a vCPU (created with CPUID set, not running), in the order above. Returns the pacing.
pub fn apply(vcpu: &VcpuFd, p: &Parsed) -> Result<u64, StateError> {
    vcpu.set_mp_state(p.mp).map_err(kvm("set mp_state"))?;
    vcpu.set_regs(&p.regs).map_err(kvm("set regs"))?;
    vcpu.set_sregs(&p.sregs).map_err(kvm("set sregs"))?;
    // SAFETY: a legacy 4 KiB xsave area read from a vCPU of the same kind; KVM validates its contents.
    unsafe { vcpu.set_xsave(&p.xsave) }.map_err(kvm("set xsave"))?;
    vcpu.set_xcrs(&p.xcrs).map_err(kvm("set xcrs"))?;
    vcpu.set_debug_regs(&p.dregs).map_err(kvm("set debugregs"))?;
    vcpu.set_lapic(&p.lapic).map_err(kvm("set lapic"))?;
    let n = vcpu.set_msrs(&p.msrs).map_err(kvm("set msrs"))?;
    if n != p.msr_count {
        return Err(StateError::Blob(format!("KVM took {n} of {} MSRs", p.msr_count)));
    }
    vcpu.set_vcpu_events(&p.events).map_err(kvm("set vcpu_events"))?;
    Ok(p.pacing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_blobs_are_refused_before_any_ioctl() {
        assert!(sections(b"XXXX\x01\0\0\0").unwrap_err().to_string().contains("bad magic"));
        assert!(sections(b"LMKV\x02\0\0\0").unwrap_err().to_string().contains("unsupported version"));
        let mut b = b"LMKV\x01\0\0\0".to_vec();
        section(&mut b, Tag::Regs, &[1, 2, 3]);
        b.truncate(b.len() - 1);
        assert!(sections(&b).unwrap_err().to_string().contains("overruns"));
        let mut b = b"LMKV\x01\0\0\0".to_vec();
        section(&mut b, Tag::Regs, &[1]);
        section(&mut b, Tag::Regs, &[1]);
        assert!(sections(&b).unwrap_err().to_string().contains("twice"));
        assert!(from_bytes::<kvm_regs>(&[0; 3], "regs").is_err());
    }
}
