//! A disk a guest can be given, and who may use it.
//!
//! A [`Disk`] wraps what stores its bytes (a [`DiskBackend`]: a raw image file here, an
//! epoch-logged overlay of one in checkpointed pairs) and belongs to at most one machine at a
//! time ([`Holder`]): every read, write and flush names the machine it comes from, and one
//! from a machine that is not the owner is refused and counted, never carried out.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::holder::{Holder, NotHolder};
pub use super::holder::{Ownership, OwnershipError};

/// Bytes per sector, the unit of every virtio-blk address.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the identifier a guest reads with `GET_ID`.
pub const DISK_ID_LEN: usize = 20;

/// What stores a disk's bytes. Offsets and lengths are in bytes and always within
/// [`DiskBackend::size`]; calls may come from several threads.
pub trait DiskBackend: Send + Sync {
    /// The disk's size in bytes, a multiple of [`SECTOR_SIZE`].
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (as the guest's FLUSH asks).
    fn flush(&self) -> io::Result<()>;
}

/// A disk image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process (or another guest of this one) holds the image.
    #[error("disk image {path} is in use by another guest or process (it is locked)")]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// The file is not a regular file of at least one sector.
    #[error("disk image {path}: {why}")]
    Unusable {
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// A raw disk image: the file's bytes are the disk's, sector for sector. Opened with an
/// `flock` (exclusive for writing, shared for reading), so two guests never write one image.
pub struct RawImage {
    file: File,
    size: u64,
    path: PathBuf,
}

impl RawImage {
    /// Opens `path`, read-only or read-write, and locks it.
    pub fn open(path: &Path, read_only: bool) -> Result<RawImage, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        RawImage::from_file(file, path, read_only)
    }

    /// Takes `file`, the image at `path` opened by this process or received from another,
    /// and locks it. A file whose open file description already holds the lock (one passed
    /// on by the process that opened it) is locked at once, whoever else shares it.
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<RawImage, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(open_err)?;
        let unusable = |why: String| ImageError::Unusable {
            path: path.to_owned(),
            why,
        };
        if !meta.is_file() {
            return Err(unusable("not a regular file".into()));
        }
        if meta.len() < SECTOR_SIZE {
            return Err(unusable(format!(
                "{} bytes long; a disk needs at least one {SECTOR_SIZE}-byte sector",
                meta.len()
            )));
        }
        let operation = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        } | libc::LOCK_NB;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                ImageError::Locked {
                    path: path.to_owned(),
                }
            } else {
                open_err(err)
            });
        }
        if meta.len() % SECTOR_SIZE != 0 {
            tracing::warn!(image = %path.display(), bytes = meta.len(), "disk image is not a whole number of sectors: the last partial sector is not part of the disk");
        }
        Ok(RawImage {
            file,
            size: meta.len() / SECTOR_SIZE * SECTOR_SIZE,
            path: path.to_owned(),
        })
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for callers that write to the image outside the guest's requests.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl DiskBackend for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A disk whose bytes are in memory: for tests, and for fuzzing the device.
pub struct MemoryDisk(Mutex<Vec<u8>>);

impl MemoryDisk {
    /// A zeroed disk of `sectors` sectors.
    pub fn new(sectors: u64) -> MemoryDisk {
        MemoryDisk(Mutex::new(vec![0; (sectors * SECTOR_SIZE) as usize]))
    }

