//! The system-call probe: whether a 64-bit `syscall` and a 32-bit `int $0x80` at CPL3 enter
//! CPL0 ([`SystemCalls`]), each tried on a vCPU of its own in a probe VM given user segments, a
//! TSS and user-accessible page tables.

use kvm_bindings::{kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};

use super::probe::{probe_vm, write_gate, HLT, KERNEL_CS, PROBE_DATA, PROBE_IDT};
use super::SystemCalls;
use crate::boot::regs;
use crate::error::VmError;
use crate::layout::BOOT_STACK_POINTER;
use crate::memory::GuestRam;

/// The user-mode probes: a GDT with user segments and a TSS, user-accessible page tables, the
/// stack the CPU switches to on an interrupt from user mode, and the user stack.
const USER_GDT: u64 = 0x3000;
const USER_PML4: u64 = 0x4000;
const USER_PDPT: u64 = 0x5000;
const USER_PD: u64 = 0x6000;
const USER_TSS: u64 = 0x7000;
const USER_KERNEL_STACK: u64 = 0x3_8000;
const USER_STACK: u64 = 0x3_0000;
/// Selectors: the boot protocol's code ([`KERNEL_CS`]) and data (so the boot segment state
/// stays valid), user data, 64-bit and 32-bit user code, the TSS.
const USER_DS: u8 = 0x20 | 3;
const USER_CS64: u8 = 0x28 | 3;
const USER_CS32: u8 = 0x30 | 3;
const USER_TR: u16 = 0x38;
const TSS_LIMIT: u64 = 0x67;
const USER_GDT_ENTRIES: [u64; 9] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // 64-bit code, DPL0
    0x00cf_9300_0000_ffff, // data, DPL0
    0x00cf_f300_0000_ffff, // data, DPL3
    0x00af_fb00_0000_ffff, // 64-bit code, DPL3
    0x00cf_fb00_0000_ffff, // 32-bit code, DPL3
    // Available 64-bit TSS at USER_TSS (below 16 MiB: the high base bits are zero).
    TSS_LIMIT | ((USER_TSS & 0xff_ffff) << 16) | (0x89 << 40),
    0,
];
/// Present, writable, user; accessed and dirty set so the walker never writes; 2 MiB leaf.
const USER_TABLE_ENTRY: u64 = 0x27;
const USER_LEAF_2M: u64 = 0xe7;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SFMASK: u32 = 0xc000_0084;
const EFER_SCE: u64 = 1 << 0;
/// The i386 system-call vector.
const INT80_VECTOR: u64 = 0x80;

/// Runs the system-call probes ([`enters_kernel`]) in a VM of their own.
pub(super) fn probe_system_calls(kvm: &Kvm) -> Result<SystemCalls, VmError> {
    let (vm, ram) = probe_vm(kvm)?;
    write_user_mode_tables(&ram)?;
    Ok(SystemCalls {
        syscall: enters_kernel(&vm, &ram, KernelEntry::Syscall)?,
        int80: enters_kernel(&vm, &ram, KernelEntry::Int80)?,
    })
}

/// A way for user mode to enter the kernel, probed on its own vCPU.
#[derive(Debug, Clone, Copy)]
enum KernelEntry {
    /// `syscall` from 64-bit code, to `LSTAR`.
    Syscall,
    /// `int $0x80` from 32-bit code, through an interrupt gate with DPL3.
    Int80,
}

impl KernelEntry {
    fn vcpu_id(self) -> u64 {
        match self {
            KernelEntry::Syscall => 2,
            KernelEntry::Int80 => 3,
        }
    }

    /// Where its code goes: the CPL0 `iretq` to user mode, then (+0x800) the user code, then
    /// (+0xc00) the kernel's entry point.
    fn code(self) -> u64 {
        match self {
            KernelEntry::Syscall => 0x1_1000,
            KernelEntry::Int80 => 0x1_2000,
        }
    }

    /// Words that the user code and the kernel's entry point set to 1 when they run.
    fn user_reached(self) -> u64 {
        PROBE_DATA + 0x900 + 16 * self.vcpu_id()
    }

    fn kernel_reached(self) -> u64 {
        self.user_reached() + 8
    }
}

/// The GDT (with user segments and a TSS), TSS and user-accessible identity page tables the
/// user-mode probes share.
fn write_user_mode_tables(ram: &GuestRam) -> Result<(), VmError> {
    let gdt: Vec<u8> = USER_GDT_ENTRIES
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    ram.write(USER_GDT, &gdt)?;
    ram.write(USER_TSS + 4, &USER_KERNEL_STACK.to_le_bytes())?; // RSP0
    ram.write(USER_PML4, &(USER_PDPT | USER_TABLE_ENTRY).to_le_bytes())?;
    ram.write(USER_PDPT, &(USER_PD | USER_TABLE_ENTRY).to_le_bytes())?;
    ram.write(USER_PD, &USER_LEAF_2M.to_le_bytes())?;
    Ok(())
}

