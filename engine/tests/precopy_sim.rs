//! The pre-copy machine driven deterministically: a simulated link of fixed bandwidth and a simulated guest that
//! dirties pages at a fixed rate over a hot set. No sockets, threads or sleeps; time is a number.

use livemig_engine::dirty::Bitmap;
use livemig_engine::precopy::{Action, OnTimeout, Outcome, PostcopyMode, Precopy, PrecopyConfig, MAX_PAUSE};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

/// A live change, as an operator makes it.
type Change = Box<dyn FnMut(&mut Precopy)>;

struct Sim {
    now: Instant,
    pages: u64,
    /// Link goodput, bytes per second.
    bandwidth: f64,
    /// Pages dirtied per second, spread over the first `hot` pages.
    dirty_rate: f64,
    hot: u64,
    /// Pages dirtied since the last harvest (a set: a page dirtied twice counts once).
    dirty: Bitmap,
    next_dirty: u64,
    owed: f64,
    paused: bool,
    resumed: bool,
    /// Percent of the time the guest is held back.
    throttle: f64,
    max_throttle: f64,
    actions: Vec<String>,
    /// The operator cancels when the machine first asks for this action (instead of doing it, if the cancel holds).
    cancel_on: Option<&'static str>,
    cancel_held: Option<bool>,
    /// The connection fails when the machine first asks for this action (instead of doing it).
    fail_on: Option<&'static str>,
    /// A live change the operator makes when the machine asks for round N (before the round is sent).
    change_at_round: Option<(u32, Change)>,
    /// (round, ETA) after every delivered batch, as an operator's status would show it.
    etas: Vec<(u32, Option<Duration>)>,
    /// The throttle in force during each round.
    round_throttle: Vec<f64>,
}

impl Sim {
    fn new(pages: u64, bandwidth: f64, dirty_rate: f64, hot: u64) -> Sim {
        Sim {
            now: Instant::now(),
            pages,
            bandwidth,
            dirty_rate,
            hot,
            dirty: Bitmap::new(pages),
            next_dirty: 0,
            owed: 0.0,
            paused: false,
            resumed: false,
            throttle: 0.0,
            max_throttle: 0.0,
            actions: Vec::new(),
            cancel_on: None,
            cancel_held: None,
            fail_on: None,
            change_at_round: None,
            etas: Vec::new(),
            round_throttle: Vec::new(),
        }
    }

    /// Advances time, dirtying pages as the guest would (unless paused).
    fn advance(&mut self, d: Duration) {
        self.now += d;
        if self.paused {
            return;
        }
        self.owed += self.dirty_rate * (1.0 - self.throttle / 100.0) * d.as_secs_f64();
        while self.owed >= 1.0 {
            // A deterministic walk through the hot set stands in for random choices.
            self.dirty.set(self.next_dirty);
            self.next_dirty = (self.next_dirty + 7919) % self.hot;
            self.owed -= 1.0;
        }
    }

    /// Runs the machine to the end, delivering each round in 64-page batches over the simulated link. `fail_at`
    /// injects a failure when that many batches have been delivered.
    fn run(&mut self, cfg: PrecopyConfig, fail_at: Option<u64>, digest_ok: bool) -> (Outcome, Precopy) {
        let m = Precopy::new(cfg, Bitmap::full(self.pages), self.now);
        self.run_machine(m, fail_at, digest_ok)
    }

    /// Runs a machine made (and perhaps given inputs) by the test; returns its outcome and rounds.
    fn drive(&mut self, m: Precopy) -> (Outcome, usize) {
        let (o, m) = self.run_machine(m, None, true);
        (o, m.rounds().len())
    }

