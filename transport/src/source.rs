//! The source driver: runs the engine's pre-copy machine over a control connection and several data links.
//!
//! Threads, all scoped to [`migrate`]:
//! - the driver (the caller's thread) polls the [`Precopy`] machine, carries out its actions, feeds it events, and
//!   watches the links: one that errors, or holds data without acknowledging any for `link_timeout`, is failed and
//!   its batches are routed again over the others;
//! - scan workers ([`scan_parallel`]) turn each round's bitmap into encoded batches and hand them to the [`Stripe`]
//!   scheduler, which picks a link per batch;
//! - each data link has a writer and a reader thread (frames out, acks in); the control connection has a reader
//!   thread, and the driver writes its few frames itself.
//!
//! Any failure that leaves no way forward (the control connection, every data link, a stalled peer, a digest mismatch)
//! goes to the machine as `fail`, and before commit the machine answers with `ResumeSource`: the source's vCPUs run
//! again, unthrottled, and the report carries the reason.

use crate::cpu::CpuMeter;
use crate::link::LinkSpec;
use crate::stripe::{DataLink, LinkEvent, Stripe};
use crate::wire::{self, Hello, Kind, Verified, Verify, WireError};
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use livemig_engine::dirty::{scan_parallel, Bitmap};
use livemig_engine::encode::{memory_root, BatchEncoder, EncodeError, HashTable, PageCounts, SendPath, SendPolicy};
use livemig_engine::guest::{Guest, GuestError};
use livemig_engine::precopy::{Action, Outcome, Precopy, PrecopyConfig, RateEstimator, RoundStats, MAX_PAUSE};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How the switchover checks that the destination's memory equals the source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// A destination that acknowledges nothing for this long is declared failed.
    pub peer_timeout: Duration,
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
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            precopy: PrecopyConfig::default(),
            verify: VerifyMode::Tables,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            compress: true,
            send_path: Some(SendPath::Vectored),
            peer_timeout: Duration::from_secs(10),
            link_timeout: Duration::from_secs(3),
            session: session_id(),
            vm_cpu: None,
            manifest: None,
            macs: Vec::new(),
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
    /// Commit was sent but not acknowledged: the destination may be running the guest, so the source stays paused
    /// and an operator must find out which side runs it.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
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
    /// Saving and delivering the vCPU state.
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
    /// The send path used at the end (`--send-path auto`: the one the trials kept).
    pub send_path: SendPath,
    /// Process CPU seconds (user and system) used from the handshake to the end.
    pub cpu_seconds: f64,
    /// Wire bytes per link, sampled about every 100 ms: (seconds since the start, cumulative bytes per link).
    pub timeline: Vec<(f64, Vec<u64>)>,
}

enum Event {
    Link(LinkEvent),
    StateAck,
    Verified(Verified),
    Committed,
    ControlFailed(MigrateError),
    ScanDone { batches: u32, counts: PageCounts, error: Option<EncodeError> },
}

/// How often the dirty log is sampled during a round: short enough that a hot set does not saturate in between.
const DIRTY_SAMPLE: Duration = Duration::from_millis(250);

