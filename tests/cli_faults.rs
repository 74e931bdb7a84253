//! The CLI's side of the fault matrix, with `livemig receive` and `livemig send` as real processes on loopback:
//! attempts refused at the handshake do not end `receive`, a killed source is noticed within seconds, exit statuses
//! say what happened (0 completed, 1 failed with the source running, 2 usage, 3 outcome unknown), and running out of
//! descriptors at accept is waited out, not fatal.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// Both sides' `--tls` arguments: mutual TLS with credentials made once for this test binary.
fn tls() -> &'static (Vec<String>, Vec<String>) {
    static TLS: std::sync::OnceLock<(Vec<String>, Vec<String>)> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_faults-tls");
        livemig::bench::security_args(&dir, false).unwrap()
    })
}

/// A `livemig receive` on an ephemeral loopback port, with its stderr collected line by line.
struct Receiver {
    child: Child,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start(extra: &[&str], setup: impl FnOnce(&mut Command)) -> Receiver {
        Self::start_on("127.0.0.1:0", extra, setup)
    }

    fn start_on(listen: &str, extra: &[&str], setup: impl FnOnce(&mut Command)) -> Receiver {
        let mut cmd = Command::new(BIN);
        cmd.args(["receive", "--listen", listen, "--run-for-ms", "100"])
            .args(if extra.contains(&"--insecure") { &[][..] } else { &tls().0[..] })
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        setup(&mut cmd);
        let mut child = cmd.spawn().expect("spawn livemig receive");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        // A warning may come first (--insecure); the address comes with "waiting".
        let mut before = Vec::new();
        let first = loop {
            let l = lines.next().expect("receive printed nothing").unwrap();
            if l.starts_with("waiting for a migration on") {
                break l;
            }
            assert!(l.starts_with("livemig: warning"), "{l}");
            before.push(l);
        };
        let addr = first.rsplit(' ').next().unwrap().to_string();
        let collected = Arc::new(Mutex::new(before));
        let c = collected.clone();
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| c.lock().unwrap().push(l)));
        Receiver { child, addr, lines: collected }
    }

    /// Waits up to `within` for the process to exit.
    fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Let the stderr reader catch up with the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn stderr(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(to: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["send", "--to", to, "--touched", "50"])
        .args(&tls().1)
        .args(args)
        .output()
        .expect("run livemig send")
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).lines().last().unwrap_or_default().to_string()
}

#[test]
fn receive_refuses_a_guest_over_max_memory_and_an_alien_cpu_then_takes_the_next() {
    let mut r = Receiver::start(&["--max-memory", "64MiB"], |_| {});
    let big = send(&r.addr, &["--memory", "128MiB"]);
    assert_eq!(big.status.code(), Some(1), "{}", String::from_utf8_lossy(&big.stderr));
    let why = last_line(&big.stderr);
    assert!(why.contains("guest memory of 134217728 bytes exceeds the 67108864 bytes"), "{why}");
    assert!(r.child.try_wait().unwrap().is_none(), "receive ended after a refusal");
    // A VM whose CPU model this host cannot give (another vendor, or features it lacks) is refused the same way.
    let host = livemig::engine::cpu::host();
    let other = if host.vendor == "GenuineIntel" { "amd-epyc-milan" } else { "intel-icelake" };
    let model = format!("{}/fixtures/cpu/{other}.json", env!("CARGO_MANIFEST_DIR"));
    let alien = send(&r.addr, &["--memory", "32MiB", "--cpu-model", &model]);
    assert_eq!(alien.status.code(), Some(1), "{}", String::from_utf8_lossy(&alien.stderr));
    assert!(last_line(&alien.stderr).contains("refused"), "{}", last_line(&alien.stderr));
    assert!(r.child.try_wait().unwrap().is_none(), "receive ended after a refusal");
    let small = send(&r.addr, &["--memory", "32MiB"]);
    assert!(small.status.success(), "{}", String::from_utf8_lossy(&small.stderr));
    let status = r.wait(Duration::from_secs(10)).expect("receive did not end after the migration");
    assert!(status.success(), "{:?}", r.stderr());
    assert!(r.stderr().iter().any(|l| l.contains("exceeds the 67108864 bytes")), "{:?}", r.stderr());
}

