//! `--max-bandwidth`: one cap over all links together, which the links share.

use livemig::engine::guest::{SyntheticConfig, SyntheticGuest};
use livemig::engine::precopy::PrecopyConfig;
use livemig::loopback::migrate_loopback;
use livemig::transport::dest::DestOptions;
use livemig::transport::source::SourceOptions;
use livemig::transport::tls::SecurityPair;

#[test]
fn a_cap_holds_over_all_links_together_and_each_link_carries_its_share() {
    // 48 MiB, three quarters touched and uncompressed, over two loopback links (each could carry gigabits) capped
    // at 200 Mbit/s together.
    let g = SyntheticGuest::new(&SyntheticConfig { memory_bytes: 48 << 20, ..Default::default() }).unwrap();
    let cap = 25_000_000u64;
    let precopy = PrecopyConfig { max_bandwidth: Some(cap), ..Default::default() };
    let opts = SourceOptions { precopy, compress: false, ..Default::default() };
    let run = migrate_loopback(&g, 2, &opts, &DestOptions::default(), &SecurityPair::insecure(), &|_| {}).unwrap();
    run.source.result.as_ref().unwrap();
    let r0 = &run.source.rounds[0].stats;
    let rate = r0.bytes_on_wire as f64 / r0.duration.as_secs_f64();
    println!("round 0: {:.1} Mbit/s under a 200 Mbit/s cap", rate * 8.0 / 1e6);
    // A 20 ms burst allowance and the first frames' slots at once keep it a little over on a short round.
    assert!(rate <= cap as f64 * 1.1, "round 0 ran at {rate:.0} B/s over a cap of {cap}");
    assert!(rate >= cap as f64 * 0.5, "round 0 ran at {rate:.0} B/s, far under the cap of {cap}");
    for l in &run.source.links {
        assert!(l.bytes_on_wire > 4 << 20, "a link was left out of the cap's share: {l:?}");
    }
}

#[test]
fn a_cap_lifted_mid_flight_and_a_cancel_take_effect_while_the_migration_runs() {
    use livemig::transport::source::{Change, Controls, MigrateError};
    use std::sync::Arc;
    use std::time::Duration;
    let g = SyntheticGuest::new(&SyntheticConfig { memory_bytes: 48 << 20, ..Default::default() }).unwrap();
    // 50 Mbit/s would take round 0 about 6 s; the cap is lifted after 300 ms.
    let cap = 6_250_000u64;
    let controls = Arc::new(Controls::default());
    let precopy = PrecopyConfig { max_bandwidth: Some(cap), ..Default::default() };
    let opts = SourceOptions { precopy, compress: false, controls: Some(controls.clone()), ..Default::default() };
    let run = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            controls.push(Change::MaxBandwidth(None)).unwrap();
        });
        migrate_loopback(&g, 1, &opts, &DestOptions::default(), &SecurityPair::insecure(), &|_| {}).unwrap()
    });
    run.source.result.as_ref().unwrap();
    let r0 = &run.source.rounds[0].stats;
    let rate = r0.bytes_on_wire as f64 / r0.duration.as_secs_f64();
    assert!(rate > 3.0 * cap as f64, "round 0 at {rate:.0} B/s: the lifted cap still held");

    // A cancel from another thread mid-round: the source keeps its guest, running and unthrottled.
    let g = SyntheticGuest::new(&SyntheticConfig { memory_bytes: 48 << 20, dirty_rate: 5000, ..Default::default() })
        .unwrap();
    let precopy = PrecopyConfig { max_bandwidth: Some(cap), ..Default::default() };
    let opts = SourceOptions { precopy, controls: Some(controls.clone()), ..Default::default() };
    let run = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            controls.cancel("operator");
        });
        migrate_loopback(&g, 1, &opts, &DestOptions::default(), &SecurityPair::insecure(), &|_| {}).unwrap()
    });
    assert!(
        matches!(&run.source.result, Err(MigrateError::Cancelled(r)) if r == "operator"),
        "{:?}",
        run.source.result
    );
    let v = livemig::engine::guest::Guest::vcpus(&g);
    assert!(!v.is_paused() && v.throttle() == 0.0, "the source guest was not left running unthrottled");
    let Err(e) = run.dest else { panic!("the destination ran a cancelled migration") };
    assert!(e.to_string().contains("cancelled: operator"), "{e}");
}
