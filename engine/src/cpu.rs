//! CPU descriptions: what a host's CPU offers, what a VM's CPU model requires, and the baseline a cluster can run.
//!
//! Features are named as Linux names them and read with the CPUID instruction itself, through one table
//! ([`FEATURES`]: name, leaf, subleaf, register, bit). The same table masks a KVM guest's CPUID down to a model, so
//! what `cpu show` reports and what a guest sees cannot drift apart.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A named feature bit: (name, leaf, subleaf, register, bit).
pub type Feature = (&'static str, u32, u32, Reg, u8);

/// The features livemig knows, as Linux names them.
pub const FEATURES: &[Feature] = &[
    ("fpu", 1, 0, Reg::Edx, 0),
    ("tsc", 1, 0, Reg::Edx, 4),
    ("cx8", 1, 0, Reg::Edx, 8),
    ("cmov", 1, 0, Reg::Edx, 15),
    ("clflush", 1, 0, Reg::Edx, 19),
    ("mmx", 1, 0, Reg::Edx, 23),
    ("fxsr", 1, 0, Reg::Edx, 24),
    ("sse", 1, 0, Reg::Edx, 25),
    ("sse2", 1, 0, Reg::Edx, 26),
    ("sse3", 1, 0, Reg::Ecx, 0),
    ("pclmulqdq", 1, 0, Reg::Ecx, 1),
    ("ssse3", 1, 0, Reg::Ecx, 9),
    ("fma", 1, 0, Reg::Ecx, 12),
    ("cx16", 1, 0, Reg::Ecx, 13),
    ("sse4_1", 1, 0, Reg::Ecx, 19),
    ("sse4_2", 1, 0, Reg::Ecx, 20),
    ("x2apic", 1, 0, Reg::Ecx, 21),
    ("movbe", 1, 0, Reg::Ecx, 22),
    ("popcnt", 1, 0, Reg::Ecx, 23),
    ("aes", 1, 0, Reg::Ecx, 25),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("avx", 1, 0, Reg::Ecx, 28),
    ("f16c", 1, 0, Reg::Ecx, 29),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("fsgsbase", 7, 0, Reg::Ebx, 0),
    ("bmi1", 7, 0, Reg::Ebx, 3),
    ("avx2", 7, 0, Reg::Ebx, 5),
    ("bmi2", 7, 0, Reg::Ebx, 8),
    ("erms", 7, 0, Reg::Ebx, 9),
    ("avx512f", 7, 0, Reg::Ebx, 16),
    ("avx512dq", 7, 0, Reg::Ebx, 17),
    ("rdseed", 7, 0, Reg::Ebx, 18),
    ("adx", 7, 0, Reg::Ebx, 19),
    ("clflushopt", 7, 0, Reg::Ebx, 23),
    ("sha_ni", 7, 0, Reg::Ebx, 29),
    ("avx512bw", 7, 0, Reg::Ebx, 30),
    ("avx512vl", 7, 0, Reg::Ebx, 31),
    ("vaes", 7, 0, Reg::Ecx, 9),
    ("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    ("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    ("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    ("nx", 0x8000_0001, 0, Reg::Edx, 20),
    ("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    ("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    ("lm", 0x8000_0001, 0, Reg::Edx, 29),
];

/// A CPU: who made it, which model, and its feature set. A host's description, or a VM's CPU model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuDescription {
    /// Free-form name (a host name or a model name).
    #[serde(default)]
    pub name: String,
    /// The CPUID vendor string, e.g. "GenuineIntel" or "AuthenticAMD".
    pub vendor: String,
    /// Display family, model and stepping (0 for a VM model).
    #[serde(default)]
    pub family: u32,
    /// Display model.
    #[serde(default)]
    pub model: u32,
    /// Stepping.
    #[serde(default)]
    pub stepping: u32,
    /// Feature names, as in [`FEATURES`].
    pub features: BTreeSet<String>,
}

/// Errors about CPU descriptions.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuError {
    /// CPUs of different vendors cannot share a model: guests see the vendor, and its instruction variants differ.
    #[error("CPU vendors differ: {0}")]
    MixedVendors(String),
    /// No hosts were given.
    #[error("a baseline needs at least one host")]
    Empty,
}

/// Reads this machine's CPU with the CPUID instruction.
#[cfg(target_arch = "x86_64")]
pub fn host() -> CpuDescription {
    use std::arch::x86_64::__cpuid_count;
    let id = |leaf: u32, sub: u32| __cpuid_count(leaf, sub);
    let v = id(0, 0);
    let vendor: Vec<u8> = [v.ebx, v.edx, v.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    let (max, max_ext) = (v.eax, id(0x8000_0000, 0).eax);
    let sig = id(1, 0).eax;
    let base_family = (sig >> 8) & 0xf;
    let family = if base_family == 0xf { base_family + ((sig >> 20) & 0xff) } else { base_family };
    let model = if base_family == 6 || base_family == 0xf {
        ((sig >> 12) & 0xf0) | ((sig >> 4) & 0xf)
    } else {
        (sig >> 4) & 0xf
    };
    let features = FEATURES
        .iter()
        .filter(|&&(_, leaf, sub, reg, bit)| {
            let supported = if leaf >= 0x8000_0000 { leaf <= max_ext } else { leaf <= max };
            supported && {
                let r = id(leaf, sub);
                let word = match reg {
                    Reg::Ebx => r.ebx,
                    Reg::Ecx => r.ecx,
                    Reg::Edx => r.edx,
                };
                word & (1 << bit) != 0
            }
        })
        .map(|&(name, ..)| name.to_string())
        .collect();
    CpuDescription {
        name: "this host".into(),
        vendor: String::from_utf8_lossy(&vendor).into_owned(),
        family,
        model,
        stepping: sig & 0xf,
        features,
    }
}

/// The baseline of a cluster: the features every host offers. Also returns, per host, what including it costs the
/// cluster: the features every other host has but it lacks (lost only because of it).
pub fn baseline(hosts: &[CpuDescription]) -> Result<(CpuDescription, Vec<BTreeSet<String>>), CpuError> {
    let first = hosts.first().ok_or(CpuError::Empty)?;
    if let Some(other) = hosts.iter().find(|h| h.vendor != first.vendor) {
        return Err(CpuError::MixedVendors(format!(
            "{} is {} but {} is {}",
            first.name, first.vendor, other.name, other.vendor
        )));
    }
    let common = |skip: Option<usize>| {
        let mut it = hosts.iter().enumerate().filter(|(i, _)| Some(*i) != skip).map(|(_, h)| &h.features);
        let init = it.next().cloned().unwrap_or_default();
        it.fold(init, |acc, f| acc.intersection(f).cloned().collect::<BTreeSet<_>>())
    };
    let all = common(None);
    let costs = (0..hosts.len())
        .map(|i| if hosts.len() == 1 { BTreeSet::new() } else { common(Some(i)).difference(&all).cloned().collect() })
        .collect();
    let model = CpuDescription {
        name: "baseline".into(),
        vendor: first.vendor.clone(),
        family: 0,
        model: 0,
        stepping: 0,
        features: all,
    };
    Ok((model, costs))
}

/// Why a VM cannot run on a host: the vendor differs, or these features are missing. Empty when it can.
pub fn incompatibilities(vm: &CpuDescription, host: &CpuDescription) -> Vec<String> {
    let mut why = Vec::new();
    if vm.vendor != host.vendor {
        why.push(format!(
            "CPU vendor differs: the VM was started on {} and {} is {}",
            vm.vendor, host.name, host.vendor
        ));
    }
    let missing: Vec<&str> = vm.features.difference(&host.features).map(String::as_str).collect();
    if !missing.is_empty() {
        why.push(format!("{} lacks CPU features the VM uses: {}", host.name, missing.join(", ")));
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(name: &str, vendor: &str, f: &[&str]) -> CpuDescription {
        CpuDescription {
            name: name.into(),
            vendor: vendor.into(),
            family: 6,
            model: 0,
            stepping: 0,
            features: f.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn this_host_has_the_basics() {
        let h = host();
        assert!(h.vendor == "GenuineIntel" || h.vendor == "AuthenticAMD", "{}", h.vendor);
        for f in ["sse2", "lm", "fxsr"] {
            assert!(h.features.contains(f), "{f} missing from {:?}", h.features);
        }
    }

    #[test]
    fn baseline_and_costs() {
        let hosts = [
            cpu("new", "GenuineIntel", &["sse4_2", "aes", "avx", "avx2"]),
            cpu("westmere", "GenuineIntel", &["sse4_2", "aes"]),
            cpu("nehalem", "GenuineIntel", &["sse4_2"]),
        ];
        let (b, costs) = baseline(&hosts).unwrap();
        assert_eq!(b.features, ["sse4_2".to_string()].into());
        assert!(costs[0].is_empty());
        assert!(costs[1].is_empty(), "{:?}", costs[1]);
        assert_eq!(costs[2], ["aes".to_string()].into(), "nehalem alone costs aes");
        let mixed = [hosts[0].clone(), cpu("epyc", "AuthenticAMD", &["sse4_2"])];
        assert!(matches!(baseline(&mixed), Err(CpuError::MixedVendors(m)) if m.contains("AuthenticAMD")));
    }

    #[test]
    fn incompatibilities_name_the_features() {
        let vm = cpu("vm", "GenuineIntel", &["sse4_2", "aes", "avx"]);
        let host = cpu("old", "GenuineIntel", &["sse4_2"]);
        assert_eq!(incompatibilities(&vm, &host), ["old lacks CPU features the VM uses: aes, avx"]);
        assert!(incompatibilities(&vm, &vm).is_empty());
        let amd = cpu("epyc", "AuthenticAMD", &["sse4_2", "aes", "avx"]);
        assert!(incompatibilities(&vm, &amd)[0].contains("vendor differs"));
    }
}
