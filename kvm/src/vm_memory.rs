//! An adapter from rust-vmm's `vm_memory::GuestMemoryMmap<AtomicBitmap>` to the engine's abstractions, for VMMs
//! built on rust-vmm crates.
//!
//! Memory: each `GuestRegionMmap` is a [`HostRegion`], pages numbered across regions in order. Dirty log: vm-memory
//! marks a region's `AtomicBitmap` after each write made through its `Bytes` API (the order invariant 3 needs), and
//! a harvest swaps every word of every region's bitmap to zero (`get_and_reset`) into the engine's bitmap. The vCPUs
//! are the VMM's own: any [`Vcpus`].

use livemig_engine::dirty::Bitmap;
use livemig_engine::guest::{Devices, DirtyLog, Guest, GuestError, GuestMemory, HostRegion, Vcpus, PAGE_SIZE};
use std::ptr::NonNull;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion};

/// A VMM's guest: vm-memory memory with dirty bitmaps, and the VMM's vCPUs.
pub struct VmMemoryGuest<V: Vcpus> {
    mem: GuestMemoryMmap<AtomicBitmap>,
    regions: Vec<HostRegion>,
    vcpus: V,
    vcpu_count: u32,
    kind: &'static str,
    devices: Option<Box<dyn Devices>>,
}

impl<V: Vcpus> std::fmt::Debug for VmMemoryGuest<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMemoryGuest").field("regions", &self.regions.len()).field("kind", &self.kind).finish()
    }
}

impl<V: Vcpus> VmMemoryGuest<V> {
    /// Wraps `mem` and the VMM's `vcpus`, `vcpu_count` of them (at least one). `kind` names the guest in the
    /// handshake, so the destination builds a matching one. Every region must be a whole number of 4 KiB pages.
    pub fn new(
        mem: GuestMemoryMmap<AtomicBitmap>,
        vcpus: V,
        vcpu_count: u32,
        kind: &'static str,
    ) -> Result<Self, GuestError> {
        if vcpu_count == 0 {
            return Err(GuestError::BadState("a guest needs at least one vCPU".into()));
        }
        let mut regions = Vec::new();
        for r in mem.iter() {
            let len = livemig_engine::num::usize_from(r.len());
            if !len.is_multiple_of(PAGE_SIZE) {
                return Err(GuestError::BadSize(len as u64));
            }
            let ptr = NonNull::new(r.as_ptr()).ok_or(GuestError::BadSize(0))?;
            // SAFETY: the region's mapping is owned by `mem`, which this guest keeps for its whole life; its length
            // is a whole number of pages (checked above).
            regions.push(unsafe { HostRegion::new(r.start_addr().0, ptr, len) });
        }
        Ok(VmMemoryGuest { mem, regions, vcpus, vcpu_count, kind, devices: None })
    }

    /// The devices whose state migrates with the guest.
    pub fn with_devices(mut self, devices: Box<dyn Devices>) -> Self {
        self.devices = Some(devices);
        self
    }

    /// The guest memory, for the VMM's own use.
    pub fn memory_mmap(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.mem
    }

    /// The VMM's vCPUs.
    pub fn vcpus_impl(&self) -> &V {
        &self.vcpus
    }
}

impl<V: Vcpus> GuestMemory for VmMemoryGuest<V> {
    fn regions(&self) -> &[HostRegion] {
        &self.regions
    }
}

impl<V: Vcpus> DirtyLog for VmMemoryGuest<V> {
    fn harvest(&self, out: &mut Bitmap) -> Result<(), GuestError> {
        let mut base = 0u64;
        for (r, host) in self.mem.iter().zip(&self.regions) {
            // Swapped to zero word by word: a write marked after this is harvested next time.
            let words = std::ops::Deref::deref(r).bitmap().get_and_reset();
            out.or_region(&words, base, host.pages());
            base += host.pages();
        }
        Ok(())
    }
}

impl<V: Vcpus> Guest for VmMemoryGuest<V> {
    fn memory(&self) -> &dyn GuestMemory {
        self
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        self
    }
    fn vcpus(&self) -> &dyn Vcpus {
        &self.vcpus
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }
    fn devices(&self) -> Option<&dyn Devices> {
        self.devices.as_deref()
    }
}