#[test]
fn a_killed_source_ends_receive_within_seconds() {
    let mut r = Receiver::start(&[], |_| {});
    // A downtime target no round can meet keeps the source in pre-copy, so it is mid-round when it is killed.
    let mut source = Command::new(BIN)
        .args(["send", "--to", &r.addr, "--memory", "256MiB", "--dirty-rate", "50000", "--no-throttle"])
        .args(["--downtime-target", "1", "--max-time", "60", "--max-rounds", "100000"])
        .args(&tls().1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(source.try_wait().unwrap().is_none(), "the source ended before it could be killed");
    source.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    source.wait().unwrap();
    let status = r.wait(Duration::from_secs(10)).expect("receive did not notice the killed source within 10 s");
    println!("receive exited {status} {:?} after the kill", killed.elapsed());
    assert_eq!(status.code(), Some(1));
    let errors: Vec<String> = r.stderr().into_iter().filter(|l| l.starts_with("livemig:")).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn usage_errors_exit_2() {
    for args in
        [&["demo", "--links", "0"][..], &["send"][..], &["receive", "--listen", "127.0.0.1:0", "--max-memory", "lots"]]
    {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Every option is checked before a guest is built or a port bound, and an out-of-range value is refused, not
/// clamped: each of these exits 2 at once, naming the option and the range. An 8 GiB guest would take seconds to
/// build, so a quick exit shows nothing was.
#[test]
fn options_are_checked_before_any_work_and_out_of_range_values_are_refused() {
    let cases: [(&[&str], &str); 12] = [
        (&["--downtime-target", "0"], "1..=60000"),
        (&["--touched", "150"], "0 to 100 percent"),
        (&["--hot-set", "0"], "above 0 and at most 100"),
        (&["--vcpus", "0"], "1..=4096"),
        (&["--max-rounds", "0"], "--max-rounds"),
        (&["--max-time=-1"], "above 0"),
        (&["--workers", "0"], "1 to 256"),
        (&["--max-throttle", "120"], "0 to 99 percent"),
        (&["--max-bandwidth", "0mbit"], "--max-bandwidth"),
        (&["--memory", "5000"], "whole number of 4 KiB pages"),
        (&["--report", "/nonexistent/r.json"], "/nonexistent: no such directory"),
        (&["--plot", "/nonexistent/p.svg"], "/nonexistent: no such directory"),
    ];
    for (bad, why) in cases {
        let t = Instant::now();
        let size: &[&str] = if bad[0] == "--memory" { &[] } else { &["--memory", "8GiB"] };
        let out = Command::new(BIN).arg("demo").args(size).args(bad).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(err.contains(why), "{bad:?}: {err}");
        assert!(!err.contains("guest:"), "{bad:?}: a guest was built first: {err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{bad:?} took {:?}", t.elapsed());
    }
    // A --link typed without quotes reaches livemig cut at the '>': the error says to quote it.
    let out = Command::new(BIN)
        .args(["send", "--to", "127.0.0.1:9", "--insecure", "--link", "eth1=10.0.1.1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("quote the whole value"), "{out:?}");
}

/// Secure by default: without --tls, send and receive refuse to start unless --insecure names it, and then warn.
#[test]
fn send_and_receive_refuse_to_run_in_clear_unless_told_to() {
    for args in [&["send", "--to", "127.0.0.1:9"][..], &["receive", "--listen", "127.0.0.1:0"]] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("needs --tls DIR/NAME") && err.contains("--insecure"), "{err}");
    }
    let mut r = Receiver::start(&["--insecure"], |_| {});
    let out = Command::new(BIN)
        .args(["send", "--to", &r.addr, "--memory", "16MiB", "--insecure", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err.matches("warning: --insecure").count(), 1, "one warning line: {err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["security"]["mode"].as_str(), report["security"]["peer"].as_str()), (Some("insecure"), None));
    assert!(r.wait(Duration::from_secs(10)).is_some_and(|s| s.success()));
    assert!(r.stderr().iter().any(|l| l.contains("warning: --insecure")), "{:?}", r.stderr());
}

/// When `Committed` cannot be sent, both sides exit 3: the destination keeps running the guest it resumed, and the
/// source, which never heard, stays paused.
#[test]
fn an_unsent_committed_is_an_unknown_outcome_on_both_sides() {
    let mut r = Receiver::start(&["--x-fail-committed"], |_| {});
    let out = send(&r.addr, &["--memory", "32MiB", "--dirty-rate", "2000", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome_unknown"], true);
    assert_eq!(report["source_vcpus_after"]["paused"], true, "the source resumed a guest the destination may run");
    let status = r.wait(Duration::from_secs(10)).expect("receive did not end");
    assert_eq!(status.code(), Some(3), "{:?}", r.stderr());
    let lines = r.stderr();
    assert!(lines.iter().any(|l| l.contains("destination guest running")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("sending Committed")), "{lines:?}");
}

/// With its descriptors used up by silent connections, `receive` cannot accept the real source until their Hello
/// time runs out; accept's EMFILE is waited out, and the migration then completes.
#[test]
fn running_out_of_descriptors_at_accept_is_waited_out() {
    use std::os::unix::process::CommandExt;
    let mut r = Receiver::start(&[], |cmd| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: 16, rlim_max: 16 };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let port = r.addr.rsplit(':').next().unwrap().to_string();
    // Silent connections from two addresses take every descriptor the receiver has left.
    let mut silent = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..8 {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&format!("{ip}:0").parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
            s.connect(&format!("127.0.0.1:{port}").parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
            silent.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = send(&r.addr, &["--memory", "32MiB"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = r.wait(Duration::from_secs(10)).expect("receive did not end");
    assert!(status.success(), "{:?}", r.stderr());
    drop(silent);
}

/// SIGINT mid-round cancels cleanly: the source guest runs on unthrottled, the report is written with status
/// `cancelled`, `send` exits 1, and the destination hears why.
#[test]
fn sigint_mid_round_cancels_and_still_writes_the_report() {
    let mut r = Receiver::start(&[], |_| {});
    let report = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sigint-report.json");
    let _ = std::fs::remove_file(&report);
    // A target no round can meet keeps the source in pre-copy (throttled: --max-time is far off).
    let mut source = Command::new(BIN)
        .args(["send", "--to", &r.addr, "--memory", "256MiB", "--dirty-rate", "50000"])
        .args(["--downtime-target", "1", "--max-time", "60", "--max-rounds", "100000", "--report"])
        .arg(&report)
        .args(&tls().1)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(source.try_wait().unwrap().is_none(), "the source ended before the signal");
    let kill = Command::new("kill").args(["-INT", &source.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let signalled = Instant::now();
    let out = source.wait_with_output().unwrap();
    println!("send exited {} {:?} after SIGINT", out.status, signalled.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("SIGINT: cancelling the migration"), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["status"], "cancelled", "{json}");
    assert!(json["error"].as_str().unwrap().contains("interrupted by SIGINT"), "{}", json["error"]);
    assert_eq!(json["source_vcpus_after"]["paused"], false);
    assert_eq!(json["source_vcpus_after"]["throttle_pct"], 0.0);
    let status = r.wait(Duration::from_secs(10)).expect("receive did not end");
    assert_eq!(status.code(), Some(1));
    assert!(r.stderr().iter().any(|l| l.contains("cancelled: interrupted by SIGINT")), "{:?}", r.stderr());
}

fn ctl(path: &std::path::Path, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(BIN).arg("ctl").arg(path).args(args).output().unwrap();
    let answer = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), answer)
}

/// `send --control PATH` and `livemig ctl`: status while it runs, a live change to the cap, a refused command, and
/// a cancel that ends `send` with status cancelled and its guest running.
#[test]
fn the_control_socket_reports_changes_and_cancels_a_running_migration() {
    let mut r = Receiver::start(&[], |_| {});
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (sock, report) = (dir.join("control-test.sock"), dir.join("control-report.json"));
    let _ = std::fs::remove_file(&report);
    let mut source = Command::new(BIN)
        .args(["send", "--to", &r.addr, "--memory", "256MiB", "--dirty-rate", "20000", "--max-bandwidth", "400mbit"])
        .args(["--downtime-target", "1", "--max-time", "60", "--max-rounds", "100000", "--no-throttle", "--control"])
        .arg(&sock)
        .arg("--report")
        .arg(&report)
        .args(&tls().1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        assert!(t.elapsed() < Duration::from_secs(20), "no precopy status from the control socket");
        if sock.exists() {
            let (code, s) = ctl(&sock, &["status"]);
            if code == Some(0) && s["phase"] == "precopy" && s["throughput_bps"].as_f64() > Some(0.0) {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for key in ["round", "remaining_pages", "dirty_rate_pps", "throughput_bps", "throttle_pct", "eta_s"] {
        assert!(!status[key].is_null(), "status lacks {key}: {status}");
    }
    assert_eq!(status["max_bandwidth_bps"], 400_000_000);
    assert_eq!(ctl(&sock, &["set", "max_bandwidth=100mbit"]), (Some(0), serde_json::json!({"ok": true})));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl(&sock, &["status"]).1["max_bandwidth_bps"], 100_000_000);
    let (code, refused) = ctl(&sock, &["set", "workers=8"]);
    assert_eq!(code, Some(1));
    assert!(refused["error"].as_str().unwrap().contains("cannot set"), "{refused}");
    assert_eq!(ctl(&sock, &["cancel"]).0, Some(0));
    let exit = source.wait().unwrap();
    assert_eq!(exit.code(), Some(1));
    assert!(!sock.exists(), "send left its control socket behind");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["status"], "cancelled", "{json}");
    assert_eq!(
        (json["source_vcpus_after"]["paused"].as_bool(), json["max_throttle_pct"].as_f64()),
        (Some(false), Some(0.0))
    );
    assert_eq!(r.wait(Duration::from_secs(10)).and_then(|s| s.code()), Some(1));
}

/// -v logs the migration's steps from the libraries; -q silences them; by default they stay quiet.
#[test]
fn verbose_logs_the_steps_and_quiet_silences_them() {
    let run = |flag: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("RUST_LOG");
        if let Some(f) = flag {
            cmd.arg(f);
        }
        let out = cmd.args(["demo", "--memory", "32MiB", "--insecure"]).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let verbose = run(Some("-v"));
    for step in ["handshake done", "round started", "data link joined", "pausing", "migration completed"] {
        assert!(verbose.contains(step), "-v lacks {step:?}: {verbose}");
    }
    for quiet in [run(None), run(Some("-q"))] {
        assert!(!quiet.contains("round started") && !quiet.contains(" INFO "), "{quiet}");
    }
}

#[test]
fn two_processes_on_one_host_migrate_over_a_unix_socket_under_tls() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("migrate.sock");
    let listen = format!("unix:{}", path.display());
    let report = dir.join("dest.json");
    let mut r = Receiver::start_on(&listen, &["--report", report.to_str().unwrap()], |_| {});
    assert_eq!(r.addr, listen, "receive names where it listens");
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket() && meta.permissions().mode() & 0o777 == 0o600, "{meta:?}");
    let out = send(&listen, &["--memory", "128MiB", "--dirty-rate", "5000", "--verify", "full", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let src: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&src["status"], &src["verified"]), (&"completed".into(), &true.into()), "{src}");
    assert_eq!(src["security"]["mode"], "mtls", "{src}");
    assert_eq!(src["links"][0]["name"], listen.as_str(), "the default data link follows the control socket");
    // The guest kept writing while it migrated, at most at the 5000 pages/s it was asked for (one 64-page burst of
    // slack), and the report counts it.
    let written = src["guest_progress"]["pages_written_during_migration"].as_u64().unwrap();
    let most = 5000.0 * (src["total_time_s"].as_f64().unwrap() + 0.5) + 64.0;
    assert!(written > 0 && (written as f64) <= most, "{written} pages written, at most {most}");
    let status = r.wait(Duration::from_secs(10)).expect("receive did not end after the migration");
    assert!(status.success(), "{:?}", r.stderr());
    let dst: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(dst["status"], "completed", "{dst}");
    assert!(!path.exists(), "receive left its socket file behind");
    // A source given a path where nothing listens is told so before any guest is built.
    let t = Instant::now();
    let gone = send(&listen, &["--memory", "2GiB"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(last_line(&gone.stderr).contains(&format!("connecting to {listen}")), "{}", last_line(&gone.stderr));
    println!("refused in {:?}", t.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `demo`'s destination shares the host with a source that holds the guest sparse: a guest larger than the host's
/// available memory, few of its pages touched, migrates (a `receive` would refuse it without --max-memory).
#[test]
fn demo_takes_a_sparse_guest_larger_than_the_host() {
    let out = Command::new(BIN)
        .args(["demo", "--memory", "64GiB", "--touched", "0.1", "--insecure", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&r["status"], &r["verified"]), (&"completed".into(), &true.into()), "{r}");
    assert_eq!(r["guest"]["memory_bytes"], 64u64 << 30);
    // Only the touched pages cross: 0.1 % of 64 GiB is 64 MiB, a quarter of it zero pages.
    let wire = r["bytes_on_wire"].as_u64().unwrap();
    assert!(wire < 80 << 20, "{wire} bytes on the wire");
    // Both sides' per-page tables cover the 16 Ki pages written, not the 16 Mi pages of the guest: 8 bytes of hash
    // per page on each side and 4 of epoch at the destination would be 320 MiB for the whole guest.
    let m = &r["memory"];
    let tables = m["page_tables_bytes"].as_u64().unwrap();
    assert!(tables > 0 && tables < 4 << 20, "{m}");
    // Both guests' 64 MiB are resident, and the process held little else.
    let (guest, rss) = (m["guest_resident_bytes"].as_u64().unwrap(), m["peak_rss_bytes"].as_u64().unwrap());
    assert!(guest >= 2 * (64 << 20) - (1 << 20) && rss >= guest, "{m}");
    assert!(m["overhead_bytes"].as_u64().unwrap() < 256 << 20, "{m}");
}
