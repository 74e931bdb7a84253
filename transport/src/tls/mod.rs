//! Who may migrate to whom, and nothing in clear: mutual TLS 1.3 on every connection (the control connection and
//! each data link), then the connection's bytes in [`channel`] records under keys exported from that TLS session.
//!
//! The flow, per connection: the TCP connection is made or accepted; the two sides run a TLS 1.3 handshake with
//! rustls in which each presents a certificate from a CA the other trusts (the destination refuses a source without
//! one before it reads any livemig frame); the server then says "ready" through TLS, which tells the client that
//! nothing of the handshake is still in flight; both export keying material from the session (RFC 5705 / 8446
//! exporters), which gives each direction its own AES-256-GCM key and nonce prefix, and a binding secret. From there
//! the connection is a [`Conn`]: livemig's frames, sealed. A data link proves that it belongs to the migration whose
//! control connection it names by a MAC, under the control session's binding secret, of its own session's binding
//! secret ([`link_proof`]): only a peer that holds the control session can make it, and it cannot be replayed on
//! another link.
//!
//! Credentials are files in the layout `livemig tls init` writes ([`init`]): `DIR/ca.pem`, and per host
//! `DIR/NAME/cert.pem` and `DIR/NAME/key.pem` (mode 0600; a key that others may read is refused).

pub mod channel;

use crate::stream::Stream;
use crate::uring::RingIo;
use channel::{DirectionKey, Opener, Sealer};
use ring::hmac;
use rustls::pki_types::pem::PemObject;
pub use rustls::pki_types::ServerName;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use rcgen::date_time_ymd;
/// The rustls this crate builds on, for an embedder that brings its own configurations.
pub use rustls;

/// Why credentials could not be used or a secure connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credential file is missing or unreadable, or holds no certificate or key.
    #[error("{path}: {why}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A private key that users other than its owner may read.
    #[error("{path}: private key open to users other than its owner (mode {mode:o}); run chmod 600 on it")]
    LooseKey {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The certificates could not make a TLS configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The handshake failed: the peer's certificate was refused, it refused ours, or it does not speak TLS.
    #[error("TLS handshake with {peer}: {why}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// What failed.
        why: String,
    },
    /// Writing the credentials failed.
    #[error("writing {path}: {why}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// How the source secures its connections.
#[derive(Clone, Debug)]
pub enum SourceSecurity {
    /// Plaintext: anyone on the path reads the guest's memory, and nothing proves who the destination is. An
    /// embedder names this explicitly.
    Insecure,
    /// Mutual TLS 1.3: `config` must present a client certificate and trust the destination's CA; the destination's
    /// certificate must be valid for `server_name`.
    Mtls {
        /// The rustls client configuration (certificate, key, trusted roots).
        config: Arc<ClientConfig>,
        /// The name the destination's certificate must carry.
        server_name: ServerName<'static>,
    },
}

/// How the destination secures its connections.
#[derive(Clone, Debug)]
pub enum DestSecurity {
    /// Plaintext: anyone who can reach the port can write a guest's memory. An embedder names this explicitly.
    Insecure,
    /// Mutual TLS 1.3: `config` must require client certificates from a trusted CA.
    Mtls(Arc<ServerConfig>),
}

/// The security in force on a connection, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecurityInfo {
    /// "mtls" or "insecure".
    pub mode: &'static str,
    /// The record cipher, when encrypted.
    pub cipher: Option<String>,
    /// The peer certificate's subject, when authenticated.
    pub peer: Option<String>,
}

/// The cipher every sealed connection uses, as the report names it.
pub const CIPHER: &str = "TLS 1.3 handshake (mutual); records AES-256-GCM (ring) under exported keys";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A host's credentials, loaded from files.
#[derive(Debug)]
pub struct Credentials {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The subject of this host's certificate.
    pub subject: String,
    /// The directory they came from (`DIR/NAME`).
    pub dir: PathBuf,
}

