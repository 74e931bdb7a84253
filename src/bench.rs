//! `livemig bench`: a matrix of scenarios × link counts × send paths, each migrated between two processes (over
//! loopback, or across the lab's namespaces), each beside a raw-TCP baseline over the same links.
//!
//! For every row the harness starts `livemig receive` (its guest memory preallocated, as `lab run` does) and then
//! `livemig send` with the row's options, and reads both JSON reports; then it starts the baseline's sink and
//! blaster ([`crate::baseline`]) on the same addresses and pushes the migration's wire bytes through. The processes are
//! separate so that each side's CPU seconds come from its own `getrusage`. Rows run one at a time; nothing else runs
//! meanwhile.
//!
//! A row is `repeat` such pairs, a migration then its baseline, in turn. The row shows the median migration (by wire
//! throughput) and the median baseline, and the ratio of the two. On a shared machine both drift by a quarter or more
//! between runs a few seconds apart; taking them in turn exposes both to the same drift, and the medians keep one
//! lucky or unlucky run from deciding the ratio. Every run's figures are in the row's `runs`.

use crate::baseline::Transfer;
use crate::lab::Lab;
use crate::report::Report;
use serde::Serialize;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A guest scenario (docs/interfaces.md: reference or dirty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// The defaults: 75 % touched, the page mix, no dirtying.
    Reference,
    /// The reference plus `--dirty-rate 25000 --hot-set 10`.
    Dirty,
}

impl Scenario {
    /// Parses a name.
    pub fn parse(s: &str) -> Result<Scenario, BenchError> {
        match s {
            "reference" => Ok(Scenario::Reference),
            "dirty" => Ok(Scenario::Dirty),
            _ => Err(BenchError::Usage(format!("unknown scenario '{s}' (reference or dirty)"))),
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Scenario::Reference => &[],
            Scenario::Dirty => &["--dirty-rate", "25000", "--hot-set", "10"],
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Reference => "reference",
            Scenario::Dirty => "dirty",
        }
    }
}

/// Where the two hosts are.
#[derive(Debug, Clone)]
pub enum Hosts {
    /// Both on loopback; link k leaves from 127.0.0.k.
    Loopback,
    /// The lab's namespaces; link k is vmnic k.
    Lab(Lab),
}

/// The matrix.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Guest scenarios.
    pub scenarios: Vec<Scenario>,
    /// Link counts.
    pub links: Vec<usize>,
    /// Send paths, as `--send-path` takes them.
    pub paths: Vec<String>,
    /// Guest memory, bytes.
    pub memory: u64,
    /// Where the hosts are.
    pub hosts: Hosts,
    /// The livemig binary to run.
    pub exe: PathBuf,
    /// Where the reports of each row go.
    pub dir: PathBuf,
    /// More `send` options for every row (such as `--no-compress`).
    pub send_args: Vec<String>,
    /// The security modes to run each row in: "mtls" (throwaway credentials) and/or "insecure".
    pub security: Vec<String>,
    /// Migration and baseline pairs per row.
    pub repeat: usize,
}

/// One migration of a row and the baseline run after it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Run {
    /// The migration's wire bits per second (as [`Row::wire_bps`]).
    pub wire_bps: f64,
    /// The baseline's bits per second.
    pub baseline_bps: f64,
    /// Whether the migration completed and verified.
    pub verified: bool,
}

