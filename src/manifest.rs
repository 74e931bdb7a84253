//! The VM manifest file (TOML) as operators write it, turned into the engine's [`VmManifest`].
//!
//! ```toml
//! name = "web-01"
//! memory = "2GiB"
//! cpu_model = "cluster-baseline.json"   # a `cpu show` or `cpu baseline` file, relative to this one; default: this host
//! cpu_affinity = []                      # host CPUs the VM is pinned to
//! [[devices]]                            # cdrom or floppy; backing none, shared:PATH or local:PATH
//! kind = "cdrom"
//! backing = "shared:/datastores/shared-ds/iso/tools.iso"
//! [[nics]]
//! mac = "52:54:00:12:34:56"
//! port_group = "vm-net"
//! uplinks = 2                            # of that port group on this host; 0 is an internal-only vSwitch
//! [[disks]]
//! datastore = "shared-ds"
//! path = "web-01/disk0.img"
//! ```

use crate::report::parse_size;
use livemig_engine::cpu::{self, CpuDescription};
use livemig_engine::preflight::{Device, Disk, Nic, VmManifest};
use serde::Deserialize;
use std::path::Path;

/// A manifest problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid manifest.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    memory: String,
    cpu_model: Option<String>,
    #[serde(default)]
    cpu_affinity: Vec<u32>,
    #[serde(default)]
    devices: Vec<Device>,
    #[serde(default)]
    nics: Vec<Nic>,
    #[serde(default)]
    disks: Vec<Disk>,
}

/// Reads a manifest, resolving its CPU model file relative to it.
pub fn read(path: &Path) -> Result<VmManifest, ManifestError> {
    let p = path.display().to_string();
    let invalid = |why: String| ManifestError::Invalid { path: p.clone(), why };
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: p.clone(), source })?;
    let f: File = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let memory_bytes = parse_size(&f.memory).map_err(invalid)?;
    let cpu: CpuDescription = match &f.cpu_model {
        Some(model) => {
            let file = path.parent().unwrap_or(Path::new(".")).join(model);
            let text =
                std::fs::read_to_string(&file).map_err(|e| invalid(format!("cpu_model {}: {e}", file.display())))?;
            serde_json::from_str(&text).map_err(|e| invalid(format!("cpu_model {}: {e}", file.display())))?
        }
        None => cpu::host(),
    };
    for n in &f.nics {
        if livemig_transport::announce::parse_mac(&n.mac).is_none() {
            return Err(invalid(format!("NIC MAC '{}' is not aa:bb:cc:dd:ee:ff", n.mac)));
        }
    }
    Ok(VmManifest {
        name: f.name,
        memory_bytes,
        cpu,
        cpu_affinity: f.cpu_affinity,
        devices: f.devices,
        nics: f.nics,
        disks: f.disks,
    })
}

/// The manifest's NIC MACs.
pub fn macs(m: &VmManifest) -> Vec<[u8; 6]> {
    m.nics.iter().filter_map(|n| livemig_transport::announce::parse_mac(&n.mac)).collect()
}