fn cred_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::Credentials { path: path.to_path_buf(), why: why.to_string() }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| cred_err(path, e))?;
    let certs: Vec<_> =
        CertificateDer::pem_slice_iter(&bytes).collect::<Result<_, _>>().map_err(|e| cred_err(path, e))?;
    if certs.is_empty() {
        return Err(cred_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The subject of a DER certificate, as `CN=...`.
pub fn subject_of(der: &[u8]) -> String {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => c.subject().to_string(),
        Err(_) => "(unparsable certificate)".into(),
    }
}

impl Credentials {
    /// Loads `dir/cert.pem` and `dir/key.pem`, trusting the CA in `ca` (by default `dir/../ca.pem`).
    pub fn load(dir: &Path, ca: Option<&Path>) -> Result<Credentials, TlsError> {
        let ca_path = match ca {
            Some(p) => p.to_path_buf(),
            None => dir.parent().unwrap_or(Path::new(".")).join("ca.pem"),
        };
        let mut roots = RootCertStore::empty();
        for c in read_certs(&ca_path)? {
            roots.add(c).map_err(|e| cred_err(&ca_path, e))?;
        }
        let cert_path = dir.join("cert.pem");
        let chain = read_certs(&cert_path)?;
        let key_path = dir.join("key.pem");
        let meta = std::fs::metadata(&key_path).map_err(|e| cred_err(&key_path, e))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::LooseKey { path: key_path, mode });
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| cred_err(&key_path, e))?;
        let subject = subject_of(&chain[0]);
        Ok(Credentials { roots, chain, key, subject, dir: dir.to_path_buf() })
    }

    /// A client configuration: presents this host's certificate, trusts the CA, TLS 1.3 only, no resumption.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    }

    /// A server configuration: presents this host's certificate and requires a client certificate from the CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots.clone()), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // Nothing may follow the handshake on the wire but livemig's own records.
        c.send_tls13_tickets = 0;
        Ok(Arc::new(c))
    }

    /// The other host beside this one in its directory, when there is exactly one: the peer a source in a
    /// `tls init --hosts src,dst` layout talks to.
    pub fn sole_peer_name(&self) -> Option<String> {
        let name = self.dir.file_name()?.to_str()?.to_string();
        let parent = self.dir.parent()?;
        let others: Vec<String> = std::fs::read_dir(parent)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("cert.pem").is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| *n != name)
            .collect();
        match others.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }
}

/// Writes a private CA and, per host, a certificate and key it signs, valid from a day ago for ten years, into `dir`
/// (`ca.pem`, `NAME/cert.pem`, `NAME/key.pem`; keys and the CA's key mode 0600). Each host's certificate carries its
/// name as a DNS name, for servers and clients alike.
pub fn init(dir: &Path, hosts: &[&str]) -> Result<(), TlsError> {
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    init_with_validity(dir, hosts, (now - day).into(), (now + 3650 * day).into())
}

