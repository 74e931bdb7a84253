//! The fuzz targets of `livemig::fuzz`, run on stable Rust: each corpus entry as it is, then mutated inputs for a
//! bounded number of iterations (`LIVEMIG_FUZZ_ITERS`, default 100 000 per target) or for a time
//! (`LIVEMIG_FUZZ_SECS`), from a fixed seed unless `LIVEMIG_FUZZ_SEED` gives one. An input that panics is written to
//! `target/fuzz-crash-TARGET.bin` and fails the test. The corpus lives in `fuzz/corpus/TARGET/`; the ignored test
//! `write_corpus` makes it again from real frames.

use livemig::fuzz::{mutate, Rng, TARGETS};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("the {target} corpus: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs `target` on its corpus and on mutations of it; returns the inputs tried.
fn fuzz(name: &str, target: fn(&[u8])) -> u64 {
    let seeds = corpus(name);
    assert!(!seeds.is_empty(), "the {name} corpus is empty");
    let seed = env_u64("LIVEMIG_FUZZ_SEED").unwrap_or(0x6c69_7665_6d69_6721);
    let deadline = env_u64("LIVEMIG_FUZZ_SECS").map(|s| Instant::now() + Duration::from_secs(s));
    let iterations = env_u64("LIVEMIG_FUZZ_ITERS").unwrap_or(100_000);
    let mut rng = Rng(seed ^ name.len() as u64);
    let start = Instant::now();
    let mut tried = 0u64;
    let run = |input: &[u8]| {
        if std::panic::catch_unwind(|| target(input)).is_err() {
            let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-crash-{name}.bin"));
            std::fs::write(&path, input).unwrap();
            panic!("{name}: an input panicked; it is in {}", path.display());
        }
    };
    for s in &seeds {
        run(s);
        tried += 1;
    }
    loop {
        let done = match deadline {
            Some(d) => Instant::now() >= d,
            None => tried >= iterations,
        };
        if done {
            break;
        }
        let base = &seeds[rng.below(seeds.len())];
        let other = &seeds[rng.below(seeds.len())];
        run(&mutate(&mut rng, base, other));
        tried += 1;
    }
    println!("fuzz {name}: {tried} inputs in {:.1} s, seed {seed:#x}, no crash", start.elapsed().as_secs_f64());
    tried
}

fn target(name: &str) -> fn(&[u8]) {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).unwrap()
}

#[test]
fn fuzz_frame() {
    assert!(fuzz("frame", target("frame")) > 0);
}

#[test]
fn fuzz_handshake() {
    assert!(fuzz("handshake", target("handshake")) > 0);
}

#[test]
fn fuzz_state_blob() {
    assert!(fuzz("state_blob", target("state_blob")) > 0);
}

#[test]
fn fuzz_apply() {
    assert!(fuzz("apply", target("apply")) > 0);
}

/// The targets reject what they should: a check that cannot fail would make every run above pass.
#[test]
fn the_targets_catch_what_they_check() {
    // A Hello whose vCPU count is out of range must not decode; the frame target must still return.
    let mut hello = corpus("handshake").into_iter().next().unwrap();
    hello[12..16].copy_from_slice(&0u32.to_le_bytes());
    assert!(livemig::transport::wire::Hello::decode(&hello).is_err());
    target("frame")(&hello);
    // Every apply seed applies, and its table then describes memory; a flipped payload byte does not apply.
    for s in corpus("apply") {
        assert!(livemig::fuzz::applies(&s));
        let mut bad = s.clone();
        let last = bad.len() - 100;
        bad[last] ^= 1;
        assert!(!livemig::fuzz::applies(&bad));
    }
}

