//! The test guest: a small 32-bit program, assembled here from source with iced-x86, that dirties pages at a rate
//! the host sets and can prove its own memory intact.
//!
//! Guest-physical layout (flat 32-bit protected mode, no paging):
//! - [`CODE`]: the program.
//! - [`MAILBOX`]: `+0` progress counter (u64: pages written so far), `+8` running check value (u32), `+12` pages per
//!   burst, `+16` hot-set page count, `+20` bursts between self-checks.
//! - [`DATA`] to the end of RAM: the data pages; the guest writes the first `hot` of them (its hot set). The host
//!   fills part of RAM with the reference page mix before boot, and sets the check value to match.
//!
//! Each write: `counter += 1`, pick a hot page by a multiplicative hash of the counter, replace its first word with
//! the counter, and update `check += new - old`. So `check` always equals the sum of the hot pages' first words,
//! which the guest recomputes from memory now and then: if migration lost or reordered a page, the two differ.
//!
//! Ports (OUT, 32-bit): [`PORT_PROGRESS`] after each burst with the counter's low word (the host paces and throttles
//! the guest at these exits), [`PORT_SUM`] with the recomputed sum and then [`PORT_CHECK`] with the running check,
//! every `+20` bursts. The host sets that to twice the hot set's pages: a self-check touches every hot page, and
//! under nested paging each first touch of a page is a two-level page walk, so checking more often would slow the
//! guest below the rate the host asks for.

#[cfg(feature = "test-guest")]
use iced_x86::code_asm::*;

/// Guest-physical address of the code.
pub const CODE: u64 = 0x1000;
/// Guest-physical address of the mailbox.
pub const MAILBOX: u64 = 0x2000;
/// Guest-physical address of the first data page.
pub const DATA: u64 = 0x10_0000;
/// Port of the progress report (and the host's pacing point).
pub const PORT_PROGRESS: u16 = 0x10;
/// Port of the sum recomputed from memory.
pub const PORT_SUM: u16 = 0x11;
/// Port of the running check value.
pub const PORT_CHECK: u16 = 0x12;
/// Port of CPUID leaf 1's ECX, as the guest sees it (at boot and at every self-check).
pub const PORT_CPUID1_ECX: u16 = 0x13;
/// Port of CPUID leaf 7 (subleaf 0)'s EBX.
pub const PORT_CPUID7_EBX: u16 = 0x14;
/// Pages the guest writes between two exits.
pub const BURST: u32 = 16;
/// Fewest bursts between two self-checks.
pub const MIN_VERIFY_EVERY: u32 = 64;

/// Bursts between self-checks for a hot set of `hot` pages.
pub fn verify_every(hot: u64) -> u32 {
    u32::try_from(2 * hot / u64::from(BURST)).unwrap_or(u32::MAX).max(MIN_VERIFY_EVERY)
}

/// Assembles the program for address [`CODE`] (with the default `test-guest` feature, which brings iced-x86).
#[cfg(feature = "test-guest")]
pub fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut main_loop = a.create_label();
    let mut burst = a.create_label();
    let mut sum_loop = a.create_label();
    // Both sit in the guest's first megabytes, where 32-bit code addresses them.
    let mb = u32::try_from(MAILBOX).expect("the mailbox is below 4 GiB");
    let data = u32::try_from(DATA).expect("the data pages start below 4 GiB");
    // What CPUID says, so the host can see the CPU model the guest was given (clobbers eax, ebx, ecx, edx).
    let report_cpuid = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(eax, 1u32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(eax, ecx)?;
        a.out(i32::from(PORT_CPUID1_ECX), eax)?;
        a.mov(eax, 7u32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(eax, ebx)?;
        a.out(i32::from(PORT_CPUID7_EBX), eax)
    };

    report_cpuid(&mut a)?;
    a.mov(esi, mb)?;
    a.mov(ebp, dword_ptr(esi + 16))?; // hot page count
    a.xor(edi, edi)?; // bursts since the last self-check
    a.set_label(&mut main_loop)?;
    a.mov(ecx, dword_ptr(esi + 12))?; // pages per burst
    a.set_label(&mut burst)?;
    a.add(dword_ptr(esi), 1)?; // counter += 1 (64-bit)
    a.adc(dword_ptr(esi + 4), 0)?;
    a.mov(eax, dword_ptr(esi))?;
    a.imul_3(eax, eax, 0x9E37_79B1u32 as i32)?; // page = hash(counter) % pages
    a.xor(edx, edx)?;
    a.div(ebp)?;
    a.shl(edx, 12)?;
    a.add(edx, data)?;
    a.mov(eax, dword_ptr(esi))?; // the new value: the counter
    a.mov(ebx, dword_ptr(edx))?; // the old value
    a.sub(dword_ptr(esi + 8), ebx)?; // check += new - old
    a.add(dword_ptr(esi + 8), eax)?;
    a.mov(dword_ptr(edx), eax)?;
    a.dec(ecx)?;
    a.jnz(burst)?;
    a.mov(eax, dword_ptr(esi))?;
    a.out(i32::from(PORT_PROGRESS), eax)?;
    a.inc(edi)?;
    a.cmp(edi, dword_ptr(esi + 20))?;
    a.jb(main_loop)?;
    // Self-check: the sum of every data page's first word must equal the running check.
    a.xor(edi, edi)?;
    a.xor(eax, eax)?;
    a.mov(edx, data)?;
    a.mov(ecx, ebp)?;
    a.set_label(&mut sum_loop)?;
    a.add(eax, dword_ptr(edx))?;
    a.add(edx, 4096)?;
    a.dec(ecx)?;
    a.jnz(sum_loop)?;
    a.out(i32::from(PORT_SUM), eax)?;
    a.mov(eax, dword_ptr(esi + 8))?;
    a.out(i32::from(PORT_CHECK), eax)?;
    report_cpuid(&mut a)?;
    a.jmp(main_loop)?;
    a.assemble(CODE)
}

#[cfg(all(test, feature = "test-guest"))]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_and_decodes_back() {
        let code = assemble().unwrap();
        assert!(code.len() < 4096, "{} bytes", code.len());
        let mut d = iced_x86::Decoder::with_ip(32, &code, CODE, iced_x86::DecoderOptions::NONE);
        let outs = d.iter().filter(|i| i.mnemonic() == iced_x86::Mnemonic::Out).count();
        assert_eq!(outs, 7, "progress, sum, check, and CPUID twice (boot and self-check)");
    }
}
