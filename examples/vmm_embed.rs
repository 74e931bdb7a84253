//! How a VMM built on rust-vmm embeds livemig: guest memory is `vm_memory::GuestMemoryMmap<AtomicBitmap>` (two
//! regions, one above 4 GiB), a vCPU thread writes it through vm-memory's `Bytes` API (which marks the dirty bitmap),
//! and `VmMemoryGuest` adapts both to livemig. The migration runs over loopback while the vCPU keeps writing; at the
//! end the two memories are compared page by page and the destination's vCPU carries on from the source's counter.

use livemig::engine::guest::{GuestError, GuestMemory as _, MemoryLayout, Vcpus};
use livemig::engine::num::{u64_saturating, usize_from};
use livemig::kvm::vm_memory::VmMemoryGuest;
use livemig::transport::dest::{accept_migration, receive, DestOptions};
use livemig::transport::link::LinkSpec;
use livemig::transport::source::{migrate, SourceOptions};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

/// The toy VMM's one vCPU: writes a counter into pages of guest memory, 5000 a second.
struct ToyVcpu {
    counter: Arc<AtomicU64>,
    paused: Arc<(Mutex<(bool, bool)>, Condvar)>, // (paused, parked)
    stop: Arc<AtomicBool>,
    throttle: AtomicU64,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ToyVcpu {
    fn start(mem: Mem, paused: bool) -> ToyVcpu {
        let counter = Arc::new(AtomicU64::new(0));
        let ctl = Arc::new((Mutex::new((paused, false)), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, p, s) = (counter.clone(), ctl.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let pages: Vec<u64> = [(0u64, 32u64 << 20), (1 << 32, 16 << 20)]
                .iter()
                .flat_map(|&(base, len)| (0..len / 4096).map(move |i| base + i * 4096))
                .collect();
            while !s.load(Ordering::SeqCst) {
                {
                    let (lock, cv) = &*p;
                    let mut st = lock.lock().unwrap();
                    st.1 = st.0;
                    cv.notify_all();
                    while st.0 && !s.load(Ordering::SeqCst) {
                        st = cv.wait(st).unwrap();
                    }
                    st.1 = false;
                }
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                let page = pages[usize_from(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % pages.len() as u64)];
                // The write marks the page dirty in the region's AtomicBitmap, after the write.
                mem.write_obj(n, GuestAddress(page)).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        ToyVcpu { counter, paused: ctl, stop, throttle: AtomicU64::new(0), thread: Some(thread) }
    }
}

impl Drop for ToyVcpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.paused.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Vcpus for ToyVcpu {
    fn set_throttle(&self, pct: f64) {
        self.throttle.store(u64_saturating(pct), Ordering::Relaxed);
    }
    fn throttle(&self) -> f64 {
        self.throttle.load(Ordering::Relaxed) as f64
    }
    fn pause(&self) {
        let (lock, cv) = &*self.paused;
        let mut st = lock.lock().unwrap();
        st.0 = true;
        while !st.1 {
            st = cv.wait(st).unwrap();
        }
    }
    fn resume(&self) {
        let (lock, cv) = &*self.paused;
        lock.lock().unwrap().0 = false;
        cv.notify_all();
    }
    fn is_paused(&self) -> bool {
        self.paused.0.lock().unwrap().0
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

fn memory(layout: &MemoryLayout) -> Result<Mem, GuestError> {
    let ranges: Vec<(GuestAddress, usize)> =
        layout.regions.iter().map(|&(a, l)| (GuestAddress(a), usize_from(l))).collect();
    Mem::from_ranges(&ranges).map_err(|e| GuestError::BadState(format!("vm-memory: {e}")))
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layout = MemoryLayout { regions: vec![(0, 32 << 20), (1 << 32, 16 << 20)] };
    let mem = memory(&layout)?;
    let source = VmMemoryGuest::new(mem.clone(), ToyVcpu::start(mem, false), "toy-vmm")?;
    std::thread::sleep(Duration::from_millis(100)); // let the vCPU write something first

    let security = livemig::transport::tls::SecurityPair::throwaway()?;
    let dest_security = security.dest.clone();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let destination = std::thread::spawn(move || {
        let opts = DestOptions::default();
        let (control, hello) = accept_migration(&listener, &opts, &dest_security, &|_, _| {})?;
        let make = |h: &livemig::transport::wire::Hello| {
            let mem = memory(&h.layout)?;
            VmMemoryGuest::new(mem.clone(), ToyVcpu::start(mem, true), "toy-vmm")
        };
        let (guest, _) = receive(&[&listener], &control, hello, make, &opts, &dest_security, &|_, _| {})?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(guest)
    });
    let links = [LinkSpec::to(addr)];
    let report =
        migrate(&source, TcpStream::connect(addr)?, &links, &SourceOptions::default(), &security.source, &|_| {});
    report.result?;
    let dest = destination.join().expect("destination thread").map_err(|e| e.to_string())?;

    // The source's vCPU is stopped for good; the destination's resumed from the source's counter.
    let at_pause = source.vcpus_impl().counter.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    dest.vcpus_impl().pause();
    let now = dest.vcpus_impl().counter.load(Ordering::SeqCst);
    assert!(now > at_pause, "the destination vCPU did not continue from {at_pause}");
    // Compare memory page by page, except the pages the destination's vCPU wrote since it resumed.
    let written_since: std::collections::HashSet<u64> = (at_pause + 1..=now).collect();
    let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
    let mut differing = 0;
    for &(base, len) in &layout.regions {
        for off in (0..len).step_by(4096) {
            source.memory_mmap().read_slice(&mut a, GuestAddress(base + off))?;
            dest.memory_mmap().read_slice(&mut b, GuestAddress(base + off))?;
            let v = u64::from_le_bytes(b[..8].try_into()?);
            if a != b && !written_since.contains(&v) {
                differing += 1;
            }
        }
    }
    assert_eq!(differing, 0, "pages differ between source and destination");
    println!(
        "vm-memory guest of {} pages migrated in {:.3} s ({} rounds, downtime {:.1} ms, verified {}); vCPU counter \
         {at_pause} at the pause, {now} on the destination",
        source.total_pages(),
        report.total_time.as_secs_f64(),
        report.rounds.len(),
        report.downtime.unwrap_or_default().as_secs_f64() * 1e3,
        report.verified
    );
    Ok(())
}
