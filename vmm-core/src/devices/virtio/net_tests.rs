//! virtio-net driven as a guest driver would, through its registers and over real guest RAM,
//! with an in-memory backend in place of the TAP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_net::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::driver::{read_reg, wait_until, write_reg, Driver, QUEUE};
use super::net::{Net, RX, TX};
use super::VirtioSlot;
use crate::devices::net::{MemoryNet, Nic, NicCounters, MAX_FRAME, VNET_HDR_LEN};
use crate::memory::GuestRam;

const MACHINE: u64 = 7;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Where the tests' frames and buffers are: from here on, each in pages of its own.
const BUFFERS: u64 = 0x20000;
/// Features a driver without mergeable buffers accepts.
const PLAIN: u64 = 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS;
/// Features a driver with mergeable buffers accepts.
const MERGING: u64 = PLAIN | 1 << VIRTIO_NET_F_MRG_RXBUF;
/// How long a device is given to do what it must not do.
const GRACE: Duration = Duration::from_millis(50);

fn nic(mac: [u8; 6]) -> (Arc<MemoryNet>, Arc<Nic>) {
    let backend = Arc::new(MemoryNet::default());
    let nic = Arc::new(Nic::new(backend.clone(), mac));
    (backend, nic)
}

fn slot_over(ram: &GuestRam, nic: Arc<Nic>, machine: u64) -> VirtioSlot {
    VirtioSlot::new(
        0,
        Box::new(Net::new(nic, machine)),
        ram.memory().clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        "test",
    )
    .unwrap()
}

/// `len` bytes counting up from `first`.
fn frame(len: usize, first: u8) -> Vec<u8> {
    (0..len).map(|i| first.wrapping_add(i as u8)).collect()
}

/// A guest's network driver, with the NIC it drives.
struct Guest {
    driver: Driver,
    backend: Arc<MemoryNet>,
    nic: Arc<Nic>,
    next_buffer: u64,
}

impl Guest {
    /// A guest whose machine holds its NIC, its driver having accepted `features`.
    fn new(features: u64) -> Guest {
        let guest = Guest::without_the_nic(features);
        guest.nic.grant(MACHINE).unwrap();
        guest
    }

    /// A guest whose machine has not been granted its NIC.
    fn without_the_nic(features: u64) -> Guest {
        let (backend, nic) = nic(MAC);
        let ram = GuestRam::new(2 << 20).unwrap();
        let slot = slot_over(&ram, nic.clone(), MACHINE);
        Guest {
            driver: Driver::start(ram, slot, features),
            backend,
            nic,
            next_buffer: BUFFERS,
        }
    }

    /// Guest memory of `len` bytes nothing else uses, from a page boundary.
    fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += len.div_ceil(4096).max(1) * 4096;
        addr
    }

    /// Puts `frame` after a zero virtio header in a buffer of its own and makes it available
    /// in the transmit queue as one descriptor, without notifying; returns its head.
    fn offer(&mut self, frame: &[u8]) -> u16 {
        let addr = self.alloc((VNET_HDR_LEN + frame.len()) as u64);
        self.driver.ram.write(addr, &[0; VNET_HDR_LEN]).unwrap();
        self.driver
            .ram
            .write(addr + VNET_HDR_LEN as u64, frame)
            .unwrap();
        let len = (VNET_HDR_LEN + frame.len()) as u32;
        self.driver.make_available(TX, &[(addr, len, false)])
    }

    /// Posts a receive buffer of `len` bytes, without notifying; returns its head and address.
    fn post(&mut self, len: u32) -> (u16, u64) {
        let addr = self.alloc(u64::from(len));
        let head = self.driver.make_available(RX, &[(addr, len, true)]);
        (head, addr)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.driver.ram.read(addr, &mut bytes).unwrap();
        bytes
    }

    fn counters(&self) -> NicCounters {
        self.nic.counters()
    }

    /// Waits until the NIC's counters satisfy `done`.
    fn wait_counters(&self, what: &str, done: impl Fn(&NicCounters) -> bool) {
        wait_until(what, || done(&self.counters()));
    }
}

