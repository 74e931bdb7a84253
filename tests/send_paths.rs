//! The send paths under live writes: raw pages sent in place from guest memory (vectored and MSG_ZEROCOPY) while the
//! guest keeps rewriting them.

use livemig::engine::encode::SendPath;
use livemig::engine::guest::{SyntheticConfig, SyntheticGuest};
use livemig::loopback::migrate_loopback;
use livemig::transport::dest::DestOptions;
use livemig::transport::source::{SourceOptions, VerifyMode};
use livemig::transport::tls::SecurityPair;

/// Migrates a 128 MiB guest that rewrites 40000 pages/s over its first 5 % (1638 pages, each rewritten about every
/// 40 ms) on `path`, compression off so that every non-zero page is raw; returns the pages the destination saw change
/// in flight.
fn migrate_under_writes(path: SendPath) -> u64 {
    migrate_under_writes_with(Some(path), &SecurityPair::insecure())
}

fn migrate_under_writes_with(path: Option<SendPath>, security: &SecurityPair) -> u64 {
    let cfg = SyntheticConfig { memory_bytes: 128 << 20, dirty_rate: 40_000, hot_set_pct: 5.0, ..Default::default() };
    let src = SyntheticGuest::new(&cfg).unwrap();
    let opts = SourceOptions { verify: VerifyMode::Full, send_path: path, compress: false, ..Default::default() };
    let run = migrate_loopback(&src, 2, &opts, &DestOptions::default(), security, &|_| {}).unwrap();
    let r = &run.source;
    assert!(r.result.is_ok(), "{path:?}: {:?}", r.result);
    // Full verification: both sides re-hashed all of memory at switchover and the roots were equal.
    assert!(r.verified, "{path:?}");
    let (_, report) = run.dest.expect("destination completed");
    let sealed = r.security.mode == "mtls";
    if path == Some(SendPath::ZeroCopy) && !sealed {
        let sends: u64 = r.links.iter().map(|l| l.zerocopy.sends).sum();
        let why: Vec<_> = r.links.iter().map(|l| &l.zerocopy_error).collect();
        assert!(sends > 0, "no MSG_ZEROCOPY send was made: {why:?}");
    }
    report.torn
}

#[test]
fn pages_written_while_their_zero_copy_send_is_in_flight_are_resent_and_the_digest_matches() {
    let torn = migrate_under_writes(SendPath::ZeroCopy);
    eprintln!("{torn} pages changed between hash and send");
    // Pages whose content changed between the source's hash and the kernel reading them for the send: the writes
    // really landed in flight, and the migration still verified.
    assert!(torn > 0, "no page was written while in flight: the test did not exercise the race");
}

#[test]
fn the_vectored_path_survives_the_same_writes() {
    migrate_under_writes(SendPath::Vectored);
}

#[test]
fn the_copy_path_never_sees_a_torn_page() {
    // A copied page is hashed from the copy that is sent, so what arrives always matches its hash.
    assert_eq!(migrate_under_writes(SendPath::Copy), 0);
}

#[test]
fn every_send_path_works_under_encryption_and_zero_copy_says_why_it_is_off() {
    let tls = SecurityPair::throwaway().unwrap();
    for path in [Some(SendPath::Copy), Some(SendPath::Vectored), Some(SendPath::ZeroCopy), None] {
        // Each migration verified in full (asserted inside), with pages rewritten while they are sealed and sent.
        migrate_under_writes_with(path, &tls);
    }
    let cfg = SyntheticConfig { memory_bytes: 32 << 20, ..Default::default() };
    let src = SyntheticGuest::new(&cfg).unwrap();
    let opts = SourceOptions { send_path: Some(SendPath::ZeroCopy), compress: false, ..Default::default() };
    let run = migrate_loopback(&src, 1, &opts, &DestOptions::default(), &tls, &|_| {}).unwrap();
    let link = &run.source.links[0];
    assert_eq!(link.zerocopy.sends, 0);
    let why = link.zerocopy_error.as_deref().unwrap_or_default();
    assert!(why.contains("does not apply to an encrypted link"), "{why}");
}

#[test]
fn one_ring_per_side_carries_every_link_sealed_or_plain_under_live_writes() {
    let cfg = SyntheticConfig { memory_bytes: 128 << 20, dirty_rate: 40_000, hot_set_pct: 5.0, ..Default::default() };
    let opts = SourceOptions {
        verify: VerifyMode::Full,
        send_path: Some(SendPath::Uring),
        compress: false,
        ..Default::default()
    };
    let dopts = DestOptions { recv_uring: true, ..Default::default() };
    for security in [SecurityPair::insecure(), SecurityPair::throwaway().unwrap()] {
        let src = SyntheticGuest::new(&cfg).unwrap();
        let run = migrate_loopback(&src, 3, &opts, &dopts, &security, &|_| {}).unwrap();
        let r = &run.source;
        assert!(r.result.is_ok() && r.verified, "{}: {:?}", r.security.mode, r.result);
        assert_eq!(r.send_path, SendPath::Uring);
        let (_, dest) = run.dest.expect("destination completed");
        // Every link's frames went through the rings: at least one request per frame on each side.
        let frames = r.pages.total() / 128;
        assert!(r.uring_requests >= frames, "source ring: {} requests for {frames} frames", r.uring_requests);
        assert!(dest.uring_requests >= frames, "destination ring: {} requests", dest.uring_requests);
        assert_eq!(r.links.iter().filter(|l| l.bytes_on_wire > 0).count(), 3, "all three links carried data");
    }
}

#[test]
fn a_destination_killed_mid_transfer_ends_a_ring_migration_with_a_clear_error_and_no_hang() {
    let cfg = SyntheticConfig { memory_bytes: 64 << 20, ..Default::default() };
    let src = SyntheticGuest::new(&cfg).unwrap();
    let opts = SourceOptions { send_path: Some(SendPath::Uring), compress: false, ..Default::default() };
    let dopts = DestOptions { recv_uring: true, die_after_bytes: Some(8 << 20), ..Default::default() };
    let t = std::time::Instant::now();
    let run = migrate_loopback(&src, 2, &opts, &dopts, &SecurityPair::throwaway().unwrap(), &|_| {}).unwrap();
    let e = run.source.result.expect_err("the destination died");
    // The data links or the control connection may be the first to find the destination gone; either way it says so.
    assert!(e.to_string().contains("peer closed the connection"), "{e}");
    assert!(run.dest.is_err());
    assert!(t.elapsed() < std::time::Duration::from_secs(30), "took {:?}", t.elapsed());
    // The source keeps its guest: its vCPUs run.
    assert!(!livemig::engine::guest::Guest::vcpus(&src).is_paused());
}