/// As [`init`], with the host certificates valid from `not_before` to `not_after` (an expired one, for tests).
pub fn init_with_validity(
    dir: &Path,
    hosts: &[&str],
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<(), TlsError> {
    let werr = |p: &Path, e: &dyn std::fmt::Display| TlsError::Write { path: p.to_path_buf(), why: e.to_string() };
    let gen = |e: rcgen::Error| TlsError::Config(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| werr(dir, &e))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(|e| werr(dir, &e))?;
    let ca_key = rcgen::KeyPair::generate().map_err(gen)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Named apart from every other livemig CA, so that a certificate another one signed is an unknown issuer.
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).map_err(|e| TlsError::Config(e.to_string()))?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("livemig private CA {id}"));
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    write_file(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?;
    write_file(&dir.join("ca-key.pem"), ca_key.serialize_pem().as_bytes(), 0o600)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for host in hosts {
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let mut p = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(gen)?;
        p.distinguished_name.push(rcgen::DnType::CommonName, *host);
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        (p.not_before, p.not_after) = (not_before, not_after);
        let cert = p.signed_by(&key, &issuer).map_err(gen)?;
        let hd = dir.join(host);
        std::fs::create_dir_all(&hd).map_err(|e| werr(&hd, &e))?;
        write_file(&hd.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
        write_file(&hd.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    }
    Ok(())
}

/// Both ends of a migration's security, as a source and a destination in one run use them.
#[derive(Clone, Debug)]
pub struct SecurityPair {
    /// The source's.
    pub source: SourceSecurity,
    /// The destination's.
    pub dest: DestSecurity,
}

impl SecurityPair {
    /// Plaintext on both ends.
    pub fn insecure() -> Self {
        SecurityPair { source: SourceSecurity::Insecure, dest: DestSecurity::Insecure }
    }

    /// Mutual TLS under throwaway credentials: a private CA and certificates for "source" and "destination", made
    /// in a private temporary directory, loaded, and deleted again (the configurations hold what they need).
    pub fn throwaway() -> Result<Self, TlsError> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| TlsError::Config(e.to_string()))?;
        let dir = std::env::temp_dir().join(format!("livemig-creds-{}", u64::from_le_bytes(id)));
        let made = init(&dir, &["source", "destination"]).and_then(|()| Self::from_dir(&dir, "source", "destination"));
        let _ = std::fs::remove_dir_all(&dir);
        made
    }

    /// Mutual TLS with the credentials of `src` and `dst` in a `tls init` directory.
    pub fn from_dir(dir: &Path, src: &str, dst: &str) -> Result<Self, TlsError> {
        let (s, d) = (Credentials::load(&dir.join(src), None)?, Credentials::load(&dir.join(dst), None)?);
        let server_name = ServerName::try_from(dst.to_string()).map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(SecurityPair {
            source: SourceSecurity::Mtls { config: s.client_config()?, server_name },
            dest: DestSecurity::Mtls(d.server_config()?),
        })
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |e: std::io::Error| TlsError::Write { path: path.to_path_buf(), why: e.to_string() };
    // Created with its mode, so a key is never readable by others even for a moment; an old file is replaced.
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(werr)?;
    f.write_all(bytes).map_err(werr)
}

/// A connection: plaintext, or sealed in both directions under keys from its TLS session. Readers and writers on
/// different threads use the two directions independently; `&Conn` reads and writes.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    seal: Option<Mutex<Sealer>>,
    open: Option<Mutex<Opener>>,
    peer: Option<String>,
    binding: Option<[u8; 32]>,
    /// Set when the socket's reads and writes go through an io_uring ([`crate::uring`]).
    ring: Option<OnRing>,
}

/// A connection's ring, and the socket timeouts it applies itself (io_uring does not honour `SO_RCVTIMEO`).
#[derive(Debug)]
struct OnRing {
    io: RingIo,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
    /// Bytes received ahead of the reads that want them (see [`READ_AHEAD`]).
    ahead: Mutex<ReadAhead>,
}

/// Reads smaller than this are served from one receive of up to this many bytes, taken without waiting for more
/// than is there; larger ones (a frame's pages, in plaintext) go straight to their buffers. Through a ring every
/// request costs two thread wake-ups, so the record layer's small reads (a record's length, then the record) would
/// otherwise cost a request each.
const READ_AHEAD: usize = 256 << 10;

#[derive(Debug, Default)]
struct ReadAhead {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl ReadAhead {
    /// Copies buffered bytes into `bufs`; returns how many.
    fn give(&mut self, bufs: &mut [IoSliceMut<'_>]) -> usize {
        channel::give(&self.buf[..self.end], &mut self.pos, bufs)
    }
}

impl Conn {
    /// A plaintext connection.
    pub fn plain(stream: impl Into<Stream>) -> Conn {
        Conn { stream: stream.into(), seal: None, open: None, peer: None, binding: None, ring: None }
    }

