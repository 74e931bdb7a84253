use super::*;
use crate::guest::{read_page, MemoryLayout, SyntheticGuest};

fn dest(pages: u64) -> SyntheticGuest {
    SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, pages * PAGE_SIZE as u64)] }, 1).unwrap()
}

fn raw(page: u64, content: &[u8]) -> PageEntry {
    PageEntry::new(page, Codec::Raw, crate::guest::PAGE_LEN, page_hash(content))
}

fn zero(page: u64) -> PageEntry {
    PageEntry::new(page, Codec::Zero, 0, zero_page_hash())
}

#[test]
fn newest_epoch_wins_in_any_arrival_order() {
    let g = dest(4);
    let r = Receiver::new(&g);
    let mut st = ApplyState::default();
    let (old, new) = (vec![1u8; PAGE_SIZE], vec![2u8; PAGE_SIZE]);
    assert_eq!(r.apply(3, &raw(1, &new), &new, &mut st).unwrap(), Applied::Written);
    assert_eq!(r.apply(2, &raw(1, &old), &old, &mut st).unwrap(), Applied::Stale);
    let mut out = vec![0u8; PAGE_SIZE];
    read_page(&g, 1, &mut out).unwrap();
    assert_eq!(out, new);
    assert_eq!(r.hashes().get(1), Some(page_hash(&new)));
    // A zero page from a later round overwrites data.
    r.apply(4, &zero(1), &[], &mut st).unwrap();
    read_page(&g, 1, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0));
    assert_eq!(r.hashes().get(1), Some(zero_page_hash()));
}

#[test]
fn bad_entries_get_their_own_errors() {
    let g = dest(4);
    let r = Receiver::new(&g);
    let mut st = ApplyState::default();
    let page = vec![7u8; PAGE_SIZE];
    assert_eq!(r.apply(0, &raw(4, &page), &page, &mut st), Err(ApplyError::PageOutOfRange { page: 4, pages: 4 }));
    let short = PageEntry { len: 100, ..raw(0, &page) };
    assert!(matches!(r.apply(0, &short, &page[..100], &mut st), Err(ApplyError::BadLength { len: 100, .. })));
    let zero_with_data = PageEntry { len: 5, ..zero(0) };
    assert!(matches!(r.apply(0, &zero_with_data, &page[..5], &mut st), Err(ApplyError::BadLength { .. })));
    let garbage = PageEntry::new(0, Codec::Lz4, 16, 0);
    assert!(matches!(r.apply(0, &garbage, &[0xff; 16], &mut st), Err(ApplyError::Decompress { .. })));
    // A valid lz4 block of the wrong size.
    let small = lz4_flex::block::compress(&[1u8; 100]);
    let e = PageEntry::new(0, Codec::Lz4, crate::num::u32_len(small.len()), 0);
    assert!(matches!(r.apply(0, &e, &small, &mut st), Err(ApplyError::Decompress { .. })));
}

#[test]
fn corrupt_payloads_never_reach_memory() {
    let g = dest(2);
    let r = Receiver::new(&g);
    let mut st = ApplyState::default();
    let good = vec![9u8; PAGE_SIZE];
    let mut bad = good.clone();
    bad[100] ^= 1;
    let err = r.apply(0, &raw(1, &good), &bad, &mut st).unwrap_err();
    assert!(matches!(err, ApplyError::BadChecksum { page: 1, .. }), "{err}");
    let mut out = vec![1u8; PAGE_SIZE];
    read_page(&g, 1, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0), "corrupt page was written");
    assert_eq!(r.hashes().get(1), Some(zero_page_hash()));
    // The same page, intact and from the same round, is still accepted afterwards.
    assert_eq!(r.apply(0, &raw(1, &good), &good, &mut st).unwrap(), Applied::Written);
}

