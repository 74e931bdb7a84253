//! Post-copy end to end on loopback: real sockets, real userfaultfd, guests that keep writing on both sides. A link
//! cut during the push, a digest mismatch found after the guest ran on the destination, and a source killed after
//! the switch.

mod common;

use common::frames::{self, frame, raw_page};
use common::Relay;
use livemig::engine::dirty::Bitmap;
use livemig::engine::encode::HashTable;
use livemig::engine::guest::uffd::Uffd;
use livemig::engine::guest::{MemoryLayout, SyntheticConfig, SyntheticGuest, Vcpus};
use livemig::engine::precopy::{PostcopyMode, PrecopyConfig};
use livemig::transport::dest::{DestOptions, DestReport, ReceiveError};
use livemig::transport::link::LinkSpec;
use livemig::transport::source::{migrate, Progress, SourceOptions, SourceReport};
use livemig::transport::tls::SourceSecurity;
use livemig::transport::wire::{self, postcopy, Kind, Verified, Verify};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn uffd_here() -> bool {
    match Uffd::new() {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED: userfaultfd unavailable here ({e})");
            false
        }
    }
}

/// A guest that writes faster than the capped links carry: its hot set is still largely on the source after the switch.
fn busy_guest() -> SyntheticGuest {
    let cfg = SyntheticConfig { memory_bytes: 256 << 20, dirty_rate: 40_000, hot_set_pct: 20.0, ..Default::default() };
    SyntheticGuest::new(&cfg).unwrap()
}

/// The destination's guest runs on after the migration: its vCPUs write memory.
fn assert_runs(g: &SyntheticGuest) {
    let before = g.vcpus().pages_written();
    std::thread::sleep(Duration::from_millis(200));
    assert!(g.vcpus().pages_written() > before && !g.vcpus().is_paused(), "the destination's guest does not run");
}

#[test]
fn postcopy_over_three_links_survives_a_link_cut_during_the_push() {
    if !uffd_here() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Relay::start(addr, true);
    let src = busy_guest();
    // Capped so that the push lasts long enough to be cut in the middle.
    let precopy = PrecopyConfig { postcopy: PostcopyMode::Always, max_bandwidth: Some(60 << 20), ..Default::default() };
    let opts = SourceOptions { precopy, link_timeout: Duration::from_millis(500), ..Default::default() };
    let links = [LinkSpec::to(addr), LinkSpec::to(proxy.addr), LinkSpec::to(addr)];
    let cut = proxy.cut.clone();
    let (report, dest) = std::thread::scope(|s| {
        let dest = s.spawn(|| common::receive_one(&listener, &DestOptions::default()));
        let r = migrate(&src, TcpStream::connect(addr).unwrap(), &links, &opts, &SourceSecurity::Insecure, &|p| {
            // Round 1 is the push: the destination runs the guest by now.
            if p.epoch == 1 && p.round_pages_done > 0 {
                cut.store(true, Ordering::SeqCst);
            }
        });
        (r, dest.join().unwrap())
    });
    assert!(cut.load(Ordering::SeqCst), "the link was never cut during the push");
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert!(report.verified);
    assert_eq!(report.links.iter().map(|l| l.failed).collect::<Vec<_>>(), [false, true, false]);
    let pc = report.postcopy.as_ref().expect("a post-copy section");
    assert!(pc.pages_pushed > 0, "{pc:?}");
    let d = pc.destination.as_ref().expect("the destination's figures");
    // Faults are the guest's own doing; every one that came was served (its latency recorded), none is left.
    assert_eq!(d.histogram.iter().sum::<u64>(), d.faults, "{d:?}");
    let (g, r) = dest.expect("the destination completed");
    assert!(r.postcopy.is_some());
    assert_runs(&g);
    assert!(src.vcpus().is_paused(), "the source must stay paused once the destination runs the guest");
}

type Received = Result<(SyntheticGuest, DestReport), ReceiveError>;

