//! livemig's transport: the wire format, and the drivers that run the engine's state machine over sockets.
//!
//! - [`wire`]: frames, the handshake, and every message of a migration, with a typed error per problem.
//! - [`link`]: data links: connecting them (socket2: bound to a local address and an interface, buffers sized on
//!   purpose), driving each (`link::data`: its queue, writer and reader), and the `MSG_ZEROCOPY` sender.
//! - [`stripe`]: the scheduler that spreads batches over the links by measured capacity (a pure choice, `pick`), and
//!   routes a dead link's batches again.
//! - [`source`]: the source driver (scan workers, a writer and a reader per link, around the pre-copy machine).
//! - [`dest`]: the destination driver (control loop; per link: check the session, read, check, apply, acknowledge;
//!   restore, verify, commit).
//! - [`stream`]: the sockets a migration runs over (TCP or Unix, connected by the drivers or handed in by the
//!   caller) and the listeners a destination accepts on.
//! - [`cpu_usage`]: idle CPU from `/proc/stat`, for the codec policy, and process CPU seconds from `getrusage`.
//! - [`announce`]: RARP announcements of the guest's MACs after switchover.
#![deny(missing_docs)]

pub mod announce;
pub mod cpu_usage;
pub mod dest;
pub mod link;
pub mod source;
pub mod stream;
pub mod stripe;
pub mod tls;
pub mod uring;
pub mod wire;
