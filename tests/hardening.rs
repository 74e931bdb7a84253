//! The destination and the switchover under attack and under a flaky network: nobody but the real source touches the
//! guest, a refused attempt changes nothing, one bad link does not end a migration, and nothing is lost after Commit.
//! Each test runs real sockets on loopback, with a real source (`migrate`) or one spoken byte by byte.

mod common;

use common::frames::{self, raw_page};
use common::{assert_running_unthrottled, frame_proxy};
use livemig::engine::encode::{page_hash, HashTable};
use livemig::engine::guest::{read_page, Guest, GuestMemory, SyntheticConfig, SyntheticGuest, Vcpus};
use livemig::engine::precopy::{OnTimeout, PrecopyConfig};
use livemig::guests::AnyGuest;
use livemig::transport::dest::{accept_migration, receive, DestOptions};
use livemig::transport::link::LinkSpec;
use livemig::transport::source::{migrate, session_id, MigrateError, SourceOptions, SourceReport};
use livemig::transport::tls::{DestSecurity, SourceSecurity};
use livemig::transport::wire::{self, Kind, Verify, HEADER_LEN};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PAGES: u64 = 16;

fn dopts() -> DestOptions {
    DestOptions { idle_timeout: Duration::from_secs(5), ..Default::default() }
}

/// Reads frames from `s` until one of `kind` arrives (or the connection ends); returns its body.
fn expect(s: &TcpStream, kind: Kind, within: Duration) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut body = Vec::new();
    let h = wire::read_frame(&mut &*s, &mut body).map_err(|e| e.to_string())?;
    if h.kind != kind {
        return Err(format!("got {:?} ({}) instead of {kind:?}", h.kind, wire::decode_reason(&body)));
    }
    Ok(body)
}

/// A destination in a thread: accepts one migration on `listener` and receives it into a synthetic guest.
fn destination(
    listener: TcpListener,
    opts: DestOptions,
) -> std::thread::JoinHandle<Result<(AnyGuest, livemig::transport::dest::DestReport), String>> {
    std::thread::spawn(move || {
        let (control, hello) =
            accept_migration(&listener, &opts, &DestSecurity::Insecure, &|_, _| {}).map_err(|e| e.to_string())?;
        receive(&[&listener], &control, hello, AnyGuest::destination, &opts, &DestSecurity::Insecure, &|_, _| {})
            .map_err(|e| e.to_string())
    })
}

fn guest(mib: u64, dirty_rate: u64) -> SyntheticGuest {
    SyntheticGuest::new(&SyntheticConfig { memory_bytes: mib << 20, dirty_rate, ..Default::default() }).unwrap()
}

/// Source options that keep pre-copy going for a second whatever the guest does (a target no round can meet), then
/// force the switchover: long enough for a test to act during the migration.
fn lasting_a_second() -> SourceOptions {
    SourceOptions {
        precopy: PrecopyConfig {
            downtime_target: Duration::from_micros(1),
            max_time: Some(Duration::from_secs(1)),
            max_rounds: 100_000,
            on_timeout: OnTimeout::Force,
            throttle: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Migrates `g` to `addr` with `opts` over `links` (none: one link to `addr`), running `during` on another thread
/// 300 ms after the migration starts.
fn migrate_with(
    g: &SyntheticGuest,
    addr: SocketAddr,
    links: &[LinkSpec],
    opts: &SourceOptions,
    during: impl FnOnce() + Send,
) -> SourceReport {
    std::thread::scope(|s| {
        let t = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            during();
        });
        let r = migrate(g, TcpStream::connect(addr).unwrap(), links, opts, &SourceSecurity::Insecure, &|_| {});
        t.join().unwrap();
        r
    })
}

/// Defect 1: a page that arrives after Verify must not reach guest memory; the destination resumes exactly the
/// memory whose root it reported.
#[test]
fn no_page_is_written_after_verify() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let opts = dopts();
        let (control, hello) = accept_migration(&listener, &opts, &DestSecurity::Insecure, &|_, _| {}).unwrap();
        let (g, _) =
            receive(&[&listener], &control, hello, AnyGuest::destination, &opts, &DestSecurity::Insecure, &|_, _| {})
                .unwrap();
        let mut page = vec![0u8; 4096];
        read_page(g.synthetic().unwrap(), 1, &mut page).unwrap();
        page
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(&frames::frame(Kind::Hello, &frames::hello(7, PAGES).encode())).unwrap();
    expect(&c, Kind::HelloAck, Duration::from_secs(5)).unwrap();
    let mut d = TcpStream::connect(addr).unwrap();
    d.write_all(&frames::frame(Kind::LinkHello, &wire::LinkHello { session: 7, link: 0, proof: None }.encode()))
        .unwrap();
    let (e, data) = raw_page(1, 0xa1);
    d.write_all(&frames::pages(0, vec![e], data.clone())).unwrap();
    expect(&d, Kind::Ack, Duration::from_secs(5)).unwrap();
    // The roots over what was sent: page 1 holds 0xa1, every other page is still zero.
    let table = HashTable::new(PAGES);
    table.set(1, page_hash(&data));
    let v = Verify { full: false, table_root: table.root(), memory_root: 0 };
    c.write_all(&frames::frame(Kind::Verify, &v.encode())).unwrap();
    let verified = wire::Verified::decode(&expect(&c, Kind::Verified, Duration::from_secs(5)).unwrap()).unwrap();
    assert!(verified.equal, "the destination's root differs before the late page");
    // A late copy of page 1, flagged live so that no hash check stops it, on the link that is still open.
    let (mut late, data) = raw_page(1, 0xb2);
    late.live = true;
    let _ = d.write_all(&frames::pages(1, vec![late], data));
    std::thread::sleep(Duration::from_millis(300));
    c.write_all(&frames::frame(Kind::Commit, &[])).unwrap();
    expect(&c, Kind::Committed, Duration::from_secs(5)).unwrap();
    let page = dest.join().unwrap();
    assert!(page.iter().all(|&b| b == 0xa1), "a page sent after Verify reached the resumed guest: {:#x}", page[0]);
}

