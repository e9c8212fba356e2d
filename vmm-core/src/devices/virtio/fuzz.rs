//! The entry points of the virtio fuzz targets (`fuzz/`): a device's queues and the guest
//! memory around them, all made of the fuzzer's bytes, served by the device as a guest's
//! would be: virtio-blk ([`block_queue`]) and virtio-net ([`net_queues`]). Whatever the
//! bytes, serving them must end in error statuses or dropped requests and frames, never a
//! panic or an access outside guest memory.

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use virtio_queue::{Queue, QueueT};

use super::block::Block;
use super::net::Net;
use super::{Inner, QueueSnapshot, Run, VirtioState};
use crate::devices::disk::{Disk, DiskCounters, MemoryDisk};
use crate::devices::net::{MemoryNet, Nic, NicCounters};
use crate::memory::GuestRam;

/// Guest RAM of a fuzzed queue.
const RAM: u64 = 1 << 20;
/// Bytes of the input that describe the queue; the rest is guest memory from address 0.
pub const HEADER: usize = 16;
/// Bytes of the input that describe the NIC's two queues and the frames that arrive; the
/// rest is guest memory from address 0.
pub const NET_HEADER: usize = 32;
/// Most frames that arrive for the guest in one input.
const MOST_INCOMING: usize = 3;

/// Serves the queue `data` describes and returns what the disk counted. Layout of the first
/// [`HEADER`] bytes: queue size as a power of two (byte 0, taken mod 9), flags (byte 1: bit 0
/// event index, bit 1 read-only disk, bit 2 the machine does not hold the disk), the queue's
/// next available and next used index (u16 each), the descriptor table, available ring and
/// used ring addresses (u16 each, in units of 16, 2 and 4 bytes), the disk's size in sectors
/// (u16, at least 1). The rest of `data` is guest memory from address 0.
pub fn block_queue(data: &[u8]) -> DiskCounters {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| u16::from_le_bytes([byte(i), byte(i + 1)]);
    let ram = guest_ram(data.get(HEADER..).unwrap_or_default());
    let flags = byte(1);
    let disk = Arc::new(Disk::new(
        Arc::new(MemoryDisk::new(u64::from(word(12).max(1)))),
        flags & 2 != 0,
        "fuzz",
    ));
    if flags & 4 == 0 {
        disk.grant(1).expect("a new disk is free");
    }
    let Ok(queue) = queue_at(data, 0, super::block::QUEUE_SIZE, flags & 1 != 0) else {
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
        watching_backend: false,
    };
    let go = AtomicBool::new(false);
    inner.serve_queue(0, &go);
    // Whatever the first round left behind in the rings, a second one starts from it.
    inner.serve_queue(0, &go);
    disk.counters()
}

/// One guest RAM per thread, cleared and filled with `memory` (from address 0, as much as
/// fits) for each input: creating one costs more than serving.
fn guest_ram(memory: &[u8]) -> GuestRam {
    thread_local! {
        /// The RAM, and as many zeros to clear it with.
        static RAM_OF_THIS_THREAD: RefCell<Option<(GuestRam, Vec<u8>)>> =
            const { RefCell::new(None) };
    }
    RAM_OF_THIS_THREAD.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (ram, zeros) = cell.get_or_insert_with(|| {
            let ram = GuestRam::new(RAM).expect("1 MiB of guest RAM");
            (ram, vec![0; RAM as usize])
        });
        ram.write(0, zeros).expect("within guest RAM");
        let memory = &memory[..memory.len().min(RAM as usize)];
        ram.write(0, memory).expect("within guest RAM");
        ram.clone()
    })
}