    /// The connection with its socket's reads and writes submitted to `io`'s ring. Writes give up after
    /// `write_timeout`; reads after what [`Conn::set_read_timeout`] last set (nothing until then).
    pub fn with_ring(mut self, io: RingIo, write_timeout: Option<Duration>) -> Conn {
        let write_timeout = Mutex::new(write_timeout);
        self.ring = Some(OnRing { io, read_timeout: Mutex::new(None), write_timeout, ahead: Mutex::default() });
        self
    }

    /// Whether the socket's I/O goes through a ring.
    pub fn on_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// How long a read may wait (None: for ever), on the socket and on the ring alike.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match &self.ring {
            // The ring applies it to each read itself; the socket's own timeout would cost a system call for nothing.
            Some(r) => {
                *r.read_timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
                Ok(())
            }
            None => self.stream.set_read_timeout(t),
        }
    }

    /// How long a write may block (None: for ever), on the socket and on the ring alike.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match &self.ring {
            Some(r) => {
                *r.write_timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
                Ok(())
            }
            None => self.stream.set_write_timeout(t),
        }
    }

    /// The socket under it (for timeouts, shutdown, addresses).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Whether the connection is authenticated and encrypted.
    pub fn is_sealed(&self) -> bool {
        self.seal.is_some()
    }

    /// The security in force, for the report.
    pub fn info(&self) -> SecurityInfo {
        if self.is_sealed() {
            SecurityInfo { mode: "mtls", cipher: Some(CIPHER.into()), peer: self.peer.clone() }
        } else {
            SecurityInfo { mode: "insecure", cipher: None, peer: None }
        }
    }

    /// The secret this connection's TLS session binds other connections to (None in plaintext).
    pub fn binding(&self) -> Option<&[u8; 32]> {
        self.binding.as_ref()
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        match &self.open {
            None => Sock(self).read_vectored(bufs),
            Some(o) => o.lock().unwrap_or_else(|e| e.into_inner()).read_vectored_from(&mut Sock(self), bufs),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match &self.seal {
            None => Sock(self).write_vectored(bufs),
            // Sealed, every write is written whole: a record cannot go out in part.
            Some(s) => s.lock().unwrap_or_else(|e| e.into_inner()).write_all_parts(&mut Sock(self), bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connection's socket as its plaintext and record layers read and write it: directly, or through its ring.
struct Sock<'a>(&'a Conn);

impl Read for Sock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        match &self.0.ring {
            None => (&self.0.stream).read_vectored(bufs),
            Some(r) => {
                let timeout = *r.read_timeout.lock().unwrap_or_else(|e| e.into_inner());
                let fd = self.0.stream.as_raw_fd();
                let mut ahead = r.ahead.lock().unwrap_or_else(|e| e.into_inner());
                if ahead.pos < ahead.end {
                    return Ok(ahead.give(bufs));
                }
                if bufs.iter().map(|b| b.len()).sum::<usize>() >= READ_AHEAD {
                    return r.io.recv(fd, bufs, true, timeout);
                }
                let ahead = &mut *ahead;
                ahead.buf.resize(READ_AHEAD, 0);
                let n = r.io.recv(fd, &mut [IoSliceMut::new(&mut ahead.buf)], false, timeout)?;
                (ahead.pos, ahead.end) = (0, n);
                Ok(ahead.give(bufs))
            }
        }
    }
}

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match &self.0.ring {
            None => (&self.0.stream).write_vectored(bufs),
            Some(r) => {
                let timeout = *r.write_timeout.lock().unwrap_or_else(|e| e.into_inner());
                r.io.send(self.0.stream.as_raw_fd(), bufs, timeout)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The proof a data link presents that it belongs to the migration of the control connection whose binding secret
/// is `control`: a MAC, under that secret, of the link's own session's binding secret.
pub fn link_proof(control: &[u8; 32], link: &[u8; 32]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, control), link);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Checks a data link's proof in constant time.
pub fn check_link_proof(control: &[u8; 32], link: &[u8; 32], proof: &[u8; 32]) -> bool {
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, control), link, proof).is_ok()
}

