//! The JSON report (docs/interfaces.md), built from the drivers' reports, and the terminal table.

use livemig_engine::encode::PageCounts;
use livemig_engine::receive::postcopy::PostcopyStats;
use livemig_transport::source::{MigrateError, SourceReport, VerifyMode};
use serde::{Deserialize, Serialize};

/// The guest part of the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestInfo {
    /// "synthetic" or "kvm".
    pub kind: String,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Always 4096.
    pub page_size: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// Pages by kind.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Pages {
    /// All pages sent, zero markers included.
    pub sent: u64,
    /// Zero pages (markers).
    pub zero: u64,
    /// Compressed pages, either codec.
    pub compressed: u64,
    /// Raw pages.
    pub raw: u64,
    /// Of the compressed pages, lz4 ones (an addition).
    pub lz4: u64,
    /// Of the compressed pages, zstd ones (an addition).
    pub zstd: u64,
}

impl From<PageCounts> for Pages {
    fn from(c: PageCounts) -> Self {
        Pages { sent: c.total(), zero: c.zero, compressed: c.compressed(), raw: c.raw, lz4: c.lz4, zstd: c.zstd }
    }
}

/// One round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    /// Round number.
    pub index: u32,
    /// Pages sent in the round.
    pub dirty_pages: u64,
    /// Wire bytes of the round.
    pub bytes_on_wire: u64,
    /// Seconds from the round's start to its last acknowledgement.
    pub duration_s: f64,
    /// vCPU throttle during the round.
    pub throttle_pct: f64,
    /// Pages by codec (an addition).
    pub pages: Pages,
    /// True for the stop-and-copy round (an addition).
    pub last: bool,
    /// Wire bytes per link, in link order (an addition).
    pub link_bytes: Vec<u64>,
}

/// One link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Link {
    /// Local > remote.
    pub name: String,
    /// Bytes written to it.
    pub bytes_on_wire: u64,
    /// Average throughput, bits per second.
    pub throughput_bps: f64,
    /// Whether it failed.
    pub failed: bool,
    /// Why it failed (an addition).
    pub error: Option<String>,
    /// `sendmsg(MSG_ZEROCOPY)` calls (an addition).
    pub zerocopy_sends: u64,
    /// Of those, the ones the kernel reported it copied after all (an addition).
    pub zerocopy_copied: u64,
    /// Why zero-copy was not used when asked for (an addition).
    pub zerocopy_error: Option<String>,
}

impl Downtime {
    /// Where the pause went, for the table: each part in milliseconds, the devices' only when there are some. After a
    /// post-copy switch: the state, and the switch (the missing pages the pause added, and the destination's resume).
    fn parts(&self, postcopy: bool) -> String {
        if postcopy {
            // The last pages come after the resume, and the switch stands where the commit would.
            return format!(
                "vCPU state {:.1}, switch {:.1}",
                self.vcpu_state_ms + self.device_state_ms,
                self.commit_ms
            );
        }
        let devices = if self.device_sections.is_empty() {
            String::new()
        } else {
            let bytes: u64 = self.device_sections.iter().map(|x| x.bytes).sum();
            format!(" devices {:.1} ({} sections, {bytes} bytes),", self.device_state_ms, self.device_sections.len())
        };
        format!(
            "last pages {:.1},{devices} vCPU state {:.1}, verify {:.1}, commit {:.1}; predicted {}",
            self.last_pages_ms,
            self.vcpu_state_ms,
            self.verification_ms,
            self.commit_ms,
            self.predicted_ms.map_or("-".into(), |x| format!("{x:.1}"))
        )
    }
}

/// One device's state section as the report lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSection {
    /// The device.
    pub name: String,
    /// Its format's version.
    pub version: u32,
    /// Its size.
    pub bytes: u64,
}

/// Where the pause went, in milliseconds (an addition).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Downtime {
    /// Final harvest and last dirty pages.
    pub last_pages_ms: f64,
    /// Saving and sending the devices' state (0 for a guest without devices).
    #[serde(default)]
    pub device_state_ms: f64,
    /// The devices' state sections: name, version and bytes of each.
    #[serde(default)]
    pub device_sections: Vec<DeviceSection>,
    /// vCPU state (and the destination restoring devices and vCPUs).
    pub vcpu_state_ms: f64,
    /// Digest comparison.
    pub verification_ms: f64,
    /// Commit round trip; after a post-copy switch, the switch (the last missing pages named, the destination's
    /// resume and its answer), while the verification comes after the resume and is not part of the downtime.
    pub commit_ms: f64,
    /// What the controller predicted when it stopped pre-copy.
    pub predicted_ms: Option<f64>,
}

