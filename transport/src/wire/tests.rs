use super::*;
use livemig_engine::dirty::Bitmap;
use livemig_engine::guest::MemoryLayout;

fn frame(kind: Kind, epoch: u32, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, kind, epoch, seq, &[body]).unwrap();
    out
}

fn hello() -> Hello {
    Hello {
        session: 1,
        layout: MemoryLayout { regions: vec![(0, 1 << 20)] },
        vcpus: 1,
        guest_kind: "synthetic".into(),
        chunks: Bitmap::full(1),
        cpu: None,
        macs: Vec::new(),
    }
}

fn read(bytes: &[u8]) -> Result<(Header, Vec<u8>), WireError> {
    let mut body = Vec::new();
    let h = read_frame(&mut &bytes[..], &mut body)?;
    Ok((h, body))
}

#[test]
fn frame_round_trips() {
    let f = frame(Kind::Ack, 7, 42, &Ack { bytes: 99, pages: 3 }.encode());
    let (h, body) = read(&f).unwrap();
    assert_eq!((h.kind, h.epoch, h.seq, h.len, h.version), (Kind::Ack, 7, 42, 12, VERSION));
    assert_eq!(Ack::decode(&body).unwrap(), Ack { bytes: 99, pages: 3 });
}

#[test]
fn hello_round_trips_and_rejects_odd_layouts() {
    let mut pages = Bitmap::new(258);
    pages.set(3);
    pages.set(257);
    let hello = Hello {
        session: 0xfeed,
        layout: MemoryLayout { regions: vec![(0, 1 << 20), (1 << 32, 8192)] },
        vcpus: 2,
        guest_kind: "synthetic".into(),
        chunks: chunk_map(&pages),
        cpu: Some(livemig_engine::cpu::host()),
        macs: vec![[0x52, 0x54, 0, 0, 0, 1]],
    };
    assert_eq!(hello.chunks.len(), 1);
    assert!(hello.chunks.get(0));
    assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
    let mut odd = hello.clone();
    odd.layout.regions[1].1 = 100;
    assert!(matches!(Hello::decode(&odd.encode()), Err(WireError::Malformed { kind: Kind::Hello, .. })));
    let body = hello.encode();
    assert!(matches!(Hello::decode(&body[..body.len() - 3]), Err(WireError::Malformed { .. })));
    let mut pages = Bitmap::new(2000);
    for p in [0, 511, 512, 1999] {
        pages.set(p);
    }
    let c = chunk_map(&pages);
    assert_eq!((c.len(), c.count_ones(), c.get(0), c.get(1), c.get(2), c.get(3)), (4, 3, true, true, false, true));
}

#[test]
fn pages_round_trip() {
    let batch = EncodedBatch::owned(
        3,
        vec![
            PageEntry::new(5, Codec::Zero, 0, 1),
            PageEntry { live: true, ..PageEntry::new(6, Codec::Raw, 4096, 2) },
            PageEntry::new(9, Codec::Lz4, 10, 3),
            PageEntry::new(10, Codec::Zstd, 0, 4),
        ],
        vec![1; 4106 + 7],
        7,
    );
    let mut table = Vec::new();
    encode_entries(&batch, &mut table);
    let mut bytes = Vec::new();
    write_pages(&mut bytes, 3, 1, &table, &[&batch.payload[..100], &batch.payload[100..]]).unwrap();
    let (h, body) = read(&bytes).unwrap();
    assert_eq!((h.kind, h.checked_len as usize), (Kind::Pages, table.len()));
    let mut entries = Vec::new();
    let payload = decode_pages(&h, &body, &mut entries).unwrap();
    assert_eq!(entries, batch.entries);
    assert_eq!((payload.entries, payload.zstd), (&batch.payload[..4106], &batch.payload[4106..]));
    // The entry table is under the frame checksum; the payload is left to the page hashes, which the receiver checks.
    let mut flipped = bytes.clone();
    flipped[HEADER_LEN + 8 + 24] ^= 1;
    assert!(matches!(read(&flipped), Err(WireError::BadChecksum { .. })));
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(read(&flipped).is_ok());
}

#[test]
fn roots_round_trip() {
    let v = Verify { full: true, table_root: 1, memory_root: 2 };
    assert_eq!(Verify::decode(&v.encode()).unwrap(), v);
    let d = Verified { equal: false, table_root: 3, memory_root: 4 };
    assert_eq!(Verified::decode(&d.encode()).unwrap(), d);
    let mut b = d.encode();
    b[0] = 7;
    assert!(matches!(Verified::decode(&b), Err(WireError::Malformed { .. })));
}

