//! A toy VMM built on rust-vmm crates that embeds livemig through its public API alone, as a hypervisor would.
//!
//! Its guest memory is `vm_memory::GuestMemoryMmap<AtomicBitmap>` (two regions, one above 4 GiB), which a vCPU
//! thread writes through vm-memory's `Bytes` API (marking the dirty bitmap), and it has two devices whose state
//! migrates: a serial port and a timer. `VmMemoryGuest` adapts all of it to livemig.
//!
//! It starts a migration through the handle, watches its status and events, changes the downtime target and the
//! bandwidth cap while it runs, cancels it (the guest must run on, unthrottled), then migrates again to completion
//! and checks that the destination carries on: memory equal, devices restored, the vCPU counting on. It returns an
//! error, and exits non-zero, unless all of that held.

use livemig::engine::guest::{DeviceSection, Devices, GuestError, GuestMemory as _, MemoryLayout, Vcpus};
use livemig::engine::num::{u64_saturating, usize_from};
use livemig::kvm::vm_memory::VmMemoryGuest;
use livemig::transport::dest::{accept_migration, receive, DestOptions};
use livemig::transport::source::{Links, Migration, MigrationEvent, SourceOptions};
use livemig::transport::tls::SecurityPair;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;
type Guest = VmMemoryGuest<Vcpu>;
type Error = Box<dyn std::error::Error + Send + Sync>;
/// What a destination ends with: the VM, its vCPU and its devices.
type Received = (Guest, Vcpu, Arc<ToyDevices>);

const REGIONS: [(u64, u64); 2] = [(0, 48 << 20), (1 << 32, 16 << 20)];

/// The toy VMM's one vCPU: writes a counter into pages of guest memory, 5000 a second.
struct ToyVcpu {
    counter: AtomicU64,
    paused: Mutex<(bool, bool)>, // (asked to pause, parked)
    cv: Condvar,
    stop: AtomicBool,
    throttle: AtomicU64,
}

/// The vCPU as the guest adapter and the VMM share it.
#[derive(Clone)]
struct Vcpu(Arc<ToyVcpu>);

impl std::ops::Deref for Vcpu {
    type Target = ToyVcpu;
    fn deref(&self) -> &ToyVcpu {
        &self.0
    }
}

impl ToyVcpu {
    fn start(mem: Mem, paused: bool) -> Vcpu {
        let v = Arc::new(ToyVcpu {
            counter: AtomicU64::new(0),
            paused: Mutex::new((paused, false)),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            throttle: AtomicU64::new(0),
        });
        let me = v.clone();
        std::thread::spawn(move || {
            let pages: Vec<u64> =
                REGIONS.iter().flat_map(|&(base, len)| (0..len / 4096).map(move |i| base + i * 4096)).collect();
            while !me.stop.load(Ordering::SeqCst) {
                {
                    let mut st = me.paused.lock().unwrap();
                    st.1 = st.0;
                    me.cv.notify_all();
                    while st.0 && !me.stop.load(Ordering::SeqCst) {
                        st = me.cv.wait(st).unwrap();
                    }
                    st.1 = false;
                }
                let n = me.counter.fetch_add(1, Ordering::SeqCst) + 1;
                let page = pages[usize_from(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % pages.len() as u64)];
                // The write marks the page dirty in the region's AtomicBitmap, after the write.
                mem.write_obj(n, GuestAddress(page)).unwrap();
                // Throttled: sleep longer in proportion, as a VMM's vCPU loop would.
                let t = me.throttle.load(Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200 * 100 / (100 - t.min(99))));
            }
        });
        Vcpu(v)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

impl Vcpus for Vcpu {
    fn set_throttle(&self, pct: f64) {
        self.throttle.store(u64_saturating(pct), Ordering::Relaxed);
    }
    fn throttle(&self) -> f64 {
        self.throttle.load(Ordering::Relaxed) as f64
    }
    fn pause(&self) {
        let mut st = self.paused.lock().unwrap();
        st.0 = true;
        while !st.1 {
            st = self.cv.wait(st).unwrap();
        }
    }
    fn resume(&self) {
        self.paused.lock().unwrap().0 = false;
        self.cv.notify_all();
    }
    fn is_paused(&self) -> bool {
        self.paused.lock().unwrap().0
    }
    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(self.counter.load(Ordering::SeqCst).to_le_bytes().to_vec())
    }
    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let b: [u8; 8] = blob.try_into().map_err(|_| GuestError::BadState("toy vCPU state is 8 bytes".into()))?;
        self.counter.store(u64::from_le_bytes(b), Ordering::SeqCst);
        Ok(())
    }
}

/// The toy VMM's devices: a serial port's buffered output (version 1) and a timer's next deadline (version 3).
#[derive(Default)]
struct ToyDevices {
    serial: Mutex<Vec<u8>>,
    timer: AtomicU64,
}

