//! The livemig command line: `demo`, `send` and `receive` (docs/interfaces.md).

use anyhow::{anyhow, bail, Context, Result};
mod args;
mod tools;

use args::*;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use livemig::baseline;

use livemig::engine::cpu::{self, CpuDescription};
use livemig::engine::guest::{Guest, GuestMemory, MemoryLayout, SyntheticConfig, SyntheticGuest};
use livemig::engine::precopy::{PostcopyMode, PrecopyConfig};
use livemig::engine::preflight::{self, DestDescription, PortGroup};
use livemig::guests::AnyGuest;
use livemig::kvm::{DirtyLogMethod, KvmConfig, KvmGuest};

use livemig::loopback::migrate_loopback;
use livemig::manifest;
use livemig::report::{GuestInfo, Pages, Report, Status, VcpuState};
use livemig::transport::announce::{announce, Schedule};
use livemig::transport::dest::{accept_migration, receive, DestOptions, DestReport};
use livemig::transport::link::LinkSpec;
use livemig::transport::source::{migrate, Controls, Progress, SourceOptions, SourceReport};
use livemig::transport::stream::{Address, Listener, Peer};
use livemig::transport::tls::{self, Credentials, DestSecurity, SecurityPair, ServerName, SourceSecurity};
use livemig::transport::wire::Hello;
use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

/// An error that ends the CLI with its own exit status (1 is the default for any other error): 2 for usage, 3 when a
/// migration's outcome is unknown.
#[derive(Debug)]
struct Exit(i32, String);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Exit {}

/// Exit status 2: the command line asked for something impossible.
fn usage(msg: impl Into<String>) -> anyhow::Error {
    Exit(2, msg.into()).into()
}

