//! Preflight in the real handshake: the destination reports itself (here a fixture), the source checks its VM
//! manifest against it and refuses to start on any failure, listing all of them; a clean manifest migrates.

use livemig::engine::guest::{SyntheticConfig, SyntheticGuest, Vcpus};
use livemig::engine::preflight::DestDescription;
use livemig::loopback::migrate_loopback;
use livemig::manifest;
use livemig::transport::dest::DestOptions;
use livemig::transport::source::{MigrateError, SourceOptions};
use livemig::transport::tls::SecurityPair;
use std::path::Path;
use std::process::Command;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/preflight"))
}

fn dest() -> DestOptions {
    let d: DestDescription =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("dest.json")).unwrap()).unwrap();
    DestOptions { host_cpu: Some(d.cpu.clone()), description: Some(d), ..Default::default() }
}

fn source(vm: &str) -> SourceOptions {
    let m = manifest::read(&fixtures().join(vm)).unwrap();
    SourceOptions { vm_cpu: None, macs: manifest::macs(&m), manifest: Some(m), ..Default::default() }
}

fn guest() -> SyntheticGuest {
    SyntheticGuest::new(&SyntheticConfig { memory_bytes: 32 << 20, dirty_rate: 1000, ..Default::default() }).unwrap()
}

#[test]
fn every_failure_is_listed_and_the_migration_never_starts() {
    let src = guest();
    let run = migrate_loopback(&src, 1, &source("vm-bad.toml"), &dest(), &SecurityPair::insecure(), &|_| {}).unwrap();
    let failures = match &run.source.result {
        Err(MigrateError::Preflight(f)) => f.clone(),
        other => panic!("expected a preflight refusal, got {other:?}"),
    };
    let reqs: Vec<&str> = failures.iter().map(|f| f.requirement.as_str()).collect();
    assert_eq!(reqs, ["cpu", "cdrom", "floppy", "affinity", "network", "storage", "memory"]);
    assert!(failures.iter().all(|f| !f.fix.is_empty()));
    assert_eq!(run.source.pages.total(), 0, "no page may move");
    assert!(run.dest.is_err(), "the destination must not end up with a guest");
    assert!(!src.vcpus().is_paused());
}

#[test]
fn a_clean_manifest_migrates() {
    let src = guest();
    let run = migrate_loopback(&src, 1, &source("vm-clean.toml"), &dest(), &SecurityPair::insecure(), &|_| {}).unwrap();
    assert!(run.source.result.is_ok(), "{:?}", run.source.result);
    assert!(run.source.verified);
    let (_, d) = run.dest.unwrap();
    assert_eq!(d.hello.macs, [[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]], "the MACs travel for the announcement");
}

#[test]
fn the_cli_lists_all_failures_with_fixes() {
    let out = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["preflight", "--vm"])
        .arg(fixtures().join("vm-bad.toml"))
        .arg("--dest")
        .arg(fixtures().join("dest.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("7 problem(s)"), "{text}");
    assert_eq!(text.matches("  fix: ").count(), 7, "{text}");
}
