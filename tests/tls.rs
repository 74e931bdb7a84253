//! Mutual TLS end to end, with the library's drivers on loopback: every refusal the trust model promises, each with a
//! clear reason, the source guest running and the destination unchanged (still waiting where the attempt was
//! refused at its handshake); a data link that cannot prove it belongs to the migration; records altered, replayed
//! or cut on the wire; a capture of an encrypted migration that holds none of the guest's text; and post-copy's
//! reconnect, which a Resume without the first control session's proof cannot take over.

mod common;

use common::assert_running_unthrottled;
use livemig::engine::guest::{SyntheticConfig, SyntheticGuest, TEXT_WORDS};
use livemig::engine::precopy::{OnTimeout, PrecopyConfig};
use livemig::transport::dest::{accept_migration, receive, DestOptions, DestReport, ReceiveError};
use livemig::transport::link::LinkSpec;
use livemig::transport::source::{migrate, MigrateError, SourceOptions, SourceReport, VerifyMode};
use livemig::transport::stream::Peer;
use livemig::transport::tls::rustls::pki_types::pem::PemObject;
use livemig::transport::tls::{
    self, date_time_ymd, link_proof, Credentials, DestSecurity, SecurityPair, ServerName, SourceSecurity,
};
use livemig::transport::wire::{self, Hello, Kind};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-tlstest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn guest(mib: u64, dirty_rate: u64) -> SyntheticGuest {
    SyntheticGuest::new(&SyntheticConfig { memory_bytes: mib << 20, dirty_rate, ..Default::default() }).unwrap()
}

fn client(c: &Credentials) -> SourceSecurity {
    SourceSecurity::Mtls { config: c.client_config().unwrap(), server_name: ServerName::try_from("dst").unwrap() }
}

type Refusals = Arc<Mutex<Vec<String>>>;

/// A destination that waits for migrations until one completes, noting every refusal.
fn destination(
    listener: TcpListener,
    security: DestSecurity,
) -> (std::thread::JoinHandle<Result<DestReport, ReceiveError>>, Refusals) {
    let refusals: Refusals = Arc::default();
    let r = refusals.clone();
    let handle = std::thread::spawn(move || {
        let note = |_peer: &Peer, e: &ReceiveError| r.lock().unwrap().push(e.to_string());
        let opts = DestOptions::default();
        loop {
            let (control, hello) = accept_migration(&listener, &opts, &security, &note).unwrap();
            let make = |h: &Hello| SyntheticGuest::destination(&h.layout, h.vcpus);
            match receive(&[&listener], &control, hello, make, &opts, &security, &note) {
                Ok((_, report)) => return Ok(report),
                Err(e) if e.is_refusal() => note(&control.stream().peer().unwrap(), &e),
                Err(e) => return Err(e),
            }
        }
    });
    (handle, refusals)
}

fn migrate_to(g: &SyntheticGuest, addr: SocketAddr, links: &[LinkSpec], sec: &SourceSecurity) -> SourceReport {
    let opts = SourceOptions { verify: VerifyMode::Full, ..Default::default() };
    migrate(g, TcpStream::connect(addr).unwrap(), links, &opts, sec, &|_| {})
}

