//! Guest RAM registered with KVM: each region of a [`GuestRam`] as a memslot of a VM, for a
//! machine (`vm`) and for the host probes' throwaway VMs (`host_limits`).
//!
//! Runs on whichever thread builds the VM.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use crate::error::VmError;
use crate::memory::GuestRam;

/// Registers each RAM region as a KVM memslot, logging dirty pages if asked.
pub(crate) fn register_memslots(
    fd: &VmFd,
    ram: &GuestRam,
    dirty_tracking: bool,
) -> Result<(), VmError> {
    for (slot, (guest_phys_addr, memory_size, userspace_addr)) in
        ram.regions().into_iter().enumerate()
    {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_tracking {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr,
            memory_size,
            userspace_addr,
        };
        // SAFETY: the host range is a live mapping owned by `ram`, which the Vm keeps for as
        // long as the VM fd (and so the memslot) exists.
        unsafe { fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
            step: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
    }
    Ok(())
}