/// One row of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// "mtls" or "insecure".
    pub security: String,
    /// Scenario name.
    pub scenario: Scenario,
    /// Data links.
    pub links: usize,
    /// The `--send-path` asked for.
    pub send_path: String,
    /// The path in use at the end (what `auto` kept).
    pub used_path: String,
    /// Whether every migration of the row completed and verified.
    pub verified: bool,
    /// Seconds, handshake to the destination resumed.
    pub total_time_s: f64,
    /// Milliseconds of downtime.
    pub downtime_ms: Option<f64>,
    /// Bytes on the wire.
    pub bytes_on_wire: u64,
    /// Wire bits per second while pages moved: bytes on the wire over the rounds' durations (each from the round's
    /// start to its last acknowledgement), which leaves out the handshake and the switchover's control round trips,
    /// as the baseline leaves out its connects.
    pub wire_bps: f64,
    /// Source process CPU seconds per GB on the wire.
    pub source_cpu_s_per_gb: f64,
    /// Destination process CPU seconds per GB on the wire.
    pub dest_cpu_s_per_gb: f64,
    /// The baseline's bits per second, same bytes, same links (the median run).
    pub baseline_bps: f64,
    /// The baseline's sender and receiver CPU seconds per GB.
    pub baseline_cpu_s_per_gb: (f64, f64),
    /// `wire_bps / baseline_bps`: the median migration's throughput over the median baseline's.
    pub ratio: f64,
    /// Pages by codec, all rounds: zero, lz4, zstd, raw.
    pub codecs: [u64; 4],
    /// Zero-copy sends, and how many the kernel copied.
    pub zerocopy: (u64, u64),
    /// The source's JSON report (of the median migration).
    pub source_report: PathBuf,
    /// The destination's JSON report of the same migration.
    pub dest_report: PathBuf,
    /// Every pair, in the order run.
    pub runs: Vec<Run>,
}

/// Why the bench stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bad option.
    #[error("{0}")]
    Usage(String),
    /// A process could not be run or misbehaved.
    #[error("{0}")]
    Process(String),
    /// A report could not be read.
    #[error("report {path}: {why}")]
    Report {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// A child process that has said it is ready, with a thread passing its further stderr lines on.
pub struct Ready {
    /// The child.
    pub child: Child,
    forward: Option<std::thread::JoinHandle<()>>,
}

impl Ready {
    /// Waits for the child (killing it after `timeout`), and returns its stdout and whether it succeeded.
    pub fn finish(mut self, timeout: Duration) -> Result<(String, bool), BenchError> {
        let err = |e: std::io::Error| BenchError::Process(e.to_string());
        let t = Instant::now();
        while self.child.try_wait().map_err(err)?.is_none() && t.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.child.try_wait().map_err(err)?.is_none() {
            let _ = self.child.kill();
        }
        let out = self.child.wait_with_output().map_err(err)?;
        if let Some(f) = self.forward.take() {
            let _ = f.join();
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), out.status.success()))
    }
}

/// Starts `cmd` with stdout and stderr piped and waits until a stderr line starts with `ready`, passing each line to
/// `log` (now and afterwards, from a thread).
pub fn spawn_ready(cmd: &mut Command, ready: &str, log: impl Fn(&str) + Send + 'static) -> Result<Ready, BenchError> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::Process(format!("starting {:?}: {e}", cmd.get_program())))?;
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("piped")).lines();
    let ok = loop {
        match lines.next() {
            Some(Ok(l)) => {
                log(&l);
                if l.starts_with(ready) {
                    break true;
                }
            }
            _ => break false,
        }
    };
    if !ok {
        let _ = child.kill();
        let _ = child.wait();
        return Err(BenchError::Process(format!("{:?} exited before it was ready", cmd.get_program())));
    }
    let forward = std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| log(&l)));
    Ok(Ready { child, forward: Some(forward) })
}

/// A free TCP port on loopback (bound and released: another process could take it meanwhile, which only fails the row).
fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| BenchError::Process(e.to_string()))?;
    Ok(l.local_addr().map_err(|e| BenchError::Process(e.to_string()))?.port())
}

