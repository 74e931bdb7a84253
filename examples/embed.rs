//! Embedding livemig: a destination and a source in one program, joined by TCP, the source driven through its handle.
//!
//! A VMM does the same with its own guest: implement `GuestMemory`, `DirtyLog` and `Vcpus` (bundled as `Guest`),
//! call `receive` on the destination host and `Migration::start` on the source host.
use livemig::engine::guest::{Guest, SyntheticConfig, SyntheticGuest, Vcpus};
use livemig::transport::dest::{accept_migration, receive, DestOptions};
use livemig::transport::source::{Links, Migration, MigrationEvent, SourceOptions};
use livemig::transport::stream::Peer;
use livemig::transport::tls::SecurityPair;
use livemig::transport::wire::Hello;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Mutual TLS. A hypervisor brings its own PKI: `SourceSecurity::Mtls { config, server_name }` and
    // `DestSecurity::Mtls(config)` take rustls configurations, and `tls::Credentials::load` reads `tls init` files.
    // Here both ends share throwaway credentials.
    let security = SecurityPair::throwaway()?;
    let dest_security = security.dest.clone();

    // Destination host: wait for a source, build an empty guest of its layout, apply, resume on commit.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let destination = std::thread::spawn(move || {
        let opts = DestOptions::default();
        let refused = |peer: &Peer, e: &_| eprintln!("refused {peer}: {e}");
        let (control, hello) = accept_migration(&listener, &opts, &dest_security, &refused)?;
        // Data links arrive on the same listener here; a host with several NICs passes one listener per NIC.
        let make = |h: &Hello| SyntheticGuest::destination(&h.layout, h.vcpus);
        let (guest, report) = receive(&[&listener], &control, hello, make, &opts, &dest_security, &refused)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((guest, report))
    });

    // Source host: a 64 MiB guest whose vCPU writes 2000 pages/s while it is copied.
    let cfg = SyntheticConfig { memory_bytes: 64 << 20, dirty_rate: 2000, ..Default::default() };
    let guest: Arc<dyn Guest> = Arc::new(SyntheticGuest::new(&cfg)?);
    // One data link to the control connection's peer. `Links::Connect` takes one `LinkSpec` per NIC, and
    // `Links::Streams` sockets the caller connected (TCP, Unix, or descriptors an orchestrator passed).
    let control = TcpStream::connect(addr)?;
    let migration =
        Migration::start(guest, control, Links::Connect(vec![]), SourceOptions::default(), security.source)?;
    // The handle works from any thread: status, events, cancel, and live limits.
    migration.set_max_bandwidth(Some(2 << 30))?;
    for event in migration.events() {
        if let MigrationEvent::RoundStarted { round, pages, .. } = event {
            println!("round {round}: {pages} pages, {:?} s to go", migration.status().eta_s);
        }
    }
    let report = migration.wait();
    report.result?;

    let (moved, dest_report) = destination.join().expect("destination thread").map_err(|e| e.to_string())?;
    println!(
        "migrated in {:.3} s, {} rounds, downtime {:.1} ms, verified {}; destination applied {} pages and runs: {}",
        report.total_time.as_secs_f64(),
        report.rounds.len(),
        report.downtime.unwrap_or_default().as_secs_f64() * 1e3,
        report.verified,
        dest_report.pages.total(),
        !moved.vcpus().is_paused()
    );
    Ok(())
}
