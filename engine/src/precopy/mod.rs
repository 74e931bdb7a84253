//! The pre-copy state machine: sans-IO, deterministic, driven by its caller.
//!
//! The machine owns no sockets, threads or clocks. Its inputs are events with the time they happened (pages
//! delivered, a round finished, a harvest, the vCPUs paused, the peer's verdict, a failure); its outputs are
//! [`Action`]s, taken with [`Precopy::poll`], that a driver carries out and reports back on:
//!
//! ```text
//!  SendRound(0: all maybe-non-zero pages) ─▶ round_delivered ─▶ Harvest ─▶ harvested(dirty) ─▶ policy decides
//!        ▲                                                                                          │
//!        └──── [SetThrottle(p)] SendRound(r+1: dirty) ◀── Continue ────────────────────────────────┤
//!                                          ResumeSource ─▶ Done(Cancelled) ◀── Cancel ────────────┤
//!                                                                                                   ▼ StopAndCopy
//!  Pause ─▶ paused ─▶ Harvest ─▶ harvested ─▶ SendRound(final) ─▶ round_delivered ─▶ SendState ─▶ state_delivered
//!        ─▶ Verify ─▶ verified(ok) ─▶ Commit ─▶ committed ─▶ Done(Completed)
//!  any failure before Commit ─▶ ResumeSource ─▶ Done(Failed)
//! ```
//!
//! The pause is predicted as (dirty pages × measured wire bytes per page) ÷ measured bandwidth + the switchover's
//! measured fixed cost, and a [`Convergence`] policy decides after every harvest: go on (throttling the vCPUs if the
//! guest outruns the link), stop and copy, or cancel (see [`DefaultConvergence`]).

mod config;
mod converge;
mod estimate;

pub use config::{PostcopyMode, PrecopyConfig, POSTCOPY_WAIT};

pub use converge::{
    needed_throttle, Convergence, Decision, DefaultConvergence, Observation, OnTimeout, AIM, MAX_PAUSE, MAX_THROTTLE,
    OUTRUN,
};
pub use estimate::RateEstimator;

use crate::dirty::Bitmap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Read, encode and send the pages in `pages` as round `epoch`, reporting deliveries with
    /// [`Precopy::delivered`] and the end of the round with [`Precopy::round_delivered`].
    SendRound {
        /// The round number, carried by every frame as its epoch.
        epoch: u32,
        /// The pages to send.
        pages: Bitmap,
        /// True for the stop-and-copy round, sent with the vCPUs paused.
        last: bool,
    },
    /// Harvest the dirty log and report it with [`Precopy::harvested`].
    Harvest,
    /// Throttle the vCPUs to this percentage (0 lifts the throttle).
    SetThrottle(f64),
    /// Pause the vCPUs and report with [`Precopy::paused`].
    Pause,
    /// Send the vCPU state and report with [`Precopy::state_delivered`].
    SendState,
    /// Post-copy: the vCPUs are paused and their state delivered. Tell the destination that `pages` are still to
    /// come and to resume the guest now, registering them missing; report with [`Precopy::switched`]. The pages follow
    /// as a [`Action::SendRound`] (the push) while the destination asks for those its guest touches first.
    Switch {
        /// The pages the destination does not hold yet (their latest copies are on the source).
        pages: Bitmap,
    },
    /// Ask the destination to compare digests and report its verdict with [`Precopy::verified`].
    Verify,
    /// Tell the destination to resume the guest; report its acknowledgement with [`Precopy::committed`].
    Commit,
    /// Resume the source's vCPUs, unthrottled: the migration failed before commit and the source keeps the guest.
    ResumeSource,
    /// Nothing more to do.
    Done(Outcome),
}

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination runs the guest; its memory was verified equal to the source's.
    Completed,
    /// The source keeps running the guest. The reason names what went wrong.
    Failed(String),
    /// The policy gave up before switching over (the target could not be met), or the operator called it off
    /// ([`Precopy::cancel`]); the source keeps running the guest.
    Cancelled(String),
    /// The pause ran past [`MAX_PAUSE`] before the commit: the switchover was called off and the source resumes.
    PauseExceeded,
}

/// One round's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundStats {
    /// Round number.
    pub index: u32,
    /// Pages the round sent.
    pub dirty_pages: u64,
    /// Wire bytes the round's pages took, as delivered.
    pub bytes_on_wire: u64,
    /// From the round's start to its last delivery.
    pub duration: Duration,
    /// True for the stop-and-copy round.
    pub last: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Rounds,
    Pausing,
    FinalHarvest,
    FinalRound,
    State,
    /// Post-copy: waiting for the destination to resume the guest.
    Switching,
    Verifying,
    Committing,
    Done,
}

