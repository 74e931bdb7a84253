//! livemig over a KVM VM the embedder built and runs: its `VmFd`, the memory slots it registered, its vCPU fds, and
//! its own vCPU threads (behind [`VcpuRunner`]). Nothing of livemig's test guest is involved.
//!
//! Memory: each slot's host mapping is a [`HostRegion`], pages numbered across slots in the order given. Dirty log:
//! [`KvmVm::start_dirty_log`] sets `KVM_MEM_LOG_DIRTY_PAGES` on every slot (re-registering it, as QEMU does when
//! migration starts), and a harvest is `KVM_GET_DIRTY_LOG` per slot; dropping the adapter sets each slot's flags
//! back. vCPUs: the embedder's threads pause, resume and throttle; the state of every vCPU is saved and restored
//! here through its fd ([`crate::state`]), one blob each, framed as [`MAGIC`], a count, and length-prefixed blobs.
//! Every blob is parsed before any vCPU is touched, so a bad one changes nothing.

use crate::state;
use crate::{ioctl, KvmError};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use livemig_engine::dirty::Bitmap;
use livemig_engine::guest::{Devices, DirtyLog, Guest, GuestError, GuestMemory, HostRegion, Vcpus, PAGE_SIZE};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// The framing of a multi-vCPU state: this, the vCPU count (u32), then per vCPU its blob's length (u32) and blob.
pub const MAGIC: &[u8; 4] = b"LMVS";

/// One memory slot as the embedder registered it with `KVM_SET_USER_MEMORY_REGION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The slot number.
    pub slot: u32,
    /// Guest-physical address of its first byte.
    pub guest_addr: u64,
    /// Host address of its mapping.
    pub host_addr: u64,
    /// Its length in bytes (a whole number of pages).
    pub len: u64,
    /// The flags it was registered with (`KVM_MEM_READONLY` and so on).
    pub flags: u32,
}

impl Slot {
    fn region(&self, flags: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.guest_addr,
            memory_size: self.len,
            userspace_addr: self.host_addr,
        }
    }
}

/// The embedder's vCPU threads, as the migration controls them.
pub trait VcpuRunner: Send + Sync {
    /// Stops every vCPU and returns once none is inside `KVM_RUN` (so none can write memory or change its state).
    fn pause(&self);
    /// Lets them run again.
    fn resume(&self);
    /// True while paused.
    fn is_paused(&self) -> bool;
    /// Makes the vCPUs sleep `pct` percent (0–99) of their time.
    fn set_throttle(&self, pct: f64);
    /// The throttle in force.
    fn throttle(&self) -> f64;
}

/// A VM the embedder built, adapted to livemig's [`Guest`].
pub struct KvmVm<R: VcpuRunner> {
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    regions: Vec<HostRegion>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    msrs: Vec<u32>,
    runner: R,
    kind: &'static str,
    devices: Option<Box<dyn Devices>>,
    logging: bool,
}

impl<R: VcpuRunner> std::fmt::Debug for KvmVm<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm").field("slots", &self.slots).field("vcpus", &self.vcpus.len()).finish()
    }
}

