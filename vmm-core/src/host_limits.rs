//! What this host's KVM cannot run for a guest, found once per process by a probe VM, and the
//! workarounds understudy applies for it by default.
//!
//! Where KVM runs guest kernel code (CPL0) through an instruction emulator rather than
//! hardware virtualization — a nested, page-table-based KVM is one — the emulator may refuse
//! instructions the CPU would run: `KVM_RUN` stops with `KVM_EXIT_INTERNAL_ERROR` (suberror 1,
//! emulation failure) and a stock Linux kernel dies at the first one. The probe runs, at CPL0
//! in long mode, in a throwaway VM (no irqchip, so `hlt` exits to us), each instruction a
//! kernel uses that understudy has a workaround for, and sees which ones stop it that way.
//! A refused instruction that belongs to a CPU feature is best never used: its feature is
//! hidden from every guest's CPUID, where the probe sees hiding take; where it does not,
//! Linux kernels are told on their command line to leave the feature alone:
//!
//! | refused at CPL0 | feature hidden | else, Linux option |
//! | --- | --- | --- |
//! | `lock cmpxchg16b` | CX16 | none known |
//! | `xrstor` | XSAVE | `noxsave` |
//! | `clac` | SMAP | `clearcpuid=smap` |
//! | `rdgsbase`, `wrgsbase` | FSGSBASE | `nofsgsbase` |
//! | `invpcid` | INVPCID | `noinvpcid` |
//! | `rdpid` | RDPID | none known |
//! | `popcnt` | POPCNT | `clearcpuid=popcnt` |
//! | `tzcnt` | BMI1 | none known |
//! | `movbe` | MOVBE | none known |
//! | `movd %ecx, %xmm15` | SSSE3 | `clearcpuid=ssse3` |
//!
//! `int3` belongs to no feature and cannot be avoided (Linux patches its own code with it): a
//! refused `int3` at CPL0 is completed as the CPU would have run it, RIP past it and #BP
//! raised; so are `fwait`, `ldmxcsr` and `stmxcsr`, whose effects are as exact
//! ([`complete_refused_instruction`]).
//! Anything else a host refuses stays a guest failure.
//!
//! Two more probes concern user space rather than the kernel, and run (in a VM of their own)
//! only when the first Linux kernel is loaded or the first guest turns `syscall` on: whether
//! a 64-bit `syscall` and a 32-bit `int $0x80` at CPL3 enter CPL0 ([`SystemCalls`]). Where
//! `syscall` jumps to `LSTAR` but stays at CPL3 (seen on a nested, page-table-based KVM), the
//! fetch there faults in user mode, and every 64-bit process would die at its first system
//! call. understudy finishes such a `syscall` itself, from a trap over the first instruction
//! of the guest's page-fault handler ([`PageFaultTrap`]; the probe checks that this works on
//! the host, with the same code). Where it cannot and `int $0x80` works, Linux kernels are
//! booted with `vdso32=0`, so that a 32-bit user space (whose C library then uses
//! `int $0x80`) runs.
//!
//! On hardware with VT-x or AMD-V nothing is refused and nothing is changed. The probe runs
//! all candidates in one pass, exiting only at refusals: it costs a few milliseconds (mostly
//! building its VM), on whichever thread builds the first machine, and its answer serves every
//! later one. The answer is also kept between runs, per host (the `cache` module), so a run
//! on a host already probed pays only for reading a small file.

mod cache;
mod complete;
mod cost;
mod fault_trap;
/// The instruction decoder, for its fuzz target.
pub mod fuzz;
mod half_syscall;
mod probe;
mod syscalls;

use std::sync::OnceLock;
use std::time::Instant;

use kvm_ioctls::Kvm;

pub use self::complete::{complete_refused_instruction, refused_code_changed};
pub use self::cost::{measure_trap_costs, TrapCostError, TrapCosts};
pub use self::fault_trap::{remove_trap, AtTrap, Look, PageFaultTrap, LOOK_INTERVAL};
use crate::cpuid::CpuFeature;
use crate::error::VmError;

