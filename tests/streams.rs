//! Any stream: a migration whose control connection is a Unix socket and whose data links the caller connected
//! itself before it started, one over Unix and one over TCP handed in as a bare descriptor (as an orchestrator passes
//! one), to a destination's data listeners (a Unix and a TCP one). Under mutual TLS, verified in full. A link
//! connected early to the listener the destination takes its control connection from is taken for a source and
//! refused; the second test shows that refusal is clear and the migration goes on over the other link.

use livemig::engine::guest::{SyntheticConfig, SyntheticGuest};
use livemig::transport::dest::{accept_migration, receive, DestOptions, DestReport};
use livemig::transport::source::{migrate_streams, SourceOptions, SourceReport, VerifyMode};
use livemig::transport::stream::{Address, Stream};
use livemig::transport::tls::SecurityPair;
use std::os::fd::OwnedFd;
use std::time::Duration;

/// Migrates a 64 MiB guest over a Unix control connection and two caller-connected links: one Unix (to the data
/// listener, or with `early_to_control` to the control listener), one TCP passed as a bare descriptor.
fn migrate_over_streams(early_to_control: bool) -> (SourceReport, DestReport) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("streams-{}-{early_to_control}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unix: Address = format!("unix:{}", dir.join("dest.sock").display()).parse().unwrap();
    let data: Address = format!("unix:{}", dir.join("data.sock").display()).parse().unwrap();
    let tcp: Address = "127.0.0.1:0".parse().unwrap();
    let (ul, dl, tl) = (unix.bind().unwrap(), data.bind().unwrap(), tcp.bind().unwrap());
    let tcp = tl.address().unwrap();
    let security = SecurityPair::throwaway().unwrap();
    let dest_security = security.dest.clone();
    let dest = std::thread::spawn(move || {
        let opts = DestOptions::default();
        let (control, hello) = accept_migration(&ul, &opts, &dest_security, &|_, _| {}).unwrap();
        let make = |h: &livemig::transport::wire::Hello| SyntheticGuest::destination(&h.layout, h.vcpus);
        receive(&[&ul, &dl, &tl], &control, hello, make, &opts, &dest_security, &|_, _| {}).map(|(_, r)| r)
    });
    let cfg = SyntheticConfig { memory_bytes: 64 << 20, dirty_rate: 3000, ..Default::default() };
    let guest = SyntheticGuest::new(&cfg).unwrap();
    let control = unix.connect(Duration::from_secs(1)).unwrap();
    let by_unix = if early_to_control { &unix } else { &data }.connect(Duration::from_secs(1)).unwrap();
    // The orchestrator's descriptor: a connected TCP socket, known only as an fd.
    let Stream::Tcp(t) = tcp.connect(Duration::from_secs(1)).unwrap() else { unreachable!() };
    let passed = Stream::try_from(OwnedFd::from(t)).unwrap();
    let opts = SourceOptions { verify: VerifyMode::Full, ..Default::default() };
    let r = migrate_streams(&guest, control, vec![by_unix, passed], &opts, &security.source, &|_| {});
    let d = dest.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (r, d)
}

#[test]
fn caller_connected_unix_and_passed_tcp_descriptors_carry_a_migration() {
    let (r, d) = migrate_over_streams(false);
    r.result.as_ref().unwrap();
    assert!(r.verified);
    assert_eq!(r.security.mode, "mtls");
    assert!(r.links[0].name.contains("local process") && r.links[1].name.contains("127.0.0.1"), "{:?}", r.links);
    assert!(r.links.iter().all(|l| l.bytes_on_wire > 1 << 20 && !l.failed), "{:?}", r.links);
    assert_eq!(d.links.len(), 2, "both links joined the destination");
}

#[test]
fn a_link_that_reaches_the_control_listener_first_is_refused_clearly_and_the_other_carries_on() {
    let (r, d) = migrate_over_streams(true);
    r.result.as_ref().unwrap();
    assert!(r.verified);
    let early = &r.links[0];
    assert!(early.failed, "{early:?}");
    assert!(early.error.as_deref().unwrap_or("").contains("LinkHello frame while waiting for Hello"), "{early:?}");
    assert!(!r.links[1].failed && d.links.len() == 1, "{:?}", r.links);
}
