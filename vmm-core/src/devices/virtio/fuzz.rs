//! The entry point of the virtio-blk fuzz target (`fuzz/`): a queue and the guest memory
//! around it, both made of the fuzzer's bytes, served by the device as a guest's would be.
//! Whatever the bytes, serving them must end in error statuses or dropped requests, never a
//! panic or an access outside guest memory.

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::block::Block;
use super::{Inner, QueueSnapshot, Run, VirtioState};
use crate::devices::disk::{Disk, DiskCounters, MemoryDisk};
use crate::memory::GuestRam;

/// Guest RAM of a fuzzed queue.
const RAM: u64 = 1 << 20;
/// Bytes of the input that describe the queue; the rest is guest memory from address 0.
pub const HEADER: usize = 16;

/// Serves the queue `data` describes and returns what the disk counted. Layout of the first
/// [`HEADER`] bytes: queue size as a power of two (byte 0, taken mod 9), flags (byte 1: bit 0
/// event index, bit 1 read-only disk, bit 2 the machine does not hold the disk), the queue's
/// next available and next used index (u16 each), the descriptor table, available ring and
/// used ring addresses (u16 each, in units of 16, 2 and 4 bytes), the disk's size in sectors
/// (u16, at least 1). The rest of `data` is guest memory from address 0.
pub fn block_queue(data: &[u8]) -> DiskCounters {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| u16::from_le_bytes([byte(i), byte(i + 1)]);
    thread_local! {
        static RAM_OF_THIS_THREAD: RefCell<Option<GuestRam>> = const { RefCell::new(None) };
    }
    // One RAM per thread, cleared for each input: creating one costs more than serving.
    let ram = RAM_OF_THIS_THREAD.with(|cell| {
        cell.borrow_mut()
            .get_or_insert_with(|| GuestRam::new(RAM).expect("1 MiB of guest RAM"))
            .clone()
    });
    ram.write(0, &vec![0; RAM as usize])
        .expect("within guest RAM");
    let memory = data.get(HEADER..).unwrap_or_default();
    let memory = &memory[..memory.len().min(RAM as usize)];
    ram.write(0, memory).expect("within guest RAM");
    let flags = byte(1);
    let disk = Arc::new(Disk::new(
        Arc::new(MemoryDisk::new(u64::from(word(12).max(1)))),
        flags & 2 != 0,
        "fuzz",
    ));
    if flags & 4 == 0 {
        disk.grant(1).expect("a new disk is free");
    }
    let snapshot = QueueSnapshot {
        max_size: super::block::QUEUE_SIZE,
        size: 1 << (byte(0) % 9),
        ready: true,
        desc_table: u64::from(word(6)) * 16,
        avail_ring: u64::from(word(8)) * 2,
        used_ring: u64::from(word(10)) * 4,
        next_avail: word(2),
        next_used: word(4),
        event_idx: flags & 1 != 0,
    };
    let Ok(queue) = snapshot.to_queue() else {
        return disk.counters();
    };
    let mut inner = Inner {
        device: Box::new(Block::new(disk.clone(), 1)),
        state: VirtioState {
            device_type: virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
            status: 0xf,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues: Vec::new(),
            device: Vec::new(),
        },
        queues: vec![queue],
        run: Run::Running,
        mem: ram.memory().clone(),
        irq: EventFd::new(0).expect("an eventfd"),
    };
    let go = AtomicBool::new(false);
    inner.serve_queue(0, &go);
    // Whatever the first round left behind in the rings, a second one starts from it.
    inner.serve_queue(0, &go);
    disk.counters()
}

/// A well-formed input: a write of sector 1 and then a read of it, on a queue of 16 (the
/// fuzz target's seed).
pub fn example() -> Vec<u8> {
    let mut data = vec![0u8; HEADER + 0x5000];
    data[0] = 4; // 16 entries
    data[6..8].copy_from_slice(&((DESC / 16) as u16).to_le_bytes());
    data[8..10].copy_from_slice(&((AVAIL / 2) as u16).to_le_bytes());
    data[10..12].copy_from_slice(&((USED / 4) as u16).to_le_bytes());
    data[12..14].copy_from_slice(&8u16.to_le_bytes());
    let mem = &mut data[HEADER..];
    let mut put = |addr: u64, bytes: &[u8]| {
        mem[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes)
    };
    // Two chains: descriptors 0-2 (OUT sector 1) and 3-5 (IN sector 1).
    let header = |kind: u32| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&1u64.to_le_bytes());
        h
    };
    put(REQUEST, &header(VIRTIO_BLK_T_OUT));
    put(REQUEST + 0x20, &header(VIRTIO_BLK_T_IN));
    for (i, (addr, len, flags, next)) in [
        (REQUEST, 16, VRING_DESC_F_NEXT, 1),
        (0x4200, 512, VRING_DESC_F_NEXT, 2),
        (STATUS, 1, VRING_DESC_F_WRITE, 0),
        (REQUEST + 0x20, 16, VRING_DESC_F_NEXT, 4),
        (0x4400, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 5),
        (STATUS + 1, 1, VRING_DESC_F_WRITE, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        desc[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        desc[14..16].copy_from_slice(&(next as u16).to_le_bytes());
        put(DESC + 16 * i as u64, &desc);
    }
    put(AVAIL + 2, &2u16.to_le_bytes());
    put(AVAIL + 4, &0u16.to_le_bytes());
    put(AVAIL + 6, &3u16.to_le_bytes());
    data
}

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const REQUEST: u64 = 0x4000;
const STATUS: u64 = 0x4100;
