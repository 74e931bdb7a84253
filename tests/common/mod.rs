//! Test helpers shared by the integration tests (each test crate uses part of them).
#![allow(dead_code)]

use livemig::engine::guest::{SyntheticGuest, Vcpus};
use livemig::transport::tls::DestSecurity;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Forwards TCP connections to `to`, and when `cut` is set either stops forwarding (the link stalls, as a NIC that
/// went down) or resets both sides (the link errors, and the relay takes no connection after its first: the link is
/// gone for good). [`Relay::close_all`] ends every connection it forwards at once and refuses new ones for a while (a
/// reset network that is down for that long); a relay that does not reset on `cut` takes new ones after that.
pub struct Relay {
    /// Where the source connects.
    pub addr: SocketAddr,
    /// Bytes forwarded, both ways.
    pub forwarded: Arc<AtomicU64>,
    /// Set to stall or reset the link.
    pub cut: Arc<AtomicBool>,
    /// Both sockets of every connection forwarded so far.
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    /// Until when new connections are refused (the listener is closed, then bound again to the same address).
    down_until: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Relay {
    /// Starts a relay to `to`; `reset_on_cut` chooses what `cut` does.
    pub fn start(to: SocketAddr, reset_on_cut: bool) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (forwarded, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (open, accepted) = (Arc::new(std::sync::Mutex::new(Vec::new())), Arc::new(AtomicU64::new(0)));
        let down_until = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let (f, c, o, a, d) = (forwarded.clone(), cut.clone(), open.clone(), accepted.clone(), down_until.clone());
        std::thread::spawn(move || {
            let mut listener = Some(l);
            loop {
                let down = d.lock().unwrap().is_some_and(|t| std::time::Instant::now() < t);
                if down {
                    listener = None;
                } else if listener.is_none() {
                    listener = Some(TcpListener::bind(addr).unwrap());
                }
                let Some(l) = &listener else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                l.set_nonblocking(true).unwrap();
                let client = match l.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => return,
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(to) else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let mut list = o.lock().unwrap();
                list.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let (f, c) = (f.clone(), c.clone());
                    std::thread::spawn(move || pump(from, to, &f, &c, reset_on_cut));
                }
                if reset_on_cut {
                    return;
                }
            }
        });
        Relay { addr, forwarded, cut, open, accepted, down_until }
    }

    /// Ends every connection forwarded so far, both ways: each end sees its connection close under it (writes fail,
    /// reads end), as after a reset; and refuses new ones for `outage`.
    pub fn close_all(&self, outage: Duration) {
        *self.down_until.lock().unwrap() = Some(std::time::Instant::now() + outage);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
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

/// A test destination: accepts one migration on `listener` and receives it into a synthetic guest.
pub fn receive_one(
    listener: &TcpListener,
    dopts: &livemig::transport::dest::DestOptions,
) -> Result<(SyntheticGuest, livemig::transport::dest::DestReport), livemig::transport::dest::ReceiveError> {
    use livemig::transport::dest::{accept_migration, receive, ReceiveError};
    let (stream, hello) = accept_migration(listener, dopts, &DestSecurity::Insecure, &|_, _| {})
        .map_err(|e| ReceiveError::Wire(e.into()))?;
    let make = |h: &livemig::transport::wire::Hello| SyntheticGuest::destination(&h.layout, h.vcpus);
    receive(&[listener], &stream, hello, make, dopts, &DestSecurity::Insecure, &|_, _| {})
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

/// Frames spoken by hand, for tests that play a source (or a stranger) byte by byte.
pub mod frames {
    use livemig::engine::dirty::Bitmap;
    use livemig::engine::encode::{page_hash, Codec, EncodedBatch, PageEntry};
    use livemig::engine::guest::MemoryLayout;
    use livemig::transport::wire::{self, Hello, Kind};

    /// A Hello for a synthetic guest of `pages` pages and one vCPU.
    pub fn hello(session: u64, pages: u64) -> Hello {
        Hello {
            session,
            layout: MemoryLayout { regions: vec![(0, pages * 4096)] },
            vcpus: 1,
            guest_kind: "synthetic".into(),
            chunks: Bitmap::full(pages.div_ceil(wire::CHUNK_PAGES)),
            cpu: None,
            macs: Vec::new(),
        }
    }

    /// One whole frame.
    pub fn frame(kind: Kind, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_frame(&mut out, kind, 0, 0, &[body]).unwrap();
        out
    }

    /// A Pages frame of round `epoch`.
    pub fn pages(epoch: u32, entries: Vec<PageEntry>, payload: Vec<u8>) -> Vec<u8> {
        let batch = EncodedBatch { entries, payload, ..Default::default() };
        let mut table = Vec::new();
        wire::encode_entries(&batch, &mut table);
        let mut out = Vec::new();
        wire::write_pages(&mut out, epoch, 0, &table, &[&batch.payload]).unwrap();
        out
    }

    /// A raw page of `fill` bytes and its entry.
    pub fn raw_page(page: u64, fill: u8) -> (PageEntry, Vec<u8>) {
        let data = vec![fill; 4096];
        (PageEntry::new(page, Codec::Raw, 4096, page_hash(&data)), data)
    }
}

/// The threads this process runs now.
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Threads:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Forwards one connection to `to` and passes each frame from the client through `edit` (whole frames: header and
/// body), so that a test can corrupt chosen bytes on the wire. The other direction is forwarded untouched.
pub fn frame_proxy(to: SocketAddr, edit: impl FnMut(&mut Vec<u8>) + Send + 'static) -> SocketAddr {
    use livemig::transport::wire::HEADER_LEN;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut edit = edit;
        let Ok((mut client, _)) = l.accept() else { return };
        let Ok(mut server) = TcpStream::connect(to) else { return };
        let (mut back_from, mut back_to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(Shutdown::Write);
        });
        loop {
            let mut f = vec![0u8; HEADER_LEN];
            if client.read_exact(&mut f).is_err() {
                break;
            }
            let len = u32::from_le_bytes(f[16..20].try_into().unwrap()) as usize;
            f.resize(HEADER_LEN + len.min(64 << 20), 0);
            if client.read_exact(&mut f[HEADER_LEN..]).is_err() {
                break;
            }
            edit(&mut f);
            if server.write_all(&f).is_err() {
                break;
            }
        }
        let _ = server.shutdown(Shutdown::Write);
    });
    addr
}