/// How a migration ended, as the report names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The destination runs the guest, verified.
    Completed,
    /// It failed: before Commit the source runs on; see `outcome_unknown` for after.
    Failed,
    /// It was called off (the target could not be met, or the pause bound passed); the source runs on.
    Cancelled,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        })
    }
}

/// The report (docs/interfaces.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// How it ended.
    pub status: Status,
    /// The one-line reason when not completed (or, on a destination that runs the guest, why the source may not know).
    pub error: Option<String>,
    /// True when the commit's outcome is unknown (an addition): the source sent Commit and heard nothing back, or the
    /// destination runs the guest but could not say so. Exit status 3: an operator must find which side runs it.
    pub outcome_unknown: bool,
    /// Destination memory digest equals the source's at switchover.
    pub verified: bool,
    /// "tables" or "full" (an addition).
    pub verify_mode: String,
    /// The guest.
    pub guest: GuestInfo,
    /// Seconds from migration start to the destination resumed.
    pub total_time_s: f64,
    /// From source pause to destination resume, in ms; null when the migration did not switch over (or on the
    /// destination, which cannot see the source's pause).
    pub downtime_ms: Option<f64>,
    /// The target.
    pub downtime_target_ms: f64,
    /// The parts of the downtime (an addition).
    pub downtime_parts: Option<Downtime>,
    /// Payload and framing bytes written to sockets, all links together.
    pub bytes_on_wire: u64,
    /// Pages by kind.
    pub pages: Pages,
    /// Per round.
    pub rounds: Vec<Round>,
    /// Per link.
    pub links: Vec<Link>,
    /// Highest throttle.
    pub max_throttle_pct: f64,
    /// The source's vCPUs as read back from the guest after the run (an addition): stopped for good after a handover,
    /// running and unthrottled after a failure or cancel.
    pub source_vcpus_after: Option<VcpuState>,
    /// The send path in use at the end: "copy", "vectored", "zerocopy" or "uring" (an addition).
    pub send_path: String,
    /// CPU seconds (user and system) of the reporting process during the migration (an addition).
    pub cpu_seconds: f64,
    /// Socket requests this side's io_uring completed: 0 unless the links went through one (`--send-path uring`,
    /// `receive --recv-path uring`; an addition).
    #[serde(default)]
    pub uring_requests: u64,
    /// Per-link wire bytes over time: seconds since the start, cumulative bytes per link (an addition; `--plot`
    /// draws it).
    pub timeline: Vec<(f64, Vec<u64>)>,
    /// How the connections were secured.
    pub security: Security,
    /// What the migration cost in memory on the reporting host (an addition).
    pub memory: Option<Memory>,
    /// What the guest got done while it migrated (the source's report), so that runs with different convergence
    /// choices can be compared on it.
    #[serde(default)]
    pub guest_progress: Option<GuestProgress>,
    /// Post-copy's figures; null when the migration did not switch to it.
    #[serde(default)]
    pub postcopy: Option<Postcopy>,
}

/// What post-copy did (docs/interfaces.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Postcopy {
    /// Seconds from the migration's start to the destination running the guest.
    pub switched_at_s: f64,
    /// Faults on missing pages, each asked of the source once.
    pub faults: u64,
    /// From a fault's arrival at the destination to its page placed, microseconds.
    pub fault_latency_us: Latency,
    /// Pages sent in answer to faults (the urgent path).
    pub pages_pulled: u64,
    /// Pages the background push sent.
    pub pages_pushed: u64,
    /// Faults on zero pages, placed by the destination alone (an addition).
    pub zero_faults: u64,
    /// Fault latency histogram: (upper bound in microseconds, faults), powers of two (an addition; `--plot` draws
    /// it).
    pub fault_latency_histogram: Vec<(u64, u64)>,
    /// Connections the source dialled again after post-copy lost them: the control connection and data links, each
    /// time (an addition; 0 on the destination's own report).
    #[serde(default)]
    pub reconnects: u64,
}