    fn run_machine(&mut self, mut m: Precopy, fail_at: Option<u64>, digest_ok: bool) -> (Outcome, Precopy) {
        let mut delivered = 0u64;
        loop {
            let Some(a) = m.poll() else { panic!("machine stalled: no action and not done") };
            let name = format!("{a:?}").split([' ', '{', '(']).next().unwrap().to_string();
            if self.cancel_on == Some(name.as_str()) && self.cancel_held.is_none() {
                let held = m.cancel("operator".into());
                self.cancel_held = Some(held);
                if held {
                    self.actions.push(format!("cancel@{name}"));
                    continue;
                }
            }
            if self.fail_on == Some(name.as_str()) {
                self.fail_on = None;
                self.actions.push(format!("fail@{name}"));
                m.fail("connection reset".into());
                continue;
            }
            self.actions.push(name);
            match a {
                Action::SendRound { pages, epoch, .. } => {
                    if let Some((_, change)) = self.change_at_round.as_mut().filter(|(r, _)| *r == epoch) {
                        change(&mut m);
                        // A change may ask for actions of its own (a lower throttle) before the round goes out.
                        while let Some(Action::SetThrottle(t)) = m.poll() {
                            self.actions.push("SetThrottle".into());
                            self.throttle = t;
                        }
                    }
                    self.round_throttle.push(self.throttle);
                    let mut left = pages.count_ones();
                    let mut failed = false;
                    while left > 0 {
                        let n = left.min(64);
                        self.advance(Duration::from_secs_f64((n * PAGE) as f64 / self.bandwidth));
                        m.delivered(n * PAGE, self.now);
                        left -= n;
                        delivered += 1;
                        self.etas.push((epoch, m.eta(left)));
                        if Some(delivered) == fail_at {
                            m.fail("link died".into());
                            failed = true;
                            break;
                        }
                    }
                    if !failed {
                        m.round_delivered(self.now);
                    }
                }
                Action::Harvest => {
                    let d = std::mem::replace(&mut self.dirty, Bitmap::new(self.pages));
                    m.harvested(d, self.now);
                }
                Action::Pause => {
                    self.paused = true;
                    m.paused(self.now);
                }
                Action::SendState => m.state_delivered(),
                // Post-copy: the destination runs the guest from here; the source stays paused.
                Action::Switch { pages } => m.switched(pages, self.now),
                Action::Verify => m.verified(digest_ok),
                Action::Commit => m.committed(),
                Action::ResumeSource => {
                    self.paused = false;
                    self.resumed = true;
                    self.throttle = 0.0;
                }
                Action::SetThrottle(t) => {
                    self.throttle = t;
                    self.max_throttle = self.max_throttle.max(t);
                }
                Action::Done(o) => return (o, m),
            }
        }
    }
}

fn cfg(target_ms: u64, max_rounds: u32) -> PrecopyConfig {
    PrecopyConfig { downtime_target: Duration::from_millis(target_ms), max_rounds, ..Default::default() }
}

#[test]
fn idle_guest_switches_over_after_one_round() {
    let mut sim = Sim::new(1 << 16, 125e6, 0.0, 1);
    let (o, m) = sim.run(cfg(300, 30), None, true);
    assert_eq!(o, Outcome::Completed);
    let r = m.rounds();
    assert_eq!(r.len(), 2, "round 0 and an empty final round");
    assert_eq!((r[0].dirty_pages, r[1].dirty_pages, r[1].last), (1 << 16, 0, true));
    assert_eq!(
        sim.actions,
        ["SendRound", "Harvest", "Pause", "Harvest", "SendRound", "SendState", "Verify", "Commit", "Done"]
    );
}

#[test]
fn dirty_sets_shrink_until_the_pause_fits_the_target() {
    // 1 GiB over 1 Gbit/s while the guest dirties 5000 pages/s (about 16 % of the link) over 10 % of memory.
    let pages = 1 << 18;
    let mut sim = Sim::new(pages, 125e6, 5000.0, pages / 10);
    let (o, m) = sim.run(cfg(50, 30), None, true);
    assert_eq!(o, Outcome::Completed);
    let r = m.rounds();
    assert!(r.len() >= 3, "expected several rounds, got {}", r.len());
    let pre: Vec<u64> = r.iter().filter(|x| !x.last).map(|x| x.dirty_pages).collect();
    assert!(pre.windows(2).all(|w| w[1] < w[0]), "dirty sets must shrink: {pre:?}");
    // The pause the machine chose really fits: the final round's pages at the link rate, plus the fixed cost.
    let last = r.last().unwrap();
    let pause = Duration::from_secs_f64((last.dirty_pages * PAGE) as f64 / 125e6) + Duration::from_millis(5);
    assert!(pause <= Duration::from_millis(50), "final round of {} pages takes {pause:?}", last.dirty_pages);
    assert!(m.last_prediction().unwrap() <= Duration::from_millis(50));
}

