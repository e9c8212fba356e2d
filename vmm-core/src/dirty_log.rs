//! A machine's dirty log: which guest pages its vCPUs wrote, from KVM's per-memslot bitmaps
//! (or its per-vCPU dirty rings, [`crate::dirty_ring`]).
//!
//! Where the host allows it (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), reading the bitmap does not
//! clear it: [`DirtyLog::take`] reads and then clears what it read (`KVM_CLEAR_DIRTY_LOG`, which
//! also write-protects those pages again), and [`DirtyLog::peek`] only reads. A peek lets a
//! copier prepare the pages it is about to copy while the guest still runs — allocate them in
//! the copy's RAM — so that the copy itself, with the guest paused, only copies. kvm-ioctls
//! wraps the capability but not the clearing ioctl, so that is issued here.
//!
//! What the VMM itself writes into guest RAM (a device's read data and used rings, the loader)
//! KVM cannot see; [`GuestRam`] records it in a bitmap of its own, which a take adds in.
//!
//! Readable from any thread; whoever takes the log resets it, so only one party may take a
//! machine's log at a time, which is for its owner to arrange.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::dirty_ring::{self, DirtyRing};
use crate::error::VmError;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestRam;

const KVMIO: u32 = 0xae;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: reading the bitmap leaves it (and the pages'
/// protection) as it was.
const MANUAL_PROTECT_ENABLE: u64 = 1;

/// Turns manual clearing of the dirty bitmap on for `vm`, before any memslot logs dirty pages;
/// false where the host does not offer it (the bitmap is then cleared as it is read).
pub(crate) fn enable_manual_protect(vm: &VmFd) -> bool {
    let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if supported <= 0 || (supported as u64) & MANUAL_PROTECT_ENABLE == 0 {
        return false;
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [MANUAL_PROTECT_ENABLE, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_ok()
}

/// A machine's dirty log, readable from a thread other than its owner's.
#[derive(Clone)]
pub struct DirtyLog {
    fd: Arc<VmFd>,
    rings: Arc<Mutex<Vec<DirtyRing>>>,
    ram: GuestRam,
    region_lengths: Vec<u64>,
    manual_protect: bool,
}

impl DirtyLog {
    pub(crate) fn new(
        fd: Arc<VmFd>,
        rings: Arc<Mutex<Vec<DirtyRing>>>,
        ram: GuestRam,
        manual_protect: bool,
    ) -> Self {
        let region_lengths = ram.regions().iter().map(|(_, len, _)| *len).collect();
        DirtyLog {
            fd,
            rings,
            ram,
            region_lengths,
            manual_protect,
        }
    }

    /// The guest pages written since the last take, by the vCPUs or by the VMM; taking them
    /// resets them, and pages written from then on are reported by the next take.
    pub fn take(&self) -> Result<DirtyPages, VmError> {
        let mut pages = self.take_kvm()?;
        pages.merge(&DirtyPages {
            bitmaps: self.ram.take_vmm_dirty_pages(),
        });
        Ok(pages)
    }

    fn take_kvm(&self) -> Result<DirtyPages, VmError> {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        if !rings.is_empty() {
            let mut bitmaps: Vec<Vec<u64>> = self
                .region_lengths
                .iter()
                .map(|len| vec![0u64; (len / PAGE_SIZE).div_ceil(64) as usize])
                .collect();
            for ring in rings.iter_mut() {
                ring.harvest(&mut |slot, page| {
                    if let Some(word) = bitmaps
                        .get_mut(slot as usize)
                        .and_then(|b| b.get_mut((page / 64) as usize))
                    {
                        *word |= 1 << (page % 64);
                    }
                });
            }
            dirty_ring::reset_rings(&self.fd).map_err(VmError::DirtyRing)?;
            return Ok(DirtyPages { bitmaps });
        }
        let pages = self.read_bitmaps()?;
        if self.manual_protect {
            for (slot, (bitmap, len)) in pages.bitmaps.iter().zip(&self.region_lengths).enumerate()
            {
                self.clear(slot as u32, *len, bitmap)?;
            }
        }
        Ok(pages)
    }

    /// The pages the vCPUs wrote since the last take, without resetting anything: what the
    /// next take will report at least. `None` where the log cannot be read without resetting
    /// it.
    pub fn peek(&self) -> Result<Option<DirtyPages>, VmError> {
        if !self.manual_protect {
            return Ok(None);
        }
        self.read_bitmaps().map(Some)
    }

    fn read_bitmaps(&self) -> Result<DirtyPages, VmError> {
        let bitmaps = self
            .region_lengths
            .iter()
            .enumerate()
            .map(|(slot, len)| {
                self.fd
                    .get_dirty_log(slot as u32, *len as usize)
                    .map_err(|source| VmError::Kvm {
                        step: "KVM_GET_DIRTY_LOG",
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DirtyPages { bitmaps })
    }

    /// Clears the pages marked in `bitmap` from slot `slot` (`len` bytes) and write-protects
    /// them again, so that their next write is logged.
    fn clear(&self, slot: u32, len: u64, bitmap: &[u64]) -> Result<(), VmError> {
        if bitmap.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let mut clear = kvm_clear_dirty_log {
            slot,
            // The whole slot: from page 0 to its end, which need not be a multiple of 64.
            num_pages: (len / PAGE_SIZE) as u32,
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
        // SAFETY: the struct is fully initialised and points at a bitmap of at least
        // num_pages bits (it was read for this very slot), which KVM only reads.
        let ret = unsafe { ioctl_with_ref(&*self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(VmError::DirtyLog(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Pages written since the last look, per RAM region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    /// One bitmap per region, in region order; bit n of word w is page `64 * w + n`.
    pub bitmaps: Vec<Vec<u64>>,
}

impl DirtyPages {
    /// Adds every page marked in `other` (of the same RAM layout).
    pub fn merge(&mut self, other: &DirtyPages) {
        if self.bitmaps.len() < other.bitmaps.len() {
            self.bitmaps.resize(other.bitmaps.len(), Vec::new());
        }
        for (mine, theirs) in self.bitmaps.iter_mut().zip(&other.bitmaps) {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (word, other_word) in mine.iter_mut().zip(theirs) {
                *word |= other_word;
            }
        }
    }

    /// How many pages are marked.
    pub fn count(&self) -> u64 {
        self.bitmaps
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }
}