/// Defect 2: a connection that never presents itself, and one that trickles its LinkHello a byte at a time, both held
/// open across the switchover, must not hold up the commit.
#[test]
fn silent_and_trickling_connections_do_not_hold_the_commit() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = destination(listener, dopts());
    let g = guest(64, 20000);
    let strays = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let r = migrate_with(&g, addr, &[], &lasting_a_second(), || {
            strays.lock().unwrap().push(TcpStream::connect(addr).unwrap());
            let mut t = TcpStream::connect(addr).unwrap();
            let stop = &stop;
            s.spawn(move || {
                for b in frames::frame(Kind::LinkHello, &wire::LinkHello { session: 0, link: 9, proof: None }.encode())
                {
                    if stop.load(Ordering::SeqCst) || t.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            });
        });
        stop.store(true, Ordering::SeqCst);
        r.result.as_ref().unwrap();
        assert!(r.verified);
        let commit = r.downtime_parts.commit;
        assert!(commit < Duration::from_millis(500), "the commit took {commit:?} with strays connected");
        let downtime = r.downtime.unwrap();
        assert!(downtime < Duration::from_millis(300), "downtime {downtime:?}");
    });
    dest.join().unwrap().unwrap();
    assert_eq!(strays.into_inner().unwrap().len(), 1);
}

/// Defect 4: a second source that says Hello while a migration runs is told at once that the destination is busy,
/// and the running migration completes.
#[test]
fn a_second_source_during_a_migration_is_told_busy() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = destination(listener, dopts());
    let g = guest(64, 20000);
    let answer = Mutex::new(None);
    let r = migrate_with(&g, addr, &[], &lasting_a_second(), || {
        let t = Instant::now();
        let mut second = TcpStream::connect(addr).unwrap();
        second.write_all(&frames::frame(Kind::Hello, &frames::hello(99, PAGES).encode())).unwrap();
        let got = expect(&second, Kind::Abort, Duration::from_secs(3)).map(|b| wire::decode_reason(&b));
        *answer.lock().unwrap() = Some((got, t.elapsed()));
    });
    r.result.as_ref().unwrap();
    assert!(r.verified);
    let (got, took) = answer.into_inner().unwrap().unwrap();
    let reason = got.unwrap();
    assert!(reason.contains("busy"), "{reason}");
    assert!(took < Duration::from_secs(1), "the second source waited {took:?} for its answer");
    dest.join().unwrap().unwrap();
}

/// Defect 4: two sources racing for an idle destination: one wins, the other gets an Abort saying it is busy.
#[test]
fn two_sources_racing_for_an_idle_destination_one_wins_and_one_is_told_busy() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Both connect and speak before the destination accepts either.
    let mut a = TcpStream::connect(addr).unwrap();
    let mut b = TcpStream::connect(addr).unwrap();
    a.write_all(&frames::frame(Kind::Hello, &frames::hello(1, PAGES).encode())).unwrap();
    b.write_all(&frames::frame(Kind::Hello, &frames::hello(2, PAGES).encode())).unwrap();
    let (control, hello) = accept_migration(&listener, &dopts(), &DestSecurity::Insecure, &|_, _| {}).unwrap();
    let loser = if hello.session == 1 { &b } else { &a };
    let reason = wire::decode_reason(&expect(loser, Kind::Abort, Duration::from_secs(3)).unwrap());
    assert!(reason.contains("busy"), "{reason}");
    drop(control);
}

