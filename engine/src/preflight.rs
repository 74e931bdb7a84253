//! VM preflight: everything that must hold before a migration may start, checked all at once, every failure with its
//! reason and its fix (vMotion's compatibility checks).
//!
//! The source describes the VM ([`VmManifest`]); the destination describes itself ([`DestDescription`]: free memory,
//! the datastores and port groups it can see, its CPU). [`check`] compares them.

use crate::cpu::{incompatibilities, CpuDescription};
use serde::{Deserialize, Serialize};

/// A virtual removable drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A CD-ROM drive.
    Cdrom,
    /// A floppy drive.
    Floppy,
}

/// A device of the VM: a removable drive and what backs it: `none`, `shared:PATH` (storage both hosts see) or
/// `local:PATH` (an image on the source host only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// The drive.
    pub kind: DeviceKind,
    /// What backs it.
    pub backing: String,
}

/// A virtual NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Its MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The port group it is connected to.
    pub port_group: String,
    /// Uplinks of that port group on the source host (0: an internal-only vSwitch).
    pub uplinks: u32,
}

/// A virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The datastore holding it.
    pub datastore: String,
    /// Its path on the datastore.
    pub path: String,
}

/// What the source knows about the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmManifest {
    /// The VM's name.
    pub name: String,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The VM's CPU model.
    pub cpu: CpuDescription,
    /// Host CPUs the VM is pinned to (empty: none).
    #[serde(default)]
    pub cpu_affinity: Vec<u32>,
    /// Removable drives.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// NICs.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<Disk>,
}

/// A port group as a destination sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortGroup {
    /// Its name.
    pub name: String,
    /// Its uplinks.
    pub uplinks: u32,
}

/// What a destination reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestDescription {
    /// Its name.
    pub name: String,
    /// Memory it can give a VM, in bytes.
    pub free_memory_bytes: u64,
    /// Datastores it can see.
    #[serde(default)]
    pub datastores: Vec<String>,
    /// Port groups it has.
    #[serde(default)]
    pub port_groups: Vec<PortGroup>,
    /// Its CPU.
    pub cpu: CpuDescription,
    /// Why it cannot take a post-copy migration (userfaultfd refused), or None if it can.
    #[serde(default)]
    pub postcopy_unavailable: Option<String>,
}

/// One requirement that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Which requirement: `cpu`, `cdrom`, `floppy`, `affinity`, `network`, `storage`, `memory`.
    pub requirement: String,
    /// What is wrong.
    pub reason: String,
    /// What to do about it.
    pub fix: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {} (fix: {})", self.requirement, self.reason, self.fix)
    }
}

