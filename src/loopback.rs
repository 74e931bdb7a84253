//! Source and destination in one process, joined by real TCP connections on loopback: what `livemig demo`, the
//! end-to-end tests and the embedding example run.

use crate::guests::AnyGuest;
use livemig_engine::guest::Guest;
use livemig_transport::dest::{admit, receive, DestOptions, DestReport, ReceiveError};
use livemig_transport::link::LinkSpec;
use livemig_transport::source::{migrate, Progress, SourceOptions, SourceReport};
use livemig_transport::stream::Peer;
use livemig_transport::tls::SecurityPair;
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};

/// Both sides' results.
pub struct LoopbackRun {
    /// The source's report.
    pub source: SourceReport,
    /// The destination's running guest and report, or why it gave up.
    pub dest: Result<(AnyGuest, DestReport), ReceiveError>,
}

/// Migrates `guest` to a fresh guest of its kind in a thread of this process: a control connection and `links` data
/// links on loopback, link k leaving from 127.0.0.(k+1) so that each is its own connection with its own address.
pub fn migrate_loopback(
    guest: &dyn Guest,
    links: usize,
    opts: &SourceOptions,
    dopts: &DestOptions,
    security: &SecurityPair,
    progress: &(dyn Fn(&Progress) + Sync),
) -> std::io::Result<LoopbackRun> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let specs: Vec<LinkSpec> = (0..links.max(1))
        .map(|k| LinkSpec {
            iface: None,
            local: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, u8::try_from(k + 1).unwrap_or(u8::MAX)))),
            remote: addr,
        })
        .collect();
    std::thread::scope(|s| {
        let dest = std::thread::Builder::new().name("lm-dest".into()).spawn_scoped(s, move || {
            let refused = |peer: &Peer, e: &ReceiveError| tracing::warn!(%peer, error = %e, "connection refused");
            // One known source: its control connection comes first, and a refusal ends the run.
            let (stream, _) = listener.accept().map_err(|e| ReceiveError::Wire(e.into()))?;
            let (control, hello) = admit(stream, dopts, &security.dest)?;
            receive(&[&listener], &control, hello, AnyGuest::destination, dopts, &security.dest, &refused)
        })?;
        let control = TcpStream::connect(addr)?;
        let source = migrate(guest, control, &specs, opts, &security.source, progress);
        let dest = dest.join().expect("destination thread panicked");
        if source.result.is_ok() {
            // The source has handed the guest over: its vCPUs stay paused for good.
            debug_assert!(guest.vcpus().is_paused());
        }
        Ok(LoopbackRun { source, dest })
    })
}
