//! The source driver: runs the engine's pre-copy machine over a control connection and several data links.
//!
//! Threads, all scoped to [`migrate`]:
//! - the driver (`driver`, on the caller's thread) polls the [`Precopy`] machine, carries out its actions, feeds it
//!   events, and watches the links: one that errors, or holds data without acknowledging any for `link_timeout`, is
//!   failed and its batches are routed again over the others;
//! - scan workers ([`scan_parallel`](livemig_engine::dirty::scan_parallel)) turn each round's bitmap into encoded
//!   batches and hand them to the [`Stripe`] scheduler, which picks a link per batch;
//! - each data link has a writer and a reader thread (frames out, acks in); the control connection has a reader
//!   thread, and the driver writes its few frames itself.
//!
//! Set-up (`setup`: the handshake and the links) comes first; `report` holds the options, errors and report types.
//!
//! Any failure that leaves no way forward (the control connection, every data link, a stalled peer, a digest mismatch)
//! goes to the machine as `fail`, and before commit the machine answers with `ResumeSource`: the source's vCPUs run
//! again, unthrottled, and the report carries the reason. After a post-copy switch a lost connection is dialled again
//! instead (`reconnect`), and the source never resumes.

pub mod controls;
mod driver;
mod exchange;
mod handle;
mod postcopy;
mod reconnect;
mod report;
mod setup;
mod status;

pub use controls::{Change, ChangeError, Controls, MigrationEvent, Status};
pub use handle::Migration;
pub use report::{
    session_id, DowntimeParts, LinkReport, MigrateError, PostcopyReport, Progress, RoundReport, SourceOptions,
    SourceReport, VerifyMode,
};

use crate::cpu_usage::CpuMeter;
use crate::link::data::LinkEvent;
use crate::link::LinkSpec;
use crate::stream::Stream;
use crate::stripe::Stripe;
use crate::tls::{self, Conn, SourceSecurity};
use crate::uring::Ring;
use crate::wire::{Verified, WireError};
use driver::Driver;
use livemig_engine::encode::{EncodeError, HashTable, PageCounts, SendPath, SendPolicy};
use livemig_engine::guest::Guest;
use livemig_engine::precopy::{Precopy, RateEstimator};
use setup::{connect_links, control_loop, handshake, start_logging};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

enum Event {
    Link(LinkEvent),
    StateAck,
    Verified(Verified),
    Committed,
    /// The destination refused something, or sent what cannot be read: the migration ends.
    ControlFailed(MigrateError),
    /// The control connection of this generation failed or closed.
    ControlEnded(u32, MigrateError),
    /// Post-copy: the control connection was reconnected; the destination still lacks this many pages.
    ControlBack(std::sync::Arc<Conn>, u64),
    /// Post-copy: data link `i` was reconnected.
    LinkBack(usize, Box<Conn>),
    /// Post-copy: a data link (or, None, the control connection) could not be reconnected in time.
    RedialGaveUp(Option<usize>, String),
    /// Post-copy: the destination runs the guest.
    Switched,
    /// Post-copy: the destination dropped the old copies of a Missing frame's pages.
    MissingAck,
    /// Post-copy: pages the destination's guest faulted on.
    PageRequest(Vec<u64>),
    /// Post-copy: the destination's figures.
    PostcopyStats(livemig_engine::receive::postcopy::PostcopyStats),
    ScanDone {
        batches: u32,
        counts: PageCounts,
        error: Option<EncodeError>,
    },
}

/// How often the dirty log is sampled during a round: short enough that a hot set does not saturate in between.
const DIRTY_SAMPLE: Duration = Duration::from_millis(250);

/// How long a data link may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A migration's data links: to be connected, or connected already by the caller.
#[derive(Debug)]
pub enum Links {
    /// Connect these (TCP, each from its own address and interface); none: one link to the control connection's
    /// peer (a TCP address, or the Unix socket's path).
    Connect(Vec<LinkSpec>),
    /// The caller's own streams, connected to the destination's listener (TCP, Unix, or descriptors it was passed).
    Streams(Vec<Stream>),
}

/// Migrates `guest` to the destination at the other end of `control` (a `livemig receive`, or
/// [`crate::dest::receive`]), striping pages over `links`; with no links, one data link goes to the control
/// connection's peer address. `control` is any connected [`Stream`]: a `TcpStream`, a `UnixStream`, or one made from
/// a descriptor. [`migrate_streams`] takes data links the caller connected; [`Migration::start`] runs it on a
/// thread of its own behind a handle.
///
/// Returns when the destination runs the guest, or when the migration failed and the source guest runs again.
pub fn migrate(
    guest: &dyn Guest,
    control: impl Into<Stream>,
    links: &[LinkSpec],
    opts: &SourceOptions,
    security: &SourceSecurity,
    progress: &(dyn Fn(&Progress) + Sync),
) -> SourceReport {
    run(guest, control.into(), Links::Connect(links.to_vec()), opts, security, progress)
}