/// How long a data link may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Migrates `guest` to the destination at the other end of `control` (a `livemig receive`, or
/// [`crate::dest::receive`]), striping pages over `links`; with no links, one data link goes to the control
/// connection's peer address.
///
/// Returns when the destination runs the guest, or when the migration failed and the source guest runs again.
pub fn migrate(
    guest: &dyn Guest,
    control: TcpStream,
    links: &[LinkSpec],
    opts: &SourceOptions,
    progress: &(dyn Fn(&Progress) + Sync),
) -> SourceReport {
    let start = Instant::now();
    let mut report = SourceReport {
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
        send_path: opts.send_path.unwrap_or(SendPath::Vectored),
        cpu_seconds: 0.0,
        timeline: Vec::new(),
    };
    let cpu_start = crate::cpu::process_cpu_seconds();
    let control_written = AtomicU64::new(0);
    let setup = start_logging(guest)
        .and_then(|initial| {
            let rtt = handshake(guest, &control, opts, &control_written, &initial)?;
            Ok((initial, rtt))
        })
        .and_then(|(initial, rtt)| Ok((initial, rtt, connect_links(&control, links, opts)?)));
    let (initial, rtt, (data, refused)) = match setup {
        Ok(x) => x,
        Err(e) => {
            report.result = Err(e);
            report.total_time = start.elapsed();
            report.bytes_on_wire = control_written.load(Ordering::Relaxed);
            report.cpu_seconds = crate::cpu::process_cpu_seconds() - cpu_start;
            return report;
        }
    };
    let stripe = Stripe::new(data);
    let (ev_tx, ev_rx) = crossbeam::channel::unbounded::<Event>();
    let done = AtomicBool::new(false);
    let hashes = HashTable::new(guest.memory().total_pages());
    let policy = SendPolicy::new(opts.compress, opts.send_path.map_or_else(|| SendPath::ALL.to_vec(), |p| vec![p]));
    let mut link_errors: Vec<Option<String>> = refused;
    std::thread::scope(|s| {
        let (stripe, done, control) = (&stripe, &done, &control);
        let spawn = |name: String| std::thread::Builder::new().name(name);
        let mut spawned: std::io::Result<()> = Ok(());
        for (i, link) in stripe.links.iter().enumerate() {
            // Link events go straight into the driver's one event channel: an ack wakes one thread, not two.
            let ev = ev_tx.clone();
            let policy = &policy;
            let copied = move || policy.note_zerocopy_copied();
            let to_driver = move |e: LinkEvent| drop(ev.send(Event::Link(e)));
            spawned = spawned.and(
                spawn(format!("lm-write{i}"))
                    .spawn_scoped(s, move || link.write_loop(i, &to_driver, &copied))
                    .map(drop),
            );
            let ev = ev_tx.clone();
            let to_driver = move |e: LinkEvent| drop(ev.send(Event::Link(e)));
            let pool = stripe.pool().clone();
            spawned = spawned.and(
                spawn(format!("lm-read{i}"))
                    .spawn_scoped(s, move || link.read_loop(i, &to_driver, &pool, done))
                    .map(drop),
            );
        }
        let ev = ev_tx.clone();
        spawned =
            spawned.and(spawn("lm-control".into()).spawn_scoped(s, move || control_loop(control, &ev, done)).map(drop));
        if let Err(e) = spawned {
            report.result = Err(MigrateError::Link(WireError::Io(e)));
        } else {
            let mut d = Driver {
                guest,
                opts,
                machine: None,
                ev_rx: &ev_rx,
                ev_tx: &ev_tx,
                stripe,
                hashes: &hashes,
                policy: &policy,
                error: None,
                round_counts: Vec::new(),
                progress,
                control,
                control_written: &control_written,
                cpu: CpuMeter::new(),
                last_progress: Instant::now(),
                link_rates: stripe.links.iter().map(|_| RateEstimator::new(Duration::from_millis(500))).collect(),
                link_progress: vec![Instant::now(); stripe.links.len()],
                link_errors: &mut link_errors,
                pause_deadline: None,
                sampled: None,
                start,
                timeline: Vec::new(),
            };
            d.run(&mut report, initial, rtt);
            d.sample_links(true);
            report.timeline = std::mem::take(&mut d.timeline);
        }
        done.store(true, Ordering::SeqCst);
        stripe.abort.store(true, Ordering::SeqCst);
        // Ends every reader and writer: by now the destination has answered all it will.
        for l in &stripe.links {
            l.close();
        }
        let _ = control.shutdown(Shutdown::Both);
        drop(ev_tx);
    });
    report.total_time = start.elapsed();
    report.cpu_seconds = crate::cpu::process_cpu_seconds() - cpu_start;
    report.send_path = policy.path();
    let secs = report.total_time.as_secs_f64().max(1e-9);
    let mut total = control_written.load(Ordering::Relaxed);
    for (i, l) in stripe.links.iter().enumerate() {
        let bytes = l.written.load(Ordering::Relaxed);
        total += bytes;
        let (zerocopy, zerocopy_error) = l.zerocopy.lock().unwrap_or_else(|e| e.into_inner()).clone();
        report.links.push(LinkReport {
            name: l.name.clone(),
            bytes_on_wire: bytes,
            throughput_bps: bytes as f64 / secs,
            failed: link_errors[i].is_some(),
            error: link_errors[i].clone(),
            zerocopy,
            zerocopy_error,
        });
    }
    report.bytes_on_wire = total;
    report
}

