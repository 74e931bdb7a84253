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
//! - An [`Explorer`] (`encode::explorer`) checks the model against outcomes with short trials, and forces the mode
//!   that delivered guest pages fastest; [`SharedMode`] carries its verdict to the encoders without a lock.

use super::explorer::{CodecMode, Explorer, Mode};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How raw pages get from guest memory to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SendPath {
    /// Each raw page is copied into the batch buffer, and the buffer is written.
    Copy,
    /// Raw pages stay in guest memory; the frame is written with `sendmsg` iovecs that point at them.
    Vectored,
    /// As `Vectored`, with `MSG_ZEROCOPY`: the kernel sends from the guest's pages and reports completion later.
    #[cfg_attr(feature = "clap", value(name = "zerocopy"))]
    ZeroCopy,
    /// As `Vectored`, with every link's `sendmsg` submitted to one io_uring for the side. Chosen by name only:
    /// `auto` does not try it (see docs/benchmarks.md for why).
    Uring,
}

impl SendPath {
    /// Every path `auto` tries, in its order (`Uring` only by name).
    pub const ALL: [SendPath; 3] = [SendPath::Vectored, SendPath::ZeroCopy, SendPath::Copy];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            SendPath::Copy => "copy",
            SendPath::Vectored => "vectored",
            SendPath::ZeroCopy => "zerocopy",
            SendPath::Uring => "uring",
        }
    }

    /// Whether raw pages are sent from guest memory in place.
    pub fn in_place(self) -> bool {
        self != SendPath::Copy
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            SendPath::Copy => 0,
            SendPath::Vectored => 1,
            SendPath::ZeroCopy => 2,
            SendPath::Uring => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> SendPath {
        match c {
            0 => SendPath::Copy,
            2 => SendPath::ZeroCopy,
            3 => SendPath::Uring,
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

/// A [`Mode`] in one atomic byte, so that the encoders read the explorer's verdict per batch without its lock: the
/// send path's code in the low six bits, the codec mode in the top two.
#[derive(Debug)]
pub struct SharedMode(AtomicU8);

impl SharedMode {
    /// Holds `m`.
    pub fn new(m: Mode) -> Self {
        SharedMode(AtomicU8::new(Self::pack(m)))
    }

    fn pack(m: Mode) -> u8 {
        let codec = match m.codec {
            CodecMode::Model => 0,
            CodecMode::Off => 1,
            CodecMode::Lz4 => 2,
            CodecMode::Zstd => 3,
        };
        m.path.code() | codec << 6
    }

    /// The mode held now.
    pub fn load(&self) -> Mode {
        let v = self.0.load(Ordering::Relaxed);
        let codec = match v >> 6 {
            0 => CodecMode::Model,
            1 => CodecMode::Off,
            2 => CodecMode::Lz4,
            _ => CodecMode::Zstd,
        };
        Mode { path: SendPath::from_code(v & 0x3f), codec }
    }

    /// Holds `m` from now on.
    pub fn store(&self, m: Mode) {
        self.0.store(Self::pack(m), Ordering::Relaxed);
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
    /// The explorer's mode, read by every encoder per batch.
    mode: SharedMode,
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
    /// The clock the encoders time their compression with.
    stopwatch: Stopwatch,
}

/// Nanoseconds on a monotonic clock: what an encoder reads before and after it compresses, to tell the policy what
/// each codec costs. The process's clock by default; a test gives its own, so that what the model learns is exact.
pub type Stopwatch = fn() -> u64;

/// Nanoseconds since the first call, on the monotonic clock.
pub fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
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
            mode: SharedMode::new(first),
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
            stopwatch: monotonic_nanos,
        }
    }

    /// The same policy with the encoders timing their compression on `stopwatch`.
    pub fn with_stopwatch(self, stopwatch: Stopwatch) -> Self {
        SendPolicy { stopwatch, ..self }
    }

    /// Nanoseconds on the encoders' clock.
    pub(crate) fn stopwatch(&self) -> u64 {
        (self.stopwatch)()
    }

    /// Nanoseconds the encoders have spent compressing, all together.
    pub fn compress_nanos(&self) -> u64 {
        self.compress_nanos.load(Ordering::Relaxed)
    }

    /// A policy that always uses `codec` and `path`: no model, no probes, no trials.
    pub fn pinned(codec: BatchCodec, path: SendPath) -> Self {
        SendPolicy { pinned: Some(codec), ..SendPolicy::new(codec != BatchCodec::None, vec![path]) }
    }

    /// The send path in force.
    pub fn path(&self) -> SendPath {
        self.mode.load().path
    }

    /// The driver's latest measurements at `now` (an ack's time): link goodput in bytes per second, and idle cores on
    /// this machine.
    pub fn set_link(&self, rate_bps: u64, spare_cpus: f64, now: Instant) {
        self.link_rate_bps.store(rate_bps, Ordering::Relaxed);
        let total = self.compress_nanos.load(Ordering::Relaxed);
        let mut seen = self.compress_seen.lock().unwrap_or_else(|e| e.into_inner());
        match *seen {
            // Spans under 50 ms are too short to measure: the last figure stands.
            Some((at, before)) if now.saturating_duration_since(at) >= Duration::from_millis(50) => {
                let span = now.saturating_duration_since(at).as_nanos() as f64;
                self.compressing_milli
                    .store(crate::num::u64_saturating((total - before) as f64 / span * 1000.0), Ordering::Relaxed);
                *seen = Some((now, total));
            }
            Some(_) => {}
            None => *seen = Some((now, total)),
        }
        let compressing = self.compressing_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let free = spare_cpus.max(0.0) + compressing;
        self.spare_milli_cpus.store(crate::num::u64_saturating(free * 1000.0), Ordering::Relaxed);
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
        match self.mode.load().codec {
            CodecMode::Off => BatchCodec::None,
            CodecMode::Lz4 => BatchCodec::Lz4,
            CodecMode::Zstd => BatchCodec::Zstd,
            CodecMode::Model => {
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
            self.mode.store(m);
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

    #[test]
    fn a_shared_mode_holds_every_path_and_codec_mode() {
        for path in SendPath::ALL.into_iter().chain([SendPath::Uring]) {
            for codec in [CodecMode::Model, CodecMode::Off, CodecMode::Lz4, CodecMode::Zstd] {
                let m = Mode { path, codec };
                let shared = SharedMode::new(Mode { path: SendPath::Copy, codec: CodecMode::Model });
                shared.store(m);
                assert_eq!(shared.load(), m);
            }
        }
    }

    #[test]
    fn the_model_picks_the_codec_that_finishes_first() {
        let p = SendPolicy::new(true, vec![SendPath::Copy]);
        let t0 = Instant::now();
        let b = 1 << 18;
        assert_eq!(p.best(b, true), BatchCodec::None, "no link measurement yet");
        // 1 Gbit/s and an idle core: zstd's extra CPU hides behind the wire, and its smaller output wins.
        p.set_link(125_000_000, 1.0, t0);
        assert_eq!(p.best(b, true), BatchCodec::Zstd);
        // 2.5 GB/s and a busy machine: the wire is faster than either codec.
        p.set_link(2_500_000_000, 0.2, t0 + Duration::from_millis(100));
        assert_eq!(p.best(b, true), BatchCodec::None);
        // Forced on, the better codec is used anyway; on the fast busy link that is the cheaper one, lz4.
        assert_eq!(p.best(b, false), BatchCodec::Lz4);
        // Pages that do not shrink turn both codecs off.
        p.set_link(125_000_000, 1.0, t0);
        for _ in 0..40 {
            p.record(BatchCodec::Lz4, 4096, 4090, 3000, 1, 1);
            p.record(BatchCodec::Zstd, 4096, 4095, 9000, 1, 1);
        }
        assert_eq!(p.best(b, true), BatchCodec::None);
        assert_eq!(SendPolicy::new(false, vec![SendPath::Copy]).choose(b, 5), BatchCodec::None);
    }
}