/// Logs from the libraries (`tracing`) to stderr: errors only by default (the CLI says what matters itself), the
/// migration's steps with -v, more with -vv, nothing with -q; a non-empty RUST_LOG overrides.
fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "off",
        (false, 0) => "error",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => tracing_subscriber::EnvFilter::new(v),
        _ => tracing_subscriber::EnvFilter::new(format!("livemig={level},livemig_transport={level}")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    let result = match cli.cmd {
        Cmd::Demo { links, insecure, guest, run } => demo(links, insecure, &guest, &run),
        Cmd::Send { to, links, tls, tls_peer, control, guest, run } => {
            send(&to, &links, &tls, tls_peer, control.as_deref(), &guest, &run)
        }
        Cmd::Ctl { path, cmd, setting } => ctl(&path, &cmd, setting.as_deref()),
        Cmd::Tls { cmd: TlsCmd::Init { dir, hosts } } => tls_init(&dir, &hosts),
        Cmd::Receive(args) => receive_cmd(args),
        Cmd::Preflight { vm, dest } => preflight_cmd(&vm, &dest),
        Cmd::Lab { cmd } => tools::lab_cmd(cmd),
        Cmd::Cpu { cmd } => cpu_cmd(cmd),
        Cmd::Bench(args) => tools::bench_cmd(&args),
        Cmd::XSink { listen, links } => (|| {
            let l = TcpListener::bind(&listen).with_context(|| format!("listening on {listen}"))?;
            eprintln!("listening on {}", l.local_addr()?);
            println!("{}", serde_json::to_string(&baseline::sink(&l, links)?)?);
            Ok(())
        })(),
        Cmd::XBlast { links, bytes } => (|| {
            println!("{}", serde_json::to_string(&baseline::blast(&links, bytes)?)?);
            Ok(())
        })(),
    };
    if let Err(e) = result {
        // One line: the chain of causes joined with ": ".
        eprintln!("livemig: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(e.downcast_ref::<Exit>().map_or(1, |x| x.0));
    }
}

fn make_guest(g: &GuestOpts) -> Result<AnyGuest> {
    let t = Instant::now();
    // A manifest's memory size is the VM's.
    let memory = match &g.vm {
        Some(path) => manifest::read(path)?.memory_bytes,
        None => g.memory,
    };
    let guest = match g.guest {
        GuestKind::Synthetic => AnyGuest::Synthetic(
            SyntheticGuest::new(&SyntheticConfig {
                memory_bytes: memory,
                touched_pct: g.touched,
                dirty_rate: g.dirty_rate,
                hot_set_pct: g.hot_set,
                vcpus: g.vcpus,
                ..Default::default()
            })
            .context("building the synthetic guest")?,
        ),
        GuestKind::Kvm => {
            if g.vcpus != 1 {
                return Err(usage("the KVM test guest runs one vCPU (--vcpus 1)"));
            }
            let dirty_log = g.dirty_log;
            AnyGuest::Kvm(
                KvmGuest::new(&KvmConfig {
                    memory_bytes: memory,
                    touched_pct: g.touched,
                    dirty_rate: g.dirty_rate,
                    hot_set_pct: g.hot_set,
                    dirty_log,
                    cpu_model: Some(vm_cpu(g)?),
                })
                .context("building the KVM guest")?,
            )
        }
    };
    match g.guest {
        GuestKind::Synthetic => eprintln!(
            "guest: synthetic, {} MiB, {:.0}% touched, {} vCPU(s) dirtying {} pages/s over {:.0}% (ready in {:.2} s)",
            memory >> 20,
            g.touched,
            g.vcpus,
            g.dirty_rate,
            g.hot_set,
            t.elapsed().as_secs_f64()
        ),
        GuestKind::Kvm => eprintln!(
            "guest: KVM, {} MiB, {:.0}% touched, 1 vCPU running the test guest at {} pages/s over {:.0}% (dirty log: {})",
            memory >> 20,
            g.touched,
            g.dirty_rate,
            g.hot_set,
            match g.dirty_log {
                DirtyLogMethod::GetLog => "KVM_GET_DIRTY_LOG",
                DirtyLogMethod::ManualClear => "KVM_CLEAR_DIRTY_LOG",
            }
        ),
    }
    Ok(guest)
}

fn vm_cpu(g: &GuestOpts) -> Result<CpuDescription> {
    match (&g.cpu_model, &g.vm) {
        (Some(path), _) => read_cpu(path),
        (None, Some(vm)) => Ok(manifest::read(vm)?.cpu),
        (None, None) => Ok(cpu::host()),
    }
}

fn source_options(run: &RunOpts, g: &GuestOpts) -> Result<SourceOptions> {
    let vm = g.vm.as_deref().map(manifest::read).transpose()?;
    Ok(SourceOptions {
        vm_cpu: Some(vm_cpu(g)?),
        macs: vm.as_ref().map(manifest::macs).unwrap_or_default(),
        manifest: vm,
        precopy: PrecopyConfig {
            downtime_target: Duration::from_millis(run.downtime_target),
            max_rounds: run.max_rounds,
            max_time: run.max_time.map(Duration::from_secs_f64),
            on_timeout: run.on_timeout,
            throttle: !run.no_throttle,
            max_bandwidth: run.max_bandwidth,
            max_throttle: run.max_throttle.unwrap_or(match run.postcopy {
                PostcopyMode::Auto => 50.0,
                _ => livemig::engine::precopy::MAX_THROTTLE,
            }),
            postcopy: run.postcopy,
            postcopy_wait: Duration::from_secs(run.postcopy_wait),
            ..Default::default()
        },
        verify: run.verify,
        compress: !run.no_compress,
        workers: run.workers.unwrap_or_else(|| SourceOptions::default().workers),
        send_path: run.send_path,
        ..Default::default()
    })
}

/// A progress bar on a terminal, nothing otherwise.
fn progress_bar() -> (ProgressBar, impl Fn(&Progress) + Sync) {
    let shown = std::io::stderr().is_terminal() && !QUIET.load(std::sync::atomic::Ordering::Relaxed);
    let bar = if shown { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("round {prefix:>2} [{bar:40}] {pos}/{len} pages  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let b = bar.clone();
    let update = move |p: &Progress| {
        b.set_prefix(p.epoch.to_string());
        b.set_length(p.round_pages);
        b.set_position(p.round_pages_done);
        b.set_message(format!(
            "{:.0} MiB sent, {:.2} Gbit/s",
            p.bytes_on_wire as f64 / 1048576.0,
            p.rate_bps * 8.0 / 1e9
        ));
    };
    (bar, update)
}

fn guest_info(g: &dyn Guest) -> GuestInfo {
    GuestInfo {
        kind: g.kind().to_string(),
        memory_bytes: g.memory().layout().total_bytes(),
        page_size: 4096,
        vcpus: g.vcpu_count(),
    }
}

fn finish(report: &Report, run_report: &Option<PathBuf>, json: bool, plot: Option<&std::path::Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    if let Some(path) = run_report {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = plot {
        livemig::plot::draw(&livemig::plot::PlotData::from_report(report), path)?;
        eprintln!("plot: {}", path.display());
    }
    if json {
        println!("{text}");
    } else {
        print!("{}", report.table());
    }
    match (&report.error, report.status) {
        (Some(e), _) if report.outcome_unknown => Err(Exit(3, format!("migration outcome unknown: {e}")).into()),
        (_, Status::Completed) => Ok(()),
        (Some(e), s) => Err(anyhow!("migration {s}: {e}")),
        (None, s) => Err(anyhow!("migration {s}")),
    }
}

/// The source's report; `written_before` is the guest's [`AnyGuest::pages_written`] when the migration started.
fn source_report(
    guest: &AnyGuest,
    r: &SourceReport,
    run: &RunOpts,
    opts: &SourceOptions,
    written_before: u64,
) -> Report {
    let mut report = Report::from_source(r, guest_info(guest), run.downtime_target as f64, opts.verify);
    // After a post-copy switch the guest went on writing on the destination until the last page arrived: its count
    // there (which carries on from the source's) is where the migration ended.
    let at_end = r.postcopy.as_ref().and_then(|p| p.destination.as_ref()).map(|d| d.guest_pages_written);
    let pages_written_during_migration =
        at_end.filter(|&n| n > 0).unwrap_or_else(|| guest.pages_written()).saturating_sub(written_before);
    report.guest_progress = Some(livemig::report::GuestProgress { pages_written_during_migration });
    let v = guest.vcpus();
    report.source_vcpus_after = Some(VcpuState { paused: v.is_paused(), throttle_pct: v.throttle() });
    report.memory = Some(livemig::report::Memory::measure(&[guest.memory()], r.table_bytes));
    report
}

fn demo(links: usize, insecure: bool, g: &GuestOpts, run: &RunOpts) -> Result<()> {
    if links == 0 {
        return Err(usage("--links must be at least 1"));
    }
    let security = if insecure {
        eprintln!("{INSECURE_WARNING}");
        SecurityPair::insecure()
    } else {
        SecurityPair::throwaway().context("making throwaway TLS credentials")?
    };
    let guest = make_guest(g)?;
    let opts = source_options(run, g)?;
    let (bar, update) = progress_bar();
    // The destination shares this host with the source, which already holds the guest: a guest larger than the
    // host's available memory is one the source holds sparse, and the destination (which faults in only what
    // arrives) may take it too.
    let defaults = DestOptions::default();
    let dopts = DestOptions {
        die_after_bytes: run.x_kill_destination_after_mib.map(|m| m << 20),
        max_memory: defaults.max_memory.max(guest.memory().layout().total_bytes()),
        // A ring per side when the source uses one.
        recv_uring: opts.send_path == Some(livemig::engine::encode::SendPath::Uring),
        ..defaults
    };
    let written_before = guest.pages_written();
    let out = migrate_loopback(&guest, links, &opts, &dopts, &security, &update)
        .context("setting up the loopback connection")?;
    bar.finish_and_clear();
    let mut report = source_report(&guest, &out.source, run, &opts, written_before);
    if let Ok((dest, d)) = &out.dest {
        // One process holds both sides: both guests and both sides' tables.
        let tables = out.source.table_bytes + d.table_bytes;
        report.memory = Some(livemig::report::Memory::measure(&[guest.memory(), dest.memory()], tables));
        // The source guest is paused for good: its counter is the one the destination must continue from.
        let at_pause = match &guest {
            AnyGuest::Kvm(g) => Some(g.counter()),
            AnyGuest::Synthetic(_) => None,
        };
        eprintln!("{}", dest.check_running(at_pause).map_err(|e| anyhow!(e))?);
    }
    if let (Ok(()), Err(e)) = (&out.source.result, &out.dest) {
        bail!("source completed but destination failed: {e}");
    }
    finish(&report, &run.report, run.json, run.plot.as_deref())
}

/// SIGINT and SIGTERM cancel the migration cleanly (the source guest resumes, the report is still written) instead
/// of killing the process.
fn cancel_on_signals() -> Result<std::sync::Arc<Controls>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let controls = std::sync::Arc::new(Controls::default());
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let c = controls.clone();
    std::thread::Builder::new().name("lm-signals".into()).spawn(move || {
        for sig in signals.forever() {
            let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
            eprintln!("livemig: {name}: cancelling the migration");
            c.cancel(format!("interrupted by {name}"));
        }
    })?;
    Ok(controls)
}

/// `livemig ctl PATH CMD [KEY=VALUE]`: one command to a running `send --control PATH`.
fn ctl(path: &Path, cmd: &str, setting: Option<&str>) -> Result<()> {
    let req = match (cmd, setting) {
        ("set", Some(kv)) => {
            let (k, v) = kv.split_once('=').ok_or_else(|| usage(format!("{kv}: want KEY=VALUE")))?;
            let value = match k {
                "downtime_target_ms" | "max_throttle_pct" => {
                    serde_json::json!(v.parse::<f64>().map_err(|_| usage(format!("{v}: not a number")))?)
                }
                _ if v == "none" => serde_json::Value::Null,
                _ => serde_json::json!(v),
            };
            serde_json::json!({"cmd": "set", k: value})
        }
        ("set", None) => {
            return Err(usage(
                "set needs KEY=VALUE (max_bandwidth=200mbit, downtime_target_ms=100, max_throttle_pct=50)",
            ))
        }
        (c, None) => serde_json::json!({"cmd": c}),
        (c, Some(_)) => return Err(usage(format!("{c} takes no argument"))),
    };
    let answer = livemig::control::request(path, &req).with_context(|| format!("talking to {}", path.display()))?;
    println!("{answer}");
    if answer["ok"] != true {
        bail!("refused: {}", answer["error"].as_str().unwrap_or("?"));
    }
    Ok(())
}

/// One line, printed when a command runs in clear.
const INSECURE_WARNING: &str =
    "livemig: warning: --insecure: guest memory crosses the network in clear and no peer is authenticated";

/// This host's credentials from `--tls`, or plaintext when `--insecure` names it; with neither, a usage error.
fn credentials(t: &TlsOpts, cmd: &str) -> Result<Option<Credentials>> {
    match &t.tls {
        Some(dir) => Ok(Some(Credentials::load(dir, t.tls_ca.as_deref()).map_err(|e| Exit(2, e.to_string()))?)),
        None if t.insecure => {
            eprintln!("{INSECURE_WARNING}");
            Ok(None)
        }
        None => Err(usage(format!(
            "{cmd} needs --tls DIR/NAME (mutual TLS; `livemig tls init` makes credentials), or --insecure to run in clear"
        ))),
    }
}

fn tls_init(dir: &Path, hosts: &[String]) -> Result<()> {
    let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
    if names.iter().any(|h| h.is_empty() || h.contains('/') || *h == "." || *h == "..") {
        return Err(usage("--hosts: each name must be a plain host name"));
    }
    tls::init(dir, &names)?;
    for h in &names {
        println!("{}", dir.join(h).display());
    }
    println!(
        "CA: {} (copy it, and DIR/NAME, to host NAME; keep ca-key.pem off the hosts)",
        dir.join("ca.pem").display()
    );
    Ok(())
}

fn send(
    to: &Address,
    links: &[LinkSpec],
    t: &TlsOpts,
    peer: Option<String>,
    control: Option<&Path>,
    g: &GuestOpts,
    run: &RunOpts,
) -> Result<()> {
    let security = match credentials(t, "send")? {
        None => SourceSecurity::Insecure,
        Some(c) => {
            let name = peer.or_else(|| c.sole_peer_name()).ok_or_else(|| {
                usage("--tls-peer NAME: the name the destination's certificate carries (no single other host beside --tls)")
            })?;
            let server_name =
                ServerName::try_from(name.clone()).map_err(|e| usage(format!("--tls-peer {name}: {e}")))?;
            SourceSecurity::Mtls { config: c.client_config()?, server_name }
        }
    };
    if let Address::Unix(path) = to {
        // Checked before the guest is built; the connect itself waits until it is, so the destination's Hello
        // deadline does not run while a large guest is made.
        use std::os::unix::fs::FileTypeExt;
        if !std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            bail!("connecting to {to}: no socket there (is `livemig receive --listen {to}` running?)");
        }
    }
    // Before the guest is built (seconds, for a large one): an interrupt meanwhile still ends in a report.
    let controls = cancel_on_signals()?;
    let guest = make_guest(g)?;
    let mut opts = source_options(run, g)?;
    if let Some(path) = control {
        livemig::control::serve(path, controls.clone())
            .with_context(|| format!("serving the control socket {}", path.display()))?;
    }
    opts.controls = Some(controls);
    let stream = to.connect(Duration::from_secs(10))?;
    let (bar, update) = progress_bar();
    let written_before = guest.pages_written();
    let r = migrate(&guest, stream, links, &opts, &security, &update);
    bar.finish_and_clear();
    if let Some(path) = control {
        // The migration is over: nothing answers on the socket any more.
        let _ = std::fs::remove_file(path);
    }
    finish(&source_report(&guest, &r, run, &opts, written_before), &run.report, run.json, run.plot.as_deref())
}

/// Creates and faults in a destination guest of `bytes` in one region (`receive --prealloc`).
fn preallocate(bytes: u64) -> Result<SyntheticGuest> {
    let t = Instant::now();
    let g = SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, bytes)] }, 1)
        .context("preallocating guest memory")?;
    g.prefault(0, g.total_pages());
    eprintln!("preallocated {} MiB of guest memory in {:.2} s", bytes >> 20, t.elapsed().as_secs_f64());
    Ok(g)
}