/// The pre-copy state machine.
#[derive(Debug)]
pub struct Precopy {
    cfg: PrecopyConfig,
    phase: Phase,
    actions: VecDeque<Action>,
    epoch: u32,
    round_start: Instant,
    round_bytes: u64,
    round_pages: u64,
    rounds: Vec<RoundStats>,
    rate: RateEstimator,
    bytes_per_page: f64,
    paused_at: Option<Instant>,
    predicted: Option<Duration>,
    /// The harvest that triggered the pause, sent with the final one.
    pending_final: Option<Bitmap>,
    policy: Box<dyn Convergence>,
    start: Instant,
    last_harvest: Instant,
    throttle: f64,
    /// Dirty rate from the samples taken during the current round, pages per second (smoothed).
    sampled_rate: Option<f64>,
    /// The operator asked to switch over at the end of the round in flight, as long as the pause fits the bound.
    switchover_asked: bool,
    /// Post-copy was decided (at the pause), the switch was asked of the destination, and when it resumed the guest.
    postcopy: bool,
    switch_asked: bool,
    switched_at: Option<Instant>,
    /// The last sign of progress from the destination (or the start of the current wait for it).
    heard: Instant,
    /// The last time-to-finish estimate handed out ([`Precopy::eta`]), which the next may not exceed.
    eta: Option<Duration>,
}

/// Which of the machine's deadlines passed ([`Precopy::handle_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// The pause ran past [`MAX_PAUSE`] before the commit: the switchover is called off.
    PauseBound,
    /// The destination showed no progress for [`PrecopyConfig::peer_timeout`]: the migration has failed.
    PeerSilent(Duration),
}

impl Precopy {
    /// Starts a migration at `now`. `initial` holds the pages that may be non-zero; the driver must have cleared the
    /// dirty log just before reading it, so that every later write shows up in a harvest.
    pub fn new(cfg: PrecopyConfig, initial: Bitmap, now: Instant) -> Self {
        Self::with_policy(cfg, initial, now, Box::new(DefaultConvergence))
    }

    /// Like [`Precopy::new`], with another convergence policy.
    pub fn with_policy(cfg: PrecopyConfig, initial: Bitmap, now: Instant, policy: Box<dyn Convergence>) -> Self {
        let mut m = Precopy {
            cfg,
            phase: Phase::Rounds,
            actions: VecDeque::new(),
            epoch: 0,
            round_start: now,
            round_bytes: 0,
            round_pages: initial.count_ones(),
            rounds: Vec::new(),
            rate: RateEstimator::new(Duration::from_millis(500)),
            bytes_per_page: crate::guest::PAGE_SIZE as f64,
            paused_at: None,
            predicted: None,
            pending_final: None,
            policy,
            start: now,
            last_harvest: now,
            throttle: 0.0,
            sampled_rate: None,
            switchover_asked: false,
            postcopy: false,
            switch_asked: false,
            switched_at: None,
            heard: now,
            eta: None,
        };
        m.actions.push_back(Action::SendRound { epoch: 0, pages: initial, last: false });
        m
    }

    /// The next action, if any is ready.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The destination showed progress at `now` (an answer on the control connection), or the driver starts waiting
    /// on it: the peer-silence deadline runs from here.
    pub fn heard(&mut self, now: Instant) {
        self.heard = self.heard.max(now);
    }

    /// `bytes` of the current round's wire data were delivered at `at`.
    pub fn delivered(&mut self, bytes: u64, at: Instant) {
        self.heard(at);
        self.round_bytes += bytes;
        self.rate.record(at, bytes);
    }

    /// Every page of the current round has been delivered.
    pub fn round_delivered(&mut self, now: Instant) {
        let stats = RoundStats {
            index: self.epoch,
            dirty_pages: self.round_pages,
            bytes_on_wire: self.round_bytes,
            duration: now.saturating_duration_since(self.round_start),
            last: self.phase == Phase::FinalRound,
        };
        if stats.dirty_pages > 0 {
            self.bytes_per_page = stats.bytes_on_wire as f64 / stats.dirty_pages as f64;
        }
        self.rounds.push(stats);
        match self.phase {
            Phase::Rounds => self.actions.push_back(Action::Harvest),
            Phase::FinalRound if self.switched_at.is_some() => {
                // The push is done: the destination holds every page, and the state went before the switch.
                self.phase = Phase::Verifying;
                self.actions.push_back(Action::Verify);
            }
            Phase::FinalRound => {
                self.phase = Phase::State;
                self.actions.push_back(Action::SendState);
            }
            _ => {}
        }
    }

