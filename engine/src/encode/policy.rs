//! How batches leave: which codec (none, lz4, zstd) and which send path (a copy, or pages read in place).
//!
//! Two layers decide, and the encoders ask them once per batch ([`SendPolicy::choose`]):
//!
//! - A **model** picks the codec. For each of none, lz4 and zstd it estimates when the batch would be done: the CPU
//!   time to compress the pages that look compressible (measured per core, per codec, on the batches actually
//!   compressed) and the wire time of what is left (at the link goodput measured from acks). The encoders run beside
//!   the link writers, so where cores are free the two overlap and the batch is done at the later of
//!   `cpu / free cores` and the wire time. Free cores are the idle ones the OS reports plus those the encoders spend
//!   compressing now, which another codec would have too. With less than half a core free, the two still overlap when
//!   one core compresses a batch faster than the link sends it (the encoders wait on the link anyway), and add up
//!   otherwise. The soonest codec wins. Per worker, one batch in [`PROBE_EVERY`] is compressed with lz4 and one with
//!   zstd whatever the model says, so that both codecs stay measured (one in 16 × that where compression is
//!   [hopeless](SendPolicy::hopeless)).
//! - An [`Explorer`] checks the model against outcomes, because a wire byte costs more than wire time: the kernel
//!   copies, segments and shapes it on the same cores. It runs short trials and keeps what delivered the most guest
//!   pages per second, and among modes within 3 % of the best, what cost the least process CPU per page. It first tries
//!   each candidate send path (with `--send-path auto`), then the codec modes: the incumbent first (the last winner,
//!   or the model's choice), then no compression, zstd and lz4; a challenger below 90 % of the best rate is cut short,
//!   and one that lost by more than 15 % sits out while the same mode keeps winning. It keeps the winner for
//!   [`EXPLOIT`], doubling while the same mode keeps winning (at once when it won by more than 15 %), up to
//!   [`MAX_EXPLOIT`], and tries again. Its clock is the acks' timestamps, so it is deterministic under test.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How raw pages get from guest memory to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SendPath {
    /// Each raw page is copied into the batch buffer, and the buffer is written.
    Copy,
    /// Raw pages stay in guest memory; the frame is written with `sendmsg` iovecs that point at them.
    Vectored,
    /// As `Vectored`, with `MSG_ZEROCOPY`: the kernel sends from the guest's pages and reports completion later.
    ZeroCopy,
}

impl SendPath {
    /// Every path, in the order `auto` tries them.
    pub const ALL: [SendPath; 3] = [SendPath::Vectored, SendPath::ZeroCopy, SendPath::Copy];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            SendPath::Copy => "copy",
            SendPath::Vectored => "vectored",
            SendPath::ZeroCopy => "zerocopy",
        }
    }

    /// Whether raw pages are sent from guest memory in place.
    pub fn in_place(self) -> bool {
        self != SendPath::Copy
    }

    fn code(self) -> u8 {
        match self {
            SendPath::Copy => 0,
            SendPath::Vectored => 1,
            SendPath::ZeroCopy => 2,
        }
    }

    fn from_code(c: u8) -> SendPath {
        match c {
            0 => SendPath::Copy,
            2 => SendPath::ZeroCopy,
            _ => SendPath::Vectored,
        }
    }
}

/// What a batch is compressed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BatchCodec {
    /// Nothing compressed.
    None = 0,
    /// Compressible pages each become an lz4 block.
    Lz4 = 1,
    /// Compressible pages together become one zstd frame.
    Zstd = 2,
}

/// Compression counts as hopeless when the model's better codec takes this many times as long as sending raw.
pub const HOPELESS: f64 = 1.5;

/// zstd's level: 3 compresses the text pages of a batch to 29 % against level 1's 31 %, at 80 % of its speed.
pub const ZSTD_LEVEL: i32 = 3;

/// Per worker, one batch in this many is compressed with lz4 and one with zstd, whatever the policy says, to keep both
/// codecs measured.
pub const PROBE_EVERY: u64 = 64;

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
    /// Whether the model finds compression hopeless ([`SendPolicy::hopeless`]): then it is not tried.
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

