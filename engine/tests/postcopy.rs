//! Post-copy on the destination with real faults: a thread stands in for a vCPU and touches guest memory taken under
//! userfaultfd; pages arrive through the receiver as they would from the urgent path and from the push.

use livemig_engine::dirty::Bitmap;
use livemig_engine::encode::{page_hash, zero_page_hash, Codec, PageEntry};
use livemig_engine::guest::uffd::Uffd;
use livemig_engine::guest::{host_pages, MemoryLayout, SyntheticGuest, PAGE_SIZE};
use livemig_engine::receive::postcopy::{discard, discard_touched, Fault, Postcopy};
use livemig_engine::receive::{ApplyState, Receiver};
use std::sync::Arc;
use std::time::Duration;

const PAGES: u64 = 64;

fn guest() -> Option<SyntheticGuest> {
    if let Err(e) = Uffd::new() {
        println!("SKIPPED: userfaultfd unavailable here ({e})");
        return None;
    }
    Some(SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, PAGES * PAGE_SIZE as u64)] }, 1).unwrap())
}

fn raw(page: u64, data: &[u8]) -> (PageEntry, &[u8]) {
    (PageEntry::new(page, Codec::Raw, 4096, page_hash(data)), data)
}

/// A "vCPU": reads byte 0 of `page` (faulting if it is missing), then writes `mark` at byte 100 unless it is None.
/// Returns what it read.
fn touch(g: &SyntheticGuest, page: u64, mark: Option<u8>) -> std::thread::JoinHandle<u8> {
    let addr = host_pages(g, page, 1).unwrap().0 as usize;
    std::thread::spawn(move || {
        let p = addr as *mut u8;
        // SAFETY: one page of the guest's live mapping, which outlives the thread (joined by the test); the test
        // touches it through the receiver only once this thread has been woken.
        unsafe {
            let seen = p.read_volatile();
            if let Some(m) = mark {
                p.add(100).write_volatile(m);
            }
            seen
        }
    })
}

fn faults(pc: &Postcopy) -> Vec<Fault> {
    for _ in 0..100 {
        let f = pc.next_faults(Duration::from_millis(50), 16).unwrap();
        if !f.is_empty() {
            return f;
        }
    }
    panic!("no fault within 5 s")
}

fn read_byte(g: &SyntheticGuest, page: u64, at: usize) -> u8 {
    // SAFETY: one byte of a page of the guest's live mapping, present by now (placed before this is called).
    unsafe { host_pages(g, page, 1).unwrap().0.add(at).read_volatile() }
}

/// Pre-copy left an old copy (`fill` bytes) of page `page`; it was dirtied again, so it is missing at the switch: the
/// old copy dropped, guest memory armed, and the receiver placing through it.
fn switched(g: &SyntheticGuest, rx: &Receiver<'_>, st: &mut ApplyState, page: u64, fill: u8) -> Arc<Postcopy> {
    let old = [fill; PAGE_SIZE];
    let (e, d) = raw(page, &old);
    rx.apply(0, &e, d, st).unwrap();
    let mut missing = Bitmap::new(PAGES);
    missing.set(page);
    discard(g, &missing);
    let pc = Arc::new(Postcopy::arm(g, &missing).unwrap());
    assert!(rx.set_placer(pc.clone()));
    pc
}

#[test]
fn a_page_pulled_and_also_pushed_is_placed_once_and_keeps_the_guests_write() {
    let Some(g) = guest() else { return };
    let rx = Receiver::new(&g);
    let mut st = ApplyState::default();
    let pc = switched(&g, &rx, &mut st, 5, 0xAA);
    let vcpu = touch(&g, 5, Some(0xEE));
    assert_eq!(faults(&pc), [Fault::Request(5)], "a touch of a missing page asks for it");
    // The urgent copy arrives first and wakes the vCPU, which writes the page.
    let new = vec![0xBBu8; PAGE_SIZE];
    let (e, d) = raw(5, &new);
    rx.apply(1, &e, d, &mut st).unwrap();
    assert_eq!(vcpu.join().unwrap(), 0xBB, "the vCPU saw the new copy, never the stale one");
    assert_eq!(read_byte(&g, 5, 100), 0xEE);
    // The push's copy of the same page, in flight meanwhile, lands after: it must not overwrite the guest's write.
    rx.apply(1, &e, d, &mut st).unwrap();
    assert_eq!(read_byte(&g, 5, 100), 0xEE, "the pushed copy overwrote a write the guest made");
    let s = pc.stats();
    assert_eq!((s.placed, s.already_present, s.faults, pc.remaining()), (1, 1, 1, 0));
    assert!(s.latency_us[2] > 0.0 && s.histogram.iter().sum::<u64>() == 1, "{s:?}");
    // The table records the copy the source sent, as the source's does.
    assert_eq!(rx.hashes().get(5), Some(page_hash(&new)));
    pc.finish();
}

#[test]
fn faults_on_zero_pages_are_served_with_zeros() {
    let Some(g) = guest() else { return };
    let rx = Receiver::new(&g);
    let mut st = ApplyState::default();
    let pc = switched(&g, &rx, &mut st, 9, 0x11);
    // Page 7 was never sent (zero on the source) and is not missing: placed here as zeros, nothing asked.
    let vcpu = touch(&g, 7, None);
    assert_eq!(faults(&pc), [Fault::Zero(7)]);
    assert_eq!(vcpu.join().unwrap(), 0);
    // Page 9 is missing and the source's copy is a zero page now: it comes as one, and the stale bytes are gone.
    let vcpu = touch(&g, 9, None);
    assert_eq!(faults(&pc), [Fault::Request(9)]);
    rx.apply(1, &PageEntry::new(9, Codec::Zero, 0, zero_page_hash()), &[], &mut st).unwrap();
    assert_eq!(vcpu.join().unwrap(), 0, "a missing zero page must read as zeros, not as its old copy");
    let s = pc.stats();
    assert_eq!((s.zero_faults, s.faults, s.placed, pc.remaining()), (1, 1, 1, 0));
    pc.finish();
}

#[test]
fn a_missing_page_read_before_the_switch_still_faults() {
    let Some(g) = guest() else { return };
    let rx = Receiver::new(&g);
    let mut st = ApplyState::default();
    let (e, d) = raw(3, &[0x33u8; PAGE_SIZE]);
    rx.apply(0, &e, d, &mut st).unwrap();
    let mut missing = Bitmap::new(PAGES);
    missing.set(3);
    discard(&g, &missing);
    // Something reads the dropped page before the switch (a restore that looks at guest memory): the kernel maps
    // the zero page there, which a missing-mode registration would take for present.
    assert_eq!(read_byte(&g, 3, 0), 0);
    assert_eq!(discard_touched(&g, &missing).unwrap(), 1, "the page that came back is dropped again");
    let pc = Arc::new(Postcopy::arm(&g, &missing).unwrap());
    rx.set_placer(pc.clone());
    let vcpu = touch(&g, 3, None);
    assert_eq!(faults(&pc), [Fault::Request(3)], "the page must fault, not read as zeros");
    let (e, d) = raw(3, &[0x44u8; PAGE_SIZE]);
    rx.apply(1, &e, d, &mut st).unwrap();
    assert_eq!(vcpu.join().unwrap(), 0x44);
    pc.finish();
}