#[test]
fn a_zstd_frame_decodes_to_exactly_its_pages() {
    let g = dest(4);
    let r = Receiver::new(&g);
    let mut st = ApplyState::default();
    let (a, b) = (vec![3u8; PAGE_SIZE], vec![4u8; PAGE_SIZE]);
    let frame = zstd::bulk::compress(&[a.clone(), b.clone()].concat(), 3).unwrap();
    let entries = [
        PageEntry::new(0, Codec::Zstd, 0, page_hash(&a)),
        raw(1, &a),
        PageEntry::new(2, Codec::Zstd, 0, page_hash(&b)),
    ];
    r.apply_frame(0, &entries, &a, &frame, &mut st).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    read_page(&g, 2, &mut out).unwrap();
    assert_eq!(out, b);
    assert_eq!((st.counts.zstd, st.counts.raw), (2, 1));
    // One zstd page too many or too few for the frame, a corrupt frame, or a frame without zstd pages.
    let one = [entries[0]];
    assert!(matches!(r.apply_frame(0, &one, &[], &frame, &mut st), Err(ApplyError::Zstd { pages: 1, .. })));
    let three = [entries[0], entries[2], PageEntry::new(3, Codec::Zstd, 0, 0)];
    assert!(matches!(r.apply_frame(0, &three, &[], &frame, &mut st), Err(ApplyError::Zstd { pages: 3, .. })));
    let mut bad = frame.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    let two = [entries[0], entries[2]];
    let res = r.apply_frame(1, &two, &[], &bad, &mut st);
    assert!(matches!(res, Err(ApplyError::Zstd { .. } | ApplyError::BadChecksum { .. })), "{res:?}");
    assert!(matches!(r.apply_frame(0, &[raw(1, &a)], &a, &frame, &mut st), Err(ApplyError::Zstd { pages: 0, .. })));
    let many: Vec<PageEntry> = (0..MAX_ZSTD_PAGES as u64 + 1).map(|_| PageEntry::new(0, Codec::Zstd, 0, 0)).collect();
    let res = r.apply_frame(0, &many, &[], &frame, &mut st);
    assert!(matches!(res, Err(ApplyError::Zstd { .. })), "{res:?}");
}

#[test]
fn a_live_page_that_changed_in_flight_is_applied_with_the_hash_of_what_arrived() {
    let g = dest(2);
    let r = Receiver::new(&g);
    let mut st = ApplyState::default();
    let (hashed, sent) = (vec![5u8; PAGE_SIZE], vec![6u8; PAGE_SIZE]);
    let live = PageEntry { live: true, ..raw(0, &hashed) };
    assert_eq!(r.apply(0, &live, &sent, &mut st).unwrap(), Applied::Written);
    assert_eq!((st.torn, r.hashes().get(0)), (1, Some(page_hash(&sent))));
    // The same bytes on a page that was copied before hashing are corruption.
    let copied = raw(1, &hashed);
    assert!(matches!(r.apply(0, &copied, &sent, &mut st), Err(ApplyError::BadChecksum { page: 1, .. })));
}

/// A reader that fills the frame's buffers from `bytes`, in order.
fn from(bytes: Vec<u8>) -> impl FnOnce(&mut [std::io::IoSliceMut<'_>]) -> std::io::Result<()> {
    move |iov| {
        let mut off = 0;
        for b in iov.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&bytes[off..off + n]);
            off += n;
        }
        assert_eq!(off, bytes.len(), "the buffers cover the payload exactly");
        Ok(())
    }
}

