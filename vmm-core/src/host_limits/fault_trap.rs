//! A trap over the first instruction of the guest's page-fault handler, where a `syscall` the
//! host left half done ends up ([`half_syscall`](super::half_syscall)), so that the vCPU
//! thread can finish it. One [`PageFaultTrap`] per vCPU, run on that vCPU's thread.
//!
//! The trap is an `int3` laid over the handler's first byte. On the hosts that need it the
//! emulator refuses `int3` at CPL0, so every page fault the guest takes stops the vCPU at the
//! handler with `KVM_EXIT_INTERNAL_ERROR` ([`PageFaultTrap::at_refused_int3`]). There the
//! fault's frame says whether it is a half-done `syscall`: if so, the registers are set to
//! what `syscall` would have made them and the guest's kernel runs its system-call entry,
//! never seeing the fault; otherwise the instruction the trap covers is replayed (RIP past
//! it, its effect on RFLAGS) and the guest's handler runs on as if nothing had happened, CR2
//! untouched. After a completed `syscall` CR2 is set back to the address of the last fault
//! the guest did see on this vCPU, where this thread saw it (not across a restore: then it
//! keeps `LSTAR`).
//!
//! Where the handler is: the gate for vector 14 in the IDT the vCPU has loaded (IDTR), read
//! through the guest's page tables. [`PageFaultTrap::look`] checks it, on the vCPU's own
//! thread whenever the vCPU has stopped for something else, at most every
//! [`LOOK_INTERVAL`], and lays the trap once the guest has turned `syscall` on (EFER.SCE)
//! and its handler starts with an instruction the trap knows how to replay: so a kernel that
//! moves its IDT or rewrites its handler's first bytes (Linux applies its alternatives at
//! boot) gets the trap laid again.
//!
//! Nothing is kept about a trap but guest memory: the covered instruction is told from the
//! bytes after the `int3` (only instructions of two bytes or more, whose tails differ, are
//! covered). A snapshot, a checkpoint or a failover, even one taken with a vCPU stopped at
//! the trap, resumes on any host that needs it and the vCPU takes the trap there.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, KVM_INTERNAL_ERROR_EMULATION};
use kvm_ioctls::VcpuFd;

use super::complete::{paging, peek_virtual, read_code, INT3};
use super::half_syscall::{
    half_done_syscall, FaultFrame, SyscallMsrs, MSR_LSTAR, MSR_SFMASK, MSR_STAR,
};
use super::{HostLimits, SyscallPath};
use crate::memory::paging::{Access, Translation};
use crate::memory::GuestRam;
use crate::state::{read_msrs, StateError};

/// How often a vCPU looks whether its page-fault handler has the trap.
pub const LOOK_INTERVAL: Duration = Duration::from_millis(100);
/// The page-fault vector and the size of a 64-bit IDT gate.
const PAGE_FAULT_VECTOR: u64 = 14;
const GATE_SIZE: u64 = 16;
const CR4_SMAP: u64 = 1 << 21;
const EFER_SCE: u64 = 1 << 0;
const RFLAGS_AC: u64 = 1 << 18;

/// An instruction the trap may cover, and what replaying it does.
struct Coverable {
    bytes: &'static [u8],
    effect: Effect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Nothing but RIP past it: the NOPs, and `endbr64` (a NOP to a CPU, and after an
    /// exception's delivery, which starts no indirect branch, also where IBT is on).
    None,
    /// `clac`: RFLAGS.AC cleared (laid only where the guest has SMAP on).
    ClearAc,
}

/// What the trap covers: the first instructions of Linux's exception entries (`endbr64`, and
/// the `clac` alternative or the NOPs in its place) and the other multi-byte NOPs. No two
/// share the bytes after the first, so a laid trap says what it covers.
const COVERABLE: &[Coverable] = &[
    Coverable {
        bytes: &[0xf3, 0x0f, 0x1e, 0xfa],
        effect: Effect::None,
    },
    Coverable {
        bytes: &[0x0f, 0x01, 0xca],
        effect: Effect::ClearAc,
    },
    Coverable {
        bytes: &[0x66, 0x90],
        effect: Effect::None,
    },
    Coverable {
        bytes: &[0x0f, 0x1f, 0x00],
        effect: Effect::None,
    },
    Coverable {
        bytes: &[0x0f, 0x1f, 0x40, 0x00],
        effect: Effect::None,
    },
    Coverable {
        bytes: &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        effect: Effect::None,
    },
    Coverable {
        bytes: &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
        effect: Effect::None,
    },
];

/// The coverable instruction `code` starts with.
fn coverable(code: &[u8]) -> Option<&'static Coverable> {
    COVERABLE.iter().find(|c| code.starts_with(c.bytes))
}

