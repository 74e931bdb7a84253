//! The guests the CLI and the loopback helper can migrate, behind one type: the destination learns which from the
//! source's Hello.

use livemig_engine::dirty::Bitmap;
use livemig_engine::guest::{DirtyLog, Guest, GuestError, GuestMemory, HostRegion, SyntheticGuest, Vcpus};
use livemig_kvm::KvmGuest;
use livemig_transport::wire::Hello;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A synthetic or a KVM guest.
#[derive(Debug)]
pub enum AnyGuest {
    /// The synthetic reference guest.
    Synthetic(SyntheticGuest),
    /// A KVM VM running the test guest.
    Kvm(KvmGuest),
}

impl AnyGuest {
    /// An empty destination guest of the kind, layout and CPU model the source announced.
    pub fn destination(hello: &Hello) -> Result<AnyGuest, GuestError> {
        let layout = &hello.layout;
        match hello.guest_kind.as_str() {
            "synthetic" => Ok(AnyGuest::Synthetic(SyntheticGuest::destination(layout, hello.vcpus)?)),
            "kvm" if hello.vcpus != 1 => Err(GuestError::BadState(format!(
                "the KVM test guest has one vCPU, the source announced {}",
                hello.vcpus
            ))),
            "kvm" => Ok(AnyGuest::Kvm(KvmGuest::destination(layout, hello.cpu.as_ref()).map_err(GuestError::from)?)),
            other => Err(GuestError::BadState(format!("this destination cannot host a '{other}' guest"))),
        }
    }

    fn inner(&self) -> &dyn Guest {
        match self {
            AnyGuest::Synthetic(g) => g,
            AnyGuest::Kvm(g) => g,
        }
    }

    /// Pages the guest's vCPUs have written since it was made: the synthetic guest's count, the KVM test guest's
    /// progress counter (one page per step).
    pub fn pages_written(&self) -> u64 {
        match self {
            AnyGuest::Synthetic(g) => g.vcpus().pages_written(),
            AnyGuest::Kvm(g) => g.counter(),
        }
    }

    /// The synthetic guest, if it is one.
    pub fn synthetic(&self) -> Option<&SyntheticGuest> {
        match self {
            AnyGuest::Synthetic(g) => Some(g),
            AnyGuest::Kvm(_) => None,
        }
    }

    /// Checks that a guest resumed after a migration really runs, and says what it saw. `at_pause` is the KVM guest's
    /// progress counter when the source paused it, when known.
    pub fn check_running(&self, at_pause: Option<u64>) -> Result<String, String> {
        if self.vcpus().is_paused() {
            return Err("destination guest is still paused after commit".into());
        }
        match self {
            AnyGuest::Synthetic(g) => {
                let before = g.vcpus().pages_written();
                std::thread::sleep(Duration::from_millis(100));
                let after = g.vcpus().pages_written();
                Ok(format!("destination guest running: {} pages written in its first 100 ms", after - before))
            }
            AnyGuest::Kvm(g) => {
                let at_pause = at_pause.or(g.counter_at_restore());
                let r = g.reports();
                let start = g.counter();
                let checks = r.checks_ok.load(Ordering::Relaxed);
                // Until the guest's next self-check (it checks after writing twice its hot set), and at least 500 ms.
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_millis(500)
                    || (r.checks_ok.load(Ordering::Relaxed) == checks
                        && r.checks_bad.load(Ordering::Relaxed) == 0
                        && t.elapsed() < Duration::from_secs(30)
                        && g.failure().is_none())
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let ran = t.elapsed();
                let (now, ok, bad) =
                    (g.counter(), r.checks_ok.load(Ordering::Relaxed), r.checks_bad.load(Ordering::Relaxed));
                if let Some(f) = g.failure() {
                    return Err(format!("destination vCPU failed: {f}"));
                }
                if let Some(p) = at_pause {
                    if start < p {
                        return Err(format!("destination guest's counter {start} is behind its value at pause {p}"));
                    }
                }
                if now <= start {
                    return Err(format!("destination guest's counter is stuck at {start}"));
                }
                if bad > 0 {
                    return Err(format!("destination guest's self-check failed {bad} time(s): its memory is wrong"));
                }
                if ok <= checks {
                    return Err(format!("destination guest made no self-check in {:.1} s", ran.as_secs_f64()));
                }
                Ok(format!(
                    "destination guest running: counter {}{start} → {now} in {} ms, self-checks {ok} passed, 0 failed",
                    at_pause.map_or(String::new(), |p| format!("{p} at the pause, ")),
                    ran.as_millis()
                ))
            }
        }
    }
}

impl GuestMemory for AnyGuest {
    fn regions(&self) -> &[HostRegion] {
        self.inner().memory().regions()
    }
    fn maybe_nonzero(&self) -> Result<Bitmap, GuestError> {
        self.inner().memory().maybe_nonzero()
    }
    fn prefault(&self, first: u64, count: u64) {
        self.inner().memory().prefault(first, count)
    }
}

impl Guest for AnyGuest {
    fn memory(&self) -> &dyn GuestMemory {
        self
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        self.inner().dirty_log()
    }
    fn vcpus(&self) -> &dyn Vcpus {
        self.inner().vcpus()
    }
    fn kind(&self) -> &'static str {
        self.inner().kind()
    }
    fn vcpu_count(&self) -> u32 {
        self.inner().vcpu_count()
    }
}
