//! Guest-virtual to guest-physical translation as the guest's CPU does it for a kernel-mode
//! data access in 64-bit mode: a walk of its 4- or 5-level page tables in guest RAM, giving
//! either the physical address or the page fault the CPU would raise, and setting the
//! accessed and dirty flags the CPU would set.
//!
//! For the vCPU thread that completes an instruction the host refused
//! ([`crate::host_limits`]), which must produce exactly what the CPU would: KVM's own
//! translation (`KVM_TRANSLATE`) says neither which fault a failed walk is nor whether the page
//! may be written. Not a general MMU: no legacy or PAE paging, no user-mode accesses, and
//! where protection keys decide, it does not guess ([`Translation::Unknown`]).

use super::GuestRam;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const EXECUTE_DISABLE: u64 = 1 << 63;

/// Page-fault error code bits.
const PF_PRESENT: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_RESERVED: u32 = 1 << 3;

const CR0_WP: u64 = 1 << 16;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMAP: u64 = 1 << 21;
const CR4_PKE: u64 = 1 << 22;
const CR4_PKS: u64 = 1 << 24;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;

/// The widest physical address x86-64 has.
const MAX_PHYSICAL_BITS: u8 = 52;
/// How often a walk starts over because another vCPU changed an entry under it.
const WALK_ATTEMPTS: usize = 4;

/// What the access is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// Looking at bytes without accessing them (the instruction the CPU already fetched): no
    /// permission is checked and no flag is set.
    Peek,
}

/// How an access translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// The byte is at this guest physical address.
    Physical(u64),
    /// The CPU raises #PF with this error code (and CR2 = the address).
    PageFault(u32),
    /// What the CPU does cannot be told from here: a page table is not in RAM, protection
    /// keys decide, or the entries kept changing.
    Unknown,
}

/// The paging state of one vCPU at one moment, as far as a kernel-mode data access goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    /// CR3 (its PCID or flag bits are masked off).
    pub cr3: u64,
    /// CR0, CR4, EFER and RFLAGS (for WP; LA57, SMAP, PKE, PKS; NXE; AC).
    pub cr0: u64,
    /// See `cr0`.
    pub cr4: u64,
    /// See `cr0`.
    pub efer: u64,
    /// See `cr0`.
    pub rflags: u64,
    /// MAXPHYADDR, as the guest's CPUID (leaf 0x8000_0008) reports it.
    pub physical_bits: u8,
    /// Whether 1 GiB pages exist (CPUID 0x8000_0001 EDX bit 26); a PDPTE with PS set is
    /// reserved otherwise.
    pub gib_pages: bool,
}

/// Bits `low..high` (high exclusive) set.
fn bits(low: u32, high: u32) -> u64 {
    let upto = |n: u32| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    upto(high) & !upto(low)
}

impl Paging {
    fn levels(&self) -> u32 {
        if self.cr4 & CR4_LA57 != 0 {
            5
        } else {
            4
        }
    }

    fn physical_bits(&self) -> u32 {
        u32::from(self.physical_bits.clamp(32, MAX_PHYSICAL_BITS))
    }

    /// Whether `address` is canonical: its bits above the linear-address width all equal the
    /// width's top bit.
    pub fn is_canonical(&self, address: u64) -> bool {
        let width = 12 + 9 * self.levels();
        let shift = 64 - width;
        (((address << shift) as i64) >> shift) as u64 == address
    }

    /// The translation of `address` for `access`, setting the accessed (and, for a write, the
    /// dirty) flags the CPU sets when it succeeds.
    pub fn translate(&self, ram: &GuestRam, address: u64, access: Access) -> Translation {
        for _ in 0..WALK_ATTEMPTS {
            match self.walk(ram, address, access, true) {
                Walk::Done(translation) => return translation,
                Walk::Changed => continue,
            }
        }
        Translation::Unknown
    }

    /// What [`Paging::translate`] would say, changing nothing: to see that every page of an
    /// access can be written before any of it is.
    pub fn check(&self, ram: &GuestRam, address: u64, access: Access) -> Translation {
        match self.walk(ram, address, access, false) {
            Walk::Done(translation) => translation,
            Walk::Changed => Translation::Unknown,
        }
    }

