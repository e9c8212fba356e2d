//! The probe of the instructions this host refuses at guest CPL0: the candidates, the
//! throwaway probe VM with its #BP handler, and the one pass that runs the candidates there and
//! decides each refusal's workaround ([`probe`]).

use kvm_bindings::{kvm_regs, KVM_INTERNAL_ERROR_EMULATION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::complete::{complete_refused_instruction, BREAKPOINT_VECTOR, CR4_OSFXSR, INT3};
use super::{HostLimits, Refusal, Workaround};
use crate::boot::regs;
use crate::cpuid::{vcpu_cpuid, CpuFeature, Reg};
use crate::error::VmError;
use crate::layout::{BOOT_STACK_POINTER, KVM_TSS_ADDRESS};
use crate::memory::GuestRam;
use crate::memslots::register_memslots;

pub(super) const HLT: u8 = 0xf4;
const CR4_FSGSBASE: u64 = 1 << 16;
const CR4_OSXSAVE: u64 = 1 << 18;

/// Probe VM layout: IDT, code, the #BP handler, data for the memory operands.
const PROBE_RAM: u64 = 1 << 20;
pub(super) const PROBE_IDT: u64 = 0x1000;
const PROBE_CODE: u64 = 0x1_0000;
const PROBE_HANDLER: u64 = 0x1_f000;
pub(super) const PROBE_DATA: u64 = 0x2_0000;
/// Where the #BP handler counts its calls.
const PROBE_BREAKPOINTS: u64 = PROBE_DATA + 0x800;
/// The boot protocol's code selector, where the probes' interrupt gates lead.
pub(super) const KERNEL_CS: u16 = 0x10;

/// An instruction a kernel may execute that some hosts refuse at CPL0.
pub(super) struct Candidate {
    /// As the log names it.
    pub(super) instruction: &'static str,
    /// Register set-up that must run before it (never refused).
    setup: &'static [u8],
    /// The instruction. Memory operands are at RSI, which points at zeroed data.
    code: &'static [u8],
    /// The CPU feature it belongs to; probed only when the host offers the feature.
    pub(super) feature: Option<CpuFeature>,
    /// CR4 bits it needs.
    cr4: u64,
    /// What makes Linux leave it alone when hiding the feature does not take.
    pub(super) linux_option: Option<&'static str>,
    /// Taken as refused on any host that refuses something else: the probe's own run of it
    /// is not enough to tell (see the candidate).
    assumed_on_emulating_hosts: bool,
}

pub(super) const CANDIDATES: &[Candidate] = &[
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

/// Runs every candidate the host's CPUID offers in one pass, each refusal stopping it once,
/// and decides each refusal's workaround.
pub(super) fn probe(kvm: &Kvm) -> Result<HostLimits, VmError> {
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
pub(super) fn probe_vm(kvm: &Kvm) -> Result<(VmFd, GuestRam), VmError> {
    let kvm_step = |step| move |source| VmError::Kvm { step, source };
    let vm = kvm.create_vm().map_err(kvm_step("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_step("KVM_SET_TSS_ADDR"))?;
    let ram = GuestRam::new(PROBE_RAM)?;
    register_memslots(&vm, &ram, false)?;
    regs::write_boot_tables(&ram)?;
    Ok((vm, ram))
}

/// A 64-bit interrupt gate for #BP in the probe's IDT, pointing at its handler.
fn write_breakpoint_gate(ram: &GuestRam) -> Result<(), VmError> {
    write_gate(ram, u64::from(BREAKPOINT_VECTOR), PROBE_HANDLER, 0)
}

/// A 64-bit interrupt gate in the probe's IDT: `vector` to `handler` in the boot code segment,
/// usable by `int` from privilege `dpl` and above.
pub(super) fn write_gate(
    ram: &GuestRam,
    vector: u64,
    handler: u64,
    dpl: u64,
) -> Result<(), VmError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
