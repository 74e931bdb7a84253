//! Data links: one TCP connection per NIC, from a bound local address (optionally bound to the interface itself) to
//! the destination.
//!
//! A link is written `[IFACE=]LOCAL>REMOTE:PORT`. The socket is bound to LOCAL, so the route and the NIC follow from
//! the source address, and with IFACE also to the device (`SO_BINDTODEVICE`), so that traffic cannot leave through
//! another NIC when routes overlap (several links in one subnet, or a default route that would win).
//!
//! Buffer sizes are set, not left to autotuning: a link's send buffer is what a dying link strands and must be sent
//! again elsewhere, so it is bounded at [`SEND_BUFFER`] (2 MiB asked, which Linux doubles for its bookkeeping), enough
//! for a 10 Gbit/s link at 1.6 ms RTT. The receive buffer is [`RECV_BUFFER`], so the destination's apply thread can
//! fall a few milliseconds behind without closing the window. Linux caps both at `net.core.{w,r}mem_max`.

pub mod data;
pub mod zerocopy;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

/// Send buffer asked for each data link.
pub const SEND_BUFFER: usize = 2 << 20;
/// Receive buffer asked for each data link.
pub const RECV_BUFFER: usize = 4 << 20;

/// One data link: where it leaves from and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    /// Interface to bind the socket to.
    pub iface: Option<String>,
    /// Local address to bind to (port chosen by the kernel).
    pub local: Option<IpAddr>,
    /// The destination's data address.
    pub remote: SocketAddr,
}

impl LinkSpec {
    /// A link to `remote` from wherever the routing table says.
    pub fn to(remote: SocketAddr) -> Self {
        LinkSpec { iface: None, local: None, remote }
    }

    /// A short name for reports: `IFACE LOCAL>REMOTE`.
    pub fn name(&self) -> String {
        let local = self.local.map_or("*".to_string(), |l| l.to_string());
        match &self.iface {
            Some(i) => format!("{i} {local}>{}", self.remote),
            None => format!("{local}>{}", self.remote),
        }
    }

    /// Opens the link: binds, sizes the buffers, connects within `timeout`.
    pub fn connect(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        let sock = Socket::new(Domain::for_address(self.remote), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(iface) = &self.iface {
            sock.bind_device(Some(iface.as_bytes()))
                .map_err(|e| std::io::Error::new(e.kind(), format!("binding to interface {iface}: {e}")))?;
        }
        if let Some(local) = self.local {
            sock.bind(&SockAddr::from(SocketAddr::new(local, 0)))
                .map_err(|e| std::io::Error::new(e.kind(), format!("binding to {local}: {e}")))?;
        }
        sock.set_send_buffer_size(SEND_BUFFER)?;
        sock.set_recv_buffer_size(RECV_BUFFER)?;
        sock.set_tcp_nodelay(true)?;
        sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
        sock.connect_timeout(&SockAddr::from(self.remote), timeout)
            .map_err(|e| std::io::Error::new(e.kind(), format!("connecting {}: {e}", self.name())))?;
        Ok(sock.into())
    }
}

/// No write may block for ever on a peer that stopped reading; the driver fails a silent link much sooner.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The size of `T` as a socket call's length argument.
pub(crate) fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("a socket option or address is far below 4 GiB")
}

/// The kernel's smoothed round-trip time of a TCP connection (`TCP_INFO`), if it has measured one.
///
/// A round trip timed by the application includes whatever the peer did before answering (accepting the
/// connection, building a guest); the kernel's figure is the network's alone.
pub fn tcp_rtt(stream: &impl std::os::fd::AsRawFd) -> Option<Duration> {
    // SAFETY: tcp_info is the plain C struct TCP_INFO fills.
    let info: libc::tcp_info = unsafe { sockopt(stream, libc::IPPROTO_TCP, libc::TCP_INFO) }?;
    (info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// A socket option's value (`getsockopt`), or None when the socket has none (wrong family, or not supported).
///
/// # Safety
/// `T` must be the plain C struct (integers only, so all-zero bytes are a valid value) that the kernel writes for
/// option `name` at `level`.
pub(crate) unsafe fn sockopt<T>(fd: &impl std::os::fd::AsRawFd, level: libc::c_int, name: libc::c_int) -> Option<T> {
    // SAFETY: by the contract, all zeros is a valid `T`.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = socklen_of::<T>();
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is that large and lives across the call.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut T).cast(), &mut len) };
    (rc == 0).then_some(value)
}

/// Parses `[IFACE=]LOCAL>REMOTE:PORT` (or just `REMOTE:PORT`).
impl FromStr for LinkSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (iface, rest) = match s.split_once('=') {
            Some((i, r)) if !i.is_empty() => (Some(i.to_string()), r),
            Some(_) => return Err(format!("link '{s}': empty interface name before '='")),
            None => (None, s),
        };
        let (local, remote) = match rest.split_once('>') {
            Some((l, r)) => {
                let local = l.parse::<IpAddr>().map_err(|_| format!("link '{s}': '{l}' is not an IP address"))?;
                (Some(local), r)
            }
            None => (None, rest),
        };
        // Typed unquoted, `IFACE=LOCAL>REMOTE:PORT` reaches us cut at the `>`, which the shell took as a redirect.
        let hint = if s.contains('>') {
            ""
        } else {
            "; quote the whole value, as in --link 'eth1=10.0.1.1>10.0.1.2:7000': unquoted, the shell takes '>' as \
             a redirect (and may have created a file named after the remote address)"
        };
        let remote = remote
            .to_socket_addrs()
            .map_err(|e| format!("link '{s}': '{remote}' is not ADDR:PORT ({e}){hint}"))?
            .next()
            .ok_or_else(|| format!("link '{s}': '{remote}' resolves to nothing"))?;
        Ok(LinkSpec { iface, local, remote })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_specs_parse() {
        let l: LinkSpec = "vmnic2=198.18.2.1>198.18.2.2:7000".parse().unwrap();
        assert_eq!(l.iface.as_deref(), Some("vmnic2"));
        assert_eq!(l.local, Some("198.18.2.1".parse().unwrap()));
        assert_eq!(l.remote, "198.18.2.2:7000".parse().unwrap());
        let l: LinkSpec = "127.0.0.1>127.0.0.1:9".parse().unwrap();
        assert_eq!((l.iface, l.local.is_some()), (None, true));
        let l: LinkSpec = "127.0.0.1:9".parse().unwrap();
        assert_eq!((l.iface, l.local), (None, None));
        assert!("=1.2.3.4>127.0.0.1:9".parse::<LinkSpec>().is_err());
        assert!("eth0=nonsense>127.0.0.1:9".parse::<LinkSpec>().is_err());
        assert!("127.0.0.1".parse::<LinkSpec>().is_err());
        // What the shell leaves of an unquoted `eth1=10.0.1.1>10.0.1.2:7000`.
        let e = "eth1=10.0.1.1".parse::<LinkSpec>().unwrap_err();
        assert!(e.contains("quote the whole value") && e.contains("redirect"), "{e}");
    }

    #[test]
    fn loopback_link_connects_from_its_local_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = LinkSpec { iface: None, local: Some("127.0.0.2".parse().unwrap()), remote: l.local_addr().unwrap() };
        let s = spec.connect(Duration::from_secs(2)).unwrap();
        assert_eq!(s.local_addr().unwrap().ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        let (_, peer) = l.accept().unwrap();
        assert_eq!(peer.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
    }
}
