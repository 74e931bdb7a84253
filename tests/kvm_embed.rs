//! The KVM adapter for a VM the embedder built (`kvm::embed::KvmVm`): a toy VMM makes its own VM with kvm-ioctls
//! (two memory slots, an in-kernel irqchip, two vCPUs on its own threads, each running a real-mode loop that counts
//! up words in its own pages), and livemig migrates it over loopback through the handle while the vCPUs write. The
//! destination's VM is the toy VMM's too. Both vCPUs resume from their own state, and memory is verified in full.

use livemig::engine::guest::{Guest, MemoryLayout, MmapRegion};
use livemig::kvm::embed::{KvmVm, Slot, VcpuRunner};
use livemig::kvm::kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use livemig::transport::dest::{accept_migration, receive, DestOptions};
use livemig::transport::source::{Links, Migration, SourceOptions, VerifyMode};
use livemig::transport::tls::SecurityPair;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Each vCPU's program, in 16-bit real mode at `0x1000 + 0x100 * id`: `mov ax, SEG; mov ds, ax; xor bx, bx;` then
/// for ever `inc dword [bx]; add bx, 0x1000; out 0x10, al` (16 pages of its segment, round and round).
fn program(segment: u16) -> Vec<u8> {
    let [lo, hi] = segment.to_le_bytes();
    let mut p = vec![0xB8, lo, hi, 0x8E, 0xD8, 0x31, 0xDB];
    p.extend_from_slice(&[0x66, 0xFF, 0x07, 0x81, 0xC3, 0x00, 0x10, 0xE6, 0x10, 0xEB, 0xF5]);
    p
}

/// Segments the two vCPUs write: 0x80000 and 0x90000, both in the second slot.
const SEGMENTS: [u16; 2] = [0x8000, 0x9000];
const LAYOUT: [(u64, u64); 2] = [(0, 512 << 10), (512 << 10, 512 << 10)];

/// The toy VMM's vCPU threads: paused, throttled and resumed as livemig asks.
#[derive(Default)]
struct Runner {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    throttle: AtomicU64,
    exits: AtomicU64,
    stop: AtomicBool,
    failed: Mutex<Option<String>>,
}

#[derive(Default)]
struct Ctl {
    paused: bool,
    parked: usize,
}

/// The runner as the adapter holds it (shared with the vCPU threads).
#[derive(Clone)]
struct Handle(Arc<Runner>);

impl std::ops::Deref for Handle {
    type Target = Runner;
    fn deref(&self) -> &Runner {
        &self.0
    }
}

impl VcpuRunner for Handle {
    fn pause(&self) {
        let mut c = self.ctl.lock().unwrap();
        c.paused = true;
        // Every vCPU leaves KVM_RUN at its next port exit, a few microseconds away.
        while c.parked < SEGMENTS.len() {
            c = self.cv.wait(c).unwrap();
        }
    }
    fn resume(&self) {
        self.ctl.lock().unwrap().paused = false;
        self.cv.notify_all();
    }
    fn is_paused(&self) -> bool {
        self.ctl.lock().unwrap().paused
    }
    fn set_throttle(&self, pct: f64) {
        self.throttle.store(livemig::engine::num::u64_saturating(pct), Ordering::SeqCst);
    }
    fn throttle(&self) -> f64 {
        self.throttle.load(Ordering::SeqCst) as f64
    }
}

fn run_vcpu(vcpu: &Mutex<VcpuFd>, r: &Runner) {
    while !r.stop.load(Ordering::SeqCst) {
        {
            let mut c = r.ctl.lock().unwrap();
            if c.paused {
                c.parked += 1;
                r.cv.notify_all();
                while c.paused && !r.stop.load(Ordering::SeqCst) {
                    c = r.cv.wait(c).unwrap();
                }
                c.parked -= 1;
            }
        }
        if r.stop.load(Ordering::SeqCst) {
            return;
        }
        let exit = vcpu.lock().unwrap().run().map(|e| matches!(e, VcpuExit::IoOut(0x10, _)));
        match exit {
            Ok(true) => drop(r.exits.fetch_add(1, Ordering::Relaxed)),
            other => {
                *r.failed.lock().unwrap() = Some(format!("unexpected exit: {other:?}"));
                return;
            }
        }
        let t = r.throttle.load(Ordering::Relaxed);
        if t > 0 {
            std::thread::sleep(Duration::from_micros(t));
        }
    }
}