/// Latency percentiles.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Postcopy {
    /// From the source's figures (and the destination's, which it sent before its verdict).
    pub fn from_source(p: &livemig_transport::source::PostcopyReport) -> Postcopy {
        let d = p.destination.clone().unwrap_or_default();
        Postcopy {
            pages_pulled: p.pages_pulled,
            pages_pushed: p.pages_pushed,
            reconnects: p.reconnects,
            ..Postcopy::from_destination(&d, p.pages_pulled, p.switched_at)
        }
    }

    /// From the destination's own figures: it sees the faults, and which pages came on the urgent path (the push is
    /// what else it placed).
    pub fn from_destination(s: &PostcopyStats, pulled: u64, switched_at: std::time::Duration) -> Postcopy {
        Postcopy {
            switched_at_s: switched_at.as_secs_f64(),
            faults: s.faults,
            fault_latency_us: Latency { p50: s.latency_us[0], p99: s.latency_us[1], max: s.latency_us[2] },
            pages_pulled: pulled,
            pages_pushed: s.placed.saturating_sub(pulled),
            zero_faults: s.zero_faults,
            fault_latency_histogram: histogram(&s.histogram),
            reconnects: 0,
        }
    }

    /// The report's lines for a terminal.
    pub fn lines(&self) -> String {
        let l = &self.fault_latency_us;
        format!(
            "post-copy   switched at {:.3} s; {} faults (latency p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs), {} zero \
             pages placed here; {} pages pulled, {} pushed{}\n",
            self.switched_at_s,
            self.faults,
            l.p50,
            l.p99,
            l.max,
            self.zero_faults,
            self.pages_pulled,
            self.pages_pushed,
            match self.reconnects {
                0 => String::new(),
                n => format!("; {n} connections reconnected"),
            }
        )
    }
}

/// Non-empty histogram buckets as (upper bound in µs, count).
fn histogram(counts: &[u64]) -> Vec<(u64, u64)> {
    counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, &c)| (1u64 << i, c)).collect()
}

/// The guest's own progress during the migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GuestProgress {
    /// Pages the guest's vCPUs wrote from the start of the migration to its end: on the source until the pause, and
    /// after a post-copy switch on the destination too, until the last page arrived.
    pub pages_written_during_migration: u64,
}

/// Memory on the reporting host: the process's peak against the guest memory it holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    /// The process's peak resident set (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// Guest memory resident at the end: the populated pages of the guest (both guests for `demo`, whose one process
    /// holds both sides).
    pub guest_resident_bytes: u64,
    /// The difference: what the migration, the process and its libraries needed beside the guest.
    pub overhead_bytes: u64,
    /// Of that, the per-page tables (page hashes; at the destination also page epochs), allocated per chunk of
    /// written pages, so that untouched memory costs none.
    pub page_tables_bytes: u64,
}

impl Memory {
    /// Measures the process's peak now, beside the resident pages of `guests`.
    pub fn measure(guests: &[&dyn livemig_engine::guest::GuestMemory], page_tables_bytes: u64) -> Memory {
        let peak_rss_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kib| kib << 10);
        let guest_resident_bytes = guests
            .iter()
            .flat_map(|g| g.regions())
            .filter_map(|r| livemig_engine::guest::resident_pages(r).ok())
            .map(|b| b.count_ones() * livemig_engine::guest::PAGE_SIZE as u64)
            .sum();
        Memory {
            peak_rss_bytes,
            guest_resident_bytes,
            overhead_bytes: peak_rss_bytes.saturating_sub(guest_resident_bytes),
            page_tables_bytes,
        }
    }
}

/// The report's `security` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Security {
    /// "mtls" or "insecure".
    pub mode: String,
    /// What encrypts the data, when anything does.
    pub cipher: Option<String>,
    /// The peer certificate's subject, when authenticated.
    pub peer: Option<String>,
}

impl From<&livemig_transport::tls::SecurityInfo> for Security {
    fn from(s: &livemig_transport::tls::SecurityInfo) -> Self {
        Security { mode: s.mode.to_string(), cipher: s.cipher.clone(), peer: s.peer.clone() }
    }
}