    fn walk(&self, ram: &GuestRam, address: u64, access: Access, set_flags: bool) -> Walk {
        let write_bit = if access == Access::Write { PF_WRITE } else { 0 };
        let physical_bits = self.physical_bits();
        let frame = bits(12, physical_bits);
        let mut reserved = bits(physical_bits, MAX_PHYSICAL_BITS.into());
        if self.efer & EFER_NXE == 0 {
            reserved |= EXECUTE_DISABLE;
        }
        let mut table = self.cr3 & frame;
        let mut writable = true;
        let mut user = true;
        // The entries used, with the flags the CPU sets in each.
        let mut used: [(u64, u64, u64); 5] = [(0, 0, 0); 5];
        let mut count = 0;
        let mut physical = None;
        for level in (1..=self.levels()).rev() {
            let shift = 12 + 9 * (level - 1);
            let at = table + ((address >> shift) & 0x1ff) * 8;
            let Ok(entry) = ram.load_u64(at) else {
                return Walk::Done(Translation::Unknown);
            };
            if entry & PRESENT == 0 {
                return Walk::Done(Translation::PageFault(write_bit));
            }
            let large = entry & PAGE_SIZE_BIT != 0;
            let leaf = level == 1 || (level <= 3 && large);
            let mut must_be_zero = reserved;
            match level {
                4 | 5 => must_be_zero |= PAGE_SIZE_BIT,
                3 if large && !self.gib_pages => must_be_zero |= PAGE_SIZE_BIT,
                3 if large => must_be_zero |= bits(13, 30),
                2 if large => must_be_zero |= bits(13, 21),
                _ => {}
            }
            if entry & must_be_zero != 0 {
                return Walk::Done(Translation::PageFault(PF_PRESENT | PF_RESERVED | write_bit));
            }
            writable &= entry & WRITABLE != 0;
            user &= entry & USER != 0;
            let mut flags = ACCESSED;
            if leaf && access == Access::Write {
                flags |= DIRTY;
            }
            if let Some(slot) = used.get_mut(count) {
                *slot = (at, entry, flags);
                count += 1;
            }
            if leaf {
                let offset = bits(0, shift);
                physical = Some((entry & frame & !offset) | (address & offset));
                break;
            }
            table = entry & frame;
        }
        let Some(physical) = physical else {
            return Walk::Done(Translation::Unknown);
        };
        if access == Access::Peek {
            return Walk::Done(Translation::Physical(physical));
        }
        // Protection keys apply to user pages with PKE and to supervisor pages with PKS: PKRU
        // and the PKRS MSR are not at hand.
        let keys = if user { CR4_PKE } else { CR4_PKS };
        if self.cr4 & keys != 0 {
            return Walk::Done(Translation::Unknown);
        }
        if user && self.cr4 & CR4_SMAP != 0 && self.rflags & RFLAGS_AC == 0 {
            return Walk::Done(Translation::PageFault(PF_PRESENT | write_bit));
        }
        if access == Access::Write && !writable && self.cr0 & CR0_WP != 0 {
            return Walk::Done(Translation::PageFault(PF_PRESENT | write_bit));
        }
        for &(at, entry, flags) in used.iter().take(count) {
            if !set_flags || entry & flags == flags {
                continue;
            }
            match ram.compare_exchange_u64(at, entry, entry | flags) {
                Ok(true) => {}
                Ok(false) => return Walk::Changed,
                Err(_) => return Walk::Done(Translation::Unknown),
            }
        }
        Walk::Done(Translation::Physical(physical))
    }
}

enum Walk {
    Done(Translation),
    /// An entry changed between reading it and setting its flags: walk again.
    Changed,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    const TABLE: u64 = PRESENT | WRITABLE | ACCESSED;
    const PAGE: u64 = PRESENT | WRITABLE | ACCESSED | DIRTY;

    fn paging() -> Paging {
        Paging {
            cr3: PML4,
            cr0: CR0_WP,
            cr4: 0,
            efer: EFER_NXE,
            rflags: 0x2,
            physical_bits: 40,
            gib_pages: true,
        }
    }

    fn entry(ram: &GuestRam, at: u64, value: u64) {
        ram.write(at, &value.to_le_bytes()).unwrap();
    }

    fn read(ram: &GuestRam, at: u64) -> u64 {
        ram.load_u64(at).unwrap()
    }

