//! The command line's arguments, as clap parses them: the commands, and the guest and run options they share.

use clap::{Args, Parser, Subcommand, ValueEnum};
use livemig::engine::encode::SendPath;
use livemig::engine::precopy::{OnTimeout, PostcopyMode};
use livemig::kvm::DirtyLogMethod;
use livemig::report::parse_size;
use livemig::transport::link::LinkSpec;
use livemig::transport::source::VerifyMode;
use livemig::transport::stream::Address;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "livemig", version, about = "Live-migration memory transfer engine")]
pub(crate) struct Cli {
    /// Log what the migration does on stderr: -v for its steps (rounds, links, switchover), -vv for more. RUST_LOG
    /// (e.g. RUST_LOG=livemig_transport=debug) overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// No progress bar, and no log from the libraries.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub(crate) quiet: bool,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Migrate a synthetic guest inside this process, source to destination over loopback.
    Demo {
        /// Data links over loopback.
        #[arg(long, default_value_t = 1)]
        links: usize,
        /// Send in clear. By default both ends use mutual TLS with throwaway credentials made for the run.
        #[arg(long)]
        insecure: bool,
        #[command(flatten)]
        guest: GuestOpts,
        #[command(flatten)]
        run: RunOpts,
    },
    /// Be the source host: migrate a guest to a `livemig receive` at ADDR:PORT (or unix:PATH on this host).
    Send {
        /// The destination's control address: HOST:PORT, or unix:PATH for a destination on this host.
        #[arg(long, value_name = "HOST:PORT|unix:PATH")]
        to: Address,
        /// A data link, `[IFACE=]LOCAL>REMOTE:PORT`, quoted (the `>` is a shell redirect):
        /// --link 'eth1=10.0.1.1>10.0.1.2:7000'. One per NIC. Without any, one link goes to the --to address.
        #[arg(long = "link")]
        links: Vec<LinkSpec>,
        #[command(flatten)]
        tls: TlsOpts,
        /// The name the destination's certificate must carry. Default: the one other host in the --tls directory.
        #[arg(long)]
        tls_peer: Option<String>,
        /// Serve the migration's controls on this Unix socket (`livemig ctl PATH ...`): status, cancel, switchover,
        /// and live changes to the bandwidth cap and the downtime target.
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        #[command(flatten)]
        guest: GuestOpts,
        #[command(flatten)]
        run: RunOpts,
    },
    /// Check a VM manifest against a destination's description: every failure, with its reason and fix.
    Preflight {
        /// The VM manifest (TOML).
        #[arg(long)]
        vm: PathBuf,
        /// The destination's description (JSON).
        #[arg(long)]
        dest: PathBuf,
    },
    /// CPU descriptions: this host's, a cluster's baseline, and whether a VM's CPU model fits a host.
    Cpu {
        #[command(subcommand)]
        cmd: CpuCmd,
    },
    /// The two-host lab on one machine (network namespaces, veth, tbf); needs root.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Benchmark matrix: scenarios × link counts × send paths, each migrated between two processes and set beside a
    /// raw-TCP baseline over the same links. Prints a table and writes a JSON file.
    Bench(BenchArgs),
    /// The raw-TCP baseline's receiving end (for `bench`).
    #[command(hide = true)]
    XSink {
        #[arg(long)]
        listen: String,
        #[arg(long, default_value_t = 1)]
        links: usize,
    },
    /// The raw-TCP baseline's sending end (for `bench`).
    #[command(hide = true)]
    XBlast {
        #[arg(long = "link")]
        links: Vec<LinkSpec>,
        #[arg(long)]
        bytes: u64,
    },
    /// Be the destination host: wait for one migration and run the guest it brings.
    Receive(ReceiveArgs),
    /// Talk to a running `send --control PATH`: status, cancel, switchover, postcopy, or set KEY=VALUE
    /// (max_bandwidth=200mbit, downtime_target_ms=100, max_throttle_pct=50). Prints its JSON answer; exits 1 if it
    /// refused.
    Ctl {
        /// The control socket.
        path: PathBuf,
        /// The command.
        #[arg(value_parser = ["status", "cancel", "switchover", "postcopy", "set"])]
        cmd: String,
        /// For set: KEY=VALUE.
        setting: Option<String>,
    },
    /// Credentials for mutual TLS.
    Tls {
        #[command(subcommand)]
        cmd: TlsCmd,
    },
}