const READY: &[u8; 8] = b"LMREADY1";
const EXPORT_LABEL: &[u8] = b"EXPORTER-livemig-records-v1";

/// The keys of both directions and the binding secret, from a finished session.
fn export<D>(conn: &rustls::ConnectionCommon<D>) -> Result<(DirectionKey, DirectionKey, [u8; 32]), String> {
    let mut m = [0u8; 36 + 36 + 32];
    let m = conn.export_keying_material(&mut m, EXPORT_LABEL, None).map_err(|e| e.to_string())?;
    let mut c2s = [0u8; 36];
    let mut s2c = [0u8; 36];
    let mut binding = [0u8; 32];
    c2s.copy_from_slice(&m[..36]);
    s2c.copy_from_slice(&m[36..72]);
    binding.copy_from_slice(&m[72..]);
    Ok((DirectionKey::from_material(&c2s), DirectionKey::from_material(&s2c), binding))
}

/// Drives `conn` over `stream` until `done`, within `deadline`.
fn drive<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    stream: &Stream,
    deadline: Instant,
    done: impl Fn(&mut rustls::ConnectionCommon<D>) -> bool,
) -> Result<(), String> {
    let mut s = stream;
    while !done(conn) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("not complete in time".into());
        }
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match conn.complete_io(&mut s) {
            Ok((0, 0)) if !done(conn) => {
                if conn.wants_read() {
                    return Err("the peer closed the connection".into());
                }
            }
            Ok(_) => {}
            Err(e) => return Err(describe(&e)),
        }
    }
    let _ = stream.set_read_timeout(None);
    Ok(())
}

fn describe(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(t) => describe_tls(t),
        None if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            "not complete in time".into()
        }
        None => e.to_string(),
    }
}

fn describe_tls(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidMessage(_) => {
            "the peer does not speak TLS (a plaintext livemig, or another protocol)".into()
        }
        rustls::Error::InvalidCertificate(c) => format!("its certificate was refused: {c:?}"),
        rustls::Error::NoCertificatesPresented => "it presented no certificate".into(),
        rustls::Error::AlertReceived(a) => format!("it refused ours (TLS alert {a:?})"),
        other => other.to_string(),
    }
}

/// What a plaintext livemig peer said, when the first bytes on `stream` are a livemig frame rather than TLS. The
/// frame has until `deadline`, whole: a peer that trickles it cannot hold the source.
fn plaintext_peer(stream: &Stream, deadline: Instant) -> Option<String> {
    let mut first = [0u8; 4];
    match stream.peek(&mut first) {
        Ok(4) if first == crate::wire::MAGIC => {}
        _ => return None,
    }
    let conn = Conn::plain(stream.try_clone().ok()?);
    let mut body = Vec::new();
    match crate::wire::read_frame(&mut crate::wire::Deadline::new(&conn, deadline, "plaintext answer"), &mut body) {
        Ok(h) if h.kind == crate::wire::Kind::Abort => Some(crate::wire::decode_reason(&body)),
        Ok(h) => Some(format!("a {:?} frame", h.kind)),
        Err(e) => Some(e.to_string()),
    }
}