/// [`migrate`] over data links the caller connected (at least one). Connect them to the destination's data listeners,
/// not to the one it takes control connections from: a connection that is waiting there while the destination admits
/// a source is taken for a source itself, and refused (its link fails, and the others carry the migration).
pub fn migrate_streams(
    guest: &dyn Guest,
    control: impl Into<Stream>,
    links: Vec<Stream>,
    opts: &SourceOptions,
    security: &SourceSecurity,
    progress: &(dyn Fn(&Progress) + Sync),
) -> SourceReport {
    run(guest, control.into(), Links::Streams(links), opts, security, progress)
}

pub(crate) fn run(
    guest: &dyn Guest,
    control: Stream,
    links: Links,
    opts: &SourceOptions,
    security: &SourceSecurity,
    progress: &(dyn Fn(&Progress) + Sync),
) -> SourceReport {
    let start = Instant::now();
    let _span =
        tracing::info_span!("migration", role = "source", session = %format_args!("{:#x}", opts.session)).entered();
    let mut report = SourceReport::new(opts.send_path.unwrap_or(SendPath::Vectored));
    let cpu_start = crate::cpu_usage::process_cpu_seconds();
    let control_written = AtomicU64::new(0);
    let setup = open(guest, control, links, opts, security, &control_written, &mut report.security);
    // The ring is dropped after the stripe that takes the links: it outlives every link thread that submits to it.
    let (control, initial, rtt, (data, refused, ring, dials)) = match setup {
        Ok(x) => x,
        Err(e) => {
            (report.result, report.bytes_on_wire) = (Err(e), control_written.load(Ordering::Relaxed));
            finished(opts, &mut report, start, cpu_start);
            return report;
        }
    };
    let stripe = Stripe::new(data, opts.precopy.max_bandwidth);
    let (ev_tx, ev_rx) = crossbeam::channel::unbounded::<Event>();
    let done = AtomicBool::new(false);
    let hashes = HashTable::new(guest.memory().total_pages());
    let policy = SendPolicy::new(opts.compress, opts.send_path.map_or_else(|| SendPath::ALL.to_vec(), |p| vec![p]));
    let mut link_errors: Vec<Option<String>> = refused;
    let redial = reconnect::Redialer::new(&control, dials, security, opts, ring.as_ref(), guest);
    std::thread::scope(|s| {
        let (stripe, done, control) = (&stripe, &done, &control);
        let spawned = spawn_link_threads(s, stripe, &policy, &ev_tx, done, control, guest.memory().total_pages());
        if let Err(e) = spawned {
            report.result = Err(MigrateError::Link(WireError::Io(e)));
        } else {
            let mut d = Driver {
                guest,
                opts,
                machine: Precopy::new(opts.precopy.clone(), initial, start),
                ev_rx: &ev_rx,
                ev_tx: &ev_tx,
                stripe,
                hashes: &hashes,
                policy: &policy,
                error: None,
                sent: Vec::new(),
                progress,
                control,
                remaining_pages: 0,
                finished: false,
                control_written: &control_written,
                cpu: CpuMeter::new(),
                link_rates: stripe.links.iter().map(|_| RateEstimator::new(Duration::from_millis(500))).collect(),
                link_progress: vec![Instant::now(); stripe.links.len()],
                link_errors: &mut link_errors,
                sampled: None,
                start,
                timeline: Vec::new(),
                phase: "starting",
                pc: postcopy::PostcopyDriver::new(redial),
            };
            d.run(&mut report, rtt);
            d.sample_links(true);
            report.timeline = std::mem::take(&mut d.timeline);
        }
        done.store(true, Ordering::SeqCst);
        stripe.abort.store(true, Ordering::SeqCst);
        // Ends every reader and writer: by now the destination has answered all it will.
        stripe.links.iter().for_each(|l| l.close());
        let _ = control.stream().shutdown(Shutdown::Both);
        drop(ev_tx);
    });
    report.send_path = policy.path();
    (report.uring_requests, report.table_bytes) = (ring.as_ref().map_or(0, Ring::requests), hashes.bytes());
    finished(opts, &mut report, start, cpu_start);
    report_links(&mut report, &stripe, &link_errors, control_written.load(Ordering::Relaxed));
    report
}