impl Hosts {
    /// A command running `exe` on the destination host (`dest`) or the source host.
    fn wrap(&self, exe: &Path, dest: bool) -> Command {
        match self {
            Hosts::Loopback => Command::new(exe),
            Hosts::Lab(lab) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &if dest { lab.dst() } else { lab.src() }]).arg(exe);
                c
            }
        }
    }

    /// The destination's listen address, the source's `--to` address and the `--link` values of `links` links, on
    /// `port`.
    fn addresses(&self, links: usize, port: u16) -> (String, String, Vec<String>) {
        match self {
            Hosts::Loopback => (
                format!("127.0.0.1:{port}"),
                format!("127.0.0.1:{port}"),
                (1..=links).map(|k| format!("127.0.0.{k}>127.0.0.1:{port}")).collect(),
            ),
            Hosts::Lab(_) => (
                format!("0.0.0.0:{port}"),
                format!("198.18.1.2:{port}"),
                (1..=links).map(|k| format!("vmnic{k}=198.18.{k}.1>198.18.{k}.2:{port}")).collect(),
            ),
        }
    }

    /// The `n`th port a row uses.
    fn port(&self, n: u16) -> Result<u16, BenchError> {
        match self {
            Hosts::Loopback => free_port(),
            Hosts::Lab(_) => Ok(crate::lab::PORT + n),
        }
    }
}

/// The security arguments the harness gives a `receive` and a `send`: `--insecure` on both when `insecure`, else
/// mutual TLS with throwaway credentials written under `dir/tls` (as `livemig tls init` would).
pub fn security_args(dir: &Path, insecure: bool) -> Result<(Vec<String>, Vec<String>), BenchError> {
    if insecure {
        return Ok((vec!["--insecure".into()], vec!["--insecure".into()]));
    }
    let creds = dir.join("tls");
    livemig_transport::tls::init(&creds, &["source", "destination"])
        .map_err(|e| BenchError::Process(format!("making throwaway TLS credentials: {e}")))?;
    let at = |host: &str| creds.join(host).display().to_string();
    Ok((
        vec!["--tls".into(), at("destination")],
        vec!["--tls".into(), at("source"), "--tls-peer".into(), "destination".into()],
    ))
}

/// Removes a directory (throwaway credentials) when dropped, however the run ends.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Takes `--insecure` out of `args`, saying whether it was there.
pub fn take_insecure(args: &mut Vec<String>) -> bool {
    let before = args.len();
    args.retain(|a| a != "--insecure");
    args.len() != before
}

