//! Dirty-page tracking: KVM reports the pages a guest wrote, and copying just those pages
//! brings a second machine's RAM level with the first.

mod common;

use common::{kernel, numbers_after, require_kvm, Transcript};
use vmm_core::{BootSource, GuestRam, MachineSpec, Vm};

#[test]
fn written_pages_are_reported_and_copying_them_levels_the_copy() {
    levels_the_copy(false);
}

#[test]
fn the_dirty_ring_reports_the_same_as_the_bitmap() {
    levels_the_copy(true);
}

/// The `dirty` kernel (64 MiB/s into 64 MiB) booted on a machine that tracks dirty pages,
/// through KVM's dirty ring or its bitmaps; not yet running.
fn booted_dirty(dirty_ring: bool) -> (Vm, Transcript) {
    let spec = MachineSpec {
        name: "dirty".into(),
        memory_mib: 64,
        vcpus: 1,
        hidden_cpu_features: vec![],
        dirty_tracking: true,
        dirty_ring,
    };
    let console = Transcript::default();
    let vm = Vm::create(&spec, console.sink()).unwrap();
    vm.boot(&BootSource {
        kernel: kernel("dirty"),
        initrd: None,
        cmdline: "dirty_mib_per_s=64 interval_ms=50".into(),
    })
    .unwrap();
    (vm, console)
}

fn levels_the_copy(dirty_ring: bool) {
    require_kvm();
    let (vm, console) = booted_dirty(dirty_ring);
    // The copy starts as a full image of the booted machine (the loader's writes are not
    // in KVM's log), then follows the log.
    let copy = GuestRam::new(64 << 20).unwrap();
    copy.copy_from(vm.ram());
    vm.take_dirty_pages().unwrap();
    vm.resume().unwrap();
    console.wait_until("four reports", |t| {
        numbers_after(t, "dirty: seq ").len() >= 4
    });
    vm.pause().unwrap();
    let dirty = vm.take_dirty_pages().unwrap();
    assert!(
        dirty.count() >= 64,
        "64 MiB/s for 150+ ms should dirty hundreds of pages, KVM reported {}",
        dirty.count()
    );
    assert_eq!(
        copy.copy_pages_from(vm.ram(), &dirty.bitmaps),
        dirty.count()
    );
    let (mut a, mut b) = (vec![0u8; 64 << 20], vec![0u8; 64 << 20]);
    vm.ram().read(0, &mut a).unwrap();
    copy.read(0, &mut b).unwrap();
    assert!(a == b, "RAM differs after copying the dirty pages");
    // Paused, nothing more is written.
    assert_eq!(vm.take_dirty_pages().unwrap().count(), 0);
}

#[test]
fn a_peek_at_the_log_leaves_it_for_the_next_take() {
    require_kvm();
    let (vm, console) = booted_dirty(false);
    // The loader's writes are the VMM's, which a peek at KVM's log does not show: start clean.
    vm.take_dirty_pages().unwrap();
    vm.resume().unwrap();
    console.wait_until("two reports", |t| {
        numbers_after(t, "dirty: seq ").len() >= 2
    });
    vm.pause().unwrap();
    let log = vm.dirty_log();
    let Some(peeked) = log.peek().unwrap() else {
        eprintln!("skipped: this host clears the dirty log as it is read");
        return;
    };
    assert!(peeked.count() > 0);
    assert_eq!(
        log.peek().unwrap(),
        Some(peeked.clone()),
        "a peek resets nothing"
    );
    assert_eq!(
        log.take().unwrap(),
        peeked,
        "the take reports what was peeked"
    );
    assert_eq!(log.take().unwrap().count(), 0, "and resets it");
}

#[test]
fn what_the_vmm_writes_into_guest_ram_is_dirty_too() {
    require_kvm();
    let spec = MachineSpec {
        name: "vmm-writes".into(),
        memory_mib: 16,
        vcpus: 1,
        hidden_cpu_features: vec![],
        dirty_tracking: true,
        dirty_ring: false,
    };
    let vm = Vm::create(&spec, Box::new(std::io::sink())).unwrap();
    vm.take_dirty_pages().unwrap();
    // As a device would: through the machine's own mapping of guest RAM.
    vm.ram().write(0x30_0000 + 5, b"from the VMM").unwrap();
    let dirty = vm.take_dirty_pages().unwrap();
    assert_eq!(dirty.count(), 1);
    // Page 0x300 (the 3 MiB mark) is bit 0 of word 12.
    assert_eq!(dirty.bitmaps[0][0x300 / 64], 1);
    assert_eq!(
        vm.take_dirty_pages().unwrap().count(),
        0,
        "and the take reset it"
    );
}
