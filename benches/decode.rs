//! The receiving side on one core: frame parsing (header, checksum, entry table) and page apply (decode, hash check,
//! copy into guest memory) for batches of the reference page mix, raw, lz4 and zstd. docs/benchmarks.md quotes
//! `cargo bench --bench decode`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livemig::engine::dirty::PageRun;
use livemig::engine::encode::{BatchCodec, BatchEncoder, HashTable, SendPath, SendPolicy};
use livemig::engine::guest::{GuestMemory, MemoryLayout, SyntheticConfig, SyntheticGuest};
use livemig::engine::receive::{ApplyState, Receiver};
use livemig::transport::wire;
use std::sync::Mutex;

/// 64 MiB of the page mix, all touched, encoded with `codec` (pages copied, so payloads are self-contained), as
/// serialized Pages frames.
fn frames(guest: &SyntheticGuest, codec: BatchCodec) -> Vec<Vec<u8>> {
    let pages = guest.total_pages();
    let hashes = HashTable::new(pages);
    let policy = SendPolicy::pinned(codec, SendPath::Copy);
    let sink = Mutex::new(Vec::new());
    let mut enc = BatchEncoder::new(guest, &hashes, &policy, &sink, 0);
    enc.push_run(PageRun { first: 0, count: pages }).unwrap();
    enc.flush().unwrap();
    let mut table = Vec::new();
    sink.into_inner()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(seq, b)| {
            wire::encode_entries(b, &mut table);
            // SAFETY: `guest` outlives every batch made here.
            let parts: Vec<&[u8]> = unsafe { b.part_slices() }.collect();
            let mut out = Vec::new();
            wire::write_pages(&mut out, 0, livemig::engine::num::u32_len(seq), &table, &parts).unwrap();
            out
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let guest =
        SyntheticGuest::new(&SyntheticConfig { memory_bytes: 64 << 20, touched_pct: 100.0, ..Default::default() })
            .unwrap();
    let layout = MemoryLayout { regions: vec![(0, 64 << 20)] };
    let dest = SyntheticGuest::destination(&layout, 1).unwrap();
    let bytes = guest.total_pages() * 4096;

    let mut parse = c.benchmark_group("frame_parse");
    let raw = frames(&guest, BatchCodec::None);
    parse.throughput(Throughput::Elements(raw.len() as u64));
    // What the receiver does before any payload byte: parse the header, check the checksum over the entry table, and
    // decode and bound-check the table (128 entries).
    parse.bench_function("header_checksum_table", |b| {
        let mut entries = Vec::new();
        b.iter(|| {
            for f in &raw {
                let (head, h) = wire::read_header(&mut &f[..]).unwrap();
                let table = &f[wire::HEADER_LEN..wire::HEADER_LEN + h.checked_len as usize];
                wire::check_sum(&head, &h, table).unwrap();
                wire::decode_table(&h, table, &mut entries).unwrap();
            }
        })
    });
    parse.finish();

    let mut g = c.benchmark_group("apply_mix_1core");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    for (name, codec) in [("raw", BatchCodec::None), ("lz4", BatchCodec::Lz4), ("zstd", BatchCodec::Zstd)] {
        let fs = frames(&guest, codec);
        g.bench_function(BenchmarkId::new(name, bytes >> 20), |b| {
            let rx = Receiver::new(&dest);
            let (mut body, mut entries, mut st) = (Vec::new(), Vec::new(), ApplyState::default());
            b.iter(|| {
                for f in &fs {
                    let h = wire::read_frame(&mut &f[..], &mut body).unwrap();
                    let p = wire::decode_pages(&h, &body, &mut entries).unwrap();
                    rx.apply_frame(h.epoch, &entries, p.entries, p.zstd, &mut st).unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