    /// The dirty log's harvest, taken at `now`.
    pub fn harvested(&mut self, dirty: Bitmap, now: Instant) {
        let pages = dirty.count_ones();
        match self.phase {
            Phase::Rounds => {
                let predicted = self.predict(pages);
                self.predicted = Some(predicted);
                let interval = now.saturating_duration_since(self.last_harvest).as_secs_f64().max(1e-3);
                self.last_harvest = now;
                // Over a long round a hot set saturates (every page of it dirty, however fast it is written), so the
                // short samples taken during the round measure the rate better than the round's total does.
                let rate = self.sampled_rate.unwrap_or(0.0).max(pages as f64 / interval);
                let o = Observation {
                    rounds_done: self.epoch + 1,
                    dirty_pages: pages,
                    last_round_pages: self.round_pages,
                    bandwidth_bps: self.bandwidth(),
                    dirty_rate_pps: rate,
                    bytes_per_page: self.bytes_per_page,
                    predicted_pause: predicted,
                    elapsed: now.saturating_duration_since(self.start),
                    throttle_pct: self.throttle,
                };
                let forced = self.switchover_asked && predicted <= MAX_PAUSE;
                let decision = if forced { Decision::StopAndCopy } else { self.policy.decide(&o, &self.cfg) };
                if self.wants_postcopy(&decision, predicted) {
                    self.postcopy = true;
                    self.pending_final = Some(dirty);
                    self.phase = Phase::Pausing;
                    self.actions.push_back(Action::Pause);
                    return;
                }
                match decision {
                    Decision::StopAndCopy => {
                        // The harvest is not lost: the final harvest after the pause ORs it back in.
                        self.pending_final = Some(dirty);
                        self.phase = Phase::Pausing;
                        self.actions.push_back(Action::Pause);
                    }
                    Decision::Continue { throttle_pct } => {
                        let t = throttle_pct.clamp(0.0, self.cfg.max_throttle);
                        if t != self.throttle {
                            self.throttle = t;
                            self.actions.push_back(Action::SetThrottle(t));
                        }
                        self.start_round(dirty, pages, now, false);
                    }
                    Decision::Cancel(reason) => {
                        self.phase = Phase::Done;
                        self.actions.push_back(Action::ResumeSource);
                        self.actions.push_back(Action::Done(Outcome::Cancelled(reason)));
                    }
                }
            }
            Phase::FinalHarvest => {
                let mut all = self.pending_final.take().unwrap_or_else(|| Bitmap::new(dirty.len()));
                all.or_assign(&dirty);
                if self.postcopy {
                    // The state goes first; the pages follow the switch.
                    self.pending_final = Some(all);
                    self.phase = Phase::State;
                    self.actions.push_back(Action::SendState);
                    return;
                }
                let pages = all.count_ones();
                self.phase = Phase::FinalRound;
                self.start_round(all, pages, now, true);
            }
            _ => {}
        }
    }

    fn start_round(&mut self, pages: Bitmap, count: u64, now: Instant, last: bool) {
        self.sampled_rate = None;
        self.epoch += 1;
        self.round_start = now;
        self.round_bytes = 0;
        self.round_pages = count;
        self.actions.push_back(Action::SendRound { epoch: self.epoch, pages, last });
    }

    /// The vCPUs are paused.
    pub fn paused(&mut self, now: Instant) {
        if self.phase == Phase::Pausing {
            self.paused_at = Some(now);
            self.phase = Phase::FinalHarvest;
            self.actions.push_back(Action::Harvest);
        }
    }

    /// The vCPU state reached the destination.
    pub fn state_delivered(&mut self) {
        if self.phase != Phase::State {
            return;
        }
        if self.postcopy {
            let pages = self.pending_final.take().unwrap_or_else(|| Bitmap::new(0));
            self.phase = Phase::Switching;
            self.switch_asked = true;
            self.actions.push_back(Action::Switch { pages });
        } else {
            self.phase = Phase::Verifying;
            self.actions.push_back(Action::Verify);
        }
    }