/// Linux's option that clears CPU features by name, comma-separated.
const CLEARCPUID: &str = "clearcpuid=";
/// The Linux option that keeps the 32-bit vDSO from 32-bit processes, whose C library then
/// makes system calls with `int $0x80`.
const NO_VDSO32: &str = "vdso32=0";

/// How understudy works around one refused instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workaround {
    /// The feature is hidden from every guest's CPUID.
    HideFeature(CpuFeature),
    /// Linux kernels get this option on their command line.
    LinuxOption(&'static str),
    /// Each refused `int3` at CPL0 is completed by injecting #BP.
    CompleteInt3,
    /// None is known: a guest kernel that executes it fails.
    None,
}

/// One instruction this host refuses at guest CPL0, and what understudy does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The instruction.
    pub instruction: &'static str,
    /// What is done about it.
    pub workaround: Workaround,
}

/// What the probe found: the instructions this host refuses to run at guest CPL0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLimits {
    /// Every refused instruction, in probe order.
    pub refused: Vec<Refusal>,
    /// How user mode reaches the kernel on this host, where already known; otherwise probed on
    /// first use, since only Linux kernels need it ([`HostLimits::system_calls`]).
    system_calls: Option<SystemCalls>,
}

/// Whether the two ways Linux user space enters the kernel work: a 64-bit `syscall` (every
/// 64-bit process) and `int $0x80` from 32-bit code (32-bit processes without the vDSO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemCalls {
    /// How `syscall` from 64-bit CPL3 reaches CPL0 at `LSTAR`.
    pub syscall: SyscallPath,
    /// `int $0x80` from 32-bit CPL3 enters CPL0 through the IDT; `false` only where the
    /// probe saw it fail.
    pub int80: bool,
}

impl Default for SystemCalls {
    fn default() -> Self {
        SystemCalls {
            syscall: SyscallPath::Enters,
            int80: true,
        }
    }
}

/// How a 64-bit `syscall` from user mode reaches the guest kernel on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallPath {
    /// The CPU (or the host) runs it: CPL0 at `LSTAR`.
    Enters,
    /// The host leaves it half done (RIP at `LSTAR`, CS still the user's), and understudy
    /// finishes it from the guest's page-fault handler ([`PageFaultTrap`]).
    HalfDone,
    /// It does not enter the kernel, and understudy cannot finish it.
    Fails,
}

impl SyscallPath {
    /// Whether 64-bit user space can make system calls, by itself or with understudy's help.
    pub fn works(self) -> bool {
        matches!(self, SyscallPath::Enters | SyscallPath::HalfDone)
    }

    fn name(self) -> &'static str {
        match self {
            SyscallPath::Enters => "enters",
            SyscallPath::HalfDone => "half-done",
            SyscallPath::Fails => "fails",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        [
            SyscallPath::Enters,
            SyscallPath::HalfDone,
            SyscallPath::Fails,
        ]
        .into_iter()
        .find(|path| path.name() == name)
    }
}

impl HostLimits {
    /// The limits of this host, probed on the first call and cached for the process. A probe
    /// that cannot run (KVM refused to build its VM) is logged and taken as "nothing refused":
    /// the machine that follows fails at the same KVM call with its own error.
    pub fn of_this_host(kvm: &Kvm) -> HostLimits {
        static LIMITS: OnceLock<HostLimits> = OnceLock::new();
        LIMITS
            .get_or_init(|| {
                if let Some(limits) = cache::load() {
                    limits.log("cached");
                    return limits;
                }
                let started = Instant::now();
                match probe::probe(kvm) {
                    Ok(limits) => {
                        let took = format!("probed in {} us", started.elapsed().as_micros());
                        limits.log(&took);
                        cache::store(&limits);
                        limits
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cannot probe what the host KVM refuses to run; assuming it runs everything");
                        HostLimits::default()
                    }
                }
            })
            .clone()
    }