#[derive(Subcommand)]
pub(crate) enum TlsCmd {
    /// Write a private CA (DIR/ca.pem, its key DIR/ca-key.pem) and a certificate and key for each host
    /// (DIR/NAME/cert.pem, DIR/NAME/key.pem, keys mode 0600). Copy DIR/NAME and DIR/ca.pem to host NAME.
    Init {
        /// Where to write them.
        dir: PathBuf,
        /// The hosts, comma-separated (each certificate carries its host's name).
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
    },
}

#[derive(Args)]
pub(crate) struct ReceiveArgs {
    /// Address to listen on, for the control connection and data links: HOST:PORT, or unix:PATH (a socket file
    /// only this user may connect to, for a source on this host).
    #[arg(long, value_name = "HOST:PORT|unix:PATH")]
    pub(crate) listen: Address,
    #[command(flatten)]
    pub(crate) tls: TlsOpts,
    /// More addresses to accept data links on (one per NIC).
    #[arg(long = "data")]
    pub(crate) data: Vec<Address>,
    /// This destination's name in its description.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// A datastore this destination can see (repeat for each).
    #[arg(long = "datastore")]
    pub(crate) datastores: Vec<String>,
    /// A port group of this destination, NAME:UPLINKS (repeat for each).
    #[arg(long = "port-group")]
    pub(crate) port_groups: Vec<String>,
    /// After resuming the guest, announce its NICs' MACs (from the source's manifest) on this interface (RARP).
    #[arg(long)]
    pub(crate) announce: Option<String>,
    /// The largest guest accepted (e.g. 8GiB). Default: this host's available memory. A larger guest is refused at
    /// the handshake, before anything is allocated, and receive goes on waiting. More than is available may be
    /// allowed for a sparse guest on an overcommitted host; pre-faulting still stops at what is available.
    #[arg(long, value_parser = nonzero_size)]
    pub(crate) max_memory: Option<u64>,
    /// Create and fault in the destination guest's RAM (this size, one region) before any source connects, as a
    /// destination VM started with its memory preallocated would be. Used when the source's layout matches. May not
    /// exceed the host's available memory.
    #[arg(long, value_parser = nonzero_size)]
    pub(crate) prealloc: Option<u64>,
    /// How the data links' sockets are read: each link's thread makes its own calls (read), or one io_uring takes
    /// every link's recvmsg (uring; the counterpart of `send --send-path uring`).
    #[arg(long, value_enum, default_value = "read")]
    pub(crate) recv_path: RecvPath,
    /// After a post-copy switch, how long to wait for a source that went silent (every link down), or to reconnect a
    /// control connection that was lost, in seconds: the guest runs here without all its pages, and its vCPUs wait
    /// for them until then.
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) postcopy_wait: u64,
    /// How long to let the resumed guest run before exiting, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub(crate) run_for_ms: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the summary.
    #[arg(long)]
    pub(crate) json: bool,
    /// Fault injection (tests): the control connection fails just before Committed is sent.
    #[arg(long, hide = true)]
    pub(crate) x_fail_committed: bool,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Scenarios, comma-separated: reference, dirty.
    #[arg(long, default_value = "reference")]
    pub(crate) scenarios: String,
    /// Link counts, comma-separated.
    #[arg(long, default_value = "1")]
    pub(crate) links: String,
    /// Send paths, comma-separated: copy, vectored, zerocopy, uring, auto.
    #[arg(long, default_value = "copy,vectored,zerocopy,auto")]
    pub(crate) paths: String,
    /// Security modes, comma-separated: mtls (mutual TLS with throwaway credentials), insecure (plaintext).
    #[arg(long, default_value = "mtls,insecure")]
    pub(crate) security: String,
    /// Guest memory.
    #[arg(long, default_value = "2GiB", value_parser = guest_size)]
    pub(crate) memory: u64,
    /// Run in the lab (`lab up` first) instead of over loopback.
    #[arg(long)]
    pub(crate) lab: bool,
    /// The lab's namespace prefix.
    #[arg(long, default_value = "lm")]
    pub(crate) prefix: String,
    /// The JSON file of rows.
    #[arg(long, default_value = "bench.json")]
    pub(crate) output: PathBuf,
    /// Also draw each row's migration: FILE.svg becomes FILE-<scenario>-<links>l-<path>.svg.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Never compress (to compare the send paths' own CPU cost).
    #[arg(long)]
    pub(crate) no_compress: bool,
    /// Migrations per row, each followed by a baseline run; the row shows the medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) repeat: u16,
}

