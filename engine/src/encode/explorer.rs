//! The explorer: checks the codec model against outcomes, because a wire byte costs more than wire time (the kernel
//! copies, segments and shapes it on the same cores). Pure logic: its inputs are acknowledged pages, their ack time
//! and the process CPU so far; its output is the mode to force next.
//!
//! It runs short trials and keeps what delivered the most guest pages per second, and among modes within 3 % of the
//! best, what cost the least process CPU per page. It first tries each candidate send path (with `--send-path
//! auto`), then the codec modes: the incumbent first (the last winner, or the model's choice), then no compression,
//! zstd and lz4; a challenger below 90 % of the best rate is cut short, and one that lost by more than 15 % sits out
//! while the same mode keeps winning. When a later mode beats the stage's first, the first runs again before the
//! verdict, so that a destination still warming up does not favour whatever ran last. It keeps the winner for
//! [`EXPLOIT`], doubling while the same mode keeps winning (at once when it won by more than 15 %), up to
//! [`MAX_EXPLOIT`], and tries again. Its clock is the acks' timestamps, so it is deterministic under test.

use super::policy::{BatchCodec, SendPath};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long each trial runs, in ack time.
pub const TRIAL: Duration = Duration::from_millis(200);
/// The start of each trial that is not counted: batches encoded before the switch are still being acknowledged.
pub const SETTLE: Duration = Duration::from_millis(60);
/// How long a verdict holds before the next trial, the first time.
pub const EXPLOIT: Duration = Duration::from_secs(2);
/// The longest a verdict holds: each time the same mode wins again, its hold doubles up to this.
pub const MAX_EXPLOIT: Duration = Duration::from_secs(8);

/// What the explorer makes of the model's codec choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecMode {
    /// The model decides, none included.
    Model,
    /// Nothing is compressed.
    Off,
    /// Compressible pages are compressed with lz4.
    Lz4,
    /// Compressible pages are compressed with zstd.
    Zstd,
}

impl CodecMode {
    fn of(c: BatchCodec) -> CodecMode {
        match c {
            BatchCodec::None => CodecMode::Off,
            BatchCodec::Lz4 => CodecMode::Lz4,
            BatchCodec::Zstd => CodecMode::Zstd,
        }
    }
}

/// A mode the explorer can force: a send path and a codec mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// The send path.
    pub path: SendPath,
    /// The codec mode.
    pub codec: CodecMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Paths,
    Codec,
    Exploit,
}

/// Tries modes in turn and keeps the one that delivered guest pages fastest (the cheapest in CPU among near ties).
#[derive(Debug)]
pub struct Explorer {
    paths: Vec<SendPath>,
    codec: bool,
    stage: Stage,
    queue: VecDeque<Mode>,
    current: Option<Mode>,
    /// Trials done in this stage: the mode, its pages per second and its CPU seconds per page.
    tried: Vec<(Mode, f64, f64)>,
    since: Option<(Instant, f64)>,
    pages: u64,
    counted_from: Option<(Instant, f64)>,
    hold: Duration,
    last_winner: Option<Mode>,
    /// Verdicts so far: (compression won, no compression won).
    pub codec_verdicts: (u32, u32),
    /// The send path of the latest verdict.
    pub chosen_path: Option<SendPath>,
    /// The model's latest choice.
    pub model_choice: BatchCodec,
    /// Codec modes that lost by more than 15 %; they are not tried again while the same mode keeps winning.
    benched: Vec<CodecMode>,
    /// Whether the model finds compression hopeless ([`super::SendPolicy::hopeless`]): then it is not tried.
    pub compression_hopeless: bool,
    /// Whether the kernel has reported copying zero-copy sends: then zero-copy saves nothing and loses its trial.
    pub zerocopy_copies: bool,
    /// Whether this stage's first mode has had its second trial (see [`Explorer::next`]).
    rechecked: bool,
}