/// The destination's options from `receive`'s arguments, checked before anything is bound or allocated.
fn receive_options(a: &ReceiveArgs) -> Result<DestOptions> {
    let mut opts = DestOptions {
        fail_committed: a.x_fail_committed,
        recv_uring: a.recv_path == args::RecvPath::Uring,
        postcopy_wait: Duration::from_secs(a.postcopy_wait),
        ..Default::default()
    };
    if let Some(max) = a.max_memory {
        opts.max_memory = max;
    }
    let available = livemig::transport::dest::available_memory();
    if let (Some(want), Some(have)) = (a.prealloc, available) {
        if want > have {
            return Err(usage(format!(
                "--prealloc {} MiB is more than the {} MiB of memory this host has available",
                want >> 20,
                have >> 20
            )));
        }
    }
    let mut description = opts.describe();
    if let Some(n) = &a.name {
        description.name = n.clone();
    }
    description.datastores = a.datastores.clone();
    for pg in &a.port_groups {
        let (name, uplinks) =
            pg.split_once(':').ok_or_else(|| usage(format!("--port-group {pg}: want NAME:UPLINKS")))?;
        let uplinks = uplinks.parse().map_err(|_| usage(format!("--port-group {pg}: uplinks must be a number")))?;
        description.port_groups.push(PortGroup { name: name.to_string(), uplinks });
    }
    opts.description = Some(description);
    Ok(opts)
}

