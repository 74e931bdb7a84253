//! The source's side of post-copy: the switch, and the urgent path.
//!
//! Once the machine has decided to switch, and before the pause, the driver names the pages the destination will
//! lack (Missing frames; the destination drops their old copies and acknowledges) while the guest still runs here.
//! When the machine asks for the switch ([`Action::Switch`](livemig_engine::precopy::Action::Switch)), the vCPUs are
//! paused and their state delivered. The driver names the rest of the missing pages and sends Switch, and waits for
//! Switched: the destination runs the guest from then on, and the source never resumes it. The machine then asks for
//! the push, the last round, sent over the data links as every round is, but paced below the measured bandwidth so
//! that the links' queues stay short. A link that errors is failed and dialled again (see `reconnect`, which also
//! reconnects the control connection); one that falls silent is suspended, its batches sent on the others (or parked
//! until one takes them), and used again as soon as it answers. When every link falls silent (the network went away)
//! everything waits (up to `--postcopy-wait`), since neither side can finish alone.
//!
//! Pages the destination's guest faults on come as PageRequests on the control connection. The driver answers each at
//! once, ahead of the push, with a Pages frame on the control connection itself: raw (no time spent compressing), and
//! never behind the push's queued bytes in a data link's socket.

use super::driver::Driver;
use super::reconnect::Redialer;
use super::{Event, PostcopyReport};
use crate::tls::Conn;
use crate::wire::{self, postcopy, Kind};
use livemig_engine::dirty::Bitmap;
use livemig_engine::encode::{BatchEncoder, EncodedBatch, HashTable, Part, SendPath, SendPolicy};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Announcements of missing pages before the pause, at most, and the size under which the pause takes the rest.
const ANNOUNCE_PASSES: usize = 4;
const ANNOUNCE_ENOUGH: u64 = 1024;

/// How long a parked batch is offered to the links at a time (one offer's wait).
const PARKED_OFFER: std::time::Duration = std::time::Duration::from_millis(1);

/// The push's share of the measured bandwidth: what is left drains the links' queues, so that an urgent page waits
/// behind little.
const PUSH_SHARE: f64 = 0.9;

/// Post-copy as the driver keeps it.
pub(super) struct PostcopyDriver {
    /// The figures, from the switch on.
    pub(super) report: Option<PostcopyReport>,
    /// The bandwidth the push is paced from and the links that measured it (None: not paced by it).
    pace: Option<(f64, usize)>,
    /// The missing pages the destination was told of before the pause.
    announced: Option<Bitmap>,
    /// Since when no link has delivered (the migration waits for the network).
    pub(super) network_down: Option<Instant>,
    /// Batches of failed links that no live link could take yet.
    pub(super) parked: Vec<crate::link::data::Queued>,
    /// How to dial lost connections again (see `reconnect`).
    pub(super) redial: Redialer,
    /// The control connection the reconnect made, which replaces the first.
    pub(super) control: Option<Arc<Conn>>,
    /// The control connection's generation: one more each time it was lost.
    pub(super) generation: u32,
    /// Since when the control connection has been lost (a reconnect runs).
    pub(super) lost: Option<Instant>,
}

impl PostcopyDriver {
    pub(super) fn new(redial: Redialer) -> Self {
        PostcopyDriver {
            report: None,
            pace: None,
            announced: None,
            network_down: None,
            parked: Vec::new(),
            redial,
            control: None,
            generation: 0,
            lost: None,
        }
    }