impl Devices for ToyDevices {
    fn save(&self) -> Result<Vec<DeviceSection>, GuestError> {
        Ok(vec![
            DeviceSection { name: "serial0".into(), version: 1, data: self.serial.lock().unwrap().clone() },
            DeviceSection {
                name: "timer".into(),
                version: 3,
                data: self.timer.load(Ordering::SeqCst).to_le_bytes().to_vec(),
            },
        ])
    }
    fn restore(&self, sections: &[DeviceSection]) -> Result<(), GuestError> {
        let find = |name: &str, version: u32| {
            let s = sections.iter().find(|s| s.name == name);
            s.filter(|s| s.version == version)
                .ok_or_else(|| GuestError::BadState(format!("no {name} section of version {version}")))
        };
        *self.serial.lock().unwrap() = find("serial0", 1)?.data.clone();
        let t: [u8; 8] =
            find("timer", 3)?.data.as_slice().try_into().map_err(|_| GuestError::BadState("timer".into()))?;
        self.timer.store(u64::from_le_bytes(t), Ordering::SeqCst);
        Ok(())
    }
}

fn memory(layout: &MemoryLayout) -> Result<Mem, GuestError> {
    let ranges: Vec<(GuestAddress, usize)> =
        layout.regions.iter().map(|&(a, l)| (GuestAddress(a), usize_from(l))).collect();
    Mem::from_ranges(&ranges).map_err(|e| GuestError::BadState(format!("vm-memory: {e}")))
}

/// A destination host: waits for one migration on `listener` into a fresh toy VM (paused until the commit), and
/// returns the VM, its vCPU and devices.
fn destination(
    listener: TcpListener,
    security: livemig::transport::tls::DestSecurity,
) -> std::thread::JoinHandle<Result<Received, Error>> {
    std::thread::spawn(move || {
        let opts = DestOptions::default();
        let (control, hello) = accept_migration(&listener, &opts, &security, &|_, _| {})?;
        let parts = Mutex::new(None);
        let make = |h: &livemig::transport::wire::Hello| {
            let mem = memory(&h.layout)?;
            let (vcpu, devices) = (ToyVcpu::start(mem.clone(), true), Arc::new(ToyDevices::default()));
            *parts.lock().unwrap() = Some((vcpu.clone(), devices.clone()));
            Ok(VmMemoryGuest::new(mem, vcpu, h.vcpus, "toy-vmm")?.with_devices(Box::new(SharedDevices(devices))))
        };
        let result = receive(&[&listener], &control, hello, make, &opts, &security, &|_, _| {});
        let parts = parts.lock().unwrap().take();
        match result {
            Ok((guest, _)) => {
                let (vcpu, devices) = parts.ok_or("no guest was built")?;
                Ok((guest, vcpu, devices))
            }
            Err(e) => {
                // What the destination built is discarded; its vCPU never ran.
                if let Some((vcpu, _)) = parts {
                    vcpu.stop();
                }
                Err(e.into())
            }
        }
    })
}

/// Devices shared between the guest (which hands them to livemig) and the VMM (which checks them).
struct SharedDevices(Arc<ToyDevices>);

impl Devices for SharedDevices {
    fn save(&self) -> Result<Vec<DeviceSection>, GuestError> {
        self.0.save()
    }
    fn restore(&self, sections: &[DeviceSection]) -> Result<(), GuestError> {
        self.0.restore(sections)
    }
}

fn check(ok: bool, what: &str) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(format!("failed: {what}").into())
    }
}

/// The first attempt: watched, changed live, then cancelled; the source must run on and the destination discard.
fn attempt_and_cancel(source: &Arc<Guest>, vcpu: &Vcpu, security: &SecurityPair) -> Result<(), Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dest = destination(listener, security.dest.clone());
    // Capped at 20 MiB/s from the start, so that round 0 (about 48 MiB) takes long enough to be watched.
    let opts = SourceOptions {
        precopy: livemig::engine::precopy::PrecopyConfig { max_bandwidth: Some(20 << 20), ..Default::default() },
        ..Default::default()
    };
    let m = Migration::start(
        source.clone(),
        TcpStream::connect(addr)?,
        Links::Connect(vec![]),
        opts,
        security.source.clone(),
    )?;
    let events = m.events().clone();
    let t = Instant::now();
    while m.status().throughput_bps == 0.0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = m.status();
    println!(
        "running: phase {}, round {}, {} pages left, {:.1} MiB/s, ETA {:?} s",
        s.phase,
        s.round,
        s.remaining_pages,
        s.throughput_bps / 1048576.0,
        s.eta_s.map(|e| (e * 10.0).round() / 10.0)
    );
    check(s.phase == "precopy" && s.throughput_bps > 0.0, "the status shows pre-copy under way")?;
    m.set_downtime_target(Duration::from_millis(50))?;
    m.set_max_bandwidth(Some(10 << 20))?;
    check(m.set_max_throttle(150.0).is_err(), "a throttle ceiling of 150 % is refused")?;
    std::thread::sleep(Duration::from_millis(300));
    let s = m.status();
    println!(
        "changed: downtime target {} ms, cap {:?} B/s, throughput {:.1} MiB/s",
        s.downtime_target_ms,
        s.max_bandwidth,
        s.throughput_bps / 1048576.0
    );
    check(s.downtime_target_ms == 50.0 && s.max_bandwidth == Some(10 << 20), "the live changes show in the status")?;
    m.cancel();
    let report = m.wait();
    println!("cancelled: {}", report.result.as_ref().err().map_or("-".into(), ToString::to_string));
    check(report.status() == "cancelled", "the first attempt ends cancelled")?;
    let seen: Vec<MigrationEvent> = events.iter().collect();
    let changed = |c: &dyn Fn(&livemig::transport::source::Change) -> bool| {
        seen.iter().any(|e| matches!(e, MigrationEvent::Changed(x) if c(x)))
    };
    check(changed(&|c| matches!(c, livemig::transport::source::Change::DowntimeTarget(_))), "a downtime-target event")?;
    check(changed(&|c| matches!(c, livemig::transport::source::Change::MaxBandwidth(_))), "a bandwidth-cap event")?;
    check(
        matches!(seen.last(), Some(MigrationEvent::Finished { status: "cancelled", .. })),
        "the last event says cancelled",
    )?;
    check(dest.join().expect("destination thread").is_err(), "the destination discarded the cancelled migration")?;
    // The guest runs on, unthrottled.
    let before = vcpu.counter.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    check(!vcpu.is_paused() && vcpu.throttle.load(Ordering::SeqCst) == 0, "the source runs unthrottled")?;
    check(vcpu.counter.load(Ordering::SeqCst) > before, "the source's vCPU keeps writing")?;
    Ok(())
}