/// The destination's report: what it received and applied (the rounds, links and pause are the source's to tell).
fn destination_report(guest: &AnyGuest, r: &DestReport, start: Instant, cpu_seconds: f64) -> Report {
    Report {
        status: Status::Completed,
        error: r.committed_error.clone(),
        outcome_unknown: r.committed_error.is_some(),
        // receive() returns after a Commit, which it refuses unless the digests were equal; or, after a post-copy
        // switch, with every page here but the source lost before the tables were compared (then it says so).
        verified: r.verified,
        verify_mode: if r.full_verify { "full" } else { "tables" }.to_string(),
        guest: guest_info(guest),
        total_time_s: r.resumed_at.duration_since(start).as_secs_f64(),
        downtime_ms: None,
        downtime_target_ms: 0.0,
        downtime_parts: None,
        bytes_on_wire: r.bytes_received,
        pages: Pages::from(r.pages),
        rounds: Vec::new(),
        links: Vec::new(),
        max_throttle_pct: 0.0,
        source_vcpus_after: None,
        send_path: "-".to_string(),
        cpu_seconds,
        uring_requests: r.uring_requests,
        timeline: Vec::new(),
        security: livemig::report::Security::from(&r.security),
        memory: Some(livemig::report::Memory::measure(&[guest.memory()], r.table_bytes)),
        guest_progress: None,
        postcopy: r.postcopy.as_ref().map(|(s, pulled)| {
            livemig::report::Postcopy::from_destination(s, *pulled, r.resumed_at.duration_since(start))
        }),
    }
}

