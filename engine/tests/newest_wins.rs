//! Invariant 1, newest wins, as a property: copies of a few pages from several rounds, each in a batch of its own,
//! dealt to several links (threads applying at once) in any order, with any codec. Whatever arrives last, every page
//! ends holding its newest round's content, and the receiver's table holds that content's hash.

use livemig_engine::encode::{page_hash, zero_page_hash, Codec, PageEntry};
use livemig_engine::guest::{read_page, MemoryLayout, SyntheticGuest, PAGE_SIZE};
use livemig_engine::num::{u32_len, usize_from};
use livemig_engine::receive::{ApplyError, ApplyState, InPlaceError, Receiver};
use proptest::prelude::*;

const PAGES: u64 = 4;

/// Round `epoch`'s content of `page`: every third round writes zeros (a zero page overwriting data must win too).
fn content(page: u64, epoch: u32) -> Vec<u8> {
    if epoch % 3 == 2 {
        return vec![0; PAGE_SIZE];
    }
    let seed = (page * 31 + u64::from(epoch) * 7 + 1).to_le_bytes()[0];
    (0..PAGE_SIZE).map(|i| seed.wrapping_mul(i.to_le_bytes()[0] | 1).wrapping_add((i / 64).to_le_bytes()[0])).collect()
}

/// Applies one copy as a data link would: raw pages read in place, lz4 and zero pages decoded from a buffer. A page
/// another link is reading in place is busy: like the destination's links, try the same frame again until it is not.
fn apply_copy(rx: &Receiver<'_>, link: u32, page: u64, epoch: u32, lz4: bool, st: &mut ApplyState) {
    let data = content(page, epoch);
    let hash = page_hash(&data);
    loop {
        let r = if data.iter().all(|&b| b == 0) {
            let e = PageEntry::new(page, Codec::Zero, 0, zero_page_hash());
            rx.apply_frame(epoch, &[e], &[], &[], st).map_err(InPlaceError::Apply)
        } else if lz4 {
            let block = lz4_flex::block::compress(&data);
            let e = PageEntry::new(page, Codec::Lz4, u32::try_from(block.len()).unwrap(), hash);
            rx.apply_frame(epoch, &[e], &block, &[], st).map_err(InPlaceError::Apply)
        } else {
            let e = PageEntry::new(page, Codec::Raw, livemig_engine::guest::PAGE_LEN, hash);
            rx.apply_frame_in_place(epoch, &[e], 0, link, st, |iov| {
                let mut off = 0;
                for b in iov.iter_mut() {
                    let n = b.len();
                    b.copy_from_slice(&data[off..off + n]);
                    off += n;
                }
                Ok(())
            })
        };
        match r {
            Err(InPlaceError::Apply(ApplyError::Busy { .. })) => std::thread::yield_now(),
            r => return r.unwrap(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn the_newest_epoch_wins_in_any_order_on_any_link(
        copies in prop::collection::vec((0..PAGES, 0u32..7, any::<bool>()), 1..32),
        links in 1usize..5,
        deal in any::<u64>(),
    ) {
        let guest = SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, PAGES * PAGE_SIZE as u64)] }, 1)
            .unwrap();
        let rx = Receiver::new(&guest);
        // Deal the copies to the links; each link applies its share in the order given, all links at once.
        let mut shares: Vec<Vec<(u64, u32, bool)>> = vec![Vec::new(); links];
        for (i, c) in copies.iter().enumerate() {
            shares[(usize_from(deal >> (i % 32 * 2)) + i) % links].push(*c);
        }
        std::thread::scope(|s| {
            for (link, share) in shares.iter().enumerate() {
                let rx = &rx;
                s.spawn(move || {
                    let mut st = ApplyState::default();
                    for &(page, epoch, lz4) in share {
                        apply_copy(rx, u32_len(link), page, epoch, lz4, &mut st);
                    }
                });
            }
        });
        let mut held = vec![0u8; PAGE_SIZE];
        for page in 0..PAGES {
            read_page(&guest, page, &mut held).unwrap();
            let newest = copies.iter().filter(|c| c.0 == page).map(|c| c.1).max();
            let want = newest.map_or_else(|| vec![0u8; PAGE_SIZE], |e| content(page, e));
            prop_assert!(held == want, "page {} holds another round's copy than {:?}", page, newest);
            prop_assert_eq!(rx.hashes().get(page), Some(page_hash(&want)));
        }
    }
}
