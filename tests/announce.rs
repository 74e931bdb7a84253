//! Network identity after switchover: RARP announcements leave one namespace on a veth and are captured by a packet
//! socket at the far end, in another namespace. Needs root; prints a visible skip where namespaces cannot be made.

use livemig::transport::announce::{announce, parse_mac, Schedule, ETH_P_RARP};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().is_ok_and(|s| s.success())
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns on an open namespace file; it changes only this thread's network namespace.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {ns}");
}

/// Captures frames of any protocol on `iface` (in the current thread's namespace) until `want` RARP frames arrived or
/// `limit` passed.
fn capture(iface: &str, want: usize, limit: Duration) -> Vec<Vec<u8>> {
    let name = std::ffi::CString::new(iface).unwrap();
    // SAFETY: reads a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no {iface}");
    // SAFETY: socket(2); owned below.
    let raw = unsafe {
        libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((u16::try_from(libc::ETH_P_ALL).unwrap()).to_be()))
    };
    assert!(raw >= 0, "packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: zeroed sockaddr_ll is valid to fill in.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_protocol = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: binds to a sockaddr_ll of the right size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
        )
    };
    assert_eq!(rc, 0);
    let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    // SAFETY: sets a receive timeout from a timeval that lives across the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap(),
        )
    };
    let (mut frames, t) = (Vec::new(), Instant::now());
    let mut buf = [0u8; 2048];
    while frames.len() < want && t.elapsed() < limit {
        // SAFETY: receives into `buf`, which outlives the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 14 && buf[12..14] == ETH_P_RARP.to_be_bytes() {
            frames.push(buf[..n as usize].to_vec());
        }
    }
    frames
}

#[test]
fn rarp_announcements_reach_the_far_end_of_the_link() {
    let (a, b) = (format!("lma{}", std::process::id()), format!("lmb{}", std::process::id()));
    if !ip(&["netns", "add", &a]) {
        let _ = writeln!(std::io::stderr(), "SKIP rarp announce: cannot create network namespaces here");
        return;
    }
    let _guard = Netns(vec![a.clone(), b.clone()]);
    assert!(ip(&["netns", "add", &b]));
    assert!(ip(&["link", "add", "ann0", "netns", &a, "type", "veth", "peer", "name", "ann1", "netns", &b]));
    assert!(ip(&["-n", &a, "link", "set", "ann0", "up"]) && ip(&["-n", &b, "link", "set", "ann1", "up"]));
    let macs = [parse_mac("52:54:00:aa:bb:01").unwrap(), parse_mac("52:54:00:aa:bb:02").unwrap()];
    let schedule = Schedule::default();
    let want = schedule.rounds as usize * macs.len();
    let bb = b.clone();
    let capturer = std::thread::spawn(move || {
        enter(&bb);
        capture("ann1", want + 1, Duration::from_secs(4)) // one more than planned: nothing extra may arrive
    });
    std::thread::sleep(Duration::from_millis(200)); // the capture socket is bound
    let aa = a.clone();
    let sent = std::thread::spawn(move || {
        enter(&aa);
        announce("ann0", &macs, schedule)
    })
    .join()
    .unwrap()
    .expect("announce");
    let frames = capturer.join().unwrap();
    assert_eq!(sent, want);
    assert_eq!(frames.len(), want, "planned {want} announcements, captured {}", frames.len());
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP ethertype");
        assert_eq!(&f[20..22], &[0, 3], "reverse request");
        let mac = macs[i % 2];
        assert_eq!((&f[6..12], &f[22..28]), (&mac[..], &mac[..]), "frame {i} carries the guest MAC");
    }
}
