//! End-to-end migrations over a real loopback connection, source and destination in this process.

use livemig::engine::encode::memory_root;
use livemig::engine::guest::{SyntheticConfig, SyntheticGuest, Vcpus};
use livemig::loopback::migrate_loopback;
use livemig::transport::dest::DestOptions;
use livemig::transport::source::{SourceOptions, VerifyMode};
use livemig::transport::tls::SecurityPair;
use std::time::Duration;

fn guest(mib: u64, dirty_rate: u64) -> SyntheticGuest {
    SyntheticGuest::new(&SyntheticConfig { memory_bytes: mib << 20, dirty_rate, ..Default::default() }).unwrap()
}

fn full() -> SourceOptions {
    SourceOptions { verify: VerifyMode::Full, ..Default::default() }
}

#[test]
fn reference_mix_migrates_verified_and_memory_is_equal() {
    // Tables mode (the default): the switchover compares only the hash tables, and this test checks that against
    // both memories re-hashed independently afterwards.
    let src = guest(256, 0);
    let run = migrate_loopback(
        &src,
        1,
        &SourceOptions::default(),
        &DestOptions::default(),
        &SecurityPair::insecure(),
        &|_| {},
    )
    .unwrap();
    let r = &run.source;
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert!(r.verified);
    let (dst, dreport) = run.dest.expect("destination completed");
    let dst = dst.synthetic().expect("a synthetic destination");
    // An independent check beside the protocol's own: both memories hashed here, now that both guests are idle.
    assert_eq!(memory_root(&src).unwrap(), memory_root(dst).unwrap());
    let pages = 256 << 20 >> 12;
    let touched = pages * 3 / 4;
    assert_eq!(r.pages.total(), touched, "round 0 sends the touched pages and skips the never-populated ones");
    assert_eq!(r.pages.zero, touched / 4, "every fourth touched page is zero");
    assert_eq!(dreport.pages.total(), touched);
    assert!(r.bytes_on_wire < (256u64 << 20) * 6 / 10, "{} bytes on the wire", r.bytes_on_wire);
    assert!(r.downtime.is_some());
    assert!(!dst.vcpus().is_paused(), "destination guest must run after commit");
    assert!(src.vcpus().is_paused(), "source guest must stay stopped after commit");
}

#[test]
fn live_writes_during_copy_are_resent_and_verified() {
    // The guest rewrites 25000 pages/s over 10 % of memory for the whole migration. With --verify full both sides
    // re-hash all memory at switchover, so a lost write would show as a mismatch (invariant 3).
    let src = guest(256, 25_000);
    let run = migrate_loopback(&src, 1, &full(), &DestOptions::default(), &SecurityPair::insecure(), &|_| {}).unwrap();
    let r = &run.source;
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert!(r.verified);
    assert!(r.rounds.len() >= 2, "dirty pages need at least one more round, got {}", r.rounds.len());
    assert!(r.rounds.iter().skip(1).all(|x| x.stats.dirty_pages > 0 || x.stats.last));
    assert!(r.downtime.is_some_and(|d| d < Duration::from_secs(2)), "{:?}", r.downtime);
    let (dst, _) = run.dest.expect("destination completed");
    let dst = dst.synthetic().expect("a synthetic destination");
    // The destination resumes the guest's vCPUs, which go on writing from where the source stopped.
    let before = dst.vcpus().pages_written();
    assert!(before >= src.vcpus().pages_written());
    std::thread::sleep(Duration::from_millis(100));
    assert!(dst.vcpus().pages_written() > before, "destination vCPUs are not running");
}

#[test]
fn a_long_round_with_a_quiet_control_connection_is_not_silence() {
    // Round 0 of 1 GiB (about 580 MiB on the wire) lasts several times 150 ms, and the control connection carries
    // nothing meanwhile: the destination must count the data links' traffic as the source being alive. (The gaps
    // between rounds and in the switchover are a few milliseconds, well under 150.)
    let src = guest(1024, 0);
    let dopts = DestOptions { idle_timeout: Duration::from_millis(150), ..Default::default() };
    let run = migrate_loopback(&src, 1, &SourceOptions::default(), &dopts, &SecurityPair::insecure(), &|_| {}).unwrap();
    assert!(run.source.result.is_ok(), "{:?}", run.source.result);
    assert!(run.source.rounds[0].stats.duration > Duration::from_millis(300), "round 0 too short to test this");
    assert!(run.dest.is_ok(), "{:?}", run.dest.err());
}