#[test]
fn sources_refused_at_the_handshake_keep_their_guests_and_the_destination_waits_for_the_real_one() {
    let (d, other, old) = (tmp("ok"), tmp("other"), tmp("old"));
    tls::init(&d, &["src", "dst"]).unwrap();
    tls::init(&other, &["src"]).unwrap();
    tls::init_with_validity(&old, &["src"], date_time_ymd(2020, 1, 1), date_time_ymd(2021, 1, 1)).unwrap();
    let load = |dir: &Path, host: &str| Credentials::load(&dir.join(host), Some(&d.join("ca.pem"))).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (dest, refusals) = destination(listener, DestSecurity::Mtls(load(&d, "dst").server_config().unwrap()));
    let bare = {
        let mut roots = tls::rustls::RootCertStore::empty();
        for c in tls::rustls::pki_types::CertificateDer::pem_file_iter(d.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(tls::rustls::crypto::ring::default_provider());
        let config = tls::rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&tls::rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        SourceSecurity::Mtls { config: Arc::new(config), server_name: ServerName::try_from("dst").unwrap() }
    };
    // (what the source presents, what the destination must say about it)
    let attempts = [
        ("a certificate another CA signed", client(&load(&other, "src")), "UnknownIssuer"),
        ("no certificate", bare, "presented no certificate"),
        ("an expired certificate", client(&load(&old, "src")), "Expired"),
        ("plaintext", SourceSecurity::Insecure, "spoke plaintext"),
    ];
    for (what, sec, why) in &attempts {
        let g = guest(16, 500);
        let r = migrate_to(&g, addr, &[], sec);
        let err = r.result.unwrap_err();
        match what {
            &"plaintext" => assert!(err.to_string().contains("requires mutual TLS"), "{what}: {err}"),
            _ => assert!(matches!(err, MigrateError::Tls(_)), "{what}: {err}"),
        }
        assert_running_unthrottled(&g);
        let seen = refusals.lock().unwrap().last().cloned().unwrap_or_default();
        assert!(seen.contains(why), "{what}: the destination said {seen:?}");
    }
    assert!(!dest.is_finished(), "the destination stopped waiting after a refusal");
    // The real source, after all that.
    let g = guest(32, 2000);
    let r = migrate_to(&g, addr, &[], &client(&load(&d, "src")));
    r.result.unwrap();
    assert!(r.verified);
    assert_eq!((r.security.mode, r.security.peer.as_deref()), ("mtls", Some("CN=dst")));
    let report = dest.join().unwrap().unwrap();
    assert_eq!(report.security.peer.as_deref(), Some("CN=src"));
    assert_eq!(refusals.lock().unwrap().len(), attempts.len());
    for x in [d, other, old] {
        std::fs::remove_dir_all(x).unwrap();
    }
}

#[test]
fn a_tls_source_against_a_plaintext_destination_is_told_so_and_keeps_its_guest() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (dest, refusals) = destination(listener, DestSecurity::Insecure);
    let g = guest(16, 500);
    let err = migrate_to(&g, addr, &[], &SecurityPair::throwaway().unwrap().source).result.unwrap_err();
    assert!(err.to_string().contains("answered in plaintext"), "{err}");
    assert_running_unthrottled(&g);
    // The plaintext destination refused the TLS bytes as a stranger and went on waiting.
    let g = guest(16, 500);
    migrate_to(&g, addr, &[], &SourceSecurity::Insecure).result.unwrap();
    dest.join().unwrap().unwrap();
    assert!(refusals.lock().unwrap().iter().any(|r| r.contains("magic")), "{:?}", refusals.lock().unwrap());
}

/// A host with a valid certificate that knows a session's number but not its control session's secret: it presents
/// a `kind` (LinkHello or Resume) with a proof made from another secret, and returns the reason it is refused.
fn stranger(addr: SocketAddr, security: &SourceSecurity, session: u64, kind: Kind) -> String {
    let conn = tls::connect(TcpStream::connect(addr).unwrap(), security, Duration::from_secs(5)).unwrap();
    let proof = link_proof(&[0x42; 32], conn.binding().unwrap());
    let hello = wire::LinkHello { session, link: 0, proof: Some(proof) };
    wire::write_control(&conn, kind, &hello.encode()).unwrap();
    let mut body = Vec::new();
    let h = wire::read_frame(&mut &conn, &mut body).unwrap();
    assert_eq!(h.kind, Kind::Abort);
    wire::decode_reason(&body)
}

