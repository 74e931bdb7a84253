//! The byte streams a migration runs over, and where they come from.
//!
//! A [`Stream`] is a connected TCP or Unix-domain stream socket: one the drivers connected themselves, one the caller
//! connected (an embedder's own socket), or a descriptor an orchestrator passed in (`TryFrom<OwnedFd>` checks that it
//! is a connected stream socket of either family). TLS is not the caller's to add: [`crate::tls`] seals any of them.
//! Every stream is a socket because the drivers need what only a socket gives: a reader and a writer on different
//! threads at once, timeouts on both, and a shutdown that wakes a blocked peer thread.
//!
//! [`Listen`] is what a destination accepts on: a `TcpListener` or a `UnixListener`. Each accepted stream comes with
//! its [`Peer`], by which admission counts pending connections and refusals are reported. [`Address`] is what the CLI
//! and embedders name an endpoint with: `HOST:PORT`, or `unix:PATH` for two processes on one host (a hypervisor
//! upgraded in place).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// A connected stream socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix-domain stream socket.
    Unix(UnixStream),
}

/// Who is at the other end of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer's address.
    Tcp(SocketAddr),
    /// A process on this host, by its credentials (`SO_PEERCRED`) where the kernel gives them.
    Local {
        /// Its process id.
        pid: Option<i32>,
        /// Its user id.
        uid: Option<u32>,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Local { pid: Some(p), uid: Some(u) } => write!(f, "local process {p} (uid {u})"),
            Peer::Local { .. } => f.write_str("a local process"),
        }
    }
}

impl Peer {
    /// The key admission counts pending connections by: a TCP peer's IP; every local process together (they share
    /// the host, and a flood from one is a flood from all).
    pub fn ip(&self) -> IpAddr {
        match self {
            Peer::Tcp(a) => a.ip(),
            Peer::Local { .. } => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

macro_rules! each {
    ($s:expr, $x:ident => $e:expr) => {
        match $s {
            Stream::Tcp($x) => $e,
            Stream::Unix($x) => $e,
        }
    };
}

impl Stream {
    /// Shuts down one or both directions; a thread blocked on the other end wakes.
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        each!(self, s => s.shutdown(how))
    }

    /// How long a read may block (None: for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        each!(self, s => s.set_read_timeout(t))
    }

    /// How long a write may block (None: for ever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        each!(self, s => s.set_write_timeout(t))
    }

    /// Non-blocking mode on or off.
    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        each!(self, s => s.set_nonblocking(on))
    }

    /// `TCP_NODELAY` on a TCP stream; a Unix stream has no Nagle to turn off.
    pub fn set_nodelay(&self, on: bool) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(on),
            Stream::Unix(_) => Ok(()),
        }
    }

    /// The other end.
    pub fn peer(&self) -> std::io::Result<Peer> {
        match self {
            Stream::Tcp(s) => s.peer_addr().map(Peer::Tcp),
            Stream::Unix(s) => Ok(local_peer(s.as_fd())),
        }
    }

    /// Where a data link to the same destination goes, when the caller names none: the control connection's peer.
    pub fn peer_address(&self) -> std::io::Result<Address> {
        match self {
            Stream::Tcp(s) => s.peer_addr().map(Address::Tcp),
            Stream::Unix(s) => {
                let a = s.peer_addr()?;
                let path = a.as_pathname().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "the Unix peer has no path to connect to")
                })?;
                Ok(Address::Unix(path.to_path_buf()))
            }
        }
    }

    /// Reads what has arrived without taking it.
    pub fn peek(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.peek(buf),
            Stream::Unix(s) => {
                // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which lives across the call.
                let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
                usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
            }
        }
    }

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    /// The TCP stream, if this is one (for TCP-only options: zero-copy, `TCP_INFO`).
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }
}

/// The peer's credentials, or none where the kernel does not give them.
fn local_peer(fd: BorrowedFd<'_>) -> Peer {
    // SAFETY: ucred is the plain C struct SO_PEERCRED fills.
    let cred: Option<libc::ucred> = unsafe { crate::link::sockopt(&fd, libc::SOL_SOCKET, libc::SO_PEERCRED) };
    Peer::Local { pid: cred.map(|c| c.pid), uid: cred.map(|c| c.uid) }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        each!(*self, s => { let mut s = s; s.read(buf) })
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        each!(*self, s => { let mut s = s; s.read_vectored(bufs) })
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        each!(*self, s => { let mut s = s; s.write(buf) })
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        each!(*self, s => { let mut s = s; s.write_vectored(bufs) })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        each!(self, s => s.as_fd())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

/// A descriptor an orchestrator passed in: accepted when it is a connected stream socket, TCP or Unix.
impl TryFrom<OwnedFd> for Stream {
    type Error = std::io::Error;

    fn try_from(fd: OwnedFd) -> std::io::Result<Stream> {
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        let sock = socket2::SockRef::from(&fd);
        let ty = sock.r#type().map_err(|e| bad(format!("descriptor {} is not a socket: {e}", fd.as_raw_fd())))?;
        if ty != socket2::Type::STREAM {
            return Err(bad(format!("descriptor {} is not a stream socket", fd.as_raw_fd())));
        }
        // Connected: it has a peer (a listening or unconnected socket has none).
        sock.peer_addr().map_err(|e| bad(format!("descriptor {} is not connected: {e}", fd.as_raw_fd())))?;
        match sock.domain()? {
            d if d == socket2::Domain::UNIX => Ok(Stream::Unix(UnixStream::from(fd))),
            d if d == socket2::Domain::IPV4 || d == socket2::Domain::IPV6 => Ok(Stream::Tcp(TcpStream::from(fd))),
            d => Err(bad(format!("descriptor {} is a socket of family {d:?}, not TCP or Unix", fd.as_raw_fd()))),
        }
    }
}

/// Where a destination listens, or a source connects: `HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix-domain socket's path.
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = String;

    /// `unix:PATH`, or `HOST:PORT` resolved now (the first address it resolves to).
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("'{s}': no path after 'unix:'"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let mut addrs = s.to_socket_addrs().map_err(|e| format!("'{s}' is not HOST:PORT or unix:PATH ({e})"))?;
        addrs.next().map(Address::Tcp).ok_or_else(|| format!("'{s}' resolves to no address"))
    }
}

