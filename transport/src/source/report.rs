//! What a caller gives a migration and what it gets back: the options, the errors, live progress and the report.

use crate::wire::WireError;
use livemig_engine::encode::{PageCounts, SendPath};
use livemig_engine::guest::GuestError;
use livemig_engine::precopy::{PrecopyConfig, RoundStats, MAX_PAUSE};
use std::time::Duration;

/// How the switchover checks that the destination's memory equals the source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum VerifyMode {
    /// Compare roots over the per-page hash tables kept while sending and applying (adds well under 10 ms).
    Tables,
    /// Also re-hash all of memory on both sides and compare (slow; for tests and audits).
    Full,
}

/// Options of a migration from the source side.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// The pre-copy machine's tunables.
    pub precopy: PrecopyConfig,
    /// The switchover check.
    pub verify: VerifyMode,
    /// Scan and encode workers.
    pub workers: usize,
    /// Whether compression may be used at all (the policy still decides per batch).
    pub compress: bool,
    /// How raw pages leave guest memory; `None` tries each path and keeps the best (`--send-path auto`). Vectored by
    /// default.
    pub send_path: Option<SendPath>,
    /// A data link that holds unacknowledged data and acknowledges none of it for this long is declared failed, and
    /// its batches go out on the other links.
    pub link_timeout: Duration,
    /// The migration's session id.
    pub session: u64,
    /// The VM's CPU model, sent in the Hello: a destination that lacks any of its features or has another vendor
    /// refuses before a page moves. `None` skips the check.
    pub vm_cpu: Option<livemig_engine::cpu::CpuDescription>,
    /// The VM's manifest: when given, the source checks it against the destination's description of itself (sent in
    /// the HelloAck) and refuses to start on any failure.
    pub manifest: Option<livemig_engine::preflight::VmManifest>,
    /// The VM's NIC MACs, for the destination to announce after it resumes the guest.
    pub macs: Vec<[u8; 6]>,
    /// Where live changes (cancel, downtime target, bandwidth cap) come from while the migration runs.
    pub controls: Option<std::sync::Arc<super::controls::Controls>>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            precopy: PrecopyConfig::default(),
            verify: VerifyMode::Tables,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            compress: true,
            send_path: Some(SendPath::Vectored),
            link_timeout: Duration::from_secs(3),
            session: session_id(),
            vm_cpu: None,
            manifest: None,
            macs: Vec::new(),
            controls: None,
        }
    }
}

/// A fresh session id from the OS's random source (`getrandom`), so that nobody can guess one from when a migration
/// started. Should that call fail, a kernel random UUID (hashed with the clock) stands in.
pub fn session_id() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        let uuid = std::fs::read("/proc/sys/kernel/random/uuid").unwrap_or_default();
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        twox_hash::XxHash3_64::oneshot(&[&uuid[..], &t.to_le_bytes()].concat())
    })
}

/// Why a migration failed. In every case before commit the source guest is running again, unthrottled.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(WireError),
    /// The control connection to the destination failed mid-migration.
    #[error("link to the destination failed: {0}")]
    Link(WireError),
    /// Every data link failed; the last one's reason.
    #[error("every data link failed (last: {0})")]
    AllLinksFailed(String),
    /// The destination acknowledged nothing for too long.
    #[error("destination made no progress for {0:?}")]
    Stalled(Duration),
    /// The destination's digest differs.
    #[error("verification failed: destination roots {theirs}, source roots {ours}")]
    DigestMismatch {
        /// The source's roots.
        ours: String,
        /// The destination's roots.
        theirs: String,
    },
    /// The guest adapter failed. (Not a `source`: the message carries it, so one-line reports do not repeat it.)
    #[error("guest: {0}")]
    Guest(GuestError),
    /// Reported by the state machine (for example a commit that was not acknowledged).
    #[error("{0}")]
    Machine(String),
    /// The destination cannot host the VM; every failed requirement, with its fix.
    #[error("preflight failed: {}", .0.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))]
    Preflight(Vec<livemig_engine::preflight::Failure>),
    /// The convergence policy gave up; the source keeps the guest.
    #[error("{0}")]
    Cancelled(String),
    /// The pause ran past the hard bound before the commit; the source resumed.
    #[error("pause exceeded the {} ms bound before commit; switchover cancelled", MAX_PAUSE.as_millis())]
    PauseBound,
    /// Commit was sent but not acknowledged, or post-copy failed after the switch: the destination may be running the
    /// guest, so the source stays paused (keeping the guest's memory) and an operator must find out which side runs
    /// it.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The control connection's TLS handshake failed: the destination refused our certificate, its own was refused,
    /// or it does not speak TLS.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl From<GuestError> for MigrateError {
    fn from(e: GuestError) -> Self {
        MigrateError::Guest(e)
    }
}

/// Live progress, for a progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// The round being sent.
    pub epoch: u32,
    /// Pages in that round.
    pub round_pages: u64,
    /// Pages of that round delivered so far.
    pub round_pages_done: u64,
    /// Bytes written to the link so far.
    pub bytes_on_wire: u64,
    /// Measured goodput, bytes per second.
    pub rate_bps: f64,
}

/// One round in the report.
#[derive(Debug, Clone)]
pub struct RoundReport {
    /// The machine's figures.
    pub stats: RoundStats,
    /// Pages by codec.
    pub counts: PageCounts,
    /// vCPU throttle during the round, percent.
    pub throttle_pct: f64,
    /// Wire bytes the round's pages took on each link, in link order.
    pub link_bytes: Vec<u64>,
}