impl<R: VcpuRunner> KvmVm<R> {
    /// Adapts the VM `vm` (created from `kvm`), whose memory is `slots` and whose vCPUs are `vcpus`, run by
    /// `runner`. `kind` names the guest in the handshake, for the destination to build a matching one.
    ///
    /// # Safety
    /// Each slot's `host_addr..host_addr + len` must be a mapping registered with `vm` as described, valid for reads
    /// and writes for as long as the returned adapter lives.
    pub unsafe fn new(
        kvm: &Kvm,
        vm: Arc<VmFd>,
        slots: Vec<Slot>,
        vcpus: Vec<Arc<Mutex<VcpuFd>>>,
        runner: R,
        kind: &'static str,
    ) -> Result<Self, KvmError> {
        if vcpus.is_empty() {
            return Err(KvmError::Layout("a VM needs at least one vCPU".into()));
        }
        let mut regions = Vec::new();
        for s in &slots {
            let len = usize::try_from(s.len).map_err(|_| GuestError::BadSize(s.len))?;
            if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
                return Err(GuestError::BadSize(s.len).into());
            }
            let ptr = NonNull::new(s.host_addr as *mut u8).ok_or(GuestError::BadSize(0))?;
            // SAFETY: the caller vouches that the slot's mapping is valid for `len` bytes while this adapter lives,
            // and the length is a whole number of pages (checked above).
            regions.push(unsafe { HostRegion::new(s.guest_addr, ptr, len) });
        }
        let supported = kvm.get_msr_index_list().map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs = state::MSRS.iter().copied().filter(|m| supported.as_slice().contains(m)).collect();
        let devices = None;
        Ok(KvmVm { vm, slots, regions, vcpus, msrs, runner, kind, devices, logging: false })
    }

    /// The devices whose state migrates with the guest.
    pub fn with_devices(mut self, devices: Box<dyn Devices>) -> Self {
        self.devices = Some(devices);
        self
    }

    /// Turns dirty logging on for every slot (on the source, before the migration starts).
    pub fn start_dirty_log(&mut self) -> Result<(), KvmError> {
        for s in &self.slots {
            // SAFETY: the same slot, at the same addresses, over the mapping `new`'s caller vouched for; only the
            // flags change.
            unsafe { self.vm.set_user_memory_region(s.region(s.flags | kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION (dirty logging on)"))?;
        }
        self.logging = true;
        Ok(())
    }

    /// The embedder's vCPU runner.
    pub fn runner(&self) -> &R {
        &self.runner
    }

    fn parse_state(&self, blob: &[u8]) -> Result<Vec<state::Parsed>, GuestError> {
        let bad = |why: String| GuestError::BadState(why);
        if blob.get(..4) != Some(MAGIC) {
            return Err(bad("not a multi-vCPU KVM state (bad magic)".into()));
        }
        let mut pos = 4usize;
        // Takes `n` bytes at `pos`, or says what the blob ended inside.
        let mut take = |n: usize, what: &str| -> Result<&[u8], GuestError> {
            let body = pos.checked_add(n).and_then(|end| blob.get(pos..end));
            let body = body.ok_or_else(|| bad(format!("the state ends inside {what}")))?;
            pos += n;
            Ok(body)
        };
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
        let count = u32_of(take(4, "the vCPU count")?);
        if count != self.vcpus.len() {
            return Err(bad(format!("state for {count} vCPUs, and this VM has {}", self.vcpus.len())));
        }
        let mut parsed = Vec::with_capacity(count);
        for i in 0..count {
            let len = u32_of(take(4, &format!("vCPU {i}'s length"))?);
            let body = take(len, &format!("vCPU {i}'s state"))?;
            parsed.push(state::parse(body).map_err(|e| bad(format!("vCPU {i}: {e}")))?);
        }
        if pos != blob.len() {
            return Err(bad(format!("{} bytes after the last vCPU's state", blob.len() - pos)));
        }
        Ok(parsed)
    }
}

impl<R: VcpuRunner> Drop for KvmVm<R> {
    fn drop(&mut self) {
        if self.logging {
            for s in &self.slots {
                // SAFETY: as in start_dirty_log: the same slot and mapping, its original flags back.
                let _ = unsafe { self.vm.set_user_memory_region(s.region(s.flags)) };
            }
        }
    }
}

impl<R: VcpuRunner> GuestMemory for KvmVm<R> {
    fn regions(&self) -> &[HostRegion] {
        &self.regions
    }
}

impl<R: VcpuRunner> DirtyLog for KvmVm<R> {
    fn harvest(&self, out: &mut Bitmap) -> Result<(), GuestError> {
        let mut base = 0u64;
        for (s, r) in self.slots.iter().zip(&self.regions) {
            let words = self
                .vm
                .get_dirty_log(s.slot, r.len())
                .map_err(|e| GuestError::BadState(format!("KVM_GET_DIRTY_LOG on slot {}: {e}", s.slot)))?;
            out.or_region(&words, base, r.pages());
            base += r.pages();
        }
        Ok(())
    }
}

impl<R: VcpuRunner> Vcpus for KvmVm<R> {
    fn set_throttle(&self, pct: f64) {
        self.runner.set_throttle(pct);
    }
    fn throttle(&self) -> f64 {
        self.runner.throttle()
    }
    fn pause(&self) {
        self.runner.pause();
    }
    fn resume(&self) {
        self.runner.resume();
    }
    fn is_paused(&self) -> bool {
        self.runner.is_paused()
    }
    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        if !self.runner.is_paused() {
            return Err(GuestError::BadState("the vCPUs must be paused to save their state".into()));
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&livemig_engine::num::u32_len(self.vcpus.len()).to_le_bytes());
        for (i, v) in self.vcpus.iter().enumerate() {
            let vcpu = v.lock().unwrap_or_else(|e| e.into_inner());
            let blob = state::save(&vcpu, &self.msrs, 0).map_err(|e| GuestError::BadState(format!("vCPU {i}: {e}")))?;
            out.extend_from_slice(&livemig_engine::num::u32_len(blob.len()).to_le_bytes());
            out.extend_from_slice(&blob);
        }
        Ok(out)
    }
    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        if !self.runner.is_paused() {
            return Err(GuestError::BadState("the vCPUs must be paused to restore their state".into()));
        }
        let parsed = self.parse_state(blob)?;
        for (i, (v, p)) in self.vcpus.iter().zip(&parsed).enumerate() {
            let vcpu = v.lock().unwrap_or_else(|e| e.into_inner());
            state::apply(&vcpu, p).map_err(|e| GuestError::BadState(format!("vCPU {i}: {e}")))?;
        }
        Ok(())
    }
}

impl<R: VcpuRunner> Guest for KvmVm<R> {
    fn memory(&self) -> &dyn GuestMemory {
        self
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }
    fn vcpus(&self) -> &dyn Vcpus {
        self
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn vcpu_count(&self) -> u32 {
        livemig_engine::num::u32_len(self.vcpus.len())
    }
    fn devices(&self) -> Option<&dyn Devices> {
        self.devices.as_deref()
    }
}