/// A post-copy migration whose control connection and two data links go through relays; `disrupt` is called with
/// the relays at every progress report, to take the network away during the push.
fn over_relays(disrupt: impl Fn(&[Relay; 3], &Progress) + Sync) -> (SourceReport, Received, [Relay; 3]) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let relays = [Relay::start(addr, false), Relay::start(addr, false), Relay::start(addr, false)];
    let src = busy_guest();
    let precopy = PrecopyConfig {
        postcopy: PostcopyMode::Always,
        max_bandwidth: Some(60 << 20),
        postcopy_wait: Duration::from_secs(30),
        ..Default::default()
    };
    let opts = SourceOptions { precopy, link_timeout: Duration::from_millis(500), ..Default::default() };
    let links = [LinkSpec::to(relays[1].addr), LinkSpec::to(relays[2].addr)];
    let dopts = DestOptions { postcopy_wait: Duration::from_secs(60), ..Default::default() };
    let (report, dest) = std::thread::scope(|s| {
        let dest = s.spawn(|| common::receive_one(&listener, &dopts));
        let control = TcpStream::connect(relays[0].addr).unwrap();
        let r = migrate(&src, control, &links, &opts, &SourceSecurity::Insecure, &|p| disrupt(&relays, p));
        (r, dest.join().unwrap())
    });
    (report, dest, relays)
}

#[test]
fn postcopy_waits_out_every_link_lost_and_resumes_when_they_return() {
    if !uffd_here() {
        return;
    }
    // Longer than every timeout that applies before the switch (10 s), so that only post-copy's wait can cover it.
    let outage = Duration::from_secs(12);
    let cut_at = std::sync::Mutex::new(None::<std::time::Instant>);
    // The relays stop forwarding, as a network that went away does: no reset, the connections stay open and silent.
    let (report, dest, _) = over_relays(|relays, p| {
        let mut at = cut_at.lock().unwrap();
        if p.epoch == 1 && p.round_pages_done > 0 && at.is_none() {
            *at = Some(std::time::Instant::now());
            relays.iter().for_each(|r| r.cut.store(true, Ordering::SeqCst));
            let cuts: Vec<_> = relays.iter().map(|r| r.cut.clone()).collect();
            std::thread::spawn(move || {
                std::thread::sleep(outage);
                cuts.iter().for_each(|c| c.store(false, Ordering::SeqCst));
            });
        }
    });
    let cut_at = cut_at.lock().unwrap().expect("the links were never cut during the push");
    assert!(cut_at.elapsed() >= outage, "the migration ended during the outage");
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert!(report.verified);
    // Silent links are suspended, not failed: when the network returns each goes on where it stopped.
    assert!(report.links.iter().all(|l| !l.failed), "{:?}", report.links);
    assert!(report.links.iter().all(|l| l.bytes_on_wire > 0));
    assert_eq!(report.postcopy.as_ref().map(|p| p.reconnects), Some(0), "no connection was made again");
    let (g, r) = dest.expect("the destination completed after the outage");
    assert!(r.postcopy.is_some());
    assert_runs(&g);
}

#[test]
fn postcopy_reconnects_every_connection_lost_during_the_push() {
    if !uffd_here() {
        return;
    }
    let closed = AtomicBool::new(false);
    // The relays end every connection at once, as a reset does, and refuse new ones for a second: unlike a silent
    // network, the connections are gone and must be made again, and meanwhile no link takes the push.
    let (report, dest, relays) = over_relays(|relays, p| {
        if p.epoch == 1 && p.round_pages_done > 0 && !closed.swap(true, Ordering::SeqCst) {
            relays.iter().for_each(|r| r.close_all(Duration::from_secs(1)));
        }
    });
    assert!(closed.load(Ordering::SeqCst), "the connections were never closed during the push");
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert!(report.verified);
    let pc = report.postcopy.as_ref().expect("a post-copy section");
    // Every connection was made again: the control connection and both links (one may need two tries: a dial that
    // lands just before the relay's listener closes is reset with it).
    assert!(pc.reconnects >= 3, "{pc:?}");
    assert!(relays.iter().all(|r| r.accepted.load(Ordering::SeqCst) >= 2));
    assert!(report.links.iter().all(|l| !l.failed), "{:?}", report.links);
    let (g, r) = dest.expect("the destination completed on the new connections");
    assert!(r.verified && r.committed_error.is_none(), "{:?}", r.committed_error);
    // One row per link, however many connections each took.
    assert_eq!(r.links.iter().map(|l| l.0).collect::<Vec<_>>(), [0, 1], "{:?}", r.links);
    assert_runs(&g);
}

