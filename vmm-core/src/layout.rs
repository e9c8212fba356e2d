//! Guest physical memory layout of an understudy machine (x86_64).
//!
//! Everything the VMM writes into a guest before its first instruction lives here, below 1 MiB,
//! at the places a Linux kernel expects when booted through the 64-bit boot protocol. The
//! addresses are part of the guest interface and are documented in `docs/guest-interface.md`.
//! So are COM1's ports and interrupt line, which the ACPI tables describe to the guest.

/// Flat boot GDT (null, code, data, TSS descriptors).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: empty; the kernel installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux "zero page" (`struct boot_params`); RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer handed to the kernel.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: one PML4, one PDPT and four page directories of 2 MiB pages,
/// covering the first 4 GiB.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_START: u64 = 0xa000;
/// First of the four page directories (0xb000..0xf000).
pub const PD_START: u64 = 0xb000;
/// Kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Extended BIOS data area: the MP table goes here, where Linux scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) in the BIOS area, where Linux scans for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
/// Start of high memory: kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole (IOAPIC, LAPIC) starts here; RAM that does not fit below it continues
/// at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Default IOAPIC base address, inside the MMIO hole.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Default local APIC base address, inside the MMIO hole.
pub const APIC_START: u64 = 0xfee0_0000;
/// Identity page tables map this much of guest physical space.
pub const IDENTITY_MAPPED: u64 = 4 << 30;
/// Guest page size used for dirty tracking and copies.
pub const PAGE_SIZE: u64 = 4096;
/// Address KVM needs for its three-page TSS region on Intel hosts (just below the BIOS ROM).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of COM1 registers.
pub const COM1_PORTS: u16 = 8;
/// The interrupt line of COM1: IOAPIC pin 4 (GSI 4), as on a PC.
pub const COM1_IRQ: u32 = 4;

/// Guest RAM ranges `(start, length)` for a machine of `size` bytes: one range below the MMIO
/// hole and, for large guests, one above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges[0], (0, MMIO_GAP_START));
        assert_eq!(ranges[1], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START));
    }
}
