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
//! only when the first Linux kernel is loaded: whether a 64-bit `syscall` and a 32-bit
//! `int $0x80` at CPL3 enter CPL0 ([`SystemCalls`]). Where `syscall` jumps to `LSTAR`
//! but stays at CPL3 (seen on a nested, page-table-based KVM), every 64-bit process dies at
//! its first system call; if `int $0x80` works there, Linux kernels are booted with
//! `vdso32=0`, so that a 32-bit user space (whose C library then uses `int $0x80`) runs. On
//! the same nested host `int $0x80` raises #UD, so no Linux user space runs at all: the log
//! says so at start, since nothing understudy can do from outside the guest changes it.
//!
//! On hardware with VT-x or AMD-V nothing is refused and nothing is changed. The probe runs
//! all candidates in one pass, exiting only at refusals: it costs a few milliseconds (mostly
//! building its VM), on whichever thread builds the first machine, and its answer serves every
//! later one. The answer is also kept between runs, per host ([`cache`]), so a run on a host
//! already probed pays only for reading a small file.

mod cache;

use std::sync::OnceLock;
use std::time::Instant;

use kvm_bindings::{
    kvm_msr_entry, kvm_regs, Msrs, KVM_INTERNAL_ERROR_EMULATION, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::boot::regs;
use crate::cpuid::{vcpu_cpuid, CpuFeature, Reg};
use crate::layout::{BOOT_STACK_POINTER, KVM_TSS_ADDRESS};
use crate::memory::paging::{Access, Paging, Translation};
use crate::memory::GuestRam;
use crate::state::StateError;
use crate::vm::{register_memslots, VmError};

/// Linux's option that clears CPU features by name, comma-separated.
const CLEARCPUID: &str = "clearcpuid=";
/// The byte of `int3`.
const INT3: u8 = 0xcc;
/// The longest x86 instruction.
const MAX_INSTRUCTION_LENGTH: usize = 15;
/// The byte of `fwait`.
const FWAIT: u8 = 0x9b;
/// The #BP exception vector.
const BREAKPOINT_VECTOR: u8 = 3;
/// #NM, device not available.
const DEVICE_NOT_AVAILABLE_VECTOR: u8 = 7;
/// #MF, x87 floating-point error.
const X87_FLOATING_POINT_VECTOR: u8 = 16;
const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
/// x87 status word: an unmasked exception is pending.
const FSW_ERROR_SUMMARY: u16 = 1 << 7;
const HLT: u8 = 0xf4;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_FSGSBASE: u64 = 1 << 16;
const CR4_OSXSAVE: u64 = 1 << 18;

/// Probe VM layout: IDT, code, the #BP handler, data for the memory operands.
const PROBE_RAM: u64 = 1 << 20;
const PROBE_IDT: u64 = 0x1000;
const PROBE_CODE: u64 = 0x1_0000;
const PROBE_HANDLER: u64 = 0x1_f000;
const PROBE_DATA: u64 = 0x2_0000;
/// Where the #BP handler counts its calls.
const PROBE_BREAKPOINTS: u64 = PROBE_DATA + 0x800;

/// The user-mode probes: a GDT with user segments and a TSS, user-accessible page tables, the
/// stack the CPU switches to on an interrupt from user mode, and the user stack.
const USER_GDT: u64 = 0x3000;
const USER_PML4: u64 = 0x4000;
const USER_PDPT: u64 = 0x5000;
const USER_PD: u64 = 0x6000;
const USER_TSS: u64 = 0x7000;
const USER_KERNEL_STACK: u64 = 0x3_8000;
const USER_STACK: u64 = 0x3_0000;
/// Selectors: the boot protocol's code and data (so the boot segment state stays valid),
/// user data, 64-bit and 32-bit user code, the TSS.
const KERNEL_CS: u16 = 0x10;
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
/// The Linux option that keeps the 32-bit vDSO from 32-bit processes, whose C library then
/// makes system calls with `int $0x80`.
const NO_VDSO32: &str = "vdso32=0";

/// An instruction a kernel may execute that some hosts refuse at CPL0.
struct Candidate {
    /// As the log names it.
    instruction: &'static str,
    /// Register set-up that must run before it (never refused).
    setup: &'static [u8],
    /// The instruction. Memory operands are at RSI, which points at zeroed data.
    code: &'static [u8],
    /// The CPU feature it belongs to; probed only when the host offers the feature.
    feature: Option<CpuFeature>,
    /// CR4 bits it needs.
    cr4: u64,
    /// What makes Linux leave it alone when hiding the feature does not take.
    linux_option: Option<&'static str>,
    /// Taken as refused on any host that refuses something else: the probe's own run of it
    /// is not enough to tell (see the candidate).
    assumed_on_emulating_hosts: bool,
}

const CANDIDATES: &[Candidate] = &[
    Candidate {
        instruction: "lock cmpxchg16b",
        setup: &[],
        code: &[0xf0, 0x48, 0x0f, 0xc7, 0x0e], // lock cmpxchg16b (%rsi)
        feature: Some(CpuFeature::Cx16),
        cr4: 0,
        linux_option: None,
        assumed_on_emulating_hosts: false,
    },
    Candidate {
        instruction: "xrstor64",
        // Not run: measured on a nested host, Linux's boot-time `xrstor64` is refused, but a
        // probe's own is not (whatever the components and operands), and KVM's CPUID table
        // there does not even list XSAVE although the guest sees it. So it is taken as
        // refused wherever the guest sees XSAVE and the host refuses anything else.
        setup: &[0xb8, 0xff, 0xff, 0xff, 0xff, 0xba, 0xff, 0xff, 0xff, 0xff],
        code: &[0x48, 0x0f, 0xae, 0x2e], // xrstor64 (%rsi), as Linux runs it
        feature: Some(CpuFeature::Xsave),
        cr4: CR4_OSXSAVE,
        linux_option: Some("noxsave"),
        assumed_on_emulating_hosts: true,
    },
    Candidate {
        instruction: "int3",
        setup: &[],
        code: &[INT3],
        feature: None,
        cr4: 0,
        linux_option: None,
        assumed_on_emulating_hosts: false,
    },
    Candidate {
        instruction: "clac",
        setup: &[],
        // Not run, like xrstor64: measured, Linux's `clac` (first instruction of its
        // exception entries) is refused on a nested host while the probe's own runs.
        code: &[0x0f, 0x01, 0xca],
        feature: Some(CpuFeature::Smap),
        cr4: 0,
        linux_option: Some("clearcpuid=smap"),
        assumed_on_emulating_hosts: true,
    },
    Candidate {
        instruction: "rdgsbase",
        setup: &[],
        code: &[0xf3, 0x48, 0x0f, 0xae, 0xc8], // rdgsbase %rax
        feature: Some(CpuFeature::Fsgsbase),
        cr4: CR4_FSGSBASE,
        linux_option: Some("nofsgsbase"),
        assumed_on_emulating_hosts: false,
    },
    Candidate {
        instruction: "wrgsbase",
        setup: &[0x31, 0xc0],                  // xor %eax, %eax
        code: &[0xf3, 0x48, 0x0f, 0xae, 0xd8], // wrgsbase %rax
        feature: Some(CpuFeature::Fsgsbase),
        cr4: CR4_FSGSBASE,
        linux_option: Some("nofsgsbase"),
        assumed_on_emulating_hosts: false,
    },
    Candidate {
        instruction: "invpcid",
        setup: &[0xb8, 0x02, 0x00, 0x00, 0x00], // mov $2, %eax: all contexts
        code: &[0x66, 0x0f, 0x38, 0x82, 0x06],  // invpcid (%rsi), %rax
        feature: Some(CpuFeature::Invpcid),
        cr4: 0,
        linux_option: Some("noinvpcid"),
        assumed_on_emulating_hosts: false,
    },
    Candidate {
        instruction: "rdpid",
        setup: &[],
        code: &[0xf3, 0x0f, 0xc7, 0xf8], // rdpid %rax
        feature: Some(CpuFeature::Rdpid),
        cr4: 0,
        linux_option: None,
        assumed_on_emulating_hosts: false,
    },
    Candidate {
        instruction: "popcnt",
        setup: &[],
        // Not run, like xrstor64: measured, Linux's `popcnt` (hweight64) is refused on a
        // nested host while the probe's own runs.
        code: &[0xf3, 0x48, 0x0f, 0xb8, 0xc7], // popcnt %rdi, %rax (Linux's hweight64)
        feature: Some(CpuFeature::Popcnt),
        cr4: 0,
        linux_option: Some("clearcpuid=popcnt"),
        assumed_on_emulating_hosts: true,
    },
    Candidate {
        instruction: "tzcnt",
        setup: &[],
        code: &[0xf3, 0x48, 0x0f, 0xbc, 0xc7], // tzcnt %rdi, %rax (`rep bsf` without BMI1)
        feature: Some(CpuFeature::Bmi1),
        cr4: 0,
        linux_option: None,
        assumed_on_emulating_hosts: false,
    },
    Candidate {
        instruction: "movbe",
        setup: &[],
        code: &[0x48, 0x0f, 0x38, 0xf0, 0x06], // movbe (%rsi), %rax
        feature: Some(CpuFeature::Movbe),
        cr4: 0,
        linux_option: None,
        assumed_on_emulating_hosts: false,
    },
    Candidate {
        instruction: "movd to xmm",
        setup: &[],
        // Not run, like xrstor64: measured, Linux's `movd %ecx, %xmm15` (in its SSSE3
        // BLAKE2s, which its random number generator runs from boot on) is refused on a
        // nested host. With SSSE3 hidden Linux uses its generic BLAKE2s instead.
        code: &[0x66, 0x44, 0x0f, 0x6e, 0xf9], // movd %ecx, %xmm15
        feature: Some(CpuFeature::Ssse3),
        cr4: CR4_OSFXSR,
        linux_option: Some("clearcpuid=ssse3"),
        assumed_on_emulating_hosts: true,
    },
];

/// `cpuid` leaves 1 and 7 into r8 (leaf 1 ECX), r9 (leaf 7 EBX), r10 (leaf 7 ECX), then hlt:
/// what a guest sees of the feature flags.
const READ_FEATURE_FLAGS: &[u8] = &[
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov $1, %eax
    0x31, 0xc9, // xor %ecx, %ecx
    0x0f, 0xa2, // cpuid
    0x41, 0x89, 0xc8, // mov %ecx, %r8d
    0xb8, 0x07, 0x00, 0x00, 0x00, // mov $7, %eax
    0x31, 0xc9, // xor %ecx, %ecx
    0x0f, 0xa2, // cpuid
    0x41, 0x89, 0xd9, // mov %ebx, %r9d
    0x41, 0x89, 0xca, // mov %ecx, %r10d
    HLT,
];

/// The #BP handler: counts, then returns past the `int3`.
const BREAKPOINT_HANDLER: &[u8] = &[
    0xff,
    0x04,
    0x25, // incl PROBE_BREAKPOINTS (absolute, 32-bit address follows)
    (PROBE_BREAKPOINTS & 0xff) as u8,
    ((PROBE_BREAKPOINTS >> 8) & 0xff) as u8,
    ((PROBE_BREAKPOINTS >> 16) & 0xff) as u8,
    ((PROBE_BREAKPOINTS >> 24) & 0xff) as u8,
    0x48,
    0xcf, // iretq
];

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
/// Each is `false` only where the probe saw it fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemCalls {
    /// `syscall` from 64-bit CPL3 enters CPL0 at `LSTAR`.
    pub syscall: bool,
    /// `int $0x80` from 32-bit CPL3 enters CPL0 through the IDT.
    pub int80: bool,
}