/// Writes the corpus from real frames: a Hello with a CPU model and MACs, the other handshake and control frames,
/// Pages frames with zero, raw, lz4 and zstd pages, and state blobs (synthetic, and KVM where `/dev/kvm` exists).
#[test]
#[ignore = "run by hand to make the corpus again"]
fn write_corpus() {
    use livemig::engine::encode::{page_hash, zero_page_hash, Codec, EncodedBatch, PageEntry};
    use livemig::engine::guest::{MemoryLayout, SyntheticGuest, Vcpus, TEXT_WORDS};
    use livemig::transport::wire::{self, Hello, Kind};

    let write = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::create_dir_all(corpus_dir(target)).unwrap();
        std::fs::write(corpus_dir(target).join(name), bytes).unwrap();
    };
    let frame = |kind: Kind, body: &[u8]| {
        let mut out = Vec::new();
        wire::write_frame(&mut out, kind, 0, 0, &[body]).unwrap();
        out
    };
    let mut pages = livemig::engine::dirty::Bitmap::new(64);
    pages.set(1);
    let hello = Hello {
        session: 0x1234_5678_9abc_def0,
        layout: MemoryLayout { regions: vec![(0, 32 * 4096), (1 << 32, 32 * 4096)] },
        vcpus: 2,
        guest_kind: "synthetic".into(),
        chunks: wire::chunk_map(&pages),
        cpu: Some(livemig::engine::cpu::host()),
        macs: vec![[0x52, 0x54, 0, 0x12, 0x34, 0x56]],
    };
    let mut dest = livemig::transport::dest::DestOptions::default().describe();
    dest.name = "destination".into();
    let bodies = [
        ("hello", Kind::Hello, hello.encode()),
        ("hello-ack", Kind::HelloAck, wire::HelloAck { session: hello.session, dest: dest.clone() }.encode()),
        (
            "link-hello",
            Kind::LinkHello,
            wire::LinkHello { session: hello.session, link: 3, proof: None }.encode().to_vec(),
        ),
    ];
    for (name, kind, body) in &bodies {
        write("handshake", name, body);
        write("frame", name, &frame(*kind, body));
    }
    write("frame", "ack", &frame(Kind::Ack, &wire::Ack { bytes: 524_320, pages: 128 }.encode()));
    let v = wire::Verify { full: true, table_root: 1, memory_root: 2 };
    write("frame", "verify", &frame(Kind::Verify, &v.encode()));
    write("frame", "abort", &frame(Kind::Abort, b"destination busy"));
    write("frame", "commit", &frame(Kind::Commit, &[]));
    // Pages: a zero page, a raw page, an lz4 page and two zstd pages, as a data link carries them.
    let text: Vec<u8> = TEXT_WORDS.iter().cycle().flat_map(|w| [w.as_bytes(), b" "].concat()).take(4096).collect();
    let raw: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    let lz = lz4_flex::block::compress(&text);
    let z = zstd::bulk::compress(&[text.clone(), raw.clone()].concat(), 3).unwrap();
    let entries = vec![
        PageEntry::new(0, Codec::Zero, 0, zero_page_hash()),
        PageEntry::new(1, Codec::Raw, 4096, page_hash(&raw)),
        PageEntry { live: true, ..PageEntry::new(2, Codec::Raw, 4096, page_hash(&raw)) },
        PageEntry::new(3, Codec::Lz4, livemig::engine::num::u32_len(lz.len()), page_hash(&text)),
        PageEntry::new(4, Codec::Zstd, 0, page_hash(&text)),
        PageEntry::new(5, Codec::Zstd, 0, page_hash(&raw)),
    ];
    let payload = [raw.clone(), raw.clone(), lz.clone(), z.clone()].concat();
    let batch = EncodedBatch::owned(1, entries, payload, livemig::engine::num::u32_len(z.len()));
    let mut table = Vec::new();
    wire::encode_entries(&batch, &mut table);
    let mut pages_frame = Vec::new();
    wire::write_pages(&mut pages_frame, 1, 9, &table, &[&batch.payload]).unwrap();
    write("frame", "pages", &pages_frame);
    write("apply", "pages-epoch-1", &[&1u32.to_le_bytes()[..], &pages_frame].concat());
    let one = EncodedBatch::owned(0, vec![PageEntry::new(7, Codec::Raw, 4096, page_hash(&raw))], raw.clone(), 0);
    wire::encode_entries(&one, &mut table);
    let mut raw_frame = Vec::new();
    wire::write_pages(&mut raw_frame, 0, 1, &table, &[&one.payload]).unwrap();
    write("apply", "one-raw-page", &[&0u32.to_le_bytes()[..], &raw_frame].concat());
    // State blobs.
    let src = SyntheticGuest::new(&livemig::engine::guest::SyntheticConfig {
        memory_bytes: 1 << 20,
        vcpus: 2,
        ..Default::default()
    })
    .unwrap();
    src.vcpus().pause();
    let blob = src.vcpus().save_state().unwrap();
    write("state_blob", "synthetic-2-vcpus", &blob);
    write("frame", "vcpu-state", &frame(Kind::VcpuState, &blob));
    let device = livemig::engine::guest::DeviceSection { name: "virtio-net0".into(), version: 2, data: vec![7; 64] };
    write("frame", "device-state", &frame(Kind::DeviceState, &wire::encode_device(&device)));
    #[cfg(feature = "test-guest")]
    if std::path::Path::new("/dev/kvm").exists() {
        let g = livemig::kvm::KvmGuest::new(&livemig::kvm::KvmConfig {
            memory_bytes: 4 << 20,
            touched_pct: 10.0,
            dirty_rate: 0,
            hot_set_pct: 10.0,
            dirty_log: livemig::kvm::DirtyLogMethod::GetLog,
            cpu_model: None,
        })
        .unwrap();
        use livemig::engine::guest::Guest;
        g.vcpus().pause();
        write("state_blob", "kvm", &g.vcpus().save_state().unwrap());
    }
    let _ = SyntheticGuest::destination(&MemoryLayout { regions: vec![(0, 4096)] }, 1);
}
