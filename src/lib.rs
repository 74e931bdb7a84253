//! livemig: a live-migration memory transfer engine.
//!
//! This crate is the CLI's home and re-exports the two libraries an embedder needs:
//! [`engine`] (guest abstractions, the sans-IO pre-copy machine, encoding, the receiver) and [`transport`] (the wire
//! format and the source and destination drivers).
//!
//! ```no_run
//! use livemig::engine::guest::{SyntheticConfig, SyntheticGuest};
//! use livemig::transport::source::{migrate, SourceOptions};
//! use livemig::transport::tls::SourceSecurity;
//!
//! let guest = SyntheticGuest::new(&SyntheticConfig { memory_bytes: 64 << 20, ..Default::default() })?;
//! let stream = std::net::TcpStream::connect("127.0.0.1:7000")?;
//! // A hypervisor passes its own rustls configuration; plaintext must be named.
//! let security = SourceSecurity::Insecure;
//! let report = migrate(&guest, stream, &[], &SourceOptions::default(), &security, &|_| {});
//! println!("{:?}", report.result);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub use livemig_engine as engine;
pub use livemig_kvm as kvm;
pub use livemig_transport as transport;

// The CLI's tools, behind the default `cli` feature: an embedder that turns it off gets the libraries without
// clap, plotters, toml or indicatif.
#[cfg(feature = "cli")]
pub mod baseline;
#[cfg(feature = "cli")]
pub mod bench;
#[cfg(feature = "cli")]
pub mod control;
pub mod fuzz;
pub mod guests;
#[cfg(feature = "cli")]
pub mod lab;
pub mod loopback;
#[cfg(feature = "cli")]
pub mod manifest;
#[cfg(feature = "cli")]
pub mod plot;
pub mod report;