/// The virtio header of a received frame that fills `num_buffers` buffers: no offload.
fn header(num_buffers: u16) -> Vec<u8> {
    let mut header = vec![0; VNET_HDR_LEN];
    header[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    header
}

#[test]
fn the_device_is_a_nic_with_its_mac_and_its_link_up() {
    let (_, nic) = nic(MAC);
    let ram = GuestRam::new(2 << 20).unwrap();
    let slot = slot_over(&ram, nic, MACHINE);
    assert_eq!(read_reg(&slot, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read_reg(&slot, VIRTIO_MMIO_DEVICE_ID), 1);
    write_reg(&slot, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read_reg(&slot, VIRTIO_MMIO_DEVICE_FEATURES) & 1,
        1,
        "VERSION_1"
    );
    write_reg(&slot, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = read_reg(&slot, VIRTIO_MMIO_DEVICE_FEATURES);
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(low & (1 << bit), 0, "feature {bit} not offered");
    }
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
    ] {
        assert_eq!(low & (1 << bit), 0, "feature {bit} offered");
    }
    // Two queues (receive, transmit) of up to 256 entries.
    for (queue, max) in [(0, 256), (1, 256), (2, 0)] {
        write_reg(&slot, VIRTIO_MMIO_QUEUE_SEL, queue);
        assert_eq!(
            read_reg(&slot, VIRTIO_MMIO_QUEUE_NUM_MAX),
            max,
            "queue {queue}"
        );
    }
    // The MAC byte by byte, as Linux reads it, then the status as one u16.
    let config = u64::from(VIRTIO_MMIO_CONFIG);
    let mut mac = [0u8; 6];
    for (i, byte) in mac.iter_mut().enumerate() {
        let mut data = [0xee];
        slot.read(config + i as u64, &mut data);
        *byte = data[0];
    }
    assert_eq!(mac, MAC);
    let mut status = [0u8; 2];
    slot.read(config + 6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    // All of it at once, and nothing beyond it.
    let mut all = [0xeeu8; 12];
    slot.read(config, &mut all);
    assert_eq!(&all[..6], &MAC);
    assert_eq!(&all[6..], &[1, 0, 0, 0, 0, 0]);
    // Configuration space is read-only.
    slot.write(config, &[0; 4]);
    let mut first = [0u8; 4];
    slot.read(config, &mut first);
    assert_eq!(first, MAC[..4]);
}

#[test]
fn a_transmitted_frame_reaches_the_backend_once_without_its_header() {
    let mut guest = Guest::new(PLAIN);
    let first = frame(60, 1);
    let head = guest.offer(&first);
    guest.driver.notify(TX);
    assert_eq!(guest.driver.wait_used(TX, 1), 0);
    assert_eq!(guest.driver.used(TX, 0).0, head);
    assert_eq!(guest.backend.sent(), vec![first.clone()]);
    // Header and frame in descriptors of their own, as Linux may give them.
    let second = frame(1514, 7);
    let header_at = guest.alloc(VNET_HDR_LEN as u64);
    let frame_at = guest.alloc(second.len() as u64);
    guest.driver.ram.write(frame_at, &second).unwrap();
    let used = guest.driver.submit(
        TX,
        &[
            (header_at, VNET_HDR_LEN as u32, false),
            (frame_at, second.len() as u32, false),
        ],
    );
    assert_eq!(used, 0);
    // Woken again, with nothing new: nothing is sent twice.
    guest.driver.notify(TX);
    guest.driver.slot.resume();
    std::thread::sleep(GRACE);
    assert_eq!(guest.backend.sent(), vec![first.clone(), second.clone()]);
    assert_eq!(guest.driver.used_idx(TX), 2);
    let counters = guest.counters();
    assert_eq!(counters.tx_frames, 2);
    assert_eq!(counters.tx_bytes, (first.len() + second.len()) as u64);
    assert_eq!((counters.tx_dropped, counters.tx_stalls), (0, 0));
    // Used, so the guest was interrupted.
    assert_ne!(
        read_reg(&guest.driver.slot, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
        0
    );
}

#[test]
fn short_and_malformed_transmit_chains_are_completed_unsent_and_counted() {
    let mut guest = Guest::new(PLAIN);
    let buffer = guest.alloc(2 * MAX_FRAME as u64);
    let chains: [&[(u64, u32, bool)]; 5] = [
        // Less than a header.
        &[(buffer, VNET_HDR_LEN as u32 - 1, false)],
        // Outside guest RAM.
        &[(1 << 40, 100, false)],
        // Nothing to read: one device-writable buffer.
        &[(buffer, 100, true)],
        // More than the largest frame.
        &[
            (buffer, MAX_FRAME as u32, false),
            (buffer + MAX_FRAME as u64, VNET_HDR_LEN as u32 + 1, false),
        ],
        // Straddling the end of guest RAM.
        &[(buffer, 20, false), ((2 << 20) - 10, 20, false)],
    ];
    for (i, chain) in chains.into_iter().enumerate() {
        assert_eq!(guest.driver.submit(TX, chain), 0, "chain {i}");
    }
    assert!(guest.backend.sent().is_empty());
    let counters = guest.counters();
    assert_eq!((counters.tx_dropped, counters.tx_frames), (5, 0));
    // The device still sends good frames.
    let good = frame(64, 3);
    guest.offer(&good);
    guest.driver.notify(TX);
    guest.driver.wait_used(TX, 6);
    assert_eq!(guest.backend.sent(), vec![good]);
    // A header alone is an empty frame, and is sent as one.
    assert_eq!(
        guest
            .driver
            .submit(TX, &[(buffer, VNET_HDR_LEN as u32, false)]),
        0
    );
    assert_eq!(guest.backend.sent().len(), 2);
    assert!(guest.backend.sent()[1].is_empty());
}

#[test]
fn a_full_backend_leaves_frames_in_the_queue_until_it_takes_them() {
    let mut guest = Guest::new(PLAIN);
    let frames = [frame(60, 1), frame(61, 2), frame(62, 3)];
    guest.backend.set_room(Some(1));
    let heads: Vec<u16> = frames.iter().map(|f| guest.offer(f)).collect();
    guest.driver.notify(TX);
    // However often the device is woken, it sends the first and stalls on the second.
    guest.wait_counters("the device stalls", |c| c.tx_stalls >= 1);
    assert_eq!(guest.backend.sent(), frames[..1]);
    assert_eq!(
        guest.driver.used_idx(TX),
        1,
        "a frame not taken was completed"
    );
    assert_eq!(guest.driver.used(TX, 0).0, heads[0]);
    // Room for one more, and a notification: the second is sent, the third stalls.
    guest.backend.set_room(Some(1));
    let stalls = guest.counters().tx_stalls;
    guest.driver.notify(TX);
    guest.wait_counters("the device stalls again", |c| c.tx_stalls > stalls);
    assert_eq!(guest.backend.sent(), frames[..2]);
    assert_eq!(guest.driver.used_idx(TX), 2);
    // Room for any number, and the machine's next resume: the third is sent.
    guest.backend.set_room(None);
    guest.driver.slot.resume();
    guest.driver.wait_used(TX, 3);
    assert_eq!(guest.driver.used(TX, 1).0, heads[1]);
    assert_eq!(guest.driver.used(TX, 2).0, heads[2]);
    guest.driver.notify(TX);
    std::thread::sleep(GRACE);
    assert_eq!(guest.backend.sent(), frames, "each once, in order");
    let counters = guest.counters();
    assert_eq!((counters.tx_frames, counters.tx_dropped), (3, 0));
    assert!(counters.tx_stalls >= 2, "{counters:?}");
}

#[test]
fn a_received_frame_fills_one_buffer_after_its_header() {
    let mut guest = Guest::new(PLAIN);
    let (head, addr) = guest.post(1526);
    let incoming = frame(60, 9);
    guest.backend.push_incoming(&incoming);
    guest.driver.notify(RX);
    assert_eq!(guest.driver.wait_used(RX, 1), 12 + 60);
    assert_eq!(guest.driver.used(RX, 0).0, head);
    assert_eq!(guest.read(addr, 12), header(1));
    assert_eq!(guest.read(addr + 12, 60), incoming);
    assert_ne!(
        read_reg(&guest.driver.slot, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
        0
    );
    // A buffer of two descriptors, the header's and the frame's, and a frame filling it.
    let big = frame(1514, 4);
    let header_at = guest.alloc(VNET_HDR_LEN as u64);
    let data_at = guest.alloc(1514);
    guest.backend.push_incoming(&big);
    let used = guest.driver.submit(
        RX,
        &[
            (header_at, VNET_HDR_LEN as u32, true),
            (data_at, 1514, true),
        ],
    );
    assert_eq!(used, 12 + 1514);
    assert_eq!(guest.read(header_at, 12), header(1));
    assert_eq!(guest.read(data_at, 1514), big);
    let counters = guest.counters();
    assert_eq!(
        (counters.rx_frames, counters.rx_bytes, counters.rx_dropped),
        (2, 60 + 1514, 0)
    );
}

#[test]
fn a_frame_that_finds_no_buffers_waits_for_them() {
    let mut guest = Guest::new(PLAIN);
    let first = frame(100, 1);
    let second = frame(200, 2);
    guest.backend.push_incoming(&first);
    guest.backend.push_incoming(&second);
    guest.driver.notify(RX);
    // The device takes one frame to wait with; the backend keeps the other.
    wait_until("the device takes a frame", || {
        guest.backend.incoming_left() == 1
    });
    std::thread::sleep(GRACE);
    assert_eq!(guest.driver.used_idx(RX), 0);
    assert_eq!(guest.backend.incoming_left(), 1);
    // One buffer: the waiting frame goes into it, the next waits in turn.
    let (_, addr) = guest.post(1526);
    guest.driver.notify(RX);
    assert_eq!(guest.driver.wait_used(RX, 1), 12 + 100);
    assert_eq!(guest.read(addr + 12, 100), first);
    wait_until("the device takes the next frame", || {
        guest.backend.incoming_left() == 0
    });
    let (_, addr) = guest.post(1526);
    guest.driver.notify(RX);
    assert_eq!(guest.driver.wait_used(RX, 2), 12 + 200);
    assert_eq!(guest.read(addr + 12, 200), second);
    let counters = guest.counters();
    assert_eq!((counters.rx_frames, counters.rx_dropped), (2, 0));
}

#[test]
fn a_frame_larger_than_its_buffer_is_dropped_and_the_buffer_returned_empty() {
    let mut guest = Guest::new(PLAIN);
    let (head, addr) = guest.post(100);
    guest.driver.ram.write(addr, &[0xee; 100]).unwrap();
    // 12 + 89 bytes: one more than the buffer holds.
    guest.backend.push_incoming(&frame(89, 1));
    guest.driver.notify(RX);
    assert_eq!(guest.driver.wait_used(RX, 1), 0);
    assert_eq!(guest.driver.used(RX, 0).0, head);
    assert_eq!(guest.read(addr, 100), vec![0xee; 100], "nothing written");
    let counters = guest.counters();
    assert_eq!((counters.rx_dropped, counters.rx_frames), (1, 0));
    // One that fits exactly is delivered.
    let fits = frame(88, 2);
    guest.backend.push_incoming(&fits);
    let (_, addr) = guest.post(100);
    guest.driver.notify(RX);
    assert_eq!(guest.driver.wait_used(RX, 2), 100);
    assert_eq!(guest.read(addr + 12, 88), fits);
    assert_eq!(guest.counters().rx_frames, 1);
}

#[test]
fn with_mergeable_buffers_a_frame_spans_as_many_as_it_needs() {
    let mut guest = Guest::new(MERGING);
    let big = frame(3000, 5);
    let buffers: Vec<(u16, u64)> = (0..3).map(|_| guest.post(1024)).collect();
    guest.backend.push_incoming(&big);
    guest.driver.notify(RX);
    guest.driver.wait_used(RX, 3);
    let mut received = Vec::new();
    for (i, (head, addr)) in buffers.iter().enumerate() {
        let (id, len) = guest.driver.used(RX, i as u16);
        assert_eq!(id, *head, "buffer {i} used out of turn");
        assert_eq!(len, [1024, 1024, 3012 - 2048][i], "buffer {i}");
        received.extend(guest.read(*addr, len as usize));
    }
    assert_eq!(received[..12], header(3));
    assert_eq!(received[12..], big);

    // Two buffers cannot hold the next: it waits, and they stay the guest's.
    let next = frame(3000, 6);
    let mut buffers: Vec<(u16, u64)> = (0..2).map(|_| guest.post(1024)).collect();
    guest.backend.push_incoming(&next);
    guest.driver.notify(RX);
    wait_until("the device takes the frame", || {
        guest.backend.incoming_left() == 0
    });
    std::thread::sleep(GRACE);
    assert_eq!(
        guest.driver.used_idx(RX),
        3,
        "buffers used for a frame that waits"
    );
    buffers.push(guest.post(1024));
    guest.driver.notify(RX);
    guest.driver.wait_used(RX, 6);
    let mut received = Vec::new();
    for (i, (head, addr)) in buffers.iter().enumerate() {
        let (id, len) = guest.driver.used(RX, 3 + i as u16);
        assert_eq!(id, *head, "buffer {i} used out of turn");
        received.extend(guest.read(*addr, len as usize));
    }
    assert_eq!(received[..12], header(3));
    assert_eq!(received[12..], next);
    // A frame that fits one buffer takes one.
    let small = frame(500, 7);
    let (_, addr) = guest.post(1024);
    guest.backend.push_incoming(&small);
    guest.driver.notify(RX);
    assert_eq!(guest.driver.wait_used(RX, 7), 512);
    assert_eq!(guest.read(addr, 12), header(1));
    assert_eq!(guest.read(addr + 12, 500), small);
    let counters = guest.counters();
    assert_eq!((counters.rx_frames, counters.rx_dropped), (3, 0));
}

/// A guest may look at the used ring while the device fills it: the buffers of one merged
/// frame must appear there together, or the guest finds fewer than the header's
/// `num_buffers` and drops the frame (and takes the rest for frames of their own).
#[test]
fn the_buffers_of_a_merged_frame_are_used_together() {
    let mut guest = Guest::new(MERGING);
    let frames_per_round = 5u16;
    let mut torn = Vec::new();
    for round in 0..200u16 {
        for _ in 0..frames_per_round {
            guest.backend.push_incoming(&frame(3000, round as u8));
        }
        guest.next_buffer = BUFFERS;
        for _ in 0..3 * frames_per_round {
            guest.post(1024);
        }
        let start = guest.driver.used_idx(RX);
        let end = start.wrapping_add(3 * frames_per_round);
        guest.driver.notify(RX);
        // Looking as often as it can, as a guest polling its ring would.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = guest.driver.used_idx(RX).wrapping_sub(start);
            if !seen.is_multiple_of(3) {
                torn.push((round, seen));
            }
            if seen == 3 * frames_per_round {
                break;
            }
            assert!(Instant::now() < deadline, "round {round} not received");
            std::hint::spin_loop();
        }
        assert_eq!(guest.driver.used_idx(RX), end);
    }
    assert!(
        torn.is_empty(),
        "used index seen mid-frame {} times (round, buffers used): {:?}",
        torn.len(),
        &torn[..torn.len().min(8)]
    );
    assert_eq!(guest.counters().rx_frames, 1000);
}

#[test]
fn a_machine_that_does_not_hold_the_nic_leaves_its_queues_alone() {
    // Never granted, then granted and revoked.
    for revoked in [false, true] {
        let mut guest = Guest::without_the_nic(PLAIN);
        if revoked {
            guest.nic.grant(MACHINE).unwrap();
            guest.offer(&frame(60, 0));
            guest.driver.notify(TX);
            guest.driver.wait_used(TX, 1);
            guest.nic.revoke(MACHINE, Duration::from_secs(1)).unwrap();
        }
        let before = guest.backend.sent().len();
        let tx_used = guest.driver.used_idx(TX);
        let outgoing = frame(70, 1);
        let tx_head = guest.offer(&outgoing);
        let (rx_head, _) = guest.post(1526);
        let incoming = frame(80, 2);
        guest.backend.push_incoming(&incoming);
        guest.driver.notify(TX);
        guest.driver.notify(RX);
        guest.driver.slot.resume();
        std::thread::sleep(GRACE);
        assert_eq!(guest.backend.sent().len(), before, "revoked: {revoked}");
        assert_eq!(guest.backend.incoming_left(), 1, "revoked: {revoked}");
        assert_eq!(guest.driver.used_idx(TX), tx_used, "revoked: {revoked}");
        assert_eq!(guest.driver.used_idx(RX), 0, "revoked: {revoked}");
        assert!(guest.driver.slot.pause_within(Duration::from_secs(1)));
        let state = guest.driver.slot.save();
        assert_eq!(state.queues[TX].next_avail, tx_used, "revoked: {revoked}");
        assert_eq!(state.queues[RX].next_avail, 0, "revoked: {revoked}");
        let counters = guest.counters();
        assert_eq!(counters.tx_stalls, 0, "revoked: {revoked}");
        assert_eq!(counters.rx_dropped + counters.tx_dropped, 0);
        // Granted (again), the same machine finds its queues as the guest left them.
        guest.nic.grant(MACHINE).unwrap();
        guest.driver.slot.resume();
        guest.driver.wait_used(TX, tx_used + 1);
        assert_eq!(guest.driver.used(TX, tx_used).0, tx_head);
        assert_eq!(guest.backend.sent().last(), Some(&outgoing));
        assert_eq!(guest.driver.wait_used(RX, 1), 12 + 80);
        assert_eq!(guest.driver.used(RX, 0).0, rx_head);
    }
}

#[test]
fn received_frames_and_used_rings_are_marked_dirty() {
    let mut guest = Guest::new(PLAIN);
    // Paused, so that the device serves nothing before the driver's writes are forgotten.
    assert!(guest.driver.slot.pause_within(Duration::from_secs(1)));
    let outgoing = frame(1000, 1);
    guest.offer(&outgoing);
    let tx_buffer = guest.next_buffer - 4096;
    let (_, rx_buffer) = guest.post(1526);
    guest.backend.push_incoming(&frame(1000, 2));
    // What the driver wrote is not the device's.
    guest.driver.ram.take_vmm_dirty_pages();
    guest.driver.slot.resume();
    guest.driver.wait_used(TX, 1);
    guest.driver.wait_used(RX, 1);
    let dirty = guest.driver.ram.take_vmm_dirty_pages();
    let page_dirty = |addr: u64| {
        let page = (addr / 4096) as usize;
        dirty[0][page / 64] & (1 << (page % 64)) != 0
    };
    assert!(page_dirty(rx_buffer), "received data not marked");
    assert!(
        page_dirty(guest.driver.used_ring(RX)),
        "receive used ring not marked"
    );
    assert!(
        page_dirty(guest.driver.used_ring(TX)),
        "transmit used ring not marked"
    );
    // What the device only read is not marked.
    assert!(!page_dirty(tx_buffer), "a transmitted frame's page marked");
    let (desc, avail, _) = super::driver::rings(TX);
    assert!(
        !page_dirty(desc) && !page_dirty(avail),
        "a ring the device reads marked"
    );
}

#[test]
fn a_restored_device_sends_what_was_offered_before_the_save_once() {
    let mut guest = Guest::new(PLAIN);
    assert!(guest.driver.slot.pause_within(Duration::from_secs(1)));
    let outgoing = frame(80, 3);
    guest.offer(&outgoing);
    guest.driver.notify(TX);
    std::thread::sleep(GRACE);
    assert!(guest.backend.sent().is_empty(), "a paused device sent");
    let state = guest.driver.slot.save();
    assert_eq!(state.device_type, 1);
    assert_eq!(state.queues.len(), 2);
    assert_eq!(state.queues[TX].next_avail, 0);
    assert_eq!(state.queues[TX].size, QUEUE);
    let mut config = MAC.to_vec();
    config.extend((VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    assert_eq!(state.device, config);
    // The standby takes over: the NIC passes to it, and its device (paused, as a new one
    // is) continues from the saved state, over the same memory.
    guest.nic.revoke(MACHINE, Duration::from_secs(1)).unwrap();
    guest.nic.grant(MACHINE + 1).unwrap();
    let standby = slot_over(&guest.driver.ram, guest.nic.clone(), MACHINE + 1);
    standby.restore(&state).unwrap();
    let old = std::mem::replace(&mut guest.driver.slot, standby);
    guest.driver.slot.resume();
    assert_eq!(guest.driver.wait_used(TX, 1), 0);
    assert_eq!(guest.backend.sent(), vec![outgoing.clone()]);
    // Neither the standby woken again nor the old machine let run sends it twice.
    guest.driver.notify(TX);
    guest.driver.slot.resume();
    old.resume();
    write_reg(&old, VIRTIO_MMIO_QUEUE_NOTIFY, TX as u32);
    std::thread::sleep(GRACE);
    assert_eq!(guest.backend.sent(), vec![outgoing]);
    assert_eq!(guest.driver.used_idx(TX), 1);
    assert!(guest.driver.slot.pause_within(Duration::from_secs(1)));
    assert_eq!(guest.driver.slot.save().queues[TX].next_avail, 1);
}

#[test]
fn the_config_is_restored_and_a_snapshot_with_the_wrong_device_state_is_refused() {
    let guest = Guest::new(PLAIN);
    assert!(guest.driver.slot.pause_within(Duration::from_secs(1)));
    let state = guest.driver.slot.save();
    // A fresh device over another NIC, whose MAC differs.
    let other_mac = [0x02, 0, 0, 0, 0, 0x99];
    let (_, other_nic) = nic(other_mac);
    let fresh = slot_over(&guest.driver.ram, other_nic, MACHINE);
    let mac_of = |slot: &VirtioSlot| {
        let mut mac = [0u8; 6];
        slot.read(u64::from(VIRTIO_MMIO_CONFIG), &mut mac);
        mac
    };
    let untouched = fresh.save();
    for len in [1, 7, 9, 64] {
        let mut wrong = state.clone();
        wrong.device = vec![0x55; len];
        let err = fresh.restore(&wrong).expect_err("a wrong length accepted");
        assert_eq!(err.index, 0);
        assert!(err.why.contains(&format!("{len} bytes")), "{}", err.why);
        assert_eq!(
            fresh.save(),
            untouched,
            "a refused snapshot changed the device"
        );
        assert_eq!(mac_of(&fresh), other_mac);
    }
    // A snapshot without device state: the device keeps its own.
    let mut older = state.clone();
    older.device.clear();
    fresh.restore(&older).unwrap();
    assert_eq!(mac_of(&fresh), other_mac);
    // With it, the guest sees the MAC and link it saw before.
    fresh.restore(&state).unwrap();
    assert_eq!(mac_of(&fresh), MAC);
    let mut status = [0u8; 2];
    fresh.read(u64::from(VIRTIO_MMIO_CONFIG) + 6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(fresh.save(), state);
}

#[test]
fn the_net_fuzz_example_is_served_in_full() {
    let counters = super::fuzz::net_queues(&super::fuzz::net_example());
    assert_eq!(
        counters,
        NicCounters {
            rx_frames: 1,
            rx_bytes: 64,
            tx_frames: 1,
            tx_bytes: 60,
            ..NicCounters::default()
        }
    );
}

/// A bounded run of what the fuzz target does, on every build: random inputs and random
/// mutations of a well-formed one. None may panic.
#[test]
fn random_and_mutated_net_queues_never_panic() {
    let mut state = 0x005e_ed0f_4e70_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seed = super::fuzz::net_example();
    let mut served = 0;
    for round in 0..1500 {
        let input = if round % 3 == 0 {
            let len = (next() % 0x9000) as usize;
            (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
        } else {
            let mut input = seed.clone();
            for _ in 0..1 + next() % 8 {
                // Most mutations hit the header and the rings, where they matter.
                let at = if next() % 2 == 0 {
                    (next() as usize) % 64
                } else {
                    (next() as usize) % input.len()
                };
                input[at] = next() as u8;
            }
            input
        };
        let counters = super::fuzz::net_queues(&input);
        served += counters.rx_frames + counters.tx_frames;
    }
    assert!(
        served > 100,
        "the mutations never reached the NIC ({served})"
    );
}

#[test]
fn the_net_fuzz_targets_seed_is_the_example() {
    let checked_in =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/virtio_net/tx-and-rx");
    // Compared, not printed: they are 36 KiB.
    assert!(
        std::fs::read(&checked_in).ok() == Some(super::fuzz::net_example()),
        "{} is not fuzz::net_example(); write it again",
        checked_in.display()
    );
}