    /// CPU features hidden from every guest on this host, on top of the configured ones.
    pub fn hidden_features(&self) -> Vec<CpuFeature> {
        let mut hidden = Vec::new();
        for refusal in &self.refused {
            if let Workaround::HideFeature(feature) = refusal.workaround {
                if !hidden.contains(&feature) {
                    hidden.push(feature);
                }
            }
        }
        hidden
    }

    /// Options a Linux kernel needs on its command line on this host. Linux reads only the
    /// first `clearcpuid=`, so the features it must clear are given in one.
    pub fn linux_cmdline_options(&self) -> Vec<String> {
        let mut options: Vec<String> = Vec::new();
        let mut cleared: Vec<&str> = Vec::new();
        for refusal in &self.refused {
            if let Workaround::LinuxOption(option) = refusal.workaround {
                match option.strip_prefix(CLEARCPUID) {
                    Some(name) if !cleared.contains(&name) => cleared.push(name),
                    Some(_) => {}
                    None if !options.iter().any(|o| o == option) => options.push(option.into()),
                    None => {}
                }
            }
        }
        if !cleared.is_empty() {
            options.push(format!("{CLEARCPUID}{}", cleared.join(",")));
        }
        let SystemCalls { syscall, int80 } = self.system_calls();
        if !syscall.works() && int80 {
            options.push(NO_VDSO32.into());
        }
        options
    }

    /// How user mode enters the kernel on this host: probed on the first call in the process
    /// (a millisecond or two: its own probe VM) and cached. A probe that cannot run is logged
    /// and taken as "both work".
    pub fn system_calls(&self) -> SystemCalls {
        static PROBED: OnceLock<SystemCalls> = OnceLock::new();
        match self.system_calls {
            Some(known) => known,
            None => *PROBED.get_or_init(|| {
                let started = Instant::now();
                let probed = Kvm::new()
                    .map_err(VmError::KvmUnavailable)
                    .and_then(|kvm| syscalls::probe_system_calls(&kvm));
                match probed {
                    Ok(calls) => {
                        calls.log(started.elapsed().as_micros());
                        cache::store(&HostLimits {
                            system_calls: Some(calls),
                            ..self.clone()
                        });
                        calls
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cannot probe how user mode enters the kernel on this host; assuming it works");
                        SystemCalls::default()
                    }
                }
            }),
        }
    }

    /// Whether vCPUs complete the instructions the host refuses that
    /// [`complete_refused_instruction`] can (`int3`, `fwait`): on a host seen to refuse
    /// `int3` and where completing it was seen to work.
    pub fn completes_refused_instructions(&self) -> bool {
        self.refused
            .iter()
            .any(|r| r.workaround == Workaround::CompleteInt3)
    }

    /// One line for what was found (`how`: cached, or how long the probe took); the details
    /// at debug level.
    fn log(&self, how: &str) {
        if self.refused.is_empty() {
            tracing::debug!(how, "the host KVM runs every probed instruction at CPL0");
            return;
        }
        let names: Vec<&str> = self.refused.iter().map(|r| r.instruction).collect();
        if self
            .refused
            .iter()
            .any(|r| r.workaround == Workaround::None)
        {
            tracing::warn!(how, refused = %names.join(", "), "the host KVM refuses some instructions at guest CPL0, and not all can be worked around: a guest kernel that uses them will fail");
        } else {
            tracing::info!(how, refused = %names.join(", "), "the host KVM refuses some instructions at guest CPL0; working around them");
        }
        for Refusal {
            instruction,
            workaround,
        } in &self.refused
        {
            match workaround {
                Workaround::HideFeature(feature) => tracing::debug!(
                    "host refuses `{instruction}` at CPL0: {feature:?} is hidden from every guest's CPUID"
                ),
                Workaround::LinuxOption(option) => tracing::debug!(
                    "host refuses `{instruction}` at CPL0 and hiding its CPUID flag does not take: Linux kernels are booted with `{option}`"
                ),
                Workaround::CompleteInt3 => tracing::debug!(
                    "host refuses `{instruction}` at CPL0: each refused int3 is completed by injecting #BP (and a refused fwait, by doing what it does)"
                ),
                Workaround::None => tracing::debug!(
                    "host refuses `{instruction}` at CPL0 and understudy cannot work around it"
                ),
            }
        }
    }
}

