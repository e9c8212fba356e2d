//! The complete state of a machine as plain serde values, and the KVM calls that save and
//! load it. Guest memory is not in here: it is referenced through the machine's
//! [`GuestRam`](crate::memory::GuestRam), so a snapshot costs the same for 64 MiB and 4 GiB.
//!
//! [`VcpuState`] is saved and loaded on the vCPU's own thread; [`VmState`] on the thread that
//! owns the machine, while every vCPU is paused.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::DeviceStates;

/// KVM refused to save or load one piece of state.
#[derive(Debug, thiserror::Error)]
#[error("{step} failed: {source}")]
pub struct StateError {
    /// The KVM call, e.g. "KVM_SET_SREGS".
    pub step: &'static str,
    /// The error KVM returned.
    pub source: kvm_ioctls::Error,
}

fn step<T>(name: &'static str, result: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    result.map_err(|source| StateError { step: name, source })
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// Multiprocessing state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE and AVX state (KVM_GET_XSAVE covers what KVM_GET_FPU would).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists that this host lets us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            // kvm_xsave ends in a zero-length array, so it has no derived Clone; the fixed
            // 4 KiB region is all of it.
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            debug_regs: self.debug_regs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            events: self.events,
        }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cr3", &format_args!("{:#x}", self.sregs.cr3))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// What the host can save for each vCPU; decided once per machine.
#[derive(Debug, Clone)]
pub struct VcpuStateLayout {
    /// MSR indices to save and load.
    pub msr_indices: Vec<u32>,
}

impl VcpuState {
    /// Saves every piece of `vcpu`'s state. The vCPU must not be running.
    pub fn save(vcpu: &VcpuFd, layout: &VcpuStateLayout) -> Result<Self, StateError> {
        // Order matters when saving:
        // - KVM_GET_MP_STATE first: it makes the local APIC accept pending INIT/SIPI events,
        //   which can change registers and APIC state read afterwards.
        // - KVM_GET_LAPIC may also update the APIC before returning it, so it goes before the
        //   MSRs (TSC deadline) and events that depend on it.
        // - KVM_GET_VCPU_EVENTS last: other GETs may still change pending-event state.
        let mp_state = step("KVM_GET_MP_STATE", vcpu.get_mp_state())?;
        let regs = step("KVM_GET_REGS", vcpu.get_regs())?;
        let sregs = step("KVM_GET_SREGS", vcpu.get_sregs())?;
        let xsave = step("KVM_GET_XSAVE", vcpu.get_xsave())?;
        let xcrs = step("KVM_GET_XCRS", vcpu.get_xcrs())?;
        let debug_regs = step("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?;
        let lapic = step("KVM_GET_LAPIC", vcpu.get_lapic())?;
        let msrs = read_msrs(vcpu, &layout.msr_indices)?;
        let events = step("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Loads this state into `vcpu`, whose CPUID must already be set. The vCPU must not be
    /// running.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        // Order matters when loading:
        // - MP state first, so the vCPU is in the right run state before registers land.
        // - Registers before vCPU events: setting regs/sregs can clear pending events.
        // - sregs before the local APIC (APIC base MSR lives in sregs), and the APIC before
        //   the MSRs, because the TSC deadline MSR is only accepted by an enabled APIC.
        // - XCRs after XSAVE: XCR0 must allow every component XSAVE restored.
        step("KVM_SET_MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        step("KVM_SET_REGS", vcpu.set_regs(&self.regs))?;
        step("KVM_SET_SREGS", vcpu.set_sregs(&self.sregs))?;
        // SAFETY: the buffer is a plain 4 KiB kvm_xsave saved by KVM_GET_XSAVE; KVM_SET_XSAVE
        // reads exactly that much.
        step("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&self.xsave) })?;
        step("KVM_SET_XCRS", vcpu.set_xcrs(&self.xcrs))?;
        step("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&self.debug_regs))?;
        step("KVM_SET_LAPIC", vcpu.set_lapic(&self.lapic))?;
        write_msrs(vcpu, &self.msrs)?;
        step("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&self.events))?;
        Ok(())
    }
}

pub(crate) fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let too_many = |_| StateError {
        step: "KVM_GET_MSRS",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    };
    let mut msrs = Msrs::from_entries(&entries).map_err(too_many)?;
    let read = step("KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?;
    if read != entries.len() {
        return Err(StateError {
            step: "KVM_GET_MSRS (partial read)",
            source: kvm_ioctls::Error::new(libc::EIO),
        });
    }
    Ok(msrs.as_slice().to_vec())
}

/// Writes `entries` into `vcpu`, failing if KVM accepts fewer than all of them.
pub(crate) fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| StateError {
        step: "KVM_SET_MSRS",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = step("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
    if written != entries.len() {
        return Err(StateError {
            step: "KVM_SET_MSRS (partial write)",
            source: kvm_ioctls::Error::new(libc::EIO),
        });
    }
    Ok(())
}

/// Machine-wide state KVM holds: interrupt controllers, PIT and the guest clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave and IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock reference.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock_ns", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Saves the machine-wide state of `vm`. Every vCPU must be paused.
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        let irqchips = IRQCHIPS
            .iter()
            .map(|&chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                step("KVM_GET_IRQCHIP", vm.get_irqchip(&mut chip)).map(|_| chip)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pit = step("KVM_GET_PIT2", vm.get_pit2())?;
        let clock = step("KVM_GET_CLOCK", vm.get_clock())?;
        Ok(VmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Loads this state into `vm`, before any vCPU state is loaded.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in &self.irqchips {
            step("KVM_SET_IRQCHIP", vm.set_irqchip(chip))?;
        }
        step("KVM_SET_PIT2", vm.set_pit2(&self.pit))?;
        // KVM_SET_CLOCK accepts no flags it reports (TSC_STABLE, REALTIME...) unless asked
        // for the realtime adjustment, which we do not want: the guest clock continues from
        // the saved value.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        step("KVM_SET_CLOCK", vm.set_clock(&clock))?;
        Ok(())
    }
}

/// A whole machine's state, less the contents of guest memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Device registers.
    pub devices: DeviceStates,
    /// Guest RAM size the snapshot was taken with.
    pub memory_size: u64,
}