/// Runs the client's side of the handshake on `stream` within `within`, and returns the sealed connection.
pub fn connect(stream: impl Into<Stream>, sec: &SourceSecurity, within: Duration) -> Result<Conn, TlsError> {
    let stream = stream.into();
    let SourceSecurity::Mtls { config, server_name } = sec else {
        return Ok(Conn::plain(stream));
    };
    let peer = stream.peer().map_or("?".into(), |a| a.to_string());
    let herr = |why: String| TlsError::Handshake { peer: peer.clone(), why };
    let deadline = Instant::now() + within;
    let mut conn = ClientConnection::new(config.clone(), server_name.clone()).map_err(|e| herr(e.to_string()))?;
    // Send the ClientHello, then see whether the answer is TLS at all: a plaintext destination answers with an
    // Abort frame, whose reason is the clearest thing to report.
    conn.write_tls(&mut &stream).map_err(|e| herr(e.to_string()))?;
    stream.set_read_timeout(Some(within)).map_err(|e| herr(e.to_string()))?;
    if let Some(said) = plaintext_peer(&stream, deadline) {
        return Err(herr(format!("the destination answered in plaintext ({said}): it is not using TLS")));
    }
    drive(&mut conn, &stream, deadline, |c| !c.is_handshaking()).map_err(herr)?;
    // Wait for the server's "ready": after it, nothing of TLS is in flight (the server sends nothing more until
    // this side speaks, so reading TLS records here cannot swallow livemig's).
    let mut ready = [0u8; READY.len()];
    let mut got = 0;
    while got < ready.len() {
        match conn.reader().read(&mut ready[got..]) {
            Ok(0) => return Err(herr("the peer closed the connection after the handshake".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(herr("not complete in time".into()));
                }
                stream.set_read_timeout(Some(left)).map_err(|e| herr(e.to_string()))?;
                if conn.read_tls(&mut &stream).map_err(|e| herr(describe(&e)))? == 0 {
                    return Err(herr("the peer closed the connection after the handshake".into()));
                }
                conn.process_new_packets().map_err(|e| herr(describe_tls(&e)))?;
            }
            Err(e) => return Err(herr(e.to_string())),
        }
    }
    if &ready != READY {
        return Err(herr("the peer's first message was not livemig's".into()));
    }
    let _ = stream.set_read_timeout(None);
    sealed(stream, &conn, true).map_err(herr)
}

/// The connection sealed under the keys of its finished session `tls`; `client` says which direction is whose.
fn sealed<D>(stream: Stream, tls: &rustls::ConnectionCommon<D>, client: bool) -> Result<Conn, String> {
    let peer = tls.peer_certificates().and_then(|c| c.first()).map(|c| subject_of(c));
    let (c2s, s2c, binding) = export(tls)?;
    let (send, receive) = if client { (c2s, s2c) } else { (s2c, c2s) };
    Ok(Conn {
        stream,
        seal: Some(Mutex::new(Sealer::new(&send))),
        open: Some(Mutex::new(Opener::new(&receive))),
        peer,
        binding: Some(binding),
        ring: None,
    })
}

/// Runs the server's side of the handshake on `stream` within `within`, and returns the sealed connection. A peer
/// that starts with a plaintext livemig frame is told, in plaintext, that this destination requires TLS.
pub fn accept(stream: impl Into<Stream>, sec: &DestSecurity, within: Duration) -> Result<Conn, TlsError> {
    let stream = stream.into();
    let DestSecurity::Mtls(config) = sec else {
        return Ok(Conn::plain(stream));
    };
    let peer = stream.peer().map_or("?".into(), |a| a.to_string());
    let herr = |why: String| TlsError::Handshake { peer: peer.clone(), why };
    let deadline = Instant::now() + within;
    stream.set_read_timeout(Some(within)).map_err(|e| herr(e.to_string()))?;
    let mut first = [0u8; 4];
    if matches!(stream.peek(&mut first), Ok(4)) && first == crate::wire::MAGIC {
        let why = "this destination requires mutual TLS: start the source with --tls";
        let _ = crate::wire::write_abort(&mut &stream, why);
        return Err(herr("the source spoke plaintext livemig; told it that TLS is required".into()));
    }
    let mut conn = ServerConnection::new(config.clone()).map_err(|e| herr(e.to_string()))?;
    drive(&mut conn, &stream, deadline, |c| !c.is_handshaking()).map_err(herr)?;
    conn.writer().write_all(READY).map_err(|e| herr(e.to_string()))?;
    drive(&mut conn, &stream, deadline, |c| !c.wants_write()).map_err(herr)?;
    sealed(stream, &conn, false).map_err(herr)
}

#[cfg(test)]
mod tests;
