//! The system-call probe: whether a 64-bit `syscall` and a 32-bit `int $0x80` at CPL3 enter
//! CPL0 ([`SystemCalls`]), each tried on a vCPU of its own in a probe VM given user segments, a
//! TSS and user-accessible page tables; and, where `syscall` is left half done, whether
//! understudy's completion of it ([`PageFaultTrap`]) works on this host.

use kvm_bindings::{kvm_msr_entry, kvm_regs, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};

use super::fault_trap::{AtTrap, PageFaultTrap};
use super::half_syscall::{MSR_LSTAR, MSR_SFMASK, MSR_STAR};
use super::probe::{probe_vm, write_gate, HLT, KERNEL_CS, PROBE_DATA, PROBE_IDT};
use super::{SyscallPath, SystemCalls};
use crate::boot::regs;
use crate::error::VmError;
use crate::layout::BOOT_STACK_POINTER;
use crate::memory::GuestRam;

/// The user-mode probes: a GDT with user segments and a TSS, user-accessible page tables (4 KiB
/// pages over the first 2 MiB, so that one page can be the kernel's alone), the stack the CPU
/// switches to on an interrupt from user mode, and the user stack.
const USER_GDT: u64 = 0x3000;
const USER_PML4: u64 = 0x4000;
const USER_PDPT: u64 = 0x5000;
const USER_PD: u64 = 0x6000;
const USER_TSS: u64 = 0x7000;
const USER_PT: u64 = 0x4_0000;
const USER_KERNEL_STACK: u64 = 0x3_8000;
const USER_STACK: u64 = 0x3_0000;
/// The supervisor-only page of the `syscall` probe: the kernel's entry point (`LSTAR`) and,
/// half a page on, its page-fault handler.
const SUPERVISOR_PAGE: u64 = 0x1_3000;
const SYSCALL_PAGE_FAULT_HANDLER: u64 = SUPERVISOR_PAGE + 0x800;
/// A page that is not there, for page faults on purpose (`cost`).
pub(super) const NOT_PRESENT_PAGE: u64 = 0x1_4000;
/// Selectors: the boot protocol's code ([`KERNEL_CS`]) and data (so the boot segment state
/// stays valid), user data, 64-bit and 32-bit user code, the TSS.
const USER_DS: u8 = 0x20 | 3;
const USER_CS64: u8 = 0x28 | 3;
const USER_CS32: u8 = 0x30 | 3;
const USER_TR: u16 = 0x38;
/// `STAR[63:48]`: `sysret` makes 64-bit user code this + 16 and user data this + 8, as Linux
/// has it.
const SYSRET_BASE: u64 = 0x18 | 3;
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
/// Present, writable, user; accessed and dirty set so the walker never writes.
const USER_TABLE_ENTRY: u64 = 0x27;
const USER_PAGE: u64 = 0x67;
const SUPERVISOR_ONLY: u64 = 0x63;
/// Linux's `SFMASK`: TF, DF, IF, IOPL, AC, NT.
const LINUX_SFMASK: u64 = 0x4_7700;
/// User mode runs with interrupts on, as it does under any kernel.
const USER_RFLAGS: u32 = 0x202;
const EFER_SCE: u64 = 1 << 0;
/// The i386 system-call vector, and the page-fault vector.
const INT80_VECTOR: u64 = 0x80;
const PAGE_FAULT_VECTOR: u64 = 14;
/// The most exits the `syscall` probe takes: the trap, then the entry's `hlt`.
const SYSCALL_PROBE_EXITS: usize = 4;

/// Runs the system-call probes ([`syscall_path`], [`enters_kernel`]) in a VM of their own.
pub(super) fn probe_system_calls(kvm: &Kvm) -> Result<SystemCalls, VmError> {
    let (vm, ram) = user_mode_vm(kvm)?;
    Ok(SystemCalls {
        syscall: syscall_path(&vm, &ram)?,
        int80: enters_kernel(&vm, &ram, KernelEntry::Int80)?,
    })
}

/// A way for user mode to enter the kernel, probed on its own vCPU.
#[derive(Debug, Clone, Copy)]
pub(super) enum KernelEntry {
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

    /// Where its code goes: the CPL0 `iretq` to user mode, then (+0x800) the user code.
    fn code(self) -> u64 {
        match self {
            KernelEntry::Syscall => 0x1_1000,
            KernelEntry::Int80 => 0x1_2000,
        }
    }