impl Explorer {
    /// An explorer over `paths` (one unless the path is `auto`), and compression on or off when `codec`.
    pub fn new(paths: Vec<SendPath>, codec: bool) -> Self {
        let mut e = Explorer {
            paths,
            codec,
            stage: Stage::Paths,
            queue: VecDeque::new(),
            current: None,
            tried: Vec::new(),
            since: None,
            pages: 0,
            counted_from: None,
            hold: EXPLOIT,
            last_winner: None,
            codec_verdicts: (0, 0),
            chosen_path: None,
            model_choice: BatchCodec::None,
            benched: Vec::new(),
            compression_hopeless: false,
            zerocopy_copies: false,
            rechecked: false,
        };
        if e.paths.len() > 1 {
            e.queue = e.paths.iter().map(|&path| Mode { path, codec: CodecMode::Model }).collect();
        } else {
            e.stage = Stage::Codec;
            e.queue = e.codec_arms(e.paths[0]);
        }
        e
    }

    fn codec_arms(&self, path: SendPath) -> VecDeque<Mode> {
        if self.codec && self.compression_hopeless {
            [Mode { path, codec: CodecMode::Off }].into_iter().collect()
        } else if self.codec {
            // The incumbent runs first, so that a challenger's trial can end early when it is clearly losing: the last
            // winner, or before any verdict what the model was doing.
            let first = match self.last_winner {
                Some(w) if w.codec != CodecMode::Model => w.codec,
                _ => CodecMode::of(self.model_choice),
            };
            // An arm that lost by a wide margin sits out while the same mode keeps winning.
            let rest = [CodecMode::Off, CodecMode::Zstd, CodecMode::Lz4]
                .into_iter()
                .filter(|&c| c != first && !self.benched.contains(&c));
            std::iter::once(first).chain(rest).map(|codec| Mode { path, codec }).collect()
        } else {
            VecDeque::new()
        }
    }

    /// The mode to run before any verdict.
    pub fn first(&self) -> Mode {
        self.queue.front().copied().unwrap_or(Mode { path: self.paths[0], codec: CodecMode::Model })
    }

    /// Counts `pages` acknowledged at `at`, when the process had used `cpu_s` CPU seconds in all; returns the mode to
    /// force from now on when it changes.
    pub fn observe(&mut self, pages: u64, at: Instant, cpu_s: f64) -> Option<Mode> {
        let Some(current) = self.current else {
            // The first ack starts the first trial (or, with nothing to try, the one verdict).
            return self.next(at, cpu_s);
        };
        if current.path == SendPath::ZeroCopy && self.zerocopy_copies && self.stage == Stage::Paths {
            // The kernel copies these sends anyway (loopback, or a veth peer in this host): zero-copy only adds the
            // pinning and the completions. It loses without a full trial.
            self.tried.push((current, 0.0, f64::INFINITY));
            return self.next(at, cpu_s);
        }
        let (since, _) = *self.since.get_or_insert((at, cpu_s));
        let elapsed = at.saturating_duration_since(since);
        if elapsed >= SETTLE {
            let (from, cpu0) = *self.counted_from.get_or_insert((at, cpu_s));
            self.pages += pages;
            let span = at.saturating_duration_since(from).as_secs_f64().max(1e-6);
            let rate = self.pages as f64 / span;
            let cpu_per_page = (cpu_s - cpu0).max(0.0) / self.pages.max(1) as f64;
            if self.stage != Stage::Exploit {
                let best = self.tried.iter().map(|t| t.1).fold(0.0, f64::max);
                // A trial that is clearly losing ends early: each of its milliseconds costs real time.
                let losing = elapsed >= SETTLE + TRIAL / 4 && rate < best * 0.9;
                if elapsed >= TRIAL || losing {
                    self.tried.push((current, rate, cpu_per_page));
                    return self.next(at, cpu_s);
                }
            }
        }
        if self.stage == Stage::Exploit && elapsed >= self.hold {
            self.stage = Stage::Codec;
            self.tried.clear();
            self.queue = self.codec_arms(current.path);
            return self.next(at, cpu_s);
        }
        None
    }