/// Stamps the report with the migration's time and CPU, and tells whoever watches it how it ended: the status's
/// phase is "done", and the last event says how.
fn finished(opts: &SourceOptions, report: &mut SourceReport, start: Instant, cpu_start: f64) {
    report.total_time = start.elapsed();
    report.cpu_seconds = crate::cpu_usage::process_cpu_seconds() - cpu_start;
    let Some(controls) = opts.controls.as_ref() else { return };
    let mut status = controls.status();
    if status.phase != "done" {
        status.phase = "done";
        controls.publish(status);
        controls.emit(MigrationEvent::Phase("done"));
    }
    let error = report.result.as_ref().err().map(ToString::to_string);
    controls.emit(MigrationEvent::Finished { status: report.status(), error });
    controls.close_events();
}

/// What a migration starts from: the sealed control connection, the pages to send in round 0, the Hello's round
/// trip, and the data links (with the reasons of those that could not connect, and their ring).
type Opened = (Conn, livemig_engine::dirty::Bitmap, Duration, setup::DataLinks);

/// Opens the migration: the control connection's TLS handshake (its security goes to `info`), the dirty log
/// started, the Hello answered, and the data links connected and presented.
fn open(
    guest: &dyn Guest,
    control: Stream,
    links: Links,
    opts: &SourceOptions,
    security: &SourceSecurity,
    written: &AtomicU64,
    info: &mut tls::SecurityInfo,
) -> Result<Opened, MigrateError> {
    let control = tls::connect(control, security, CONNECT_TIMEOUT)?;
    *info = control.info();
    tracing::info!(mode = info.mode, peer = ?info.peer, "control connection open");
    let initial = start_logging(guest)?;
    let rtt = handshake(guest, &control, opts, written, &initial)?;
    tracing::info!(rtt_us = rtt.as_micros(), pages = initial.count_ones(), "handshake done");
    let data = connect_links(&control, links, opts, security)?;
    tracing::info!(links = data.0.len(), unusable = data.1.iter().flatten().count(), "data links connected");
    Ok((control, initial, rtt, data))
}

/// Starts each data link's writer and reader, and the control connection's reader; their events go straight into
/// the driver's one channel (an ack wakes one thread, not two).
fn spawn_link_threads<'s, 'e: 's>(
    s: &'s std::thread::Scope<'s, 'e>,
    stripe: &'e Stripe,
    policy: &'e SendPolicy,
    ev_tx: &crossbeam::channel::Sender<Event>,
    done: &'e AtomicBool,
    control: &'e Conn,
    pages: u64,
) -> std::io::Result<()> {
    let spawn = |name: String| std::thread::Builder::new().name(name);
    for (i, link) in stripe.links.iter().enumerate() {
        let ev = ev_tx.clone();
        let copied = move || policy.note_zerocopy_copied();
        let to_driver = move |e: LinkEvent| drop(ev.send(Event::Link(e)));
        let pacer = &stripe.pacer;
        spawn(format!("lm-write{i}")).spawn_scoped(s, move || link.write_loop(i, pacer, &to_driver, &copied))?;
        let ev = ev_tx.clone();
        let to_driver = move |e: LinkEvent| drop(ev.send(Event::Link(e)));
        let pool = stripe.pool().clone();
        spawn(format!("lm-read{i}")).spawn_scoped(s, move || link.read_loop(i, &to_driver, &pool, done))?;
    }
    let ev = ev_tx.clone();
    spawn("lm-control".into()).spawn_scoped(s, move || control_loop(control, &ev, done, pages, 0))?;
    Ok(())
}

/// Each link's figures into the report, and the wire bytes of all links and the control connection together.
fn report_links(report: &mut SourceReport, stripe: &Stripe, link_errors: &[Option<String>], control_bytes: u64) {
    let secs = report.total_time.as_secs_f64().max(1e-9);
    let mut total = control_bytes;
    for (i, l) in stripe.links.iter().enumerate() {
        let bytes = l.written();
        total += bytes;
        let (zerocopy, zerocopy_error) = l.zerocopy();
        let silent = || l.is_suspended().then(|| "silent since it stopped acknowledging (post-copy)".to_string());
        let error = link_errors[i].clone().or_else(|| l.error()).or_else(silent);
        report.links.push(LinkReport {
            name: l.name().to_string(),
            bytes_on_wire: bytes,
            throughput_bps: bytes as f64 / secs,
            failed: error.is_some(),
            error,
            zerocopy,
            zerocopy_error,
        });
    }
    report.bytes_on_wire = total;
}