    /// Virtual 0x40_0000 + i * 4 KiB -> physical 0x10_0000 + i * 4 KiB (pages 0..3), and the
    /// 2 MiB page at virtual 0x60_0000 -> physical 0x20_0000.
    fn tables() -> GuestRam {
        let ram = GuestRam::new(4 << 20).unwrap();
        entry(&ram, PML4, PDPT | TABLE);
        entry(&ram, PDPT, PD | TABLE);
        entry(&ram, PD + 2 * 8, PT | TABLE);
        entry(&ram, PD + 3 * 8, 0x20_0000 | PAGE | PAGE_SIZE_BIT);
        for i in 0..4 {
            entry(&ram, PT + i * 8, (0x10_0000 + i * 0x1000) | PAGE);
        }
        ram
    }

    #[test]
    fn mapped_pages_translate_at_every_size() {
        let ram = tables();
        let p = paging();
        assert_eq!(
            p.translate(&ram, 0x40_1234, Access::Read),
            Translation::Physical(0x10_1234)
        );
        assert_eq!(
            p.translate(&ram, 0x6f_fffe, Access::Write),
            Translation::Physical(0x2f_fffe)
        );
        // A 1 GiB page.
        entry(&ram, PDPT + 8, 0x4000_0000 | PAGE | PAGE_SIZE_BIT);
        assert_eq!(
            p.translate(&ram, 0x4123_4567, Access::Read),
            Translation::Physical(0x4123_4567)
        );
    }

    #[test]
    fn faults_say_what_the_cpu_says() {
        let ram = tables();
        let p = paging();
        // Not present, at the page and at a table.
        entry(&ram, PT + 8, 0);
        assert_eq!(
            p.translate(&ram, 0x40_1000, Access::Write),
            Translation::PageFault(PF_WRITE)
        );
        assert_eq!(
            p.translate(&ram, 0x80_0000_0000, Access::Read),
            Translation::PageFault(0)
        );
        // A reserved address bit, a reserved bit of a 2 MiB page, PS in a PML4E.
        entry(&ram, PT + 16, 0x10_2000 | PAGE | (1 << 45));
        assert_eq!(
            p.translate(&ram, 0x40_2000, Access::Read),
            Translation::PageFault(PF_PRESENT | PF_RESERVED)
        );
        entry(
            &ram,
            PD + 3 * 8,
            0x20_0000 | PAGE | PAGE_SIZE_BIT | (1 << 13),
        );
        assert_eq!(
            p.translate(&ram, 0x60_0000, Access::Write),
            Translation::PageFault(PF_PRESENT | PF_RESERVED | PF_WRITE)
        );
        entry(&ram, PML4 + 8, PDPT | TABLE | PAGE_SIZE_BIT);
        assert_eq!(
            p.translate(&ram, 0x80_0000_0000, Access::Read),
            Translation::PageFault(PF_PRESENT | PF_RESERVED)
        );
        // XD is reserved without EFER.NXE; a 1 GiB page without 1 GiB pages.
        entry(&ram, PT + 24, 0x10_3000 | PAGE | EXECUTE_DISABLE);
        assert_eq!(
            p.translate(&ram, 0x40_3000, Access::Read),
            Translation::Physical(0x10_3000)
        );
        let no_nx = Paging { efer: 0, ..p };
        assert_eq!(
            no_nx.translate(&ram, 0x40_3000, Access::Read),
            Translation::PageFault(PF_PRESENT | PF_RESERVED)
        );
        entry(&ram, PDPT + 8, 0x4000_0000 | PAGE | PAGE_SIZE_BIT);
        let no_gib = Paging {
            gib_pages: false,
            ..p
        };
        assert_eq!(
            no_gib.translate(&ram, 0x4000_0000, Access::Read),
            Translation::PageFault(PF_PRESENT | PF_RESERVED)
        );
    }

