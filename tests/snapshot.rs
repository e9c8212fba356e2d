//! Capture and restore: a running guest is paused, its whole state saved as plain values (or
//! written to a snapshot directory and read back), loaded into a second machine, and the
//! guest carries on there as if nothing happened.

mod common;

use common::{assert_consecutive, numbers_after, require_kvm, start, Transcript};
use vmm_core::{MachineSpec, Snapshot, Vm, VmSnapshot};

fn spec(vcpus: u8) -> MachineSpec {
    common::spec("counter", vcpus)
}

/// Boots `counter`, moves it to a fresh machine after a few lines, and returns both
/// transcripts.
fn move_counter(vcpus: u8, via_json: bool) -> (String, String) {
    let (first, first_console) = start("counter", "interval_ms=10", vcpus);
    first_console.wait_until("five counter lines", |t| {
        numbers_after(t, "count ").len() >= 5
    });

    first.pause().unwrap();
    let mut snapshot = first.save().unwrap();
    if via_json {
        let json = serde_json::to_string(&snapshot).unwrap();
        snapshot = serde_json::from_str::<VmSnapshot>(&json).unwrap();
    }
    let before = first_console.text();

    let second_console = Transcript::default();
    let second = Vm::create(&spec(vcpus), second_console.sink()).unwrap();
    second.ram().copy_from(first.ram());
    drop(first);
    second.restore(&snapshot).unwrap();
    second.resume().unwrap();
    let after = second_console.wait_until("five more counter lines", |t| {
        numbers_after(t, "count ").len() >= 5
    });
    second.pause().unwrap();
    (before, after)
}

/// The console of both machines, read as one, counts `prefix N` from 0 with no gap and no
/// repeat, and the second machine printed some of it. (A line may be split across the
/// move: the guest can be paused in the middle of printing it.)
fn assert_continued_on(before: &str, after: &str, prefix: &str) {
    let whole = format!("{before}{after}");
    let counts = numbers_after(&whole, prefix);
    assert_eq!(counts.first(), Some(&0), "{prefix:?}:\n{whole}");
    assert_consecutive(&counts, prefix);
    let on_second = numbers_after(after, prefix);
    assert!(
        !on_second.is_empty(),
        "no {prefix:?} line after the move:\n{after}"
    );
    assert!(
        on_second[0] > 0,
        "the restored guest started over:\nbefore:\n{before}\nafter:\n{after}"
    );
}

fn assert_continued(before: &str, after: &str) {
    assert_continued_on(before, after, "count ");
    assert!(
        !after.contains("counter: interval_ms"),
        "the guest rebooted:\n{after}"
    );
}

#[test]
fn restored_counter_continues_without_restarting() {
    let (before, after) = move_counter(1, false);
    assert_continued(&before, &after);
}

#[test]
fn restored_two_vcpu_counter_continues_on_both_vcpus() {
    let (before, after) = move_counter(2, false);
    assert_continued(&before, &after);
    assert_continued_on(&before, &after, "cpu1 count ");
    assert!(!after.contains("smp:"), "the guest rebooted:\n{after}");
}

#[test]
fn snapshot_survives_serialization() {
    let (before, after) = move_counter(1, true);
    assert_continued(&before, &after);
}

#[test]
fn a_snapshot_written_to_disk_loads_into_a_fresh_machine_that_carries_on() {
    let (first, first_console) = start("counter", "interval_ms=10", 1);
    first_console.wait_until("five counter lines", |t| {
        numbers_after(t, "count ").len() >= 5
    });
    let dir = std::env::temp_dir().join(format!("understudy-snapshot-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    first.pause().unwrap();
    let written = Snapshot::write(&first, &dir).unwrap();
    assert!(written.memory_bytes > 0 && written.memory_bytes < 64 << 20);
    let before = first_console.text();
    drop(first);

    let snapshot = Snapshot::load(&dir).unwrap();
    assert_eq!(snapshot.machine().spec.memory_mib, 64);
    assert_eq!(snapshot.state().vcpus.len(), 1);
    let second_console = Transcript::default();
    let second = Vm::create(&spec(1), second_console.sink()).unwrap();
    let loaded = snapshot.restore_into(&second).unwrap();
    assert_eq!(loaded, written.memory_bytes, "every page written is loaded");
    assert_eq!(
        second.ram().resident_bytes(),
        loaded,
        "the memory file's holes stay holes"
    );
    second.resume().unwrap();
    let after = second_console.wait_until("five more counter lines", |t| {
        numbers_after(t, "count ").len() >= 5
    });
    second.pause().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_continued(&before, &after);

    // A machine of another shape is refused before anything is loaded into it.
    let two_vcpus = Vm::create(&spec(2), Box::new(std::io::sink())).unwrap();
    let err = snapshot.restore_into(&two_vcpus).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("does not fit: the snapshot's machine has 1 vCPUs, this one 2"),
        "{err}"
    );
    assert_eq!(two_vcpus.ram().resident_bytes(), 0);
}

#[test]
fn restoring_into_a_machine_of_another_shape_is_refused() {
    require_kvm();
    let small = Vm::create(&spec(1), Box::new(std::io::sink())).unwrap();
    let snapshot = small.save().unwrap();
    let two_vcpus = Vm::create(&spec(2), Box::new(std::io::sink())).unwrap();
    let err = two_vcpus.restore(&snapshot).unwrap_err();
    assert!(err.to_string().contains("vCPUs"), "{err}");
}

#[test]
fn a_snapshot_is_a_plain_value_that_round_trips() {
    require_kvm();
    let vm = Vm::create(&spec(1), Box::new(std::io::sink())).unwrap();
    let saved = vm.save().unwrap();
    let json = serde_json::to_value(&saved).unwrap();
    let reloaded: VmSnapshot = serde_json::from_value(json.clone()).unwrap();
    assert!(
        serde_json::to_value(&reloaded).unwrap() == json,
        "a snapshot changed on its way through JSON"
    );
    assert_eq!(reloaded.vcpus.len(), 1);
    assert_eq!(reloaded.memory_size, 64 << 20);
}

#[test]
fn a_paused_guest_stays_paused_through_saves() {
    let (vm, console) = start("counter", "interval_ms=5", 1);
    console.wait_until("three counter lines", |t| {
        numbers_after(t, "count ").len() >= 3
    });
    // Saves queued right behind the pause must not set the vCPU running again.
    vm.pause().unwrap();
    let first = vm.save().unwrap();
    let frozen = console.text();
    let second = vm.save().unwrap();
    // Running, the guest would print about 40 lines in this time.
    assert!(vm
        .next_event(std::time::Duration::from_millis(200))
        .is_none());
    assert_eq!(console.text(), frozen, "the guest ran while paused");
    assert_eq!(first.vcpus[0].regs.rip, second.vcpus[0].regs.rip);
}