/// Per-codec measurements, smoothed.
#[derive(Debug)]
struct CodecStats {
    /// Compression cost in picoseconds per input byte.
    ps_per_byte: AtomicU64,
    /// Output over input, in thousandths.
    ratio_milli: AtomicU64,
}

impl CodecStats {
    fn new(ps_per_byte: u64, ratio_milli: u64) -> Self {
        CodecStats { ps_per_byte: AtomicU64::new(ps_per_byte), ratio_milli: AtomicU64::new(ratio_milli) }
    }
}

fn blend(a: &AtomicU64, sample: u64) {
    let old = a.load(Ordering::Relaxed);
    a.store((old * 7 + sample) / 8, Ordering::Relaxed);
}

/// The shared decision state: the encoders ask it per batch, the driver feeds it link measurements and acks.
#[derive(Debug)]
pub struct SendPolicy {
    compress: bool,
    /// A codec fixed by [`SendPolicy::pinned`], for benchmarks and tests.
    pinned: Option<BatchCodec>,
    explorer: Mutex<Explorer>,
    /// The explorer's mode: the path's code, plus 0x40 for compression off, 0x80 for lz4 or 0xc0 for zstd.
    mode: AtomicU8,
    link_rate_bps: AtomicU64,
    /// Cores free for compression, in thousandths: idle ones as the OS reports them, plus those the encoders spend
    /// compressing now (another codec would have them too).
    spare_milli_cpus: AtomicU64,
    /// Nanoseconds spent compressing, all workers, and the (time, total) when the driver last looked.
    compress_nanos: AtomicU64,
    compress_seen: Mutex<Option<(Instant, u64)>>,
    /// Cores the encoders spent compressing over the last span, in thousandths.
    compressing_milli: AtomicU64,
    /// The model's latest choice (the explorer's first incumbent), as a `BatchCodec` discriminant.
    model_choice: AtomicU8,
    /// Whether a link has reported the kernel copying its zero-copy sends.
    zerocopy_copies: std::sync::atomic::AtomicBool,
    lz4: CodecStats,
    zstd: CodecStats,
    /// Share of non-zero pages that look compressible, in thousandths, smoothed.
    compressible_milli: AtomicU64,
}

impl SendPolicy {
    /// A policy that may compress when `compress`, over the candidate send `paths` (more than one: `auto`).
    pub fn new(compress: bool, paths: Vec<SendPath>) -> Self {
        assert!(!paths.is_empty(), "at least one send path");
        let explorer = Explorer::new(paths, compress);
        let first = explorer.first();
        SendPolicy {
            compress,
            pinned: None,
            mode: AtomicU8::new(first.path.code()),
            explorer: Mutex::new(explorer),
            link_rate_bps: AtomicU64::new(0),
            spare_milli_cpus: AtomicU64::new(0),
            compress_nanos: AtomicU64::new(0),
            compress_seen: Mutex::new(None),
            compressing_milli: AtomicU64::new(0),
            model_choice: AtomicU8::new(BatchCodec::None as u8),
            zerocopy_copies: std::sync::atomic::AtomicBool::new(false),
            // Typical figures until measured: lz4 about 4 ns per byte of text and 63 %, zstd about 8 ns and 30 %.
            lz4: CodecStats::new(4000, 630),
            zstd: CodecStats::new(8000, 300),
            compressible_milli: AtomicU64::new(500),
        }
    }

    /// A policy that always uses `codec` and `path`: no model, no probes, no trials.
    pub fn pinned(codec: BatchCodec, path: SendPath) -> Self {
        SendPolicy { pinned: Some(codec), ..SendPolicy::new(codec != BatchCodec::None, vec![path]) }
    }

    /// The send path in force.
    pub fn path(&self) -> SendPath {
        SendPath::from_code(self.mode.load(Ordering::Relaxed) & 0x3f)
    }