/// Fills memory with data that does not compress, so that the bandwidth cap is what paces the copy.
fn fill(mem: &Mem) -> Result<(), Error> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut page = vec![0u8; 4096];
    for &(base, len) in &REGIONS {
        for off in (0..len).step_by(4096) {
            for w in page.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            mem.write_slice(&page, GuestAddress(base + off))?;
        }
    }
    Ok(())
}

pub fn main() -> Result<(), Error> {
    let layout = MemoryLayout { regions: REGIONS.to_vec() };
    let mem = memory(&layout)?;
    fill(&mem)?;
    let vcpu = ToyVcpu::start(mem.clone(), false);
    let devices = Arc::new(ToyDevices::default());
    *devices.serial.lock().unwrap() = b"login: ".to_vec();
    devices.timer.store(123_456_789, Ordering::SeqCst);
    let source = Arc::new(
        VmMemoryGuest::new(mem, vcpu.clone(), 1, "toy-vmm")?.with_devices(Box::new(SharedDevices(devices.clone()))),
    );
    let security = SecurityPair::throwaway()?;

    attempt_and_cancel(&source, &vcpu, &security)?;

    // The second attempt, uncapped, to the end.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dest = destination(listener, security.dest.clone());
    let m = Migration::start(
        source.clone(),
        TcpStream::connect(addr)?,
        Links::Connect(vec![]),
        SourceOptions::default(),
        security.source.clone(),
    )?;
    let report = m.wait();
    report.result.as_ref().map_err(|e| format!("the second attempt: {e}"))?;
    let (dest_guest, dest_vcpu, dest_devices) = dest.join().expect("destination thread")?;
    let at_pause = vcpu.counter.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    dest_vcpu.pause();
    let now = dest_vcpu.counter.load(Ordering::SeqCst);
    check(now > at_pause, "the destination's vCPU carries on from the source's counter")?;
    check(
        *dest_devices.serial.lock().unwrap() == b"login: " && dest_devices.timer.load(Ordering::SeqCst) == 123_456_789,
        "both devices restored",
    )?;
    // Memory equal page by page, but for the pages the destination's vCPU wrote since it resumed.
    let written_since: std::collections::HashSet<u64> = (at_pause + 1..=now).collect();
    let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
    let mut differing = 0;
    for &(base, len) in &REGIONS {
        for off in (0..len).step_by(4096) {
            source.memory_mmap().read_slice(&mut a, GuestAddress(base + off))?;
            dest_guest.memory_mmap().read_slice(&mut b, GuestAddress(base + off))?;
            let v = u64::from_le_bytes(b[..8].try_into()?);
            if a != b && !written_since.contains(&v) {
                differing += 1;
            }
        }
    }
    check(differing == 0, "memory equal on both sides")?;
    let p = &report.downtime_parts;
    println!(
        "migrated {} pages in {:.3} s ({} rounds, downtime {:.1} ms: devices {:.2} ms for {} sections, verified {}); \
         vCPU counter {at_pause} at the pause, {now} on the destination",
        source.total_pages(),
        report.total_time.as_secs_f64(),
        report.rounds.len(),
        report.downtime.unwrap_or_default().as_secs_f64() * 1e3,
        p.device_state.as_secs_f64() * 1e3,
        report.device_sections.len(),
        report.verified
    );
    vcpu.stop();
    dest_vcpu.stop();
    Ok(())
}