/// Defect 5 (and "refused attempts do not end receive"): a guest over the memory cap is refused before anything is
/// allocated, and the destination goes on to take the next source.
#[test]
fn a_guest_over_the_memory_cap_is_refused_and_the_next_source_is_taken() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting = std::thread::spawn(move || {
        let opts = DestOptions { max_memory: 1 << 20, ..dopts() };
        accept_migration(&listener, &opts, &DestSecurity::Insecure, &|_, _| {})
            .map(|(_, h)| h.session)
            .map_err(|e| e.to_string())
    });
    let mut big = TcpStream::connect(addr).unwrap();
    big.write_all(&frames::frame(Kind::Hello, &frames::hello(1, 512).encode())).unwrap(); // 2 MiB
    let reason = wire::decode_reason(&expect(&big, Kind::Abort, Duration::from_secs(3)).unwrap());
    assert!(reason.contains("memory"), "{reason}");
    let mut small = TcpStream::connect(addr).unwrap();
    small.write_all(&frames::frame(Kind::Hello, &frames::hello(2, 64).encode())).unwrap();
    assert_eq!(accepting.join().unwrap().unwrap(), 2, "the destination did not go on to the next source");
}

/// Defect 5: a vCPU state blob may not name more vCPUs than the Hello did (each would be a thread).
#[test]
fn a_state_blob_with_more_vcpus_than_the_hello_is_refused() {
    let g = AnyGuest::destination(&frames::hello(1, PAGES)).unwrap();
    let n = 64u32;
    let mut blob = b"LMSV".to_vec();
    blob.extend_from_slice(&1u32.to_le_bytes());
    blob.extend_from_slice(&n.to_le_bytes());
    blob.extend_from_slice(&0u64.to_le_bytes());
    blob.extend_from_slice(&1u64.to_le_bytes());
    blob.resize(28 + n as usize * 16, 0);
    let err = g.vcpus().restore_state(&blob).expect_err("a blob of 64 vCPUs for a 1-vCPU Hello was restored");
    assert!(err.to_string().contains("vCPU"), "{err}");
}

/// Defect 6: a connection that presents the session and then sends garbage ends; the migration completes on the real
/// link.
#[test]
fn garbage_on_a_data_link_after_its_link_hello_ends_only_that_link() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = destination(listener, dopts());
    let g = guest(64, 20000);
    let opts = SourceOptions { session: 0x5e55_1011, ..lasting_a_second() };
    let rogue_answer = Mutex::new(None);
    let r = migrate_with(&g, addr, &[], &opts, || {
        let mut rogue = TcpStream::connect(addr).unwrap();
        let mut bytes =
            frames::frame(Kind::LinkHello, &wire::LinkHello { session: 0x5e55_1011, link: 5, proof: None }.encode());
        bytes.extend_from_slice(&[0x5a; 200]);
        rogue.write_all(&bytes).unwrap();
        *rogue_answer.lock().unwrap() =
            Some(expect(&rogue, Kind::Abort, Duration::from_secs(3)).map(|b| wire::decode_reason(&b)));
    });
    r.result.as_ref().unwrap();
    assert!(r.verified);
    let answer = rogue_answer.into_inner().unwrap().unwrap().unwrap();
    assert!(answer.contains("bad magic"), "{answer}");
    dest.join().unwrap().unwrap();
}