/// Clears the dirty log, then reads which pages may be non-zero: every write after the clear is harvested later, and
/// a page outside the result was never populated, so reads as zero.
fn start_logging(guest: &dyn Guest) -> Result<Bitmap, MigrateError> {
    let mem = guest.memory();
    let mut scratch = Bitmap::new(mem.total_pages());
    guest.dirty_log().harvest(&mut scratch)?;
    Ok(mem.maybe_nonzero()?)
}

/// Opens the migration on the control connection; returns the Hello's round-trip time.
fn handshake(
    guest: &dyn Guest,
    stream: &TcpStream,
    opts: &SourceOptions,
    written: &AtomicU64,
    initial: &Bitmap,
) -> Result<Duration, MigrateError> {
    let sent = Instant::now();
    let hello = Hello {
        session: opts.session,
        layout: guest.memory().layout(),
        vcpus: guest.vcpu_count(),
        guest_kind: guest.kind().to_string(),
        chunks: wire::chunk_map(initial),
        cpu: opts.vm_cpu.clone(),
        macs: opts.macs.clone(),
    };
    let body = hello.encode();
    stream.set_write_timeout(Some(opts.peer_timeout)).map_err(|e| MigrateError::Handshake(e.into()))?;
    let n = wire::write_control(stream, Kind::Hello, &body).map_err(|e| MigrateError::Handshake(e.into()))?;
    written.fetch_add(n as u64, Ordering::Relaxed);
    stream.set_read_timeout(Some(opts.peer_timeout)).map_err(|e| MigrateError::Handshake(e.into()))?;
    let mut buf = Vec::new();
    let h = wire::read_frame(&mut &*stream, &mut buf).map_err(MigrateError::Handshake)?;
    // The Hello's answer also waited for the destination to admit the connection and build its guest; the
    // switchover's round trips are the network's.
    let rtt = crate::link::tcp_rtt(stream).map_or(sent.elapsed(), |k| k.min(sent.elapsed()));
    match h.kind {
        Kind::HelloAck => {
            let wire::HelloAck { session, dest } = wire::HelloAck::decode(&buf).map_err(MigrateError::Handshake)?;
            if session != opts.session {
                return Err(MigrateError::Handshake(WireError::Malformed {
                    kind: Kind::HelloAck,
                    why: format!("session {session:#x} echoed, {:#x} sent", opts.session),
                }));
            }
            if let Some(vm) = &opts.manifest {
                let failures = livemig_engine::preflight::check(vm, &dest);
                if !failures.is_empty() {
                    let e = MigrateError::Preflight(failures);
                    let _ = wire::write_abort(stream, &e.to_string());
                    return Err(e);
                }
            }
        }
        Kind::Abort => return Err(MigrateError::Handshake(WireError::PeerAbort(wire::decode_reason(&buf)))),
        got => return Err(MigrateError::Handshake(WireError::Unexpected { got, expected: "HelloAck" })),
    }
    // From here the control reader blocks on the socket; stalls are detected by the driver's clock instead.
    stream.set_read_timeout(None).map_err(|e| MigrateError::Handshake(e.into()))?;
    let _ = stream.set_nodelay(true);
    Ok(rtt)
}

/// Connects the data links and presents the session on each. A link that cannot connect is kept, failed, so the
/// report shows it; the migration needs at least one.
fn connect_links(
    control: &TcpStream,
    specs: &[LinkSpec],
    opts: &SourceOptions,
) -> Result<(Vec<DataLink>, Vec<Option<String>>), MigrateError> {
    let default;
    let specs = if specs.is_empty() {
        let peer = control.peer_addr().map_err(|e| MigrateError::Handshake(e.into()))?;
        default = [LinkSpec::to(peer)];
        &default[..]
    } else {
        specs
    };
    let mut links = Vec::new();
    let mut errors = Vec::new();
    let mut last_error = String::new();
    for (i, spec) in specs.iter().enumerate() {
        let opened = spec.connect(CONNECT_TIMEOUT).and_then(|stream| {
            let hello = wire::LinkHello { session: opts.session, link: i as u32 };
            wire::write_control(&stream, Kind::LinkHello, &hello.encode())?;
            Ok(stream)
        });
        match opened {
            Ok(stream) => {
                links.push(DataLink::new(spec.name(), stream));
                errors.push(None);
            }
            Err(e) => {
                last_error = e.to_string();
                // A placeholder that is failed from the start keeps link indices and report rows in --link order.
                let (a, _b) = local_pair()?;
                let l = DataLink::new(spec.name(), a);
                l.fail();
                links.push(l);
                errors.push(Some(last_error.clone()));
            }
        }
    }
    if errors.iter().all(Option::is_some) {
        return Err(MigrateError::AllLinksFailed(last_error));
    }
    Ok((links, errors))
}