#[test]
fn a_data_link_of_another_session_is_refused_though_its_certificate_is_valid() {
    let d = tmp("session");
    tls::init(&d, &["src", "dst"]).unwrap();
    let pair = SecurityPair::from_dir(&d, "src", "dst").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (dest, refusals) = destination(listener, pair.dest.clone());
    // Large enough that round 0 lasts past the first progress report (50 ms).
    let g = guest(512, 5000);
    let session = 0x5e55_1011;
    // Rounds that cannot meet a 1 ms target, for a second, then a forced switchover: long enough to be joined.
    let precopy = PrecopyConfig {
        downtime_target: Duration::from_millis(1),
        max_time: Some(Duration::from_secs(1)),
        on_timeout: OnTimeout::Force,
        throttle: false,
        ..Default::default()
    };
    let opts = SourceOptions { session, precopy, verify: VerifyMode::Full, ..Default::default() };
    // Mid-migration (at the first progress report), a host with a valid certificate, which knows the session's
    // number but not its control session's secret, presents a data link.
    let answer: Mutex<Option<String>> = Mutex::new(None);
    let stranger = || stranger(addr, &pair.source, session, Kind::LinkHello);
    let r = migrate(&g, TcpStream::connect(addr).unwrap(), &[], &opts, &pair.source, &|_| {
        let mut a = answer.lock().unwrap();
        if a.is_none() {
            *a = Some(stranger());
        }
    });
    r.result.unwrap();
    assert!(r.verified);
    let why = answer.lock().unwrap().clone().expect("no progress report came");
    assert!(why.contains("proof does not match this migration's control session"), "{why}");
    dest.join().unwrap().unwrap();
    assert!(refusals.lock().unwrap().iter().any(|r| r.contains("proof does not match")));
    std::fs::remove_dir_all(&d).unwrap();
}

/// What a proxy does to the source's bytes on a data link once they are livemig's records (after the TLS handshake).
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Flip one bit inside this record's ciphertext.
    Flip(usize),
    /// Send this record twice.
    Replay(usize),
    /// Send half of this record, then close.
    Cut(usize),
}

/// Forwards one connection to `to`, applying `fault` to the client's records; the other direction is untouched.
fn record_proxy(to: SocketAddr, fault: Fault) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((mut client, _)) = l.accept() else { return };
        let Ok(mut server) = TcpStream::connect(to) else { return };
        let (mut back_from, mut back_to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(Shutdown::Both);
        });
        let mut ours = 0usize;
        loop {
            let mut head = [0u8; 5];
            if client.read_exact(&mut head[..4]).is_err() {
                break;
            }
            // TLS records (type 20–23, version 3.1 to 3.3) until the handshake ends; then livemig's [len][ct][tag].
            let tls = (20..=23).contains(&head[0]) && head[1] == 3 && (1..=3).contains(&head[2]);
            let mut rec = if tls {
                client.read_exact(&mut head[4..]).unwrap();
                let n = usize::from(u16::from_be_bytes([head[3], head[4]]));
                let mut r = head.to_vec();
                r.resize(5 + n, 0);
                client.read_exact(&mut r[5..]).unwrap();
                r
            } else {
                let n = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
                let mut r = head[..4].to_vec();
                r.resize(4 + n + 16, 0);
                if client.read_exact(&mut r[4..]).is_err() {
                    break;
                }
                r
            };
            let mut times = 1;
            if !tls {
                match fault {
                    Fault::Flip(k) if k == ours => {
                        let at = 4 + rec.len() / 3;
                        rec[at] ^= 0x08;
                    }
                    Fault::Replay(k) if k == ours => times = 2,
                    Fault::Cut(k) if k == ours => {
                        let _ = server.write_all(&rec[..rec.len() / 2]);
                        let _ = server.shutdown(Shutdown::Both);
                        return;
                    }
                    _ => {}
                }
                ours += 1;
            }
            for _ in 0..times {
                if server.write_all(&rec).is_err() {
                    return;
                }
            }
        }
        let _ = server.shutdown(Shutdown::Write);
    });
    addr
}