    /// Post-copy: the destination resumed the guest at `now`. The pages it lacks go out as the last round (the push).
    pub fn switched(&mut self, pages: Bitmap, now: Instant) {
        if self.phase != Phase::Switching {
            return;
        }
        self.switched_at = Some(now);
        let count = pages.count_ones();
        self.phase = Phase::FinalRound;
        self.start_round(pages, count, now, true);
    }

    /// Whether a decision taken after a pre-copy harvest should become a switch to post-copy instead: `always`
    /// switches at the first, `auto` when pre-copy would need more throttle than allowed, or would give up. A guest
    /// that fits the target as it is stops and copies whatever the mode.
    fn wants_postcopy(&self, decision: &Decision, predicted: Duration) -> bool {
        match self.cfg.postcopy {
            PostcopyMode::Off => false,
            PostcopyMode::Always => true,
            PostcopyMode::Auto => match decision {
                Decision::StopAndCopy => false,
                Decision::Cancel(_) => true,
                Decision::Continue { throttle_pct } => {
                    *throttle_pct > self.cfg.max_throttle
                        || (self.throttle >= self.cfg.max_throttle && predicted > self.cfg.downtime_target)
                }
            },
        }
    }

    /// Post-copy, between the decision and the pause: the pages the guest wrote during the last round, which the
    /// destination will lack (the final harvest adds what the guest writes until the pause).
    pub fn pending_missing(&self) -> Option<&Bitmap> {
        self.pending_final.as_ref().filter(|_| self.postcopy && self.phase == Phase::Pausing)
    }

    /// When the destination resumed the guest in post-copy, if it did.
    pub fn switched_at(&self) -> Option<Instant> {
        self.switched_at
    }

    /// Whether this migration switches (or switched) to post-copy.
    pub fn is_postcopy(&self) -> bool {
        self.postcopy
    }

    /// The destination's verdict on the digests.
    pub fn verified(&mut self, equal: bool) {
        if self.phase != Phase::Verifying {
            return;
        }
        if equal {
            self.phase = Phase::Committing;
            self.actions.push_back(Action::Commit);
        } else {
            self.fail("destination memory digest differs from the source's".into());
        }
    }

    /// Whether the switch to post-copy was asked of the destination: from then it may run the guest, and the source
    /// must never resume it, whatever happens.
    pub fn past_switch(&self) -> bool {
        self.switch_asked
    }

    /// The destination acknowledged the commit: it runs the guest now.
    pub fn committed(&mut self) {
        if self.phase == Phase::Committing {
            self.phase = Phase::Done;
            if self.throttle > 0.0 {
                // The source's vCPUs stay stopped for good, but leave nothing throttled behind.
                self.actions.push_back(Action::SetThrottle(0.0));
            }
            self.actions.push_back(Action::Done(Outcome::Completed));
        }
    }

    /// A harvest taken during a round: `pages` were dirtied in the last `over`. The driver keeps the pages for the
    /// next harvest it reports; the machine only learns the rate from them.
    pub fn dirty_sampled(&mut self, pages: u64, over: Duration) {
        if over.is_zero() {
            return;
        }
        let rate = pages as f64 / over.as_secs_f64();
        self.sampled_rate = Some(match self.sampled_rate {
            Some(r) => 0.5 * r + 0.5 * rate,
            None => rate,
        });
    }

    /// The switchover's fixed cost as the driver measured it (round trips, digest time, state size at the bandwidth).
    pub fn set_switchover_cost(&mut self, cost: Duration) {
        self.cfg.switchover_cost = cost;
    }

    /// The vCPU throttle the machine has asked for, percent.
    pub fn throttle(&self) -> f64 {
        self.throttle
    }