    #[test]
    fn kernel_writes_honour_wp_and_smap_honours_ac() {
        let ram = tables();
        let p = paging();
        entry(&ram, PT, 0x10_0000 | PRESENT | ACCESSED | DIRTY);
        assert_eq!(
            p.translate(&ram, 0x40_0000, Access::Write),
            Translation::PageFault(PF_PRESENT | PF_WRITE)
        );
        assert_eq!(
            p.translate(&ram, 0x40_0000, Access::Read),
            Translation::Physical(0x10_0000)
        );
        let no_wp = Paging { cr0: 0, ..p };
        assert_eq!(
            no_wp.translate(&ram, 0x40_0000, Access::Write),
            Translation::Physical(0x10_0000)
        );
        // A user page: SMAP refuses kernel access unless RFLAGS.AC is set.
        for at in [PML4, PDPT, PD + 16] {
            entry(&ram, at, read(&ram, at) | USER);
        }
        entry(&ram, PT + 8, 0x10_1000 | PAGE | USER);
        let smap = Paging { cr4: CR4_SMAP, ..p };
        assert_eq!(
            smap.translate(&ram, 0x40_1000, Access::Read),
            Translation::PageFault(PF_PRESENT)
        );
        let ac = Paging {
            rflags: RFLAGS_AC | 0x2,
            ..smap
        };
        assert_eq!(
            ac.translate(&ram, 0x40_1000, Access::Write),
            Translation::Physical(0x10_1000)
        );
        // Protection keys on a user page: not guessed.
        let pke = Paging { cr4: CR4_PKE, ..p };
        assert_eq!(
            pke.translate(&ram, 0x40_1000, Access::Read),
            Translation::Unknown
        );
        assert_eq!(
            pke.translate(&ram, 0x60_0000, Access::Read),
            Translation::Physical(0x20_0000)
        );
    }

    #[test]
    fn accessed_and_dirty_flags_are_set_as_the_cpu_sets_them() {
        let ram = tables();
        let p = paging();
        entry(&ram, PDPT, PD | PRESENT | WRITABLE);
        entry(&ram, PT, 0x10_0000 | PRESENT | WRITABLE);
        assert_eq!(
            p.translate(&ram, 0x40_0000, Access::Read),
            Translation::Physical(0x10_0000)
        );
        assert_eq!(read(&ram, PDPT), PD | TABLE);
        assert_eq!(read(&ram, PT), 0x10_0000 | PRESENT | WRITABLE | ACCESSED);
        assert_eq!(
            p.translate(&ram, 0x40_0000, Access::Write),
            Translation::Physical(0x10_0000)
        );
        assert_eq!(read(&ram, PT), 0x10_0000 | PAGE);
        // Nothing is set where the access faults, is only looked at, or only checked.
        entry(&ram, PT + 16, 0x10_2000 | PRESENT | WRITABLE);
        assert_eq!(
            p.check(&ram, 0x40_2000, Access::Write),
            Translation::Physical(0x10_2000)
        );
        assert_eq!(read(&ram, PT + 16), 0x10_2000 | PRESENT | WRITABLE);
        entry(&ram, PT + 8, 0x10_1000 | PRESENT);
        assert_eq!(
            p.translate(&ram, 0x40_1000, Access::Write),
            Translation::PageFault(PF_PRESENT | PF_WRITE)
        );
        assert_eq!(
            p.translate(&ram, 0x40_1000, Access::Peek),
            Translation::Physical(0x10_1000)
        );
        assert_eq!(read(&ram, PT + 8), 0x10_1000 | PRESENT);
    }

    #[test]
    fn tables_outside_ram_are_unknown_and_canonical_follows_la57() {
        let ram = tables();
        let p = paging();
        entry(&ram, PD + 8, 0xff_fff0_0000 | TABLE);
        assert_eq!(
            p.translate(&ram, 0x20_0000, Access::Read),
            Translation::Unknown
        );
        let beyond = Paging {
            cr3: 0x1_0000_0000,
            ..p
        };
        assert_eq!(
            beyond.translate(&ram, 0, Access::Read),
            Translation::Unknown
        );
        assert!(p.is_canonical(0x7fff_ffff_ffff));
        assert!(p.is_canonical(0xffff_8000_0000_0000));
        assert!(!p.is_canonical(0x8000_0000_0000));
        assert!(!p.is_canonical(0x8000_0000_0000_0000));
        let la57 = Paging { cr4: CR4_LA57, ..p };
        assert!(la57.is_canonical(0x8000_0000_0000));
        assert!(!la57.is_canonical(0x0100_0000_0000_0000));
        // Five levels: the PML5 entry comes first.
        let ram = GuestRam::new(4 << 20).unwrap();
        entry(&ram, 0x5000, PML4 | TABLE);
        entry(&ram, PML4, PDPT | TABLE);
        entry(&ram, PDPT, 0x4000_0000 | PAGE | PAGE_SIZE_BIT);
        let five = Paging {
            cr3: 0x5000,
            ..la57
        };
        assert_eq!(
            five.translate(&ram, 0x1234, Access::Read),
            Translation::Physical(0x4000_1234)
        );
    }
}