impl Address {
    /// Connects within `timeout`.
    pub fn connect(&self, timeout: Duration) -> std::io::Result<Stream> {
        let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("connecting to {self}: {e}"));
        match self {
            Address::Tcp(a) => TcpStream::connect_timeout(a, timeout).map(Stream::Tcp).map_err(named),
            // A Unix connect does not wait on a network: it succeeds or fails at once.
            Address::Unix(p) => UnixStream::connect(p).map(Stream::Unix).map_err(named),
        }
    }

    /// Binds a listener. A Unix socket's path is created with mode 0600 (only this user may connect); a stale
    /// socket left there by an earlier run is replaced, anything else at the path is an error.
    pub fn bind(&self) -> std::io::Result<Listener> {
        match self {
            Address::Tcp(a) => TcpListener::bind(a).map(Listener::Tcp),
            Address::Unix(p) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    if !meta.file_type().is_socket() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", p.display()),
                        ));
                    }
                    // A socket someone still answers on is theirs; only a stale one (its listener gone) is replaced.
                    // (The probe is a connection that closes at once; a livemig listener counts it as a refusal.)
                    if UnixStream::connect(p).is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is in use: another process listens on it", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p)?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }
}

/// What a destination accepts connections on.
pub trait Listen: Sync {
    /// Accepts one connection (or fails with `WouldBlock` when non-blocking and none waits).
    fn accept_stream(&self) -> std::io::Result<(Stream, Peer)>;
    /// Non-blocking mode on or off.
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()>;
}

impl Listen for TcpListener {
    fn accept_stream(&self) -> std::io::Result<(Stream, Peer)> {
        self.accept().map(|(s, a)| (Stream::Tcp(s), Peer::Tcp(a)))
    }
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        TcpListener::set_nonblocking(self, on)
    }
}

impl Listen for UnixListener {
    fn accept_stream(&self) -> std::io::Result<(Stream, Peer)> {
        let (s, _) = self.accept()?;
        let peer = local_peer(s.as_fd());
        Ok((Stream::Unix(s), peer))
    }
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        UnixListener::set_nonblocking(self, on)
    }
}

/// A bound listener of either kind; a Unix one removes its path when dropped.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with the path it is bound to.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// The address it listens on (a TCP port chosen by the kernel filled in).
    pub fn address(&self) -> std::io::Result<Address> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Address::Tcp),
            Listener::Unix(_, p) => Ok(Address::Unix(p.clone())),
        }
    }
}

impl Listen for Listener {
    fn accept_stream(&self) -> std::io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => l.accept_stream(),
            Listener::Unix(l, _) => l.accept_stream(),
        }
    }
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Listener::Tcp(l) => Listen::set_nonblocking(l, on),
            Listener::Unix(l, _) => Listen::set_nonblocking(l, on),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_descriptor_is_taken_only_when_it_is_a_connected_stream_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(Stream::try_from(OwnedFd::from(a)), Ok(Stream::Unix(_))));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(matches!(Stream::try_from(OwnedFd::from(c)), Ok(Stream::Tcp(_))));
        let e = Stream::try_from(OwnedFd::from(l)).unwrap_err().to_string();
        assert!(e.contains("not connected"), "{e}");
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let e = Stream::try_from(OwnedFd::from(f)).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = Stream::try_from(OwnedFd::from(u)).unwrap_err().to_string();
        assert!(e.contains("not a stream socket"), "{e}");
    }

    #[test]
    fn addresses_parse_and_a_unix_listener_is_private_and_cleans_up() {
        assert_eq!("127.0.0.1:7000".parse::<Address>().unwrap(), Address::Tcp("127.0.0.1:7000".parse().unwrap()));
        assert!("unix:".parse::<Address>().unwrap_err().contains("no path"));
        assert!("nonsense".parse::<Address>().unwrap_err().contains("HOST:PORT or unix:PATH"));
        let dir = std::env::temp_dir().join(format!("lm-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        std::fs::write(&path, b"not a socket").unwrap();
        let addr: Address = format!("unix:{}", path.display()).parse().unwrap();
        assert!(addr.bind().unwrap_err().to_string().contains("is not a socket"));
        std::fs::remove_file(&path).unwrap();
        let l = addr.bind().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let e = addr.bind().unwrap_err().to_string();
        assert!(e.contains("is in use"), "a live socket was taken over: {e}");
        // The probe that found it in use is a connection the listener sees close at once.
        drop(l.accept_stream().unwrap());
        let c = addr.connect(Duration::from_secs(1)).unwrap();
        let (s, peer) = l.accept_stream().unwrap();
        // SAFETY: getuid cannot fail and touches no memory.
        let uid = unsafe { libc::getuid() };
        assert_eq!(peer, Peer::Local { pid: Some(i32::try_from(std::process::id()).unwrap()), uid: Some(uid) });
        assert_eq!(c.peer_address().unwrap(), addr);
        (&s).write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        (&c).read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        drop(l);
        assert!(!path.exists(), "the listener's socket file outlived it");
        // A stale socket (its listener gone without removing it) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        drop(addr.bind().unwrap());
        let _ = std::fs::remove_dir(&dir);
    }
}
