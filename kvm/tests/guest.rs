//! The KVM test guest on a real vCPU: it runs, proves its memory, pauses, and continues on a fresh VM from its saved
//! state. Prints a visible skip where /dev/kvm is missing.

use livemig_engine::dirty::Bitmap;
use livemig_engine::guest::{read_page, write_page, DirtyLog, GuestMemory, Vcpus, PAGE_SIZE};
use livemig_kvm::{available, DirtyLogMethod, KvmConfig, KvmGuest};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn skip(test: &str) -> bool {
    if available() {
        return false;
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: /dev/kvm is not available");
    true
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_guest_runs_proves_its_memory_and_moves_to_a_fresh_vm() {
    if skip("kvm guest") {
        return;
    }
    for method in [DirtyLogMethod::GetLog, DirtyLogMethod::ManualClear] {
        let g = KvmGuest::new(&KvmConfig {
            memory_bytes: 64 << 20,
            touched_pct: 75.0,
            dirty_rate: 20_000,
            hot_set_pct: 10.0,
            dirty_log: method,
            cpu_model: None,
        })
        .unwrap();
        wait_for("two self-checks", || g.reports().checks_ok.load(Ordering::Relaxed) >= 2);
        assert_eq!(g.reports().checks_bad.load(Ordering::Relaxed), 0);
        // The dirty log sees the guest's writes.
        let mut bm = Bitmap::new(g.total_pages());
        g.harvest(&mut bm).unwrap();
        assert!(bm.count_ones() > 10, "{method:?}: {} dirty pages", bm.count_ones());
        g.pause();
        let at_pause = g.counter();
        assert!(at_pause > 0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(g.counter(), at_pause, "a paused guest wrote memory");
        let blob = g.save_state().unwrap();
        // A fresh VM, its memory copied page by page, its vCPU restored.
        let d = KvmGuest::destination(&g.layout(), None).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..g.total_pages() {
            read_page(&g, p, &mut page).unwrap();
            // SAFETY: the new VM's vCPU has not run yet, and this loop is the only writer of its memory.
            unsafe { write_page(&d, p, &page) }.unwrap();
        }
        d.restore_state(&blob).unwrap();
        d.resume();
        wait_for("progress on the new VM", || d.counter() > at_pause + 1000);
        wait_for("a self-check on the new VM", || d.reports().checks_ok.load(Ordering::Relaxed) >= 1);
        assert_eq!(d.reports().checks_bad.load(Ordering::Relaxed), 0, "{method:?}");
        assert!(d.failure().is_none(), "{:?}", d.failure());
        assert!(g.failure().is_none(), "{:?}", g.failure());
    }
}

#[test]
fn a_page_the_guest_did_not_write_changing_under_it_is_caught_by_its_self_check() {
    if skip("kvm self-check") {
        return;
    }
    let g = KvmGuest::new(&KvmConfig {
        memory_bytes: 16 << 20,
        touched_pct: 75.0,
        dirty_rate: 20_000,
        hot_set_pct: 10.0,
        dirty_log: DirtyLogMethod::GetLog,
        cpu_model: None,
    })
    .unwrap();
    wait_for("a self-check", || g.reports().checks_ok.load(Ordering::Relaxed) >= 1);
    g.pause();
    // Corrupt the first word of a data page behind the guest's back.
    let p = livemig_kvm::program::DATA / PAGE_SIZE as u64 + 7;
    let mut page = vec![0u8; PAGE_SIZE];
    read_page(&g, p, &mut page).unwrap();
    page[0] ^= 0x5a;
    // SAFETY: the guest's vCPU is paused, and nothing else writes its memory.
    unsafe { write_page(&g, p, &page) }.unwrap();
    g.resume();
    wait_for("a failed self-check", || g.reports().checks_bad.load(Ordering::Relaxed) >= 1);
}