/// `receive`: waits for a source, refusing (and going on waiting after) any attempt turned down at the handshake,
/// then receives one migration.
fn receive_cmd(a: ReceiveArgs) -> Result<()> {
    let security = match credentials(&a.tls, "receive")? {
        None => DestSecurity::Insecure,
        Some(c) => DestSecurity::Mtls(c.server_config()?),
    };
    let opts = receive_options(&a)?;
    let listener = a.listen.bind().with_context(|| format!("listening on {}", a.listen))?;
    let extra =
        a.data.iter().map(|d| d.bind().with_context(|| format!("listening on {d}"))).collect::<Result<Vec<_>>>()?;
    // The preallocated guest waits here until a matching source takes it (a refused one may leave it unused).
    let ready = std::cell::Cell::new(a.prealloc.map(preallocate).transpose()?);
    eprintln!("waiting for a migration on {}", listener.address()?);
    let refused = |peer: &Peer, e: &_| eprintln!("refused {peer}: {e}");
    let listeners: Vec<&Listener> = std::iter::once(&listener).chain(extra.iter()).collect();
    let (guest, r, start, cpu_start) = loop {
        let (stream, hello) = accept_migration(&listener, &opts, &security, &refused)?;
        let start = Instant::now();
        let cpu_start = livemig::transport::cpu_usage::process_cpu_seconds();
        let peer = stream.stream().peer()?;
        let make = |h: &Hello| match ready.take() {
            Some(g) if g.layout() == h.layout && h.guest_kind == "synthetic" => {
                g.vcpus().set_limit(h.vcpus);
                Ok(AnyGuest::Synthetic(g))
            }
            _ => AnyGuest::destination(h),
        };
        match receive(&listeners, &stream, hello, make, &opts, &security, &refused) {
            Ok((guest, r)) => break (guest, r, start, cpu_start),
            // Turned down at the handshake: nothing changed here, so wait for the real source.
            Err(e) if e.is_refusal() => {
                refused(&peer, &e);
                let kept = match (ready.take(), a.prealloc) {
                    (None, Some(bytes)) => Some(preallocate(bytes)?),
                    (kept, _) => kept,
                };
                ready.set(kept);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("receiving the migration")),
        }
    };
    let cpu_seconds = livemig::transport::cpu_usage::process_cpu_seconds() - cpu_start;
    eprintln!("guest resumed {:.3} s after the handshake", r.resumed_at.duration_since(start).as_secs_f64());
    if let Some(e) = &r.committed_error {
        // The guest runs here and stays running; the source did not hear so and stays paused.
        eprintln!("livemig: the guest runs here, but the source was not told ({e}): it stays paused");
    }
    for (link, why) in &r.link_errors {
        eprintln!("data link {link} ended for bad data: {why}");
    }
    // The guest runs here from now on: what fails below is reported, and never makes this exit as if the source
    // still had it.
    if let Some(iface) = &a.announce {
        match announce(iface, &r.hello.macs, Schedule::default()) {
            Ok(sent) => eprintln!("announced {} MAC(s) on {iface}: {sent} RARP frames", r.hello.macs.len()),
            Err(e) => eprintln!("livemig: the guest runs, but announcing its MACs on {iface} failed: {e}"),
        }
    }
    match guest.check_running(None) {
        Ok(seen) => eprintln!("{seen}"),
        Err(e) => return Err(Exit(3, format!("the source handed the guest over, but here: {e}")).into()),
    }
    std::thread::sleep(Duration::from_millis(a.run_for_ms.saturating_sub(100)));
    let report = destination_report(&guest, &r, start, cpu_seconds);
    finish(&report, &a.report, a.json, None)
}