/// The instruction a trap at the start of `code` covers.
fn covered(code: &[u8]) -> Option<&'static Coverable> {
    let (&first, tail) = code.split_first()?;
    if first != INT3 {
        return None;
    }
    COVERABLE
        .iter()
        .find(|c| c.bytes.get(1..).is_some_and(|rest| tail.starts_with(rest)))
}

/// Whether this vCPU's guest gets the completion: decided the first time a guest that uses
/// `syscall` is seen, by asking how this host runs it (a probe of its own, once per process).
#[derive(Debug, Clone)]
enum Decision {
    Undecided(HostLimits),
    Complete,
    Off,
}

/// What a look found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Not now: no `syscall`, no handler, or not one the trap can cover.
    Nothing,
    /// The trap is at this handler already.
    Laid(u64),
    /// The trap was laid at this handler just now.
    LaidNow(u64),
}

/// What a refused `int3` at the trap turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtTrap {
    /// A half-done `syscall`, now entered.
    Syscall,
    /// Any other page fault: the covered instruction was replayed.
    PageFault,
}

/// One vCPU's trap: when it looks next, the decision, and the last fault it saw.
#[derive(Debug, Clone)]
pub struct PageFaultTrap {
    decision: Decision,
    next_look: Option<Instant>,
    /// CR2 of the last page fault the guest took through the trap on this vCPU.
    last_fault_address: Option<u64>,
}

impl PageFaultTrap {
    /// A trap for a vCPU of a host that refuses `int3` at CPL0; whether it is used is decided
    /// on the first look at a guest that uses `syscall`.
    pub fn new(limits: HostLimits) -> Self {
        Self::with(Decision::Undecided(limits))
    }

    /// A trap known to be needed (the host's own probe).
    pub(super) fn completing() -> Self {
        Self::with(Decision::Complete)
    }

    fn with(decision: Decision) -> Self {
        PageFaultTrap {
            decision,
            next_look: None,
            last_fault_address: None,
        }
    }

    /// Looks at the next chance, not [`LOOK_INTERVAL`] later: after the vCPU's state was
    /// replaced (a restore), whose IDT may be anywhere. What was known of CR2 goes with it.
    pub fn look_soon(&mut self) {
        self.next_look = None;
        self.last_fault_address = None;
    }

    /// Looks, if it is time, whether the guest's page-fault handler has the trap, and lays it
    /// if it should. The vCPU must not be running (its own thread, between exits).
    pub fn look(&mut self, vcpu: &VcpuFd, ram: &GuestRam) -> Result<Look, StateError> {
        let now = Instant::now();
        if matches!(self.decision, Decision::Off) || self.next_look.is_some_and(|at| now < at) {
            return Ok(Look::Nothing);
        }
        self.next_look = Some(now + LOOK_INTERVAL);
        self.lay(vcpu, ram)
    }

    pub(super) fn lay(&mut self, vcpu: &VcpuFd, ram: &GuestRam) -> Result<Look, StateError> {
        let step = |step| move |source| StateError { step, source };
        let sregs = vcpu.get_sregs().map_err(step("KVM_GET_SREGS"))?;
        if sregs.efer & EFER_SCE == 0 {
            return Ok(Look::Nothing);
        }
        let regs = vcpu.get_regs().map_err(step("KVM_GET_REGS"))?;
        let paging = paging(&sregs, &regs, None);
        let Some(handler) = page_fault_handler(ram, &paging, &sregs) else {
            return Ok(Look::Nothing);
        };
        let code = read_code(ram, &paging, handler);
        let laid = covered(&code).is_some();
        let instruction =
            coverable(&code).filter(|c| c.effect != Effect::ClearAc || sregs.cr4 & CR4_SMAP != 0);
        if (laid || instruction.is_some()) && !self.completes() {
            return Ok(Look::Nothing);
        }
        if laid {
            return Ok(Look::Laid(handler));
        }
        let Some(instruction) = instruction else {
            return Ok(Look::Nothing);
        };
        let Translation::Physical(at) = paging.check(ram, handler, Access::Peek) else {
            return Ok(Look::Nothing);
        };
        // One byte, in one atomic step, and only if it is still what was read: another vCPU
        // or the guest itself may be writing there.
        let word_at = at & !7;
        let shift = (at & 7) * 8;
        let laid = ram.load_u64(word_at).is_ok_and(|word| {
            (word >> shift) as u8 == instruction.bytes[0]
                && ram
                    .compare_exchange_u64(
                        word_at,
                        word,
                        (word & !(0xff << shift)) | (u64::from(INT3) << shift),
                    )
                    .unwrap_or(false)
        });
        Ok(if laid {
            Look::LaidNow(handler)
        } else {
            Look::Nothing
        })
    }

