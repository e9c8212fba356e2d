//! Machine-check injection (`KVM_X86_SETUP_MCE`, `KVM_X86_SET_MCE`), which kvm-ioctls does
//! not wrap. Used to rehearse a memory error in a guest. Runs on the vCPU's own thread.

use kvm_bindings::kvm_x86_mce;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::state::StateError;

const KVMIO: u32 = 0xae;
ioctl_iow_nr!(KVM_X86_SETUP_MCE, KVMIO, 0x9c, u64);
ioctl_iow_nr!(KVM_X86_SET_MCE, KVMIO, 0x9e, kvm_x86_mce);

/// Banks the guest is given; the error is reported in bank 1.
const MCE_BANKS: u64 = 2;
const MCI_STATUS_VAL: u64 = 1 << 63;
const MCI_STATUS_UC: u64 = 1 << 61;
const MCI_STATUS_EN: u64 = 1 << 60;
const MCI_STATUS_PCC: u64 = 1 << 57;
const MCG_STATUS_EIPV: u64 = 1 << 1;
const MCG_STATUS_MCIP: u64 = 1 << 2;

fn check(step: &'static str, ret: i32) -> Result<(), StateError> {
    if ret < 0 {
        Err(StateError {
            step,
            source: kvm_ioctls::Error::last(),
        })
    } else {
        Ok(())
    }
}

/// Raises an uncorrectable, processor-context-corrupt machine check on `vcpu`.
pub fn inject_uncorrectable(vcpu: &VcpuFd) -> Result<(), StateError> {
    let mcg_cap = MCE_BANKS;
    // SAFETY: the ioctl reads one u64 from the reference, which lives across the call.
    check("KVM_X86_SETUP_MCE", unsafe {
        ioctl_with_ref(vcpu, KVM_X86_SETUP_MCE(), &mcg_cap)
    })?;
    let mce = kvm_x86_mce {
        status: MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN | MCI_STATUS_PCC,
        mcg_status: MCG_STATUS_MCIP | MCG_STATUS_EIPV,
        bank: 1,
        ..Default::default()
    };
    // SAFETY: the ioctl reads one kvm_x86_mce from the reference, which lives across the call.
    check("KVM_X86_SET_MCE", unsafe {
        ioctl_with_ref(vcpu, KVM_X86_SET_MCE(), &mce)
    })
}
