//! The raw-TCP baseline of `livemig bench`: the same bytes pushed through the same links with plain large writes, as
//! iperf3 would, and read by a sink that only counts them.
//!
//! The blaster ([`blast`]) opens one connection per link (bound as the migration's links are), splits the bytes
//! evenly, writes 1 MiB at a time, half-closes, and waits for the sink's count of what it read ([`sink`]); the time is
//! from the first write to the last count. Each side reports its process CPU seconds over the transfer, as the
//! migration's reports do.

use livemig_transport::cpu_usage::process_cpu_seconds;
use livemig_transport::link::LinkSpec;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Size of each write and read.
const CHUNK: usize = 1 << 20;
/// A side that hears nothing for this long gives up.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What one side of a baseline transfer measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Transfer {
    /// Bytes moved, all links.
    pub bytes: u64,
    /// Seconds the transfer took.
    pub secs: f64,
    /// Process CPU seconds (user and system) over the transfer.
    pub cpu_seconds: f64,
}

/// Why a baseline transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// A socket failed.
    #[error("baseline {what}: {err}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
    /// The sink counted other than what was sent.
    #[error("baseline link {link}: sent {sent} bytes, the sink read {read}")]
    Short {
        /// Link index.
        link: usize,
        /// Bytes written.
        sent: u64,
        /// Bytes the sink counted.
        read: u64,
    },
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> BaselineError {
    move |err| BaselineError::Io { what, err }
}

/// Accepts `links` connections on `listener`, reads each to its end, answers each with the count, and returns the
/// total.
pub fn sink(listener: &TcpListener, links: usize) -> Result<Transfer, BaselineError> {
    let mut conns = Vec::with_capacity(links);
    listener.set_nonblocking(true).map_err(io("listen"))?;
    let deadline = Instant::now() + TIMEOUT;
    while conns.len() < links {
        match listener.accept() {
            Ok((s, _)) => conns.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(BaselineError::Io { what: "accept", err: e }),
        }
    }
    on_each(conns, |_, c| {
        c.set_nonblocking(false).map_err(io("configure"))?;
        c.set_read_timeout(Some(TIMEOUT)).map_err(io("configure"))?;
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            match (&c).read(&mut buf) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BaselineError::Io { what: "read", err: e }),
            }
        }
        (&c).write_all(&n.to_le_bytes()).map_err(io("answer"))?;
        Ok(n)
    })
}

/// Runs `f` on each connection (with its index) on a thread of its own, and returns the bytes they moved in all, the
/// time from start to the last, and the process CPU seconds meanwhile.
fn on_each(
    conns: Vec<TcpStream>,
    f: impl Fn(usize, TcpStream) -> Result<u64, BaselineError> + Sync,
) -> Result<Transfer, BaselineError> {
    let (t0, cpu0) = (Instant::now(), process_cpu_seconds());
    let f = &f;
    let results: Vec<Result<u64, BaselineError>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns.into_iter().enumerate().map(|(i, c)| s.spawn(move || f(i, c))).collect();
        handles.into_iter().map(|h| h.join().expect("baseline thread panicked")).collect()
    });
    let mut bytes = 0;
    for r in results {
        bytes += r?;
    }
    Ok(Transfer { bytes, secs: t0.elapsed().as_secs_f64(), cpu_seconds: process_cpu_seconds() - cpu0 })
}

/// Pushes `bytes` through `links` (split evenly) to a [`sink`], with 1 MiB writes.
pub fn blast(links: &[LinkSpec], bytes: u64) -> Result<Transfer, BaselineError> {
    let conns = links
        .iter()
        .map(|l| l.connect(Duration::from_secs(5)).map_err(io("connect")))
        .collect::<Result<Vec<TcpStream>, _>>()?;
    let n = conns.len() as u64;
    on_each(conns, |i, c| {
        let share = bytes / n + u64::from((i as u64) < bytes % n);
        // Not zeros: nothing on the way may take a shortcut for them.
        let buf: Vec<u8> = (0..CHUNK).map(|j| (j * 131 + 7).to_le_bytes()[0]).collect();
        let mut left = share;
        while left > 0 {
            let k = crate::engine::num::usize_from(left.min(CHUNK as u64));
            (&c).write_all(&buf[..k]).map_err(io("write"))?;
            left -= k as u64;
        }
        c.shutdown(std::net::Shutdown::Write).map_err(io("half-close"))?;
        c.set_read_timeout(Some(TIMEOUT)).map_err(io("configure"))?;
        let mut count = [0u8; 8];
        (&c).read_exact(&mut count).map_err(io("read the sink's count"))?;
        let read = u64::from_le_bytes(count);
        if read != share {
            return Err(BaselineError::Short { link: i, sent: share, read });
        }
        Ok(share)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_counts_what_two_links_blast() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let links = [LinkSpec::to(addr), LinkSpec::to(addr)];
        let (got, sent) = std::thread::scope(|s| {
            let sink = s.spawn(|| sink(&l, 2));
            let sent = blast(&links, 3 * CHUNK as u64 + 5).unwrap();
            (sink.join().unwrap().unwrap(), sent)
        });
        assert_eq!((got.bytes, sent.bytes), (3 * CHUNK as u64 + 5, 3 * CHUNK as u64 + 5));
        assert!(sent.secs > 0.0 && got.secs > 0.0);
    }
}