fn outrun() -> Sim {
    // 2 GiB over 1 Gbit/s while the guest dirties 60000 pages/s (about twice the link) over 10 % of memory.
    let pages = 1 << 19;
    Sim::new(pages, 125e6, 60_000.0, pages / 10)
}

#[test]
fn a_guest_that_outruns_the_link_cancels_cleanly_without_throttling() {
    let mut sim = outrun();
    let c = PrecopyConfig { throttle: false, ..cfg(300, 10) };
    let (o, m) = sim.run(c, None, true);
    assert!(matches!(o, Outcome::Cancelled(ref r) if r.contains("not met after 10 rounds")), "{o:?}");
    assert!(sim.resumed && !sim.paused && sim.throttle == 0.0, "the source runs on, unthrottled");
    assert_eq!(sim.max_throttle, 0.0);
    assert!(!sim.actions.iter().any(|a| a == "Pause"), "the guest was never paused");
    assert_eq!(m.rounds().len(), 10);
}

#[test]
fn throttling_makes_a_guest_that_outruns_the_link_converge() {
    let mut sim = outrun();
    let (o, m) = sim.run(cfg(300, 30), None, true);
    assert_eq!(o, Outcome::Completed);
    assert!(sim.max_throttle > 50.0, "throttle {}", sim.max_throttle);
    assert_eq!(sim.throttle, 0.0, "the throttle is lifted at the end");
    let r = m.rounds();
    assert!(r.len() <= 6, "converged in {} rounds", r.len());
    let last = r.last().unwrap();
    let pause = Duration::from_secs_f64((last.dirty_pages * PAGE) as f64 / 125e6) + Duration::from_millis(5);
    assert!(pause <= Duration::from_millis(300), "final round of {} pages takes {pause:?}", last.dirty_pages);
}

#[test]
fn force_switches_over_only_within_the_pause_bound() {
    // Without throttling and with a 1 ms target nothing fits, but what is left after 5 rounds goes in well under 2 s.
    let mut sim = outrun();
    let c = PrecopyConfig { throttle: false, on_timeout: OnTimeout::Force, ..cfg(1, 5) };
    let (o, m) = sim.run(c, None, true);
    assert_eq!(o, Outcome::Completed);
    assert!(m.last_prediction().unwrap() <= MAX_PAUSE);
    // A link so slow that the rest would take longer than 2 s: force refuses and cancels.
    let pages = 1 << 19;
    let mut slow = Sim::new(pages, 10e6, 60_000.0, pages / 10);
    let (o, _) = slow.run(c_force(), None, true);
    assert!(matches!(o, Outcome::Cancelled(ref r) if r.contains("over the 2000 ms bound")), "{o:?}");
    assert!(slow.resumed);
}

fn c_force() -> PrecopyConfig {
    PrecopyConfig { throttle: false, on_timeout: OnTimeout::Force, ..cfg(1, 3) }
}

#[test]
fn max_time_bounds_the_pre_copy() {
    let mut sim = outrun();
    let c = PrecopyConfig { throttle: false, max_time: Some(Duration::from_secs(30)), ..cfg(300, 1000) };
    let (o, m) = sim.run(c, None, true);
    assert!(matches!(o, Outcome::Cancelled(ref r) if r.contains(" s:")), "{o:?}");
    assert!(m.rounds().len() < 1000);
}