/// vCPU state read back from a guest.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct VcpuState {
    /// Whether they are paused.
    pub paused: bool,
    /// Their throttle, percent.
    pub throttle_pct: f64,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Report {
    /// The source's report.
    pub fn from_source(r: &SourceReport, guest: GuestInfo, target_ms: f64, verify: VerifyMode) -> Report {
        Report {
            status: match r.status() {
                "completed" => Status::Completed,
                "cancelled" => Status::Cancelled,
                _ => Status::Failed,
            },
            error: r.result.as_ref().err().map(|e| e.to_string()),
            outcome_unknown: matches!(r.result, Err(MigrateError::OutcomeUnknown(_))),
            verified: r.verified,
            verify_mode: match verify {
                VerifyMode::Tables => "tables",
                VerifyMode::Full => "full",
            }
            .to_string(),
            guest,
            total_time_s: r.total_time.as_secs_f64(),
            downtime_ms: r.downtime.map(ms),
            downtime_target_ms: target_ms,
            downtime_parts: r.downtime.map(|_| Downtime {
                last_pages_ms: ms(r.downtime_parts.last_pages),
                device_state_ms: ms(r.downtime_parts.device_state),
                device_sections: r
                    .device_sections
                    .iter()
                    .map(|(name, version, bytes)| DeviceSection {
                        name: name.clone(),
                        version: *version,
                        bytes: *bytes,
                    })
                    .collect(),
                vcpu_state_ms: ms(r.downtime_parts.vcpu_state),
                verification_ms: ms(r.downtime_parts.verification),
                commit_ms: ms(r.downtime_parts.commit),
                predicted_ms: r.predicted_downtime.map(ms),
            }),
            bytes_on_wire: r.bytes_on_wire,
            pages: r.pages.into(),
            rounds: r
                .rounds
                .iter()
                .map(|x| Round {
                    index: x.stats.index,
                    dirty_pages: x.stats.dirty_pages,
                    bytes_on_wire: x.stats.bytes_on_wire,
                    duration_s: x.stats.duration.as_secs_f64(),
                    throttle_pct: x.throttle_pct,
                    pages: x.counts.into(),
                    last: x.stats.last,
                    link_bytes: x.link_bytes.clone(),
                })
                .collect(),
            links: r
                .links
                .iter()
                .map(|l| Link {
                    name: l.name.clone(),
                    bytes_on_wire: l.bytes_on_wire,
                    throughput_bps: l.throughput_bps * 8.0,
                    failed: l.failed,
                    error: l.error.clone(),
                    zerocopy_sends: l.zerocopy.sends,
                    zerocopy_copied: l.zerocopy.copied,
                    zerocopy_error: l.zerocopy_error.clone(),
                })
                .collect(),
            max_throttle_pct: r.max_throttle_pct,
            source_vcpus_after: None,
            send_path: r.send_path.name().to_string(),
            cpu_seconds: r.cpu_seconds,
            uring_requests: r.uring_requests,
            timeline: r.timeline.clone(),
            security: Security::from(&r.security),
            memory: None,
            guest_progress: None,
            postcopy: r.postcopy.as_ref().map(Postcopy::from_source),
        }
    }

    /// The per-round table and the summary, for a terminal.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = self.rounds_table();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "status      {}{}",
            self.status,
            self.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
        );
        let _ = writeln!(s, "verified    {} ({})", self.verified, self.verify_mode);
        let _ = writeln!(s, "total time  {:.3} s", self.total_time_s);
        if let (Some(d), Some(p)) = (self.downtime_ms, &self.downtime_parts) {
            let _ = writeln!(
                s,
                "downtime    {d:.1} ms (target {:.0}; {})",
                self.downtime_target_ms,
                p.parts(self.postcopy.is_some())
            );
        }
        if let Some(v) = self.source_vcpus_after {
            let _ = writeln!(
                s,
                "source vCPUs {}, throttle {:.0}% (max during the run {:.0}%){}",
                if v.paused { "stopped (handed over)" } else { "running" },
                v.throttle_pct,
                self.max_throttle_pct,
                self.guest_progress.as_ref().map_or(String::new(), |g| format!(
                    "; {} pages written during the migration",
                    g.pages_written_during_migration
                ))
            );
        }
        let ratio = self.bytes_on_wire as f64 / self.guest.memory_bytes.max(1) as f64;
        s.push_str(&self.postcopy.as_ref().map(Postcopy::lines).unwrap_or_default());
        let _ = writeln!(s, "on the wire {:.1} MiB ({:.3} × guest memory)", mib(self.bytes_on_wire), ratio);
        let _ = writeln!(
            s,
            "pages       {} sent: {} zero, {} lz4, {} zstd, {} raw",
            self.pages.sent, self.pages.zero, self.pages.lz4, self.pages.zstd, self.pages.raw
        );
        if self.cpu_seconds > 0.0 {
            let gb = self.bytes_on_wire as f64 / 1e9;
            let _ = writeln!(
                s,
                "send path   {}; CPU {:.2} s ({:.2} s per GB on the wire)",
                self.send_path,
                self.cpu_seconds,
                self.cpu_seconds / gb.max(1e-9)
            );
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(
                s,
                "memory      peak RSS {:.1} MiB: guest {:.1} MiB resident, {:.1} MiB beside it ({:.1} MiB page tables)",
                mib(m.peak_rss_bytes),
                mib(m.guest_resident_bytes),
                mib(m.overhead_bytes),
                mib(m.page_tables_bytes)
            );
        }
        let _ = match (self.security.mode.as_str(), &self.security.peer) {
            ("mtls", Some(peer)) => writeln!(s, "security    mutual TLS with {peer}; records AES-256-GCM"),
            ("mtls", None) => writeln!(s, "security    mutual TLS; records AES-256-GCM"),
            ("insecure", _) => writeln!(s, "security    none (--insecure): the pages crossed in clear"),
            _ => Ok(()),
        };
        s + &self.link_lines()
    }

    /// A line per link for [`Report::table`]: its bytes and rate, zero-copy, and why it failed.
    fn link_lines(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for l in &self.links {
            let zc = match (&l.zerocopy_error, l.zerocopy_sends) {
                (Some(e), _) => format!(", zero-copy off: {e}"),
                (None, 0) => String::new(),
                (None, n) => format!(", {n} zero-copy sends ({} copied by the kernel)", l.zerocopy_copied),
            };
            let _ = writeln!(
                s,
                "link        {} {:.1} MiB at {:.2} Gbit/s{}{}",
                l.name,
                l.bytes_on_wire as f64 / (1u64 << 20) as f64,
                l.throughput_bps / 1e9,
                zc,
                l.error.as_ref().map_or(String::new(), |e| format!(" FAILED: {e}"))
            );
        }
        s
    }

    /// The per-round part of [`Report::table`]: pages by codec, wire bytes, time and throttle of each round.
    fn rounds_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let per_link = self.links.len() > 1;
        let _ = writeln!(
            s,
            "{:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>10} {:>8}{}",
            "round",
            "pages",
            "zero",
            "lz4",
            "zstd",
            "raw",
            "wire MiB",
            "secs",
            "MiB/s",
            "throttle",
            if per_link { "  MiB per link" } else { "" }
        );
        for r in &self.rounds {
            let rate = if r.duration_s > 0.0 { mib(r.bytes_on_wire) / r.duration_s } else { 0.0 };
            let links = if per_link {
                let each: Vec<String> = r.link_bytes.iter().map(|&b| format!("{:.0}", mib(b))).collect();
                format!("  {}", each.join("/"))
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "{:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>8.3} {:>10.0} {:>7.0}%{}{}",
                r.index,
                r.dirty_pages,
                r.pages.zero,
                r.pages.lz4,
                r.pages.zstd,
                r.pages.raw,
                mib(r.bytes_on_wire),
                r.duration_s,
                rate,
                r.throttle_pct,
                links,
                match (r.last, self.postcopy.is_some()) {
                    (true, true) => "  (post-copy push: the guest runs on the destination)",
                    (true, false) => "  (paused)",
                    _ => "",
                }
            );
        }
        s
    }
}

/// Parses a size such as `512MiB`, `2GiB`, `64k` or `4096` into bytes (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (try 512MiB or 2GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        u => return Err(format!("unknown size unit '{u}' in '{s}' (use KiB, MiB, GiB)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2 potatoes").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