    /// Closes the control connection the reconnect made, at the end: its reader ends.
    pub(super) fn close_control(&self) {
        if let Some(c) = &self.control {
            let _ = c.stream().shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Driver<'_> {
    /// Before the pause: tells the destination which pages it will lack (those the guest wrote during the last
    /// round) and waits until it has dropped their old copies, which costs a system call per run of pages: while the
    /// guest still runs here, not in the pause. What the guest writes meanwhile is announced the same way, a few
    /// times over while it is large, so that the pause is left little to drop.
    pub(super) fn announce_missing(&mut self, pages: &Bitmap) {
        tracing::info!(pages = pages.count_ones(), "switching to post-copy");
        let mut announced = Bitmap::new(pages.len());
        let mut next = pages.clone();
        for _ in 0..ANNOUNCE_PASSES {
            let frames = postcopy::encode_missing(&next);
            for body in &frames {
                if !self.send_control(Kind::Missing, body) {
                    return;
                }
            }
            for _ in &frames {
                if self.wait_for(|e| matches!(e, Event::MissingAck).then_some(())).is_none() {
                    return;
                }
            }
            announced.or_assign(&next);
            // What the guest wrote meanwhile; it joins the final harvest (as the driver's rate samples do).
            let mut span = Bitmap::new(pages.len());
            if let Err(e) = self.guest.dirty_log().harvest(&mut span) {
                self.fail(e.into());
                return;
            }
            let (mut bm, since) = self.sampled.take().unwrap_or_else(|| (Bitmap::new(pages.len()), Instant::now()));
            bm.or_assign(&span);
            self.sampled = Some((bm, since));
            span.and_not_assign(&announced);
            next = span;
            if next.count_ones() < ANNOUNCE_ENOUGH {
                break;
            }
        }
        self.pc.announced = Some(announced);
    }

    /// Carries out the switch: the rest of the missing bitmap, Switch, and the wait for Switched; then the pacing of
    /// the push.
    pub(super) fn switch(&mut self, pages: Bitmap) {
        let mut rest = pages.clone();
        if let Some(a) = self.pc.announced.take() {
            rest.and_not_assign(&a);
        }
        for body in postcopy::encode_missing(&rest) {
            if !self.send_control(Kind::Missing, &body) {
                return;
            }
        }
        if !self.send_control(Kind::Switch, &[]) {
            return;
        }
        // The acks of the frames just sent come first; the driver's handler takes them.
        if self.wait_for(|e| matches!(e, Event::Switched).then_some(())).is_none() {
            return;
        }
        let now = Instant::now();
        // Measured over every link; a link lost later takes its share off (see `repace`).
        let paced = self.machine.measured_bandwidth().filter(|_| self.stripe.pacer.rate().is_none());
        self.pc.report = Some(PostcopyReport {
            switched_at: now.saturating_duration_since(self.start),
            pages_pushed: pages.count_ones(),
            ..Default::default()
        });
        self.pc.pace = paced.map(|bw| (bw, self.stripe.links.len()));
        self.stripe.wait_for_links.store(true, Ordering::Relaxed);
        self.repace();
        // From here the sockets wait as long as post-copy waits for the network.
        let wait = Some(self.opts.precopy.postcopy_wait);
        let _ = self.ctl().set_write_timeout(wait);
        for l in &self.stripe.links {
            let _ = l.set_write_timeout(wait);
        }
        tracing::info!("the destination runs the guest; pushing the rest");
        self.machine.switched(pages, now);
    }

    /// Paces the push at its share of the bandwidth the links still alive measured: the links' queues must stay short
    /// for the urgent pages, and a lost link's share would otherwise pile up in front of them on the others.
    pub(super) fn repace(&mut self) {
        let Some((bw, links)) = self.pc.pace else { return };
        let alive = self.stripe.links.iter().filter(|l| !l.is_failed() && !l.is_suspended()).count();
        let rate = bw * PUSH_SHARE * alive as f64 / links.max(1) as f64;
        self.stripe.pacer.set_rate(Some(livemig_engine::num::u64_saturating(rate)));
    }

    /// Post-copy: a link that went silent is suspended rather than failed, and its batches go to the others (or wait
    /// for one to take them). Neither side can finish alone after the switch, so a network that went away is waited
    /// for (up to `--postcopy-wait`, which the machine's silence bound and every socket's write timeout follow), and
    /// each link takes batches again as soon as it acknowledges one: on the same connection, where it stopped.
    pub(super) fn suspend_link(&mut self, i: usize) {
        let link = &self.stripe.links[i];
        if link.is_suspended() {
            return;
        }
        link.suspend();
        tracing::warn!(
            link = i,
            name = link.name(),
            "data link silent; its batches go out on the others until it answers"
        );
        self.reroute(i);
        self.repace();
        self.note_network_down();
    }

    /// Post-copy: when no link is left delivering, says (once) that the transfer waits for the network.
    pub(super) fn note_network_down(&mut self) {
        let usable = self.stripe.links.iter().any(|l| !l.is_failed() && !l.is_suspended());
        if !usable && self.pc.network_down.is_none() {
            // An error, so that it shows without -v: the operator has the network to restore.
            tracing::error!(
                wait_s = self.opts.precopy.postcopy_wait.as_secs(),
                "post-copy paused: no link is delivering; the destination's vCPUs wait for their pages, and the \
                 transfer goes on when the network returns"
            );
            self.pc.network_down = Some(Instant::now());
        }
    }

    /// Post-copy: offers the batches no link could take again, in order, until one is refused (the links are full,
    /// or still silent): the driver waits at most one short offer for it.
    pub(super) fn unpark(&mut self) {
        let mut parked = std::mem::take(&mut self.pc.parked).into_iter();
        for item in parked.by_ref() {
            if let Err(item) = self.stripe.try_route(item, Some(Instant::now() + PARKED_OFFER)) {
                self.pc.parked.push(item);
                break;
            }
        }
        self.pc.parked.extend(parked);
    }

    /// Post-copy: a link delivered again after every one was silent.
    pub(super) fn network_back(&mut self) {
        if let Some(since) = self.pc.network_down.take() {
            tracing::warn!(down_s = since.elapsed().as_secs_f64(), "post-copy resumed: a link delivers again");
        }
    }

    /// Answers a fault request: the pages, raw, in one or more Pages frames on the control connection.
    pub(super) fn serve_request(&mut self, pages: &[u64]) {
        // With the control connection lost, the destination asks again on the new one.
        if self.pc.lost.is_some() {
            return;
        }
        let Some(pc) = self.pc.report.as_mut() else { return };
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
                    // The copy path puts every byte in the batch's own buffer: it makes no guest parts.
                    Part::Guest(_) => None,
                })
                .collect();
            match wire::write_pages(&mut self.ctl(), epoch, 0, &table, &parts) {
                Ok(n) => {
                    self.control_written.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.control_lost(super::MigrateError::Link(e.into()));
                    return;
                }
            }
        }
    }
}