    /// Whether this host needs the trap: asked once (see [`Decision`]).
    fn completes(&mut self) -> bool {
        if let Decision::Undecided(limits) = &self.decision {
            self.decision = match limits.system_calls().syscall {
                SyscallPath::HalfDone => Decision::Complete,
                SyscallPath::Enters | SyscallPath::Fails => Decision::Off,
            };
        }
        matches!(self.decision, Decision::Complete)
    }

    /// At a refused instruction: if it is the trap's `int3` at the guest's page-fault handler,
    /// completes the half-done `syscall` the fault is, or replays the covered instruction, and
    /// says which; `None`, changing nothing, for anything else.
    pub fn at_refused_int3(
        &mut self,
        vcpu: &VcpuFd,
        ram: &GuestRam,
        suberror: u32,
    ) -> Result<Option<AtTrap>, StateError> {
        if suberror != KVM_INTERNAL_ERROR_EMULATION || matches!(self.decision, Decision::Off) {
            return Ok(None);
        }
        let step = |step| move |source| StateError { step, source };
        let mut sregs = vcpu.get_sregs().map_err(step("KVM_GET_SREGS"))?;
        if sregs.cs.selector & 3 != 0 || sregs.cs.l == 0 {
            return Ok(None);
        }
        let mut regs = vcpu.get_regs().map_err(step("KVM_GET_REGS"))?;
        let paging = paging(&sregs, &regs, None);
        if page_fault_handler(ram, &paging, &sregs) != Some(regs.rip) {
            return Ok(None);
        }
        let Some(instruction) = covered(&read_code(ram, &paging, regs.rip)) else {
            return Ok(None);
        };
        // Another vCPU may have laid the trap, or a snapshot brought it along.
        if !self.completes() {
            return Ok(None);
        }
        let mut frame = [0u8; FaultFrame::SIZE];
        if peek_virtual(ram, &paging, regs.rsp, &mut frame) {
            let frame = FaultFrame::from_bytes(&frame);
            // Only a user-mode fetch fault at CR2 can be a syscall: the MSRs are read then.
            if frame.error_code & 0x4 != 0 && frame.rip == sregs.cr2 {
                let msrs = syscall_msrs(vcpu)?;
                if let Some(entry) = half_done_syscall(&frame, &regs, &sregs, &msrs) {
                    entry.apply(&mut regs, &mut sregs);
                    if let Some(address) = self.last_fault_address {
                        sregs.cr2 = address;
                    }
                    // Segments and CR2 first, then the registers that go with them.
                    vcpu.set_sregs(&sregs).map_err(step("KVM_SET_SREGS"))?;
                    vcpu.set_regs(&regs).map_err(step("KVM_SET_REGS"))?;
                    return Ok(Some(AtTrap::Syscall));
                }
            }
        }
        self.last_fault_address = Some(sregs.cr2);
        regs.rip = regs.rip.wrapping_add(instruction.bytes.len() as u64);
        if instruction.effect == Effect::ClearAc {
            regs.rflags &= !RFLAGS_AC;
        }
        vcpu.set_regs(&regs).map_err(step("KVM_SET_REGS"))?;
        Ok(Some(AtTrap::PageFault))
    }
}

/// `syscall`'s MSRs on `vcpu`.
fn syscall_msrs(vcpu: &VcpuFd) -> Result<SyscallMsrs, StateError> {
    let msrs = read_msrs(vcpu, &[MSR_STAR, MSR_LSTAR, MSR_SFMASK])?;
    let value = |index| {
        msrs.iter()
            .find(|e: &&kvm_msr_entry| e.index == index)
            .map_or(0, |e| e.data)
    };
    Ok(SyscallMsrs {
        star: value(MSR_STAR),
        lstar: value(MSR_LSTAR),
        sfmask: value(MSR_SFMASK),
    })
}

/// The target of the page-fault gate in the IDT `sregs` has loaded, if it is a present
/// interrupt or trap gate.
fn page_fault_handler(
    ram: &GuestRam,
    paging: &crate::memory::paging::Paging,
    sregs: &kvm_bindings::kvm_sregs,
) -> Option<u64> {
    const PRESENT: u64 = 1 << 47;
    const INTERRUPT_GATE: u64 = 0xe;
    const TRAP_GATE: u64 = 0xf;
    if u64::from(sregs.idt.limit) < (PAGE_FAULT_VECTOR + 1) * GATE_SIZE - 1 {
        return None;
    }
    let mut gate = [0u8; GATE_SIZE as usize];
    let at = sregs.idt.base.wrapping_add(PAGE_FAULT_VECTOR * GATE_SIZE);
    if !peek_virtual(ram, paging, at, &mut gate) {
        return None;
    }
    let (low, high) = gate.split_at(8);
    let low = u64::from_le_bytes(low.try_into().ok()?);
    let high = u64::from_le_bytes(high.try_into().ok()?);
    let kind = (low >> 40) & 0xf;
    if low & PRESENT == 0 || !(kind == INTERRUPT_GATE || kind == TRAP_GATE) {
        return None;
    }
    Some((low & 0xffff) | ((low >> 32) & 0xffff_0000) | ((high & 0xffff_ffff) << 32))
}

