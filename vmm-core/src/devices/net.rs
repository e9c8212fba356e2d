//! A network interface a guest can be given, and who may use it.
//!
//! A [`Nic`] wraps what carries its frames (a [`NetBackend`]: a Linux TAP device here, one
//! that holds transmitted frames until their epoch commits in checkpointed pairs), its MAC
//! address, and belongs to at most one machine at a time ([`Holder`]): only the holder
//! receives from the backend or transmits to it. Frames are whole Ethernet frames without
//! any virtio header; the virtio-net device adds and strips that.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::holder::Holder;
pub use super::holder::{NotHolder, Ownership, OwnershipError};

/// Largest frame carried: a 64 KiB IP packet with its Ethernet header.
pub const MAX_FRAME: usize = 65_535 + 14;
/// Bytes of the virtio header the TAP device puts before every frame (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// What became of a frame handed to [`NetBackend::transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmitted {
    /// On its way.
    Sent,
    /// Kept, to be sent later (when the epoch that produced it commits).
    Held,
    /// Not taken: the backend holds all it may. The device leaves the frame in the guest's
    /// transmit queue and offers it again later.
    Full,
    /// Not sent and not to be offered again (the host side cannot take it: link down, too
    /// big); counted as dropped.
    Dropped,
}

/// What carries a NIC's frames. Calls may come from several threads.
pub trait NetBackend: Send + Sync {
    /// A descriptor that becomes readable when [`NetBackend::receive`] has a frame, if any.
    fn receive_fd(&self) -> Option<RawFd>;
    /// The next received frame into `buf` (at least [`MAX_FRAME`] bytes): its length, or
    /// `None` when there is none now.
    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Sends (or holds) one frame.
    fn transmit(&self, frame: &[u8]) -> io::Result<Transmitted>;
}

/// A TAP device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("TAP name {name:?}: {why}")]
    Name {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun (for TAP {name}): {source}")]
    Open {
        /// The TAP.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// The TAP is attached to another process (or another guest of this one).
    #[error("TAP {name} is in use by another guest or process")]
    Busy {
        /// The TAP.
        name: String,
    },
    /// An interface of that name exists and is not a TAP device.
    #[error("{name} is a network interface but not a TAP device")]
    NotATap {
        /// The interface.
        name: String,
    },
    /// The kernel refused to attach to or create the TAP, or to set it up.
    #[error("TAP {name}: {what}: {source}")]
    Setup {
        /// The TAP.
        name: String,
        /// What was refused.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// A Linux TAP device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), opened non-blocking. An
/// existing TAP is attached to; one that does not exist is created (which needs
/// `CAP_NET_ADMIN`), and then lasts as long as this process holds it.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens or creates the TAP `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let name_err = |why| TapError::Name {
            name: name.to_owned(),
            why,
        };
        if name.is_empty() {
            return Err(name_err("empty"));
        }
        if name.len() >= libc::IFNAMSIZ {
            return Err(name_err("longer than 15 bytes"));
        }
        if name.bytes().any(|b| b == b'/' || b.is_ascii_whitespace()) {
            return Err(name_err("contains '/' or white space"));
        }
        let cname = CString::new(name).map_err(|_| name_err("contains a NUL byte"))?;
        // SAFETY: a NUL-terminated path; the returned descriptor is checked and owned below.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::Open {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let setup = |what, source| TapError::Setup {
            name: name.to_owned(),
            what,
            source,
        };
        // SAFETY: ifreq is plain old data; all zeros is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (to, from) in request.ifr_name.iter_mut().zip(cname.as_bytes()) {
            *to = *from as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF as _, &mut request) } < 0 {
            let err = io::Error::last_os_error();
            // SAFETY: a NUL-terminated name; the call only looks it up in this network
            // namespace.
            let exists = unsafe { libc::if_nametoindex(cname.as_ptr()) } != 0;
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy {
                    name: name.to_owned(),
                },
                Some(libc::EINVAL) if exists => TapError::NotATap {
                    name: name.to_owned(),
                },
                _ => setup("cannot attach to or create it", err),
            });
        }
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives for the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ as _, &header_len) } < 0 {
            return Err(setup(
                "cannot set the virtio header size",
                io::Error::last_os_error(),
            ));
        }
        // No checksum or segmentation offload is offered to the guest, so the host must hand
        // over only whole, checksummed frames.
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD as _, 0 as libc::c_ulong) } < 0 {
            return Err(setup(
                "cannot turn its offloads off",
                io::Error::last_os_error(),
            ));
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }

    /// The TAP another process opened and passed on (`SCM_RIGHTS`): the same open file,
    /// so both processes hold one attachment and nothing is opened here. Its name is asked
    /// of the kernel; a descriptor that is not a TAP's is refused.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Tap, TapError> {
        let file = File::from(fd);
        // SAFETY: ifreq is plain old data; all zeros is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq, which lives for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF as _, &mut request) } < 0 {
            return Err(TapError::Setup {
                name: "(passed on)".into(),
                what: "not an attached TUN/TAP descriptor",
                source: io::Error::last_os_error(),
            });
        }
        let name: String = request
            .ifr_name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8 as char)
            .collect();
        // SAFETY: TUNGETIFF filled the flags of the union.
        let flags = i32::from(unsafe { request.ifr_ifru.ifru_flags });
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotATap { name });
        }
        Ok(Tap { file, name })
    }

    /// The open file, to pass on to another process.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes one frame now, with an empty virtio header before it.
    pub fn send(&self, frame: &[u8]) -> io::Result<Transmitted> {
        let header = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both buffers live for the call and are only read.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n >= 0 {
            return Ok(Transmitted::Sent);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // The interface is down, its queue is full, or the frame is not one it takes:
            // a frame lost on the wire, as far as the guest can tell.
            Some(libc::EIO | libc::EAGAIN | libc::EINVAL | libc::EMSGSIZE | libc::ENOBUFS) => {
                Ok(Transmitted::Dropped)
            }
            _ => Err(err),
        }
    }
}

