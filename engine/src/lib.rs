//! livemig's engine: everything about a migration that is not I/O.
//!
//! - [`guest`]: the guest abstractions (memory, dirty log, vCPUs) and the synthetic guest.
//! - [`dirty`]: dirty bitmaps and the parallel word-at-a-time scan that turns them into page runs.
//! - [`encode`]: zero pages, codecs (lz4, zstd), batches with raw pages copied or left in place, the per-page hash
//!   tables, and the policy that picks codec and send path per batch.
//! - [`precopy`]: the sans-IO pre-copy state machine and its estimators.
//! - [`receive`]: the destination's page apply with the per-page epoch rule.
//! - [`cpu`]: CPU descriptions read with CPUID, cluster baselines, compatibility.
//! - [`preflight`]: the checks a VM must pass before it may migrate to a destination.
//!
//! Drivers (threads and sockets, in `livemig-transport`) read guest memory through [`guest`], encode with
//! [`encode`], and let the [`precopy`] machine decide what happens next.
#![deny(missing_docs)]

pub mod cpu;
pub mod dirty;
pub mod encode;
pub mod guest;
pub mod num;
pub mod precopy;
pub mod preflight;
pub mod receive;
pub mod sparse;