#[test]
fn failure_mid_round_resumes_the_source() {
    let mut sim = Sim::new(1 << 16, 125e6, 1000.0, 1 << 12);
    let (o, _) = sim.run(cfg(300, 30), Some(100), true);
    assert_eq!(o, Outcome::Failed("link died".into()));
    assert!(sim.resumed, "the source must be resumed");
    assert_eq!(sim.actions.last().map(String::as_str), Some("Done"));
    assert!(sim.actions.contains(&"ResumeSource".to_string()));
}

#[test]
fn digest_mismatch_resumes_the_source_and_never_commits() {
    let mut sim = Sim::new(1 << 12, 125e6, 0.0, 1);
    let (o, _) = sim.run(cfg(300, 30), None, false);
    assert!(matches!(o, Outcome::Failed(ref r) if r.contains("digest")), "{o:?}");
    assert!(sim.resumed);
    assert!(!sim.actions.contains(&"Commit".to_string()));
}

#[test]
fn failure_after_commit_is_sent_keeps_the_source_paused() {
    let mut m = Precopy::new(cfg(300, 30), Bitmap::new(8), Instant::now());
    let mut saw_commit = false;
    while let Some(a) = m.poll() {
        match a {
            Action::SendRound { .. } => m.round_delivered(Instant::now()),
            Action::Harvest => m.harvested(Bitmap::new(8), Instant::now()),
            Action::Pause => m.paused(Instant::now()),
            Action::SendState => m.state_delivered(),
            Action::Switch { .. } => panic!("post-copy is off"),
            Action::Verify => m.verified(true),
            Action::Commit => {
                saw_commit = true;
                m.fail("connection reset".into());
            }
            Action::ResumeSource => panic!("the destination may run the guest: the source must not resume"),
            Action::SetThrottle(_) => {}
            Action::Done(o) => {
                assert!(matches!(o, Outcome::Failed(ref r) if r.contains("stays paused")), "{o:?}");
                break;
            }
        }
    }
    assert!(saw_commit);
}

/// Drives a machine on an idle 64-page guest up to `stop` (the action at which the simulated destination goes silent),
/// then lets time pass in 100 ms steps, telling the machine each time as a driver does through `poll_timeout` and
/// `handle_timeout`. Returns the actions seen from then on and the outcome, with the time it came at.
fn silent_from(stop: &str) -> (Vec<String>, Outcome, Duration) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut m = Precopy::new(cfg(300, 30), Bitmap::new(64), now);
    let mut paused_at = None;
    let mut silent = false;
    let mut after = Vec::new();
    loop {
        let a = match m.poll() {
            Some(a) => a,
            None => {
                assert!(silent, "the machine stalled before the destination went silent");
                now += Duration::from_millis(100);
                if let Some(t) = m.poll_timeout() {
                    if now >= t {
                        m.handle_timeout(now);
                    }
                }
                assert!(now < t0 + Duration::from_secs(60), "no outcome after a minute of silence");
                continue;
            }
        };
        let name = format!("{a:?}").split([' ', '{', '(']).next().unwrap().to_string();
        if silent {
            after.push(name.clone());
        }
        if name == stop {
            silent = true;
        }
        match a {
            Action::SendRound { .. } if !silent => m.round_delivered(now),
            Action::Harvest => m.harvested(Bitmap::new(64), now),
            Action::Pause => {
                paused_at = Some(now);
                m.paused(now);
            }
            Action::SendState if !silent => m.state_delivered(),
            Action::Verify if !silent => m.verified(true),
            Action::Commit if !silent => m.committed(),
            Action::Done(o) => return (after, o, now - paused_at.unwrap_or(now)),
            _ => {}
        }
    }
}

