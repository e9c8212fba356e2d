//! virtio-net over a [`Nic`]: queue 0 receives, queue 1 transmits. Features MAC, STATUS and
//! MRG_RXBUF; no checksum or segmentation offload, so every frame is whole and checksummed
//! by whoever made it.
//!
//! Received frames are taken from the backend only while the guest has buffers for them: a
//! frame that finds none waits in the device (one frame; the backend keeps the rest) until
//! the guest adds buffers and notifies the queue. A frame that the guest's buffers can never
//! hold (one buffer too small without MRG_RXBUF, or the whole ring too small) is dropped and
//! counted. A transmitted frame the backend cannot take now ([`Transmitted::Full`]) stays in
//! the guest's transmit queue, offered again when the device is next woken (by the guest's
//! next notification, or by the machine's next resume). A malformed transmit chain is
//! completed unsent and counted. Nothing here can fail in a way the guest sees other than a
//! frame lost on the wire.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress};

use super::{ServeContext, VirtioDevice};
use crate::devices::net::{Nic, Transmitted, MAX_FRAME, VNET_HDR_LEN};
use crate::memory::GuestMemoryMmap;

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX: usize = 0;
/// The transmit queue.
pub const TX: usize = 1;
/// Bytes of configuration space: MAC, status, and the (unoffered) queue-pair count.
const CONFIG_LEN: usize = 8;

/// How a received frame fared.
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Given up: the guest's buffers cannot hold it.
    Dropped,
    /// Waiting for buffers.
    NoBuffers,
}

/// A virtio-net device of one machine over `nic`.
pub(crate) struct Net {
    nic: Arc<Nic>,
    machine: u64,
    /// What the guest reads from configuration space: MAC, link status.
    config: [u8; CONFIG_LEN],
    /// A received frame (its length in `rx_buffer`) waiting for buffers.
    pending: Option<usize>,
    rx_buffer: Vec<u8>,
    tx_buffer: Vec<u8>,
}

