//! The source's side of post-copy: the switch, and the urgent path.
//!
//! When the machine asks for the switch ([`Action::Switch`](livemig_engine::precopy::Action::Switch)), the vCPUs are
//! paused and their state delivered. The driver sends the bitmap of the pages the destination lacks (Missing frames)
//! and Switch, and waits for Switched: the destination runs the guest from then on, and the source never resumes it.
//! The machine then asks for the push, the last round, sent over the data links as every round is, but paced below
//! the measured bandwidth so that the links' queues stay short.
//!
//! Pages the destination's guest faults on come as PageRequests on the control connection. The driver answers each at
//! once, ahead of the push, with a Pages frame on the control connection itself: raw (no time spent compressing), and
//! never behind the push's queued bytes in a data link's socket.

use super::driver::Driver;
use super::{Event, PostcopyReport};
use crate::wire::{self, postcopy, Kind};
use livemig_engine::dirty::Bitmap;
use livemig_engine::encode::{BatchEncoder, EncodedBatch, HashTable, Part, SendPath, SendPolicy};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

/// The push's share of the measured bandwidth: what is left drains the links' queues, so that an urgent page waits
/// behind little.
const PUSH_SHARE: f64 = 0.9;

impl Driver<'_> {
    /// Carries out the switch: the missing bitmap, Switch, and the wait for Switched; then the pacing of the push.
    pub(super) fn switch(&mut self, pages: Bitmap) {
        tracing::info!(pages = pages.count_ones(), "switching to post-copy");
        for body in postcopy::encode_missing(&pages) {
            if !self.send_control(Kind::Missing, &body) {
                return;
            }
        }
        if !self.send_control(Kind::Switch, &[]) {
            return;
        }
        if self.wait_for(|e| matches!(e, Event::Switched).then_some(())).is_none() {
            return;
        }
        let now = Instant::now();
        if self.stripe.pacer.rate().is_none() {
            if let Some(bw) = self.machine.measured_bandwidth() {
                self.stripe.pacer.set_rate(Some(livemig_engine::num::u64_saturating(bw * PUSH_SHARE)));
            }
        }
        self.postcopy = Some(PostcopyReport {
            switched_at: now.saturating_duration_since(self.start),
            pages_pushed: pages.count_ones(),
            ..Default::default()
        });
        tracing::info!("the destination runs the guest; pushing the rest");
        self.machine.switched(pages, now);
    }

    /// Answers a fault request: the pages, raw, in one or more Pages frames on the control connection.
    pub(super) fn serve_request(&mut self, pages: &[u64]) {
        let Some(pc) = self.postcopy.as_mut() else { return };
        pc.requests += 1;
        pc.pages_pulled += pages.len() as u64;
        let policy = SendPolicy::new(false, vec![SendPath::Copy]);
        // The pages' hashes are not recorded: the push sends them too (the destination places the first copy).
        let scratch = HashTable::new(0);
        let sink: Mutex<Vec<EncodedBatch>> = Mutex::default();
        let epoch = self.machine.epoch();
        let mut enc = BatchEncoder::new(self.guest.memory(), &scratch, &policy, &sink, epoch);
        let encoded = pages
            .iter()
            .try_for_each(|&p| enc.push_run(livemig_engine::dirty::PageRun { first: p, count: 1 }))
            .and_then(|()| enc.flush());
        if let Err(e) = encoded {
            self.fail(super::MigrateError::Machine(format!("encoding the pages a fault asked for: {e}")));
            return;
        }
        let mut table = Vec::new();
        for b in sink.into_inner().unwrap_or_else(|e| e.into_inner()) {
            wire::encode_entries(&b, &mut table);
            let parts: Vec<&[u8]> = b
                .parts
                .iter()
                .filter_map(|p| match *p {
                    Part::Owned { off, len } => Some(&b.payload[off..off + len]),
                    Part::Guest(_) => None,
                })
                .collect();
            match wire::write_pages(&mut &*self.control, epoch, 0, &table, &parts) {
                Ok(n) => {
                    self.control_written.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.fail(super::MigrateError::Link(e.into()));
                    return;
                }
            }
        }
    }
}