/// Flips one payload byte of the first page in a Pages frame that matches `pick` (by its entry's page and flags).
fn flip_first(pick: impl Fn(u64, bool) -> bool + Send + 'static) -> impl FnMut(&mut Vec<u8>) + Send + 'static {
    let mut done = false;
    move |f: &mut Vec<u8>| {
        if done || u16::from_le_bytes([f[6], f[7]]) != Kind::Pages as u16 {
            return;
        }
        let checked = u32::from_le_bytes(f[20..24].try_into().unwrap()) as usize;
        let count = u32::from_le_bytes(f[HEADER_LEN..HEADER_LEN + 4].try_into().unwrap()) as usize;
        let mut payload_at = HEADER_LEN + checked;
        for i in 0..count {
            let e = &f[HEADER_LEN + 8 + i * 16..HEADER_LEN + 8 + (i + 1) * 16];
            let mut p = [0u8; 8];
            p[..5].copy_from_slice(&e[..5]);
            let (page, len, codec, live) =
                (u64::from_le_bytes(p), u16::from_le_bytes([e[5], e[6]]) as usize, e[7] & 0xf, e[7] >> 4 == 1);
            if codec == 1 && pick(page, live) {
                f[payload_at + 1000] ^= 0x40;
                done = true;
                return;
            }
            payload_at += len;
        }
    }
}

/// Defect 6: a page corrupted on the wire ends its link only; the source sends that link's batches again on the
/// other, and the migration completes verified.
#[test]
fn a_corrupt_page_on_one_link_ends_that_link_and_the_migration_completes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = destination(listener, dopts());
    let g = guest(64, 0);
    let corrupting = frame_proxy(addr, flip_first(|_, live| !live));
    let links = [LinkSpec::to(addr), LinkSpec::to(corrupting)];
    let opts = SourceOptions {
        send_path: Some(livemig::engine::encode::SendPath::Copy),
        compress: false,
        ..Default::default()
    };
    let r = migrate_with(&g, addr, &links, &opts, || {});
    r.result.as_ref().unwrap();
    assert!(r.verified);
    assert!(r.links[1].failed, "the corrupting link was not ended: {:?}", r.links[1]);
    let why = r.links[1].error.clone().unwrap_or_default();
    assert!(why.contains("checksum"), "{why}");
    assert!(!r.links[0].failed);
    dest.join().unwrap().unwrap();
}

/// A flipped byte in a page sent in place (live) cannot be told from a guest write in flight, so the destination
/// records what arrived: the roots then differ at switchover, and the source keeps its guest, running.
#[test]
fn a_flipped_byte_in_a_live_page_ends_in_a_root_mismatch_and_a_running_source() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = destination(listener, dopts());
    // The guest writes only its first 1 %, so a page past the middle is never sent again to heal the flip.
    let g = SyntheticGuest::new(&SyntheticConfig {
        memory_bytes: 64 << 20,
        dirty_rate: 2000,
        hot_set_pct: 1.0,
        ..Default::default()
    })
    .unwrap();
    let half = g.total_pages() / 2;
    let corrupting = frame_proxy(addr, flip_first(move |page, live| live && page > half));
    let opts = SourceOptions { compress: false, ..Default::default() };
    let r = migrate_with(&g, addr, &[LinkSpec::to(corrupting)], &opts, || {});
    assert!(matches!(r.result, Err(MigrateError::DigestMismatch { .. })), "{:?}", r.result);
    assert!(!r.verified);
    assert_running_unthrottled(&g);
    let err = dest.join().unwrap().expect_err("the destination resumed a guest whose roots differ");
    assert!(!err.is_empty());
}

/// Defect 7: a session id must not be derivable from the clock and the process id.
#[test]
fn session_ids_are_not_derived_from_the_clock() {
    let clock = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            .try_into()
            .unwrap_or(u64::MAX)
    };
    let pid = u64::from(std::process::id());
    for _ in 0..20 {
        let before = clock();
        let id = session_id();
        let after = clock();
        // An attacker who knows roughly when a migration started, and its pid, tries every nanosecond in between.
        let guessed = (before..=after.min(before + 5_000_000))
            .any(|t| twox_hash::XxHash3_64::oneshot(&[t.to_le_bytes(), pid.to_le_bytes()].concat()) == id);
        assert!(!guessed, "session id {id:#x} is the hash of the clock and the pid");
    }
    let ids: std::collections::HashSet<u64> = (0..1000).map(|_| session_id()).collect();
    assert_eq!(ids.len(), 1000);
}

/// Defect 3: once the destination resumes the guest, failing to send `Committed` must not drop it: the destination
/// keeps the guest running and reports the failure; the source, which never heard, stays paused with the outcome
/// unknown.
#[test]
fn a_failure_to_send_committed_keeps_the_destination_guest_running() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = destination(listener, DestOptions { fail_committed: true, ..dopts() });
    let g = guest(64, 2000);
    let r = migrate_with(&g, addr, &[], &SourceOptions::default(), || {});
    assert!(matches!(r.result, Err(MigrateError::OutcomeUnknown(_))), "{:?}", r.result);
    assert!(g.vcpus().is_paused(), "the source resumed although the destination may run the guest");
    let (moved, report) = dest.join().unwrap().expect("the destination dropped a guest it had resumed");
    let why = report.committed_error.expect("the failure to send Committed was not reported");
    assert!(why.contains("sending Committed"), "{why}");
    moved.check_running(None).expect("the destination guest does not run");
}
