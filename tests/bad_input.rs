//! Bad input at the destination (and one at the source): every case gets its own typed error, never a panic, a
//! hang or a changed guest (invariant 5, docs/architecture.md). Each test speaks raw bytes over a real loopback connection.

mod common;

use common::frames::{self, frame, raw_page};
use livemig::engine::encode::{zero_page_hash, Codec, PageEntry};
use livemig::engine::guest::{GuestMemory, SyntheticConfig, SyntheticGuest};
use livemig::engine::receive::ApplyError;
use livemig::transport::dest::{accept_migration, read_hello, receive, DestOptions, ReceiveError, HELLO_TIMEOUT};
use livemig::transport::source::{migrate, MigrateError, SourceOptions};
use livemig::transport::tls::{DestSecurity, SourceSecurity};
use livemig::transport::wire::{self, Hello, Kind, WireError, HEADER_LEN};
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

const PAGES: u64 = 16;

fn hello(pages: u64) -> Hello {
    frames::hello(7, pages)
}

fn pages_frame(entries: Vec<PageEntry>, payload: Vec<u8>) -> Vec<u8> {
    frames::pages(1, entries, payload)
}

fn opts() -> DestOptions {
    DestOptions { idle_timeout: Duration::from_secs(5), ..Default::default() }
}

/// What a data link's client heard back.
#[derive(Debug, Default)]
struct DataLinkAnswer {
    /// The Abort's reason, when the destination ended the link for what it sent.
    abort: Option<String>,
    /// Whether any frame was acknowledged (applied).
    acked: bool,
}

/// Runs a destination against a client that sends `control` on the control connection and, when given, `data` on
/// a data link that presents the right session; then closes both. Returns the destination's result and what the
/// data link heard back.
fn exchange(control: Vec<u8>, data: Option<Vec<u8>>, dopts: DestOptions) -> (Result<(), ReceiveError>, DataLinkAnswer) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        let _ = c.write_all(&control);
        let mut answer = DataLinkAnswer::default();
        if let Some(data) = data {
            let mut d = TcpStream::connect(addr).unwrap();
            let mut bytes = frame(Kind::LinkHello, &wire::LinkHello { session: 7, link: 0, proof: None }.encode());
            bytes.extend_from_slice(&data);
            let _ = d.write_all(&bytes);
            let _ = d.shutdown(Shutdown::Write);
            let mut body = Vec::new();
            while let Ok(h) = wire::read_frame(&mut &d, &mut body) {
                match h.kind {
                    Kind::Ack => answer.acked = true,
                    Kind::Abort => answer.abort = Some(wire::decode_reason(&body)),
                    _ => {}
                }
            }
        }
        let _ = c.shutdown(Shutdown::Write);
        // Drain whatever the destination answers until it closes.
        let _ = std::io::copy(&mut c, &mut std::io::sink());
        answer
    });
    let stream = livemig::transport::tls::Conn::plain(listener.accept().unwrap().0);
    let result = read_hello(&stream, &dopts).map_err(ReceiveError::from).and_then(|h| {
        receive(
            &[&listener],
            &stream,
            h,
            |h| SyntheticGuest::destination(&h.layout, h.vcpus),
            &dopts,
            &DestSecurity::Insecure,
            &|_, _| {},
        )
        .map(|_| ())
    });
    drop(stream);
    (result, client.join().unwrap())
}

/// Control bytes alone.
fn against(bytes: Vec<u8>, dopts: DestOptions) -> Result<(), ReceiveError> {
    exchange(bytes, None, dopts).0
}

/// A valid Hello on the control connection, and `data` on a data link: bad data ends that link with an Abort, not
/// the migration (which then ends because the client closes its control connection). Returns what the link heard.
fn on_data_link(data: &[u8]) -> DataLinkAnswer {
    let (result, answer) = exchange(frame(Kind::Hello, &hello(PAGES).encode()), Some(data.to_vec()), opts());
    let err = result.expect_err("the client closed its control connection");
    assert!(matches!(err, ReceiveError::Wire(WireError::Closed)), "the control connection's end decides: {err}");
    answer
}