    /// The kernel's entry point: for `syscall` on a page only the kernel may use.
    fn target(self) -> u64 {
        match self {
            KernelEntry::Syscall => SUPERVISOR_PAGE,
            KernelEntry::Int80 => self.code() + 0xc00,
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

/// The GDT (with user segments and a TSS), TSS and identity page tables (user-accessible but
/// for [`SUPERVISOR_PAGE`], and [`NOT_PRESENT_PAGE`] not there) the user-mode probes share.
fn write_user_mode_tables(ram: &GuestRam) -> Result<(), VmError> {
    let gdt: Vec<u8> = USER_GDT_ENTRIES
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    ram.write(USER_GDT, &gdt)?;
    ram.write(USER_TSS + 4, &USER_KERNEL_STACK.to_le_bytes())?; // RSP0
    ram.write(USER_PML4, &(USER_PDPT | USER_TABLE_ENTRY).to_le_bytes())?;
    ram.write(USER_PDPT, &(USER_PD | USER_TABLE_ENTRY).to_le_bytes())?;
    ram.write(USER_PD, &(USER_PT | USER_TABLE_ENTRY).to_le_bytes())?;
    let table: Vec<u8> = (0..512u64)
        .map(|page| {
            let at = page << 12;
            match at {
                SUPERVISOR_PAGE => at | SUPERVISOR_ONLY,
                NOT_PRESENT_PAGE => 0,
                _ => at | USER_PAGE,
            }
        })
        .flat_map(|entry| entry.to_le_bytes())
        .collect();
    ram.write(USER_PT, &table)?;
    Ok(())
}

/// The code of a user-mode probe: what user mode runs after the `iretq`, the kernel's entry
/// point, and (for `syscall`) the page-fault handler.
pub(super) struct ProbeCode {
    pub user: Vec<u8>,
    pub kernel_entry: Vec<u8>,
    pub page_fault_handler: Vec<u8>,
}

impl ProbeCode {
    /// The probe's own: user code that records that it ran and executes the entry
    /// instruction; an entry point that records that it ran and executes `hlt`, which exits
    /// to us at CPL0 and faults at CPL3; a page-fault handler (`endbr64; hlt`) where a fault
    /// stops.
    fn of(entry: KernelEntry) -> ProbeCode {
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
        let kernel_reached = (entry.kernel_reached() as u32).to_le_bytes();
        ProbeCode {
            user: [&user[..], &[HLT]].concat(),
            // movl $1, kernel_reached; hlt
            kernel_entry: [&[0xc7, 0x04, 0x25][..], &kernel_reached, &one, &[HLT]].concat(),
            page_fault_handler: vec![0xf3, 0x0f, 0x1e, 0xfa, HLT],
        }
    }
}

/// The probe VM with the user-mode tables.
pub(super) fn user_mode_vm(kvm: &Kvm) -> Result<(VmFd, GuestRam), VmError> {
    let (vm, ram) = probe_vm(kvm)?;
    write_user_mode_tables(&ram)?;
    Ok((vm, ram))
}

/// A fresh vCPU for `entry`'s probe running `code`, at CPL0 about to `iretq` to the user code.
pub(super) fn user_mode_vcpu(
    vm: &VmFd,
    ram: &GuestRam,
    entry: KernelEntry,
    code: &ProbeCode,
) -> Result<kvm_ioctls::VcpuFd, VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let (kernel_code, user_code, target) = (entry.code(), entry.code() + 0x800, entry.target());
    let user_cs = match entry {
        KernelEntry::Syscall => USER_CS64,
        KernelEntry::Int80 => USER_CS32,
    };
    let to_user = [
        &[0x6a, USER_DS][..],                   // push $user_ds
        &[0x68][..],                            // push $stack
        &(USER_STACK as u32).to_le_bytes()[..], //
        &[0x68][..],                            // push $rflags
        &USER_RFLAGS.to_le_bytes()[..],         //
        &[0x6a, user_cs][..],                   // push $user_cs
        &[0x68][..],                            // push $user_code
        &(user_code as u32).to_le_bytes()[..],  //
        &[0x48, 0xcf][..],                      // iretq
    ]
    .concat();
    ram.write(kernel_code, &to_user)?;
    ram.write(user_code, &code.user)?;
    ram.write(target, &code.kernel_entry)?;

    let vcpu = vm
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
    // Only the gate the entry needs is present: any other exception is a triple fault.
    let vector = match entry {
        KernelEntry::Syscall => PAGE_FAULT_VECTOR,
        KernelEntry::Int80 => INT80_VECTOR,
    };
    sregs.idt.limit = (16 * (vector + 1) - 1) as u16;
    match entry {
        KernelEntry::Syscall => {
            ram.write(SYSCALL_PAGE_FAULT_HANDLER, &code.page_fault_handler)?;
            write_gate(ram, PAGE_FAULT_VECTOR, SYSCALL_PAGE_FAULT_HANDLER, 0)?;
            sregs.efer |= EFER_SCE;
        }
        KernelEntry::Int80 => write_gate(ram, INT80_VECTOR, target, 3)?,
    }
    vcpu.set_sregs(&sregs).map_err(kvm_step("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: kernel_code,
        rsp: BOOT_STACK_POINTER,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_step("KVM_SET_REGS"))?;
    Ok(vcpu)
}

/// Sets `syscall`'s MSRs as Linux does, with the probe's entry point: whether KVM took them.
pub(super) fn set_syscall_msrs(vcpu: &kvm_ioctls::VcpuFd) -> Result<bool, VmError> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        msr(MSR_STAR, (SYSRET_BASE << 48) | (u64::from(KERNEL_CS) << 32)),
        msr(MSR_LSTAR, KernelEntry::Syscall.target()),
        msr(MSR_SFMASK, LINUX_SFMASK),
    ];
    // Three entries always fit.
    let msrs = Msrs::from_entries(&entries).expect("three MSR entries");
    let written = vcpu.set_msrs(&msrs).map_err(|source| VmError::Kvm {
        step: "KVM_SET_MSRS",
        source,
    })?;
    Ok(written == entries.len())
}

/// Whether the word at `at` was set to 1 by the probe's code.
fn reached(ram: &GuestRam, at: u64) -> Result<bool, VmError> {
    let mut word = [0u8; 4];
    ram.read(at, &mut word)?;
    Ok(u32::from_le_bytes(word) == 1)
}

/// How a 64-bit `syscall` from CPL3 reaches `LSTAR`, on a page only the kernel may use. On
/// hardware that runs it, the entry point halts at CPL0. On a host that leaves it half done,
/// the fetch at `LSTAR` faults in user mode: the probe lays the trap over its page-fault
/// handler as a guest's vCPU would ([`PageFaultTrap`]), and the completion must take the
/// entry point to its `hlt` at CPL0 for [`SyscallPath::HalfDone`]. If the user code never
/// ran, nothing is concluded (taken as entering).
fn syscall_path(vm: &VmFd, ram: &GuestRam) -> Result<SyscallPath, VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let entry = KernelEntry::Syscall;
    let mut vcpu = user_mode_vcpu(vm, ram, entry, &ProbeCode::of(entry))?;
    if !set_syscall_msrs(&vcpu)? {
        tracing::debug!("host probe could not set the syscall MSRs; syscall taken as working");
        return Ok(SyscallPath::Enters);
    }
    let mut trap = PageFaultTrap::completing();
    let probe_state = |source| VmError::State {
        what: "the syscall probe's vCPU".into(),
        source,
    };
    trap.lay(&vcpu, ram).map_err(probe_state)?;
    let mut completed = false;
    let mut exits = Vec::new();
    for _ in 0..SYSCALL_PROBE_EXITS {
        let exit = vcpu.run();
        exits.push(format!("{exit:?}"));
        match exit {
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is live.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                match trap
                    .at_refused_int3(&vcpu, ram, suberror)
                    .map_err(probe_state)?
                {
                    Some(AtTrap::Syscall) => completed = true,
                    Some(AtTrap::PageFault) => {}
                    None => break,
                }
            }
            _ => break,
        }
    }
    if !reached(ram, entry.user_reached())? {
        tracing::debug!(?exits, "host probe: user mode never ran; taken as working");
        return Ok(SyscallPath::Enters);
    }
    let cs = vcpu.get_sregs().map_err(kvm_step("KVM_GET_SREGS"))?.cs;
    let halted = exits.last().is_some_and(|exit| exit == "Ok(Hlt)");
    let path = match (
        reached(ram, entry.kernel_reached())? && halted && cs.selector == KERNEL_CS,
        completed,
    ) {
        (true, false) => SyscallPath::Enters,
        (true, true) => SyscallPath::HalfDone,
        (false, _) => SyscallPath::Fails,
    };
    if path != SyscallPath::Enters {
        tracing::debug!(
            ?path,
            ?exits,
            cs = cs.selector,
            "host probe: `syscall` from user mode did not enter the kernel by itself"
        );
    }
    Ok(path)
}

