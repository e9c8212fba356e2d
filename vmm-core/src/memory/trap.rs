//! Write traps: every write through one mapping of guest RAM is held until the trap's owner
//! has looked at the page, so that it can keep the page's old contents first. Built on
//! userfaultfd in write-protect mode, which covers shared memory since Linux 5.19 (and
//! covers pages that are still holes, through PTE markers).
//!
//! What it is for: a machine that resumes over RAM another machine failed in, while the
//! failed state still has to be written out byte for byte (a crash dump). The resumed
//! machine runs over a trapped mapping; each first write to a page waits the time it takes
//! to copy that page, and nothing else waits at all. The protection is laid down ahead of
//! time, on a mapping nothing runs on yet, because doing so costs time in proportion to the
//! mapping's size.
//!
//! Threads: [`WriteTrap::arm`] and [`WriteTrap::release`] run wherever the owner likes;
//! [`WriteTrap::serve`] runs on a thread of its own for as long as writes may need holding.
//! Which thread writes is irrelevant: vCPUs (through KVM) and VMM threads are held alike.

use std::os::fd::AsRawFd;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::uffd::{UffdMsg, Userfaultfd, FEATURE_PAGEFAULT_FLAG_WP, FEATURE_WP_SHMEM};
use super::GuestRam;
use crate::layout::PAGE_SIZE;

/// A write trap could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum TrapError {
    /// This host's userfaultfd lacks write-protect for shared memory, or this process may not
    /// create one that sees faults taken inside the kernel (KVM's).
    #[error("userfaultfd write-protect for shared memory is not available: {0}")]
    Unavailable(#[source] std::io::Error),
    /// The mapping could not be registered or write-protected.
    #[error("cannot {step} guest RAM: {source}")]
    Protect {
        /// What was being done.
        step: &'static str,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The stop eventfd could not be created or polled.
    #[error("write trap: {0}")]
    Io(std::io::Error),
}

/// A write-protected mapping of guest RAM and the means to let its writes through.
pub struct WriteTrap {
    uffd: Userfaultfd,
    /// Each region of the trapped mapping: (memfd offset, length, host address).
    regions: Vec<(u64, u64, u64)>,
    stop: EventFd,
}

impl WriteTrap {
    /// Write-protects all of `view`, a mapping no vCPU runs on yet (see
    /// [`GuestRam::view`]). Costs time in proportion to the mapping's size.
    pub fn arm(view: &GuestRam) -> Result<WriteTrap, TrapError> {
        // The userfaultfd sees faults taken inside the kernel: KVM takes a vCPU's there.
        let uffd = Userfaultfd::open(FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_SHMEM)
            .map_err(TrapError::Unavailable)?;
        let mut regions = Vec::new();
        let mut offset = 0;
        for (_, len, host) in view.regions() {
            regions.push((offset, len, host));
            offset += len;
        }
        for &(_, len, host) in &regions {
            let protect = |step, source| TrapError::Protect { step, source };
            uffd.register_write_protect(host, len)
                .map_err(|e| protect("register", e))?;
            uffd.write_protect(host, len)
                .map_err(|e| protect("write-protect", e))?;
        }
        Ok(WriteTrap {
            uffd,
            regions,
            stop: EventFd::new(EFD_NONBLOCK).map_err(TrapError::Io)?,
        })
    }

    /// Holds each write until `before_write(offset, len)` has returned for the `block`-byte
    /// aligned memfd range around it (clipped to its region), then lets that whole range be
    /// written freely from then on. Returns, with the number of writes held, once
    /// [`WriteTrap::stop`] is called.
    pub fn serve(
        &self,
        block: u64,
        before_write: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, TrapError> {
        let block = block.max(PAGE_SIZE).next_power_of_two();
        let mut held = 0;
        let mut events = [UffdMsg::default(); 64];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(TrapError::Io(err));
            }
            if fds[1].revents != 0 {
                return Ok(held);
            }
            let faults =
                self.uffd
                    .read_faults(&mut events)
                    .map_err(|source| TrapError::Protect {
                        step: "read write faults on",
                        source,
                    })?;
            for addr in faults {
                let Some((offset, len, host)) = self.block_around(addr, block) else {
                    continue;
                };
                before_write(offset, len);
                self.let_through(host, len)?;
                held += 1;
            }
        }
    }

    /// Makes [`WriteTrap::serve`] return.
    pub fn stop(&self) {
        // The counter saturates rather than fails; serve only needs it non-zero.
        let _ = self.stop.write(1);
    }

    /// Lifts the protection from the whole mapping (and wakes any write still held): the
    /// trap's work is done. Costs time in proportion to the mapping's size.
    pub fn release(&self) -> Result<(), TrapError> {
        for &(_, len, host) in &self.regions {
            match self.let_through(host, len) {
                Ok(()) => {}
                // The mapping is gone already (its machine was torn down): nothing to lift.
                Err(TrapError::Protect { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// The memfd range (offset, len) and host address of the `block` around `addr`.
    fn block_around(&self, addr: u64, block: u64) -> Option<(u64, u64, u64)> {
        let &(offset, len, host) = self
            .regions
            .iter()
            .find(|(_, len, host)| (*host..*host + *len).contains(&addr))?;
        let start = ((addr - host) & !(block - 1)).min(len);
        let end = (start + block).min(len);
        Some((offset + start, end - start, host + start))
    }

    fn let_through(&self, host: u64, len: u64) -> Result<(), TrapError> {
        // The kernel answers EAGAIN while the address space is being changed; it passes.
        let mut tries = 0;
        loop {
            match self.uffd.remove_write_protection(host, len) {
                Ok(()) => return Ok(()),
                Err(err) if err.raw_os_error() == Some(libc::EAGAIN) && tries < 1000 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(source) => {
                    return Err(TrapError::Protect {
                        step: "lift the write protection from",
                        source,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_write_waits_until_the_old_page_has_been_kept() {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.write(0x5000, b"before").unwrap();
        let view = ram.view().unwrap();
        let trap = match WriteTrap::arm(&view) {
            Ok(trap) => Arc::new(trap),
            // Not every host has it; understudy falls back (and says so) where it is missing.
            Err(TrapError::Unavailable(err)) => {
                eprintln!("skipped: {err}");
                return;
            }
            Err(err) => panic!("{err}"),
        };
        let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
        let served = {
            let (trap, kept, ram) = (trap.clone(), kept.clone(), ram.clone());
            std::thread::spawn(move || {
                trap.serve(4096, &mut |offset, len| {
                    let mut old = vec![0u8; len as usize];
                    ram.read_at(offset, &mut old).unwrap();
                    kept.lock().unwrap().push((offset, old));
                })
            })
        };
        // A page with data, then a hole: both are held until kept.
        view.write(0x5000, b"after!").unwrap();
        view.write(3 << 20, b"new").unwrap();
        trap.stop();
        assert_eq!(served.join().unwrap().unwrap(), 2);
        let kept = kept.lock().unwrap();
        assert_eq!(kept[0].0, 0x5000);
        assert_eq!(&kept[0].1[..6], b"before");
        assert_eq!(kept[1].0, 3 << 20);
        assert!(
            kept[1].1.iter().all(|&b| b == 0),
            "the hole was kept as zeros"
        );
        let mut now = [0u8; 6];
        ram.read(0x5000, &mut now).unwrap();
        assert_eq!(&now, b"after!");
        trap.release().unwrap();
        view.write(0x5000, b"freely").unwrap();
    }
}
