//! livemig's KVM adapter: a real KVM guest behind the engine's `GuestMemory`, `DirtyLog` and `Vcpus` traits.
//!
//! A [`KvmGuest`] is a VM with one memory slot (an anonymous mmap registered with `KVM_MEM_LOG_DIRTY_PAGES`), an
//! in-kernel irqchip (so the LAPIC state is real and migrates), and one vCPU running the [`program`] test guest on
//! its own thread. The thread paces the guest to a host-set dirty rate at the guest's port exits, sleeps the
//! throttled share of each 10 ms slice, and parks between runs when paused; a vCPU inside `KVM_RUN` is kicked out
//! with `immediate_exit` and a signal.
//!
//! Dirty logging ([`DirtyLogMethod`]): `KVM_GET_DIRTY_LOG` (fetch and re-protect in one ioctl), or
//! `KVM_CLEAR_DIRTY_LOG` with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (fetch, then re-protect only the pages fetched).
//! The README gives the harvest cost of each on a 2 GiB guest.
//!
//! For a VM the embedder built and runs itself, [`embed::KvmVm`] adapts its `VmFd`, slots and vCPU fds instead, and
//! [`vm_memory::VmMemoryGuest`] adapts rust-vmm's vm-memory; neither needs the test guest (the `test-guest`
//! feature, which brings its assembler).
//!
//! On the destination, [`KvmGuest::destination`] builds a fresh VM of the source's layout whose vCPU waits, paused,
//! for its state ([`state`]).
#![deny(missing_docs)]

mod cpuid;
pub mod embed;
// The versions this adapter is built against, for an embedder's VM to match.
pub use kvm_bindings;
pub use kvm_ioctls;
pub mod program;
pub mod state;
pub mod vm_memory;

use cpuid::features_in;
pub use cpuid::mask_cpuid;

use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use livemig_engine::cpu::CpuDescription;
use livemig_engine::dirty::Bitmap;
use livemig_engine::guest::{
    host_pages, DirtyLog, Guest, GuestError, GuestMemory, HostRegion, MemoryLayout, MmapRegion, Vcpus, PAGE_SIZE,
};
use livemig_engine::num::{u32_saturating, u64_saturating};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmm_sys_util::signal;

/// Why a KVM guest could not be built or driven.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error("opening /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The test guest's layout does not fit.
    #[error("{0}")]
    Layout(String),
    /// Assembling the test guest failed.
    #[error("assembling the test guest: {0}")]
    Assemble(String),
    /// Guest memory.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

impl From<KvmError> for GuestError {
    fn from(e: KvmError) -> Self {
        GuestError::BadState(e.to_string())
    }
}

/// How the dirty log is harvested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DirtyLogMethod {
    /// `KVM_GET_DIRTY_LOG`: one ioctl returns the bitmap and write-protects every dirty page again.
    #[default]
    #[cfg_attr(feature = "clap", value(name = "get"))]
    GetLog,
    /// `KVM_GET_DIRTY_LOG` without re-protection, then `KVM_CLEAR_DIRTY_LOG` for exactly the pages fetched
    /// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    #[cfg_attr(feature = "clap", value(name = "clear"))]
    ManualClear,
}

/// A KVM test guest's parameters.
#[derive(Debug, Clone)]
pub struct KvmConfig {
    /// Guest RAM in bytes (at least 2 MiB, a multiple of 4 KiB, at most 4 GiB: the guest is 32-bit).
    pub memory_bytes: u64,
    /// Share of RAM the host fills with the reference page mix before boot, percent.
    pub touched_pct: f64,
    /// Pages per second the guest writes.
    pub dirty_rate: u64,
    /// The guest writes pages in the first `hot_set_pct` percent of its data area.
    pub hot_set_pct: f64,
    /// How dirty pages are harvested.
    pub dirty_log: DirtyLogMethod,
    /// The CPU model the guest sees: CPUID is masked down to its features. `None`: everything KVM supports here.
    pub cpu_model: Option<CpuDescription>,
}

/// Ioctl numbers kvm-ioctls has no wrapper for.
mod nr {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_bindings::kvm_clear_dirty_log);
}

