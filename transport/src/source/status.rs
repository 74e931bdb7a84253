//! What the driver tells whoever watches the migration: progress per round, the status and its phase, and the
//! per-link byte timeline the report and `--plot` draw.

use super::controls::MigrationEvent;
use super::driver::{Driver, TIMELINE_EVERY};
use super::Progress;
use std::sync::atomic::Ordering;

impl Driver<'_> {
    /// Records each link's wire bytes so far, every [`TIMELINE_EVERY`] (or now, with `force`).
    pub(super) fn sample_links(&mut self, force: bool) {
        let t = self.start.elapsed().as_secs_f64();
        let due = self.timeline.last().is_none_or(|(last, _)| t - last >= TIMELINE_EVERY.as_secs_f64());
        if force || due {
            let bytes: Vec<u64> = self.stripe.links.iter().map(|l| l.written()).collect();
            let total = self.control_written.load(Ordering::Relaxed) + bytes.iter().sum::<u64>();
            self.timeline.push((t, bytes));
            self.publish_status(total);
        }
    }

    /// Tells the embedder how far round `epoch` has got.
    pub(super) fn report_progress(&mut self, epoch: u32, round_pages: u64, round_pages_done: u64, rate_bps: f64) {
        let bytes_on_wire =
            self.control_written.load(Ordering::Relaxed) + self.stripe.links.iter().map(|l| l.written()).sum::<u64>();
        (self.progress)(&Progress { epoch, round_pages, round_pages_done, bytes_on_wire, rate_bps });
        self.remaining_pages = round_pages.saturating_sub(round_pages_done);
        self.publish_status(bytes_on_wire);
    }

    /// Publishes how the migration stands to whoever holds its controls, and a change of phase as an event.
    pub(super) fn publish_status(&mut self, bytes_on_wire: u64) {
        let Some(controls) = self.opts.controls.as_ref() else { return };
        let remaining_pages = self.remaining_pages;
        let phase = if self.error.is_some() || self.finished {
            "done"
        } else if self.machine.in_precopy() {
            "precopy"
        } else if self.pc.network_down.is_some() || self.pc.lost.is_some() {
            "postcopy-paused"
        } else if self.machine.switched_at().is_some() {
            "postcopy"
        } else {
            "switchover"
        };
        if phase != self.phase {
            self.phase = phase;
            controls.emit(MigrationEvent::Phase(phase));
        }
        let eta = self.machine.eta(remaining_pages).map(|d| d.as_secs_f64());
        let m = &self.machine;
        let failed = |i: usize| self.stripe.links[i].is_failed();
        let link_throughput_bps =
            self.link_rates.iter().enumerate().map(|(i, r)| if failed(i) { 0.0 } else { r.rate().unwrap_or(0.0) });
        controls.publish(super::controls::Status {
            phase,
            round: m.epoch(),
            remaining_pages,
            dirty_rate_pps: m.dirty_rate().unwrap_or(0.0),
            throughput_bps: m.measured_bandwidth().unwrap_or(0.0),
            predicted_downtime_ms: m.last_prediction().map(|d| d.as_secs_f64() * 1e3),
            throttle_pct: m.throttle(),
            eta_s: eta,
            bytes_on_wire,
            downtime_target_ms: m.config().downtime_target.as_secs_f64() * 1e3,
            max_bandwidth: m.config().max_bandwidth,
            max_throttle_pct: m.config().max_throttle,
            link_throughput_bps: link_throughput_bps.collect(),
        });
    }
}
