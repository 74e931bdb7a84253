//! Source and destination in one process, joined by a real TCP connection on loopback: what `livemig demo`, the
//! end-to-end tests and the embedding example run.

use livemig_engine::guest::{SyntheticGuest, Vcpus};
use livemig_transport::dest::{accept_migration, receive, DestOptions, DestReport, ReceiveError};
use livemig_transport::source::{migrate, Progress, SourceOptions, SourceReport};
use std::net::{TcpListener, TcpStream};

/// Both sides' results.
pub struct LoopbackRun {
    /// The source's report.
    pub source: SourceReport,
    /// The destination's running guest and report, or why it gave up.
    pub dest: Result<(SyntheticGuest, DestReport), ReceiveError>,
}

/// Migrates `guest` to a fresh synthetic guest in a thread of this process, over one loopback connection.
pub fn migrate_loopback(
    guest: &SyntheticGuest,
    opts: &SourceOptions,
    dopts: &DestOptions,
    progress: &(dyn Fn(&Progress) + Sync),
) -> std::io::Result<LoopbackRun> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::scope(|s| {
        let dest = std::thread::Builder::new().name("lm-dest".into()).spawn_scoped(s, move || {
            let (stream, hello) = accept_migration(&listener, dopts, &|peer, e| {
                eprintln!("refused connection from {peer}: {e}");
            })
            .map_err(|e| ReceiveError::Wire(e.into()))?;
            receive(&stream, hello, |h| SyntheticGuest::destination(&h.layout), dopts)
        })?;
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let source = migrate(guest, stream, opts, progress);
        let dest = dest.join().expect("destination thread panicked");
        if source.result.is_ok() {
            // The source has handed the guest over: its vCPUs stay paused for good.
            debug_assert!(guest.vcpus().is_paused());
        }
        Ok(LoopbackRun { source, dest })
    })
}