    /// The driver's latest measurements: link goodput in bytes per second, and idle cores on this machine.
    pub fn set_link(&self, rate_bps: u64, spare_cpus: f64) {
        self.link_rate_bps.store(rate_bps, Ordering::Relaxed);
        let now = Instant::now();
        let total = self.compress_nanos.load(Ordering::Relaxed);
        let mut seen = self.compress_seen.lock().unwrap_or_else(|e| e.into_inner());
        match *seen {
            // Spans under 50 ms are too short to measure: the last figure stands.
            Some((at, before)) if now.saturating_duration_since(at) >= Duration::from_millis(50) => {
                let span = now.saturating_duration_since(at).as_nanos() as f64;
                self.compressing_milli.store(((total - before) as f64 / span * 1000.0) as u64, Ordering::Relaxed);
                *seen = Some((now, total));
            }
            Some(_) => {}
            None => *seen = Some((now, total)),
        }
        let compressing = self.compressing_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let free = spare_cpus.max(0.0) + compressing;
        self.spare_milli_cpus.store((free * 1000.0) as u64, Ordering::Relaxed);
    }

    /// The codec for the next batch of about `batch_bytes` raw bytes, and the `n`th batch of its worker (for probes).
    pub fn choose(&self, batch_bytes: u64, n: u64) -> BatchCodec {
        if let Some(c) = self.pinned {
            return c;
        }
        if !self.compress {
            return BatchCodec::None;
        }
        // Where compression is hopeless, one probe in 16 keeps the figures fresh enough to notice the link slowing.
        let every = if self.hopeless(batch_bytes) { PROBE_EVERY * 16 } else { PROBE_EVERY };
        match n % every {
            1 => return BatchCodec::Lz4,
            2 => return BatchCodec::Zstd,
            _ => {}
        }
        match self.mode.load(Ordering::Relaxed) & 0xc0 {
            0x40 => BatchCodec::None,
            0x80 => BatchCodec::Lz4,
            0xc0 => BatchCodec::Zstd,
            _ => {
                let c = self.best(batch_bytes, true);
                self.model_choice.store(c as u8, Ordering::Relaxed);
                c
            }
        }
    }

    /// The model's pick: the codec that finishes a batch soonest. With `allow_none` false, the better of the two codecs
    /// (none only when neither shrinks pages at all).
    pub fn best(&self, batch_bytes: u64, allow_none: bool) -> BatchCodec {
        if self.link_rate_bps.load(Ordering::Relaxed) == 0 && allow_none {
            // Nothing measured yet: the link is not known to be the bottleneck.
            return BatchCodec::None;
        }
        let (none, lz4, zstd) = self.costs(batch_bytes);
        let none = if allow_none { none } else { f64::INFINITY };
        if none <= lz4 && none <= zstd {
            BatchCodec::None
        } else if zstd < lz4 {
            BatchCodec::Zstd
        } else {
            BatchCodec::Lz4
        }
    }

    /// Whether the model finds compression hopeless: the better codec would take more than [`HOPELESS`] times as long
    /// as sending raw. Then neither the explorer's trials nor most probes are worth their CPU.
    pub fn hopeless(&self, batch_bytes: u64) -> bool {
        if self.link_rate_bps.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let (none, lz4, zstd) = self.costs(batch_bytes);
        lz4.min(zstd) > none * HOPELESS
    }

    /// The model's time for a batch of `batch_bytes`: sent raw, with lz4, with zstd.
    fn costs(&self, batch_bytes: u64) -> (f64, f64, f64) {
        let rate = self.link_rate_bps.load(Ordering::Relaxed).max(1) as f64;
        let b = batch_bytes as f64;
        let input = b * self.compressible_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let spare = self.spare_milli_cpus.load(Ordering::Relaxed) as f64 / 1000.0;
        let done_at = |cpu_s: f64, wire_s: f64| {
            if spare >= 0.5 {
                (cpu_s / spare).max(wire_s)
            } else if cpu_s < wire_s {
                // No core is idle, but one encoder compresses a batch faster than the link sends one: the link is the
                // bottleneck, the encoders wait on it, and that wait is what compression uses.
                wire_s
            } else {
                // The codec is slower than the link: the encoders are the bottleneck, and CPU and wire add up.
                cpu_s + wire_s
            }
        };
        let cost = |s: &CodecStats| {
            let ratio = s.ratio_milli.load(Ordering::Relaxed) as f64 / 1000.0;
            if ratio >= 0.95 {
                return f64::INFINITY;
            }
            let cpu = input * s.ps_per_byte.load(Ordering::Relaxed) as f64 * 1e-12;
            done_at(cpu, (b - input * (1.0 - ratio)) / rate)
        };
        (b / rate, cost(&self.lz4), cost(&self.zstd))
    }