/// Takes a trap laid in a guest's memory away again: on a host that does not need it (a
/// snapshot taken where it was laid, restored on hardware that runs `syscall` itself, where
/// the `int3` would reach the guest). Whether one was found and taken away.
pub fn remove_trap(vcpu: &VcpuFd, ram: &GuestRam) -> Result<bool, StateError> {
    let step = |step| move |source| StateError { step, source };
    let sregs = vcpu.get_sregs().map_err(step("KVM_GET_SREGS"))?;
    let regs = vcpu.get_regs().map_err(step("KVM_GET_REGS"))?;
    let paging = paging(&sregs, &regs, None);
    let Some(handler) = page_fault_handler(ram, &paging, &sregs) else {
        return Ok(false);
    };
    let Some(instruction) = covered(&read_code(ram, &paging, handler)) else {
        return Ok(false);
    };
    let Translation::Physical(at) = paging.check(ram, handler, Access::Peek) else {
        return Ok(false);
    };
    let (word_at, shift) = (at & !7, (at & 7) * 8);
    Ok(ram.load_u64(word_at).is_ok_and(|word| {
        (word >> shift) as u8 == INT3
            && ram
                .compare_exchange_u64(
                    word_at,
                    word,
                    (word & !(0xff << shift)) | (u64::from(instruction.bytes[0]) << shift),
                )
                .unwrap_or(false)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_laid_trap_says_which_instruction_it_covers() {
        for c in COVERABLE {
            let mut laid = c.bytes.to_vec();
            laid[0] = INT3;
            laid.extend([0xfc, 0x56]);
            let found = covered(&laid).expect("covered");
            assert_eq!(found.bytes, c.bytes, "{:02x?}", c.bytes);
            assert!(coverable(&laid).is_none());
            let mut original = c.bytes.to_vec();
            original.extend([0xfc, 0x56]);
            assert_eq!(coverable(&original).map(|c| c.bytes), Some(c.bytes));
            assert!(covered(&original).is_none());
        }
        // One-byte instructions are never covered: a bare int3 says nothing.
        assert!(coverable(&[0x90, 0xfc]).is_none() && coverable(&[0xfc]).is_none());
        assert!(covered(&[INT3, 0x55]).is_none());
        assert!(covered(&[INT3]).is_none());
    }

    #[test]
    fn the_page_fault_gate_is_read_as_the_cpu_reads_it() {
        let ram = GuestRam::new(1 << 20).unwrap();
        // Identity paging for the first 2 MiB.
        ram.write(0x1000, &(0x2000u64 | 0x3).to_le_bytes()).unwrap();
        ram.write(0x2000, &(0x3000u64 | 0x3).to_le_bytes()).unwrap();
        ram.write(0x3000, &0x83u64.to_le_bytes()).unwrap();
        let paging = crate::memory::paging::Paging {
            cr3: 0x1000,
            cr0: 1 << 31,
            cr4: 1 << 5,
            efer: 1 << 10,
            rflags: 2,
            physical_bits: 46,
            gib_pages: true,
        };
        let mut sregs = kvm_bindings::kvm_sregs::default();
        sregs.idt.base = 0x8000;
        sregs.idt.limit = 0xfff;
        let handler: u64 = 0xffff_ffff_81a0_1230;
        let low =
            (handler & 0xffff) | (0x10 << 16) | (0x8e << 40) | (((handler >> 16) & 0xffff) << 48);
        ram.write(0x8000 + 14 * 16, &low.to_le_bytes()).unwrap();
        ram.write(0x8000 + 14 * 16 + 8, &(handler >> 32).to_le_bytes())
            .unwrap();
        assert_eq!(page_fault_handler(&ram, &paging, &sregs), Some(handler));
        // Not present, a task gate, or an IDT too short: none.
        sregs.idt.limit = 14 * 16 + 14;
        assert_eq!(page_fault_handler(&ram, &paging, &sregs), None);
        sregs.idt.limit = 0xfff;
        ram.write(0x8000 + 14 * 16, &(low & !(1 << 47)).to_le_bytes())
            .unwrap();
        assert_eq!(page_fault_handler(&ram, &paging, &sregs), None);
        ram.write(
            0x8000 + 14 * 16,
            &((low & !(0xf << 40)) | (0x85 << 40)).to_le_bytes(),
        )
        .unwrap();
        assert_eq!(page_fault_handler(&ram, &paging, &sregs), None);
        // An IDT on an unmapped page.
        sregs.idt.base = 0x40_0000;
        assert_eq!(page_fault_handler(&ram, &paging, &sregs), None);
    }
}