/// Plays a source by hand (session 42, a `pages`-page guest) through post-copy's switch, with page 5 missing;
/// `before` runs once the vCPU state is delivered.
fn switch_by_hand(addr: std::net::SocketAddr, pages: u64, before: impl FnOnce()) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    let mut buf = Vec::new();
    c.write_all(&frame(Kind::Hello, &frames::hello(42, pages).encode())).unwrap();
    assert_eq!(wire::read_frame(&mut c, &mut buf).unwrap().kind, Kind::HelloAck);
    let layout = MemoryLayout { regions: vec![(0, pages * 4096)] };
    let state = SyntheticGuest::destination(&layout, 1).unwrap().vcpus().save_state().unwrap();
    c.write_all(&frame(Kind::VcpuState, &state)).unwrap();
    assert_eq!(wire::read_frame(&mut c, &mut buf).unwrap().kind, Kind::StateAck);
    before();
    let mut missing = Bitmap::new(pages);
    missing.set(5);
    for body in postcopy::encode_missing(&missing) {
        c.write_all(&frame(Kind::Missing, &body)).unwrap();
        assert_eq!(wire::read_frame(&mut c, &mut buf).unwrap().kind, Kind::MissingAck);
    }
    c.write_all(&frame(Kind::Switch, &[])).unwrap();
    assert_eq!(wire::read_frame(&mut c, &mut buf).unwrap().kind, Kind::Switched);
    c
}

/// The next control frame's kind, past the page requests the destination's guest makes (it runs, and may fault).
fn next_answer(c: &mut TcpStream, buf: &mut Vec<u8>) -> Kind {
    loop {
        let h = wire::read_frame(c, buf).unwrap();
        if h.kind != Kind::PageRequest {
            return h.kind;
        }
    }
}

/// Plays the rest of the source's part after the switch: page 5 on the urgent path, as an answer to a fault would
/// come, then Verify with a table root that is right or not, and Commit (or an Abort).
fn finish_by_hand(c: &mut TcpStream, pages: u64, root_right: bool) {
    let mut buf = Vec::new();
    let (e, data) = raw_page(5, 0x5a);
    c.write_all(&frames::pages(1, vec![e], data)).unwrap();
    let table = HashTable::new(pages);
    table.set(5, e.hash);
    let table_root = if root_right { table.root() } else { table.root() ^ 1 };
    c.write_all(&frame(Kind::Verify, &Verify { full: false, table_root, memory_root: 0 }.encode())).unwrap();
    assert_eq!(next_answer(c, &mut buf), Kind::PostcopyStats);
    let stats = postcopy::decode_stats(&buf).unwrap();
    assert_eq!(stats.placed, 1, "{stats:?}");
    assert_eq!(next_answer(c, &mut buf), Kind::Verified);
    assert_eq!(Verified::decode(&buf).unwrap().equal, root_right);
    if root_right {
        c.write_all(&frame(Kind::Commit, &[])).unwrap();
        assert_eq!(next_answer(c, &mut buf), Kind::Committed);
    } else {
        c.write_all(&frame(Kind::Abort, b"digest mismatch")).unwrap();
    }
}

/// Plays a source by hand through post-copy's Verify, with a table root that is right or not.
fn hand_played(root_right: bool) -> Result<(), ReceiveError> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|s| {
        let dest = s.spawn(|| common::receive_one(&listener, &DestOptions::default()));
        let mut c = switch_by_hand(addr, 64, || {});
        finish_by_hand(&mut c, 64, root_right);
        let (g, _) = dest.join().unwrap()?;
        assert!(!g.vcpus().is_paused(), "a verified post-copy guest runs on");
        Ok(())
    })
}

/// Presents a Resume for `session` on a new connection and returns the answer's kind and body.
fn resume_by_hand(addr: std::net::SocketAddr, session: u64) -> (TcpStream, Kind, Vec<u8>) {
    let mut c = TcpStream::connect(addr).unwrap();
    let hello = wire::LinkHello { session, link: 0, proof: None };
    c.write_all(&frame(Kind::Resume, &hello.encode())).unwrap();
    let mut buf = Vec::new();
    let kind = wire::read_frame(&mut c, &mut buf).unwrap().kind;
    (c, kind, buf)
}