/// Where the pause went.
#[derive(Debug, Clone, Copy, Default)]
pub struct DowntimeParts {
    /// Final harvest and the last dirty pages.
    pub last_pages: Duration,
    /// Saving the devices' state ([`livemig_engine::guest::Devices`]) and sending it.
    pub device_state: Duration,
    /// Saving and delivering the vCPU state, and the destination restoring devices and vCPUs.
    pub vcpu_state: Duration,
    /// Digest comparison.
    pub verification: Duration,
    /// The commit round trip until the destination runs the guest.
    pub commit: Duration,
}

/// One link in the report.
#[derive(Debug, Clone)]
pub struct LinkReport {
    /// Local → remote address.
    pub name: String,
    /// Bytes written to it.
    pub bytes_on_wire: u64,
    /// Average goodput while the migration ran, bytes per second.
    pub throughput_bps: f64,
    /// Whether the link failed.
    pub failed: bool,
    /// Why, when it failed.
    pub error: Option<String>,
    /// Zero-copy sends on the link, and how many of them the kernel copied after all.
    pub zerocopy: crate::link::zerocopy::ZeroCopyStats,
    /// Why the link could not send zero-copy, when it was asked to.
    pub zerocopy_error: Option<String>,
}

/// The outcome and figures of a migration, as the source saw it.
#[derive(Debug)]
pub struct SourceReport {
    /// `Ok` when the destination runs the guest and its memory was verified equal.
    pub result: Result<(), MigrateError>,
    /// Whether the digests matched at switchover.
    pub verified: bool,
    /// From the start of the handshake to the destination's commit acknowledgement (or the failure).
    pub total_time: Duration,
    /// From the source's pause to the destination's commit acknowledgement, which it sends after resuming.
    pub downtime: Option<Duration>,
    /// The downtime's parts.
    pub downtime_parts: DowntimeParts,
    /// The pause predicted when the machine decided to stop and copy.
    pub predicted_downtime: Option<Duration>,
    /// Source → destination bytes, framing included.
    pub bytes_on_wire: u64,
    /// Pages sent, by codec, all rounds.
    pub pages: PageCounts,
    /// Per round.
    pub rounds: Vec<RoundReport>,
    /// Per link.
    pub links: Vec<LinkReport>,
    /// Highest vCPU throttle, percent.
    pub max_throttle_pct: f64,
    /// The device state sections sent at the switchover: name, version, bytes.
    pub device_sections: Vec<(String, u32, u64)>,
    /// The send path used at the end (`--send-path auto`: the one the trials kept).
    pub send_path: SendPath,
    /// Process CPU seconds (user and system) used from the handshake to the end.
    pub cpu_seconds: f64,
    /// Wire bytes per link, sampled about every 100 ms: (seconds since the start, cumulative bytes per link).
    pub timeline: Vec<(f64, Vec<u64>)>,
    /// The control connection's security: mode, cipher, the destination certificate's subject.
    pub security: crate::tls::SecurityInfo,
    /// Socket requests the side's io_uring completed (`--send-path uring`; 0 otherwise).
    pub uring_requests: u64,
    /// Bytes of the per-page hash table at the end (allocated per chunk of written pages).
    pub table_bytes: u64,
    /// Post-copy's figures, when the migration switched to it.
    pub postcopy: Option<PostcopyReport>,
}

/// What post-copy did: when it switched, what the pages cost, and the destination's faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostcopyReport {
    /// From the migration's start to the destination running the guest.
    pub switched_at: Duration,
    /// Pages the source sent in answer to fault requests (the urgent path).
    pub pages_pulled: u64,
    /// Pages the background push sent.
    pub pages_pushed: u64,
    /// Fault requests that arrived.
    pub requests: u64,
    /// Connections dialled again after they were lost (the control connection and data links, each time).
    pub reconnects: u64,
    /// The destination's figures (faults, latency), as it sent them before its verdict.
    pub destination: Option<livemig_engine::receive::postcopy::PostcopyStats>,
}

impl SourceReport {
    /// How it ended, as the report and the status name it: "completed", "cancelled" (by the operator, the policy or
    /// the pause bound: the source runs on) or "failed".
    pub fn status(&self) -> &'static str {
        match &self.result {
            Ok(()) => "completed",
            Err(MigrateError::Cancelled(_) | MigrateError::PauseBound) => "cancelled",
            Err(_) => "failed",
        }
    }

    /// A report of nothing done yet, for a migration that will send raw pages by `send_path`.
    pub fn new(send_path: SendPath) -> Self {
        SourceReport {
            result: Ok(()),
            verified: false,
            total_time: Duration::ZERO,
            downtime: None,
            downtime_parts: DowntimeParts::default(),
            predicted_downtime: None,
            bytes_on_wire: 0,
            pages: PageCounts::default(),
            rounds: Vec::new(),
            links: Vec::new(),
            max_throttle_pct: 0.0,
            device_sections: Vec::new(),
            send_path,
            cpu_seconds: 0.0,
            timeline: Vec::new(),
            security: crate::tls::SecurityInfo::default(),
            uring_requests: 0,
            table_bytes: 0,
            postcopy: None,
        }
    }
}