#[test]
fn a_frame_read_in_place_lands_in_guest_memory_and_stale_copies_are_dropped() {
    let g = dest(4);
    let r = Receiver::new(&g);
    let mut st = ApplyState::default();
    let (a, b, c) = (vec![1u8; PAGE_SIZE], vec![2u8; PAGE_SIZE], vec![3u8; PAGE_SIZE]);
    let lz = lz4_flex::block::compress(&c);
    let z = zstd::bulk::compress(&a, 3).unwrap();
    let entries = [
        raw(0, &a),
        PageEntry::new(1, Codec::Lz4, crate::num::u32_len(lz.len()), page_hash(&c)),
        zero(2),
        raw(3, &b),
        PageEntry::new(2, Codec::Zstd, 0, page_hash(&a)),
    ];
    let payload = [a.clone(), lz.clone(), b.clone(), z.clone()].concat();
    r.apply_frame_in_place(1, &entries, z.len(), 0, &mut st, from(payload)).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    for (page, want) in [(0, &a), (1, &c), (2, &a), (3, &b)] {
        read_page(&g, page, &mut out).unwrap();
        assert_eq!(&out, want, "page {page}");
    }
    assert_eq!((st.counts.raw, st.counts.lz4, st.counts.zero, st.counts.zstd), (2, 1, 1, 1));
    // An older copy of page 0 read in place goes to scratch.
    r.apply_frame_in_place(0, &[raw(0, &b)], 0, 0, &mut st, from(b.clone())).unwrap();
    read_page(&g, 0, &mut out).unwrap();
    assert_eq!((out, st.stale), (a.clone(), 1));
    // Content that does not match a copied page's hash is refused; a live page's is recorded as it arrived.
    let err = r.apply_frame_in_place(2, &[raw(3, &a)], 0, 0, &mut st, from(c.clone())).unwrap_err();
    assert!(matches!(err, InPlaceError::Apply(ApplyError::BadChecksum { page: 3, .. })), "{err}");
    let live = PageEntry { live: true, ..raw(3, &a) };
    r.apply_frame_in_place(2, &[live], 0, 0, &mut st, from(c.clone())).unwrap();
    assert_eq!((st.torn, r.hashes().get(3)), (1, Some(page_hash(&c))));
    // A page listed twice is refused, and leaves no page busy.
    let err = r.apply_frame_in_place(3, &[raw(1, &a), raw(1, &a)], 0, 0, &mut st, from(vec![])).unwrap_err();
    assert!(matches!(err, InPlaceError::Apply(ApplyError::Duplicate { page: 1 })), "{err}");
    assert!(owner_of(r.epoch(1).unwrap().load(Ordering::SeqCst)).is_none());
}

#[test]
fn a_page_read_in_place_is_busy_to_others_until_its_owner_lets_go() {
    let g = dest(2);
    let r = Receiver::new(&g);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let page = vec![7u8; PAGE_SIZE];
    let (r, page_ref) = (&r, &page);
    std::thread::scope(|s| {
        // Link 3 starts reading page 1 in place and stalls until it is dropped.
        s.spawn(move || {
            let mut st = ApplyState::default();
            let res = r.apply_frame_in_place(0, &[raw(1, page_ref)], 0, 3, &mut st, |iov| {
                iov[0][..100].fill(0xee);
                rx.recv().unwrap();
                Err(std::io::Error::other("link dropped"))
            });
            assert!(matches!(res, Err(InPlaceError::Io(_))), "{res:?}");
        });
        while owner_of(r.epoch(1).unwrap().load(Ordering::SeqCst)).is_none() {
            std::thread::yield_now();
        }
        // The resend on another link is told who holds the page, and neither waits nor writes.
        let mut st = ApplyState::default();
        let busy = ApplyError::Busy { page: 1, owner: 3 };
        assert_eq!(r.apply(0, &raw(1, page_ref), page_ref, &mut st), Err(busy.clone()));
        let res = r.apply_frame_in_place(0, &[raw(1, page_ref)], 0, 5, &mut st, |_| panic!("read while busy"));
        assert!(matches!(&res, Err(InPlaceError::Apply(b)) if *b == busy), "{res:?}");
        assert_eq!(st.counts, PageCounts::default());
        // What the caller does about it: drop link 3. Then the resend applies the whole page.
        tx.send(()).unwrap();
        while owner_of(r.epoch(1).unwrap().load(Ordering::SeqCst)).is_some() {
            std::thread::yield_now();
        }
        assert_eq!(r.apply(0, &raw(1, page_ref), page_ref, &mut st).unwrap(), Applied::Written);
    });
    let mut out = vec![0u8; PAGE_SIZE];
    read_page(&g, 1, &mut out).unwrap();
    assert_eq!(out, page);
    assert_eq!(r.hashes().get(1), Some(page_hash(&page)));
}

