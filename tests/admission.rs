//! A flood of connections that never present themselves costs the destination a bounded number of threads, and a
//! source from another address still gets in at once. Alone in its own test binary, so that the thread count it
//! reads is the destination's and this test's own.

mod common;

use common::frames;
use livemig::transport::dest::{accept_migration, DestOptions, MAX_PENDING_PER_PEER};
use livemig::transport::tls::DestSecurity;
use livemig::transport::wire::{self, Kind};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

fn connect_from(ip: &str, to: SocketAddr) -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&format!("{ip}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    s.connect(&to.into()).unwrap();
    s
}

#[test]
fn a_flood_of_silent_connections_takes_bounded_threads_and_does_not_shut_out_the_source() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let before = common::thread_count();
    let refusals = std::sync::Mutex::new(0usize);
    std::thread::scope(|s| {
        let accepting = s.spawn(|| {
            let opts = DestOptions::default();
            accept_migration(&listener, &opts, &DestSecurity::Insecure, &|_, _| *refusals.lock().unwrap() += 1)
                .map(|(_, h)| h.session)
        });
        let flood: Vec<_> = (0..300).map(|_| connect_from("127.0.0.2", addr)).collect();
        std::thread::sleep(Duration::from_millis(500));
        let during = common::thread_count();
        println!("threads: {before} before the flood, {during} during it");
        assert!(
            during <= before + MAX_PENDING_PER_PEER + 4,
            "300 silent connections from one address took {} threads",
            during - before
        );
        let t = Instant::now();
        let mut source = std::net::TcpStream::connect(addr).unwrap();
        source.write_all(&frames::frame(Kind::Hello, &frames::hello(77, 16).encode())).unwrap();
        let got = accepting.join().unwrap().unwrap();
        assert_eq!(got, 77);
        assert!(t.elapsed() < Duration::from_secs(1), "the source waited {:?} behind the flood", t.elapsed());
        // Every connection past the per-address cap was refused with a reason, at once.
        let mut refused_with_reason = 0;
        for c in &flood[..] {
            let _ = c.set_read_timeout(Some(Duration::from_millis(1)));
            let mut stream: std::net::TcpStream = c.try_clone().unwrap().into();
            let mut body = Vec::new();
            if let Ok(h) = wire::read_frame(&mut stream, &mut body) {
                if h.kind == Kind::Abort && wire::decode_reason(&body).contains("too many connections") {
                    refused_with_reason += 1;
                }
            }
        }
        assert!(refused_with_reason >= 300 - MAX_PENDING_PER_PEER, "{refused_with_reason} refusals with a reason");
        drop(flood);
    });
    assert!(*refusals.lock().unwrap() >= 300 - MAX_PENDING_PER_PEER);
}