/// Whether `int $0x80` takes user mode into the kernel at CPL0, through an interrupt gate
/// with DPL3: its entry point must halt at CPL0. If the user code never ran, nothing is
/// concluded (taken as working).
fn enters_kernel(vm: &VmFd, ram: &GuestRam, entry: KernelEntry) -> Result<bool, VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let mut vcpu = user_mode_vcpu(vm, ram, entry, &ProbeCode::of(entry))?;
    let exit = match vcpu.run() {
        Ok(VcpuExit::Hlt) => None,
        other => Some(format!("{other:?}")),
    };
    if !reached(ram, entry.user_reached())? {
        tracing::debug!(
            ?entry,
            ?exit,
            "host probe: user mode never ran; taken as working"
        );
        return Ok(true);
    }
    let cs = vcpu.get_sregs().map_err(kvm_step("KVM_GET_SREGS"))?.cs;
    let works = reached(ram, entry.kernel_reached())? && exit.is_none() && cs.selector == KERNEL_CS;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// On every host: a `syscall` from user mode either enters the kernel by itself or is
    /// finished by understudy's trap, with the same code a guest's vCPU runs.
    #[test]
    fn user_mode_reaches_the_kernel_with_syscall() {
        let Ok(kvm) = Kvm::new() else {
            println!("skipped: no /dev/kvm");
            return;
        };
        let calls = probe_system_calls(&kvm).unwrap();
        println!("{calls:?}");
        assert!(calls.syscall.works(), "{calls:?}");
    }
}
