//! Bitmap scan: GB/s of guest memory covered, for the dirty-bitmap shapes a migration meets. docs/benchmarks.md
//! quotes `cargo bench --bench scan`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use livemig::engine::dirty::{scan_parallel, Bitmap};

const PAGES: u64 = (2u64 << 30) / 4096; // a 2 GiB guest

fn bitmaps() -> Vec<(&'static str, Bitmap)> {
    let mut sparse = Bitmap::new(PAGES);
    let mut hot = Bitmap::new(PAGES);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..PAGES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(1000) {
            sparse.set(i); // 0.1 % scattered: a late pre-copy round
        }
        if i < PAGES / 10 && !x.is_multiple_of(4) {
            hot.set(i); // 75 % of a 10 % hot set: the dirty scenario
        }
    }
    let mut touched = Bitmap::new(PAGES);
    for i in 0..PAGES * 3 / 4 {
        touched.set(i); // round 0 of the reference guest
    }
    vec![("empty", Bitmap::new(PAGES)), ("sparse", sparse), ("hot-set", hot), ("round0", touched)]
}

fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan_2GiB");
    g.throughput(Throughput::Bytes(PAGES * 4096));
    for (name, bm) in bitmaps() {
        for workers in [1usize, 2] {
            g.bench_with_input(BenchmarkId::new(name, workers), &bm, |b, bm| {
                b.iter(|| {
                    let counts = scan_parallel(bm, workers, |_| 0u64, |n, run| *n += run.count);
                    assert_eq!(counts.iter().sum::<u64>(), bm.count_ones());
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);
