//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): per-vCPU rings of the pages each vCPU wrote,
//! the alternative to the dirty bitmap that costs in proportion to the pages dirtied rather
//! than to the guest's RAM. kvm-ioctls wraps only the capability, so the ring is mapped and
//! read here.
//!
//! Harvested by the machine's owner while every vCPU is paused.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xae;
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;
/// Ring size asked for, per vCPU: 65536 entries (1 MiB), 256 MiB of 4 KiB pages per epoch.
pub const RING_BYTES: u32 = 1 << 20;

/// One vCPU's ring, mapped from its fd.
pub struct DirtyRing {
    entries: *mut kvm_dirty_gfn,
    count: usize,
    next: usize,
}

// SAFETY: the mapping is owned by this value and only touched by whoever holds it (the
// machine's owner, under a lock, while the vCPUs are paused); KVM writes it concurrently by
// design, with the flag protocol below.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu`, whose VM enabled the capability with `bytes` per ring.
    pub fn map(vcpu: &VcpuFd, bytes: u32) -> std::io::Result<Self> {
        // SAFETY: sysconf with a valid name has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        // SAFETY: mapping a KVM vCPU fd at the dirty-ring offset, as KVM documents; the
        // result is checked before use and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirtyRing {
            entries: ptr.cast(),
            count: bytes as usize / std::mem::size_of::<kvm_dirty_gfn>(),
            next: 0,
        })
    }

    /// Collects the dirty entries since the last harvest as (slot, page offset) and marks them
    /// for reset.
    pub fn harvest(&mut self, out: &mut impl FnMut(u32, u64)) {
        loop {
            // SAFETY: `next % count` indexes the mapped ring; the flags are read volatile
            // because KVM writes them.
            let entry = unsafe { self.entries.add(self.next % self.count) };
            let flags = unsafe { std::ptr::read_volatile(&(*entry).flags) };
            if flags & GFN_DIRTY == 0 {
                return;
            }
            fence(Ordering::Acquire);
            // SAFETY: as above; a dirty entry's slot and offset are stable until reset.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            out(slot & 0xffff, offset);
            fence(Ordering::Release);
            // SAFETY: as above; handing the entry back to KVM is this write.
            unsafe { std::ptr::write_volatile(&mut (*entry).flags, GFN_RESET) };
            self.next += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`.
        unsafe {
            libc::munmap(
                self.entries.cast(),
                self.count * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

/// Tells KVM the harvested entries may be reused (and re-protects their pages).
pub fn reset_rings(vm: &VmFd) -> std::io::Result<()> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only affects this VM.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