impl Net {
    /// The device through which machine `machine` uses `nic`; its link is up.
    pub fn new(nic: Arc<Nic>, machine: u64) -> Net {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&nic.mac());
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Net {
            nic,
            machine,
            config,
            pending: None,
            rx_buffer: vec![0; MAX_FRAME],
            tx_buffer: vec![0; MAX_FRAME],
        }
    }

    /// Moves received frames into the guest's buffers while it has some.
    fn receive(&mut self, queue: &mut Queue, ctx: &ServeContext<'_>) -> bool {
        let merge = ctx.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut served = false;
        while !ctx.stop.load(Ordering::Acquire) {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.nic.receive(self.machine, &mut self.rx_buffer) {
                    Ok(Ok(Some(len))) => len,
                    Ok(Ok(None)) | Err(_) => break,
                    Ok(Err(err)) => {
                        tracing::debug!(%err, "virtio-net: the backend cannot be read");
                        break;
                    }
                },
            };
            match self.deliver(queue, ctx, len, merge) {
                Delivery::Delivered => {
                    served = true;
                    self.nic.count(|c| {
                        c.rx_frames += 1;
                        c.rx_bytes += len as u64;
                    });
                }
                Delivery::Dropped => {
                    served = true;
                    self.nic.count(|c| c.rx_dropped += 1);
                }
                Delivery::NoBuffers => {
                    self.pending = Some(len);
                    break;
                }
            }
        }
        served
    }

    /// Puts the frame of `len` bytes in `rx_buffer`, after its virtio header, into as many of
    /// the guest's buffers as it needs (one, without `merge`).
    fn deliver(
        &mut self,
        queue: &mut Queue,
        ctx: &ServeContext<'_>,
        len: usize,
        merge: bool,
    ) -> Delivery {
        let total = VNET_HDR_LEN + len;
        let ring = usize::from(queue.size());
        let mut chains = Vec::new();
        let mut room = 0usize;
        let mut malformed = false;
        while room < total && (merge || chains.is_empty()) && chains.len() < ring {
            let Some(chain) = super::pop_chain(queue, ctx.mem) else {
                break;
            };
            let head = chain.head_index();
            match Writer::new(ctx.mem, chain) {
                Ok(writer) => {
                    room += writer.available_bytes();
                    chains.push((head, Some(writer)));
                }
                Err(err) => {
                    tracing::debug!(%err, "virtio-net: malformed receive buffer");
                    chains.push((head, None));
                    malformed = true;
                    break;
                }
            }
        }
        let complete_empty = |queue: &mut Queue, heads: &mut dyn Iterator<Item = u16>| {
            for head in heads {
                if let Err(err) = queue.add_used(ctx.mem, head, 0) {
                    tracing::warn!(%err, "virtio: the used ring cannot be written");
                }
            }
        };
        if room < total {
            if chains.is_empty() {
                return Delivery::NoBuffers;
            }
            if merge && !malformed && chains.len() < ring {
                // The ring ran out before the frame fit: give the buffers back unused and
                // wait for more.
                for _ in 0..chains.len() {
                    queue.go_to_previous_position();
                }
                return Delivery::NoBuffers;
            }
            complete_empty(queue, &mut chains.iter().map(|c| c.0));
            return Delivery::Dropped;
        }
        let mut header = [0u8; VNET_HDR_LEN];
        header[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        let mut pieces = [&header[..], &self.rx_buffer[..len]];
        let mut used = Vec::with_capacity(chains.len());
        for (head, writer) in &mut chains {
            let Some(writer) = writer else {
                continue;
            };
            let mut written = 0usize;
            for piece in pieces.iter_mut() {
                let n = piece.len().min(writer.available_bytes());
                if n == 0 {
                    continue;
                }
                if writer.write_all(&piece[..n]).is_err() {
                    let heads: Vec<u16> = chains.iter().map(|c| c.0).collect();
                    complete_empty(queue, &mut heads.into_iter());
                    return Delivery::Dropped;
                }
                *piece = &piece[n..];
                written += n;
            }
            used.push((*head, written as u32));
        }
        // All at once: a guest that finds fewer of them used than the header's num_buffers
        // (it may look while the device writes) drops the frame and takes the rest for
        // frames of their own.
        if let Err(err) = add_used_together(queue, ctx.mem, &used) {
            tracing::warn!(%err, "virtio: the used ring cannot be written");
            return Delivery::Dropped;
        }
        Delivery::Delivered
    }

    /// Sends the frames the guest made available, while the backend takes them.
    fn transmit(&mut self, queue: &mut Queue, ctx: &ServeContext<'_>) -> bool {
        let mut served = false;
        while !ctx.stop.load(Ordering::Acquire) {
            let Some(chain) = super::pop_chain(queue, ctx.mem) else {
                break;
            };
            let head = chain.head_index();
            match self.read_frame(chain, ctx.mem) {
                None => self.nic.count(|c| c.tx_dropped += 1),
                Some(len) => match self.nic.transmit(self.machine, &self.tx_buffer[..len]) {
                    Err(_) | Ok(Ok(Transmitted::Full)) => {
                        // Not taken: the frame stays in the queue for later.
                        queue.go_to_previous_position();
                        if self.nic.holds(self.machine) {
                            self.nic.count(|c| c.tx_stalls += 1);
                        }
                        break;
                    }
                    Ok(Ok(Transmitted::Sent | Transmitted::Held)) => self.nic.count(|c| {
                        c.tx_frames += 1;
                        c.tx_bytes += len as u64;
                    }),
                    Ok(Ok(Transmitted::Dropped)) => self.nic.count(|c| c.tx_dropped += 1),
                    Ok(Err(err)) => {
                        tracing::debug!(%err, "virtio-net: the backend cannot be written");
                        self.nic.count(|c| c.tx_dropped += 1);
                    }
                },
            }
            if let Err(err) = queue.add_used(ctx.mem, head, 0) {
                tracing::warn!(%err, "virtio: the used ring cannot be written");
                break;
            }
            served = true;
        }
        served
    }

    /// The frame a transmit chain carries, after its virtio header, into `tx_buffer`; `None`
    /// if the chain is malformed, has no whole header or carries more than [`MAX_FRAME`].
    fn read_frame(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Option<usize> {
        let mut reader = Reader::new(mem, chain).ok()?;
        let len = reader.available_bytes().checked_sub(VNET_HDR_LEN)?;
        if len > MAX_FRAME {
            return None;
        }
        // The guest's header asks for no offload (none was offered): it is not looked at.
        let mut header = [0u8; VNET_HDR_LEN];
        reader.read_exact(&mut header).ok()?;
        reader.read_exact(&mut self.tx_buffer[..len]).ok()?;
        Some(len)
    }
}

/// Adds the buffers `used` (head, length) to the used ring so that the guest sees them all
/// used at once: their entries first, then the used index past all of them. Nothing is
/// added if one cannot be. (The queue counts only the last as added, which matters only to
/// `VIRTIO_RING_F_EVENT_IDX`, not offered.)
fn add_used_together(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last, last_len), rest)) = used.split_last() else {
        return Ok(());
    };
    let start = queue.next_used();
    let size = queue.size();
    for (i, &(head, len)) in rest.iter().enumerate() {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        // Where the queue would put it: after the flags and index, 8 bytes an entry.
        let entry = u64::from(start.wrapping_add(i as u16) % size);
        let addr = queue
            .used_ring()
            .checked_add(4 + 8 * entry)
            .map(GuestAddress)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    // The last goes in through the queue, which writes the used index after its entry with
    // release ordering: the guest sees the entries before it no later than the index.
    queue.set_next_used(start.wrapping_add(rest.len() as u16));
    let added = queue.add_used(mem, last, last_len);
    if added.is_err() {
        queue.set_next_used(start);
    }
    added
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MRG_RXBUF)
    }

    fn queue_count(&self) -> usize {
        2
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (start + data.len()).min(CONFIG_LEN);
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    fn serve_queue(&mut self, index: usize, queue: &mut Queue, ctx: &ServeContext<'_>) -> bool {
        if !self.nic.holds(self.machine) {
            // Not this machine's: its queues are left as they are, for the holder.
            return false;
        }
        match index {
            RX => self.receive(queue, ctx),
            TX => self.transmit(queue, ctx),
            _ => false,
        }
    }

    fn backend_fd(&self) -> Option<(std::os::unix::io::RawFd, usize)> {
        self.nic.receive_fd().map(|fd| (fd, RX))
    }

    fn save_device(&self) -> Vec<u8> {
        self.config.to_vec()
    }

    fn restore_device(&mut self, state: &[u8]) -> Result<(), String> {
        match state.len() {
            // A snapshot without it: the device keeps its own.
            0 => Ok(()),
            CONFIG_LEN => {
                self.config.copy_from_slice(state);
                Ok(())
            }
            n => Err(format!(
                "the snapshot's NIC state is {n} bytes, not {CONFIG_LEN}"
            )),
        }
    }
}
