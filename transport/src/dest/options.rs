//! What a destination accepts: its options, the memory it may give a guest, and the checks a source's Hello must
//! pass before anything is allocated for it.

use super::ReceiveError;
use crate::wire::Hello;
use livemig_engine::preflight::DestDescription;
use std::time::Duration;

/// Options of the destination.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// A source silent this long (no control frame and no data) is declared gone.
    pub idle_timeout: Duration,
    /// After a post-copy switch, how long a silent source (every link down) is waited for: the guest runs here
    /// without all its pages and cannot finish alone (`receive --postcopy-wait`).
    pub postcopy_wait: Duration,
    /// The largest guest accepted, in bytes. A Hello sizes the destination's tables and guest, so it is checked before
    /// any of them is allocated. Defaults to this host's available memory ([`available_memory`]); an operator may set
    /// more for a sparse guest on an overcommitted host (pre-faulting still stops at what is available).
    pub max_memory: u64,
    /// Connections a migration serves at once: data links and connections still presenting themselves.
    pub max_connections: usize,
    /// This host's CPU, against which a VM's CPU model is checked; read with CPUID unless overridden (tests use a
    /// fixture).
    pub host_cpu: Option<livemig_engine::cpu::CpuDescription>,
    /// What this destination reports about itself for the source's preflight; built from this host (its name, its
    /// available memory, no datastores or port groups) unless given.
    pub description: Option<DestDescription>,
    /// Fault injection for tests: after this many bytes the destination drops the connection without a word, as the
    /// kernel does for a killed process.
    #[doc(hidden)]
    pub die_after_bytes: Option<u64>,
    /// Fault injection for tests: the control connection's sending side fails just before `Committed` is written,
    /// as a network that dies at that moment would make it.
    #[doc(hidden)]
    pub fail_committed: bool,
    /// Submit the data links' socket I/O to one io_uring (`receive --recv-path uring`) rather than have each link's
    /// thread make its own calls. Pages are still read straight into guest memory.
    pub recv_uring: bool,
}

/// Bytes of memory this host could give a new guest without swapping (`MemAvailable`), if the kernel says.
pub fn available_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb.saturating_mul(1024))
}

impl Default for DestOptions {
    fn default() -> Self {
        DestOptions {
            idle_timeout: Duration::from_secs(10),
            postcopy_wait: livemig_engine::precopy::POSTCOPY_WAIT,
            max_memory: available_memory().unwrap_or(u64::MAX),
            max_connections: 64,
            host_cpu: None,
            description: None,
            die_after_bytes: None,
            fail_committed: false,
            recv_uring: false,
        }
    }
}

impl DestOptions {
    /// What this destination reports about itself.
    pub fn describe(&self) -> DestDescription {
        self.description.clone().unwrap_or_else(|| {
            let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or("destination".into(), |s| s.trim().to_string());
            DestDescription {
                name,
                free_memory_bytes: available_memory().unwrap_or(self.max_memory),
                datastores: Vec::new(),
                port_groups: Vec::new(),
                cpu: self.host_cpu.clone().unwrap_or_else(livemig_engine::cpu::host),
                postcopy_unavailable: livemig_engine::guest::uffd::Uffd::new().err().map(|e| e.to_string()),
            }
        })
    }

    /// Checks a Hello against this destination before anything is allocated for it: the memory cap and the CPU model.
    pub fn check(&self, hello: &Hello) -> Result<(), ReceiveError> {
        let asked = hello.layout.total_bytes();
        if asked > self.max_memory {
            return Err(ReceiveError::TooLarge { asked, max: self.max_memory });
        }
        if let Some(vm) = &hello.cpu {
            let host = self.host_cpu.clone().unwrap_or_else(livemig_engine::cpu::host);
            let why = livemig_engine::cpu::incompatibilities(vm, &host);
            if !why.is_empty() {
                return Err(ReceiveError::Incompatible(why));
            }
        }
        Ok(())
    }
}