    /// `pages` guest pages were acknowledged at `at`, with `cpu_s` process CPU seconds used so far: drives the trials.
    pub fn observe(&self, pages: u64, at: Instant, cpu_s: f64) {
        if self.pinned.is_some() {
            return;
        }
        let mut ex = self.explorer.lock().unwrap_or_else(|e| e.into_inner());
        ex.model_choice = match self.model_choice.load(Ordering::Relaxed) {
            1 => BatchCodec::Lz4,
            2 => BatchCodec::Zstd,
            _ => BatchCodec::None,
        };
        ex.compression_hopeless = self.hopeless((crate::encode::BATCH_PAGES * crate::guest::PAGE_SIZE) as u64);
        ex.zerocopy_copies = self.zerocopy_copies.load(Ordering::Relaxed);
        if let Some(m) = ex.observe(pages, at, cpu_s) {
            let codec = match m.codec {
                CodecMode::Model => 0,
                CodecMode::Off => 0x40,
                CodecMode::Lz4 => 0x80,
                CodecMode::Zstd => 0xc0,
            };
            self.mode.store(m.path.code() | codec, Ordering::Relaxed);
        }
    }

    /// A link's kernel reported that it copied zero-copy sends after all.
    pub fn note_zerocopy_copied(&self) {
        self.zerocopy_copies.store(true, Ordering::Relaxed);
    }

    /// Folds one compressed batch's figures into the estimates: `input` bytes compressed to `output` in `nanos`;
    /// `looked` pages looked compressible of `nonzero`.
    pub(crate) fn record(&self, codec: BatchCodec, input: u64, output: u64, nanos: u64, looked: u64, nonzero: u64) {
        let stats = match codec {
            BatchCodec::Lz4 => &self.lz4,
            BatchCodec::Zstd => &self.zstd,
            BatchCodec::None => return,
        };
        self.compress_nanos.fetch_add(nanos, Ordering::Relaxed);
        if let (Some(ps), Some(ratio)) = ((nanos * 1000).checked_div(input), (output * 1000).checked_div(input)) {
            blend(&stats.ps_per_byte, ps);
            blend(&stats.ratio_milli, ratio);
        }
        if let Some(share) = (looked * 1000).checked_div(nonzero) {
            blend(&self.compressible_milli, share);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_model_picks_the_codec_that_finishes_first() {
        let p = SendPolicy::new(true, vec![SendPath::Copy]);
        let b = 1 << 18;
        assert_eq!(p.best(b, true), BatchCodec::None, "no link measurement yet");
        // 1 Gbit/s and an idle core: zstd's extra CPU hides behind the wire, and its smaller output wins.
        p.set_link(125_000_000, 1.0);
        assert_eq!(p.best(b, true), BatchCodec::Zstd);
        // 2.5 GB/s and a busy machine: the wire is faster than either codec.
        p.set_link(2_500_000_000, 0.2);
        assert_eq!(p.best(b, true), BatchCodec::None);
        // Forced on, the better codec is used anyway; on the fast busy link that is the cheaper one, lz4.
        assert_eq!(p.best(b, false), BatchCodec::Lz4);
        // Pages that do not shrink turn both codecs off.
        p.set_link(125_000_000, 1.0);
        for _ in 0..40 {
            p.record(BatchCodec::Lz4, 4096, 4090, 3000, 1, 1);
            p.record(BatchCodec::Zstd, 4096, 4095, 9000, 1, 1);
        }
        assert_eq!(p.best(b, true), BatchCodec::None);
        assert_eq!(SendPolicy::new(false, vec![SendPath::Copy]).choose(b, 5), BatchCodec::None);
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
            if let Some(m) = ex.observe((40.0 + 80.0 * warm) as u64, at(t0, 5 * i), cpu_s) {
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