/// What the vCPU thread reports about the guest.
#[derive(Debug, Default)]
pub struct GuestReports {
    /// The guest's last progress report (low 32 bits of its counter).
    pub progress: AtomicU32,
    /// Progress reports received.
    pub reports: AtomicU64,
    /// Self-checks whose recomputed sum matched the running check value.
    pub checks_ok: AtomicU64,
    /// Self-checks that did not match: memory the guest did not write changed under it.
    pub checks_bad: AtomicU64,
    /// CPUID leaf 1 ECX as the guest last read it.
    pub cpuid1_ecx: AtomicU32,
    /// CPUID leaf 7 EBX as the guest last read it.
    pub cpuid7_ebx: AtomicU32,
    /// CPUID reports received.
    pub cpuid_reports: AtomicU64,
    last_sum: AtomicU32,
}

struct Ctl {
    paused: bool,
    stop: bool,
    parked: bool,
    rate: u64,
    /// The vCPU has state worth running (the source boots it; a destination gets it restored).
    ready: bool,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    pause_req: AtomicBool,
    throttle_milli: AtomicU32,
    /// The vCPU's `kvm_run` page, for `immediate_exit` (0 until the thread publishes it).
    kvm_run: AtomicUsize,
    reports: GuestReports,
    failed: Mutex<Option<String>>,
}

/// A KVM VM running the test guest.
pub struct KvmGuest {
    vm: VmFd,
    map: MmapRegion,
    regions: Vec<HostRegion>,
    vcpu: Arc<Mutex<VcpuFd>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    method: DirtyLogMethod,
    msrs: Vec<u32>,
    /// The progress counter in memory when the vCPU state was restored: on a destination, the source's at its pause.
    restored_counter: AtomicU64,
    _kvm: Kvm,
}

impl std::fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuest").field("bytes", &self.map.region().len()).field("method", &self.method).finish()
    }
}

