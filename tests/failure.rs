//! A destination that dies mid-migration: the source keeps the guest, running and unthrottled (invariant 2 of
//! docs/architecture.md), and the CLI exits non-zero with a one-line reason. The destinations here are real
//! `livemig receive` processes, killed with SIGKILL.

mod common;

use common::assert_running_unthrottled;
use livemig::engine::guest::{SyntheticConfig, SyntheticGuest, Vcpus};
use livemig::engine::precopy::PrecopyConfig;
use livemig::transport::source::{migrate, MigrateError, SourceOptions};
use livemig::transport::tls::SecurityPair;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// Both sides' `--tls` arguments: mutual TLS with credentials made once for this test binary.
fn tls() -> &'static (Vec<String>, Vec<String>) {
    static TLS: std::sync::OnceLock<(Vec<String>, Vec<String>)> = std::sync::OnceLock::new();
    TLS.get_or_init(|| livemig::bench::security_args(&tls_dir(), false).unwrap())
}

fn tls_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("failure-tls")
}

/// Starts `livemig receive` on an ephemeral port and returns it with the address it listens on.
fn receiver() -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["receive", "--listen", "127.0.0.1:0"])
        .args(&tls().0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn livemig receive");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("receive printed nothing").unwrap();
    let addr = first.rsplit(' ').next().unwrap().to_string();
    assert!(first.starts_with("waiting for a migration on"), "{first}");
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

/// Whichever connection notices first, the reason names the destination's links.
fn names_a_dead_destination(line: &str) -> bool {
    line.contains("link to the destination failed") || line.contains("every data link failed")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[test]
fn killed_destination_leaves_the_source_running_unthrottled() {
    let guest =
        SyntheticGuest::new(&SyntheticConfig { memory_bytes: 512 << 20, dirty_rate: 5000, ..Default::default() })
            .unwrap();
    // A throttle left in place by the migration would show here after the failure.
    guest.vcpus().set_throttle(40.0);
    let (child, addr) = receiver();
    let pid = child.id();
    let child = Mutex::new(Some(child));
    let kill = || {
        if let Some(mut c) = child.lock().unwrap().take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    };
    let precopy = PrecopyConfig { peer_timeout: Duration::from_secs(5), ..Default::default() };
    let opts = SourceOptions { precopy, ..Default::default() };
    let stream = TcpStream::connect(&addr).unwrap();
    // The first progress report comes with the first acknowledged batches: the middle of round 0.
    let security = SecurityPair::from_dir(&tls_dir().join("tls"), "source", "destination");
    let r = migrate(&guest, stream, &[], &opts, &security.unwrap().source, &|p| {
        if p.round_pages_done > 0 {
            kill();
        }
    });
    kill();
    assert!(
        matches!(r.result, Err(MigrateError::Link(_) | MigrateError::AllLinksFailed(_) | MigrateError::Stalled(_))),
        "expected a link failure, got {:?}",
        r.result
    );
    assert!(r.links[0].failed);
    assert!(!r.verified);
    assert_running_unthrottled(&guest);
    assert!(rss_kib(pid) == 0, "receiver process still alive");
}

#[test]
fn send_exits_nonzero_with_one_line_when_the_receiver_is_killed() {
    let (mut child, addr) = receiver();
    let mut send = Command::new(BIN)
        .args(["send", "--to", &addr, "--memory", "1GiB", "--dirty-rate", "20000"])
        .args(["--downtime-target", "1", "--max-rounds", "1000"])
        .args(&tls().1)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the receiver once it holds 64 MiB of the guest: well inside round 0 of a 1 GiB guest.
    let t = Instant::now();
    while rss_kib(child.id()) < 64 << 10 {
        assert!(t.elapsed() < Duration::from_secs(60), "the migration never started");
        assert!(send.try_wait().unwrap().is_none(), "send ended before the receiver was killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = send.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            send.kill().unwrap();
            panic!("send did not exit after its receiver died");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut send.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "send exited 0 although its receiver was killed");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("livemig:")).collect();
    assert_eq!(errors.len(), 1, "want one error line, stderr was:\n{stderr}");
    assert!(names_a_dead_destination(errors[0]), "{}", errors[0]);
}

#[test]
fn demo_exits_nonzero_with_one_line_when_its_destination_dies() {
    let out = Command::new(BIN)
        .args(["demo", "--memory", "256MiB", "--dirty-rate", "5000", "--x-kill-destination-after-mib", "20"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("livemig:")).collect();
    assert_eq!(errors.len(), 1, "want one error line, stderr was:\n{stderr}");
    assert!(errors[0].contains("migration failed: ") && names_a_dead_destination(errors[0]), "{}", errors[0]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAILED"), "the link is reported failed; stdout was:\n{stdout}\nstderr:\n{stderr}");
}