/// The reason a data link was ended with, asserting that nothing it sent was applied.
fn link_refusal(data: &[u8]) -> String {
    let answer = on_data_link(data);
    assert!(!answer.acked, "bad data was applied: {answer:?}");
    let why = answer.abort.clone();
    why.unwrap_or_else(|| panic!("the link was not ended with a reason: {answer:?}"))
}

fn with_hello(rest: &[u8]) -> Vec<u8> {
    let mut b = frame(Kind::Hello, &hello(PAGES).encode());
    b.extend_from_slice(rest);
    b
}

#[test]
fn bad_magic() {
    let err = against(b"GET / HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n".to_vec(), opts()).unwrap_err();
    assert!(matches!(err, ReceiveError::Wire(WireError::BadMagic(m)) if &m == b"GET "), "{err}");
    assert!(err.to_string().contains("not a livemig frame"), "{err}");
}

#[test]
fn wrong_version() {
    let mut f = frame(Kind::Hello, &hello(PAGES).encode());
    f[4..6].copy_from_slice(&9u16.to_le_bytes());
    let err = against(f, opts()).unwrap_err();
    assert!(matches!(err, ReceiveError::Wire(WireError::UnsupportedVersion { found: 9 })), "{err}");
}

#[test]
fn unknown_frame_type() {
    let mut f = frame(Kind::Commit, &[]);
    f[6..8].copy_from_slice(&77u16.to_le_bytes());
    let why = link_refusal(&f);
    assert!(why.contains("unknown frame type 77"), "{why}");
    let err = against(with_hello(&f), opts()).unwrap_err();
    assert!(matches!(err, ReceiveError::Wire(WireError::UnknownKind(77))), "{err}");
}

#[test]
fn bad_checksum() {
    let (e, data) = raw_page(3, 1);
    let mut f = pages_frame(vec![e], data);
    f[HEADER_LEN + 8] ^= 1; // the entry's page index, under the frame checksum
    let why = link_refusal(&f);
    assert!(why.starts_with("bad checksum: frame says"), "{why}");
}

#[test]
fn corrupt_page_payload() {
    let (e, mut data) = raw_page(3, 1);
    data[4000] = 2;
    let why = link_refusal(&pages_frame(vec![e], data));
    assert!(why.starts_with("page 3: bad checksum"), "{why}");
}

#[test]
fn truncated_frame() {
    let (e, data) = raw_page(3, 1);
    let f = pages_frame(vec![e], data);
    // On the control connection a truncated frame ends the migration; on a data link it is a link that died.
    let err = against(with_hello(&f[..100]), opts()).unwrap_err();
    assert!(matches!(err, ReceiveError::Wire(WireError::Truncated { part: "body", .. })), "{err}");
    let answer = on_data_link(&f[..100]);
    assert!(!answer.acked && answer.abort.is_none(), "a link that died mid-frame is just dropped: {answer:?}");
    let err = against(with_hello(&f[..20]), opts()).unwrap_err();
    assert!(matches!(err, ReceiveError::Wire(WireError::Truncated { part: "header", got: 20, .. })), "{err}");
}

#[test]
fn page_index_out_of_range() {
    let (e, data) = raw_page(PAGES, 1);
    let why = link_refusal(&pages_frame(vec![e], data));
    assert_eq!(why, ApplyError::PageOutOfRange { page: PAGES, pages: PAGES }.to_string());
    let huge = PageEntry::new(wire::MAX_PAGE_INDEX, Codec::Zero, 0, zero_page_hash());
    let why = link_refusal(&pages_frame(vec![huge], vec![]));
    assert!(why.contains("out of range"), "{why}");
}

#[test]
fn guest_larger_than_the_host_is_refused_before_allocation() {
    let f = frame(Kind::Hello, &hello(1 << 28).encode()); // 1 TiB
    let err = against(f, DestOptions { max_memory: 1 << 30, ..opts() }).unwrap_err();
    assert!(matches!(err, ReceiveError::TooLarge { max, .. } if max == 1 << 30), "{err}");
    assert!(err.to_string().contains("memory") && err.is_refusal(), "{err}");
}