    /// A copy of the disk's bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl DiskBackend for MemoryDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let bytes = data
            .get(start..start.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut data = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        data.get_mut(start..start.saturating_add(bytes.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?
            .copy_from_slice(bytes);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// I/O a disk served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCounters {
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flush requests completed.
    pub flushes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Requests that failed with an error status (outside the disk, malformed, refused,
    /// write to a read-only disk, backend error).
    pub errors: u64,
}

/// A request came from a machine that does not hold the disk.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The machine does not hold the disk.
    #[error("machine {machine} does not hold the disk")]
    NotOwner {
        /// The machine.
        machine: u64,
    },
    /// The backend failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<NotHolder> for AccessError {
    fn from(e: NotHolder) -> Self {
        AccessError::NotOwner { machine: e.machine }
    }
}

/// A disk given to a guest: a backend, whether the guest may write it, its identifier, and
/// its owner.
pub struct Disk {
    backend: Arc<dyn DiskBackend>,
    read_only: bool,
    id: [u8; DISK_ID_LEN],
    holder: Holder,
    counters: Mutex<DiskCounters>,
}

impl Disk {
    /// A disk over `backend`, held by nobody yet. `id` is what `GET_ID` answers (cut to 20
    /// bytes).
    pub fn new(backend: Arc<dyn DiskBackend>, read_only: bool, id: &str) -> Disk {
        let mut bytes = [0u8; DISK_ID_LEN];
        let cut = id.len().min(DISK_ID_LEN);
        bytes[..cut].copy_from_slice(&id.as_bytes()[..cut]);
        Disk {
            backend,
            read_only,
            id: bytes,
            holder: Holder::default(),
            counters: Mutex::new(DiskCounters::default()),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// Whether the guest may only read it.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The `GET_ID` answer.
    pub fn id(&self) -> &[u8; DISK_ID_LEN] {
        &self.id
    }

    /// Gives the disk to `machine`. Refused while another machine holds it: that one must
    /// be revoked first.
    pub fn grant(&self, machine: u64) -> Result<(), OwnershipError> {
        self.holder.grant(machine)
    }

    /// Takes the disk from `machine`: from this call on its requests are refused, and the
    /// call returns once a request of its still in progress has finished (waiting at most
    /// `patience`). Revoking a machine that does not hold the disk does nothing.
    pub fn revoke(&self, machine: u64, patience: Duration) -> Result<(), OwnershipError> {
        self.holder.revoke(machine, patience)
    }

    /// Who holds the disk, and the count of grants, revocations and refusals.
    pub fn ownership(&self) -> Ownership {
        self.holder.ownership()
    }

    /// The I/O served so far.
    pub fn counters(&self) -> DiskCounters {
        *self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` on the backend for `machine`, if it holds the disk.
    fn with_backend<T>(
        &self,
        machine: u64,
        op: impl FnOnce(&dyn DiskBackend) -> io::Result<T>,
    ) -> Result<T, AccessError> {
        Ok(self.holder.run(machine, || op(self.backend.as_ref()))??)
    }

    /// Reads for `machine`.
    pub fn read_at(&self, machine: u64, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.with_backend(machine, |b| b.read_at(offset, buf))
    }

    /// Writes for `machine`.
    pub fn write_at(&self, machine: u64, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        self.with_backend(machine, |b| b.write_at(offset, data))
    }

    /// Flushes for `machine`.
    pub fn flush(&self, machine: u64) -> Result<(), AccessError> {
        self.with_backend(machine, |b| b.flush())
    }

    /// Adds a finished request to the counters.
    pub(crate) fn count(&self, update: impl FnOnce(&mut DiskCounters)) {
        update(&mut self.counters.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .field("ownership", &self.ownership())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn mem_disk(sectors: u64) -> (Arc<MemoryDisk>, Arc<Disk>) {
        let backend = Arc::new(MemoryDisk::new(sectors));
        let disk = Arc::new(Disk::new(backend.clone(), false, "test-disk"));
        (backend, disk)
    }

    #[test]
    fn a_revoked_machine_writes_nothing_and_is_counted() {
        let (backend, disk) = mem_disk(4);
        disk.grant(1).unwrap();
        disk.write_at(1, 0, &[1; 512]).unwrap();
        disk.revoke(1, Duration::from_secs(1)).unwrap();
        disk.grant(2).unwrap();
        assert!(matches!(
            disk.write_at(1, 512, &[9; 512]),
            Err(AccessError::NotOwner { machine: 1 })
        ));
        disk.write_at(2, 1024, &[2; 512]).unwrap();
        let data = backend.contents();
        assert_eq!(&data[..512], &[1; 512][..]);
        assert_eq!(&data[512..1024], &[0; 512][..], "the revoked write landed");
        assert_eq!(&data[1024..1536], &[2; 512][..]);
        assert_eq!(
            disk.ownership(),
            Ownership {
                owner: Some(2),
                grants: 2,
                revocations: 1,
                refused: 1
            }
        );
    }

    #[test]
    fn a_held_disk_cannot_be_granted_to_another_machine() {
        let (_, disk) = mem_disk(1);
        disk.grant(1).unwrap();
        assert!(matches!(disk.grant(2), Err(OwnershipError::HeldBy(1))));
        // Revoking a machine that does not hold it changes nothing.
        disk.revoke(2, Duration::ZERO).unwrap();
        assert_eq!(disk.ownership().owner, Some(1));
    }

    #[test]
    fn revoke_waits_for_the_request_in_progress() {
        struct Slow(Mutex<bool>);
        impl DiskBackend for Slow {
            fn size(&self) -> u64 {
                512
            }
            fn read_at(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
                Ok(())
            }
            fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
                std::thread::sleep(Duration::from_millis(50));
                *self.0.lock().unwrap() = true;
                Ok(())
            }
            fn flush(&self) -> io::Result<()> {
                Ok(())
            }
        }
        let backend = Arc::new(Slow(Mutex::new(false)));
        let disk = Arc::new(Disk::new(backend.clone(), false, "slow"));
        disk.grant(1).unwrap();
        let writer = {
            let disk = disk.clone();
            std::thread::spawn(move || disk.write_at(1, 0, &[0; 512]))
        };
        while disk.holder.in_flight() == 0 {
            std::thread::yield_now();
        }
        disk.revoke(1, Duration::from_secs(10)).unwrap();
        assert!(
            *backend.0.lock().unwrap(),
            "revoke returned before the write in progress finished"
        );
        writer.join().unwrap().unwrap();
    }

    #[test]
    fn images_are_locked_against_a_second_writer() {
        let path = std::env::temp_dir().join(format!("understudy-lock-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let first = RawImage::open(&path, false).unwrap();
        assert!(matches!(
            RawImage::open(&path, false),
            Err(ImageError::Locked { .. })
        ));
        assert!(matches!(
            RawImage::open(&path, true),
            Err(ImageError::Locked { .. })
        ));
        drop(first);
        let reader = RawImage::open(&path, true).unwrap();
        let second_reader = RawImage::open(&path, true).unwrap();
        assert_eq!(reader.size(), 4096);
        drop((reader, second_reader));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            RawImage::open(&path, false),
            Err(ImageError::Unusable { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