impl SystemCalls {
    fn log(self, probe_us: u128) {
        let SystemCalls { syscall, int80 } = self;
        if syscall == SyscallPath::Enters {
            tracing::debug!(probe_us, "user mode enters the guest kernel with `syscall`");
        } else if syscall == SyscallPath::HalfDone {
            tracing::info!(
                probe_us,
                "on this host a 64-bit `syscall` from user mode is left half done (at LSTAR, still in user mode); understudy finishes each one from a trap over the guest's page-fault handler, so every guest page fault and system call stops the vCPU once"
            );
        } else if int80 {
            tracing::warn!(
                probe_us,
                "on this host a 64-bit `syscall` from user mode does not enter the guest kernel: 64-bit user space cannot run; Linux kernels are booted with `{NO_VDSO32}` so that a 32-bit user space makes its system calls with `int $0x80`, which works"
            );
        } else {
            tracing::warn!(
                probe_us,
                "on this host neither a 64-bit `syscall` nor `int $0x80` from user mode enters the guest kernel: guest kernels run, but no Linux user space can (its first process dies at its first system call)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(instruction: &'static str, workaround: Workaround) -> Refusal {
        Refusal {
            instruction,
            workaround,
        }
    }

    #[test]
    fn refusals_map_to_their_workarounds() {
        let limits = HostLimits {
            refused: vec![
                refusal("lock cmpxchg16b", Workaround::HideFeature(CpuFeature::Cx16)),
                refusal("xrstor", Workaround::LinuxOption("noxsave")),
                refusal("int3", Workaround::CompleteInt3),
                refusal("rdgsbase", Workaround::LinuxOption("nofsgsbase")),
                refusal("wrgsbase", Workaround::LinuxOption("nofsgsbase")),
            ],
            system_calls: Some(SystemCalls {
                syscall: SyscallPath::Fails,
                int80: true,
            }),
        };
        assert_eq!(limits.hidden_features(), vec![CpuFeature::Cx16]);
        assert_eq!(
            limits.linux_cmdline_options(),
            vec!["noxsave", "nofsgsbase", "vdso32=0"]
        );
        assert!(limits.completes_refused_instructions());
    }

    #[test]
    fn vdso32_is_turned_off_only_where_int80_is_the_way_in() {
        let with = |syscall, int80| HostLimits {
            refused: vec![],
            system_calls: Some(SystemCalls { syscall, int80 }),
        };
        assert_eq!(
            with(SyscallPath::Fails, true).linux_cmdline_options(),
            vec!["vdso32=0"]
        );
        // Nothing helps where neither works, and nothing is needed where syscall does, by
        // itself or finished by understudy.
        assert!(with(SyscallPath::Fails, false)
            .linux_cmdline_options()
            .is_empty());
        assert!(with(SyscallPath::Enters, false)
            .linux_cmdline_options()
            .is_empty());
        assert!(with(SyscallPath::HalfDone, true)
            .linux_cmdline_options()
            .is_empty());
    }

    #[test]
    fn a_host_that_runs_everything_changes_nothing() {
        let limits = HostLimits {
            refused: vec![],
            system_calls: Some(SystemCalls::default()),
        };
        assert!(limits.hidden_features().is_empty());
        assert!(limits.linux_cmdline_options().is_empty());
        assert!(!limits.completes_refused_instructions());
    }
}