impl Default for SystemCalls {
    fn default() -> Self {
        SystemCalls {
            syscall: true,
            int80: true,
        }
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
                match probe(kvm) {
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
        if !syscall && int80 {
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
                    .and_then(|kvm| probe_system_calls(&kvm));
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
        if syscall {
            tracing::debug!(probe_us, "user mode enters the guest kernel with `syscall`");
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

/// Completes an instruction the host's emulator refused, where its architectural effect can be
/// produced exactly from outside, and returns its name; `None`, changing nothing, otherwise.
/// Only at CPL0 in 64-bit mode, where privilege checks cannot fail. Runs on the vCPU's thread.
///
/// - `int3`: RIP moves past it and #BP (a trap, no error code) is raised; the guest's own
///   handler takes it with the return address after the `int3`.
/// - `fwait`: with CR0.TS and CR0.MP set it raises #NM; with an unmasked x87 exception pending
///   (FSW.ES) it raises #MF (CR0.NE set; the legacy FERR# path is not reproduced, so that
///   case stays a failure); otherwise it does nothing and RIP moves past it.
/// - `ldmxcsr`/`stmxcsr` with a memory operand, any addressing mode, REX, segment overrides
///   (FS and GS add their base) and 32-bit addressing: #UD with a 66, F2, F3 or LOCK prefix,
///   without CR4.OSFXSR or with CR0.EM; #NM with CR0.TS; #GP(0), or #SS(0) for a stack
///   reference, when a byte of the operand is not canonical; #PF (CR2, error code) as the
///   guest's page tables say, with the accessed and dirty flags set as the CPU sets them
///   (`memory::paging`); #GP(0) for reserved MXCSR bits; otherwise MXCSR is loaded
///   or stored and RIP moves past it. An operand outside RAM (MMIO) or under protection keys
///   cannot be done exactly and stays a failure.
/// - Any instruction longer than 15 bytes (all prefixes, as far as it was read): #GP(0).
///
/// Total over whatever the guest put in its memory and registers: nothing here indexes or
/// adds without a check.
pub fn complete_refused_instruction(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    suberror: u32,
) -> Result<Option<&'static str>, StateError> {
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Ok(None);
    }
    let step = |step| move |source| StateError { step, source };
    let sregs = vcpu.get_sregs().map_err(step("KVM_GET_SREGS"))?;
    if sregs.cs.selector & 3 != 0 || sregs.cs.l == 0 {
        return Ok(None);
    }
    let mut regs = vcpu.get_regs().map_err(step("KVM_GET_REGS"))?;
    let code = read_code(ram, &paging(&sregs, &regs, None), regs.rip);
    let Some(&opcode) = code.first() else {
        return Ok(None);
    };
    let completion = match opcode {
        INT3 => Completion {
            name: "int3",
            advance: 1,
            raise: Some(Raise::exception(BREAKPOINT_VECTOR, None)),
        },
        FWAIT => {
            // The x87 status word, from the XSAVE image (see complete_mxcsr).
            let xsave = vcpu.get_xsave().map_err(step("KVM_GET_XSAVE"))?;
            let fsw = (xsave.region[XSAVE_FCW_FSW] >> 16) as u16;
            let (advance, raise) = if sregs.cr0 & (CR0_TS | CR0_MP) == CR0_TS | CR0_MP {
                (0, Some(Raise::exception(DEVICE_NOT_AVAILABLE_VECTOR, None)))
            } else if fsw & FSW_ERROR_SUMMARY != 0 {
                if sregs.cr0 & CR0_NE == 0 {
                    return Ok(None);
                }
                (0, Some(Raise::exception(X87_FLOATING_POINT_VECTOR, None)))
            } else {
                (1, None)
            };
            Completion {
                name: "fwait",
                advance,
                raise,
            }
        }
        _ => match mxcsr_decode(&code, &regs, &sregs) {
            Some(MxcsrDecode::Invalid(name, raise)) => Completion {
                name,
                advance: 0,
                raise: Some(raise),
            },
            Some(MxcsrDecode::Instruction(op)) => {
                match complete_mxcsr(vcpu, ram, &sregs, &regs, &op)? {
                    Some(None) => Completion {
                        name: op.name(),
                        advance: op.length as u64,
                        raise: None,
                    },
                    Some(raise) => Completion {
                        name: op.name(),
                        advance: 0,
                        raise,
                    },
                    None => return Ok(None),
                }
            }
            None => return Ok(None),
        },
    };
    // Registers before events: an exception is delivered with the RIP in place at entry
    // (past a trap, at a fault). RIP wraps as the CPU's does.
    if completion.advance > 0 {
        regs.rip = regs.rip.wrapping_add(completion.advance);
        vcpu.set_regs(&regs).map_err(step("KVM_SET_REGS"))?;
    }
    if let Some(raise) = completion.raise {
        if let Some(cr2) = raise.cr2 {
            let mut sregs = sregs;
            sregs.cr2 = cr2;
            vcpu.set_sregs(&sregs).map_err(step("KVM_SET_SREGS"))?;
        }
        let mut events = vcpu
            .get_vcpu_events()
            .map_err(step("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.pending = 0;
        events.exception.nr = raise.vector;
        events.exception.has_error_code = u8::from(raise.error_code.is_some());
        events.exception.error_code = raise.error_code.unwrap_or(0);
        vcpu.set_vcpu_events(&events)
            .map_err(step("KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(Some(completion.name))
}

/// What completing a refused instruction does: RIP moves `advance` bytes (0 at a fault), then
/// `raise` is raised, if any.
struct Completion {
    name: &'static str,
    advance: u64,
    raise: Option<Raise>,
}

/// An exception to raise: vector, error code, and for #PF the faulting address for CR2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Raise {
    vector: u8,
    error_code: Option<u32>,
    cr2: Option<u64>,
}

const INVALID_OPCODE_VECTOR: u8 = 6;
const STACK_FAULT_VECTOR: u8 = 12;
const GENERAL_PROTECTION_VECTOR: u8 = 13;
const PAGE_FAULT_VECTOR: u8 = 14;

/// 32-bit words of the XSAVE image (`kvm_xsave::region`): FCW and FSW, MXCSR and MXCSR_MASK
/// in the legacy region; XSTATE_BV in the header at byte 512.
const XSAVE_FCW_FSW: usize = 0;
const XSAVE_MXCSR: usize = 6;
const XSAVE_MXCSR_MASK: usize = 7;
const XSAVE_XSTATE_BV: usize = 128;
const XFEATURE_SSE: u32 = 1 << 1;
/// The MXCSR bits a CPU that reports MXCSR_MASK as 0 supports.
const DEFAULT_MXCSR_MASK: u32 = 0xffbf;

impl Raise {
    fn exception(vector: u8, error_code: Option<u32>) -> Self {
        Raise {
            vector,
            error_code,
            cr2: None,
        }
    }

    fn page_fault(error_code: u32, address: u64) -> Self {
        Raise {
            vector: PAGE_FAULT_VECTOR,
            error_code: Some(error_code),
            cr2: Some(address),
        }
    }
}

/// `ldmxcsr m32` or `stmxcsr m32`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MxcsrInstruction {
    store: bool,
    /// The operand's linear address (a segment base included).
    address: u64,
    /// The last segment override, if any.
    segment: Option<u8>,
    /// Whether the base register is RSP or RBP, which makes the operand's segment SS by
    /// default.
    stack_base: bool,
    length: usize,
}

impl MxcsrInstruction {
    /// Whether the operand is a stack reference, which makes a non-canonical address #SS(0)
    /// rather than #GP(0). Vendors differ on whether a CS, DS, ES or SS override, which
    /// changes no address in 64-bit mode, changes that: on Intel's CPUs the segment is the
    /// override's (as the SDM has it and Bochs models it); an AMD EPYC raises #SS for an
    /// operand based on RSP or RBP whatever those overrides say, and #GP for any other even
    /// with SS. FS and GS make it no stack reference on either.
    fn stack(&self, amd: bool) -> bool {
        match self.segment {
            Some(FS_PREFIX | GS_PREFIX) => false,
            Some(override_) if !amd => override_ == SS_PREFIX,
            _ => self.stack_base,
        }
    }

    fn name(&self) -> &'static str {
        if self.store {
            "stmxcsr"
        } else {
            "ldmxcsr"
        }
    }
}

/// What the bytes at RIP are, as far as `ldmxcsr`/`stmxcsr` go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MxcsrDecode {
    /// One of them, to carry out.
    Instruction(MxcsrInstruction),
    /// An encoding the CPU rejects before touching memory: a 66, F2, F3 or LOCK prefix (#UD),
    /// or more than 15 bytes (#GP(0)).
    Invalid(&'static str, Raise),
}

/// Why bytes do not decode.
enum NotDecoded {
    /// The instruction goes on past 15 bytes.
    TooLong,
    /// It goes on past the bytes that could be read.
    Short,
    /// It is something else.
    Other,
}

/// Legacy prefixes, by what they do to `0F AE /2` and `/3`: these four make it no instruction
/// (the SDM's "NP" encodings; an AMD EPYC raises #UD for each at CPL3)...
const UD_PREFIXES: [u8; 4] = [0x66, 0xf2, 0xf3, 0xf0];
/// ... segment overrides: only FS and GS add a base in 64-bit mode ...
const SEGMENT_PREFIXES: [u8; 6] = [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65];
const SS_PREFIX: u8 = 0x36;
const FS_PREFIX: u8 = 0x64;
const GS_PREFIX: u8 = 0x65;
/// ... and 32-bit addressing.
const ADDRESS_SIZE_PREFIX: u8 = 0x67;

/// The `ldmxcsr`/`stmxcsr` at the start of `code` that the CPU carries out, its operand's
/// address computed from `regs` with flat segments (no FS or GS base); `None` for anything
/// else, encodings the CPU rejects included.
fn mxcsr_instruction(code: &[u8], regs: &kvm_regs) -> Option<MxcsrInstruction> {
    match mxcsr_decode(code, regs, &kvm_bindings::kvm_sregs::default()) {
        Some(MxcsrDecode::Instruction(op)) => Some(op),
        _ => None,
    }
}

/// Decodes `[prefixes] [REX] 0F AE /2` or `/3` with a memory operand, computing its address
/// from `regs` and `sregs`; `None` for anything else, or where too few bytes could be read.
fn mxcsr_decode(
    code: &[u8],
    regs: &kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
) -> Option<MxcsrDecode> {
    match try_decode_mxcsr(code, regs, sregs) {
        Ok(decoded) => Some(decoded),
        Err(NotDecoded::TooLong) => Some(MxcsrDecode::Invalid(
            "overlong instruction",
            Raise::exception(GENERAL_PROTECTION_VECTOR, Some(0)),
        )),
        Err(NotDecoded::Short | NotDecoded::Other) => None,
    }
}

fn try_decode_mxcsr(
    code: &[u8],
    regs: &kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
) -> Result<MxcsrDecode, NotDecoded> {
    let gpr = |n: u8| match n {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    };
    let byte = |at: usize| -> Result<u8, NotDecoded> {
        if at >= MAX_INSTRUCTION_LENGTH {
            return Err(NotDecoded::TooLong);
        }
        code.get(at).copied().ok_or(NotDecoded::Short)
    };
    let disp32 = |at: usize| -> Result<u64, NotDecoded> {
        let bytes = [byte(at)?, byte(at + 1)?, byte(at + 2)?, byte(at + 3)?];
        Ok(i64::from(i32::from_le_bytes(bytes)) as u64)
    };
    let mut at = 0;
    let mut rex = 0u8;
    let mut segment = None;
    let mut address32 = false;
    let mut undefined = false;
    loop {
        let prefix = byte(at)?;
        match prefix {
            0x40..=0x4f => {
                rex = prefix;
                at += 1;
                continue;
            }
            p if UD_PREFIXES.contains(&p) => undefined = true,
            p if SEGMENT_PREFIXES.contains(&p) => segment = Some(p),
            ADDRESS_SIZE_PREFIX => address32 = true,
            _ => break,
        }
        // A REX prefix counts only right before the opcode.
        rex = 0;
        at += 1;
    }
    if byte(at)? != 0x0f || byte(at + 1)? != 0xae {
        return Err(NotDecoded::Other);
    }
    at += 2;
    let modrm = byte(at)?;
    at += 1;
    let (mode, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if mode == 3 || !(reg == 2 || reg == 3) {
        return Err(NotDecoded::Other);
    }
    let (rex_x, rex_b) = ((rex & 0x2) << 2, (rex & 0x1) << 3);
    let mut base = None;
    let mut rip_relative = false;
    let mut address = if rm == 4 {
        let sib = byte(at)?;
        at += 1;
        let index = ((sib >> 3) & 7) | rex_x;
        let scaled = if index == 4 {
            0
        } else {
            gpr(index) << (sib >> 6)
        };
        if sib & 7 == 5 && mode == 0 {
            let disp = disp32(at)?;
            at += 4;
            scaled.wrapping_add(disp)
        } else {
            let register = (sib & 7) | rex_b;
            base = Some(register);
            scaled.wrapping_add(gpr(register))
        }
    } else if rm == 5 && mode == 0 {
        rip_relative = true;
        let disp = disp32(at)?;
        at += 4;
        disp
    } else {
        let register = rm | rex_b;
        base = Some(register);
        gpr(register)
    };
    match mode {
        1 => {
            address = address.wrapping_add(i64::from(byte(at)? as i8) as u64);
            at += 1;
        }
        2 => {
            address = address.wrapping_add(disp32(at)?);
            at += 4;
        }
        _ => {}
    }
    if rip_relative {
        address = address.wrapping_add(regs.rip.wrapping_add(at as u64));
    }
    if address32 {
        address &= 0xffff_ffff;
    }
    address = address.wrapping_add(match segment {
        Some(FS_PREFIX) => sregs.fs.base,
        Some(GS_PREFIX) => sregs.gs.base,
        _ => 0,
    });
    let op = MxcsrInstruction {
        store: reg == 3,
        address,
        segment,
        stack_base: matches!(base, Some(4 | 5)),
        length: at,
    };
    if undefined {
        return Ok(MxcsrDecode::Invalid(
            op.name(),
            Raise::exception(INVALID_OPCODE_VECTOR, None),
        ));
    }
    Ok(MxcsrDecode::Instruction(op))
}

/// Does what `op` does: `Some(None)` when it ran, `Some(Some(raise))` when it raises an
/// exception instead, `None` when that cannot be done exactly (its operand is not in RAM, or
/// protection keys decide).
fn complete_mxcsr(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    sregs: &kvm_bindings::kvm_sregs,
    regs: &kvm_regs,
    op: &MxcsrInstruction,
) -> Result<Option<Option<Raise>>, StateError> {
    const CR0_EM: u64 = 1 << 2;
    const OPERAND: usize = 4;
    let step = |step| move |source| StateError { step, source };
    if sregs.cr4 & CR4_OSFXSR == 0 || sregs.cr0 & CR0_EM != 0 {
        return Ok(Some(Some(Raise::exception(INVALID_OPCODE_VECTOR, None))));
    }
    if sregs.cr0 & CR0_TS != 0 {
        return Ok(Some(Some(Raise::exception(
            DEVICE_NOT_AVAILABLE_VECTOR,
            None,
        ))));
    }
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(step("KVM_GET_CPUID2"))?;
    let paging = paging(sregs, regs, Some(cpuid.as_slice()));
    let last = op.address.wrapping_add(OPERAND as u64 - 1);
    if !paging.is_canonical(op.address) || !paging.is_canonical(last) {
        let vector = if op.stack(is_amd(cpuid.as_slice())) {
            STACK_FAULT_VECTOR
        } else {
            GENERAL_PROTECTION_VECTOR
        };
        return Ok(Some(Some(Raise::exception(vector, Some(0)))));
    }
    // MXCSR is read and written in the XSAVE image: on a nested host KVM_GET_FPU reads it
    // as 0 and KVM_SET_FPU ignores it.
    let mut xsave = vcpu.get_xsave().map_err(step("KVM_GET_XSAVE"))?;
    if op.store {
        let mxcsr = xsave.region[XSAVE_MXCSR];
        match write_virtual(ram, &paging, op.address, &mxcsr.to_le_bytes()) {
            Outcome::Done(()) => {}
            Outcome::Fault(raise) => return Ok(Some(Some(raise))),
            Outcome::Unknown => return Ok(None),
        }
    } else {
        let mut word = [0u8; OPERAND];
        match read_virtual(ram, &paging, op.address, &mut word) {
            Outcome::Done(()) => {}
            Outcome::Fault(raise) => return Ok(Some(Some(raise))),
            Outcome::Unknown => return Ok(None),
        }
        let value = u32::from_le_bytes(word);
        // The bits MXCSR_MASK lacks are reserved; a mask of 0 means the original 0xffbf.
        let supported = match xsave.region[XSAVE_MXCSR_MASK] {
            0 => DEFAULT_MXCSR_MASK,
            mask => mask,
        };
        if value & !supported != 0 {
            return Ok(Some(Some(Raise::exception(
                GENERAL_PROTECTION_VECTOR,
                Some(0),
            ))));
        }
        xsave.region[XSAVE_MXCSR] = value;
        // With SSE state in its init configuration (XSTATE_BV bit 1 clear) KVM would not
        // take MXCSR from the image; the XMM registers there are the init state's zeros.
        xsave.region[XSAVE_XSTATE_BV] |= XFEATURE_SSE;
        // SAFETY: a 4 KiB kvm_xsave as KVM_GET_XSAVE returned it; no XSTATE feature that needs
        // more is ever enabled for a guest, so KVM_SET_XSAVE reads exactly that much.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(step("KVM_SET_XSAVE"))?;
    }
    Ok(Some(None))
}

/// Whether the guest's CPU is AMD's (or Hygon's, its licensee): CPUID leaf 0's vendor.
fn is_amd(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> bool {
    const AUTH: u32 = u32::from_le_bytes(*b"Auth"); // AuthenticAMD
    const HYGO: u32 = u32::from_le_bytes(*b"Hygo"); // HygonGenuine
    cpuid
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| e.ebx == AUTH || e.ebx == HYGO)
}

/// The vCPU's paging as a kernel-mode access sees it. Without the guest's CPUID (to look at
/// code bytes) the physical address width is taken as the widest and 1 GiB pages as there.
fn paging(
    sregs: &kvm_bindings::kvm_sregs,
    regs: &kvm_regs,
    cpuid: Option<&[kvm_bindings::kvm_cpuid_entry2]>,
) -> Paging {
    const GIB_PAGES: u32 = 1 << 26;
    let leaf = |function: u32| cpuid?.iter().find(|e| e.function == function);
    let (physical_bits, gib_pages) = match cpuid {
        // Without leaf 0x8000_0008 the width is 36 bits.
        Some(_) => (
            leaf(0x8000_0008).map_or(36, |e| (e.eax & 0xff) as u8),
            leaf(0x8000_0001).is_some_and(|e| e.edx & GIB_PAGES != 0),
        ),
        None => (52, true),
    };
    Paging {
        cr3: sregs.cr3,
        cr0: sregs.cr0,
        cr4: sregs.cr4,
        efer: sregs.efer,
        rflags: regs.rflags,
        physical_bits,
        gib_pages,
    }
}

/// How a guest-virtual access turns out.
enum Outcome<T> {
    Done(T),
    /// The CPU raises this instead (a page fault).
    Fault(Raise),
    /// What the CPU does cannot be produced here: a byte is not in RAM, the access wraps
    /// around the top of the address space, or the walk cannot be told (see
    /// [`Translation::Unknown`]).
    Unknown,
}

/// The guest physical address of each piece of `address..address + len` (guest virtual),
/// one per page, all in RAM; `set_flags` as the CPU sets accessed and dirty flags (else
/// nothing is changed). The first page that faults decides the fault, with CR2 at its first
/// byte of the access.
fn translate_range(
    ram: &GuestRam,
    paging: &Paging,
    address: u64,
    len: usize,
    access: Access,
    set_flags: bool,
) -> Outcome<Vec<(u64, usize)>> {
    let mut pieces = Vec::new();
    let mut done = 0usize;
    while done < len {
        let at = address.wrapping_add(done as u64);
        if done > 0 && at < address {
            return Outcome::Unknown;
        }
        let n = (0x1000 - (at & 0xfff) as usize).min(len - done);
        let translation = if set_flags {
            paging.translate(ram, at, access)
        } else {
            paging.check(ram, at, access)
        };
        match translation {
            Translation::Physical(physical) if ram.contains(physical, n as u64) => {
                pieces.push((physical, n));
            }
            Translation::Physical(_) | Translation::Unknown => return Outcome::Unknown,
            Translation::PageFault(error_code) => {
                return Outcome::Fault(Raise::page_fault(error_code, at));
            }
        }
        done += n;
    }
    Outcome::Done(pieces)
}

/// Up to [`MAX_INSTRUCTION_LENGTH`] bytes of code at guest virtual `rip`: as many as are
/// mapped to RAM before the first page that is not (an instruction may end just before it).
fn read_code(ram: &GuestRam, paging: &Paging, rip: u64) -> Vec<u8> {
    let mut code = [0u8; MAX_INSTRUCTION_LENGTH];
    let mut have = 0;
    while let Some(rest) = code.get_mut(have..).filter(|rest| !rest.is_empty()) {
        let at = rip.wrapping_add(have as u64);
        let n = (0x1000 - (at & 0xfff) as usize).min(rest.len());
        let Some(piece) = rest.get_mut(..n) else {
            break;
        };
        match translate_range(ram, paging, at, n, Access::Peek, false) {
            Outcome::Done(pieces) if read_pieces(ram, &pieces, piece) => have += n,
            _ => break,
        }
    }
    code.get(..have).unwrap_or_default().to_vec()
}

/// Fills `buf` from `pieces` (physical address, length), in order; whether every read worked.
fn read_pieces(ram: &GuestRam, pieces: &[(u64, usize)], buf: &mut [u8]) -> bool {
    let mut rest = buf;
    for &(physical, n) in pieces {
        let Some((piece, tail)) = rest.split_at_mut_checked(n) else {
            return false;
        };
        if ram.read(physical, piece).is_err() {
            return false;
        }
        rest = tail;
    }
    rest.is_empty()
}

/// Reads `buf.len()` bytes at guest virtual `address` as a kernel-mode data read, across
/// pages if they straddle one.
fn read_virtual(ram: &GuestRam, paging: &Paging, address: u64, buf: &mut [u8]) -> Outcome<()> {
    match translate_range(ram, paging, address, buf.len(), Access::Read, true) {
        Outcome::Done(pieces) if read_pieces(ram, &pieces, buf) => Outcome::Done(()),
        Outcome::Done(_) | Outcome::Unknown => Outcome::Unknown,
        Outcome::Fault(raise) => Outcome::Fault(raise),
    }
}

/// Writes `data` at guest virtual `address` as a kernel-mode data write, across pages if it
/// straddles one. Every page is checked before any flag is set or byte written, so a fault on
/// the second page leaves the first untouched, as on the CPU.
fn write_virtual(ram: &GuestRam, paging: &Paging, address: u64, data: &[u8]) -> Outcome<()> {
    if let Outcome::Fault(raise) =
        translate_range(ram, paging, address, data.len(), Access::Write, false)
    {
        return Outcome::Fault(raise);
    }
    let pieces = match translate_range(ram, paging, address, data.len(), Access::Write, true) {
        Outcome::Done(pieces) => pieces,
        Outcome::Fault(raise) => return Outcome::Fault(raise),
        Outcome::Unknown => return Outcome::Unknown,
    };
    let mut rest = data;
    for (physical, n) in pieces {
        let Some((piece, tail)) = rest.split_at_checked(n) else {
            return Outcome::Unknown;
        };
        if ram.write(physical, piece).is_err() {
            return Outcome::Unknown;
        }
        rest = tail;
    }
    Outcome::Done(())
}

/// Runs every candidate the host's CPUID offers in one pass, each refusal stopping it once,
/// and decides each refusal's workaround.
fn probe(kvm: &Kvm) -> Result<HostLimits, VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let (vm, ram) = probe_vm(kvm)?;
    write_breakpoint_gate(&ram)?;
    ram.write(PROBE_HANDLER, BREAKPOINT_HANDLER)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_step("KVM_GET_SUPPORTED_CPUID"))?;

    // Candidates the probe cannot reproduce are not run: they are judged by the others.
    let (assumed, candidates): (Vec<&Candidate>, Vec<&Candidate>) = CANDIDATES
        .iter()
        .filter(|c| c.feature.is_none_or(|f| f.is_in(&supported)) || c.assumed_on_emulating_hosts)
        .partition(|c| c.assumed_on_emulating_hosts);
    let mut code = Vec::new();
    let mut starts = Vec::with_capacity(candidates.len());
    for candidate in &candidates {
        code.extend_from_slice(candidate.setup);
        starts.push(PROBE_CODE + code.len() as u64);
        code.extend_from_slice(candidate.code);
    }
    code.push(HLT);
    ram.write(PROBE_CODE, &code)?;
    let cr4 = candidates.iter().fold(0, |bits, c| bits | c.cr4);

    let mut vcpu = vm.create_vcpu(0).map_err(kvm_step("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(&supported)
        .map_err(kvm_step("KVM_SET_CPUID2"))?;
    // A guest may see a feature KVM's table does not list (XSAVE, on a nested host): ask
    // the guest's own `cpuid` about the assumed candidates' features.
    let assumed_features: Vec<CpuFeature> = assumed.iter().filter_map(|c| c.feature).collect();
    let seen_by_guest = if assumed_features.is_empty() {
        Vec::new()
    } else {
        features_seen(&mut vcpu, &ram, &assumed_features)?
    };
    enter(&vcpu, PROBE_CODE, cr4)?;
    let mut refused: Vec<&Candidate> = Vec::new();
    let mut int3_completed = false;
    // One exit per refusal at most, then the final hlt.
    for _ in 0..=candidates.len() {
        let exit = vcpu.run();
        let suberror = match exit {
            Ok(VcpuExit::Hlt) => break,
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live
            // member of the union.
            Ok(VcpuExit::InternalError) => unsafe {
                vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror
            },
            other => {
                let other = format!("{other:?}");
                tracing::debug!(exit = %other, "host probe stopped early; instructions after this point are taken as running");
                break;
            }
        };
        let rip = vcpu.get_regs().map_err(kvm_step("KVM_GET_REGS"))?.rip;
        let Some(index) = starts.iter().position(|&start| start == rip) else {
            tracing::debug!(
                rip,
                suberror,
                "host probe stopped outside a probed instruction"
            );
            break;
        };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            break;
        }
        let candidate = candidates[index];
        refused.push(candidate);
        if candidate.code == [INT3] {
            int3_completed =
                complete_refused_instruction(&vcpu, &ram, suberror).map_err(|source| {
                    VmError::State {
                        what: "completing the probe's int3".into(),
                        source,
                    }
                })? == Some("int3");
            if int3_completed {
                continue;
            }
        }
        let mut regs = vcpu.get_regs().map_err(kvm_step("KVM_GET_REGS"))?;
        regs.rip = rip + candidate.code.len() as u64;
        vcpu.set_regs(&regs).map_err(kvm_step("KVM_SET_REGS"))?;
    }
    if int3_completed {
        // The guest's handler ran once, and returned.
        let mut count = [0u8; 4];
        ram.read(PROBE_BREAKPOINTS, &mut count)?;
        int3_completed = u32::from_le_bytes(count) == 1;
    }
    if !refused.is_empty() {
        for candidate in &assumed {
            if candidate.feature.is_none_or(|f| seen_by_guest.contains(&f)) {
                tracing::debug!(
                    instruction = candidate.instruction,
                    "taken as refused: the host refuses other kernel instructions"
                );
                refused.push(candidate);
            }
        }
    }

    let to_hide: Vec<CpuFeature> = refused.iter().filter_map(|c| c.feature).collect();
    let still_seen = if to_hide.is_empty() {
        Vec::new()
    } else {
        // KVM allows no CPUID change once a vCPU has run: a second vCPU asks the question.
        let mut second = vm.create_vcpu(1).map_err(kvm_step("KVM_CREATE_VCPU"))?;
        second
            .set_cpuid2(&vcpu_cpuid(&supported, 1, 2, &to_hide, None))
            .map_err(kvm_step("KVM_SET_CPUID2"))?;
        features_seen(&mut second, &ram, &to_hide)?
    };
    let refused = refused
        .into_iter()
        .map(|candidate| {
            let workaround = match (candidate.feature, candidate.linux_option) {
                (None, _) if int3_completed => Workaround::CompleteInt3,
                (Some(feature), _) if !still_seen.contains(&feature) => {
                    Workaround::HideFeature(feature)
                }
                (Some(_), Some(option)) => Workaround::LinuxOption(option),
                _ => Workaround::None,
            };
            Refusal {
                instruction: candidate.instruction,
                workaround,
            }
        })
        .collect();
    Ok(HostLimits {
        refused,
        system_calls: None,
    })
}

/// A throwaway VM for a probe: RAM, the boot GDT and page tables, no irqchip (so `hlt` exits
/// to us).
fn probe_vm(kvm: &Kvm) -> Result<(VmFd, GuestRam), VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let vm = kvm.create_vm().map_err(kvm_step("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_step("KVM_SET_TSS_ADDR"))?;
    let ram = GuestRam::new(PROBE_RAM)?;
    register_memslots(&vm, &ram, false)?;
    regs::write_boot_tables(&ram)?;
    Ok((vm, ram))
}

/// Runs the system-call probes ([`enters_kernel`]) in a VM of their own.
fn probe_system_calls(kvm: &Kvm) -> Result<SystemCalls, VmError> {
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

/// A 64-bit interrupt gate for #BP in the probe's IDT, pointing at its handler.
fn write_breakpoint_gate(ram: &GuestRam) -> Result<(), VmError> {
    write_gate(ram, u64::from(BREAKPOINT_VECTOR), PROBE_HANDLER, 0)
}

/// A 64-bit interrupt gate in the probe's IDT: `vector` to `handler` in the boot code segment,
/// usable by `int` from privilege `dpl` and above.
fn write_gate(ram: &GuestRam, vector: u64, handler: u64, dpl: u64) -> Result<(), VmError> {
    const PRESENT_INTERRUPT_GATE: u64 = 0x8e;
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | ((PRESENT_INTERRUPT_GATE | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    let high = handler >> 32;
    let gate = PROBE_IDT + 16 * vector;
    ram.write(gate, &low.to_le_bytes())?;
    ram.write(gate + 8, &high.to_le_bytes())?;
    Ok(())
}

/// Sets a probe vCPU at `rip` in long mode, CPL0, with the probe's IDT, the `cr4` bits its
/// instructions need, RSI at zeroed data and every other register zero.
fn enter(vcpu: &VcpuFd, rip: u64, cr4: u64) -> Result<(), VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let mut sregs = regs::boot_sregs(vcpu.get_sregs().map_err(kvm_step("KVM_GET_SREGS"))?);
    sregs.idt.base = PROBE_IDT;
    sregs.idt.limit = (16 * (u16::from(BREAKPOINT_VECTOR) + 1)) - 1;
    sregs.cr4 |= cr4;
    vcpu.set_sregs(&sregs).map_err(kvm_step("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip,
        rsp: BOOT_STACK_POINTER,
        rsi: PROBE_DATA,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_step("KVM_SET_REGS"))
}

/// Which of `features` the guest's `cpuid` still reports on `vcpu`, whose CPUID table clears
/// them all.
fn features_seen(
    vcpu: &mut VcpuFd,
    ram: &GuestRam,
    features: &[CpuFeature],
) -> Result<Vec<CpuFeature>, VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let at = PROBE_CODE + 0x800;
    ram.write(at, READ_FEATURE_FLAGS)?;
    enter(vcpu, at, 0)?;
    if !matches!(vcpu.run(), Ok(VcpuExit::Hlt)) {
        // Cannot tell: take every one as still seen, so the Linux options apply.
        return Ok(features.to_vec());
    }
    let regs = vcpu.get_regs().map_err(kvm_step("KVM_GET_REGS"))?;
    Ok(features
        .iter()
        .copied()
        .filter(|feature| {
            let (leaf, _, reg, bit) = feature.location();
            let word = match (leaf, reg) {
                (1, Reg::Ecx) => regs.r8,
                (7, Reg::Ebx) => regs.r9,
                (7, Reg::Ecx) => regs.r10,
                _ => return true,
            };
            word & (1 << bit) != 0
        })
        .collect())
}

/// The instruction decoder, for its fuzz target.
pub mod fuzz;

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
                syscall: false,
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
    fn mxcsr_operands_decode_as_the_cpu_reads_them() {
        let regs = kvm_regs {
            rsp: 0x1000,
            r12: 0x2000,
            rip: 0x5000,
            ..Default::default()
        };
        // ldmxcsr 0x4(%rsp): Linux's kernel_fpu_begin.
        let op = mxcsr_instruction(&[0x0f, 0xae, 0x54, 0x24, 0x04], &regs).unwrap();
        assert_eq!((op.store, op.address, op.length), (false, 0x1004, 5));
        // stmxcsr -0x10(%r12)
        let op = mxcsr_instruction(&[0x41, 0x0f, 0xae, 0x5c, 0x24, 0xf0], &regs).unwrap();
        assert_eq!((op.store, op.address, op.length), (true, 0x1ff0, 6));
        // ldmxcsr 0x10(%rip)
        let op = mxcsr_instruction(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0], &regs).unwrap();
        assert_eq!(op.address, 0x5000 + 7 + 0x10);
        // xrstor is not ldmxcsr.
        assert!(mxcsr_instruction(&[0x48, 0x0f, 0xae, 0x2f], &regs).is_none());
    }

    fn decode(code: &[u8], regs: &kvm_regs, sregs: &kvm_bindings::kvm_sregs) -> MxcsrDecode {
        mxcsr_decode(code, regs, sregs).unwrap_or_else(|| panic!("{code:02x?} did not decode"))
    }

    fn instruction(
        code: &[u8],
        regs: &kvm_regs,
        sregs: &kvm_bindings::kvm_sregs,
    ) -> MxcsrInstruction {
        match decode(code, regs, sregs) {
            MxcsrDecode::Instruction(op) => op,
            other => panic!("{code:02x?} decoded as {other:?}"),
        }
    }

    #[test]
    fn mxcsr_prefixes_decode_as_the_cpu_takes_them() {
        let regs = kvm_regs {
            rdi: 0xdead_beef_0000_1234,
            rbp: 0x7000,
            r13: 0x9000,
            rip: 0xffff_fffc,
            ..Default::default()
        };
        let mut sregs = kvm_bindings::kvm_sregs::default();
        sregs.fs.base = 0x10_0000;
        sregs.gs.base = 0x20_0000;
        // CS, DS, ES and SS add nothing. A stack reference: on AMD by its base register
        // alone, on Intel by the override.
        for prefix in [0x26, 0x2e, 0x36, 0x3e] {
            let ss = prefix == 0x36;
            let op = instruction(&[prefix, 0x0f, 0xae, 0x17], &regs, &sregs);
            assert_eq!((op.address, op.length), (regs.rdi, 4));
            assert_eq!((op.stack(true), op.stack(false)), (false, ss));
            let op = instruction(&[prefix, 0x0f, 0xae, 0x55, 0x08], &regs, &sregs);
            assert_eq!(op.address, 0x7008);
            assert_eq!((op.stack(true), op.stack(false)), (true, ss));
        }
        let op = instruction(&[0x0f, 0xae, 0x55, 0x08], &regs, &sregs);
        assert_eq!((op.stack(true), op.stack(false)), (true, true));
        // FS and GS add their base, and make it no stack reference.
        let op = instruction(&[0x64, 0x0f, 0xae, 0x55, 0x08], &regs, &sregs);
        assert_eq!(op.address, 0x10_7008);
        assert_eq!((op.stack(true), op.stack(false)), (false, false));
        let op = instruction(&[0x65, 0x0f, 0xae, 0x1f], &regs, &sregs);
        assert_eq!((op.store, op.address), (true, regs.rdi + 0x20_0000));
        // The last of two overrides counts.
        let op = instruction(&[0x64, 0x65, 0x0f, 0xae, 0x17], &regs, &sregs);
        assert_eq!(op.address, regs.rdi + 0x20_0000);
        // R13 is not RBP, nor R12 RSP.
        let op = instruction(&[0x41, 0x0f, 0xae, 0x55, 0x00], &regs, &sregs);
        assert_eq!(
            (op.address, op.stack(true), op.stack(false)),
            (0x9000, false, false)
        );
        let op = instruction(&[0x0f, 0xae, 0x14, 0x24], &regs, &sregs);
        assert!(
            op.stack(true) && op.stack(false),
            "(%rsp) is a stack reference"
        );
        // 32-bit addressing: the register's low half, and EIP-relative wraps at 4 GiB.
        let op = instruction(&[0x67, 0x0f, 0xae, 0x17], &regs, &sregs);
        assert_eq!(op.address, 0x1234);
        let op = instruction(&[0x67, 0x0f, 0xae, 0x15, 0x10, 0, 0, 0], &regs, &sregs);
        assert_eq!((op.address, op.length), (0x14, 8));
        let op = instruction(&[0x67, 0x64, 0x0f, 0xae, 0x17], &regs, &sregs);
        assert_eq!(
            op.address, 0x10_1234,
            "the base is added to the 32-bit address"
        );
        // A REX prefix counts only right before the opcode.
        let op = instruction(&[0x41, 0x3e, 0x0f, 0xae, 0x10], &regs, &sregs);
        assert_eq!(op.address, regs.rax);
        let op = instruction(&[0x3e, 0x41, 0x0f, 0xae, 0x10], &regs, &sregs);
        assert_eq!(op.address, regs.r8);
    }

    #[test]
    fn mxcsr_encodings_the_cpu_rejects_raise_what_it_raises() {
        let regs = kvm_regs::default();
        let sregs = kvm_bindings::kvm_sregs::default();
        let ud = Raise::exception(INVALID_OPCODE_VECTOR, None);
        let gp = Raise::exception(GENERAL_PROTECTION_VECTOR, Some(0));
        for code in [
            &[0x66, 0x0f, 0xae, 0x17][..],
            &[0xf2, 0x0f, 0xae, 0x17],
            &[0xf3, 0x0f, 0xae, 0x1f],
            &[0xf0, 0x0f, 0xae, 0x17],
            &[0x48, 0x66, 0x0f, 0xae, 0x17],
            &[0x66, 0x48, 0x0f, 0xae, 0x17],
        ] {
            assert_eq!(
                decode(code, &regs, &sregs),
                MxcsrDecode::Invalid(
                    if code.contains(&0x1f) {
                        "stmxcsr"
                    } else {
                        "ldmxcsr"
                    },
                    ud
                )
            );
        }
        // 15 bytes is the most an instruction may have; past that it is #GP(0), whatever
        // follows, even if that could not be read.
        let mut code = vec![0x3e; 12];
        code.extend([0x0f, 0xae, 0x17]);
        assert_eq!(instruction(&code, &regs, &sregs).length, 15);
        code.insert(0, 0x2e);
        assert_eq!(
            decode(&code[..15], &regs, &sregs),
            MxcsrDecode::Invalid("overlong instruction", gp)
        );
        assert_eq!(
            decode(&[0x3e; 15], &regs, &sregs),
            MxcsrDecode::Invalid("overlong instruction", gp)
        );
        // Too few bytes, or something else: nothing.
        for code in [
            &[][..],
            &[0x3e; 14],
            &[0x0f, 0xae],
            &[0x0f, 0xae, 0x14],
            &[0x0f, 0xae, 0x15, 0x10, 0],
            &[0x0f, 0xae, 0xd0],
            &[0x0f, 0xae, 0x2f],
            &[0xc5, 0xf8, 0xae, 0x17],
        ] {
            assert_eq!(mxcsr_decode(code, &regs, &sregs), None, "{code:02x?}");
        }
    }

    #[test]
    fn mxcsr_operands_wrap_as_the_cpu_wraps_them() {
        let regs = kvm_regs {
            rax: u64::MAX - 1,
            rip: u64::MAX - 6,
            ..Default::default()
        };
        let sregs = kvm_bindings::kvm_sregs::default();
        let op = instruction(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0], &regs, &sregs);
        assert_eq!((op.address, op.length), (0x10, 7));
        let op = instruction(&[0x0f, 0xae, 0x50, 0x08], &regs, &sregs);
        assert_eq!(op.address, 6);
    }

    /// Page tables in `ram` for the access tests: virtual 0x40_0000 + i * 4 KiB is
    /// `frames[i]` (0: not present), and virtual 0x60_0000 the 2 MiB page at `big`.
    fn paging_over(ram: &GuestRam, frames: [u64; 4], read_only: usize, big: u64) -> Paging {
        const TABLE: u64 = 0x23;
        const PAGE: u64 = 0x63;
        let entry = |at: u64, value: u64| ram.write(at, &value.to_le_bytes()).unwrap();
        entry(0x1000, 0x2000 | TABLE);
        entry(0x2000, 0x3000 | TABLE);
        entry(0x3000 + 2 * 8, 0x4000 | TABLE);
        entry(0x3000 + 3 * 8, big | PAGE | 0x80);
        for (i, frame) in frames.into_iter().enumerate() {
            if frame != 0 {
                let writable = if i == read_only { 0 } else { 2 };
                entry(0x4000 + 8 * i as u64, frame | (PAGE & !2) | writable);
            }
        }
        Paging {
            cr3: 0x1000,
            cr0: 1 << 16,
            cr4: 0,
            efer: 1 << 11,
            rflags: 2,
            physical_bits: 46,
            gib_pages: true,
        }
    }

    #[test]
    fn kernel_accesses_straddle_pages_and_fault_where_the_cpu_does() {
        let ram = GuestRam::new(8 << 20).unwrap();
        // Pages 0 and 1 of unrelated frames, 2 not present, 3 read-only.
        let paging = paging_over(&ram, [0x30_0000, 0x10_0000, 0, 0x20_0000], 3, 0x40_0000);
        ram.write(0x30_0ffe, &[1, 2]).unwrap();
        ram.write(0x10_0000, &[3, 4]).unwrap();
        let mut word = [0u8; 4];
        assert!(matches!(
            read_virtual(&ram, &paging, 0x40_0ffe, &mut word),
            Outcome::Done(())
        ));
        assert_eq!(word, [1, 2, 3, 4]);
        assert!(matches!(
            write_virtual(&ram, &paging, 0x40_0ffe, &[9, 8, 7, 6]),
            Outcome::Done(())
        ));
        let mut back = [0u8; 2];
        ram.read(0x10_0000, &mut back).unwrap();
        assert_eq!(back, [7, 6]);
        // Into the page that is not there: #PF at its first byte, and nothing written on the
        // page before it.
        let fault = |error_code, at| Raise::page_fault(error_code, at);
        ram.write(0x10_0ffe, &[0x5a, 0x5a]).unwrap();
        match write_virtual(&ram, &paging, 0x40_1ffe, &[1, 1, 1, 1]) {
            Outcome::Fault(raise) => assert_eq!(raise, fault(2, 0x40_2000)),
            _ => panic!("no fault"),
        }
        ram.read(0x10_0ffe, &mut back).unwrap();
        assert_eq!(back, [0x5a, 0x5a]);
        match read_virtual(&ram, &paging, 0x40_2010, &mut word) {
            Outcome::Fault(raise) => assert_eq!(raise, fault(0, 0x40_2010)),
            _ => panic!("no fault"),
        }
        // A read-only page: read, not written (CR0.WP).
        assert!(matches!(
            read_virtual(&ram, &paging, 0x40_3000, &mut word),
            Outcome::Done(())
        ));
        match write_virtual(&ram, &paging, 0x40_3000, &word) {
            Outcome::Fault(raise) => assert_eq!(raise, fault(3, 0x40_3000)),
            _ => panic!("no fault"),
        }
        // Code: the bytes before the page that is not there.
        ram.write(0x10_0ffd, &[0x0f, 0xae, 0x17]).unwrap();
        assert_eq!(read_code(&ram, &paging, 0x40_1ffd), vec![0x0f, 0xae, 0x17]);
        assert_eq!(read_code(&ram, &paging, 0x40_2000), Vec::<u8>::new());
        assert_eq!(read_code(&ram, &paging, 0x40_0ff8).len(), 15);
        // The top of the address space is not mapped: #PF at the operand's first byte.
        match read_virtual(&ram, &paging, u64::MAX - 1, &mut word) {
            Outcome::Fault(raise) => assert_eq!(raise, fault(0, u64::MAX - 1)),
            _ => panic!("no fault"),
        }
    }

    #[test]
    fn kernel_accesses_outside_ram_are_not_guessed_and_ram_above_4_gib_is_ram() {
        // RAM past 3.25 GiB continues at 4 GiB: its physical addresses are above the size.
        let size = crate::layout::MMIO_GAP_START + (2 << 20);
        let ram = GuestRam::new(size).unwrap();
        let paging = paging_over(&ram, [0xd000_0000, 0x1_0000_0000, 0, 0], 4, 0x1_0000_0000);
        let mut word = [0u8; 4];
        // MMIO: what a device would answer is not known here.
        assert!(matches!(
            read_virtual(&ram, &paging, 0x40_0000, &mut word),
            Outcome::Unknown
        ));
        assert!(matches!(
            write_virtual(&ram, &paging, 0x40_0ffe, &word),
            Outcome::Unknown
        ));
        // High RAM, through a 4 KiB and a 2 MiB page.
        assert!(matches!(
            write_virtual(&ram, &paging, 0x40_1000, &[1, 2, 3, 4]),
            Outcome::Done(())
        ));
        assert!(matches!(
            read_virtual(&ram, &paging, 0x60_0000, &mut word),
            Outcome::Done(())
        ));
        assert_eq!(word, [1, 2, 3, 4]);
    }

    #[test]
    fn vdso32_is_turned_off_only_where_int80_is_the_way_in() {
        let with = |syscall, int80| HostLimits {
            refused: vec![],
            system_calls: Some(SystemCalls { syscall, int80 }),
        };
        assert_eq!(with(false, true).linux_cmdline_options(), vec!["vdso32=0"]);
        // Nothing helps where neither works, and nothing is needed where syscall does.
        assert!(with(false, false).linux_cmdline_options().is_empty());
        assert!(with(true, false).linux_cmdline_options().is_empty());
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

    #[test]
    fn every_candidate_with_a_feature_can_be_hidden_by_config_too() {
        for candidate in CANDIDATES {
            if let Some(feature) = candidate.feature {
                assert!(
                    CpuFeature::ALL.contains(&feature),
                    "{}",
                    candidate.instruction
                );
            }
        }
    }
}