/// Every requirement the VM fails on that destination; empty when it may migrate.
pub fn check(vm: &VmManifest, dest: &DestDescription) -> Vec<Failure> {
    let mut out = Vec::new();
    let mut fail = |requirement: &str, reason: String, fix: &str| {
        out.push(Failure { requirement: requirement.into(), reason, fix: fix.into() })
    };
    for why in incompatibilities(&vm.cpu, &dest.cpu) {
        let fix = if why.contains("vendor") {
            "migrate only between hosts of one CPU vendor"
        } else {
            "start the VM with the cluster's baseline CPU model (livemig cpu baseline), or pick a newer host"
        };
        fail("cpu", why, fix);
    }
    for d in &vm.devices {
        let (req, what) = match d.kind {
            DeviceKind::Cdrom => ("cdrom", "CD-ROM"),
            DeviceKind::Floppy => ("floppy", "floppy"),
        };
        if let Some(path) = d.backing.strip_prefix("local:") {
            fail(
                req,
                format!("the {what} drive is backed by {path}, an image on the source host only"),
                "disconnect the drive, or move its image to a datastore both hosts see",
            );
        } else if d.backing != "none" && !d.backing.starts_with("shared:") {
            fail(
                req,
                format!("the {what} drive's backing '{}' is not none, shared:PATH or local:PATH", d.backing),
                "fix the manifest",
            );
        }
    }
    if !vm.cpu_affinity.is_empty() {
        fail(
            "affinity",
            format!("the VM is pinned to host CPUs {:?}, which mean nothing on another host", vm.cpu_affinity),
            "remove the VM's CPU affinity",
        );
    }
    for n in &vm.nics {
        if n.uplinks == 0 {
            fail(
                "network",
                format!("NIC {} is on port group '{}', an internal-only vSwitch (no uplinks)", n.mac, n.port_group),
                "connect the NIC to a port group with uplinks, or disconnect it",
            );
        } else if !dest.port_groups.iter().any(|p| p.name == n.port_group && p.uplinks > 0) {
            fail(
                "network",
                format!("NIC {}'s port group '{}' does not exist (with uplinks) on {}", n.mac, n.port_group, dest.name),
                "create the port group on the destination",
            );
        }
    }
    for d in &vm.disks {
        if !dest.datastores.contains(&d.datastore) {
            fail(
                "storage",
                format!("disk {} is on datastore '{}', which {} cannot see", d.path, d.datastore, dest.name),
                "mount the datastore on the destination, or move the disk to shared storage",
            );
        }
    }
    if vm.memory_bytes > dest.free_memory_bytes {
        fail(
            "memory",
            format!(
                "the VM needs {} MiB and {} has {} MiB free",
                vm.memory_bytes >> 20,
                dest.name,
                dest.free_memory_bytes >> 20
            ),
            "free memory on the destination, or choose another host",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(vendor: &str) -> CpuDescription {
        CpuDescription {
            name: "x".into(),
            vendor: vendor.into(),
            family: 0,
            model: 0,
            stepping: 0,
            features: ["sse4_2".to_string()].into(),
        }
    }

    fn clean() -> (VmManifest, DestDescription) {
        let vm = VmManifest {
            name: "web".into(),
            memory_bytes: 1 << 30,
            cpu: cpu("GenuineIntel"),
            cpu_affinity: vec![],
            devices: vec![Device { kind: DeviceKind::Cdrom, backing: "shared:/iso/tools.iso".into() }],
            nics: vec![Nic { mac: "52:54:00:00:00:01".into(), port_group: "vm-net".into(), uplinks: 2 }],
            disks: vec![Disk { datastore: "ds1".into(), path: "web.img".into() }],
        };
        let dest = DestDescription {
            name: "host-b".into(),
            free_memory_bytes: 8 << 30,
            datastores: vec!["ds1".into()],
            port_groups: vec![PortGroup { name: "vm-net".into(), uplinks: 2 }],
            cpu: cpu("GenuineIntel"),
            postcopy_unavailable: None,
        };
        (vm, dest)
    }

    #[test]
    fn each_requirement_gives_its_own_message() {
        let (vm, dest) = clean();
        assert!(check(&vm, &dest).is_empty());
        type Break = fn(&mut VmManifest, &mut DestDescription);
        let table: [(&str, Break, &str); 7] = [
            ("cdrom", |v, _| v.devices[0].backing = "local:/tmp/a.iso".into(), "CD-ROM drive is backed by /tmp/a.iso"),
            (
                "floppy",
                |v, _| v.devices.push(Device { kind: DeviceKind::Floppy, backing: "local:/tmp/f.img".into() }),
                "floppy drive is backed by /tmp/f.img",
            ),
            ("affinity", |v, _| v.cpu_affinity = vec![2, 3], "pinned to host CPUs [2, 3]"),
            ("network", |v, _| v.nics[0].uplinks = 0, "internal-only vSwitch"),
            ("storage", |_, d| d.datastores.clear(), "datastore 'ds1', which host-b cannot see"),
            ("memory", |_, d| d.free_memory_bytes = 512 << 20, "needs 1024 MiB and host-b has 512 MiB free"),
            ("cpu", |_, d| d.cpu.vendor = "AuthenticAMD".into(), "CPU vendor differs"),
        ];
        for (req, break_it, message) in table {
            let (mut vm, mut dest) = clean();
            break_it(&mut vm, &mut dest);
            let f = check(&vm, &dest);
            assert_eq!(f.len(), 1, "{req}: {f:?}");
            assert_eq!(f[0].requirement, req);
            assert!(f[0].reason.contains(message), "{req}: {}", f[0].reason);
            assert!(!f[0].fix.is_empty());
        }
    }

    #[test]
    fn several_violations_are_all_listed() {
        let (mut vm, mut dest) = clean();
        vm.cpu_affinity = vec![1];
        vm.devices[0].backing = "local:/x.iso".into();
        dest.free_memory_bytes = 0;
        let reqs: Vec<String> = check(&vm, &dest).into_iter().map(|f| f.requirement).collect();
        assert_eq!(reqs, ["cdrom", "affinity", "memory"]);
    }
}