#[test]
fn an_altered_replayed_or_cut_record_ends_its_link_and_the_others_finish_the_migration() {
    for fault in [Fault::Flip(3), Fault::Replay(2), Fault::Cut(3)] {
        let pair = SecurityPair::throwaway().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (dest, _) = destination(listener, pair.dest.clone());
        // Two data links: the second goes through the proxy.
        let links = [LinkSpec::to(addr), LinkSpec::to(record_proxy(addr, fault))];
        let g = guest(64, 5000);
        let r = migrate_to(&g, addr, &links, &pair.source);
        r.result.as_ref().unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert!(r.verified, "{fault:?}");
        assert!(r.links[1].failed && !r.links[0].failed, "{fault:?}: {:?}", r.links);
        let report = dest.join().unwrap().unwrap();
        let errors: Vec<&String> = report.link_errors.iter().map(|(_, e)| e).collect();
        match fault {
            // The destination names what was wrong, and told the source in its Abort.
            Fault::Flip(_) | Fault::Replay(_) => {
                // A flipped record fails where it stands; a replayed one where its copy arrives, one later.
                let at = match fault {
                    Fault::Replay(k) => k + 1,
                    Fault::Flip(k) | Fault::Cut(k) => k,
                };
                let want = format!("record {at} failed authentication");
                assert!(errors.iter().any(|e| e.contains(&want)), "{fault:?}: {errors:?}");
                // The source hears it too, in the destination's Abort.
                let source_saw = r.links[1].error.as_deref().unwrap_or_default();
                assert!(source_saw.contains(&want), "{fault:?}: the source heard {source_saw:?}");
            }
            // A cut link is a lost link, as a pulled cable is: its batches went again on the other.
            Fault::Cut(_) => assert!(errors.is_empty(), "{errors:?}"),
        }
    }
}

/// Three or more text words in a row, separated by spaces: what the synthetic guest's text pages are made of, and
/// what random bytes all but never hold.
fn text_runs(bytes: &[u8]) -> usize {
    let words: Vec<&[u8]> = TEXT_WORDS.iter().filter(|w| w.len() >= 3).map(|w| w.as_bytes()).collect();
    let word_at = |i: usize| words.iter().find(|w| bytes[i..].starts_with(w) && bytes.get(i + w.len()) == Some(&b' '));
    let mut runs = 0;
    let mut i = 0;
    while i < bytes.len() {
        let (mut j, mut n) = (i, 0);
        while let Some(w) = word_at(j) {
            j += w.len() + 1;
            n += 1;
        }
        if n >= 3 {
            runs += 1;
            i = j;
        } else {
            i += 1;
        }
    }
    runs
}

/// Forwards one connection to `to` both ways, keeping a copy of every byte.
fn capture_proxy(to: SocketAddr, wire: Arc<Mutex<Vec<u8>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((client, _)) = l.accept() else { return };
        let server = TcpStream::connect(to).unwrap();
        let pumps =
            [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)].map(|(mut a, mut b)| {
                let wire = wire.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = a.read(&mut buf) {
                        if n == 0 || b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        wire.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = b.shutdown(Shutdown::Write);
                })
            });
        for p in pumps {
            let _ = p.join();
        }
    });
    addr
}

#[test]
fn the_wire_of_an_encrypted_migration_holds_none_of_the_guest_s_text() {
    let mut runs = Vec::new();
    for pair in [SecurityPair::throwaway().unwrap(), SecurityPair::insecure()] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (dest, _) = destination(listener, pair.dest.clone());
        let wire = Arc::new(Mutex::new(Vec::new()));
        let (control, data) = (capture_proxy(addr, wire.clone()), capture_proxy(addr, wire.clone()));
        let g = guest(32, 0);
        // Uncompressed, so that plaintext text pages cross as they are.
        let opts = SourceOptions { compress: false, ..Default::default() };
        let r = migrate(&g, TcpStream::connect(control).unwrap(), &[LinkSpec::to(data)], &opts, &pair.source, &|_| {});
        r.result.unwrap();
        dest.join().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let wire = wire.lock().unwrap();
        assert!(wire.len() > 16 << 20, "{} bytes captured", wire.len());
        runs.push(text_runs(&wire));
    }
    let (encrypted, plain) = (runs[0], runs[1]);
    println!("runs of text words on the wire: encrypted {encrypted}, plaintext {plain}");
    assert!(plain > 10_000, "the plaintext capture should be full of text ({plain} runs)");
    assert_eq!(encrypted, 0, "text on the wire of an encrypted migration");
}