fn read_cpu(path: &PathBuf) -> Result<CpuDescription> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a CPU description", path.display()))
}

fn cpu_cmd(cmd: CpuCmd) -> Result<()> {
    match cmd {
        CpuCmd::Show => {
            println!("{}", serde_json::to_string_pretty(&cpu::host())?);
            Ok(())
        }
        CpuCmd::Baseline { hosts, output } => {
            let hosts = hosts.iter().map(read_cpu).collect::<Result<Vec<_>>>()?;
            let (model, costs) = cpu::baseline(&hosts)?;
            let list = |s: &std::collections::BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(" ");
            println!("baseline ({} hosts, {}): {} features", hosts.len(), model.vendor, model.features.len());
            println!("  {}", list(&model.features));
            for (h, cost) in hosts.iter().zip(&costs) {
                if cost.is_empty() {
                    println!("{}: costs the cluster nothing", h.name);
                } else {
                    println!(
                        "{}: costs the cluster {} ({} feature(s) lost only because of it)",
                        h.name,
                        list(cost),
                        cost.len()
                    );
                }
            }
            if let Some(path) = output {
                std::fs::write(&path, serde_json::to_string_pretty(&model)?)?;
            }
            Ok(())
        }
        CpuCmd::Check { vm, host } => {
            let (vm, host) = (read_cpu(&vm)?, read_cpu(&host)?);
            let why = cpu::incompatibilities(&vm, &host);
            if why.is_empty() {
                println!("yes: {} can run a VM with CPU model {}", host.name, vm.name);
                Ok(())
            } else {
                println!("no: {}", why.join("; "));
                bail!("{} cannot run this VM", host.name)
            }
        }
    }
}

fn preflight_cmd(vm: &std::path::Path, dest: &std::path::Path) -> Result<()> {
    let vm = manifest::read(vm)?;
    let text = std::fs::read_to_string(dest).with_context(|| format!("reading {}", dest.display()))?;
    let dest: DestDescription =
        serde_json::from_str(&text).with_context(|| format!("{} is not a destination description", dest.display()))?;
    let failures = preflight::check(&vm, &dest);
    if failures.is_empty() {
        println!("ok: {} may migrate to {}", vm.name, dest.name);
        return Ok(());
    }
    println!("{} cannot migrate to {}: {} problem(s)", vm.name, dest.name, failures.len());
    for f in &failures {
        println!("- [{}] {}\n  fix: {}", f.requirement, f.reason, f.fix);
    }
    bail!("preflight failed with {} problem(s)", failures.len())
}
