//! Several data links on loopback: the work is shared, strangers on a data port are refused, a lagging link cannot
//! put an old page copy over a newer one, and a link that stalls or breaks mid-round is failed and its batches go
//! out on the others.

mod common;

use common::Relay;
use livemig::transport::stream::Peer;

use livemig::engine::dirty::Bitmap;
use livemig::engine::encode::{page_hash, zero_page_hash, Codec, EncodedBatch, HashTable, PageEntry};
use livemig::engine::guest::{read_page, MemoryLayout, SyntheticConfig, SyntheticGuest, Vcpus};
use livemig::loopback::migrate_loopback;
use livemig::transport::dest::{accept_migration, receive, DestOptions};
use livemig::transport::link::LinkSpec;
use livemig::transport::source::{migrate, SourceOptions, VerifyMode};
use livemig::transport::tls::{DestSecurity, SecurityPair, SourceSecurity};
use livemig::transport::wire::{self, Hello, Kind, Verified, Verify};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

fn guest(mib: u64, dirty_rate: u64) -> SyntheticGuest {
    SyntheticGuest::new(&SyntheticConfig { memory_bytes: mib << 20, dirty_rate, ..Default::default() }).unwrap()
}

fn frame(kind: Kind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::write_frame(&mut out, kind, 0, 0, &[body]).unwrap();
    out
}

#[test]
fn three_links_share_the_work_and_verify() {
    let src = guest(256, 10_000);
    let opts = SourceOptions { verify: VerifyMode::Full, ..Default::default() };
    let run = migrate_loopback(&src, 3, &opts, &DestOptions::default(), &SecurityPair::insecure(), &|_| {}).unwrap();
    let r = &run.source;
    assert!(r.result.is_ok(), "{:?}", r.result);
    assert!(r.verified);
    assert_eq!(r.links.len(), 3);
    for l in &r.links {
        assert!(!l.failed, "{l:?}");
        // Loopback links run at whatever the CPUs give them, so the split varies; each must still carry real work.
        assert!(l.bytes_on_wire > 1 << 20, "link {} carried only {} bytes", l.name, l.bytes_on_wire);
    }
    // Per-round, per-link bytes add up to the round's bytes.
    for round in &r.rounds {
        assert_eq!(round.link_bytes.iter().sum::<u64>(), round.stats.bytes_on_wire);
    }
    let (_, dest) = run.dest.unwrap();
    assert_eq!(dest.links.len(), 3, "{:?}", dest.links);
}

#[test]
fn strangers_on_a_data_port_are_refused_and_the_migration_completes() {
    let control = TcpListener::bind("127.0.0.1:0").unwrap();
    let data = TcpListener::bind("127.0.0.1:0").unwrap();
    let (control_addr, data_addr) = (control.local_addr().unwrap(), data.local_addr().unwrap());
    // Both strangers are waiting on the data port before the migration begins.
    let mut no_session = TcpStream::connect(data_addr).unwrap();
    let (e, page) = (PageEntry::new(0, Codec::Raw, 4096, page_hash(&[1; 4096])), vec![1u8; 4096]);
    let batch = EncodedBatch { entries: vec![e], payload: page, ..Default::default() };
    let mut table = Vec::new();
    wire::encode_entries(&batch, &mut table);
    let mut pages = Vec::new();
    wire::write_pages(&mut pages, 9, 0, &table, &[&batch.payload]).unwrap();
    no_session.write_all(&pages).unwrap();
    let mut wrong_session = TcpStream::connect(data_addr).unwrap();
    wrong_session
        .write_all(&frame(Kind::LinkHello, &wire::LinkHello { session: 0xbad, link: 0, proof: None }.encode()))
        .unwrap();
    wrong_session.write_all(&pages).unwrap();

    let refused = Mutex::new(Vec::new());
    let src = guest(64, 2000);
    let opts = SourceOptions::default();
    let report = std::thread::scope(|s| {
        let dest = s.spawn(|| {
            let dopts = DestOptions::default();
            let note = |peer: &Peer, e: &livemig::transport::dest::ReceiveError| {
                refused.lock().unwrap().push((peer.clone(), e.to_string()))
            };
            let (stream, hello) = accept_migration(&control, &dopts, &DestSecurity::Insecure, &note).unwrap();
            receive(
                &[&control, &data],
                &stream,
                hello,
                |h| SyntheticGuest::destination(&h.layout, h.vcpus),
                &dopts,
                &DestSecurity::Insecure,
                &note,
            )
        });
        let links = [LinkSpec::to(data_addr)];
        let r =
            migrate(&src, TcpStream::connect(control_addr).unwrap(), &links, &opts, &SourceSecurity::Insecure, &|_| {});
        let (moved, _) = dest.join().unwrap().expect("destination completed");
        assert!(!moved.vcpus().is_paused());
        r
    });
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert!(report.verified);
    let refused = refused.into_inner().unwrap();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused.iter().any(|(_, e)| e.contains("unexpected Pages frame while waiting for LinkHello")),
        "{refused:?}"
    );
    assert!(refused.iter().any(|(_, e)| e.contains("session 0xbad")), "{refused:?}");
    // Each stranger was told why, in a frame it can read, and then closed.
    for mut s in [no_session, wrong_session] {
        let mut buf = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_end(&mut buf);
        let mut body = Vec::new();
        let h = wire::read_frame(&mut &buf[..], &mut body).unwrap();
        assert_eq!(h.kind, Kind::Abort);
    }
}