/// Reads a migration's JSON report.
pub fn read_report(path: &Path) -> Result<Report, BenchError> {
    let bad = |why: String| BenchError::Report { path: path.to_path_buf(), why };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

/// Runs the matrix, calling `row_done` after each row. The destination's messages go to stderr, tagged with the row.
pub fn run(cfg: &BenchConfig, row_done: &mut dyn FnMut(&Row)) -> Result<Vec<Row>, BenchError> {
    if let Hosts::Lab(lab) = &cfg.hosts {
        let have = lab.links().map_err(|e| BenchError::Usage(e.to_string()))?;
        if let Some(&want) = cfg.links.iter().find(|&&n| n > have) {
            return Err(BenchError::Usage(format!("{want} links asked for, the lab has {have} (lab up --links N)")));
        }
    }
    std::fs::create_dir_all(&cfg.dir).map_err(|e| BenchError::Process(format!("{}: {e}", cfg.dir.display())))?;
    let mtls = security_args(&cfg.dir, false)?;
    let _creds = RemoveOnDrop(cfg.dir.join("tls"));
    let insecure = security_args(&cfg.dir, true)?;
    let mut rows = Vec::new();
    for &scenario in &cfg.scenarios {
        for &links in &cfg.links {
            for path in &cfg.paths {
                for sec in &cfg.security {
                    let args = if sec == "insecure" { &insecure } else { &mtls };
                    let mut row = run_row(cfg, scenario, links, path, args)?;
                    row.security = sec.clone();
                    row_done(&row);
                    rows.push(row);
                }
            }
        }
    }
    Ok(rows)
}

/// The row's figures from the median migration (by wire throughput) and the median baseline.
fn run_row(
    cfg: &BenchConfig,
    scenario: Scenario,
    links: usize,
    path: &str,
    security: &(Vec<String>, Vec<String>),
) -> Result<Row, BenchError> {
    let mut rows = Vec::with_capacity(cfg.repeat);
    let mut baselines = Vec::with_capacity(cfg.repeat);
    for i in 0..cfg.repeat.max(1) {
        let row = migrate_once(cfg, scenario, links, path, i, security)?;
        baselines.push(baseline_once(cfg, links, row.bytes_on_wire)?);
        rows.push(row);
    }
    let runs: Vec<Run> = rows
        .iter()
        .zip(&baselines)
        .map(|(r, b)| Run { wire_bps: r.wire_bps, baseline_bps: bps(&b.0), verified: r.verified })
        .collect();
    let verified = rows.iter().all(|r| r.verified);
    rows.sort_by(|a, b| a.wire_bps.total_cmp(&b.wire_bps));
    baselines.sort_by(|a, b| bps(&a.0).total_cmp(&bps(&b.0)));
    let mut row = rows.swap_remove(rows.len() / 2);
    let base = baselines[baselines.len() / 2];
    let gb = row.bytes_on_wire as f64 / 1e9;
    row.baseline_bps = bps(&base.0);
    row.baseline_cpu_s_per_gb = (base.0.cpu_seconds / gb.max(1e-9), base.1.cpu_seconds / gb.max(1e-9));
    row.ratio = row.wire_bps / row.baseline_bps.max(1e-9);
    Ok(Row { verified, runs, ..row })
}

fn bps(t: &Transfer) -> f64 {
    t.bytes as f64 * 8.0 / t.secs.max(1e-9)
}

/// One migration of a row (run `n`), its baseline fields left empty.
fn migrate_once(
    cfg: &BenchConfig,
    scenario: Scenario,
    links: usize,
    path: &str,
    n: usize,
    security: &(Vec<String>, Vec<String>),
) -> Result<Row, BenchError> {
    let sec = if security.0.iter().any(|a| a == "--insecure") { "insecure" } else { "mtls" };
    let tag = format!("{}-{links}l-{path}-{sec}-{n}", scenario.name());
    let (src_report, dst_report) =
        (cfg.dir.join(format!("{tag}-source.json")), cfg.dir.join(format!("{tag}-destination.json")));
    let port = cfg.hosts.port(0)?;
    let (listen, to, specs) = cfg.hosts.addresses(links, port);
    let memory = cfg.memory.to_string();
    let mut recv = cfg.hosts.wrap(&cfg.exe, true);
    recv.args(["receive", "--listen", &listen, "--prealloc", &memory, "--run-for-ms", "100", "--report"])
        .arg(&dst_report)
        .args(&security.0);
    if path == "uring" {
        // One ring per side.
        recv.args(["--recv-path", "uring"]);
    }
    let prefix = format!("[{tag} destination] ");
    let receiver = spawn_ready(&mut recv, "waiting for a migration", move |l| eprintln!("{prefix}{l}"))?;
    let mut send = cfg.hosts.wrap(&cfg.exe, false);
    send.args(["send", "--to", &to]);
    for s in &specs {
        send.args(["--link", s]);
    }
    send.args(["--memory", &memory, "--send-path", path]).args(scenario.args()).args(&cfg.send_args).args(&security.1);
    send.arg("--report").arg(&src_report);
    let sent = send.stderr(Stdio::null()).stdout(Stdio::null()).status();
    let (_, received_ok) = receiver.finish(Duration::from_secs(10))?;
    let sent = sent.map_err(|e| BenchError::Process(format!("running send: {e}")))?;
    let src = read_report(&src_report)?;
    let dst = if received_ok { read_report(&dst_report).ok() } else { None };
    let bytes = src.bytes_on_wire;
    let gb = bytes as f64 / 1e9;
    let zc = src.links.iter().fold((0, 0), |(s, c), l| (s + l.zerocopy_sends, c + l.zerocopy_copied));
    let moving: f64 =
        if src.rounds.is_empty() { src.total_time_s } else { src.rounds.iter().map(|r| r.duration_s).sum() };
    let p = src.pages;
    Ok(Row {
        security: sec.to_string(),
        scenario,
        links,
        send_path: path.to_string(),
        used_path: src.send_path.clone(),
        verified: sent.success() && src.verified,
        total_time_s: src.total_time_s,
        downtime_ms: src.downtime_ms,
        bytes_on_wire: bytes,
        wire_bps: bytes as f64 * 8.0 / moving.max(1e-9),
        source_cpu_s_per_gb: src.cpu_seconds / gb.max(1e-9),
        dest_cpu_s_per_gb: dst.as_ref().map_or(f64::NAN, |d| d.cpu_seconds / gb.max(1e-9)),
        baseline_bps: f64::NAN,
        baseline_cpu_s_per_gb: (f64::NAN, f64::NAN),
        ratio: f64::NAN,
        codecs: [p.zero, p.lz4, p.zstd, p.raw],
        zerocopy: zc,
        source_report: src_report,
        dest_report: dst_report,
        runs: Vec::new(),
    })
}

/// One baseline run: `bytes` over `links` links; returns (blaster, sink).
fn baseline_once(cfg: &BenchConfig, links: usize, bytes: u64) -> Result<(Transfer, Transfer), BenchError> {
    let port = cfg.hosts.port(1)?;
    let (listen, _, specs) = cfg.hosts.addresses(links, port);
    let mut sink = cfg.hosts.wrap(&cfg.exe, true);
    sink.args(["x-sink", "--listen", &listen, "--links", &links.to_string()]);
    let sink = spawn_ready(&mut sink, "listening", |l| eprintln!("[baseline sink] {l}"))?;
    let mut blast = cfg.hosts.wrap(&cfg.exe, false);
    blast.args(["x-blast", "--bytes", &bytes.to_string()]);
    for s in &specs {
        blast.args(["--link", s]);
    }
    let out = blast.stderr(Stdio::inherit()).output().map_err(|e| BenchError::Process(format!("x-blast: {e}")))?;
    let (sink_out, sink_ok) = sink.finish(Duration::from_secs(30))?;
    if !out.status.success() || !sink_ok {
        return Err(BenchError::Process(format!("the raw-TCP baseline failed ({})", out.status)));
    }
    let parse = |s: &str, who: &str| {
        serde_json::from_str::<Transfer>(s.trim())
            .map_err(|e| BenchError::Process(format!("baseline {who} printed no result: {e}: {s}")))
    };
    Ok((parse(&String::from_utf8_lossy(&out.stdout), "blaster")?, parse(&sink_out, "sink")?))
}

/// The matrix as a table.
pub fn table(rows: &[Row]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:>5} {:<8} {:<8} {:<8} {:>7} {:>8} {:>8} {:>7} {:>7} {:>6} {:>9} {:>9} {:>11}  codecs zero/lz4/zstd/raw",
        "scenario",
        "links",
        "security",
        "path",
        "used",
        "time s",
        "down ms",
        "wire MiB",
        "Gbit/s",
        "TCP Gb",
        "ratio",
        "src s/GB",
        "dst s/GB",
        "TCP s/GB"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<9} {:>5} {:<8} {:<8} {:<8} {:>7.3} {:>8} {:>8.1} {:>7.2} {:>7.2} {:>6.2} {:>9.2} {:>9.2} {:>5.2}/{:<5.2}  {}{}",
            r.scenario.name(),
            r.links,
            r.security,
            r.send_path,
            r.used_path,
            r.total_time_s,
            r.downtime_ms.map_or("-".into(), |d| format!("{d:.1}")),
            r.bytes_on_wire as f64 / (1u64 << 20) as f64,
            r.wire_bps / 1e9,
            r.baseline_bps / 1e9,
            r.ratio,
            r.source_cpu_s_per_gb,
            r.dest_cpu_s_per_gb,
            r.baseline_cpu_s_per_gb.0,
            r.baseline_cpu_s_per_gb.1,
            r.codecs.map(|c| c.to_string()).join("/"),
            if r.verified { "" } else { "  NOT VERIFIED" }
        );
    }
    s
}
