//! The KVM guest migrated end to end by the CLI: `livemig demo --guest kvm --memory 512MiB --dirty-rate 20000`.
//! Prints a visible skip where /dev/kvm is missing.

use std::io::Write;
use std::process::Command;

#[test]
fn demo_migrates_a_live_kvm_guest_and_it_carries_on_with_its_memory_intact() {
    if !livemig::kvm::available() {
        let _ = writeln!(std::io::stderr(), "SKIP kvm demo: /dev/kvm is not available");
        return;
    }
    let report = std::env::temp_dir().join(format!("livemig-kvm-demo-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["demo", "--guest", "kvm", "--memory", "512MiB", "--dirty-rate", "20000", "--verify", "full"])
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let _ = std::fs::remove_file(&report);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["verified"], true);
    assert_eq!(r["verify_mode"], "full");
    assert_eq!(r["guest"]["kind"], "kvm");
    assert!(r["downtime_ms"].as_f64().unwrap() < 2000.0);
    // The destination guest: counter continues from its value at the pause, keeps rising, self-checks pass.
    let line = stderr.lines().find(|l| l.starts_with("destination guest running")).expect("no destination line");
    let numbers: Vec<u64> =
        line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect();
    // "counter P at the pause, S → N in T ms, self-checks K passed, 0 failed"
    let (pause, start, now, ok) = (numbers[0], numbers[1], numbers[2], numbers[4]);
    assert!(start >= pause && now > start, "{line}");
    assert!(ok > 0 && line.ends_with("0 failed"), "{line}");
}