#[test]
fn the_machine_keeps_the_pause_bound_in_every_phase_before_commit() {
    for stop in ["SendRound", "SendState", "Verify"] {
        // The first SendRound is round 0 (the guest runs); stop on the final one, sent with the guest paused.
        let stop_at = if stop == "SendRound" { "Pause" } else { stop };
        let (after, o, paused_for) = silent_from(stop_at);
        assert_eq!(o, Outcome::PauseExceeded, "silent from {stop}");
        assert!(after.contains(&"ResumeSource".to_string()), "silent from {stop}: {after:?}");
        assert!(!after.contains(&"Commit".to_string()), "silent from {stop}: {after:?}");
        assert!(paused_for >= MAX_PAUSE && paused_for < MAX_PAUSE + Duration::from_millis(200), "{paused_for:?}");
    }
}

#[test]
fn once_commit_is_sent_the_pause_bound_no_longer_cancels() {
    let now = Instant::now();
    let mut m = Precopy::new(cfg(300, 30), Bitmap::new(64), now);
    let mut deadline_while_paused = None;
    while let Some(a) = m.poll() {
        match a {
            Action::SendRound { .. } => m.round_delivered(now),
            Action::Harvest => m.harvested(Bitmap::new(64), now),
            Action::Pause => {
                m.paused(now);
                deadline_while_paused = m.poll_timeout();
            }
            Action::SendState => m.state_delivered(),
            Action::Verify => m.verified(true),
            Action::Commit => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(deadline_while_paused, Some(now + MAX_PAUSE));
    // Commit is out: the destination may be running the guest, so the pause bound may not resume the source now.
    // What is left is the peer's silence, later.
    let silence = now + PrecopyConfig::default().peer_timeout;
    assert_eq!(m.poll_timeout(), Some(silence));
    assert_eq!(m.handle_timeout(now + MAX_PAUSE + Duration::from_millis(1)), None);
    assert_eq!(m.poll(), None, "the pause bound acted after Commit");
    m.committed();
    assert_eq!(m.poll(), Some(Action::Done(Outcome::Completed)));
    assert_eq!(m.poll_timeout(), None, "a finished machine has no deadline");
}

#[test]
fn a_silent_destination_fails_the_migration_and_the_source_resumes_only_before_commit() {
    let timeout = PrecopyConfig::default().peer_timeout;
    // Silent in round 0: no ack arrives; after the peer timeout the source resumes.
    let (after, o, _) = silent_from("SendRound");
    assert!(matches!(o, Outcome::Failed(ref r) if r.contains("no progress")), "{o:?}");
    assert!(after.contains(&"ResumeSource".to_string()), "{after:?}");
    // Silent after Commit: the guest may run there, so the source stays paused and says so.
    let (after, o, paused_for) = silent_from("Commit");
    assert!(matches!(o, Outcome::Failed(ref r) if r.contains("stays paused")), "{o:?}");
    assert!(!after.contains(&"ResumeSource".to_string()), "{after:?}");
    assert!(paused_for >= timeout && paused_for < timeout + Duration::from_millis(200), "{paused_for:?}");
}

#[test]
fn a_bandwidth_cap_is_what_the_machine_predicts_with_and_can_change_mid_flight() {
    // 1 GiB over a 1 Gbit/s link, capped at 100 Mbit/s: the link delivers at the cap (the driver paces it), and a
    // guest dirtying 4000 pages/s (about 13 % of the link, 130 % of the cap) cannot converge without throttling.
    let pages = 1 << 18;
    let cap = 12_500_000u64;
    let mut sim = Sim::new(pages, cap as f64, 4000.0, pages / 10);
    let c = PrecopyConfig { max_bandwidth: Some(cap), ..cfg(50, 30) };
    let (o, m) = sim.run(c, None, true);
    assert_eq!(o, Outcome::Completed);
    assert!(sim.max_throttle > 0.0, "a cap below the dirty rate must be met by throttling");
    // Prediction at the cap: 1000 pages of 4 KiB at 12.5 MB/s is 328 ms, plus the switchover's fixed cost.
    let at_cap = m.predict(1000);
    assert!((at_cap.as_secs_f64() - (0.328 + 0.005)).abs() < 0.01, "{at_cap:?}");
    // The same machine, its cap lifted mid-flight: the measured rate (the capped one, still) is all it knows.
    let mut m = m;
    m.set_max_bandwidth(Some(cap / 2));
    let halved = m.predict(1000);
    assert!((halved.as_secs_f64() - (0.655 + 0.005)).abs() < 0.01, "{halved:?}");
    // Without a cap, the same guest on the full link converges with no throttle at all.
    let mut sim = Sim::new(pages, 125e6, 4000.0, pages / 10);
    let (o, _) = sim.run(cfg(50, 30), None, true);
    assert_eq!((o, sim.max_throttle), (Outcome::Completed, 0.0));
}

#[test]
fn an_operator_cancel_resumes_the_source_in_every_phase_before_commit_and_is_refused_after() {
    for phase in ["SendRound", "Harvest", "SetThrottle", "Pause", "SendState", "Verify"] {
        // A guest that needs throttling, so that every phase comes.
        let mut sim = outrun();
        sim.cancel_on = Some(phase);
        let (o, _) = sim.run(cfg(300, 30), None, true);
        assert_eq!(sim.cancel_held, Some(true), "{phase}");
        assert_eq!(o, Outcome::Cancelled("operator".into()), "{phase}: {:?}", sim.actions);
        assert!(sim.resumed && !sim.paused && sim.throttle == 0.0, "{phase}: source not resumed unthrottled");
        assert_eq!(sim.actions[sim.actions.len() - 2..], ["ResumeSource", "Done"], "{phase}");
    }
    // Once Commit is asked for, the destination may be running the guest: too late.
    let mut sim = outrun();
    sim.cancel_on = Some("Commit");
    let (o, _) = sim.run(cfg(300, 30), None, true);
    assert_eq!((sim.cancel_held, o), (Some(false), Outcome::Completed));
}

#[test]
fn switchover_now_ends_pre_copy_at_the_next_round_within_the_pause_bound() {
    // A 1 ms target that nothing meets, and no throttle: left alone, this runs out of rounds and cancels.
    let pages = 1 << 18;
    let c = PrecopyConfig { throttle: false, ..cfg(1, 30) };
    let mut sim = Sim::new(pages, 125e6, 5000.0, pages / 10);
    let (o, _) = sim.run(c.clone(), None, true);
    assert!(matches!(o, Outcome::Cancelled(_)), "{o:?}");
    // Asked once it runs, it switches over at the end of round 0 (about 30 ms of pause: within the bound).
    let mut sim = Sim::new(pages, 125e6, 5000.0, pages / 10);
    let mut m = Precopy::new(c, Bitmap::full(pages), sim.now);
    assert!(m.switchover_now());
    let (o, rounds) = sim.drive(m);
    assert_eq!(o, Outcome::Completed);
    assert_eq!(rounds, 2, "round 0 and the final round");
}

#[test]
fn a_lower_downtime_target_mid_flight_takes_more_rounds_and_a_higher_one_fewer() {
    // 1 GiB at 1 Gbit/s, 20 000 pages/s over a 10 % hot set (about 860 ms to send when all of it is dirty).
    let pages = 1 << 18;
    let run = |target_from_round1: Option<u64>| {
        let mut sim = Sim::new(pages, 125e6, 20_000.0, pages / 10);
        if let Some(ms) = target_from_round1 {
            sim.change_at_round = Some((1, Box::new(move |m| m.set_downtime_target(Duration::from_millis(ms)))));
        }
        let m = Precopy::new(cfg(300, 30), Bitmap::full(pages), sim.now);
        let (o, m) = sim.run_machine(m, None, true);
        (o, m.rounds().len(), m.config().downtime_target, sim.max_throttle)
    };
    let (o, rounds, _, _) = run(None);
    assert_eq!(o, Outcome::Completed);
    // Lowered to 5 ms while round 1 goes out: more rounds, and the throttle to get there.
    let (o, low_rounds, target, throttle) = run(Some(5));
    assert_eq!((o, target), (Outcome::Completed, Duration::from_millis(5)));
    assert!(low_rounds > rounds && throttle > 0.0, "{low_rounds} rounds against {rounds}, throttle {throttle}");
    // Raised to 1.9 s: the pause after round 1 fits at once.
    let (o, high_rounds, _, _) = run(Some(1900));
    assert_eq!(o, Outcome::Completed);
    assert!(high_rounds < rounds, "{high_rounds} rounds against {rounds}");
    assert_eq!(high_rounds, 3, "round 0, round 1, the final round");
}

#[test]
fn a_max_throttle_caps_the_controller_and_lowers_a_throttle_in_force() {
    // The guest that outruns the link: the controller throttles it past 90 % to converge.
    let mut sim = outrun();
    let (o, _) = sim.run(cfg(300, 30), None, true);
    assert_eq!(o, Outcome::Completed);
    assert!(sim.max_throttle > 50.0, "{}", sim.max_throttle);
    // Capped at 50 % from the start: never above it, and at 50 % it cannot converge, so the timeout rule cancels.
    let mut sim = outrun();
    let (o, _) = sim.run(PrecopyConfig { max_throttle: 50.0, ..cfg(300, 8) }, None, true);
    assert!(sim.max_throttle <= 50.0 && sim.max_throttle > 0.0, "{}", sim.max_throttle);
    assert!(matches!(o, Outcome::Cancelled(ref r) if r.contains("not met")), "{o:?}");
    assert!(sim.resumed && sim.throttle == 0.0);
    // Lowered mid-flight to 20 % once the throttle is above it: lowered at once, before the next round is sent.
    let mut sim = outrun();
    sim.change_at_round = Some((3, Box::new(|m| m.set_max_throttle(20.0))));
    let (_, m) = sim.run(cfg(300, 8), None, true);
    assert!(sim.round_throttle[2] > 20.0, "{:?}", sim.round_throttle);
    assert!(sim.round_throttle[3..].iter().all(|&t| t <= 20.0), "{:?}", sim.round_throttle);
    assert_eq!(m.config().max_throttle, 20.0);
}

#[test]
fn the_eta_never_runs_backwards_and_reaches_zero() {
    for mut sim in [outrun(), Sim::new(1 << 18, 125e6, 20_000.0, 1 << 14)] {
        let (o, _) = sim.run(cfg(50, 30), None, true);
        assert_eq!(o, Outcome::Completed);
        let etas: Vec<Duration> = sim.etas.iter().filter_map(|&(_, e)| e).collect();
        assert!(etas.len() > 10, "{} estimates", etas.len());
        assert!(etas.windows(2).all(|w| w[1] <= w[0]), "the ETA grew: {etas:?}");
        // Round 0 of 1 GiB takes over 8 s; the first estimate knows most of it is still to come.
        assert!(etas[0] > Duration::from_secs(4), "{:?}", etas[0]);
        assert!(*etas.last().unwrap() < Duration::from_millis(100), "{:?}", etas.last());
    }
}

#[test]
fn a_live_change_is_a_new_plan_so_the_eta_starts_afresh() {
    let pages = 1 << 18;
    let mut sim = Sim::new(pages, 125e6, 20_000.0, pages / 10);
    let checked = std::rc::Rc::new(std::cell::Cell::new(false));
    let c = checked.clone();
    sim.change_at_round = Some((
        1,
        Box::new(move |m| {
            let before = m.eta(10_000).expect("a rate is measured by round 1");
            // A tenth of the bandwidth: the same pages take ten times as long, and the ETA says so.
            m.set_max_bandwidth(Some(12_500_000));
            let after = m.eta(10_000).unwrap();
            assert!(after > before * 5, "{before:?} then {after:?}");
            c.set(true);
        }),
    ));
    let (o, _) = sim.run(cfg(300, 30), None, true);
    assert_eq!(o, Outcome::Completed);
    assert!(checked.get(), "the change was never made");
}

#[test]
fn postcopy_always_switches_after_round_zero_and_pushes_what_is_left() {
    let mut sim = outrun();
    let c = PrecopyConfig { postcopy: PostcopyMode::Always, ..cfg(300, 30) };
    let (o, m) = sim.run(c, None, true);
    assert_eq!(o, Outcome::Completed);
    assert_eq!(
        sim.actions,
        ["SendRound", "Harvest", "Pause", "Harvest", "SendState", "Switch", "SendRound", "Verify", "Commit", "Done"]
    );
    let r = m.rounds();
    assert_eq!(r.len(), 2);
    // The push is every page dirtied during round 0 (and none twice), sent after the switch.
    assert!(r[1].last && r[1].dirty_pages > 0 && r[1].dirty_pages <= (1 << 19) / 10, "{:?}", r[1]);
    assert!(m.switched_at().is_some() && m.is_postcopy());
    assert_eq!(sim.max_throttle, 0.0, "post-copy never throttles");
    assert!(!sim.resumed, "the source never resumes once the destination runs the guest");
}

#[test]
fn postcopy_auto_switches_instead_of_throttling_past_the_limit() {
    // The guest outruns the link: pre-copy alone would throttle it past 50 %; auto switches instead.
    let mut sim = outrun();
    let c = PrecopyConfig { postcopy: PostcopyMode::Auto, max_throttle: 50.0, ..cfg(300, 30) };
    let (o, m) = sim.run(c, None, true);
    assert_eq!(o, Outcome::Completed);
    assert!(sim.actions.contains(&"Switch".to_string()), "{:?}", sim.actions);
    assert!(sim.max_throttle <= 50.0, "throttle {}", sim.max_throttle);
    assert!(m.switched_at().is_some());
    // A guest the link keeps up with converges by pre-copy, auto or not.
    let mut calm = Sim::new(1 << 18, 125e6, 5000.0, (1 << 18) / 10);
    let c = PrecopyConfig { postcopy: PostcopyMode::Auto, max_throttle: 50.0, ..cfg(50, 30) };
    let (o, m) = calm.run(c, None, true);
    assert_eq!(o, Outcome::Completed);
    assert!(m.switched_at().is_none() && !calm.actions.contains(&"Switch".to_string()), "{:?}", calm.actions);
}

#[test]
fn a_failure_after_the_switch_never_resumes_the_source() {
    // A link dies during the push: the destination runs the guest, so the source stays paused and keeps memory.
    let mut sim = outrun();
    let c = PrecopyConfig { postcopy: PostcopyMode::Always, ..cfg(300, 30) };
    let round0_batches = (1u64 << 19).div_ceil(64);
    let (o, _) = sim.run(c.clone(), Some(round0_batches + 3), true);
    assert!(matches!(o, Outcome::Failed(ref r) if r.contains("post-copy") && r.contains("stays paused")), "{o:?}");
    assert!(!sim.resumed && !sim.actions.contains(&"ResumeSource".to_string()), "{:?}", sim.actions);
    // A digest mismatch after the switch is a failure, loudly, and still no resume.
    let mut sim = outrun();
    let (o, _) = sim.run(c.clone(), None, false);
    assert!(matches!(o, Outcome::Failed(ref r) if r.contains("digest") && r.contains("post-copy")), "{o:?}");
    assert!(!sim.resumed);
    // A connection lost while the destination answers the switch: it may be running the guest already.
    let mut sim = outrun();
    sim.fail_on = Some("Switch");
    let (o, m) = sim.run(c.clone(), None, true);
    assert!(matches!(o, Outcome::Failed(ref r) if r.contains("stays paused")), "{o:?}");
    assert!(m.past_switch() && !sim.resumed, "{:?}", sim.actions);
    // Nor can an operator cancel once the switch is asked of the destination: the migration goes on to the end.
    let mut sim = outrun();
    sim.cancel_on = Some("Switch");
    let (o, _) = sim.run(c, None, true);
    assert_eq!((o, sim.cancel_held), (Outcome::Completed, Some(false)), "{:?}", sim.actions);
    assert!(!sim.resumed);
}
