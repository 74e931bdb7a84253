//! Test helpers shared by the integration tests (each test crate uses part of them).
#![allow(dead_code)]

use livemig::engine::guest::{SyntheticGuest, Vcpus};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Forwards one TCP connection to `to`, and when `cut` is set either stops forwarding (the link stalls, as a NIC
/// that went down) or resets both sides (the link errors).
pub struct Relay {
    /// Where the source connects.
    pub addr: SocketAddr,
    /// Bytes forwarded, both ways.
    pub forwarded: Arc<AtomicU64>,
    /// Set to stall or reset the link.
    pub cut: Arc<AtomicBool>,
}

impl Relay {
    /// Starts a relay to `to`; `reset_on_cut` chooses what `cut` does.
    pub fn start(to: SocketAddr, reset_on_cut: bool) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (forwarded, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (f, c) = (forwarded.clone(), cut.clone());
        std::thread::spawn(move || {
            let Ok((client, _)) = l.accept() else { return };
            let server = TcpStream::connect(to).unwrap();
            for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                let (f, c) = (f.clone(), c.clone());
                std::thread::spawn(move || pump(from, to, &f, &c, reset_on_cut));
            }
        });
        Relay { addr, forwarded, cut }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, forwarded: &AtomicU64, cut: &AtomicBool, reset_on_cut: bool) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if cut.load(Ordering::SeqCst) {
            if reset_on_cut {
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            // Stalled: hold both sockets open and move nothing.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
                forwarded.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
}

/// After a failed or cancelled migration the source guest must be running, unthrottled, and writing memory.
pub fn assert_running_unthrottled(g: &SyntheticGuest) {
    let v = g.vcpus();
    assert!(!v.is_paused(), "source vCPUs are paused");
    assert_eq!(v.throttle(), 0.0, "source vCPUs are still throttled");
    let before = v.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    assert!(v.pages_written() > before, "source vCPUs are not running");
}
