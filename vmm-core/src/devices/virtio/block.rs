//! virtio-blk: requests IN, OUT, FLUSH and GET_ID against a [`Disk`], one queue.
//!
//! Every request is checked before the disk sees it: a chain without a status byte is
//! dropped (completed with nothing written, and counted), and one whose header is short,
//! whose data is not whole sectors, that reaches past the disk's end, writes a read-only
//! disk, or comes from a machine that no longer holds the disk completes with
//! `VIRTIO_BLK_S_IOERR`; an unknown type with `VIRTIO_BLK_S_UNSUPP`. Data moves in bounded
//! pieces, so a request's size costs the VMM no memory.

use std::io::{Read, Write};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vm_memory::ByteValued;

use super::{serve_each, ServeContext, VirtioDevice};
use crate::devices::disk::{AccessError, Disk, DISK_ID_LEN, SECTOR_SIZE};
use crate::memory::GuestMemoryMmap;

/// Entries of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes moved between the guest and the disk at once.
const CHUNK: usize = 64 << 10;

/// The request header the driver puts first in every chain.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct RequestHeader {
    kind: u32,
    _ioprio: u32,
    sector: u64,
}

// SAFETY: plain integers, no padding, every bit pattern valid.
unsafe impl ByteValued for RequestHeader {}

/// A virtio-blk device of one machine over `disk`.
pub(crate) struct Block {
    disk: Arc<Disk>,
    machine: u64,
    buffer: Vec<u8>,
}

impl Block {
    /// The device through which machine `machine` uses `disk`.
    pub fn new(disk: Arc<Disk>, machine: u64) -> Block {
        Block {
            disk,
            machine,
            buffer: vec![0; CHUNK],
        }
    }

    /// Serves one request; returns the status for the guest and the data bytes written
    /// into guest memory.
    fn request(
        &mut self,
        header: Option<RequestHeader>,
        reader: Option<&mut Reader<'_, GuestBitmap<'_>>>,
        data: &mut Writer<'_, GuestBitmap<'_>>,
    ) -> (u32, u32) {
        let Some(header) = header else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let in_range = |len: usize| {
            (len as u64).is_multiple_of(SECTOR_SIZE)
                && header
                    .sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|start| start.checked_add(len as u64))
                    .is_some_and(|end| end <= self.disk.size())
        };
        let start = header.sector.wrapping_mul(SECTOR_SIZE);
        match header.kind {
            VIRTIO_BLK_T_IN => {
                let len = data.available_bytes();
                if !in_range(len) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut done = 0;
                while done < len {
                    let n = CHUNK.min(len - done);
                    let piece = &mut self.buffer[..n];
                    if self
                        .disk
                        .read_at(self.machine, start + done as u64, piece)
                        .is_err()
                        || data.write_all(piece).is_err()
                    {
                        return (VIRTIO_BLK_S_IOERR, done as u32);
                    }
                    done += n;
                }
                self.disk.count(|c| {
                    c.reads += 1;
                    c.read_bytes += len as u64;
                });
                (VIRTIO_BLK_S_OK, len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                let Some(reader) = reader else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let len = reader.available_bytes();
                if self.disk.read_only() || !in_range(len) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut done = 0;
                while done < len {
                    let n = CHUNK.min(len - done);
                    let piece = &mut self.buffer[..n];
                    if reader.read_exact(piece).is_err()
                        || self
                            .disk
                            .write_at(self.machine, start + done as u64, piece)
                            .is_err()
                    {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    done += n;
                }
                self.disk.count(|c| {
                    c.writes += 1;
                    c.written_bytes += len as u64;
                });
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => match self.disk.flush(self.machine) {
                Ok(()) => {
                    self.disk.count(|c| c.flushes += 1);
                    (VIRTIO_BLK_S_OK, 0)
                }
                Err(err) => {
                    if let AccessError::Io(err) = err {
                        tracing::warn!(%err, "virtio-blk: flush failed");
                    }
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = data.available_bytes().min(DISK_ID_LEN);
                match data.write_all(&self.disk.id()[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

type GuestBitmap<'a> =
    <<GuestMemoryMmap as vm_memory::GuestMemory>::Bitmap as vm_memory::bitmap::WithBitmapSlice<
        'a,
    >>::S;

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut features =
            (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_count(&self) -> usize {
        1
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config up to blk_size: capacity, size_max (not offered),
        // seg_max, geometry (not offered), blk_size.
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&(self.disk.size() / SECTOR_SIZE).to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        data.fill(0);
        let start = (offset as usize).min(config.len());
        let end = (start + data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn serve_queue(&mut self, _index: usize, queue: &mut Queue, ctx: &ServeContext<'_>) -> bool {
        serve_each(queue, ctx, |chain| self.serve(chain, ctx.mem))
    }
}

impl Block {
    /// Serves one request; returns how many bytes it wrote into the chain's device-writable
    /// buffers (the used-ring length).
    fn serve(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let mut writer = match Writer::new(mem, chain.clone()) {
            Ok(writer) => writer,
            Err(err) => return self.malformed(&err.to_string()),
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            return self.malformed("no status byte");
        }
        let mut status_byte = match writer.split_at(writable - 1) {
            Ok(status) => status,
            Err(err) => return self.malformed(&err.to_string()),
        };
        let mut reader = Reader::new(mem, chain).ok();
        let header = reader
            .as_mut()
            .and_then(|r| r.read_obj::<RequestHeader>().ok());
        let (status, written) = self.request(header, reader.as_mut(), &mut writer);
        if status != VIRTIO_BLK_S_OK {
            self.disk.count(|c| c.errors += 1);
        }
        match status_byte.write_obj(status as u8) {
            Ok(()) => written + 1,
            Err(_) => written,
        }
    }

    fn malformed(&self, why: &str) -> u32 {
        self.disk.count(|c| c.errors += 1);
        tracing::debug!(why, "virtio-blk: malformed request dropped");
        0
    }
}
