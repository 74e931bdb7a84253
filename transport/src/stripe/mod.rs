//! The stripe scheduler: spreads batches over the data links by the capacity each has shown, and takes a dead link's
//! batches back so that they can go out on the others.
//!
//! Each [`DataLink`] shows the scheduler two figures: the frame bytes it holds (queued or unacknowledged) and its
//! measured goodput. A batch goes to the link that would finish it soonest, `(held + batch) / goodput` ([`pick`]); a
//! link that has not been measured yet counts as fast as the measured ones (or 1 Gbit/s before any is measured). So a
//! 100 Mbit link beside 1 Gbit links gets about a tenth of the batches, and never holds a round back by much more than
//! one batch.

pub mod pacer;

use crate::link::data::{frame_len, DataLink, LinkLoad, Queued, QUEUE_BATCHES};
use crossbeam::channel::{bounded, Receiver, Sender};
use livemig_engine::encode::{BatchSink, EncodedBatch, BATCH_PAGES};
use pacer::Pacer;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Goodput assumed for a link before any link has been measured: 1 Gbit/s.
const PRIOR_BPS: u64 = 125_000_000;

/// The open link that would finish `bytes` more soonest, by what each holds and its goodput. An unmeasured link
/// counts as fast as the measured ones on average (or 1 Gbit/s before any is measured).
pub fn pick(links: &[LinkLoad], bytes: u64) -> Option<usize> {
    let measured: Vec<u64> = links.iter().map(|l| l.rate_bps).filter(|&r| r > 0).collect();
    let default = if measured.is_empty() { PRIOR_BPS } else { measured.iter().sum::<u64>() / measured.len() as u64 };
    links
        .iter()
        .enumerate()
        .filter(|(_, l)| l.open)
        .map(|(i, l)| {
            let rate = if l.rate_bps == 0 { default } else { l.rate_bps };
            (i, (l.held + bytes) as f64 / rate as f64)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// The scheduler, and the encoders' sink: routes each batch to the link that would finish it soonest.
pub struct Stripe {
    /// The links, in `--link` order.
    pub links: Vec<DataLink>,
    pool_tx: Sender<EncodedBatch>,
    pool: Receiver<EncodedBatch>,
    seq: AtomicU32,
    /// Batches submitted in the current round.
    pub round_batches: AtomicU32,
    /// Set when the migration is over or failed: encoders stop.
    pub abort: AtomicBool,
    /// Set after a post-copy switch: while no link takes batches but some are suspended rather than failed, or being
    /// dialled again, an encoder's batch waits for one to answer again instead of ending the round.
    pub wait_for_links: AtomicBool,
    /// The bandwidth cap over all links, which each link's writer takes its frames' slots from.
    pub pacer: Pacer,
}

impl Stripe {
    /// A scheduler over `links`.
    pub fn new(links: Vec<DataLink>, max_bandwidth: Option<u64>) -> Self {
        let (pool_tx, pool) = bounded(QUEUE_BATCHES * 4);
        Stripe {
            links,
            pool_tx,
            pool,
            seq: AtomicU32::new(0),
            round_batches: AtomicU32::new(0),
            abort: AtomicBool::new(false),
            pacer: Pacer::new(max_bandwidth),
            wait_for_links: AtomicBool::new(false),
        }
    }

    /// Where emptied batch buffers go back to.
    pub fn pool(&self) -> &Sender<EncodedBatch> {
        &self.pool_tx
    }

    /// The open link that would finish `bytes` more soonest.
    fn pick(&self, bytes: u64) -> Option<usize> {
        let loads: Vec<LinkLoad> = self.links.iter().map(DataLink::load).collect();
        pick(&loads, bytes)
    }

    /// Routes a batch (new, or taken back from a failed link) to a live link. False when every link has failed, the
    /// migration is over, or (with a deadline) no link took it in time.
    pub fn route(&self, item: Queued, deadline: Option<Instant>) -> bool {
        self.try_route(item, deadline).is_ok()
    }

    /// [`Stripe::route`], handing the batch back when no link took it.
    pub fn try_route(&self, item: Queued, deadline: Option<Instant>) -> Result<(), Queued> {
        let bytes = frame_len(&item.1);
        let mut item = item;
        loop {
            if self.abort.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() > d) {
                return Err(item);
            }
            let Some(i) = self.pick(bytes) else {
                if deadline.is_none() && self.waits_for_links() {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                return Err(item);
            };
            // A short wait, then a new choice: the chosen link may fill up, fail, or be overtaken meanwhile.
            match self.links[i].offer(item, bytes, Duration::from_millis(20)) {
                Ok(()) => return Ok(()),
                Err(back) => item = back,
            }
        }
    }
}

impl Stripe {
    /// Whether a batch no link takes should wait: post-copy, and some link may still deliver.
    fn waits_for_links(&self) -> bool {
        self.wait_for_links.load(Ordering::Relaxed) && self.links_left()
    }

    /// Whether some link may still deliver: not failed (if only suspended), or being dialled again.
    pub fn links_left(&self) -> bool {
        self.links.iter().any(|l| !l.is_failed() || l.is_dialing())
    }
}

impl BatchSink for Stripe {
    fn submit(&self, batch: EncodedBatch) -> bool {
        if self.abort.load(Ordering::Relaxed) {
            return false;
        }
        self.round_batches.fetch_add(1, Ordering::SeqCst);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.route((seq, Arc::new(batch)), None)
    }

    fn take_buffer(&self) -> EncodedBatch {
        self.pool.try_recv().unwrap_or_else(|_| EncodedBatch::with_capacity(BATCH_PAGES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(open: bool, held: u64, rate_bps: u64) -> LinkLoad {
        LinkLoad { open, held, rate_bps }
    }

    #[test]
    fn a_batch_goes_to_the_link_that_would_finish_it_soonest() {
        // 4.5 MiB at 125 MB/s takes 38 ms, 0.5 MiB at 12.5 MB/s 42 ms: the busy fast link is sooner.
        let mib = 1 << 20;
        let links = [link(true, 4 * mib, 125_000_000), link(true, 0, 12_500_000)];
        assert_eq!(pick(&links, mib / 2), Some(0));
        // Holding 5 MiB it would take 46 ms: the slow idle link is now sooner.
        let links = [link(true, 5 * mib, 125_000_000), link(true, 0, 12_500_000)];
        assert_eq!(pick(&links, mib / 2), Some(1));
    }

    #[test]
    fn closed_links_are_skipped_and_none_is_left_when_all_are() {
        let links = [link(false, 0, 125_000_000), link(true, 1 << 30, 1)];
        assert_eq!(pick(&links, 1), Some(1));
        assert_eq!(pick(&[link(false, 0, 1), link(false, 0, 1)], 1), None);
        assert_eq!(pick(&[], 1), None);
    }

    #[test]
    fn an_unmeasured_link_counts_as_fast_as_the_measured_ones() {
        // The measured ones average 100 MB/s (50 and 150), so the unmeasured one holding 1 MiB takes 10.5 ms, against
        // 12.6 ms for 0.6 MiB at 50 MB/s and 12.6 ms for 1.8 MiB at 150 MB/s.
        let mib = 1 << 20;
        let links = [link(true, 6 * mib / 10, 50_000_000), link(true, mib, 0), link(true, 18 * mib / 10, 150_000_000)];
        assert_eq!(pick(&links, 0), Some(1));
        // Before any measurement every link counts as 1 Gbit/s: the one holding least wins.
        let links = [link(true, 3, 0), link(true, 2, 0), link(true, 5, 0)];
        assert_eq!(pick(&links, 100), Some(1));
    }
}