impl NetBackend for Tap {
    fn receive_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut header = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: header.as_mut_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            },
        ];
        loop {
            // SAFETY: both buffers live for the call and are exclusively borrowed.
            let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), 2) };
            if n >= 0 {
                let n = n as usize;
                if n <= VNET_HDR_LEN {
                    continue;
                }
                return Ok(Some(n - VNET_HDR_LEN));
            }
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => Err(err),
            };
        }
    }

    fn transmit(&self, frame: &[u8]) -> io::Result<Transmitted> {
        self.send(frame)
    }
}

/// Frames a NIC carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Received frames that did not fit the buffers the guest gave, or could not be written.
    pub rx_dropped: u64,
    /// Frames the guest transmitted that were sent or held.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Transmitted frames dropped: malformed or too long chains, or the host side could not
    /// take them.
    pub tx_dropped: u64,
    /// Times the guest's transmit queue was left waiting because the backend held all it
    /// may.
    pub tx_stalls: u64,
}

/// A network interface given to a guest: a backend, a MAC address, and its holder.
pub struct Nic {
    backend: Arc<dyn NetBackend>,
    mac: [u8; 6],
    holder: Holder,
    counters: Mutex<NicCounters>,
}

impl Nic {
    /// A NIC over `backend` with address `mac`, held by nobody yet.
    pub fn new(backend: Arc<dyn NetBackend>, mac: [u8; 6]) -> Nic {
        Nic {
            backend,
            mac,
            holder: Holder::default(),
            counters: Mutex::new(NicCounters::default()),
        }
    }

    /// The MAC address the guest is given.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The descriptor that becomes readable when a frame arrives.
    pub fn receive_fd(&self) -> Option<RawFd> {
        self.backend.receive_fd()
    }

    /// Gives the NIC to `machine`. Refused while another machine holds it.
    pub fn grant(&self, machine: u64) -> Result<(), OwnershipError> {
        self.holder.grant(machine)
    }

    /// Takes the NIC from `machine`, waiting at most `patience` for a frame it is sending.
    pub fn revoke(&self, machine: u64, patience: Duration) -> Result<(), OwnershipError> {
        self.holder.revoke(machine, patience)
    }

    /// Whether `machine` holds the NIC.
    pub fn holds(&self, machine: u64) -> bool {
        self.holder.holds(machine)
    }

    /// Who holds the NIC, and the count of grants, revocations and refusals.
    pub fn ownership(&self) -> Ownership {
        self.holder.ownership()
    }

