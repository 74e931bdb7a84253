//! The rust-vmm embedding example (vm-memory guest memory with AtomicBitmap) runs and migrates its guest.

#[path = "../examples/vmm_embed.rs"]
mod vmm_embed;

#[test]
fn vm_memory_example_migrates_its_guest() {
    vmm_embed::main().expect("the vm-memory example migrates its guest");
}