/// A source driven by hand: page 5 goes out in round 1 on link B, then, late, its round-0 copy on link A.
#[test]
fn a_lagging_link_cannot_overwrite_a_newer_copy() {
    const PAGES: u64 = 64;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let layout = MemoryLayout { regions: vec![(0, PAGES * 4096)] };
    let hello = Hello {
        session: 42,
        layout: layout.clone(),
        vcpus: 1,
        guest_kind: "synthetic".into(),
        chunks: Bitmap::full(1),
        cpu: None,
        macs: Vec::new(),
    };
    let dest = std::thread::spawn(move || {
        let dopts = DestOptions::default();
        let (stream, hello) = accept_migration(&listener, &dopts, &DestSecurity::Insecure, &|_, _| {}).unwrap();
        receive(
            &[&listener],
            &stream,
            hello,
            |h| SyntheticGuest::destination(&h.layout, h.vcpus),
            &dopts,
            &DestSecurity::Insecure,
            &|_, _| {},
        )
    });
    let mut control = TcpStream::connect(addr).unwrap();
    control.write_all(&frame(Kind::Hello, &hello.encode())).unwrap();
    let mut buf = Vec::new();
    assert_eq!(wire::read_frame(&mut control, &mut buf).unwrap().kind, Kind::HelloAck);
    let link = |i: u32| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&frame(Kind::LinkHello, &wire::LinkHello { session: 42, link: i, proof: None }.encode())).unwrap();
        s
    };
    let (mut a, mut b) = (link(0), link(1));
    let send = |s: &mut TcpStream, epoch: u32, fill: u8| {
        let data = vec![fill; 4096];
        let batch = EncodedBatch {
            epoch,
            entries: vec![PageEntry::new(5, Codec::Raw, 4096, page_hash(&data))],
            payload: data,
            ..Default::default()
        };
        let mut table = Vec::new();
        wire::encode_entries(&batch, &mut table);
        wire::write_pages(s, epoch, epoch, &table, &[&batch.payload]).unwrap();
        let mut ack = Vec::new();
        let h = wire::read_frame(s, &mut ack).unwrap();
        assert_eq!((h.kind, h.seq), (Kind::Ack, epoch));
    };
    send(&mut b, 1, 0xbb); // round 1 arrives first, on link B
    send(&mut a, 0, 0xaa); // round 0 arrives later, on the lagging link A
                           // The destination's digest must be that of memory holding round 1's copy.
    let table = HashTable::new(PAGES);
    table.set(5, page_hash(&[0xbb; 4096]));
    let state = SyntheticGuest::destination(&layout, 1).unwrap().vcpus().save_state().unwrap();
    control.write_all(&frame(Kind::VcpuState, &state)).unwrap();
    assert_eq!(wire::read_frame(&mut control, &mut buf).unwrap().kind, Kind::StateAck);
    let v = Verify { full: true, table_root: table.root(), memory_root: table.root() };
    control.write_all(&frame(Kind::Verify, &v.encode())).unwrap();
    assert_eq!(wire::read_frame(&mut control, &mut buf).unwrap().kind, Kind::Verified);
    let verdict = Verified::decode(&buf).unwrap();
    assert!(verdict.equal, "destination holds the older copy: {verdict:?}");
    control.write_all(&frame(Kind::Commit, &[])).unwrap();
    assert_eq!(wire::read_frame(&mut control, &mut buf).unwrap().kind, Kind::Committed);
    let (g, report) = dest.join().unwrap().unwrap();
    let mut page = vec![0u8; 4096];
    read_page(&g, 5, &mut page).unwrap();
    assert!(page.iter().all(|&x| x == 0xbb), "page 5 holds {:#x}", page[0]);
    assert_eq!(report.stale, 1, "the late round-0 copy must be dropped as stale");
    assert_ne!(zero_page_hash(), page_hash(&page));
}

fn migrate_with_a_failing_link(reset_on_cut: bool) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Relay::start(addr, reset_on_cut);
    let src = guest(256, 5000);
    let opts =
        SourceOptions { verify: VerifyMode::Full, link_timeout: Duration::from_millis(500), ..Default::default() };
    let links = [LinkSpec::to(addr), LinkSpec::to(proxy.addr), LinkSpec::to(addr)];
    let (forwarded, cut) = (proxy.forwarded.clone(), proxy.cut.clone());
    let done = std::sync::atomic::AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        let dest = s.spawn(|| common::receive_one(&listener, &DestOptions::default()));
        // Cut the middle link once it has carried 1 MiB: its first few batches, early in a round 0 of about 150 MiB.
        // The watcher also stops when the migration does, so a run that never reaches the cut fails below, not hangs.
        let (done, cut_set) = (&done, cut.clone());
        s.spawn(move || {
            while forwarded.load(Ordering::SeqCst) < 1 << 20 && !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if !done.load(Ordering::SeqCst) {
                cut_set.store(true, Ordering::SeqCst);
            }
        });
        let r = migrate(&src, TcpStream::connect(addr).unwrap(), &links, &opts, &SourceSecurity::Insecure, &|_| {});
        done.store(true, Ordering::SeqCst);
        let moved = dest.join().unwrap();
        assert!(moved.is_ok(), "{:?}", moved.err());
        r
    });
    assert!(cut.load(Ordering::SeqCst), "the middle link was never cut: the migration ended first");
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert!(report.verified, "full verification after the resend");
    let failed: Vec<bool> = report.links.iter().map(|l| l.failed).collect();
    assert_eq!(failed, [false, true, false], "{:?}", report.links);
    assert!(report.links[1].error.is_some());
}

#[test]
fn a_link_that_stalls_mid_round_is_failed_and_its_batches_resent() {
    migrate_with_a_failing_link(false);
}

#[test]
fn a_link_that_resets_mid_round_is_failed_and_its_batches_resent() {
    migrate_with_a_failing_link(true);
}
