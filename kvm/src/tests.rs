use super::*;

#[test]
fn masking_clears_exactly_the_features_the_model_lacks() {
    let Ok(kvm) = Kvm::new() else {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), b"SKIP cpuid mask: /dev/kvm is not available\n");
        return;
    };
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let before = features_in(cpuid.as_slice());
    let mut model = livemig_engine::cpu::host();
    model.features = before.iter().take(before.len() / 2).cloned().collect();
    mask_cpuid(cpuid.as_mut_slice(), &model);
    assert_eq!(features_in(cpuid.as_slice()), model.features);
}