#[test]
fn a_destination_takes_the_sources_new_control_connection_after_post_copy_lost_the_first() {
    if !uffd_here() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let pages = 64;
    let dopts = DestOptions { postcopy_wait: Duration::from_secs(30), ..Default::default() };
    std::thread::scope(|s| {
        let dest = s.spawn(|| common::receive_one(&listener, &dopts));
        let c = switch_by_hand(addr, pages, || {
            // Before the switch there is no post-copy to resume: refused, and the migration goes on.
            let (_, kind, buf) = resume_by_hand(addr, 42);
            assert_eq!(kind, Kind::Abort);
            assert!(wire::decode_reason(&buf).contains("no post-copy"), "{}", wire::decode_reason(&buf));
        });
        // The control connection is lost: the destination's guest runs on, waiting for page 5.
        c.shutdown(std::net::Shutdown::Both).unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(300));
        // Another session's Resume is refused, and changes nothing.
        let (_, kind, buf) = resume_by_hand(addr, 43);
        assert_eq!(kind, Kind::Abort);
        assert!(wire::decode_reason(&buf).contains("session"), "{}", wire::decode_reason(&buf));
        // The source's own goes on where the first connection stopped.
        let (mut c, kind, buf) = resume_by_hand(addr, 42);
        assert_eq!(kind, Kind::Resumed, "{}", wire::decode_reason(&buf));
        assert_eq!(postcopy::decode_resumed(&buf, pages).unwrap(), 1, "page 5 is still missing");
        finish_by_hand(&mut c, pages, true);
        let (g, r) = dest.join().unwrap().expect("the destination completes on the new connection");
        assert!(r.verified && r.committed_error.is_none(), "{:?}", r.committed_error);
        assert_eq!(r.postcopy.map(|p| p.1), Some(1), "page 5 came on the urgent path");
        assert!(!g.vcpus().is_paused(), "a verified post-copy guest runs on");
    });
}

#[test]
fn a_mismatch_found_after_the_switch_is_reported_and_the_guest_stopped() {
    if !uffd_here() {
        return;
    }
    assert!(hand_played(true).is_ok());
    let e = hand_played(false).expect_err("a mismatch must not pass");
    assert!(matches!(e, ReceiveError::PostcopyMismatch { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("differs from the source's") && text.contains("stopped"), "{text}");
}

#[test]
fn a_source_killed_after_the_switch_leaves_a_destination_that_says_the_guest_cannot_complete() {
    if !uffd_here() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // The destination waits this long for the source to reconnect its control connection.
    let opts = DestOptions {
        idle_timeout: Duration::from_secs(5),
        postcopy_wait: Duration::from_secs(3),
        ..Default::default()
    };
    std::thread::scope(|s| {
        let dest = s.spawn(|| common::receive_one(&listener, &opts));
        let mut send = Command::new(env!("CARGO_BIN_EXE_livemig"))
            .args(["send", "--to", &addr.to_string(), "--insecure", "-v", "--memory", "256MiB"])
            .args(["--dirty-rate", "40000", "--hot-set", "20", "--postcopy", "always", "--max-bandwidth", "200mbit"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(send.stderr.take().unwrap()).lines();
        let mut switched = false;
        for l in lines.map_while(Result::ok) {
            if l.contains("pushing the rest") {
                switched = true;
                break;
            }
        }
        send.kill().unwrap();
        send.wait().unwrap();
        assert!(switched, "the source never switched to post-copy");
        let e = dest.join().unwrap().expect_err("a destination missing pages must not report success");
        let ReceiveError::PostcopyIncomplete { missing, reason } = &e else { panic!("{e:?}") };
        assert!(*missing > 0);
        assert!(reason.contains("did not reconnect within 3s"), "{reason}");
        let text = e.to_string();
        assert!(text.contains("cannot continue") && text.contains("source holds the only complete copy"), "{text}");
    });
}

#[test]
fn a_destination_without_userfaultfd_is_refused_before_anything_moves() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut description = DestOptions::default().describe();
    description.postcopy_unavailable = Some("userfaultfd: Operation not permitted".into());
    let dopts = DestOptions { description: Some(description), ..Default::default() };
    let src = busy_guest();
    let precopy = PrecopyConfig { postcopy: PostcopyMode::Auto, ..Default::default() };
    let opts = SourceOptions { precopy, ..Default::default() };
    let (report, dest) = std::thread::scope(|s| {
        let dest = s.spawn(|| common::receive_one(&listener, &dopts));
        let r = migrate(&src, TcpStream::connect(addr).unwrap(), &[], &opts, &SourceSecurity::Insecure, &|_| {});
        (r, dest.join().unwrap())
    });
    let e = report.result.expect_err("a post-copy source must refuse such a destination");
    assert!(e.to_string().contains("cannot take post-copy (userfaultfd: Operation not permitted)"), "{e}");
    assert_eq!(report.rounds.len(), 0, "nothing was sent");
    assert!(dest.is_err_and(|e| e.is_refusal()), "the destination was told, and may wait for another source");
    common::assert_running_unthrottled(&src);
}