/// A connected loopback pair, to stand in for a link that never connected.
fn local_pair() -> Result<(TcpStream, TcpStream), MigrateError> {
    let io = |e: std::io::Error| MigrateError::Link(e.into());
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let a = TcpStream::connect(l.local_addr().map_err(io)?).map_err(io)?;
    let (b, _) = l.accept().map_err(io)?;
    Ok((a, b))
}

fn control_loop(r: &TcpStream, ev: &Sender<Event>, done: &AtomicBool) {
    let mut buf = Vec::new();
    let mut r = r;
    loop {
        let h = match wire::read_frame(&mut r, &mut buf) {
            Ok(h) => h,
            Err(e) => {
                if !done.load(Ordering::SeqCst) {
                    let _ = ev.send(Event::ControlFailed(MigrateError::Link(e)));
                }
                return;
            }
        };
        let event = match h.kind {
            Kind::StateAck => Event::StateAck,
            Kind::Verified => match Verified::decode(&buf) {
                Ok(v) => Event::Verified(v),
                Err(e) => Event::ControlFailed(MigrateError::Link(e)),
            },
            Kind::Committed => Event::Committed,
            Kind::Abort => Event::ControlFailed(MigrateError::Link(WireError::PeerAbort(wire::decode_reason(&buf)))),
            got => {
                Event::ControlFailed(MigrateError::Link(WireError::Unexpected { got, expected: "a control answer" }))
            }
        };
        let stop = matches!(event, Event::ControlFailed(_) | Event::Committed);
        if ev.send(event).is_err() || stop {
            return;
        }
    }
}

struct Driver<'a> {
    guest: &'a dyn Guest,
    opts: &'a SourceOptions,
    machine: Option<Precopy>,
    ev_rx: &'a Receiver<Event>,
    ev_tx: &'a Sender<Event>,
    stripe: &'a Stripe,
    hashes: &'a HashTable,
    policy: &'a SendPolicy,
    error: Option<MigrateError>,
    round_counts: Vec<(PageCounts, f64, Vec<u64>)>,
    progress: &'a (dyn Fn(&Progress) + Sync),
    control: &'a TcpStream,
    control_written: &'a AtomicU64,
    cpu: CpuMeter,
    last_progress: Instant,
    link_rates: Vec<RateEstimator>,
    /// Per link: the last ack, or the last moment it held nothing.
    link_progress: Vec<Instant>,
    link_errors: &'a mut Vec<Option<String>>,
    /// Set while the guest is paused and nothing is committed: past it, the switchover is cancelled.
    pause_deadline: Option<Instant>,
    /// Pages harvested during the current round to sample the dirty rate; they join the next reported harvest.
    sampled: Option<(Bitmap, Instant)>,
    /// The migration's start, and per-link wire bytes sampled every [`TIMELINE_EVERY`] since.
    start: Instant,
    timeline: Vec<(f64, Vec<u64>)>,
}

/// How often the per-link byte counters are sampled for the report's timeline (and `--plot`).
const TIMELINE_EVERY: Duration = Duration::from_millis(100);

