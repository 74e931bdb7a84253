//! CPU compatibility: descriptions read with CPUID, the cluster baseline and its costs on the shipped fixtures, and a
//! migration refused in the real handshake, before any page moves, when the destination lacks a feature.

use livemig::engine::cpu::{self, CpuDescription};
use livemig::engine::guest::{SyntheticConfig, SyntheticGuest, Vcpus};
use livemig::loopback::migrate_loopback;
use livemig::transport::dest::{DestOptions, ReceiveError};
use livemig::transport::source::{MigrateError, SourceOptions};
use livemig::transport::tls::SecurityPair;
use livemig::transport::wire::WireError;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

fn fixture(name: &str) -> CpuDescription {
    let path = format!("{}/fixtures/cpu/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn cpu_show_prints_what_cpuid_says() {
    let out = Command::new(BIN).args(["cpu", "show"]).output().unwrap();
    assert!(out.status.success());
    let shown: CpuDescription = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown, cpu::host());
    assert!(shown.features.contains("sse2") && shown.features.contains("lm"));
}

#[test]
fn baseline_on_the_fixtures_names_the_common_set_and_each_hosts_cost() {
    let dir = format!("{}/fixtures/cpu", env!("CARGO_MANIFEST_DIR"));
    let intel: Vec<String> =
        ["intel-icelake", "intel-westmere", "intel-nehalem"].iter().map(|n| format!("{dir}/{n}.json")).collect();
    let out = Command::new(BIN).args(["cpu", "baseline"]).args(&intel).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("sse4_2") && !text.lines().nth(1).unwrap().contains("aes"), "{text}");
    assert!(text.contains("intel-nehalem: costs the cluster aes pclmulqdq pdpe1gb"), "{text}");
    assert!(text.contains("intel-icelake: costs the cluster nothing"), "{text}");
    // Westmere and Ice Lake without Nehalem keep AES-NI.
    let (b, _) = cpu::baseline(&[fixture("intel-icelake"), fixture("intel-westmere")]).unwrap();
    assert!(b.features.contains("aes") && !b.features.contains("avx"));
    // Mixed vendors: a clear error, exit 1.
    let out =
        Command::new(BIN).args(["cpu", "baseline", &intel[0], &format!("{dir}/amd-epyc-milan.json")]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CPU vendors differ"));
    // check says no with the missing features, yes when the model fits.
    let no = Command::new(BIN).args(["cpu", "check", "--vm", &intel[0], "--host", &intel[1]]).output().unwrap();
    assert_eq!(no.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no.stdout).contains("avx2"));
    let yes = Command::new(BIN).args(["cpu", "check", "--vm", &intel[2], "--host", &intel[1]]).output().unwrap();
    assert!(yes.status.success());
}

fn guest() -> SyntheticGuest {
    SyntheticGuest::new(&SyntheticConfig { memory_bytes: 32 << 20, dirty_rate: 2000, ..Default::default() }).unwrap()
}

#[test]
fn a_vm_needing_features_the_destination_lacks_is_refused_before_any_page_moves() {
    let src = guest();
    let opts = SourceOptions { vm_cpu: Some(fixture("intel-icelake")), ..Default::default() };
    let dopts = DestOptions { host_cpu: Some(fixture("intel-westmere")), ..Default::default() };
    let run = migrate_loopback(&src, 1, &opts, &dopts, &SecurityPair::insecure(), &|_| {}).unwrap();
    let reason = match &run.source.result {
        Err(MigrateError::Handshake(WireError::PeerAbort(r))) => r.clone(),
        other => panic!("expected a refusal in the handshake, got {other:?}"),
    };
    for f in ["avx", "avx2", "avx512f", "sha_ni"] {
        assert!(reason.split([' ', ',']).any(|w| w == f), "{f} not named in: {reason}");
    }
    assert!(reason.contains("intel-westmere lacks CPU features"), "{reason}");
    assert_eq!(run.source.pages.total(), 0, "pages moved before the refusal");
    assert!(matches!(run.dest, Err(ReceiveError::Incompatible(_))));
    assert!(!src.vcpus().is_paused());
    // Another vendor is refused too.
    let opts = SourceOptions { vm_cpu: Some(fixture("amd-epyc-milan")), ..Default::default() };
    let run = migrate_loopback(&src, 1, &opts, &dopts, &SecurityPair::insecure(), &|_| {}).unwrap();
    assert!(format!("{:?}", run.source.result).contains("vendor differs"), "{:?}", run.source.result);
}

#[test]
fn a_vm_on_the_clusters_baseline_migrates() {
    let (model, _) = cpu::baseline(&[fixture("intel-icelake"), fixture("intel-westmere")]).unwrap();
    let src = guest();
    let opts = SourceOptions { vm_cpu: Some(model), ..Default::default() };
    let dopts = DestOptions { host_cpu: Some(fixture("intel-westmere")), ..Default::default() };
    let run = migrate_loopback(&src, 1, &opts, &dopts, &SecurityPair::insecure(), &|_| {}).unwrap();
    assert!(run.source.result.is_ok(), "{:?}", run.source.result);
    assert!(run.source.verified);
}
