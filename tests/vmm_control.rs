//! The toy VMM example (vm-memory guest memory, two devices, driven through the handle) runs and exits only when
//! its live changes, its cancel and its second, completed migration all held.

#[path = "../examples/vmm_control.rs"]
mod vmm_control;

#[test]
fn the_toy_vmm_controls_cancels_and_completes_its_migration() {
    vmm_control::main().expect("the toy VMM's checks");
}