impl Driver<'_> {
    fn run(&mut self, report: &mut SourceReport, initial: Bitmap, rtt: Duration) {
        self.machine = Some(Precopy::new(self.opts.precopy.clone(), initial, self.start));
        // The switchover's fixed cost: three round trips (state, verify, commit), the digest on both sides (timed on
        // the table itself), and a millisecond for restoring and resuming.
        let t = Instant::now();
        std::hint::black_box(self.hashes.root());
        let cost = rtt * 3 + t.elapsed() * 2 + Duration::from_millis(1);
        self.machine().set_switchover_cost(cost);
        let vcpus = self.guest.vcpus();
        let mut marks: [Option<Instant>; 4] = [None; 4];
        let mut commit_sent = false;
        while let Some(action) = self.machine().poll() {
            match action {
                Action::SendRound { epoch, pages, last } => {
                    let throttle = vcpus.throttle();
                    report.max_throttle_pct = report.max_throttle_pct.max(throttle);
                    let (counts, link_bytes) = self.send_round(epoch, &pages);
                    self.round_counts.push((counts, throttle, link_bytes));
                    if last {
                        marks[0] = Some(Instant::now());
                    }
                }
                Action::Harvest => {
                    let mut bm = match self.sampled.take() {
                        Some((bm, _)) => bm,
                        None => Bitmap::new(self.guest.memory().total_pages()),
                    };
                    match self.guest.dirty_log().harvest(&mut bm) {
                        Ok(()) => self.machine().harvested(bm, Instant::now()),
                        Err(e) => self.fail(e.into()),
                    }
                }
                Action::SetThrottle(pct) => vcpus.set_throttle(pct),
                Action::Pause => {
                    report.predicted_downtime = self.machine().last_prediction();
                    vcpus.pause();
                    let now = Instant::now();
                    self.pause_deadline = Some(now + MAX_PAUSE);
                    self.machine().paused(now);
                }
                Action::SendState => {
                    // Every page is acknowledged: the data links have done their work, and their closing is no failure.
                    for l in &self.stripe.links {
                        l.close();
                    }
                    match vcpus.save_state() {
                        Ok(blob) => {
                            if self.send_control(Kind::VcpuState, &blob)
                                && self.wait_for(|e| matches!(e, Event::StateAck).then_some(())).is_some()
                            {
                                self.machine().state_delivered();
                            }
                        }
                        Err(e) => self.fail(e.into()),
                    }
                    marks[1] = Some(Instant::now());
                }
                Action::Verify => {
                    if let Some(ok) = self.verify() {
                        report.verified = ok;
                        self.machine().verified(ok);
                    }
                    marks[2] = Some(Instant::now());
                }
                Action::Commit => {
                    // From here the destination may run the guest: the pause bound can no longer cancel.
                    self.pause_deadline = None;
                    commit_sent = true;
                    if self.send_control(Kind::Commit, &[])
                        && self.wait_for(|e| matches!(e, Event::Committed).then_some(())).is_some()
                    {
                        self.machine().committed();
                    }
                    marks[3] = Some(Instant::now());
                }
                Action::ResumeSource => {
                    vcpus.set_throttle(0.0);
                    vcpus.resume();
                }
                Action::Done(outcome) => {
                    match outcome {
                        Outcome::Completed => {}
                        Outcome::Failed(reason) if commit_sent => {
                            report.result = Err(MigrateError::OutcomeUnknown(reason));
                        }
                        Outcome::Failed(reason) => {
                            report.result = Err(self.error.take().unwrap_or(MigrateError::Machine(reason)));
                        }
                        Outcome::Cancelled(reason) => {
                            self.tell_destination(&format!("cancelled: {reason}"));
                            report.result = Err(MigrateError::Cancelled(reason));
                        }
                    }
                    break;
                }
            }
        }
        let m = self.machine.take().expect("machine exists");
        let mut rounds = m.rounds().to_vec();
        if rounds.len() < self.round_counts.len() {
            rounds.push(m.unfinished_round(Instant::now()));
        }
        report.rounds = rounds
            .iter()
            .zip(&self.round_counts)
            .map(|(s, (counts, throttle_pct, link_bytes))| RoundReport {
                stats: s.clone(),
                counts: *counts,
                throttle_pct: *throttle_pct,
                link_bytes: link_bytes.clone(),
            })
            .collect();
        for r in &report.rounds {
            report.pages.add(&r.counts);
        }
        if let (Some(paused), Ok(())) = (m.paused_at(), &report.result) {
            let at = |i: usize| marks[i].unwrap_or(paused);
            report.downtime = Some(at(3).saturating_duration_since(paused));
            report.downtime_parts = DowntimeParts {
                last_pages: at(0).saturating_duration_since(paused),
                vcpu_state: at(1).saturating_duration_since(at(0)),
                verification: at(2).saturating_duration_since(at(1)),
                commit: at(3).saturating_duration_since(at(2)),
            };
        }
    }

    fn machine(&mut self) -> &mut Precopy {
        self.machine.as_mut().expect("machine exists")
    }

    fn fail(&mut self, e: MigrateError) {
        let reason = e.to_string();
        if self.error.is_none() {
            self.tell_destination(&reason);
            self.error = Some(e);
        }
        self.stripe.abort.store(true, Ordering::SeqCst);
        // Unblocks writers stuck on a peer that stopped reading, and with them any encoder waiting on a queue.
        for l in &self.stripe.links {
            l.close();
        }
        let _ = self.control.shutdown(Shutdown::Both);
        if let Some(m) = self.machine.as_mut() {
            m.fail(reason);
        }
    }

    /// Best effort: tells the destination why the migration is off, so that it reports the reason rather than a
    /// closed connection. Bounded, because the destination may be the thing that stopped reading.
    fn tell_destination(&self, reason: &str) {
        let _ = self.control.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = wire::write_abort(self.control, reason);
    }

    fn send_control(&mut self, kind: Kind, body: &[u8]) -> bool {
        match wire::write_control(self.control, kind, body) {
            Ok(n) => {
                self.control_written.fetch_add(n as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.fail(MigrateError::Link(e.into()));
                false
            }
        }
    }

    /// Waits for the event `want` picks out, handling failures and the peer timeout. None after a failure.
    fn wait_for<T>(&mut self, want: impl Fn(&Event) -> Option<T>) -> Option<T> {
        self.last_progress = Instant::now();
        loop {
            match self.next_event() {
                Some(e) => {
                    if let Some(t) = want(&e) {
                        return Some(t);
                    }
                    self.handle(e);
                }
                None if self.error.is_some() => return None,
                None => {}
            }
            if self.error.is_some() {
                return None;
            }
        }
    }

    /// Events every phase handles the same way: failures, and link failures that leave other links.
    fn handle(&mut self, e: Event) {
        match e {
            Event::ControlFailed(e) => self.fail(e),
            Event::Link(LinkEvent::Failed { link, error }) => self.link_failed(link, error.to_string()),
            _ => {}
        }
    }

    /// Fails one data link and routes its batches over the others; fails the migration when none is left.
    fn link_failed(&mut self, i: usize, why: String) {
        let link = &self.stripe.links[i];
        if link.is_failed() && self.link_errors[i].is_some() {
            return;
        }
        link.fail();
        self.link_errors[i] = Some(why.clone());
        if self.stripe.links.iter().all(DataLink::is_failed) {
            self.fail(MigrateError::AllLinksFailed(why));
            return;
        }
        self.reroute(i);
    }

    /// Routes again what the failed link `i` holds. The driver must get back to its events, so a batch that no link
    /// takes within the link timeout (every other link full and stalled) fails the migration.
    fn reroute(&mut self, i: usize) {
        for item in self.stripe.links[i].take_back() {
            let deadline = Instant::now() + self.opts.link_timeout;
            if !self.stripe.route(item, Some(deadline)) && self.error.is_none() {
                let why = self.link_errors[i].clone().unwrap_or_default();
                self.fail(MigrateError::AllLinksFailed(why));
                return;
            }
        }
    }

    /// Records each link's wire bytes so far, every [`TIMELINE_EVERY`] (or now, with `force`).
    fn sample_links(&mut self, force: bool) {
        let t = self.start.elapsed().as_secs_f64();
        let due = self.timeline.last().is_none_or(|(last, _)| t - last >= TIMELINE_EVERY.as_secs_f64());
        if force || due {
            self.timeline.push((t, self.stripe.links.iter().map(|l| l.written.load(Ordering::Relaxed)).collect()));
        }
    }

    /// The next event, or None after 50 ms without one. Also the driver's clock: it fails links that stall, takes
    /// back what encoders routed to failed links, and fails the migration when the peer has been silent too long.
    fn next_event(&mut self) -> Option<Event> {
        self.sample_links(false);
        let now = Instant::now();
        if self.pause_deadline.is_some_and(|d| now > d) && self.error.is_none() {
            self.pause_deadline = None;
            self.fail(MigrateError::PauseBound);
            return None;
        }
        for i in 0..self.stripe.links.len() {
            let l = &self.stripe.links[i];
            if l.is_failed() {
                if self.error.is_none() && self.link_errors[i].is_some() {
                    self.reroute(i);
                }
            } else if l.held() == 0 {
                self.link_progress[i] = now;
            } else if now.duration_since(self.link_progress[i]) > self.opts.link_timeout {
                let why = format!("no acknowledgement for {:?} with data outstanding", self.opts.link_timeout);
                self.link_failed(i, why);
            }
        }
        match self.ev_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(e) => {
                if matches!(
                    e,
                    Event::Link(LinkEvent::Acked { .. }) | Event::StateAck | Event::Verified(_) | Event::Committed
                ) {
                    self.last_progress = Instant::now();
                }
                Some(e)
            }
            Err(RecvTimeoutError::Timeout) => {
                if self.last_progress.elapsed() > self.opts.peer_timeout {
                    self.fail(MigrateError::Stalled(self.opts.peer_timeout));
                }
                None
            }
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
        self.last_progress = Instant::now();
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
                        self.link_progress[link] = at;
                        self.link_rates[link].record(at, bytes);
                        if let Some(r) = self.link_rates[link].rate() {
                            self.stripe.links[link].set_rate(r);
                        }
                        self.machine().delivered(bytes, at);
                        self.policy.observe(pages, at, crate::cpu::process_cpu_seconds());
                        let rate = self.machine().bandwidth().unwrap_or(0.0);
                        let spare = self.cpu.spare_cpus(Duration::from_millis(100));
                        self.policy.set_link(rate as u64, spare);
                        if last_report.elapsed() > Duration::from_millis(50) {
                            last_report = Instant::now();
                            let written = self.control_written.load(Ordering::Relaxed)
                                + self.stripe.links.iter().map(|l| l.written.load(Ordering::Relaxed)).sum::<u64>();
                            (self.progress)(&Progress {
                                epoch,
                                round_pages: total_pages,
                                round_pages_done: pages_done,
                                bytes_on_wire: written,
                                rate_bps: rate,
                            });
                        }
                    }
                    Some(Event::ScanDone { batches, counts: c, error }) => {
                        scan_done = Some(batches);
                        counts = c;
                        if let Some(e) = error {
                            if self.error.is_none() {
                                self.fail(match e {
                                    EncodeError::Guest(g) => MigrateError::Guest(g),
                                    EncodeError::SinkClosed => MigrateError::AllLinksFailed("no link left".into()),
                                    EncodeError::Zstd(e) => MigrateError::Machine(format!("zstd: {e}")),
                                });
                            }
                        }
                    }
                    Some(e) => self.handle(e),
                    None => {}
                }
                self.sample_dirty_rate();
            }
        });
        if self.error.is_none() {
            self.machine().round_delivered(Instant::now());
        }
        (counts, link_bytes)
    }

    /// Every [`DIRTY_SAMPLE`] of a round, harvests the dirty log into the set the next harvest reports, and tells the
    /// machine how many pages were dirtied in that span.
    fn sample_dirty_rate(&mut self) {
        if self.machine.as_ref().is_some_and(|m| m.paused_at().is_some()) {
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
            self.machine().dirty_sampled(span.count_ones(), now.duration_since(since));
            bm.or_assign(&span);
            self.sampled = Some((bm, now));
        } else {
            self.sampled = Some((bm, since));
        }
    }

    /// Sends the source's roots and returns whether the destination's match.
    fn verify(&mut self) -> Option<bool> {
        let table_root = self.hashes.root();
        let memory_root = match self.opts.verify {
            VerifyMode::Tables => 0,
            VerifyMode::Full => match memory_root(self.guest.memory()) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(e.into());
                    return None;
                }
            },
        };
        let ours = Verify { full: self.opts.verify == VerifyMode::Full, table_root, memory_root };
        if !self.send_control(Kind::Verify, &ours.encode()) {
            return None;
        }
        let theirs = self.wait_for(|e| if let Event::Verified(v) = e { Some(*v) } else { None })?;
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
