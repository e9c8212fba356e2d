//! The Intel MultiProcessor table: how a guest without ACPI finds its CPUs, its IOAPIC and the
//! wiring of ISA interrupts (MP specification 1.4).
//!
//! Written once into the EBDA before the first instruction, where Linux scans for it.

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::memory::{GuestRam, MemoryError};

const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Legacy ISA interrupts routed through the IOAPIC.
const ISA_IRQS: u8 = 16;
/// The MP floating pointer structure takes 16 bytes; the table follows it.
const FLOATING_POINTER_SIZE: u64 = 16;

/// Largest vCPU count the table (and the EBDA it lives in) is sized for.
pub const MAX_VCPUS: u8 = 32;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the configuration table (header and entries) for `vcpus` processors, to be placed at
/// guest address `table_addr`.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // the first APIC id after the CPUs'
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id]);
        entries.push(irq);
    }
    // LINT0 takes the 8259's ExtINT, LINT1 is NMI, on every local APIC.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
    }
    let entry_count = u16::from(vcpus) + 1 + 1 + u16::from(ISA_IRQS) + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // specification revision 1.4
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"UNDRSTDY");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the MP floating pointer and configuration table for `vcpus` processors.
pub fn write_mptable(ram: &GuestRam, vcpus: u8) -> Result<(), MemoryError> {
    let table_addr = EBDA_START + FLOATING_POINTER_SIZE;
    let table = config_table(vcpus);
    let mut pointer = Vec::with_capacity(16);
    pointer.extend_from_slice(b"_MP_");
    pointer.extend_from_slice(&(table_addr as u32).to_le_bytes());
    pointer.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, spec 1.4, no default config
    pointer[10] = checksum(&pointer);
    ram.write(EBDA_START, &pointer)?;
    ram.write(table_addr, &table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn pointer_and_table_checksums_are_zero() {
        let ram = GuestRam::new(2 << 20).unwrap();
        write_mptable(&ram, 2).unwrap();
        let mut pointer = [0u8; 16];
        ram.read(EBDA_START, &mut pointer).unwrap();
        assert_eq!(&pointer[..4], b"_MP_");
        assert_eq!(sum(&pointer), 0);
        let table_addr = u64::from(u32::from_le_bytes(pointer[4..8].try_into().unwrap()));
        let mut header = [0u8; 44];
        ram.read(table_addr, &mut header).unwrap();
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut table = vec![0u8; len];
        ram.read(table_addr, &mut table).unwrap();
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(sum(&table), 0);
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_the_first_boots() {
        let table = config_table(3);
        let cpus: Vec<_> = table[44..]
            .chunks(20)
            .take(3)
            .map(|e| (e[0], e[1], e[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 0, 3), (0, 1, 1), (0, 2, 1)]);
    }

    #[test]
    fn largest_table_fits_in_the_ebda() {
        let size = FLOATING_POINTER_SIZE as usize + config_table(MAX_VCPUS).len();
        assert!(
            size <= 0x400,
            "MP table of {size} bytes overflows the 1 KiB EBDA"
        );
    }
}
