//! Page encoding on one core: GB/s of guest memory turned into batches, on the reference page mix
//! (docs/interfaces.md). docs/benchmarks.md quotes `cargo bench --bench encode`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livemig::engine::dirty::PageRun;
use livemig::engine::encode::{
    BatchCodec, BatchEncoder, BatchSink, EncodedBatch, HashTable, SendPath, SendPolicy, BATCH_PAGES,
};
use livemig::engine::guest::{GuestMemory, SyntheticConfig, SyntheticGuest};
use std::sync::Mutex;

/// Drops batches back into a pool, as the link does after writing them.
struct Recycle(Mutex<Vec<EncodedBatch>>);

impl BatchSink for Recycle {
    fn submit(&self, batch: EncodedBatch) -> bool {
        self.0.lock().unwrap().push(batch);
        true
    }
    fn take_buffer(&self) -> EncodedBatch {
        self.0.lock().unwrap().pop().unwrap_or_else(|| EncodedBatch::with_capacity(BATCH_PAGES))
    }
}

fn encode(c: &mut Criterion) {
    // 256 MiB, all touched: the mix is a quarter zero, a quarter text, half random.
    let guest =
        SyntheticGuest::new(&SyntheticConfig { memory_bytes: 256 << 20, touched_pct: 100.0, ..Default::default() })
            .unwrap();
    let pages = guest.total_pages();
    let hashes = HashTable::new(pages);
    let sink = Recycle(Mutex::new(Vec::new()));
    let mut g = c.benchmark_group("encode_mix_1core");
    g.throughput(Throughput::Bytes(pages * 4096));
    g.sample_size(10);
    // "copy": raw pages copied into the batch; "in_place": raw pages left in guest memory for the vectored and
    // zero-copy paths (hashed where they lie); "lz4" and "zstd": every compressible page compressed.
    let cases = [
        ("copy", SendPolicy::pinned(BatchCodec::None, SendPath::Copy)),
        ("in_place", SendPolicy::pinned(BatchCodec::None, SendPath::Vectored)),
        ("lz4", SendPolicy::pinned(BatchCodec::Lz4, SendPath::Vectored)),
        ("zstd", SendPolicy::pinned(BatchCodec::Zstd, SendPath::Vectored)),
    ];
    for (name, policy) in cases {
        g.bench_function(BenchmarkId::new(name, pages), |b| {
            b.iter(|| {
                let mut enc = BatchEncoder::new(&guest, &hashes, &policy, &sink, 0);
                enc.push_run(PageRun { first: 0, count: pages }).unwrap();
                enc.flush().unwrap();
                assert_eq!(enc.counts.total(), pages);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
