//! livemig's transport: the wire format, and the drivers that run the engine's state machine over sockets.
//!
//! - [`wire`]: frames, the handshake, and every message of a migration, with a typed error per problem.
//! - [`source`]: the source driver (scan workers, a writer and a reader thread around the pre-copy machine).
//! - [`dest`]: the destination driver (read, check, apply, acknowledge; restore, verify, commit).
#![deny(missing_docs)]

pub mod announce;
pub mod cpu;
pub mod dest;
pub mod link;
pub mod source;
pub mod stripe;
pub mod wire;