    /// Starts the next trial, or, when the stage's trials are done, moves on with its winner.
    fn next(&mut self, at: Instant, cpu_s: f64) -> Option<Mode> {
        self.since = Some((at, cpu_s));
        self.counted_from = None;
        self.pages = 0;
        while let Some(m) = self.queue.pop_front() {
            if m.codec != CodecMode::Off && m.codec != CodecMode::Model && self.compression_hopeless {
                continue;
            }
            self.stage = if self.stage == Stage::Exploit { Stage::Codec } else { self.stage };
            return self.switch(m);
        }
        let winner = self.winner();
        // The stage's first trial ran under the oldest conditions: a destination still faulting its memory in, a link
        // still ramping up. When a later trial beats it, it runs once more, so that the verdict weighs modes measured
        // under like conditions rather than early against late; its first figure is dropped.
        if let Some(&(first, rate, _)) = self.tried.first() {
            if !self.rechecked && winner != first && rate > 0.0 {
                self.rechecked = true;
                self.tried.remove(0);
                return self.switch(first);
            }
        }
        self.rechecked = false;
        if self.stage == Stage::Paths && self.codec {
            // The paths were tried with the model's codecs; now the best one with compression off, then on.
            self.stage = Stage::Codec;
            self.tried.clear();
            self.queue = self.codec_arms(winner.path);
            let m = self.queue.pop_front().expect("two codec arms");
            return self.switch(m);
        }
        if self.codec && self.tried.len() > 1 {
            if winner.codec != CodecMode::Off {
                self.codec_verdicts.0 += 1;
            } else {
                self.codec_verdicts.1 += 1;
            }
        }
        let best = self.tried.iter().map(|t| t.1).fold(0.0, f64::max);
        let runner_up = self.tried.iter().filter(|t| t.0 != winner).map(|t| t.1).fold(0.0, f64::max);
        if self.last_winner != Some(winner) {
            self.benched.clear();
        }
        self.benched.extend(self.tried.iter().filter(|t| t.1 < best * 0.85).map(|t| t.0.codec));
        self.hold = if runner_up < best * 0.85 {
            // Won by a wide margin: conditions would have to change a lot to overturn it.
            MAX_EXPLOIT
        } else if self.last_winner == Some(winner) {
            (self.hold * 2).min(MAX_EXPLOIT)
        } else {
            EXPLOIT
        };
        self.last_winner = Some(winner);
        self.chosen_path = Some(winner.path);
        self.stage = Stage::Exploit;
        self.switch(winner)
    }

    fn switch(&mut self, m: Mode) -> Option<Mode> {
        let changed = self.current != Some(m);
        self.current = Some(m);
        changed.then_some(m)
    }