#[test]
fn an_altered_record_on_the_only_link_fails_the_migration_with_the_source_guest_running() {
    let pair = SecurityPair::throwaway().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (dest, _) = destination(listener, pair.dest.clone());
    let g = guest(64, 5000);
    let r = migrate_to(&g, addr, &[LinkSpec::to(record_proxy(addr, Fault::Flip(2)))], &pair.source);
    let err = r.result.unwrap_err().to_string();
    assert!(err.contains("every data link failed") && err.contains("record 2 failed authentication"), "{err}");
    assert_running_unthrottled(&g);
    // The destination ran no guest: it gave up when the source called the migration off.
    let e = dest.join().unwrap().unwrap_err();
    assert!(!e.is_refusal(), "{e}");
}

#[test]
fn post_copy_reconnects_under_tls_and_refuses_a_resume_without_the_sessions_proof() {
    if let Err(e) = livemig::engine::guest::uffd::Uffd::new() {
        println!("SKIPPED: userfaultfd unavailable here ({e})");
        return;
    }
    let d = tmp("resume");
    tls::init(&d, &["src", "dst"]).unwrap();
    let pair = SecurityPair::from_dir(&d, "src", "dst").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // The control connection and the data link go through relays that end them at once, as a reset does.
    let relays = [common::Relay::start(addr, false), common::Relay::start(addr, false)];
    let (dest, refusals) = destination(listener, pair.dest.clone());
    let cfg = SyntheticConfig { memory_bytes: 256 << 20, dirty_rate: 40_000, hot_set_pct: 20.0, ..Default::default() };
    let g = SyntheticGuest::new(&cfg).unwrap();
    let session = 0x5e55_2022;
    let precopy = PrecopyConfig {
        postcopy: livemig::engine::precopy::PostcopyMode::Always,
        max_bandwidth: Some(60 << 20),
        postcopy_wait: Duration::from_secs(30),
        ..Default::default()
    };
    let opts = SourceOptions { session, precopy, link_timeout: Duration::from_millis(500), ..Default::default() };
    // During the push, a host with a valid certificate that knows the session's number, but not the first control
    // session's secret, presents a Resume to take the control connection over.
    let stranger = || stranger(addr, &pair.source, session, Kind::Resume);
    let answer: Mutex<Option<String>> = Mutex::new(None);
    let links = [LinkSpec::to(relays[1].addr)];
    let control = TcpStream::connect(relays[0].addr).unwrap();
    let r = migrate(&g, control, &links, &opts, &pair.source, &|p| {
        let mut a = answer.lock().unwrap();
        if p.epoch == 1 && p.round_pages_done > 0 && a.is_none() {
            *a = Some(stranger());
            relays.iter().for_each(|r| r.close_all(Duration::from_millis(500)));
        }
    });
    r.result.unwrap();
    assert!(r.verified);
    let pc = r.postcopy.as_ref().expect("a post-copy section");
    assert!(pc.reconnects >= 2, "{pc:?}");
    let why = answer.lock().unwrap().clone().expect("the push was never reached");
    assert!(why.contains("proof does not match this migration's control session"), "{why}");
    let report = dest.join().unwrap().unwrap();
    assert!(report.verified && report.security.mode == "mtls", "{:?}", report.security);
    assert!(refusals.lock().unwrap().iter().any(|r| r.contains("proof does not match")));
    std::fs::remove_dir_all(&d).unwrap();
}
