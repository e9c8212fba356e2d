//! What the page-fault trap costs on this host ([`measure_trap_costs`]): per `syscall`
//! finished, and per page fault with and without the trap, timed in a VM of the system-call
//! probe's making. For `benches/trap.rs`; runs on the caller's thread.

use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};

use super::fault_trap::PageFaultTrap;
use super::syscalls::{
    probe_system_calls, set_syscall_msrs, user_mode_vcpu, user_mode_vm, KernelEntry, ProbeCode,
    NOT_PRESENT_PAGE,
};
use super::SyscallPath;
use crate::vm::VmError;

/// Why the trap could not be timed.
#[derive(Debug, thiserror::Error)]
pub enum TrapCostError {
    /// The VM could not be built or run.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The vCPU's state could not be read or set at the trap.
    #[error("at the trap: {0}")]
    State(#[from] crate::state::StateError),
    /// The vCPU stopped for something else than the trap or the end.
    #[error("the benchmark's vCPU stopped unexpectedly ({exit}) at rip {rip:#x}")]
    UnexpectedExit {
        /// The exit, as text.
        exit: String,
        /// Where.
        rip: u64,
    },
    /// The trap was taken fewer times than the loop ran.
    #[error("the trap was taken {taken} times in {iterations} rounds")]
    TrapMissed {
        /// How often.
        taken: u32,
        /// Rounds run.
        iterations: u32,
    },
}

/// Time per event, each over the same number of events, in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapCosts {
    /// Events per figure.
    pub iterations: u32,
    /// A `syscall` and `sysretq` round trip, the `syscall` finished at the trap.
    pub syscall: Duration,
    /// A user-mode page fault and its handler's return, with the trap laid (one exit).
    pub page_fault_trapped: Duration,
    /// The same page fault without the trap (no exit).
    pub page_fault_untrapped: Duration,
}

/// Times `iterations` of each, where this host leaves `syscall` half done; `None` elsewhere
/// (there is no trap to time).
pub fn measure_trap_costs(iterations: u32) -> Result<Option<TrapCosts>, TrapCostError> {
    let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
    if probe_system_calls(&kvm)?.syscall != SyscallPath::HalfDone {
        return Ok(None);
    }
    Ok(Some(TrapCosts {
        iterations,
        syscall: time_loop(&kvm, Loop::Syscalls, iterations)?,
        page_fault_trapped: time_loop(&kvm, Loop::PageFaults { trapped: true }, iterations)?,
        page_fault_untrapped: time_loop(&kvm, Loop::PageFaults { trapped: false }, iterations)?,
    }))
}

#[derive(Debug, Clone, Copy)]
enum Loop {
    /// User mode: `1: dec %r12; syscall; jmp 1b`. Kernel entry: `test %r12, %r12; jz 1f;
    /// sysretq; 1: hlt`.
    Syscalls,
    /// User mode: `1: mov NOT_PRESENT_PAGE, %eax; dec %r12; jnz 1b; hlt` (the `hlt` faults to
    /// a triple fault, the end). Page-fault handler: `endbr64; add $8, %rsp; addq $7, (%rsp);
    /// iretq`, past the 7-byte `mov`.
    PageFaults { trapped: bool },
}

impl Loop {
    fn code(self) -> ProbeCode {
        const HLT: u8 = 0xf4;
        let page = (NOT_PRESENT_PAGE as u32).to_le_bytes();
        match self {
            Loop::Syscalls => ProbeCode {
                user: vec![0x49, 0xff, 0xcc, 0x0f, 0x05, 0xeb, 0xf9],
                kernel_entry: vec![0x4d, 0x85, 0xe4, 0x74, 0x03, 0x48, 0x0f, 0x07, HLT],
                page_fault_handler: vec![0xf3, 0x0f, 0x1e, 0xfa, HLT],
            },
            Loop::PageFaults { .. } => ProbeCode {
                user: [
                    &[0x8b, 0x04, 0x25][..],
                    &page,
                    &[0x49, 0xff, 0xcc, 0x75, 0xf4, HLT],
                ]
                .concat(),
                kernel_entry: vec![HLT],
                page_fault_handler: vec![
                    0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xc4, 0x08, 0x48, 0x83, 0x04, 0x24, 0x07,
                    0x48, 0xcf,
                ],
            },
        }
    }
}

/// Runs `what` for `iterations` rounds in a fresh VM and returns the time per round.
fn time_loop(kvm: &Kvm, what: Loop, iterations: u32) -> Result<Duration, TrapCostError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let (vm, ram) = user_mode_vm(kvm)?;
    let mut vcpu = user_mode_vcpu(&vm, &ram, KernelEntry::Syscall, &what.code())?;
    set_syscall_msrs(&vcpu)?;
    let mut regs = vcpu.get_regs().map_err(kvm_step("KVM_GET_REGS"))?;
    regs.r12 = u64::from(iterations);
    vcpu.set_regs(&regs).map_err(kvm_step("KVM_SET_REGS"))?;
    let mut trap = PageFaultTrap::completing();
    if !matches!(what, Loop::PageFaults { trapped: false }) {
        trap.lay(&vcpu, &ram)?;
    }
    let started = Instant::now();
    let mut taken = 0u32;
    loop {
        let exit = vcpu.run();
        let exit = match exit {
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is live.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                if trap.at_refused_int3(&vcpu, &ram, suberror)?.is_some() {
                    taken += 1;
                    continue;
                }
                "KVM_EXIT_INTERNAL_ERROR".to_owned()
            }
            Ok(VcpuExit::Hlt | VcpuExit::Shutdown) => break,
            other => format!("{other:?}"),
        };
        let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
        return Err(TrapCostError::UnexpectedExit { exit, rip });
    }
    let elapsed = started.elapsed();
    let expected = match what {
        Loop::PageFaults { trapped: false } => 0,
        _ => iterations,
    };
    if taken < expected {
        return Err(TrapCostError::TrapMissed { taken, iterations });
    }
    Ok(elapsed / iterations.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the trap is needed: a loop of system calls, each finished at the trap and
    /// returned from with `sysretq`, and a loop of page faults, each replayed past the trap
    /// into a handler that returns to user mode, run to their ends with the trap taken once
    /// per round (fewer is an error).
    #[test]
    fn system_calls_and_page_faults_go_through_the_trap_every_round() {
        if Kvm::new().is_err() {
            println!("skipped: no /dev/kvm");
            return;
        }
        match measure_trap_costs(200).unwrap() {
            Some(costs) => println!("{costs:?}"),
            None => println!("this host runs `syscall` itself: no trap"),
        }
    }
}
