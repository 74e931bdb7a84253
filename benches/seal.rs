//! The record layer on one core: GB/s of plaintext sealed (gathered from page-sized pieces, as a frame's iovecs are)
//! and opened into page-sized buffers, with AES-256-GCM from ring. docs/benchmarks.md quotes
//! `cargo bench --bench seal`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig::transport::tls::channel::{DirectionKey, Opener, Sealer};
use std::io::{IoSlice, IoSliceMut};

fn seal_open(c: &mut Criterion) {
    // One batch: 128 pages of 4 KiB.
    let pages: Vec<Vec<u8>> = (0..128u8).map(|i| vec![i; 4096]).collect();
    let parts: Vec<IoSlice<'_>> = pages.iter().map(|p| IoSlice::new(p)).collect();
    let key = DirectionKey::from_material(&[9u8; 36]);
    let mut g = c.benchmark_group("records_1core");
    g.throughput(Throughput::Bytes(128 * 4096));
    let mut sealer = Sealer::new(&key);
    let mut wire = Vec::with_capacity(1 << 20);
    g.bench_function("seal_512KiB", |b| {
        b.iter(|| {
            wire.clear();
            sealer.write_all_parts(&mut wire, &parts).unwrap();
        })
    });
    // Open a stream of sealed batches into page buffers, as the destination reads pages into guest memory.
    let (mut s, batches) = (Sealer::new(&key), 64);
    let mut stream = Vec::new();
    for _ in 0..batches {
        s.write_all_parts(&mut stream, &parts).unwrap();
    }
    let mut out: Vec<Vec<u8>> = vec![vec![0u8; 4096]; 128];
    g.bench_function("open_512KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let mut o = Opener::new(&key);
                let mut r = &stream[..];
                let t = std::time::Instant::now();
                for _ in 0..batches.min(livemig::engine::num::usize_from(iters - done)) {
                    let mut bufs: Vec<IoSliceMut<'_>> = out.iter_mut().map(|p| IoSliceMut::new(p)).collect();
                    let mut bufs = &mut bufs[..];
                    while !bufs.is_empty() {
                        let n = o.read_vectored_from(&mut r, bufs).unwrap();
                        IoSliceMut::advance_slices(&mut bufs, n);
                    }
                    done += 1;
                }
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, seal_open);
criterion_main!(benches);
