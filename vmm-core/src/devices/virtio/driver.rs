//! A minimal polled virtio driver for the devices' tests, as the test kernels are: it probes
//! a [`VirtioSlot`] through its registers, lays every queue out in guest RAM, makes
//! descriptor chains available and waits for the device to use them.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::VirtioSlot;
use crate::memory::GuestRam;

/// Entries of every queue the driver sets up.
pub(super) const QUEUE: u16 = 16;
/// How long anything the device should do may take before a test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// Where queue `queue`'s descriptor table, available ring and used ring are: queue *q* in
/// the 16 KiB from `0x1000 + q * 0x4000`, one page each.
pub(super) fn rings(queue: usize) -> (u64, u64, u64) {
    let base = 0x1000 + 0x4000 * queue as u64;
    (base, base + 0x1000, base + 0x2000)
}

/// A register read.
pub(super) fn read_reg(slot: &VirtioSlot, offset: u32) -> u32 {
    let mut data = [0u8; 4];
    slot.read(u64::from(offset), &mut data);
    u32::from_le_bytes(data)
}

/// A register write.
pub(super) fn write_reg(slot: &VirtioSlot, offset: u32, value: u32) {
    slot.write(u64::from(offset), &value.to_le_bytes());
}

/// Waits until `done` holds; fails the test, naming `what`, if it does not in time.
pub(super) fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The driver's side of one queue.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    /// The available index the driver has published.
    avail_idx: u16,
    /// The next descriptor to fill: descriptors are handed out in turn, round the table.
    next_desc: u16,
}

/// A driver of one device over `ram`.
pub(super) struct Driver {
    pub ram: GuestRam,
    pub slot: VirtioSlot,
    rings: Vec<Ring>,
}

impl Driver {
    /// Probes `slot`, accepting `features` and `VIRTIO_F_VERSION_1`, sets up every queue
    /// with [`QUEUE`] entries where [`rings`] puts it, and lets the device run.
    pub fn start(ram: GuestRam, slot: VirtioSlot, features: u64) -> Driver {
        let rings = (0..slot.queue_count())
            .map(|q| {
                let (desc, avail, used) = rings(q);
                Ring {
                    desc,
                    avail,
                    used,
                    avail_idx: 0,
                    next_desc: 0,
                }
            })
            .collect();
        let driver = Driver { ram, slot, rings };
        driver.probe(features | 1 << VIRTIO_F_VERSION_1);
        driver.slot.resume();
        driver
    }

    fn probe(&self, features: u64) {
        let slot = &self.slot;
        write_reg(slot, VIRTIO_MMIO_STATUS, 0);
        write_reg(
            slot,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        write_reg(slot, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write_reg(slot, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        write_reg(slot, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write_reg(slot, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        write_reg(
            slot,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_ne!(
            read_reg(slot, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
        for (q, ring) in self.rings.iter().enumerate() {
            write_reg(slot, VIRTIO_MMIO_QUEUE_SEL, q as u32);
            write_reg(slot, VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE));
            write_reg(slot, VIRTIO_MMIO_QUEUE_DESC_LOW, ring.desc as u32);
            write_reg(slot, VIRTIO_MMIO_QUEUE_AVAIL_LOW, ring.avail as u32);
            write_reg(slot, VIRTIO_MMIO_QUEUE_USED_LOW, ring.used as u32);
            write_reg(slot, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        write_reg(
            slot,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK,
        );
    }

    /// The guest physical address of queue `queue`'s used ring.
    pub fn used_ring(&self, queue: usize) -> u64 {
        self.rings[queue].used
    }

    /// The used index the device has published in queue `queue`.
    pub fn used_idx(&self, queue: usize) -> u16 {
        let mut idx = [0u8; 2];
        self.ram.read(self.rings[queue].used + 2, &mut idx).unwrap();
        u16::from_le_bytes(idx)
    }

    /// Used-ring entry `idx` (a free-running index) of queue `queue`: its head and length.
    pub fn used(&self, queue: usize, idx: u16) -> (u16, u32) {
        let at = self.rings[queue].used + 4 + 8 * u64::from(idx % QUEUE);
        let mut elem = [0u8; 8];
        self.ram.read(at, &mut elem).unwrap();
        let id = u32::from_le_bytes(elem[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(elem[4..8].try_into().unwrap());
        (id as u16, len)
    }

    /// Makes a chain of `(addr, len, device_writable)` available in queue `queue` without
    /// notifying; returns its head.
    pub fn make_available(&mut self, queue: usize, chain: &[(u64, u32, bool)]) -> u16 {
        let ring = &mut self.rings[queue];
        let head = ring.next_desc;
        for (i, (addr, len, writable)) in chain.iter().enumerate() {
            let index = (head + i as u16) % QUEUE;
            let next = (index + 1) % QUEUE;
            let mut flags = if *writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..16].copy_from_slice(&next.to_le_bytes());
            self.ram
                .write(ring.desc + 16 * u64::from(index), &desc)
                .unwrap();
        }
        ring.next_desc = (head + chain.len() as u16) % QUEUE;
        let entry = u64::from(ring.avail_idx % QUEUE);
        self.ram
            .write(ring.avail + 4 + 2 * entry, &head.to_le_bytes())
            .unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.ram
            .write(ring.avail + 2, &ring.avail_idx.to_le_bytes())
            .unwrap();
        head
    }

    /// Notifies queue `queue`.
    pub fn notify(&self, queue: usize) {
        write_reg(&self.slot, VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32);
    }

    /// Submits a chain to queue `queue` and waits for it to be used; returns the used length.
    pub fn submit(&mut self, queue: usize, chain: &[(u64, u32, bool)]) -> u32 {
        let before = self.used_idx(queue);
        self.make_available(queue, chain);
        self.notify(queue);
        self.wait_used(queue, before.wrapping_add(1))
    }

    /// Waits until queue `queue`'s used index is `idx`; returns the length of the entry
    /// before it.
    pub fn wait_used(&self, queue: usize, idx: u16) -> u32 {
        wait_until(&format!("queue {queue}'s used index is {idx}"), || {
            self.used_idx(queue) == idx
        });
        self.used(queue, idx.wrapping_sub(1)).1
    }
}
