//! The driver: runs the pre-copy machine, carries out its actions, feeds it events, and watches the links.

use super::controls::{Change, MigrationEvent};
use super::{DowntimeParts, Event, MigrateError, Progress, RoundReport, SourceOptions, SourceReport};
use super::{VerifyMode, DIRTY_SAMPLE};
use crate::cpu_usage::CpuMeter;
use crate::link::data::LinkEvent;
use crate::stripe::Stripe;
use crate::tls::Conn;
use crate::wire::{self, Kind, Verify, WireError};
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use livemig_engine::dirty::{scan_parallel, Bitmap};
use livemig_engine::encode::{memory_root, BatchEncoder, EncodeError, HashTable, PageCounts, SendPolicy};
use livemig_engine::guest::Guest;
use livemig_engine::precopy::{Action, Outcome, Precopy, RateEstimator, Timeout};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The driver's state: what it borrows from [`super::migrate`], the machine it runs, and its view of the links.
pub(super) struct Driver<'a> {
    pub(super) guest: &'a dyn Guest,
    pub(super) opts: &'a SourceOptions,
    pub(super) machine: Precopy,
    pub(super) ev_rx: &'a Receiver<Event>,
    pub(super) ev_tx: &'a Sender<Event>,
    pub(super) stripe: &'a Stripe,
    pub(super) hashes: &'a HashTable,
    pub(super) policy: &'a SendPolicy,
    pub(super) error: Option<MigrateError>,
    /// What each round sent, as the driver counted it.
    pub(super) sent: Vec<RoundSent>,
    pub(super) progress: &'a (dyn Fn(&Progress) + Sync),
    pub(super) control: &'a Conn,
    /// Pages of the round in flight not yet acknowledged, as last counted (for the status).
    pub(super) remaining_pages: u64,
    /// Set when the machine is done: the status says so.
    pub(super) finished: bool,
    pub(super) control_written: &'a AtomicU64,
    pub(super) cpu: CpuMeter,
    pub(super) link_rates: Vec<RateEstimator>,
    /// Per link: the last ack, or the last moment it held nothing.
    pub(super) link_progress: Vec<Instant>,
    pub(super) link_errors: &'a mut Vec<Option<String>>,
    /// Pages harvested during the current round to sample the dirty rate; they join the next reported harvest.
    pub(super) sampled: Option<(Bitmap, Instant)>,
    /// The migration's start, and per-link wire bytes sampled every [`TIMELINE_EVERY`] since.
    pub(super) start: Instant,
    pub(super) timeline: Vec<(f64, Vec<u64>)>,
    /// The phase the status last showed, so that a change of it is an event.
    pub(super) phase: &'static str,
    /// Post-copy's state, from the decision to switch on.
    pub(super) pc: super::postcopy::PostcopyDriver,
}

/// One round as the driver sent it: pages by codec, the vCPU throttle, and wire bytes per link.
pub(super) struct RoundSent {
    counts: PageCounts,
    throttle_pct: f64,
    link_bytes: Vec<u64>,
}

/// When each step of the switchover ended, for the downtime's parts.
#[derive(Default)]
struct PauseMarks {
    last_pages: Option<Instant>,
    device_state: Option<Instant>,
    vcpu_state: Option<Instant>,
    verification: Option<Instant>,
    commit: Option<Instant>,
}

/// How often the per-link byte counters are sampled for the report's timeline (and `--plot`).
pub(super) const TIMELINE_EVERY: Duration = Duration::from_millis(100);

