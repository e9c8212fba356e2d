//! The transport and virtio-blk driven as a guest driver would, over real guest RAM.

use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::Block;
use super::driver::{read_reg, write_reg, Driver, QUEUE};
use super::VirtioSlot;
use crate::devices::disk::tests::mem_disk;
use crate::devices::disk::Disk;
use crate::devices::disk::MemoryDisk;
use crate::memory::GuestRam;

const HEADER: u64 = 0x4000;
const STATUS: u64 = 0x4100;
const DATA: u64 = 0x10000;
const MACHINE: u64 = 7;

fn slot_over(ram: &GuestRam, disk: Arc<Disk>) -> VirtioSlot {
    VirtioSlot::new(
        0,
        Box::new(Block::new(disk, MACHINE)),
        ram.memory().clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        "test",
    )
    .unwrap()
}

/// The `blk` test kernel's side of a disk: one queue, `FLUSH` accepted, requests one at a
/// time.
impl Driver {
    fn new(disk: Arc<Disk>) -> Driver {
        let ram = GuestRam::new(2 << 20).unwrap();
        let slot = slot_over(&ram, disk);
        Driver::start(ram, slot, 1 << VIRTIO_BLK_F_FLUSH)
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.ram.write(HEADER, &header).unwrap();
        self.ram.write(STATUS, &[0xee]).unwrap();
    }

    fn status(&self) -> u32 {
        let mut status = [0u8];
        self.ram.read(STATUS, &mut status).unwrap();
        u32::from(status[0])
    }

    /// A request of `kind` at `sector` with `len` bytes of data at DATA.
    fn request(&mut self, kind: u32, sector: u64, len: u32) -> (u32, u32) {
        self.header(kind, sector);
        let writable = kind != VIRTIO_BLK_T_OUT;
        let used = if len > 0 {
            self.submit(
                0,
                &[
                    (HEADER, 16, false),
                    (DATA, len, writable),
                    (STATUS, 1, true),
                ],
            )
        } else {
            self.submit(0, &[(HEADER, 16, false), (STATUS, 1, true)])
        };
        (self.status(), used)
    }
}

fn granted(sectors: u64) -> (Arc<MemoryDisk>, Arc<Disk>) {
    let (backend, disk) = mem_disk(sectors);
    disk.grant(MACHINE).unwrap();
    (backend, disk)
}

