//! The two-host lab for real: network namespaces joined by shaped veth links, `receive` and `send` as separate
//! processes. Needs root (CI runs as root); where namespaces cannot be made, each test prints a visible skip.
//! Every lab has a unique prefix and is torn down by a guard, even when the test fails.

use livemig::lab::{parse_rates, Lab, LabGuard};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// Builds a lab, or says loudly why this machine cannot and returns None.
fn lab_or_skip(test: &str, rates: &str, n: usize) -> Option<LabGuard> {
    let lab = Lab::new(&format!("lmt{}{test}", std::process::id()));
    match lab.up(&parse_rates(rates, n).unwrap()) {
        Ok(()) => Some(LabGuard(lab)),
        Err(e) => {
            // Straight to the process's stderr: the test harness captures only the print macros.
            let _ = writeln!(std::io::stderr(), "SKIP {test}: cannot build a network-namespace lab here: {e}");
            None
        }
    }
}

fn wait_listening(child: &mut Child) {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for l in lines.by_ref() {
        if l.unwrap().starts_with("waiting for a migration") {
            std::thread::spawn(move || lines.for_each(drop));
            return;
        }
    }
    panic!("receive never listened");
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_link_taken_down_during_round_0_fails_over_and_the_migration_completes() {
    let Some(guard) = lab_or_skip("down", "500mbit", 4) else { return };
    let lab = &guard.0;
    let dir = std::env::temp_dir().join(format!("livemig-labtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (dest_report, source_report) = (dir.join("dst.json"), dir.join("src.json"));
    let args: Vec<String> = ["--memory", "1GiB", "--verify", "full"].iter().map(|s| s.to_string()).collect();
    // Encrypted, as lab run does by default: failover must survive a sealed link dying mid-record.
    let security = livemig::bench::security_args(&dir, false).unwrap();
    let (mut recv, mut send) =
        lab.commands(BIN.as_ref(), &args, None, (dest_report.as_path(), source_report.as_path()), &security).unwrap();
    let mut receiver = recv.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_listening(&mut receiver);
    let mut sender = send.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
    // Pull vmnic2's cable once it has carried 16 MiB: round 0 of a 1 GiB guest is far from over by then.
    let t = Instant::now();
    while lab.tx_bytes(2).unwrap() < 16 << 20 {
        assert!(t.elapsed() < Duration::from_secs(60), "vmnic2 never carried data");
        assert!(sender.try_wait().unwrap().is_none(), "send ended before the link went down");
        std::thread::sleep(Duration::from_millis(5));
    }
    lab.set_link(2, false).unwrap();
    let status = wait_exit(&mut sender, Duration::from_secs(120));
    let _ = wait_exit(&mut receiver, Duration::from_secs(30));
    assert!(status.success(), "send failed although three links remained");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&source_report).unwrap()).unwrap();
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["verified"], true);
    assert_eq!(r["verify_mode"], "full");
    assert_eq!(
        (r["security"]["mode"].as_str(), r["security"]["peer"].as_str()),
        (Some("mtls"), Some("CN=destination"))
    );
    let failed: Vec<bool> = r["links"].as_array().unwrap().iter().map(|l| l["failed"].as_bool().unwrap()).collect();
    assert_eq!(failed, [false, true, false, false], "{}", r["links"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lab_up_and_down_from_the_cli_shape_links_and_leave_nothing_behind() {
    let prefix = format!("lmt{}cli", std::process::id());
    let up = std::process::Command::new(BIN)
        .args(["lab", "up", "--prefix", &prefix, "--links", "2", "--rate", "1gbit,100mbit"])
        .output()
        .unwrap();
    if !up.status.success() {
        let _ = writeln!(std::io::stderr(), "SKIP lab cli: {}", String::from_utf8_lossy(&up.stderr).trim());
        return;
    }
    let guard = LabGuard(Lab::new(&prefix));
    assert_eq!(guard.0.links().unwrap(), 2);
    let qdisc =
        std::process::Command::new("tc").args(["-n", &format!("{prefix}-src"), "qdisc", "show"]).output().unwrap();
    let qdisc = String::from_utf8_lossy(&qdisc.stdout);
    assert!(qdisc.contains("rate 1Gbit") && qdisc.contains("rate 100Mbit"), "{qdisc}");
    let down = std::process::Command::new(BIN).args(["lab", "down", "--prefix", &prefix]).status().unwrap();
    assert!(down.success());
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&prefix), "namespaces left behind");
    drop(guard);
}
