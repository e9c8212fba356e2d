//! The part of the kernel's userfaultfd interface that write traps use: a userfaultfd that
//! sees the faults KVM takes inside the kernel, write-protect registration, protecting and
//! unprotecting a range, and reading write faults. The structures mirror
//! `<linux/userfaultfd.h>` field for field; their sizes are checked against the kernel's in
//! the tests below.
//!
//! What it is not for: missing-page handling (copy, zero-page, continue) and non-fault events
//! (fork, remap, unmap), which nothing here asks the kernel for.
//!
//! Threads: none of its own. A [`Userfaultfd`] is used by reference from any thread: the
//! kernel serializes its ioctls and reads.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::{c_uint, c_ulong};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

/// `UFFDIO`: the ioctl type of userfaultfd and of `/dev/userfaultfd`.
const UFFDIO: c_uint = 0xAA;
/// `UFFD_API`: the API version `UFFDIO_API` asks for.
const UFFD_API: u64 = 0xAA;
/// `UFFD_EVENT_PAGEFAULT`: the event a fault on a registered range reads as.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFDIO_REGISTER_MODE_WP`: report writes to write-protected pages.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it, the ioctl lifts the protection and,
/// unless `UFFDIO_WRITEPROTECT_MODE_DONTWAKE` is given, wakes the writes it held).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults are reported as such.
pub(super) const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect works on shared memory (Linux 5.19).
pub(super) const FEATURE_WP_SHMEM: u64 = 1 << 12;

ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);
ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`, read as its page-fault variant (the only event asked for): the other
/// variants of the kernel's union are the same 24 bytes, so the size matches whichever
/// event is read.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `arg.pagefault.flags`.
    flags: u64,
    /// `arg.pagefault.address`: the faulting address.
    address: u64,
    /// `arg.pagefault.feat.ptid`, and the union's tail.
    ptid: u32,
    reserved4: u32,
}

/// An open userfaultfd, non-blocking and closed on exec.
#[derive(Debug)]
pub(super) struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Opens a userfaultfd that also sees faults the kernel takes on the process's behalf
    /// (KVM's), and enables `features` on it. Fails if the kernel lacks any of them (EINVAL)
    /// or the process may not see kernel faults (EPERM without `CAP_SYS_PTRACE`).
    ///
    /// `/dev/userfaultfd` is used where it exists, since its file permissions can allow
    /// kernel faults where the system call does not; the system call otherwise.
    pub(super) fn open(features: u64) -> io::Result<Userfaultfd> {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as c_ulong;
        let raw = match OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and touches no memory of
            // ours; `device` is an open file for the duration of the call.
            Ok(device) => unsafe { ioctl_with_val(&device, USERFAULTFD_IOC_NEW(), flags) },
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // SAFETY: the system call takes its flags by value and touches no memory.
                unsafe { libc::syscall(libc::SYS_userfaultfd, flags) as libc::c_int }
            }
            Err(err) => return Err(err),
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new file descriptor that nothing else owns.
        let uffd = Userfaultfd {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        uffd.ioctl(UFFDIO_API(), &mut api)?;
        Ok(uffd)
    }

    /// Registers `[start, start + len)` in write-protect mode.
    pub(super) fn register_write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        let mut register = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER(), &mut register)
    }

    /// Write-protects `[start, start + len)`, which must be registered.
    pub(super) fn write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        self.set_write_protection(start, len, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Lifts the write protection from `[start, start + len)` and wakes the writes held there.
    pub(super) fn remove_write_protection(&self, start: u64, len: u64) -> io::Result<()> {
        self.set_write_protection(start, len, 0)
    }

    /// Reads the pending events into `buf` and returns the addresses of the page faults among
    /// them; none (not an error) when nothing is pending.
    pub(super) fn read_faults<'a>(
        &self,
        buf: &'a mut [UffdMsg],
    ) -> io::Result<impl Iterator<Item = u64> + 'a> {
        let size = std::mem::size_of_val(buf);
        // SAFETY: `buf` is `size` writable bytes, and any bytes are a valid `UffdMsg`.
        let read = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), size) };
        let count = if read < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            0
        } else {
            // The kernel reads whole messages only.
            read as usize / std::mem::size_of::<UffdMsg>()
        };
        Ok(buf[..count]
            .iter()
            .filter(|msg| msg.event == UFFD_EVENT_PAGEFAULT)
            .map(|msg| msg.address))
    }

    fn set_write_protection(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut protect = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        self.ioctl(UFFDIO_WRITEPROTECT(), &mut protect)
    }

    /// Issues `request`, whose argument is a `T` the kernel reads and writes.
    fn ioctl<T>(&self, request: c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: every request used here is declared with the size of the `T` passed with
        // it, so the kernel reads and writes only within `arg`.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, request, arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn structures_have_the_kernels_layout() {
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRange>(), 16);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(offset_of!(UffdioRegister, mode), 16);
        assert_eq!(offset_of!(UffdioWriteprotect, mode), 16);
        assert_eq!(offset_of!(UffdMsg, flags), 8);
        assert_eq!(offset_of!(UffdMsg, address), 16);
        assert_eq!(offset_of!(UffdMsg, ptid), 24);
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From <linux/userfaultfd.h> as compiled for x86_64.
        assert_eq!(USERFAULTFD_IOC_NEW(), 0xAA00);
        assert_eq!(UFFDIO_API(), 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER(), 0xC020_AA00);
        assert_eq!(UFFDIO_WRITEPROTECT(), 0xC018_AA06);
    }

    #[test]
    fn a_feature_the_kernel_does_not_know_is_refused() {
        match Userfaultfd::open(1 << 63) {
            Err(err) => assert!(
                matches!(err.raw_os_error(), Some(libc::EINVAL | libc::EPERM)),
                "{err}"
            ),
            Ok(_) => panic!("the kernel accepted an unknown feature"),
        }
    }
}