/// True when this machine can run KVM guests.
pub fn available() -> bool {
    Kvm::new().is_ok()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl KvmGuest {
    /// Builds and boots the test guest: its vCPU starts writing memory at `cfg.dirty_rate`. (With the default
    /// `test-guest` feature, which assembles it.)
    #[cfg(feature = "test-guest")]
    pub fn new(cfg: &KvmConfig) -> Result<KvmGuest, KvmError> {
        if !(2 << 20..=4 << 30).contains(&cfg.memory_bytes) {
            return Err(KvmError::Layout(format!(
                "the 32-bit test guest needs 2 MiB to 4 GiB of RAM, not {} bytes",
                cfg.memory_bytes
            )));
        }
        let layout = MemoryLayout { regions: vec![(0, cfg.memory_bytes)] };
        let g = Self::build(&layout, cfg.dirty_log, false, cfg.cpu_model.as_ref())?;
        let code = program::assemble().map_err(|e| KvmError::Assemble(e.to_string()))?;
        let first = program::DATA / PAGE_SIZE as u64;
        let data_pages = cfg.memory_bytes / PAGE_SIZE as u64 - first;
        let touched = u64_saturating(data_pages as f64 * cfg.touched_pct.clamp(0.0, 100.0) / 100.0);
        let hot = u64_saturating(data_pages as f64 * cfg.hot_set_pct.clamp(0.0, 100.0) / 100.0).clamp(1, data_pages);
        // SAFETY: the VM's vCPU has not started, and nothing else reads its memory yet.
        unsafe { livemig_engine::guest::fill_mix(g.map.region(), first..first + touched, 0x6b76_6d21) };
        // The check value starts as the sum of the hot pages' first words, as the guest will recompute it.
        let mut check = 0u32;
        let mut word = [0u8; PAGE_SIZE];
        for p in first..first + hot {
            livemig_engine::guest::read_page(&g, p, &mut word)?;
            check = check.wrapping_add(u32::from_le_bytes(word[..4].try_into().expect("4 bytes")));
        }
        let mut mailbox = [0u8; 24];
        mailbox[8..12].copy_from_slice(&check.to_le_bytes());
        mailbox[12..16].copy_from_slice(&program::BURST.to_le_bytes());
        // At most 4 GiB of RAM (checked above): a million pages.
        let hot32 = u32::try_from(hot).expect("a 4 GiB guest has fewer than 2^32 pages");
        mailbox[16..20].copy_from_slice(&hot32.to_le_bytes());
        mailbox[20..24].copy_from_slice(&program::verify_every(hot).to_le_bytes());
        g.write_bytes(program::CODE, &code)?;
        g.write_bytes(program::MAILBOX, &mailbox)?;
        {
            let vcpu = g.lock_vcpu();
            let mut sregs = vcpu.get_sregs().map_err(ioctl("get sregs"))?;
            // Flat 32-bit protected mode: 4 GiB segments at base 0, loaded straight into the segment caches.
            let seg = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
                base: 0,
                limit: 0xffff_ffff,
                selector,
                type_,
                present: 1,
                dpl: 0,
                db: 1,
                s: 1,
                l: 0,
                g: 1,
                ..Default::default()
            };
            sregs.cs = seg(0x8, 0xb);
            for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
                *s = seg(0x10, 0x3);
            }
            sregs.cr0 |= 1; // PE
            vcpu.set_sregs(&sregs).map_err(ioctl("set sregs"))?;
            let mut regs = vcpu.get_regs().map_err(ioctl("get regs"))?;
            regs.rip = program::CODE;
            regs.rflags = 0x2;
            regs.rsp = program::MAILBOX;
            vcpu.set_regs(&regs).map_err(ioctl("set regs"))?;
        }
        {
            let mut ctl = g.lock();
            ctl.rate = cfg.dirty_rate;
            ctl.ready = true;
            ctl.paused = false;
        }
        g.shared.pause_req.store(false, Ordering::SeqCst);
        g.shared.cv.notify_all();
        Ok(g)
    }

    /// A fresh VM of `layout` for an incoming migration: memory empty, vCPU paused until its state is restored, its
    /// CPUID masked to `cpu_model` (the source VM's, from the handshake) when given.
    pub fn destination(layout: &MemoryLayout, cpu_model: Option<&CpuDescription>) -> Result<KvmGuest, KvmError> {
        Self::build(layout, DirtyLogMethod::GetLog, true, cpu_model)
    }

    fn build(
        layout: &MemoryLayout,
        method: DirtyLogMethod,
        huge_pages: bool,
        cpu_model: Option<&CpuDescription>,
    ) -> Result<KvmGuest, KvmError> {
        let &[(0, bytes)] = layout.regions.as_slice() else {
            return Err(KvmError::Layout(format!("the KVM guest has one region at 0, not {:?}", layout.regions)));
        };
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        if method == DirtyLogMethod::ManualClear {
            if kvm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) <= 0 {
                return Err(KvmError::Layout("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not supported here".into()));
            }
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap).map_err(ioctl("enable MANUAL_DIRTY_LOG_PROTECT2"))?;
        }
        vm.set_tss_address(0xfffb_d000).map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let map = MmapRegion::new(0, bytes, huge_pages)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: bytes,
            userspace_addr: map.region().as_ptr() as u64,
        };
        // SAFETY: the region is a live anonymous mapping of `bytes` bytes owned by the returned KvmGuest, which
        // keeps it (field `map`) as long as the VM (field `vm`) that uses it; the VM is dropped first (field order).
        unsafe { vm.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        if let Some(model) = cpu_model {
            mask_cpuid(cpuid.as_mut_slice(), model);
        }
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let supported = kvm.get_msr_index_list().map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs = state::MSRS.iter().copied().filter(|m| supported.as_slice().contains(m)).collect();
        signal::register_signal_handler(signal::SIGRTMIN(), kick_handler).map_err(ioctl("signal handler"))?;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl { paused: true, stop: false, parked: false, rate: 0, ready: false }),
            cv: Condvar::new(),
            pause_req: AtomicBool::new(true),
            throttle_milli: AtomicU32::new(0),
            kvm_run: AtomicUsize::new(0),
            reports: GuestReports::default(),
            failed: Mutex::new(None),
        });
        let vcpu = Arc::new(Mutex::new(vcpu));
        let (v, s) = (vcpu.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("kvm-vcpu0".into())
            .spawn(move || vcpu_loop(&v, &s))
            .map_err(|e| KvmError::Guest(GuestError::Thread(e)))?;
        let regions = vec![map.host_region()];
        let g = KvmGuest {
            vm,
            map,
            regions,
            vcpu,
            shared,
            thread: Some(thread),
            method,
            msrs,
            restored_counter: AtomicU64::new(0),
            _kvm: kvm,
        };
        // Wait until the thread has published its kvm_run page and parked.
        let mut ctl = g.lock();
        while !ctl.parked {
            ctl = g.shared.cv.wait(ctl).expect("vcpu control poisoned");
        }
        drop(ctl);
        Ok(g)
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.shared.ctl.lock().expect("vcpu control poisoned")
    }

    fn lock_vcpu(&self) -> MutexGuard<'_, VcpuFd> {
        self.vcpu.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(feature = "test-guest")]
    fn write_bytes(&self, gpa: u64, data: &[u8]) -> Result<(), KvmError> {
        let end = gpa + data.len() as u64;
        if end > self.map.region().len() as u64 {
            return Err(KvmError::Layout(format!("write at {gpa:#x}+{} outside guest memory", data.len())));
        }
        // SAFETY: in bounds (checked above) of the live guest mapping; the vCPU is parked, not running.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.region().as_ptr().add(livemig_engine::num::usize_from(gpa)),
                data.len(),
            )
        };
        Ok(())
    }

    /// The guest's progress counter, read from its memory.
    pub fn counter(&self) -> u64 {
        let mut b = [0u8; 8];
        if let Ok((ptr, _)) = host_pages(self, program::MAILBOX / PAGE_SIZE as u64, 1) {
            // SAFETY: the first 8 bytes of the mailbox page, inside the live mapping.
            unsafe { std::ptr::copy_nonoverlapping(ptr, b.as_mut_ptr(), 8) };
        }
        u64::from_le_bytes(b)
    }

    /// The source's progress counter at its pause, as its state blob carried it; `None` if never restored.
    pub fn counter_at_restore(&self) -> Option<u64> {
        Some(self.restored_counter.load(Ordering::SeqCst)).filter(|&c| c > 0)
    }

    /// The features in the CPUID table KVM holds for the vCPU (`KVM_GET_CPUID2`): what KVM answers the guest's CPUID
    /// with, unless an outer hypervisor answers it first (nested virtualization can).
    pub fn cpuid_features(&self) -> Result<std::collections::BTreeSet<String>, KvmError> {
        let cpuid = self.lock_vcpu().get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_CPUID2"))?;
        Ok(features_in(cpuid.as_slice()))
    }

    /// What the guest has reported through its ports.
    pub fn reports(&self) -> &GuestReports {
        &self.shared.reports
    }

    /// Why the vCPU stopped, if it failed (an unexpected exit or ioctl error).
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The dirty log method in use.
    pub fn method(&self) -> DirtyLogMethod {
        self.method
    }

    fn clear_dirty_log(&self, bitmap: &mut [u64]) -> Result<(), GuestError> {
        let pages = self.map.region().pages();
        let clear = kvm_bindings::kvm_clear_dirty_log {
            slot: 0,
            // KVM wants a multiple of 64 pages unless the range ends at the slot's end.
            num_pages: u32::try_from(pages).map_err(|_| GuestError::BadState("slot too large".into()))?,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // SAFETY: KVM_CLEAR_DIRTY_LOG on our VM fd with a bitmap covering the whole slot (one bit per page), which
        // lives across the call.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, nr::KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(GuestError::BadState(format!("KVM_CLEAR_DIRTY_LOG: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        {
            let mut ctl = self.lock();
            ctl.stop = true;
        }
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl KvmGuest {
    /// Makes the vCPU leave `KVM_RUN` now: `immediate_exit` covers a thread about to enter, the signal one inside.
    fn kick(&self) {
        self.shared.pause_req.store(true, Ordering::SeqCst);
        let run = self.shared.kvm_run.load(Ordering::SeqCst) as *mut kvm_bindings::kvm_run;
        if !run.is_null() {
            // SAFETY: the vCPU's kvm_run page stays mapped while the VcpuFd lives (owned by self.vcpu); KVM reads
            // immediate_exit when KVM_RUN starts, and it is the one field userspace writes for this purpose.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
        if let Some(t) = &self.thread {
            // SAFETY: signals our own live vCPU thread; its handler for SIGRTMIN does nothing but interrupt KVM_RUN.
            unsafe { libc::pthread_kill(t.as_pthread_t(), signal::SIGRTMIN()) };
        }
        self.shared.cv.notify_all();
    }
}

/// The vCPU thread: parks while paused, else runs the guest, pacing it at the progress exits.
/// Parks the vCPU thread while it is paused, not yet restored, or has no pacing; returns the pacing once it may run,
/// or None when the VM is stopping.
fn park_until_runnable(s: &Shared) -> Option<u64> {
    let mut ctl = s.ctl.lock().expect("vcpu control poisoned");
    while (ctl.paused || !ctl.ready || ctl.rate == 0) && !ctl.stop {
        ctl.parked = true;
        s.cv.notify_all();
        ctl = s.cv.wait(ctl).expect("vcpu control poisoned");
    }
    ctl.parked = false;
    (!ctl.stop).then_some(ctl.rate)
}

fn vcpu_loop(vcpu: &Mutex<VcpuFd>, s: &Shared) {
    {
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let run: *mut kvm_bindings::kvm_run = v.get_kvm_run();
        s.kvm_run.store(run as usize, Ordering::SeqCst);
    }
    let mut slice_start = Instant::now();
    let mut done_in_slice = 0u64;
    loop {
        let Some(rate) = park_until_runnable(s) else { return };
        // Pacing: one burst of program::BURST pages is due every BURST / rate seconds of running time; throttling
        // sleeps its share of each THROTTLE_SLICE.
        let throttle = f64::from(s.throttle_milli.load(Ordering::Relaxed)) / 100_000.0;
        let slice = livemig_engine::guest::THROTTLE_SLICE;
        let elapsed = slice_start.elapsed();
        if elapsed >= slice {
            slice_start = Instant::now();
            done_in_slice = 0;
            continue;
        }
        if elapsed >= slice.mul_f64(1.0 - throttle) {
            wait_unless_paused(s, slice - elapsed);
            continue;
        }
        let due = u64_saturating(rate as f64 * elapsed.as_secs_f64()) + u64::from(program::BURST);
        if done_in_slice + u64::from(program::BURST) > due {
            wait_unless_paused(s, Duration::from_micros(200));
            continue;
        }
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        if s.pause_req.load(Ordering::SeqCst) {
            v.set_kvm_immediate_exit(0);
            continue;
        }
        match v.run() {
            Ok(VcpuExit::IoOut(program::PORT_PROGRESS, data)) => {
                s.reports.progress.store(le32(data), Ordering::Relaxed);
                s.reports.reports.fetch_add(1, Ordering::Relaxed);
                done_in_slice += u64::from(program::BURST);
            }
            Ok(VcpuExit::IoOut(program::PORT_SUM, data)) => s.reports.last_sum.store(le32(data), Ordering::Relaxed),
            Ok(VcpuExit::IoOut(program::PORT_CPUID1_ECX, data)) => {
                s.reports.cpuid1_ecx.store(le32(data), Ordering::Relaxed)
            }
            Ok(VcpuExit::IoOut(program::PORT_CPUID7_EBX, data)) => {
                s.reports.cpuid7_ebx.store(le32(data), Ordering::Relaxed);
                s.reports.cpuid_reports.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::IoOut(program::PORT_CHECK, data)) => {
                let ok = le32(data) == s.reports.last_sum.load(Ordering::Relaxed);
                let counter = if ok { &s.reports.checks_ok } else { &s.reports.checks_bad };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::Intr) => v.set_kvm_immediate_exit(0),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => v.set_kvm_immediate_exit(0),
            Ok(exit) => {
                let why = format!("unexpected vCPU exit {exit:?}");
                drop(v);
                stop_with(s, why);
                return;
            }
            Err(e) => {
                drop(v);
                stop_with(s, format!("KVM_RUN: {e}"));
                return;
            }
        }
    }
}

fn le32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn wait_unless_paused(s: &Shared, d: Duration) {
    let ctl = s.ctl.lock().expect("vcpu control poisoned");
    if !s.pause_req.load(Ordering::SeqCst) {
        let _ = s.cv.wait_timeout(ctl, d);
    }
}

fn stop_with(s: &Shared, why: String) {
    *s.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    let mut ctl = s.ctl.lock().expect("vcpu control poisoned");
    ctl.stop = true;
    ctl.parked = true;
    s.cv.notify_all();
}

impl GuestMemory for KvmGuest {
    fn regions(&self) -> &[HostRegion] {
        &self.regions
    }

    fn maybe_nonzero(&self) -> Result<Bitmap, GuestError> {
        // Private anonymous memory: a page the host never populated (guest never wrote, never faulted) is zero.
        livemig_engine::guest::resident_pages(self.map.region())
    }

    fn prefault(&self, first: u64, count: u64) {
        if let Ok((ptr, n)) = host_pages(self, first, count) {
            livemig_engine::guest::prefault_host(ptr, n);
        }
    }
}

impl DirtyLog for KvmGuest {
    fn harvest(&self, out: &mut Bitmap) -> Result<(), GuestError> {
        let bytes = self.map.region().len();
        let mut words =
            self.vm.get_dirty_log(0, bytes).map_err(|e| GuestError::BadState(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        if self.method == DirtyLogMethod::ManualClear && words.iter().any(|&w| w != 0) {
            self.clear_dirty_log(&mut words)?;
        }
        out.or_assign(&Bitmap::from_words(words, out.len()));
        Ok(())
    }
}

impl Vcpus for KvmGuest {
    fn set_throttle(&self, pct: f64) {
        self.shared.throttle_milli.store(u32_saturating(pct.clamp(0.0, 99.0) * 1000.0), Ordering::Relaxed);
    }

    fn throttle(&self) -> f64 {
        f64::from(self.shared.throttle_milli.load(Ordering::Relaxed)) / 1000.0
    }

    fn pause(&self) {
        {
            let mut ctl = self.lock();
            ctl.paused = true;
        }
        self.kick();
        let mut ctl = self.lock();
        while !ctl.parked {
            ctl = self.shared.cv.wait(ctl).expect("vcpu control poisoned");
        }
    }

    fn resume(&self) {
        let mut ctl = self.lock();
        ctl.paused = false;
        self.shared.pause_req.store(false, Ordering::SeqCst);
        self.shared.cv.notify_all();
    }

    fn is_paused(&self) -> bool {
        self.lock().paused
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        let rate = self.lock().rate;
        let vcpu = self.lock_vcpu();
        let mut blob = state::save(&vcpu, &self.msrs, rate).map_err(|e| GuestError::BadState(e.to_string()))?;
        // The counter at the pause travels with the state: the destination must not read guest memory to learn it
        // (in post-copy the page holding it has not arrived when the state is restored).
        blob.extend_from_slice(&self.counter().to_le_bytes());
        Ok(blob)
    }

    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        if !self.lock().paused {
            return Err(GuestError::BadState("vCPU must be paused to restore its state".into()));
        }
        let Some((blob, counter)) = blob.split_last_chunk::<8>() else {
            return Err(GuestError::BadState("state blob too short for its counter".into()));
        };
        let rate = {
            let vcpu = self.lock_vcpu();
            state::restore(&vcpu, blob).map_err(|e| GuestError::BadState(e.to_string()))?
        };
        self.restored_counter.store(u64::from_le_bytes(*counter), Ordering::SeqCst);
        let mut ctl = self.lock();
        ctl.rate = rate;
        ctl.ready = true;
        Ok(())
    }

    fn pages_written(&self) -> Option<u64> {
        Some(self.counter())
    }
}

impl Guest for KvmGuest {
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
        "kvm"
    }
    fn vcpu_count(&self) -> u32 {
        1
    }
}

#[cfg(all(test, feature = "test-guest"))]
mod tests;