#[test]
fn a_frame_stopped_by_a_busy_page_resumes_where_it_stopped() {
    let g = dest(4);
    let r = Receiver::new(&g);
    let (a, b) = (vec![1u8; PAGE_SIZE], vec![2u8; PAGE_SIZE]);
    let lz = lz4_flex::block::compress(&b);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (r, a_ref) = (&r, &a);
    std::thread::scope(|s| {
        // Link 2 holds page 1 busy until told to let go, then completes its read.
        s.spawn(move || {
            let mut st = ApplyState::default();
            r.apply_frame_in_place(0, &[raw(1, a_ref)], 0, 2, &mut st, |iov| {
                rx.recv().unwrap();
                iov[0].copy_from_slice(a_ref);
                Ok(())
            })
            .unwrap();
        });
        while owner_of(r.epoch(1).unwrap().load(Ordering::SeqCst)).is_none() {
            std::thread::yield_now();
        }
        // An in-place frame: a raw page 3, then page 0 (zero) and page 1 (lz4) from its buffers. The raw page lands
        // and page 0 applies; page 1 is busy.
        let entries =
            [raw(3, &b), zero(0), PageEntry::new(1, Codec::Lz4, crate::num::u32_len(lz.len()), page_hash(&b))];
        let mut st = ApplyState::default();
        let payload = [b.clone(), lz.clone()].concat();
        let res = r.apply_frame_in_place(1, &entries, 0, 0, &mut st, from(payload));
        assert!(matches!(res, Err(InPlaceError::Apply(ApplyError::Busy { page: 1, owner: 2 }))), "{res:?}");
        assert_eq!((st.counts.raw, st.counts.zero, st.counts.lz4), (1, 1, 0));
        tx.send(()).unwrap();
        // The same frame again: its bytes are not read twice, and only page 1 is left to apply.
        loop {
            match r.apply_frame_in_place(1, &entries, 0, 0, &mut st, |_| panic!("read twice")) {
                Err(InPlaceError::Apply(ApplyError::Busy { .. })) => std::thread::yield_now(),
                res => break res.unwrap(),
            }
        }
        assert_eq!((st.counts.raw, st.counts.zero, st.counts.lz4), (1, 1, 1));
    });
    let mut out = vec![0u8; PAGE_SIZE];
    read_page(&g, 1, &mut out).unwrap();
    assert_eq!(out, b, "the newer copy (round 1) wins over link 2's (round 0), whichever applied last");
    read_page(&g, 3, &mut out).unwrap();
    assert_eq!(out, b);
}

#[test]
fn a_page_cut_off_mid_read_or_failing_its_hash_is_recorded_as_it_now_is() {
    let g = dest(2);
    let r = Receiver::new(&g);
    let mut st = ApplyState::default();
    let (a, b) = (vec![1u8; PAGE_SIZE], vec![2u8; PAGE_SIZE]);
    r.apply(0, &raw(1, &a), &a, &mut st).unwrap();
    // A newer copy whose read dies after 100 bytes landed: nobody may resend it (a rogue link, or Verify stopped the
    // link), so the table must describe what the page holds now, or equal roots would hide a changed page.
    let res = r.apply_frame_in_place(1, &[raw(1, &b)], 0, 0, &mut st, |iov| {
        iov[0][..100].fill(0xee);
        Err(std::io::Error::other("link died"))
    });
    assert!(matches!(res, Err(InPlaceError::Io(_))), "{res:?}");
    let mut held = vec![0u8; PAGE_SIZE];
    read_page(&g, 1, &mut held).unwrap();
    assert_eq!(&held[..100], &[0xee; 100][..]);
    assert_eq!(r.hashes().get(1), Some(page_hash(&held)), "the table hides bytes that landed");
    // A copy that fails its hash after landing in place: the same.
    let res = r.apply_frame_in_place(1, &[raw(0, &a)], 0, 0, &mut st, from(b.clone()));
    assert!(matches!(res, Err(InPlaceError::Apply(ApplyError::BadChecksum { page: 0, .. }))), "{res:?}");
    assert_eq!(r.hashes().get(0), Some(page_hash(&b)), "the table hides a corrupt page that landed");
    // A resend of the whole page still applies and is recorded as usual.
    r.apply(1, &raw(1, &b), &b, &mut st).unwrap();
    assert_eq!(r.hashes().get(1), Some(page_hash(&b)));
}