impl Driver<'_> {
    /// Runs the machine until it is done and fills `report` with the outcome, the rounds and the downtime.
    pub(super) fn run(&mut self, report: &mut SourceReport, rtt: Duration) {
        // The switchover's fixed cost: three round trips (state, verify, commit), the digest on both sides (timed on
        // the table itself), and a millisecond for restoring and resuming.
        let t = Instant::now();
        std::hint::black_box(self.hashes.root());
        let cost = rtt * 3 + t.elapsed() * 2 + Duration::from_millis(1);
        self.machine.set_switchover_cost(cost);
        let vcpus = self.guest.vcpus();
        let mut marks = PauseMarks::default();
        let mut commit_sent = false;
        while let Some(action) = self.machine.poll() {
            match action {
                Action::SendRound { epoch, pages, last } => {
                    let throttle_pct = vcpus.throttle();
                    report.max_throttle_pct = report.max_throttle_pct.max(throttle_pct);
                    self.round(epoch, &pages, last, throttle_pct);
                    if last {
                        marks.last_pages = Some(Instant::now());
                    }
                }
                Action::Harvest => self.harvest(),
                Action::SetThrottle(pct) => {
                    tracing::info!(throttle_pct = pct, "vCPU throttle changed");
                    vcpus.set_throttle(pct);
                    self.emit(MigrationEvent::Throttle(pct));
                }
                Action::Pause => {
                    report.predicted_downtime = self.machine.last_prediction();
                    tracing::info!(predicted_ms = ?report.predicted_downtime.map(|d| d.as_secs_f64() * 1e3), "pausing");
                    if let Some(pages) = self.machine.pending_missing().cloned() {
                        self.announce_missing(&pages);
                    }
                    vcpus.pause();
                    self.machine.paused(Instant::now());
                }
                Action::SendState => {
                    report.device_sections = self.send_devices();
                    marks.device_state = Some(Instant::now());
                    self.send_state();
                    marks.vcpu_state = Some(Instant::now());
                }
                Action::Switch { pages } => {
                    self.switch(pages);
                    marks.commit = Some(Instant::now());
                }
                Action::Verify => {
                    if self.machine.switched_at().is_some() {
                        self.close_links();
                    }
                    if let Some(ok) = self.verify() {
                        report.verified = ok;
                        self.machine.verified(ok);
                    }
                    marks.verification = Some(Instant::now());
                }
                Action::Commit => {
                    // From here the destination may run the guest: the machine's pause bound no longer applies.
                    commit_sent = true;
                    if self.ask(Kind::Commit, &[], |e| matches!(e, Event::Committed).then_some(())).is_some() {
                        self.machine.committed();
                    }
                    marks.commit = Some(Instant::now());
                }
                Action::ResumeSource => {
                    vcpus.set_throttle(0.0);
                    vcpus.resume();
                    self.emit(MigrationEvent::Throttle(0.0));
                }
                Action::Done(outcome) => {
                    self.done(outcome, commit_sent, report);
                    break;
                }
            }
        }
        self.fill_report(report, &marks);
        self.pc.close_control();
    }

    /// Sends one round (within its tracing span), telling watchers it started and ended.
    fn round(&mut self, epoch: u32, pages: &Bitmap, last: bool, throttle_pct: f64) {
        let _round = tracing::info_span!("round", epoch, last).entered();
        let count = pages.count_ones();
        tracing::info!(pages = count, throttle_pct, "round started");
        self.emit(MigrationEvent::RoundStarted { round: epoch, pages: count, throttle_pct });
        let (counts, link_bytes) = self.send_round(epoch, pages);
        let bytes = link_bytes.iter().sum::<u64>();
        tracing::info!(bytes, pages = counts.total(), "round sent");
        if self.error.is_none() {
            self.emit(MigrationEvent::RoundDone { round: epoch, bytes });
        }
        self.sent.push(RoundSent { counts, throttle_pct, link_bytes });
    }

    /// The machine is done: the last status, and the outcome into the report (after Commit, a failure is an unknown
    /// outcome; a cancel tells the destination why).
    fn done(&mut self, outcome: Outcome, commit_sent: bool, report: &mut SourceReport) {
        self.finished = true;
        let links: u64 = self.stripe.links.iter().map(|l| l.written()).sum();
        self.publish_status(self.control_written.load(Ordering::Relaxed) + links);
        report.result = match outcome {
            Outcome::Completed => Ok(()),
            Outcome::Failed(reason) if commit_sent || self.machine.past_switch() => {
                Err(MigrateError::OutcomeUnknown(reason))
            }
            Outcome::Failed(reason) => Err(self.error.take().unwrap_or(MigrateError::Machine(reason))),
            Outcome::PauseExceeded => Err(self.error.take().unwrap_or(MigrateError::PauseBound)),
            Outcome::Cancelled(reason) => {
                self.tell_destination(&format!("cancelled: {reason}"));
                Err(MigrateError::Cancelled(reason))
            }
        };
        match &report.result {
            Ok(()) => tracing::info!("migration completed"),
            Err(e) => {
                tracing::warn!(error = %e, "migration ended without the destination running the guest")
            }
        }
    }

    /// Harvests the dirty log (joining what the round's samples already took) and hands it to the machine.
    fn harvest(&mut self) {
        let mut bm = match self.sampled.take() {
            Some((bm, _)) => bm,
            None => Bitmap::new(self.guest.memory().total_pages()),
        };
        match self.guest.dirty_log().harvest(&mut bm) {
            Ok(()) => self.machine.harvested(bm, Instant::now()),
            Err(e) => self.fail(e.into()),
        }
    }

    /// Saves the devices' state and sends it, one section a frame, ahead of the vCPU state (the destination restores
    /// both when the vCPU state arrives). Returns each section's name, version and size. Sections the wire cannot
    /// carry fail the migration before commit, naming the device.
    fn send_devices(&mut self) -> Vec<(String, u32, u64)> {
        let Some(devices) = self.guest.devices() else { return Vec::new() };
        let sections = match devices.save() {
            Ok(s) => s,
            Err(e) => {
                self.fail(e.into());
                return Vec::new();
            }
        };
        if let Err(why) = wire::check_devices(&sections) {
            self.fail(MigrateError::Machine(why));
            return Vec::new();
        }
        let mut sent = Vec::new();
        for s in &sections {
            if !self.send_control(Kind::DeviceState, &wire::encode_device(s)) {
                break;
            }
            sent.push((s.name.clone(), s.version, s.data.len() as u64));
        }
        tracing::info!(sections = sent.len(), bytes = sent.iter().map(|s| s.2).sum::<u64>(), "device state sent");
        sent
    }

    /// Every page is acknowledged: the data links have done their work, and their closing is no failure.
    fn close_links(&self) {
        for l in &self.stripe.links {
            l.close();
        }
    }

    /// Saves the paused vCPUs and delivers their state.
    fn send_state(&mut self) {
        // In post-copy the links carry the push next.
        if !self.machine.is_postcopy() {
            self.close_links();
        }
        match self.guest.vcpus().save_state() {
            Ok(blob) => {
                if self.send_control(Kind::VcpuState, &blob)
                    && self.wait_for(|e| matches!(e, Event::StateAck).then_some(())).is_some()
                {
                    self.machine.state_delivered();
                }
            }
            Err(e) => self.fail(e.into()),
        }
    }

    /// The rounds, pages and downtime of the finished machine into `report`.
    fn fill_report(&self, report: &mut SourceReport, marks: &PauseMarks) {
        let m = &self.machine;
        let mut rounds = m.rounds().to_vec();
        if rounds.len() < self.sent.len() {
            rounds.push(m.unfinished_round(Instant::now()));
        }
        report.rounds = rounds
            .iter()
            .zip(&self.sent)
            .map(|(s, r)| RoundReport {
                stats: s.clone(),
                counts: r.counts,
                throttle_pct: r.throttle_pct,
                link_bytes: r.link_bytes.clone(),
            })
            .collect();
        for r in &report.rounds {
            report.pages.add(&r.counts);
        }
        report.postcopy = self.pc.report.clone();
        if let (Some(paused), Some(switched)) = (m.paused_at(), m.switched_at()) {
            // Post-copy: the guest was down from the pause to the destination's resume (its answer to Switch).
            let state = marks.vcpu_state.unwrap_or(paused);
            let devices = marks.device_state.unwrap_or(paused);
            report.downtime = Some(switched.saturating_duration_since(paused));
            report.downtime_parts = DowntimeParts {
                last_pages: Duration::ZERO,
                device_state: devices.saturating_duration_since(paused),
                vcpu_state: state.saturating_duration_since(devices),
                verification: Duration::ZERO,
                commit: switched.saturating_duration_since(state),
            };
        } else if let (Some(paused), Ok(())) = (m.paused_at(), &report.result) {
            let at = |mark: Option<Instant>| mark.unwrap_or(paused);
            let (last_pages, devices, state, verified, committed) = (
                at(marks.last_pages),
                at(marks.device_state),
                at(marks.vcpu_state),
                at(marks.verification),
                at(marks.commit),
            );
            report.downtime = Some(committed.saturating_duration_since(paused));
            report.downtime_parts = DowntimeParts {
                last_pages: last_pages.saturating_duration_since(paused),
                device_state: devices.saturating_duration_since(last_pages),
                vcpu_state: state.saturating_duration_since(devices),
                verification: verified.saturating_duration_since(state),
                commit: committed.saturating_duration_since(verified),
            };
        }
    }

    pub(super) fn fail(&mut self, e: MigrateError) {
        let reason = e.to_string();
        self.halt(&reason, e);
        self.machine.fail(reason);
    }

    /// Stops all I/O, telling the destination `why`; `e` is what the migration's loops see from here on.
    fn halt(&mut self, why: &str, e: MigrateError) {
        if self.error.is_none() {
            self.tell_destination(why);
            self.error = Some(e);
        }
        self.stripe.abort.store(true, Ordering::SeqCst);
        // Unblocks writers stuck on a peer that stopped reading, and with them any encoder waiting on a queue.
        for l in &self.stripe.links {
            l.close();
        }
        let _ = self.ctl().stream().shutdown(Shutdown::Both);
    }

    /// Hands the live changes asked for since the last event to the machine (and the cap to the pacer as well).
    fn take_controls(&mut self) {
        let Some(controls) = self.opts.controls.as_ref() else { return };
        for change in controls.take() {
            controls.emit(MigrationEvent::Changed(change.clone()));
            match change {
                Change::Cancel(reason) => {
                    tracing::info!(%reason, "cancel asked for");
                    // The machine decides whether it is too late (Commit sent); if not, it resumes the source.
                    if self.error.is_none() && self.machine.cancel(reason.clone()) {
                        self.halt(&format!("cancelled: {reason}"), MigrateError::Cancelled(reason));
                    }
                }
                Change::DowntimeTarget(t) => {
                    tracing::info!(target_ms = t.as_secs_f64() * 1e3, "downtime target changed");
                    self.machine.set_downtime_target(t);
                }
                Change::SwitchoverNow => {
                    tracing::info!("switchover asked for");
                    self.machine.switchover_now();
                }
                Change::PostcopyNow => {
                    tracing::info!("post-copy asked for");
                    self.machine.postcopy_now();
                }
                Change::MaxBandwidth(cap) => {
                    tracing::info!(max_bandwidth = ?cap, "bandwidth cap changed");
                    self.machine.set_max_bandwidth(cap);
                    self.stripe.pacer.set_rate(cap);
                }
                Change::MaxThrottle(pct) => {
                    tracing::info!(max_throttle_pct = pct, "throttle ceiling changed");
                    self.machine.set_max_throttle(pct);
                    // Lowered now rather than when the round in flight ends; the machine's own action follows.
                    let vcpus = self.guest.vcpus();
                    if self.machine.in_precopy() && vcpus.throttle() > self.machine.throttle() {
                        vcpus.set_throttle(self.machine.throttle());
                    }
                }
            }
        }
    }

    /// Events every phase handles the same way: failures, and link failures that leave other links.
    pub(super) fn handle(&mut self, e: Event) {
        match e {
            Event::ControlFailed(e) => self.fail(e),
            // The last words of a connection already replaced.
            Event::ControlEnded(generation, _) if generation != self.pc.generation => {}
            Event::ControlEnded(_, e) => self.control_lost(e),
            Event::ControlBack(conn, missing) => self.control_back(conn, missing),
            Event::LinkBack(i, conn) => self.link_back(i, conn),
            Event::RedialGaveUp(link, why) => self.gave_up(link, &why),
            Event::Link(LinkEvent::Failed { link, error }) => self.link_failed(link, error.to_string()),
            Event::PageRequest(pages) => self.serve_request(&pages),
            Event::PostcopyStats(s) => {
                if let Some(pc) = self.pc.report.as_mut() {
                    pc.destination = Some(s);
                }
            }
            _ => {}
        }
    }

    /// Fails one data link and routes its batches over the others; fails the migration when none is left.
    fn link_failed(&mut self, i: usize, why: String) {
        let link = &self.stripe.links[i];
        if link.is_failed() && self.link_errors[i].is_some() {
            return;
        }
        tracing::warn!(link = i, name = link.name(), error = %why, "data link failed; its batches go out on the others");
        let name = link.name().to_string();
        self.emit(MigrationEvent::LinkFailed { link: i, name, error: why.clone() });
        // After a post-copy switch a link that errors is dialled again, and the migration waits for it: marked so
        // before it fails, so that no encoder finds every link failed and none coming back.
        let redialing = self.machine.switched_at().is_some() && self.redial_link(i);
        self.stripe.links[i].fail();
        self.link_errors[i] = Some(why.clone());
        if !self.stripe.links_left() {
            self.fail(MigrateError::AllLinksFailed(why));
            return;
        }
        self.reroute(i);
        self.repace();
        if redialing {
            self.note_network_down();
        }
    }

    /// Routes again what the failed link `i` holds. The driver must get back to its events, so a batch that no link
    /// takes within the link timeout (every other link full and stalled) fails the migration.
    pub(super) fn reroute(&mut self, i: usize) {
        for item in self.stripe.links[i].take_back() {
            if self.machine.switched_at().is_some() {
                // After a post-copy switch a batch waits for a link to take it (see `suspend_link`).
                self.pc.parked.push(item);
                continue;
            }
            let deadline = Instant::now() + self.opts.link_timeout;
            match self.stripe.try_route(item, Some(deadline)) {
                Ok(()) => {}
                Err(_) if self.error.is_none() => {
                    let why = self.link_errors[i].clone().unwrap_or_default();
                    self.fail(MigrateError::AllLinksFailed(why));
                    return;
                }
                Err(_) => {}
            }
        }
    }

    /// The next event, or None after 50 ms without one. Also the driver's clock: it fails links that stall, takes
    /// back what encoders routed to failed links, and fails the migration when the peer has been silent too long.
    pub(super) fn next_event(&mut self) -> Option<Event> {
        self.take_controls();
        self.sample_links(false);
        let now = Instant::now();
        if self.machine.poll_timeout().is_some_and(|t| now >= t) && self.error.is_none() {
            // The machine decides what the deadline means; the driver stops the I/O and tells the destination why.
            let e = match self.machine.handle_timeout(now) {
                Some(Timeout::PauseBound) => Some(MigrateError::PauseBound),
                Some(Timeout::PeerSilent(t)) => Some(MigrateError::Stalled(t)),
                None => None,
            };
            if let Some(e) = e {
                self.fail(e);
                return None;
            }
        }
        self.unpark();
        for i in 0..self.stripe.links.len() {
            let l = &self.stripe.links[i];
            if l.is_failed() {
                if self.error.is_none() && self.link_errors[i].is_some() {
                    self.reroute(i);
                }
            } else if l.held() == 0 {
                self.link_progress[i] = now;
            } else if now.duration_since(self.link_progress[i]) > self.opts.link_timeout {
                if self.machine.switched_at().is_some() {
                    self.suspend_link(i);
                    continue;
                }
                let why = format!("no acknowledgement for {:?} with data outstanding", self.opts.link_timeout);
                self.link_failed(i, why);
            }
        }
        // No later than the machine's next deadline, so that the pause bound is kept to the millisecond.
        let wait = self
            .machine
            .poll_timeout()
            .map_or(Duration::from_millis(50), |t| t.saturating_duration_since(now).min(Duration::from_millis(50)));
        match self.ev_rx.recv_timeout(wait) {
            Ok(e) => {
                if matches!(
                    e,
                    Event::Link(LinkEvent::Acked { .. })
                        | Event::StateAck
                        | Event::Verified(_)
                        | Event::Committed
                        | Event::Switched
                        | Event::MissingAck
                        | Event::PageRequest(_)
                ) {
                    self.machine.heard(Instant::now());
                }
                Some(e)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.fail(MigrateError::Link(WireError::Closed));
                None
            }
        }
    }

    /// Scans, encodes and sends one round, and waits until the destination has applied all of it. Returns the
    /// round's page counts and its wire bytes per link.
    fn send_round(&mut self, epoch: u32, pages: &Bitmap) -> (PageCounts, Vec<u64>) {
        let total_pages = pages.count_ones();
        self.stripe.round_batches.store(0, Ordering::SeqCst);
        self.machine.heard(Instant::now());
        self.link_progress.fill(Instant::now());
        let (mem, hashes, policy, stripe, workers) =
            (self.guest.memory(), self.hashes, self.policy, self.stripe, self.opts.workers);
        let ev_tx = self.ev_tx.clone();
        let mut counts = PageCounts::default();
        let mut link_bytes = vec![0u64; stripe.links.len()];
        std::thread::scope(|s| {
            let scan = std::thread::Builder::new().name("lm-scan".into()).spawn_scoped(s, move || {
                let states = scan_parallel(
                    pages,
                    workers,
                    |_| (BatchEncoder::new(mem, hashes, policy, stripe, epoch), None::<EncodeError>),
                    |(enc, err), run| {
                        if err.is_none() {
                            *err = enc.push_run(run).err();
                        }
                    },
                );
                let mut counts = PageCounts::default();
                let mut error = None;
                for (mut enc, err) in states {
                    let err = err.or_else(|| enc.flush().err());
                    counts.add(&enc.counts);
                    error = error.or(err);
                }
                let batches = stripe.round_batches.load(Ordering::SeqCst);
                let _ = ev_tx.send(Event::ScanDone { batches, counts, error });
            });
            if let Err(e) = scan {
                self.fail(MigrateError::Link(WireError::Io(e)));
                return;
            }
            let mut scan_done: Option<u32> = None;
            let (mut acked, mut pages_done, mut last_report) = (0u32, 0u64, Instant::now());
            // Even after a failure, wait for the scan to finish: its threads borrow from this frame.
            while scan_done.is_none() || (self.error.is_none() && acked < scan_done.unwrap_or(u32::MAX)) {
                match self.next_event() {
                    Some(Event::Link(LinkEvent::Acked { link, epoch: e, bytes, pages, at })) if e == epoch => {
                        acked += 1;
                        pages_done += pages;
                        link_bytes[link] += bytes;
                        let rate = self.acked(link, bytes, pages, at);
                        if last_report.elapsed() > Duration::from_millis(50) {
                            last_report = Instant::now();
                            self.report_progress(epoch, total_pages, pages_done, rate);
                        }
                    }
                    Some(Event::ScanDone { batches, counts: c, error }) => {
                        scan_done = Some(batches);
                        counts = c;
                        if let (Some(e), None) = (error, &self.error) {
                            self.fail(match e {
                                EncodeError::Guest(g) => MigrateError::Guest(g),
                                EncodeError::SinkClosed => MigrateError::AllLinksFailed("no link left".into()),
                                EncodeError::Zstd(e) => MigrateError::Machine(format!("zstd: {e}")),
                            });
                        }
                    }
                    Some(e) => self.handle(e),
                    None => {}
                }
                self.sample_dirty_rate();
            }
        });
        if self.error.is_none() {
            self.machine.round_delivered(Instant::now());
        }
        (counts, link_bytes)
    }

    fn emit(&self, event: MigrationEvent) {
        if let Some(c) = self.opts.controls.as_ref() {
            c.emit(event);
        }
    }

    /// An ack of `bytes` (`pages` guest pages) on `link` at `at`: the link's rate for the scheduler, the machine's
    /// bandwidth, the codec policy's figures. Returns the machine's bandwidth estimate.
    fn acked(&mut self, link: usize, bytes: u64, pages: u64, at: Instant) -> f64 {
        self.link_progress[link] = at;
        self.network_back();
        self.link_rates[link].record(at, bytes);
        if let Some(r) = self.link_rates[link].rate() {
            self.stripe.links[link].set_rate(r);
        }
        self.machine.delivered(bytes, at);
        self.policy.observe(pages, at, crate::cpu_usage::process_cpu_seconds());
        let rate = self.machine.bandwidth().unwrap_or(0.0);
        let spare = self.cpu.spare_cpus(Duration::from_millis(100));
        self.policy.set_link(livemig_engine::num::u64_saturating(rate), spare, at);
        rate
    }

    /// Every [`DIRTY_SAMPLE`] of a round, harvests the dirty log into the set the next harvest reports, and tells the
    /// machine how many pages were dirtied in that span.
    fn sample_dirty_rate(&mut self) {
        if self.machine.paused_at().is_some() {
            return;
        }
        let now = Instant::now();
        let pages = self.guest.memory().total_pages();
        let (mut bm, since) = self.sampled.take().unwrap_or_else(|| (Bitmap::new(pages), now));
        if now.duration_since(since) >= DIRTY_SAMPLE {
            // The span's own set, counted before it joins the round's: a page the guest writes again counts again,
            // as it would in a round that short.
            let mut span = Bitmap::new(pages);
            if let Err(e) = self.guest.dirty_log().harvest(&mut span) {
                self.fail(e.into());
                return;
            }
            self.machine.dirty_sampled(span.count_ones(), now.duration_since(since));
            bm.or_assign(&span);
            self.sampled = Some((bm, now));
        } else {
            self.sampled = Some((bm, since));
        }
    }

    /// Sends the source's roots and returns whether the destination's match.
    fn verify(&mut self) -> Option<bool> {
        let table_root = self.hashes.root();
        // After a post-copy switch the destination's guest runs: only the tables can be compared.
        let full = self.opts.verify == VerifyMode::Full && self.machine.switched_at().is_none();
        let memory_root = match full {
            false => 0,
            true => match memory_root(self.guest.memory()) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(e.into());
                    return None;
                }
            },
        };
        let ours = Verify { full, table_root, memory_root };
        let theirs =
            self.ask(Kind::Verify, &ours.encode(), |e| if let Event::Verified(v) = e { Some(*v) } else { None })?;
        let ok = theirs.equal && theirs.table_root == table_root && (!ours.full || theirs.memory_root == memory_root);
        if !ok {
            self.error = Some(MigrateError::DigestMismatch {
                ours: format!("table {table_root:#018x} memory {memory_root:#018x}"),
                theirs: format!("table {:#018x} memory {:#018x}", theirs.table_root, theirs.memory_root),
            });
        }
        Some(ok)
    }
}