#[test]
fn the_device_identifies_itself_and_offers_the_modern_interface_only() {
    let (_, disk) = granted(8);
    let ram = GuestRam::new(2 << 20).unwrap();
    let slot = slot_over(&ram, disk);
    assert_eq!(read_reg(&slot, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read_reg(&slot, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(read_reg(&slot, VIRTIO_MMIO_DEVICE_ID), 2);
    write_reg(&slot, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(read_reg(&slot, VIRTIO_MMIO_DEVICE_FEATURES) & 1, 1);
    write_reg(&slot, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = read_reg(&slot, VIRTIO_MMIO_DEVICE_FEATURES);
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(low & (1 << bit), 0, "feature {bit} not offered");
    }
    assert_eq!(low & (1 << VIRTIO_BLK_F_RO), 0);
    // Capacity in sectors, then blk_size, from configuration space.
    let mut capacity = [0u8; 8];
    slot.read(u64::from(VIRTIO_MMIO_CONFIG), &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 8);
    assert_eq!(read_reg(&slot, VIRTIO_MMIO_CONFIG + 20), 512);
    // A legacy driver (no VERSION_1) does not get FEATURES_OK.
    write_reg(
        &slot,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    write_reg(&slot, VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
    write_reg(
        &slot,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(
        read_reg(&slot, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
        0
    );
}

#[test]
fn written_sectors_read_back_and_reach_the_disk() {
    let (backend, disk) = granted(16);
    let mut driver = Driver::new(disk.clone());
    let pattern: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    driver.ram.write(DATA, &pattern).unwrap();
    assert_eq!(
        driver.request(VIRTIO_BLK_T_OUT, 3, 1024),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(&backend.contents()[3 * 512..5 * 512], &pattern[..]);
    driver.ram.write(DATA, &[0u8; 1024]).unwrap();
    assert_eq!(
        driver.request(VIRTIO_BLK_T_IN, 3, 1024),
        (VIRTIO_BLK_S_OK, 1025)
    );
    let mut back = vec![0u8; 1024];
    driver.ram.read(DATA, &mut back).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(
        driver.request(VIRTIO_BLK_T_FLUSH, 0, 0),
        (VIRTIO_BLK_S_OK, 1)
    );
    let counters = disk.counters();
    assert_eq!(
        (counters.reads, counters.writes, counters.flushes),
        (1, 1, 1)
    );
    assert_eq!(counters.errors, 0);
}

#[test]
fn what_the_device_writes_into_guest_ram_is_marked_dirty() {
    let (_, disk) = granted(16);
    let mut driver = Driver::new(disk);
    driver.ram.take_vmm_dirty_pages();
    driver.request(VIRTIO_BLK_T_IN, 0, 4096);
    let dirty = driver.ram.take_vmm_dirty_pages();
    let page_dirty = |addr: u64| {
        let page = (addr / 4096) as usize;
        dirty[0][page / 64] & (1 << (page % 64)) != 0
    };
    assert!(page_dirty(DATA), "data page not marked");
    assert!(page_dirty(STATUS), "status page not marked");
    assert!(page_dirty(driver.used_ring(0)), "used ring not marked");
}

#[test]
fn bad_requests_get_an_error_status_and_change_nothing() {
    let (backend, disk) = granted(8);
    let mut driver = Driver::new(disk.clone());
    driver.ram.write(DATA, &[0xab; 1024]).unwrap();
    // Past the end, straddling the end, a partial sector, an unknown type.
    assert_eq!(
        driver.request(VIRTIO_BLK_T_IN, 8, 512).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        driver.request(VIRTIO_BLK_T_OUT, 7, 1024).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        driver.request(VIRTIO_BLK_T_OUT, u64::MAX, 512).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        driver.request(VIRTIO_BLK_T_OUT, 0, 100).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(driver.request(99, 0, 512).0, VIRTIO_BLK_S_UNSUPP);
    // A header too short to be one.
    driver.header(VIRTIO_BLK_T_OUT, 0);
    driver.submit(0, &[(HEADER, 8, false), (STATUS, 1, true)]);
    assert_eq!(driver.status(), VIRTIO_BLK_S_IOERR);
    // No status byte at all: dropped with nothing written.
    driver.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        driver.submit(0, &[(HEADER, 16, false), (DATA, 512, false)]),
        0
    );
    // A buffer outside guest RAM.
    driver.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        driver.submit(
            0,
            &[(HEADER, 16, false), (1 << 40, 512, true), (STATUS, 1, true)]
        ),
        0
    );
    assert!(backend.contents().iter().all(|b| *b == 0));
    assert_eq!(disk.counters().errors, 8);
    // The device still serves good requests.
    assert_eq!(driver.request(VIRTIO_BLK_T_OUT, 0, 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn a_read_only_disk_refuses_writes_and_says_so() {
    let backend = Arc::new(MemoryDisk::new(8));
    let disk = Arc::new(Disk::new(backend.clone(), true, "ro"));
    disk.grant(MACHINE).unwrap();
    let mut driver = Driver::new(disk);
    write_reg(&driver.slot, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_ne!(
        read_reg(&driver.slot, VIRTIO_MMIO_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO),
        0
    );
    driver.ram.write(DATA, &[1; 512]).unwrap();
    assert_eq!(
        driver.request(VIRTIO_BLK_T_OUT, 0, 512).0,
        VIRTIO_BLK_S_IOERR
    );
    assert!(backend.contents().iter().all(|b| *b == 0));
    assert_eq!(driver.request(VIRTIO_BLK_T_IN, 0, 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn get_id_answers_the_disks_identifier() {
    let (_, disk) = granted(1);
    let mut driver = Driver::new(disk);
    assert_eq!(
        driver.request(VIRTIO_BLK_T_GET_ID, 0, 20),
        (VIRTIO_BLK_S_OK, 21)
    );
    let mut id = [0u8; 20];
    driver.ram.read(DATA, &mut id).unwrap();
    assert_eq!(&id[..9], b"test-disk");
}

#[test]
fn a_machine_that_lost_its_disk_gets_errors_and_writes_nothing() {
    let (backend, disk) = granted(4);
    let mut driver = Driver::new(disk.clone());
    disk.revoke(MACHINE, Duration::from_secs(1)).unwrap();
    disk.grant(MACHINE + 1).unwrap();
    driver.ram.write(DATA, &[5; 512]).unwrap();
    assert_eq!(
        driver.request(VIRTIO_BLK_T_OUT, 0, 512).0,
        VIRTIO_BLK_S_IOERR
    );
    assert!(backend.contents().iter().all(|b| *b == 0));
    assert_eq!(disk.ownership().refused, 1);
}

#[test]
fn a_paused_device_serves_nothing_and_a_restored_one_serves_what_was_left() {
    let (backend, disk) = granted(4);
    let mut driver = Driver::new(disk.clone());
    assert!(driver.slot.pause_within(Duration::from_secs(1)));
    driver.ram.write(DATA, &[9; 512]).unwrap();
    driver.header(VIRTIO_BLK_T_OUT, 2);
    driver.make_available(
        0,
        &[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    write_reg(&driver.slot, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(driver.used_idx(0), 0, "a paused device served a request");
    // Saved with the request still available, and loaded into another device over the same
    // memory: that one serves it without any further notification.
    let state = driver.slot.save();
    assert_eq!(state.queues[0].next_avail, 0);
    assert_eq!(state.queues[0].size, QUEUE);
    let other = slot_over(&driver.ram, disk);
    other.restore(&state).unwrap();
    other.resume();
    driver.slot = other;
    assert_eq!(driver.wait_used(0, 1), 1);
    assert_eq!(driver.status(), VIRTIO_BLK_S_OK);
    assert_eq!(&backend.contents()[1024..1536], &[9; 512][..]);
    assert_eq!(driver.slot.save().queues[0].next_avail, 1);
}

#[test]
fn a_snapshot_of_another_device_is_refused() {
    let (_, disk) = granted(4);
    let driver = Driver::new(disk);
    let mut state = driver.slot.save();
    state.device_type = 1;
    assert!(driver.slot.restore(&state).is_err());
    let mut state = driver.slot.save();
    state.queues[0].size = 3;
    assert!(driver.slot.restore(&state).is_err());
    state.queues.clear();
    assert!(driver.slot.restore(&state).is_err());
}

#[test]
fn the_fuzz_seed_is_served_in_full() {
    let counters = super::fuzz::block_queue(&super::fuzz::example());
    assert_eq!(
        (counters.writes, counters.reads, counters.errors),
        (1, 1, 0)
    );
}

/// A bounded run of what the fuzz target does, on every build: random inputs and random
/// mutations of a well-formed one. None may panic.
#[test]
fn random_and_mutated_queues_never_panic() {
    let mut state = 0x005e_ed0f_b10c_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seed = super::fuzz::example();
    let mut served = 0;
    for round in 0..1500 {
        let input = if round % 3 == 0 {
            let len = (next() % 0x6000) as usize;
            (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
        } else {
            let mut input = seed.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() as usize) % input.len();
                input[at] = next() as u8;
            }
            input
        };
        let counters = super::fuzz::block_queue(&input);
        served += counters.reads + counters.writes;
    }
    assert!(
        served > 100,
        "the mutations never reached the disk ({served})"
    );
}

#[test]
fn the_fuzz_targets_seed_is_the_example() {
    let checked_in = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds/virtio_blk/two-requests");
    assert_eq!(
        std::fs::read(&checked_in).ok(),
        Some(super::fuzz::example()),
        "{} is not fuzz::example(); write it again",
        checked_in.display()
    );
}

/// A driver that writes nonsense: ring addresses that break alignment and sizes that are no
/// power of two are not taken (the queue keeps what it had), a head outside the queue is
/// passed over, and an available index far ahead serves nothing; requests that make sense
/// are still served, in order. None of it may reach the log above debug level (virtio-queue's
/// own setters and iterator log each at error level, as often as a guest likes).
#[test]
fn nonsense_in_the_queue_registers_and_rings_is_passed_over() {
    let (backend, disk) = granted(8);
    let ram = GuestRam::new(2 << 20).unwrap();
    let slot = slot_over(&ram, disk);
    let (desc, avail, used) = super::driver::rings(0);
    let status = |bits| write_reg(&slot, VIRTIO_MMIO_STATUS, bits);
    let (ack, drv) = (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER);
    status(0);
    status(ack | drv);
    write_reg(&slot, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write_reg(&slot, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    status(ack | drv | VIRTIO_CONFIG_S_FEATURES_OK);
    write_reg(&slot, VIRTIO_MMIO_QUEUE_SEL, 0);
    write_reg(&slot, VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE));
    write_reg(&slot, VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
    write_reg(&slot, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
    write_reg(&slot, VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
    // Not taken: misaligned rings, a size that is no power of two or does not fit in 16 bits.
    write_reg(&slot, VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32 + 8);
    write_reg(&slot, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32 + 1);
    write_reg(&slot, VIRTIO_MMIO_QUEUE_USED_LOW, used as u32 + 2);
    write_reg(&slot, VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE) + 1);
    write_reg(
        &slot,
        VIRTIO_MMIO_QUEUE_NUM,
        0x1_0000 | u32::from(QUEUE / 2),
    );
    write_reg(&slot, VIRTIO_MMIO_QUEUE_READY, 1);
    status(ack | drv | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
    slot.resume();

    // One write request: header, data, status, as descriptors 0 .. 2.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    ram.write(HEADER, &header).unwrap();
    ram.write(DATA, &[0x5a; 512]).unwrap();
    let chain = [(HEADER, 16u32, 0u16), (DATA, 512, 0), (STATUS, 1, 2)];
    for (i, (addr, len, flags)) in chain.iter().enumerate() {
        let next = if i < 2 { 1 } else { 0 };
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&(flags | next).to_le_bytes());
        d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
        ram.write(desc + 16 * i as u64, &d).unwrap();
    }
    let used_idx = || {
        let mut idx = [0u8; 2];
        ram.read(used + 2, &mut idx).unwrap();
        u16::from_le_bytes(idx)
    };
    let publish = |entry: u16, head: u16, idx: u16| {
        ram.write(avail + 4 + 2 * u64::from(entry), &head.to_le_bytes())
            .unwrap();
        ram.write(avail + 2, &idx.to_le_bytes()).unwrap();
        write_reg(&slot, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    };
    // A head outside the queue, then the request: only the request comes back.
    ram.write(avail + 4, &0xffffu16.to_le_bytes()).unwrap();
    publish(1, 0, 2);
    super::driver::wait_until("the request after the bad head is used", || used_idx() == 1);
    let mut entry = [0u8; 4];
    ram.read(used + 4, &mut entry).unwrap();
    assert_eq!(
        u32::from_le_bytes(entry),
        0,
        "the used entry names the request"
    );
    let mut written = [0u8];
    ram.read(STATUS, &mut written).unwrap();
    assert_eq!(u32::from(written[0]), VIRTIO_BLK_S_OK);
    assert!(backend.contents()[..512].iter().all(|b| *b == 0x5a));
    // An index 0x8000 ahead serves nothing; put right, the next request is served.
    ram.write(avail + 2, &0x8002u16.to_le_bytes()).unwrap();
    write_reg(&slot, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    ram.write(STATUS, &[0xee]).unwrap();
    publish(2, 0, 3);
    super::driver::wait_until("the request after the bad index is used", || {
        used_idx() == 2
    });
    ram.read(STATUS, &mut written).unwrap();
    assert_eq!(u32::from(written[0]), VIRTIO_BLK_S_OK);
}
