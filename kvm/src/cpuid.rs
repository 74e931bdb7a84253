//! CPUID tables against livemig's shared feature table: which named features a table sets, and masking a table down
//! to a CPU model's features.

use livemig_engine::cpu::{CpuDescription, Reg};

/// The features (of the shared table) set in `entries`.
pub(crate) fn features_in(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> std::collections::BTreeSet<String> {
    livemig_engine::cpu::FEATURES
        .iter()
        .filter(|&&(_, leaf, sub, reg, bit)| {
            entries.iter().any(|e| {
                let word = match reg {
                    Reg::Ebx => e.ebx,
                    Reg::Ecx => e.ecx,
                    Reg::Edx => e.edx,
                };
                e.function == leaf && e.index == sub && word & (1 << bit) != 0
            })
        })
        .map(|f| f.0.to_string())
        .collect()
}

/// Clears every feature bit of the shared table that `model` lacks, so the guest sees at most the model's features.
/// Bits livemig has no name for are left as KVM set them.
pub fn mask_cpuid(entries: &mut [kvm_bindings::kvm_cpuid_entry2], model: &CpuDescription) {
    for &(name, leaf, sub, reg, bit) in livemig_engine::cpu::FEATURES {
        if model.features.contains(name) {
            continue;
        }
        for e in entries.iter_mut().filter(|e| e.function == leaf && e.index == sub) {
            let word = match reg {
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *word &= !(1u32 << bit);
        }
    }
}