#[test]
fn bad_magic_is_named() {
    let mut f = frame(Kind::Ack, 0, 0, &[0; 8]);
    f[0..4].copy_from_slice(b"GET ");
    assert!(matches!(read(&f), Err(WireError::BadMagic(m)) if &m == b"GET "));
}

#[test]
fn wrong_version_is_named() {
    let mut f = frame(Kind::Ack, 0, 0, &[0; 8]);
    f[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    let err = read(&f).unwrap_err();
    assert!(matches!(err, WireError::UnsupportedVersion { found } if found == VERSION + 1));
    assert!(err.to_string().contains(&format!("unsupported protocol version {}", VERSION + 1)), "{err}");
    // Version 1 predates live pages and zstd frames: refused by name too.
    f[4..6].copy_from_slice(&1u16.to_le_bytes());
    assert!(matches!(read(&f), Err(WireError::UnsupportedVersion { found: 1 })));
}

#[test]
fn unknown_kind_is_named() {
    let mut f = frame(Kind::Ack, 0, 0, &[0; 8]);
    f[6..8].copy_from_slice(&999u16.to_le_bytes());
    assert!(matches!(read(&f), Err(WireError::UnknownKind(999))));
}

#[test]
fn bad_checksum_is_named() {
    let mut f = frame(Kind::Ack, 0, 0, &[0; 8]);
    let last = f.len() - 1;
    f[last] ^= 0x40;
    assert!(matches!(read(&f), Err(WireError::BadChecksum { .. })));
    // A flipped epoch in the header is caught too: the checksum covers it.
    let mut f = frame(Kind::Ack, 0, 0, &[0; 8]);
    f[8] ^= 1;
    assert!(matches!(read(&f), Err(WireError::BadChecksum { .. })));
}

#[test]
fn truncation_is_named_for_header_and_body() {
    let f = frame(Kind::Ack, 0, 0, &[0; 8]);
    assert!(matches!(read(&f[..10]), Err(WireError::Truncated { part: "header", got: 10, .. })));
    assert!(matches!(read(&f[..HEADER_LEN + 3]), Err(WireError::Truncated { part: "body", got: 3, needed: 8 })));
    assert!(matches!(read(&[]), Err(WireError::Closed)));
}

#[test]
fn checksum_coverage_cannot_be_narrowed() {
    // Only a Pages frame may leave part of its body to the page hashes.
    let mut f = frame(Kind::Verify, 0, 0, &[0; 17]);
    f[20..24].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(read(&f), Err(WireError::Malformed { kind: Kind::Verify, .. })));
    // And a Pages frame only its payload.
    let batch = EncodedBatch {
        entries: vec![PageEntry::new(1, Codec::Raw, 4096, 0)],
        payload: vec![0; 4096],
        ..Default::default()
    };
    let mut table = Vec::new();
    encode_entries(&batch, &mut table);
    let mut bytes = Vec::new();
    write_frame(&mut bytes, Kind::Pages, 0, 0, &[&table[..8], &table[8..], &batch.payload]).unwrap();
    let (h, body) = read(&bytes).unwrap();
    let mut entries = Vec::new();
    let err = decode_pages(&h, &body, &mut entries).unwrap_err();
    assert!(err.to_string().contains("the entry table is 24"), "{err}");
}

#[test]
fn oversized_bodies_are_refused_before_allocation() {
    let mut f = frame(Kind::Pages, 0, 0, &[]);
    f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(read(&f), Err(WireError::TooLarge { kind: Kind::Pages, len: u32::MAX })));
}

#[test]
fn each_kind_has_its_own_body_limit() {
    // An Ack carries 12 bytes: one that claims a megabyte is refused at its header, before any body is read.
    for (kind, len) in [(Kind::Ack, 1u32 << 20), (Kind::LinkHello, 45), (Kind::Commit, 1), (Kind::Abort, 64 << 10)] {
        let mut f = frame(kind, 0, 0, &[]);
        f[16..20].copy_from_slice(&len.to_le_bytes());
        let err = read(&f).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { kind: k, len: l } if k == kind && l == len), "{kind:?}: {err}");
        assert!(err.to_string().contains("limit for its kind"), "{err}");
    }
    // At the limit is fine.
    let f = frame(Kind::Ack, 0, 0, &[0u8; 12]);
    assert_eq!(read(&f).unwrap().0.len, 12);
}