/// The queue of at most `max_size` entries that the 12 bytes of `data` from `at` describe:
/// its size as a power of two (byte 0, taken mod 9), the next available and next used index
/// (u16 each, from byte 2), the descriptor table, available ring and used ring addresses
/// (u16 each, in units of 16, 2 and 4 bytes). Byte 1 is not the queue's.
fn queue_at(
    data: &[u8],
    at: usize,
    max_size: u16,
    event_idx: bool,
) -> Result<Queue, virtio_queue::Error> {
    let byte = |i: usize| data.get(at + i).copied().unwrap_or(0);
    let word = |i: usize| u16::from_le_bytes([byte(i), byte(i + 1)]);
    QueueSnapshot {
        max_size,
        size: 1 << (byte(0) % 9),
        ready: true,
        desc_table: u64::from(word(6)) * 16,
        avail_ring: u64::from(word(8)) * 2,
        used_ring: u64::from(word(10)) * 4,
        next_avail: word(2),
        next_used: word(4),
        event_idx,
    }
    .to_queue()
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

/// Serves the NIC's receive and transmit queues that `data` describes, with frames arriving
/// for the guest, and returns what the NIC counted. Layout of the first [`NET_HEADER`]
/// bytes: the receive queue (bytes 0 to 11) and the transmit queue (bytes 12 to 23), each as
/// [`block_queue`] reads its one (size, indices, addresses), with flags in byte 1 (bit 0
/// `MRG_RXBUF` negotiated, bit 1 event index, bit 2 the machine does not hold the NIC, bit 3
/// the backend takes only byte 13's count of frames before it is full); the number of frames
/// that arrive (byte 24, mod 4), the value of their first byte (byte 25, each next byte one
/// more) and their sizes (u16 each, from byte 26). The rest of `data` is guest memory from
/// address 0.
///
/// Both queues are served twice, the second time with a backend that takes any number of
/// frames, from whatever the first round left in the rings. Beyond not panicking, what the
/// NIC did must add up: a machine that does not hold it sends and receives nothing, every
/// frame counted as sent reached the backend, and every frame that arrived was delivered,
/// dropped, or is the one waiting in the device for buffers.
pub fn net_queues(data: &[u8]) -> NicCounters {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    };

    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| u16::from_le_bytes([byte(i), byte(i + 1)]);
    let ram = guest_ram(data.get(NET_HEADER..).unwrap_or_default());
    let flags = byte(1);
    let backend = Arc::new(MemoryNet::default());
    if flags & 8 != 0 {
        backend.set_room(Some(usize::from(byte(13))));
    }
    let nic = Arc::new(Nic::new(backend.clone(), [0x52, 0x54, 0, 0, 0, 1]));
    let holds = flags & 4 == 0;
    if holds {
        nic.grant(1).expect("a new NIC is free");
    }
    let arriving = usize::from(byte(24)) % (MOST_INCOMING + 1);
    for i in 0..arriving {
        let first = byte(25);
        let frame: Vec<u8> = (0..usize::from(word(26 + 2 * i)))
            .map(|j| first.wrapping_add(j as u8))
            .collect();
        backend.push_incoming(&frame);
    }
    let mut features =
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);
    if flags & 1 != 0 {
        features |= 1 << VIRTIO_NET_F_MRG_RXBUF;
    }
    // A queue the bytes cannot describe is left unready: the device skips it.
    let queue = |at| {
        queue_at(data, at, super::net::QUEUE_SIZE, flags & 2 != 0).unwrap_or_else(|_| {
            Queue::new(super::net::QUEUE_SIZE).expect("queue size is a power of two")
        })
    };
    let mut inner = Inner {
        device: Box::new(Net::new(nic.clone(), 1)),
        state: VirtioState {
            device_type: virtio_bindings::virtio_ids::VIRTIO_ID_NET,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: features,
            status: 0xf,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues: Vec::new(),
            device: Vec::new(),
        },
        queues: vec![queue(0), queue(12)],
        run: Run::Running,
        mem: ram.memory().clone(),
        irq: EventFd::new(0).expect("an eventfd"),
        watching_backend: false,
    };
    let go = AtomicBool::new(false);
    inner.serve_queue(super::net::TX, &go);
    inner.serve_queue(super::net::RX, &go);
    backend.set_room(None);
    inner.serve_queue(super::net::RX, &go);
    inner.serve_queue(super::net::TX, &go);

    let counters = nic.counters();
    let sent = backend.sent();
    let left = backend.incoming_left() as u64;
    if !holds {
        assert_eq!(
            counters,
            NicCounters::default(),
            "a machine without the NIC used it"
        );
        assert!(sent.is_empty(), "a machine without the NIC sent a frame");
        assert_eq!(left, arriving as u64, "a machine without the NIC received");
    }
    assert_eq!(sent.len() as u64, counters.tx_frames, "frames sent");
    assert_eq!(
        sent.iter().map(|f| f.len() as u64).sum::<u64>(),
        counters.tx_bytes,
        "bytes sent"
    );
    let accounted = counters.rx_frames + counters.rx_dropped + left;
    assert!(
        accounted + 1 >= arriving as u64 && accounted <= arriving as u64,
        "{arriving} frames arrived, {accounted} delivered, dropped or left in the backend"
    );
    counters
}

/// A well-formed input for [`net_queues`] (the fuzz target's seed): a 60-byte frame in the
/// transmit queue, one receive buffer of 1526 bytes, and a 64-byte frame arriving for it, on
/// queues of 16 without `MRG_RXBUF`.
pub fn net_example() -> Vec<u8> {
    let mut data = vec![0u8; NET_HEADER + 0x9000];
    for (at, (desc, avail, used)) in [(0, NET_RX_RINGS), (12, NET_TX_RINGS)] {
        data[at] = 4; // 16 entries
        data[at + 6..at + 8].copy_from_slice(&((desc / 16) as u16).to_le_bytes());
        data[at + 8..at + 10].copy_from_slice(&((avail / 2) as u16).to_le_bytes());
        data[at + 10..at + 12].copy_from_slice(&((used / 4) as u16).to_le_bytes());
    }
    data[24] = 1;
    data[25] = 0x40;
    data[26..28].copy_from_slice(&64u16.to_le_bytes());
    let mem = &mut data[NET_HEADER..];
    let mut put = |addr: u64, bytes: &[u8]| {
        mem[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes)
    };
    let descriptor = |addr: u64, len: u32, flags: u32| {
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        desc[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
        desc
    };
    // The frame: a zero virtio header, then a broadcast Ethernet frame.
    let frame: Vec<u8> = [0xff; 6]
        .into_iter()
        .chain([0x52, 0x54, 0, 0, 0, 1])
        .chain([0x08, 0x06])
        .chain((0..46).map(|i| i as u8))
        .collect();
    put(NET_TX_FRAME + 12, &frame);
    put(
        NET_TX_RINGS.0,
        &descriptor(NET_TX_FRAME, 12 + frame.len() as u32, 0),
    );
    put(
        NET_RX_RINGS.0,
        &descriptor(NET_RX_BUFFER, 1526, VRING_DESC_F_WRITE),
    );
    for (_, avail, _) in [NET_RX_RINGS, NET_TX_RINGS] {
        put(avail + 2, &1u16.to_le_bytes());
    }
    data
}

/// The rings (descriptor table, available and used ring) of [`net_example`]'s queues, and
/// its buffers.
const NET_RX_RINGS: (u64, u64, u64) = (0x1000, 0x2000, 0x3000);
const NET_TX_RINGS: (u64, u64, u64) = (0x4000, 0x5000, 0x6000);
const NET_TX_FRAME: u64 = 0x7000;
const NET_RX_BUFFER: u64 = 0x8000;