#[test]
fn commit_without_verification_is_refused() {
    let err = against(with_hello(&frame(Kind::Commit, &[])), opts()).unwrap_err();
    assert!(matches!(err, ReceiveError::CommitBeforeVerify), "{err}");
}

#[test]
fn source_that_vanishes_before_commit_is_an_error_not_a_resumed_guest() {
    let (e, data) = raw_page(1, 5);
    let answer = on_data_link(&pages_frame(vec![e], data));
    assert!(answer.acked, "a good page was not applied: {answer:?}");
    // Pages on the control connection are a protocol violation.
    let (e, data) = raw_page(1, 5);
    let err = against(with_hello(&pages_frame(vec![e], data)), opts()).unwrap_err();
    assert!(matches!(err, ReceiveError::Wire(WireError::Unexpected { got: Kind::Pages, .. })), "{err}");
}

#[test]
fn garbage_never_panics_or_hangs() {
    // Random bytes, and valid frames with random bytes changed: every one must end in an error.
    let (e, data) = raw_page(2, 9);
    let valid = pages_frame(vec![e], data);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..200 {
        let bytes = if i % 2 == 0 {
            let n = (next() % 600) as usize;
            (0..n).map(|_| next().to_le_bytes()[0]).collect()
        } else {
            let mut b = valid.clone();
            for _ in 0..1 + next() % 4 {
                let at = livemig::engine::num::usize_from(next() % b.len() as u64);
                b[at] ^= 1 << (next() % 8);
            }
            b
        };
        // On a data link (every byte of a frame is under a checksum or a page hash, so nothing is applied) and on
        // the control connection after the Hello.
        let answer = on_data_link(&bytes);
        assert!(!answer.acked, "iteration {i}: garbage was applied on a data link: {answer:?}");
        assert!(against(with_hello(&bytes), opts()).is_err(), "iteration {i}: garbage was accepted on control");
    }
}

#[test]
fn stranger_on_the_port_is_refused_and_the_migration_goes_on() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let clients = std::thread::spawn(move || {
        // One stranger connects and says nothing, holding its connection open; another speaks another protocol.
        let silent = TcpStream::connect(addr).unwrap();
        let mut stranger = TcpStream::connect(addr).unwrap();
        stranger.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n").unwrap();
        let _ = std::io::copy(&mut stranger, &mut std::io::sink());
        let mut real = TcpStream::connect(addr).unwrap();
        real.write_all(&frame(Kind::Hello, &hello(PAGES).encode())).unwrap();
        (silent, real)
    });
    let t = std::time::Instant::now();
    let refused = Mutex::new(Vec::new());
    let (_stream, h) = accept_migration(&listener, &opts(), &DestSecurity::Insecure, &|peer, e| {
        refused.lock().unwrap().push((peer.clone(), e.to_string()))
    })
    .unwrap();
    assert_eq!(h, hello(PAGES));
    assert!(t.elapsed() < HELLO_TIMEOUT / 2, "the silent stranger held the real source up for {:?}", t.elapsed());
    let refused = refused.into_inner().unwrap();
    assert_eq!(refused.len(), 1);
    assert!(refused[0].1.contains("bad magic"), "{refused:?}");
    drop(clients.join().unwrap());
}

#[test]
fn source_refuses_a_destination_that_is_not_livemig() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").unwrap();
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    });
    let guest = SyntheticGuest::new(&SyntheticConfig { memory_bytes: 1 << 20, ..Default::default() }).unwrap();
    let r = migrate(
        &guest,
        TcpStream::connect(addr).unwrap(),
        &[],
        &SourceOptions::default(),
        &SourceSecurity::Insecure,
        &|_| {},
    );
    assert!(matches!(r.result, Err(MigrateError::Handshake(WireError::BadMagic(_)))), "{:?}", r.result);
    assert_eq!(r.pages.total(), 0, "no page may move before the handshake succeeds");
    assert!(guest.total_pages() > 0);
    server.join().unwrap();
}