    /// Among the tried modes within 3 % of the best rate, the one with the least CPU per page; ties go to the earliest.
    fn winner(&self) -> Mode {
        let best = self.tried.iter().map(|t| t.1).fold(0.0, f64::max);
        self.tried
            .iter()
            .filter(|t| t.1 >= best * 0.97)
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map(|t| t.0)
            .unwrap_or_else(|| self.current.unwrap_or(Mode { path: self.paths[0], codec: CodecMode::Model }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Runs the explorer with acks every 5 ms; `pages(mode)` and `cpu(mode)` say what each mode delivers and costs.
    fn run(paths: Vec<SendPath>, pages: impl Fn(Mode) -> u64, cpu: impl Fn(Mode) -> f64) -> (Explorer, Mode) {
        let mut ex = Explorer::new(paths, true);
        let t0 = Instant::now();
        let mut mode = ex.first();
        let mut cpu_s = 0.0;
        for i in 0..800u64 {
            cpu_s += cpu(mode);
            if let Some(m) = ex.observe(pages(mode), at(t0, 5 * i), cpu_s) {
                mode = m;
            }
        }
        (ex, mode)
    }

    #[test]
    fn explorer_keeps_the_faster_codec_mode() {
        // zstd delivers most pages (a slow link); lz4 a little less; off least.
        let rate = |m: Mode| match m.codec {
            CodecMode::Zstd => 130,
            CodecMode::Lz4 => 115,
            _ => 100,
        };
        let (ex, m) = run(vec![SendPath::Copy], rate, |_| 0.001);
        assert!(
            m.codec == CodecMode::Zstd && ex.codec_verdicts == (ex.codec_verdicts.0, 0),
            "{m:?} {:?}",
            ex.codec_verdicts
        );
        assert!(ex.codec_verdicts.0 >= 1);
        // Compression loses (a fast link).
        let (ex, m) = run(vec![SendPath::Copy], |m| if m.codec == CodecMode::Off { 120 } else { 100 }, |_| 0.001);
        assert!(
            m.codec == CodecMode::Off && ex.codec_verdicts.1 >= 1 && ex.codec_verdicts.0 == 0,
            "{m:?} {:?}",
            ex.codec_verdicts
        );
    }

    #[test]
    fn explorer_picks_the_fastest_path_and_breaks_ties_by_cpu() {
        // Vectored delivers most.
        let fast = |m: Mode| if m.path == SendPath::Vectored { 130 } else { 100 };
        let (ex, m) = run(SendPath::ALL.to_vec(), fast, |_| 0.001);
        assert_eq!((m.path, ex.chosen_path), (SendPath::Vectored, Some(SendPath::Vectored)));
        // All paths deliver the same (the link is the bottleneck): the one that costs least CPU wins.
        let cheap = |m: Mode| if m.path == SendPath::ZeroCopy { 0.0005 } else { 0.001 };
        let (_, m) = run(SendPath::ALL.to_vec(), |_| 100, cheap);
        assert_eq!(m.path, SendPath::ZeroCopy);
    }

    #[test]
    fn zero_copy_that_the_kernel_copies_loses_its_trial_at_once() {
        let mut ex = Explorer::new(vec![SendPath::ZeroCopy, SendPath::Copy], false);
        ex.zerocopy_copies = true;
        let t0 = Instant::now();
        let mut modes = Vec::new();
        for i in 0..200u64 {
            if let Some(m) = ex.observe(100, at(t0, 5 * i), 0.0) {
                modes.push((5 * i, m.path));
            }
        }
        // Zero-copy starts (first ack), is dropped on the next one, and copy wins although it was no faster.
        assert_eq!(modes[..2], [(0, SendPath::ZeroCopy), (5, SendPath::Copy)], "{modes:?}");
        assert_eq!(ex.chosen_path, Some(SendPath::Copy));
    }

    #[test]
    fn a_destination_that_warms_up_during_the_trials_does_not_decide_the_codec() {
        // Every mode delivers the same, but the destination is faulting its memory in: whatever runs first gets a
        // third of what runs later. Compression costs more CPU, so off should win once measured under like conditions.
        let mut ex = Explorer::new(vec![SendPath::Vectored], true);
        let t0 = Instant::now();
        let (mut mode, mut cpu_s, mut trials) = (ex.first(), 0.0, vec![]);
        for i in 0..1000u64 {
            let warm = (5 * i).min(450) as f64 / 450.0;
            cpu_s += if mode.codec == CodecMode::Off { 0.001 } else { 0.002 };
            if let Some(m) = ex.observe(crate::num::u64_saturating(40.0 + 80.0 * warm), at(t0, 5 * i), cpu_s) {
                trials.push(m.codec);
                mode = m;
            }
        }
        // Off first (cold), then the challengers (warmer); lz4, tried last, beats off's cold figure, so off runs again
        // and wins. Later rounds of trials only confirm it.
        use CodecMode::{Lz4, Off, Zstd};
        assert_eq!(trials[..4], [Off, Zstd, Lz4, Off], "{trials:?}");
        assert_eq!(mode.codec, Off, "trials: {trials:?}");
    }

    #[test]
    fn a_repeated_verdict_holds_longer() {
        let mut ex = Explorer::new(vec![SendPath::Copy], true);
        let t0 = Instant::now();
        let mut switches = Vec::new();
        for i in 0..4000u64 {
            if ex.observe(100, at(t0, 5 * i), 0.0).is_some() {
                switches.push(5 * i);
            }
        }
        // Equal rates and CPU: off, the model's choice and tried first, keeps winning, and the holds between trials
        // grow 2, 4, 8, 8 s.
        let gaps: Vec<u64> = switches.windows(2).map(|w| w[1] - w[0]).filter(|&g| g > 1000).collect();
        assert!(gaps.len() >= 3 && gaps[1] > gaps[0] && gaps[2] > gaps[1], "{switches:?}");
    }
}