/// The toy VMM's VM: its memory, its fds, its threads.
struct ToyVm {
    maps: Vec<MmapRegion>,
    vm: Arc<VmFd>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    runner: Handle,
    threads: Vec<std::thread::JoinHandle<()>>,
    kvm: Kvm,
}

impl ToyVm {
    /// A VM of `LAYOUT`; the source's vCPUs start in their programs, a destination's wait paused for their state.
    fn new(source: bool) -> ToyVm {
        let kvm = Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        let maps: Vec<MmapRegion> = LAYOUT.iter().map(|&(a, l)| MmapRegion::new(a, l, false).unwrap()).collect();
        for (slot, m) in maps.iter().enumerate() {
            let region = livemig::kvm::kvm_bindings::kvm_userspace_memory_region {
                slot: livemig::engine::num::u32_len(slot),
                flags: 0,
                guest_phys_addr: m.region().guest_addr(),
                memory_size: m.region().len() as u64,
                userspace_addr: m.region().as_ptr() as u64,
            };
            // SAFETY: the mapping lives in `maps`, which the ToyVm keeps as long as the VM.
            unsafe { vm.set_user_memory_region(region) }.unwrap();
        }
        let cpuid = kvm.get_supported_cpuid(livemig::kvm::kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let mut vcpus = Vec::new();
        for (id, &seg) in SEGMENTS.iter().enumerate() {
            let v = vm.create_vcpu(id as u64).unwrap();
            v.set_cpuid2(&cpuid).unwrap();
            if source {
                let code = 0x1000 + 0x100 * id;
                let prog = program(seg);
                // SAFETY: inside the first slot's live mapping; no vCPU runs yet.
                unsafe {
                    std::ptr::copy_nonoverlapping(prog.as_ptr(), maps[0].region().as_ptr().add(code), prog.len())
                };
                let mut sregs = v.get_sregs().unwrap();
                sregs.cs.base = 0;
                sregs.cs.selector = 0;
                v.set_sregs(&sregs).unwrap();
                let mut regs = v.get_regs().unwrap();
                regs.rip = code as u64;
                regs.rflags = 2;
                v.set_regs(&regs).unwrap();
                // With the in-kernel LAPIC an AP waits for INIT/SIPI; this VMM starts every vCPU straight away.
                let runnable = livemig::kvm::kvm_bindings::kvm_mp_state {
                    mp_state: livemig::kvm::kvm_bindings::KVM_MP_STATE_RUNNABLE,
                };
                v.set_mp_state(runnable).unwrap();
            }
            vcpus.push(Arc::new(Mutex::new(v)));
        }
        let runner = Handle(Arc::new(Runner::default()));
        runner.ctl.lock().unwrap().paused = !source;
        let threads = vcpus
            .iter()
            .map(|v| {
                let (v, r) = (v.clone(), runner.0.clone());
                std::thread::spawn(move || run_vcpu(&v, &r))
            })
            .collect();
        ToyVm { maps, vm, vcpus, runner, threads, kvm }
    }

    fn adapter(&self) -> KvmVm<Handle> {
        let slots = self
            .maps
            .iter()
            .enumerate()
            .map(|(i, m)| Slot {
                slot: livemig::engine::num::u32_len(i),
                guest_addr: m.region().guest_addr(),
                host_addr: m.region().as_ptr() as u64,
                len: m.region().len() as u64,
                flags: 0,
            })
            .collect();
        // SAFETY: each slot is the mapping registered above, kept by the ToyVm, which every test keeps past the
        // adapter.
        unsafe { KvmVm::new(&self.kvm, self.vm.clone(), slots, self.vcpus.clone(), self.runner.clone(), "toy-kvm") }
            .unwrap()
    }

    /// Each vCPU's pages' counters, summed.
    fn sums(&self) -> [u64; 2] {
        SEGMENTS.map(|seg| {
            let base = (usize::from(seg) << 4) - (512 << 10);
            (0..16)
                .map(|p| {
                    // SAFETY: the first word of a page inside the second slot's live mapping.
                    u64::from(unsafe {
                        self.maps[1].region().as_ptr().add(base + p * 4096).cast::<u32>().read_volatile()
                    })
                })
                .sum()
        })
    }
}

impl Drop for ToyVm {
    fn drop(&mut self) {
        self.runner.stop.store(true, Ordering::SeqCst);
        self.runner.resume();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn a_vm_the_embedder_built_migrates_with_both_vcpus_carrying_on() {
    if !livemig::kvm::available() {
        println!("SKIPPED: /dev/kvm is not available on this machine");
        return;
    }
    let src = ToyVm::new(true);
    std::thread::sleep(Duration::from_millis(100));
    assert!(src.runner.exits.load(Ordering::Relaxed) > 100, "the toy guest does not run");
    let mut guest = src.adapter();
    guest.start_dirty_log().unwrap();
    assert_eq!(guest.vcpu_count(), 2);
    assert_eq!(guest.memory().layout(), MemoryLayout { regions: LAYOUT.to_vec() });
    let security = SecurityPair::throwaway().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest_security = security.dest.clone();
    let destination = std::thread::spawn(move || {
        let opts = DestOptions::default();
        let (control, hello) = accept_migration(&listener, &opts, &dest_security, &|_, _| {}).unwrap();
        assert_eq!((hello.vcpus, hello.guest_kind.as_str()), (2, "toy-kvm"));
        let vm = ToyVm::new(false);
        let adapter = vm.adapter();
        let (adapter, _) = receive(&[&listener], &control, hello, |_| Ok(adapter), &opts, &dest_security, &|_, _| {})
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((vm, adapter))
    });
    let opts = SourceOptions { verify: VerifyMode::Full, ..Default::default() };
    let guest: Arc<dyn Guest> = Arc::new(guest);
    let control = TcpStream::connect(addr).unwrap();
    let m = Migration::start(guest.clone(), control, Links::Connect(vec![]), opts, security.source).unwrap();
    let report = m.wait();
    report.result.as_ref().unwrap();
    assert!(report.verified, "memory roots differ");
    let (dvm, dest) = destination.join().unwrap().unwrap();
    assert!(src.runner.is_paused(), "the source's vCPUs must stay stopped after the handover");
    let at_pause = src.sums();
    std::thread::sleep(Duration::from_millis(100));
    assert!(dvm.runner.failed.lock().unwrap().is_none(), "{:?}", dvm.runner.failed.lock().unwrap());
    let now = dvm.sums();
    // Each vCPU carries on from its own registers: its own pages count on from where the source's stopped.
    for i in 0..2 {
        assert!(now[i] > at_pause[i], "vCPU {i}: {} on the destination, {} at the pause", now[i], at_pause[i]);
    }
    assert!(!dest.vcpus().is_paused());
    // A running VM's state is not read: it would be torn.
    assert!(dest.vcpus().save_state().unwrap_err().to_string().contains("must be paused"));
    println!(
        "migrated in {:?}, downtime {:?}; sums {at_pause:?} at the pause, {now:?} after",
        report.total_time, report.downtime
    );
    drop(dest);
}

#[test]
fn a_state_for_another_vcpu_count_is_refused_before_any_vcpu_is_touched() {
    if !livemig::kvm::available() {
        println!("SKIPPED: /dev/kvm is not available on this machine");
        return;
    }
    let vm = ToyVm::new(false);
    let adapter = vm.adapter();
    let v = adapter.vcpus();
    let blob = v.save_state().unwrap();
    assert_eq!(&blob[..4], b"LMVS");
    let mut one = blob.clone();
    one[4..8].copy_from_slice(&1u32.to_le_bytes());
    let e = v.restore_state(&one).unwrap_err().to_string();
    assert!(e.contains("state for 1 vCPUs, and this VM has 2"), "{e}");
    let e = v.restore_state(&blob[..blob.len() - 3]).unwrap_err().to_string();
    assert!(e.contains("vCPU 1's state"), "{e}");
    let e = v.restore_state(&[blob.as_slice(), b"xx"].concat()).unwrap_err().to_string();
    assert!(e.contains("2 bytes after"), "{e}");
    v.restore_state(&blob).unwrap();
}
