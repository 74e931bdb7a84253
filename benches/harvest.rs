//! Harvest cost of each KVM dirty-log method on a 2 GiB guest (75 % filled) whose vCPU writes 20000 pages/s over
//! 10 % of its RAM.
//! docs/benchmarks.md quotes `cargo bench --bench harvest`. Prints a skip where /dev/kvm is missing.

use criterion::{criterion_group, criterion_main, Criterion};
use livemig::engine::dirty::Bitmap;
use livemig::engine::guest::{DirtyLog, GuestMemory};
use livemig::kvm::{available, DirtyLogMethod, KvmConfig, KvmGuest};

fn harvest(c: &mut Criterion) {
    if !available() {
        eprintln!("SKIP harvest bench: /dev/kvm is not available");
        return;
    }
    let mut g = c.benchmark_group("kvm_harvest_2GiB");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    for (name, method) in [("get_dirty_log", DirtyLogMethod::GetLog), ("get_then_clear", DirtyLogMethod::ManualClear)] {
        let guest = KvmGuest::new(&KvmConfig {
            memory_bytes: 2 << 30,
            touched_pct: 75.0,
            dirty_rate: 20_000,
            hot_set_pct: 10.0,
            dirty_log: method,
            cpu_model: None,
        })
        .unwrap();
        // Measure in steady state: after the guest's first self-check has faulted its hot set in.
        while guest.reports().checks_ok.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut bm = Bitmap::new(guest.total_pages());
        g.bench_function(format!("{name}/back_to_back"), |b| {
            b.iter(|| {
                guest.harvest(&mut bm).unwrap();
            })
        });
        // A harvest after 100 ms of guest writes (about 2000 pages to fetch and protect again); the wait is not timed.
        g.bench_function(format!("{name}/after_100ms"), |b| {
            b.iter_custom(|iters| {
                let (mut total, mut pages) = (std::time::Duration::ZERO, 0);
                for _ in 0..iters {
                    guest.harvest(&mut bm).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    let mut fresh = Bitmap::new(guest.total_pages());
                    let t = std::time::Instant::now();
                    guest.harvest(&mut fresh).unwrap();
                    total += t.elapsed();
                    pages += fresh.count_ones();
                }
                // A window can fall into one of the guest's self-checks (about 100 ms without writes every 5 s).
                assert!(pages / iters > 500, "only {} pages dirty per 100 ms on average", pages / iters);
                total
            })
        });
        assert!(guest.failure().is_none(), "{:?}", guest.failure());
        assert!(bm.count_ones() > 0, "the guest dirtied nothing");
    }
    g.finish();
}

criterion_group!(benches, harvest);
criterion_main!(benches);