/// Whether `entry` takes user mode into the kernel at CPL0. A fresh vCPU `iretq`s from CPL0 to
/// CPL3, where the user code records that it ran and executes the entry instruction. The
/// kernel's entry point, on a user-accessible page so that it can run at either privilege,
/// records that it ran and executes `hlt`: at CPL0 that exits to us; at CPL3 it faults, and
/// with no handler for the fault the vCPU shuts down. The entry works only if the kernel's
/// entry point ran and halted at CPL0. If the user code never ran, nothing is concluded.
fn enters_kernel(vm: &VmFd, ram: &GuestRam, entry: KernelEntry) -> Result<bool, VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let (kernel_code, user_code, target) =
        (entry.code(), entry.code() + 0x800, entry.code() + 0xc00);
    let user_cs = match entry {
        KernelEntry::Syscall => USER_CS64,
        KernelEntry::Int80 => USER_CS32,
    };
    let to_user = [
        &[0x6a, USER_DS][..],                   // push $user_ds
        &[0x68][..],                            // push $stack
        &(USER_STACK as u32).to_le_bytes()[..], //
        &[0x6a, 0x02][..],                      // push $0x2 (RFLAGS)
        &[0x6a, user_cs][..],                   // push $user_cs
        &[0x68][..],                            // push $user_code
        &(user_code as u32).to_le_bytes()[..],  //
        &[0x48, 0xcf][..],                      // iretq
    ]
    .concat();
    ram.write(kernel_code, &to_user)?;
    let user_reached = (entry.user_reached() as u32).to_le_bytes();
    let one = 1u32.to_le_bytes();
    let user = match entry {
        // movl $1, user_reached (64-bit: ModRM 04, SIB 25, disp32); syscall
        KernelEntry::Syscall => {
            [&[0xc7, 0x04, 0x25][..], &user_reached, &one, &[0x0f, 0x05]].concat()
        }
        // movl $1, user_reached (32-bit: ModRM 05, disp32); int $0x80
        KernelEntry::Int80 => [&[0xc7, 0x05][..], &user_reached, &one, &[0xcd, 0x80]].concat(),
    };
    ram.write(user_code, &[&user[..], &[HLT]].concat())?;
    let kernel_reached = (entry.kernel_reached() as u32).to_le_bytes();
    // movl $1, kernel_reached; hlt
    ram.write(
        target,
        &[&[0xc7, 0x04, 0x25][..], &kernel_reached, &one, &[HLT]].concat(),
    )?;

    let mut vcpu = vm
        .create_vcpu(entry.vcpu_id())
        .map_err(kvm_step("KVM_CREATE_VCPU"))?;
    let mut sregs = regs::boot_sregs(vcpu.get_sregs().map_err(kvm_step("KVM_GET_SREGS"))?);
    sregs.gdt.base = USER_GDT;
    sregs.gdt.limit = (USER_GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.tr.selector = USER_TR;
    sregs.tr.base = USER_TSS;
    sregs.tr.limit = TSS_LIMIT as u32;
    sregs.tr.type_ = 0xb; // busy 64-bit TSS, as `ltr` leaves it
    sregs.tr.present = 1;
    sregs.tr.s = 0;
    sregs.tr.g = 0;
    sregs.idt.base = PROBE_IDT;
    sregs.cr3 = USER_PML4;
    match entry {
        KernelEntry::Syscall => {
            // Any exception is a triple fault.
            sregs.idt.limit = 0;
            sregs.efer |= EFER_SCE;
            let msr = |index, data| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            };
            let entries = [
                msr(MSR_STAR, u64::from(KERNEL_CS) << 32),
                msr(MSR_LSTAR, target),
                msr(MSR_SFMASK, 0),
            ];
            // Three entries always fit.
            let msrs = Msrs::from_entries(&entries).expect("three MSR entries");
            if vcpu.set_msrs(&msrs).map_err(kvm_step("KVM_SET_MSRS"))? != entries.len() {
                tracing::debug!(
                    "host probe could not set the syscall MSRs; syscall taken as working"
                );
                return Ok(true);
            }
        }
        KernelEntry::Int80 => {
            // Only the gate for 0x80 (and the #BP gate) is present: any exception is a
            // triple fault.
            sregs.idt.limit = (16 * (INT80_VECTOR + 1) - 1) as u16;
            write_gate(ram, INT80_VECTOR, target, 3)?;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_step("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: kernel_code,
        rsp: BOOT_STACK_POINTER,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_step("KVM_SET_REGS"))?;
    let exit = match vcpu.run() {
        Ok(VcpuExit::Hlt) => None,
        other => Some(format!("{other:?}")),
    };
    let reached = |at: u64| -> Result<bool, VmError> {
        let mut word = [0u8; 4];
        ram.read(at, &mut word)?;
        Ok(u32::from_le_bytes(word) == 1)
    };
    if !reached(entry.user_reached())? {
        tracing::debug!(
            ?entry,
            ?exit,
            "host probe: user mode never ran; taken as working"
        );
        return Ok(true);
    }
    let cs = vcpu.get_sregs().map_err(kvm_step("KVM_GET_SREGS"))?.cs;
    let works = reached(entry.kernel_reached())? && exit.is_none() && cs.selector == KERNEL_CS;
    if !works {
        tracing::debug!(
            ?entry,
            ?exit,
            cs = cs.selector,
            "host probe: user mode did not enter the kernel"
        );
    }
    Ok(works)
}