#[test]
fn a_hello_with_too_many_vcpus_is_refused() {
    for vcpus in [0, MAX_VCPUS + 1, u32::MAX] {
        let h = Hello { vcpus, ..hello() };
        let err = Hello::decode(&h.encode()).unwrap_err();
        assert!(err.to_string().contains("vCPUs"), "{err}");
    }
    assert_eq!(Hello::decode(&Hello { vcpus: MAX_VCPUS, ..hello() }.encode()).unwrap().vcpus, MAX_VCPUS);
}

#[test]
fn a_frame_has_one_deadline_however_slowly_its_bytes_trickle() {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    let bytes = frame(Kind::Ack, 1, 2, &[7u8; 12]);
    let trickle = std::thread::spawn(move || {
        // One byte every 20 ms: each read gets a byte long before any per-read timeout of 150 ms would fire.
        for b in bytes {
            if c.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    let t = std::time::Instant::now();
    let mut body = Vec::new();
    let s = crate::tls::Conn::plain(s);
    let err = read_frame_within(&s, &mut body, std::time::Duration::from_millis(150), "test frame").unwrap_err();
    let took = t.elapsed();
    assert!(err.to_string().contains("test frame not complete in time"), "{err}");
    assert!(took < std::time::Duration::from_millis(150) + DEADLINE_SLACK * 2, "took {took:?}");
    drop(s);
    trickle.join().unwrap();
}

fn pages_header(body: &[u8], table_len: usize) -> Header {
    Header {
        version: VERSION,
        kind: Kind::Pages,
        epoch: 0,
        seq: 0,
        len: u32_len(body.len()),
        checked_len: u32_len(table_len),
        checksum: 0,
    }
}

#[test]
fn inconsistent_page_tables_are_refused() {
    let mut entries = Vec::new();
    // Count far beyond the body.
    let mut body = vec![0u8; 8];
    body[0..4].copy_from_slice(&1_000_000u32.to_le_bytes());
    assert!(matches!(decode_pages(&pages_header(&body, 8), &body, &mut entries), Err(WireError::Malformed { .. })));
    // One raw entry whose payload is short.
    let batch = EncodedBatch { entries: vec![PageEntry::new(1, Codec::Raw, 4096, 0)], ..Default::default() };
    let mut table = Vec::new();
    encode_entries(&batch, &mut table);
    let tlen = table.len();
    table.extend_from_slice(&[0u8; 100]);
    let err = decode_pages(&pages_header(&table, tlen), &table, &mut entries).unwrap_err();
    assert!(err.to_string().contains("claim 4096 payload bytes"), "{err}");
    // An unknown codec.
    encode_entries(&batch, &mut table);
    table[8 + 7] = 13;
    table.extend_from_slice(&[0u8; 4096]);
    let err = decode_pages(&pages_header(&table, tlen), &table, &mut entries).unwrap_err();
    assert!(err.to_string().contains("unknown page codec 13"), "{err}");
    // An unknown flag.
    table[8 + 7] = 0x21;
    let err = decode_pages(&pages_header(&table, tlen), &table, &mut entries).unwrap_err();
    assert!(err.to_string().contains("unknown entry flags 0x02"), "{err}");
    // A body too short for even the count.
    assert!(matches!(decode_pages(&pages_header(&[1, 2], 2), &[1, 2], &mut entries), Err(WireError::Malformed { .. })));
}

#[test]
fn every_control_message_round_trips_and_refuses_a_short_or_long_body() {
    let ack = Ack { bytes: 1 << 40, pages: 128 };
    assert_eq!(Ack::decode(&ack.encode()).unwrap(), ack);
    let plain = LinkHello { session: 0xfeed_f00d, link: 3, proof: None };
    assert_eq!(LinkHello::decode(&plain.encode()).unwrap(), plain);
    let link = LinkHello { session: 0xfeed_f00d, link: 3, proof: Some([7; 32]) };
    assert_eq!(LinkHello::decode(&link.encode()).unwrap(), link);
    let dest = livemig_engine::preflight::DestDescription {
        name: "dst".into(),
        free_memory_bytes: 1 << 30,
        datastores: vec!["ds1".into()],
        port_groups: Vec::new(),
        cpu: livemig_engine::cpu::host(),
        postcopy_unavailable: None,
    };
    let hello_ack = HelloAck { session: 9, dest };
    assert_eq!(HelloAck::decode(&hello_ack.encode()).unwrap(), hello_ack);
    for (kind, body) in [(Kind::Ack, ack.encode().to_vec()), (Kind::LinkHello, link.encode().to_vec())] {
        let short = match kind {
            Kind::Ack => Ack::decode(&body[..body.len() - 1]).map(drop),
            _ => LinkHello::decode(&body[..body.len() - 1]).map(drop),
        };
        assert!(short.unwrap_err().to_string().contains("body ends inside"), "{kind:?}");
        let mut long = body.clone();
        long.push(0);
        let long = match kind {
            Kind::Ack => Ack::decode(&long).map(drop),
            _ => LinkHello::decode(&long).map(drop),
        };
        assert!(long.unwrap_err().to_string().contains("1 trailing bytes"), "{kind:?}");
    }
    assert!(HelloAck::decode(&hello_ack.encode()[..20]).is_err());
}

#[test]
fn a_lost_connection_is_told_from_bad_data() {
    assert!(WireError::Closed.is_link_loss());
    assert!(WireError::Truncated { part: "body", needed: 10, got: 3 }.is_link_loss());
    assert!(WireError::Io(std::io::ErrorKind::ConnectionReset.into()).is_link_loss());
    assert!(!WireError::BadMagic(*b"GET ").is_link_loss());
    assert!(!WireError::BadChecksum { expected: 1, computed: 2 }.is_link_loss());
}

#[test]
fn a_body_buffer_grows_only_as_its_bytes_arrive() {
    // A Hello header that claims 4 MiB, followed by 100 bytes and the end of the stream.
    let mut f = frame(Kind::Hello, 0, 0, &[]);
    f[16..20].copy_from_slice(&MAX_BODY.to_le_bytes());
    f[20..24].copy_from_slice(&MAX_BODY.to_le_bytes());
    f.extend_from_slice(&[7u8; 100]);
    let mut body = Vec::new();
    let err = read_frame(&mut &f[..], &mut body).unwrap_err();
    assert!(
        matches!(err, WireError::Truncated { part: "body", needed, got: 100 } if needed == MAX_BODY as usize),
        "{err}"
    );
    assert!(body.capacity() <= 2 * BODY_STEP, "{} bytes held for 100 received", body.capacity());
    // A whole body still arrives whole.
    let f = frame(Kind::Abort, 0, 0, b"why");
    assert_eq!(read(&f).unwrap().1, b"why");
}

#[test]
fn device_sections_round_trip_and_bad_ones_say_what_is_wrong() {
    use livemig_engine::guest::DeviceSection;
    let s = DeviceSection { name: "virtio-blk0".into(), version: 7, data: vec![1, 2, 3] };
    assert_eq!(decode_device(&encode_device(&s)).unwrap(), s);
    let why = |body: &[u8]| decode_device(body).unwrap_err().to_string();
    assert!(why(&[]).contains("body ends inside the name's length"), "{}", why(&[]));
    assert!(why(&[0, 0, 1, 0, 0, 0]).contains("a device name of 0 bytes"), "{}", why(&[0, 0]));
    assert!(why(&[200, 0]).contains("a device name of 200 bytes"));
    assert!(why(&[3, 0, b'a', b'b']).contains("body ends inside the name"));
    assert!(why(&[2, 0, 0xff, 0xfe, 1, 0, 0, 0]).contains("not in UTF-8"));
    assert!(why(&[1, 0, b'a', 1, 0]).contains("body ends inside the version"));
}

#[test]
fn missing_bitmaps_round_trip_and_pages_past_the_guest_are_refused() {
    use super::postcopy::{decode_missing, encode_missing};
    let mut pages = livemig_engine::dirty::Bitmap::new(200);
    for p in [0, 63, 64, 130, 199] {
        pages.set(p);
    }
    let frames = encode_missing(&pages);
    assert_eq!(frames.len(), 1);
    let (first, words) = decode_missing(&frames[0], 200).unwrap();
    assert_eq!((first, words.as_slice()), (0, pages.words()));
    // Page 200 of a 200-page guest: the bit after its last.
    let mut past = 0u64.to_le_bytes().to_vec();
    past.extend_from_slice(&[0u64, 0, 0, 1 << 8].iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<_>>());
    let e = decode_missing(&past, 200).unwrap_err().to_string();
    assert!(e.contains("page 200 past the guest's 200"), "{e}");
    // A first word whose page index overflows.
    assert!(decode_missing(&[u64::MAX.to_le_bytes(), 1u64.to_le_bytes()].concat(), 200).is_err());
}