    /// The next moment at which the machine must be told the time ([`Precopy::handle_timeout`]), if any: while the
    /// guest is paused and nothing is committed, the end of the pause bound ([`MAX_PAUSE`] after the pause). The driver
    /// waits for its events no later than this, as quinn's connection asks its driver to.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let silence = (self.phase != Phase::Done).then(|| self.heard + self.silence_bound());
        let pause = self.pause_deadline();
        match (pause, silence) {
            (Some(p), Some(s)) => Some(p.min(s)),
            (p, s) => p.or(s),
        }
    }

    /// How long the destination may be silent: once the switch is asked (it may run the guest), as long as post-copy
    /// waits for the network.
    fn silence_bound(&self) -> Duration {
        if self.switch_asked {
            self.cfg.postcopy_wait
        } else {
            self.cfg.peer_timeout
        }
    }

    fn pause_deadline(&self) -> Option<Instant> {
        match self.phase {
            _ if self.switched_at.is_some() => None,
            Phase::FinalHarvest | Phase::FinalRound | Phase::State | Phase::Verifying => {
                self.paused_at.map(|p| p + MAX_PAUSE)
            }
            _ => None,
        }
    }

    /// Time has reached `now`; returns the deadline that passed, if one did.
    ///
    /// Past the pause bound and before the commit, the switchover is called off: the source resumes, unthrottled, and
    /// the outcome is [`Outcome::PauseExceeded`]. Once Commit is sent that can no longer happen. A destination silent
    /// past the peer timeout fails the migration as [`Precopy::fail`] does (before Commit the source resumes; after
    /// it, the source stays paused).
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Timeout> {
        if self.pause_deadline().is_some_and(|t| now >= t) {
            self.phase = Phase::Done;
            self.actions.clear();
            self.actions.push_back(Action::ResumeSource);
            self.actions.push_back(Action::Done(Outcome::PauseExceeded));
            return Some(Timeout::PauseBound);
        }
        if self.phase != Phase::Done && now >= self.heard + self.silence_bound() {
            let t = self.silence_bound();
            self.fail(format!("destination made no progress for {t:?}"));
            return Some(Timeout::PeerSilent(t));
        }
        None
    }

    /// Something failed. Before the commit was sent, the source resumes and keeps the guest. Once it was sent, the
    /// destination may already run the guest, so the source must not: it stays paused and the outcome is reported
    /// as failed with the reason, for the operator to decide (vMotion and QEMU treat this window the same way).
    pub fn fail(&mut self, reason: String) {
        if self.phase == Phase::Done {
            return;
        }
        let committing = self.phase == Phase::Committing;
        let switched = self.past_switch();
        self.phase = Phase::Done;
        self.actions.clear();
        if switched {
            self.actions.push_back(Action::Done(Outcome::Failed(format!(
                "post-copy failed after the switch ({reason}); the destination may be running the guest without \
                 every page, so the source stays paused and keeps the guest's memory"
            ))));
        } else if committing {
            self.actions.push_back(Action::Done(Outcome::Failed(format!(
                "commit not acknowledged ({reason}); the source stays paused because the destination may be running"
            ))));
        } else {
            self.actions.push_back(Action::ResumeSource);
            self.actions.push_back(Action::Done(Outcome::Failed(reason)));
        }
    }

    /// Calls the migration off at the operator's request: the source resumes (unthrottled) and keeps the guest. Too
    /// late once Commit is sent (the destination may be running the guest) or the machine is done: then false.
    pub fn cancel(&mut self, reason: String) -> bool {
        if matches!(self.phase, Phase::Done | Phase::Committing) || self.past_switch() {
            return false;
        }
        self.phase = Phase::Done;
        self.actions.clear();
        self.actions.push_back(Action::ResumeSource);
        self.actions.push_back(Action::Done(Outcome::Cancelled(reason)));
        true
    }

    /// The pause predicted for `pages` dirty pages at the measured bandwidth and bytes per page.
    pub fn predict(&self, pages: u64) -> Duration {
        let wire = match self.bandwidth() {
            Some(r) if r > 0.0 => Duration::from_secs_f64((pages as f64 * self.bytes_per_page / r).min(1e6)),
            // No measurement: only an empty set is known to fit.
            _ if pages == 0 => Duration::ZERO,
            _ => Duration::MAX / 2,
        };
        wire.saturating_add(self.cfg.switchover_cost)
    }

    /// The bandwidth the migration can count on, in bytes per second, once measured: the measured rate, or the cap
    /// where that is lower.
    pub fn bandwidth(&self) -> Option<f64> {
        let measured = self.rate.rate()?;
        Some(self.cfg.max_bandwidth.map_or(measured, |cap| measured.min(cap as f64)))
    }

    /// Asks to switch over at the end of the round in flight, whatever the downtime target, as long as the pause it
    /// predicts fits [`MAX_PAUSE`] (until it does, the rounds and the throttle go on). False once pre-copy is over.
    pub fn switchover_now(&mut self) -> bool {
        if self.phase != Phase::Rounds {
            return false;
        }
        self.switchover_asked = true;
        true
    }

    /// Asks to switch to post-copy at the end of the round in flight (the operator's `postcopy` command, QEMU's
    /// `migrate-start-postcopy`). False once pre-copy is over.
    pub fn postcopy_now(&mut self) -> bool {
        if self.phase != Phase::Rounds {
            return false;
        }
        self.cfg.postcopy = PostcopyMode::Always;
        true
    }

    /// The bandwidth the acknowledgements show, bytes per second, cap or no cap.
    pub fn measured_bandwidth(&self) -> Option<f64> {
        self.rate.rate()
    }

    /// Changes the downtime target mid-flight; the next decision uses it.
    pub fn set_downtime_target(&mut self, target: Duration) {
        self.eta = None;
        self.cfg.downtime_target = target;
    }

    /// Changes the bandwidth cap mid-flight (None lifts it); predictions from now on use it.
    pub fn set_max_bandwidth(&mut self, cap: Option<u64>) {
        self.eta = None;
        self.cfg.max_bandwidth = cap;
    }

    /// Changes the throttle ceiling mid-flight (clamped to 0..=[`MAX_THROTTLE`]). A throttle in force above it is
    /// lowered at once; later decisions stay under it.
    pub fn set_max_throttle(&mut self, pct: f64) {
        let pct = if pct.is_nan() { 0.0 } else { pct.clamp(0.0, MAX_THROTTLE) };
        self.cfg.max_throttle = pct;
        self.eta = None;
        if self.phase == Phase::Rounds && self.throttle > pct {
            self.throttle = pct;
            self.actions.push_back(Action::SetThrottle(pct));
        }
    }

    /// How long until the migration is done, given `remaining_pages` of the round in flight not yet delivered; None
    /// before a bandwidth is measured. The rounds still to come are estimated as a geometric series: while a round of
    /// `t` seconds is sent, the guest dirties what the next takes `ρ·t` to send, with `ρ` its dirty rate over the
    /// bandwidth (held under [`OUTRUN`] by the throttle). The estimate never grows on its own: a worse one holds the
    /// last until it comes below it, so that an operator's countdown does not run backwards at each round. A live
    /// change of the target, the cap or the throttle ceiling is a new plan, and starts the estimate afresh.
    pub fn eta(&mut self, remaining_pages: u64) -> Option<Duration> {
        if self.phase == Phase::Done {
            self.eta = Some(Duration::ZERO);
            return self.eta;
        }
        let bw = self.bandwidth().filter(|&b| b > 0.0)?;
        let send = remaining_pages as f64 * self.bytes_per_page / bw;
        let raw = if self.phase == Phase::Rounds {
            let running = 1.0 - self.throttle / 100.0;
            let rho = (self.sampled_rate.unwrap_or(0.0) * running * self.bytes_per_page / bw).min(OUTRUN);
            let pause = self.predicted.unwrap_or(self.cfg.switchover_cost);
            send / (1.0 - rho) + pause.min(MAX_PAUSE).as_secs_f64()
        } else {
            send + self.cfg.switchover_cost.as_secs_f64()
        };
        let raw = Duration::from_secs_f64(raw.min(1e6));
        self.eta = Some(self.eta.map_or(raw, |last| last.min(raw)));
        self.eta
    }

    /// The dirty rate sampled during the round in flight, pages per second, once sampled.
    pub fn dirty_rate(&self) -> Option<f64> {
        self.sampled_rate
    }

    /// Wire bytes per page sent so far, as measured.
    pub fn bytes_per_page(&self) -> f64 {
        self.bytes_per_page
    }

    /// The tunables in force (after any live change).
    pub fn config(&self) -> &PrecopyConfig {
        &self.cfg
    }

    /// Whether pre-copy is still going (rounds while the guest runs).
    pub fn in_precopy(&self) -> bool {
        self.phase == Phase::Rounds
    }

    /// The current round.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The rounds finished so far.
    pub fn rounds(&self) -> &[RoundStats] {
        &self.rounds
    }

    /// The round in flight as it stands at `now`, for reporting a migration that failed during it.
    pub fn unfinished_round(&self, now: Instant) -> RoundStats {
        RoundStats {
            index: self.epoch,
            dirty_pages: self.round_pages,
            bytes_on_wire: self.round_bytes,
            duration: now.saturating_duration_since(self.round_start),
            last: self.phase == Phase::FinalRound,
        }
    }

    /// When the vCPUs were paused.
    pub fn paused_at(&self) -> Option<Instant> {
        self.paused_at
    }

    /// The pause predicted at the last pre-copy harvest.
    pub fn last_prediction(&self) -> Option<Duration> {
        self.predicted
    }
}
