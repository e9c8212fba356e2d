//! The state of the boot vCPU at a kernel's 64-bit entry: flat GDT, identity page tables,
//! long mode on, RSI pointing at the zero page (Linux x86 64-bit boot protocol).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDPT_START, PD_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::memory::{GuestRam, MemoryError};

/// The boot protocol's selectors: `__BOOT_CS` and `__BOOT_DS`.
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;
/// Descriptors: null, null, 64-bit code, data, TSS.
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PAGE_PRESENT_WRITABLE: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(selector: u16) -> kvm_segment {
    let entry = GDT[usize::from(selector >> 3)];
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and page tables identity-mapping 4 GiB with 2 MiB pages.
pub fn write_boot_tables(ram: &GuestRam) -> Result<(), MemoryError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(BOOT_GDT_START, &gdt)?;
    ram.write(BOOT_IDT_START, &0u64.to_le_bytes())?;
    ram.write(
        PML4_START,
        &(PDPT_START | PAGE_PRESENT_WRITABLE).to_le_bytes(),
    )?;
    let pdpt: Vec<u8> = (0..4u64)
        .flat_map(|i| ((PD_START + i * 0x1000) | PAGE_PRESENT_WRITABLE).to_le_bytes())
        .collect();
    ram.write(PDPT_START, &pdpt)?;
    let pds: Vec<u8> = (0..2048u64)
        .flat_map(|i| ((i << 21) | PAGE_HUGE | PAGE_PRESENT_WRITABLE).to_le_bytes())
        .collect();
    ram.write(PD_START, &pds)
}

/// General registers at entry: RIP at the kernel, RSI at the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // the always-one bit; interrupts off
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Segment and control registers at entry: long mode with paging, flat segments. `base` is
/// the vCPU's current sregs, so what KVM set up (APIC base, etc.) is kept.
pub fn boot_sregs(base: kvm_sregs) -> kvm_sregs {
    let mut sregs = base;
    let code = segment(BOOT_CS);
    let data = segment(BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// FPU at reset defaults (x87 control word, MXCSR).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs a kernel expects at entry: syscall MSRs cleared, fast strings on, MTRRs on with
/// write-back as the default type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_and_data_is_writable() {
        let cs = segment(BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_), (1, 0, 1, 0xb));
        let ds = segment(BOOT_DS);
        assert_eq!((ds.db, ds.present, ds.type_), (1, 1, 0x3));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let ram = GuestRam::new(1 << 20).unwrap();
        write_boot_tables(&ram).unwrap();
        let mut last = [0u8; 8];
        ram.read(PD_START + 2047 * 8, &mut last).unwrap();
        let entry = u64::from_le_bytes(last);
        assert_eq!(entry & !0xfff, (4u64 << 30) - (2 << 20));
    }
}