#[derive(Subcommand)]
pub(crate) enum CpuCmd {
    /// Print this host's CPU (vendor, family/model/stepping, features) as JSON, read with CPUID.
    Show,
    /// The features every listed host supports (the model a cluster's VMs must use to move anywhere), and what each
    /// host costs the cluster.
    Baseline {
        /// Host descriptions (from `cpu show`).
        hosts: Vec<PathBuf>,
        /// Write the baseline model here as JSON.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Can a VM with this CPU model run on this host? Exit 0 for yes, 1 for no with the reasons.
    Check {
        /// The VM's CPU model (a description, or a baseline).
        #[arg(long)]
        vm: PathBuf,
        /// The host's description.
        #[arg(long)]
        host: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum LabCmd {
    /// Create the namespaces PREFIX-src and PREFIX-dst joined by shaped veth links vmnic1..N.
    Up {
        /// Number of links.
        #[arg(long, default_value_t = 1)]
        links: usize,
        /// Link rate for tc, one for all or a comma list, one per link (1gbit,1gbit,500mbit,100mbit).
        #[arg(long, default_value = "1gbit")]
        rate: String,
        /// Namespace prefix.
        #[arg(long, default_value = "lm")]
        prefix: String,
    },
    /// Remove the lab's namespaces.
    Down {
        /// Namespace prefix.
        #[arg(long, default_value = "lm")]
        prefix: String,
    },
    /// Run `receive` in PREFIX-dst and `send` in PREFIX-src, one --link per vmnic; the rest are send options.
    Run {
        /// Namespace prefix (before any send option).
        #[arg(long, default_value = "lm")]
        prefix: String,
        /// Do not have the destination preallocate the guest's memory. By default the lab's destination host creates the
        /// guest's memory before the migration starts (receive --prealloc), as a hypervisor that has created the VM
        /// for an incoming migration would; with this, it faults memory in as pages arrive.
        #[arg(long)]
        no_prealloc: bool,
        /// Options for `livemig send` (guest and run options; --report FILE keeps the source's report).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        send_args: Vec<String>,
    },
}

/// How `send` and `receive` secure their connections: mutual TLS with `--tls`, or, named explicitly, nothing.
#[derive(Args, Clone)]
pub(crate) struct TlsOpts {
    /// This host's credentials: a directory holding cert.pem and key.pem (mode 0600), as `livemig tls init` writes
    /// them; the CA is DIR/../ca.pem unless --tls-ca names it.
    #[arg(long, value_name = "DIR/NAME")]
    pub(crate) tls: Option<PathBuf>,
    /// The CA both hosts' certificates chain to (PEM).
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Run without TLS: guest memory crosses the network in clear, and nothing authenticates the peer.
    #[arg(long, conflicts_with_all = ["tls", "tls_ca"])]
    pub(crate) insecure: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(crate) enum GuestKind {
    /// The synthetic reference guest (threads writing anonymous memory).
    Synthetic,
    /// A KVM VM running livemig's test guest (needs /dev/kvm).
    Kvm,
}

#[derive(Args)]
pub(crate) struct GuestOpts {
    /// The guest to migrate.
    #[arg(long, value_enum, default_value = "synthetic")]
    pub(crate) guest: GuestKind,
    /// Guest RAM, e.g. 512MiB or 2GiB.
    #[arg(long, default_value = "2GiB", value_parser = guest_size)]
    pub(crate) memory: u64,
    /// Percent of RAM written before migration starts (0 to 100).
    #[arg(long, default_value_t = 75.0, value_parser = percent(0.0))]
    pub(crate) touched: f64,
    /// Pages per second the vCPUs dirty during migration.
    #[arg(long, default_value_t = 0)]
    pub(crate) dirty_rate: u64,
    /// Dirtied pages are drawn from the first PCT percent of RAM (above 0, at most 100).
    #[arg(long, default_value_t = 10.0, value_parser = percent(f64::MIN_POSITIVE))]
    pub(crate) hot_set: f64,
    /// vCPU threads (1 to 4096).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) vcpus: u32,
    /// The VM's manifest (TOML): its memory, CPU model, affinity, devices, NICs and disks. The destination's own
    /// description is checked against it in the handshake, and the migration refused on any failure.
    #[arg(long)]
    pub(crate) vm: Option<PathBuf>,
    /// The VM's CPU model (a `cpu show` or `cpu baseline` JSON); the destination refuses the migration if it lacks any
    /// of its features. Defaults to this host's CPU. A KVM guest's CPUID is masked to it.
    #[arg(long)]
    pub(crate) cpu_model: Option<PathBuf>,
    /// How a KVM guest's dirty log is harvested (clear: measured faster, docs/architecture.md).
    #[arg(long, value_enum, default_value = "clear")]
    pub(crate) dirty_log: DirtyLogMethod,
}

/// `receive --recv-path`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RecvPath {
    /// Each link's thread reads its socket.
    Read,
    /// One io_uring serves every link.
    Uring,
}

/// `--send-path`: one of the library's paths, or `auto` (None: the explorer picks).
fn parse_send_path(s: &str) -> Result<Option<SendPath>, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    SendPath::from_str(s, true)
        .map(Some)
        .map_err(|_| format!("{s:?} is not one of copy, vectored, zerocopy, uring, auto"))
}

#[derive(Args)]
pub(crate) struct RunOpts {
    /// Downtime target in milliseconds (1 to 60000).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) downtime_target: u64,
    /// Pre-copy rounds (round 0 included) after which --on-timeout decides.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_rounds: u32,
    /// Seconds of pre-copy after which --on-timeout decides (above 0).
    #[arg(long, value_parser = positive_seconds)]
    pub(crate) max_time: Option<f64>,
    /// When the target cannot be met by then: cancel (the source keeps the guest), or force the switchover if the
    /// predicted pause is within 2 s.
    #[arg(long, value_enum, default_value = "cancel")]
    pub(crate) on_timeout: OnTimeout,
    /// Never throttle the vCPUs.
    #[arg(long)]
    pub(crate) no_throttle: bool,
    /// The most all data links together may carry, as tc writes rates: 400mbit, 1gbit. The links are paced to it,
    /// spread by their capacity, and convergence is planned at it.
    #[arg(long, value_parser = livemig::control::parse_bandwidth)]
    pub(crate) max_bandwidth: Option<u64>,
    /// The highest vCPU throttle convergence may use, percent (0 to 99; default 99, or 50 with --postcopy auto). A
    /// guest that cannot converge under it reaches --max-rounds/--max-time and --on-timeout, or post-copy, instead
    /// of being slowed further.
    #[arg(long, value_name = "PCT", value_parser = parse_pct)]
    pub(crate) max_throttle: Option<f64>,
    /// Post-copy: off; auto, when pre-copy cannot meet the downtime target under --max-throttle; or always, after
    /// round 0. The destination then runs the guest at once and pulls the pages it touches before they arrive (it
    /// needs userfaultfd: root, or vm.unprivileged_userfaultfd = 1).
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) postcopy: PostcopyMode,
    /// After a post-copy switch, how long to wait for a destination that went silent (every link down), or to
    /// reconnect a connection that was reset, in seconds: neither side has the whole guest, so the transfer goes on
    /// when the network returns.
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) postcopy_wait: u64,
    /// How the switchover verifies destination memory.
    #[arg(long, value_enum, default_value = "tables")]
    pub(crate) verify: VerifyMode,
    /// Never compress.
    #[arg(long)]
    pub(crate) no_compress: bool,
    /// Scan and encode worker threads (default: one per CPU; 1 to 256).
    #[arg(long, value_parser = workers)]
    pub(crate) workers: Option<usize>,
    /// How raw pages leave guest memory: copied into the batch, written in place with iovecs, in place with
    /// MSG_ZEROCOPY, in place with every link's sendmsg submitted to one io_uring (uring; pair it with `receive
    /// --recv-path uring`), or auto: try each but uring for 200 ms and keep the one that delivers fastest (the
    /// cheapest in CPU among near ties). The default is vectored: on every link `livemig bench` measured here it was
    /// fastest or tied, and auto's trials cost a migration that lasts a second a tenth of its time
    /// (docs/benchmarks.md).
    // Spelled out so that clap parses the value into an Option (None for auto) instead of making the flag optional.
    #[arg(long, value_parser = parse_send_path, default_value = "vectored")]
    pub(crate) send_path: std::option::Option<SendPath>,
    /// Fault injection (demo only): the destination drops its connection after this many MiB, as if killed.
    #[arg(long, hide = true)]
    pub(crate) x_kill_destination_after_mib: Option<u64>,
    /// Write the JSON report here (its directory must exist; checked before anything starts).
    #[arg(long, value_parser = output_file)]
    pub(crate) report: Option<PathBuf>,
    /// Draw the migration into this SVG file: throughput per link over time, pages and throttle per round.
    #[arg(long, value_parser = output_file)]
    pub(crate) plot: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A throttle ceiling: 0 to 99 percent (refused outside, not clamped).
fn parse_pct(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number of percent"))?;
    if (0.0..=livemig::engine::precopy::MAX_THROTTLE).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v}: the throttle ceiling is 0 to 99 percent"))
    }
}

/// A percentage from `min` to 100 (refused outside, not clamped).
fn percent(min: f64) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number of percent"))?;
        if (min..=100.0).contains(&v) {
            Ok(v)
        } else if min > 0.0 {
            Err(format!("{v}: above 0 and at most 100 percent"))
        } else {
            Err(format!("{v}: 0 to 100 percent"))
        }
    }
}

/// A number of seconds above 0.
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}': a number of seconds above 0")),
    }
}

/// A guest's memory: a whole number of 4 KiB pages, above 0.
fn guest_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        n if n > 0 && n % 4096 == 0 => Ok(n),
        _ => Err(format!("'{s}': a whole number of 4 KiB pages, above 0")),
    }
}

/// A size above 0.
fn nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!("'{s}': a size above 0")),
        n => Ok(n),
    }
}

/// A file the run writes at its end, checked now: its directory exists, and it can be created there. (A run that
/// migrated a guest must not then find it cannot say how it went.)
fn output_file(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!("{}: no such directory", dir.display()));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{s}: cannot be written ({e})"))?;
    Ok(path)
}

/// A worker count: 1 to 256.
fn workers(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!("'{s}': 1 to 256 workers")),
    }
}