    /// The frames carried so far.
    pub fn counters(&self) -> NicCounters {
        *self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Receives one frame for `machine`.
    pub fn receive(
        &self,
        machine: u64,
        buf: &mut [u8],
    ) -> Result<io::Result<Option<usize>>, NotHolder> {
        self.holder.run(machine, || self.backend.receive(buf))
    }

    /// Transmits one frame for `machine`.
    pub fn transmit(
        &self,
        machine: u64,
        frame: &[u8],
    ) -> Result<io::Result<Transmitted>, NotHolder> {
        self.holder.run(machine, || self.backend.transmit(frame))
    }

    /// Adds to the counters.
    pub(crate) fn count(&self, update: impl FnOnce(&mut NicCounters)) {
        update(&mut self.counters.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("mac", &format_mac(&self.mac))
            .field("ownership", &self.ownership())
            .finish_non_exhaustive()
    }
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A backend whose frames are in memory: what the guest transmitted, and frames queued for
/// it to receive. For tests and for fuzzing the device.
#[derive(Default)]
pub struct MemoryNet {
    inner: Mutex<MemoryNetInner>,
}

#[derive(Default)]
struct MemoryNetInner {
    incoming: std::collections::VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    /// Frames taken before it answers `Full`, if bounded.
    room: Option<usize>,
}

impl MemoryNet {
    /// Queues `frame` for the guest to receive.
    pub fn push_incoming(&self, frame: &[u8]) {
        self.lock().incoming.push_back(frame.to_vec());
    }

    /// The frames transmitted so far.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.lock().sent.clone()
    }

    /// Frames still waiting to be received.
    pub fn incoming_left(&self) -> usize {
        self.lock().incoming.len()
    }

    /// Takes only `frames` more frames, then answers `Full`; `None` takes any number.
    pub fn set_room(&self, frames: Option<usize>) {
        self.lock().room = frames;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryNetInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl NetBackend for MemoryNet {
    fn receive_fd(&self) -> Option<RawFd> {
        None
    }

    fn receive(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut inner = self.lock();
        let Some(frame) = inner.incoming.pop_front() else {
            return Ok(None);
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(Some(n))
    }

    fn transmit(&self, frame: &[u8]) -> io::Result<Transmitted> {
        let mut inner = self.lock();
        match &mut inner.room {
            Some(0) => return Ok(Transmitted::Full),
            Some(room) => *room -= 1,
            None => {}
        }
        inner.sent.push(frame.to_vec());
        Ok(Transmitted::Sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_print_and_parse_back() {
        let mac = [0x52, 0x54, 0x00, 0xab, 0x0c, 0xff];
        assert_eq!(format_mac(&mac), "52:54:00:ab:0c:ff");
        assert_eq!(parse_mac("52:54:00:ab:0c:ff"), Some(mac));
        for bad in [
            "",
            "52:54:00:ab:0c",
            "52:54:00:ab:0c:ff:00",
            "5:54:00:ab:0c:ff",
            "zz:54:00:ab:0c:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_the_holder_sends_and_receives() {
        let backend = Arc::new(MemoryNet::default());
        let nic = Nic::new(backend.clone(), [2, 0, 0, 0, 0, 1]);
        backend.push_incoming(b"frame for the guest");
        let mut buf = vec![0; MAX_FRAME];
        assert!(nic.receive(1, &mut buf).is_err());
        assert!(nic.transmit(1, b"from nobody").is_err());
        nic.grant(1).unwrap();
        assert_eq!(nic.receive(1, &mut buf).unwrap().unwrap(), Some(19));
        nic.transmit(1, b"from one").unwrap().unwrap();
        nic.revoke(1, Duration::from_secs(1)).unwrap();
        nic.grant(2).unwrap();
        assert!(nic.transmit(1, b"from a revoked machine").is_err());
        nic.transmit(2, b"from two").unwrap().unwrap();
        assert_eq!(
            backend.sent(),
            vec![b"from one".to_vec(), b"from two".to_vec()]
        );
        assert_eq!(nic.ownership().refused, 3);
        assert_eq!(nic.ownership().grants, 2);
        assert_eq!(nic.ownership().revocations, 1);
    }

    #[test]
    fn bad_tap_names_are_refused_before_the_kernel_sees_them() {
        for name in ["", "a-name-of-16-bytes", "a/b", "a b"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::Name { .. })),
                "{name:?}"
            );
        }
    }
}
