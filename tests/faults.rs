//! Fault injection through vmm-core: what each injected fault does to a running guest, and
//! that a guest whose vCPU threads died can still be saved and continued on another machine
//! sharing its RAM.

mod common;

use common::{assert_consecutive, numbers_after, spec, start, Transcript, PATIENCE};
use vmm_core::{VcpuStop, Vm};

fn running_counter(vcpus: u8) -> (Vm, Transcript) {
    let (vm, console) = start("counter", "interval_ms=10", vcpus);
    console.wait_until("three counter lines", |t| {
        numbers_after(t, "count ").len() >= 3
    });
    (vm, console)
}

#[test]
fn dead_vcpu_threads_are_reported_and_their_state_survives() {
    let (vm, console) = running_counter(1);
    vm.faults().kill_vcpu_threads();
    let event = vm
        .next_event(PATIENCE)
        .expect("a report of the dead thread");
    assert_eq!(event.stop, VcpuStop::ThreadDied);
    assert!(
        vm.resume().is_err(),
        "a vCPU whose thread died cannot be resumed"
    );
    vm.pause().expect("dead vCPUs count as stopped");
    let snapshot = vm.save().expect("state of dead vCPUs is still readable");

    let standby_console = Transcript::default();
    let standby = Vm::create_with_ram(
        &spec("counter", 1),
        vm.ram().clone(),
        standby_console.sink(),
    )
    .unwrap();
    standby.restore(&snapshot).unwrap();
    standby.resume().unwrap();
    let after = standby_console.wait_until("the counter on the second machine", |t| {
        !numbers_after(t, "count ").is_empty()
    });
    // Read as one console, the two machines count on with no gap and no repeat.
    let whole = format!("{}{after}", console.text());
    let counts = numbers_after(&whole, "count ");
    assert_eq!(counts.first(), Some(&0));
    assert_consecutive(&counts, "console across the move");
    assert!(
        numbers_after(&after, "count ")[0] > 0,
        "the guest started over:\n{after}"
    );
    standby.pause().unwrap();
}

#[test]
fn a_machine_check_shuts_down_a_guest_without_a_handler() {
    let (vm, _) = running_counter(1);
    vm.faults().machine_check().expect("inject");
    assert_eq!(
        vm.next_event(PATIENCE).map(|e| e.stop),
        Some(VcpuStop::Shutdown)
    );
}

#[test]
fn dropped_heartbeats_stop_counting_while_the_guest_runs() {
    let (vm, console) = running_counter(1);
    vm.faults().drop_heartbeats(true);
    let beats = vm.heartbeats().count;
    let lines = numbers_after(&console.text(), "count ").len();
    console.wait_until("five more lines", |t| {
        numbers_after(t, "count ").len() >= lines + 5
    });
    assert_eq!(vm.heartbeats().count, beats);
    vm.faults().drop_heartbeats(false);
    console.wait_until("one more line", |t| {
        numbers_after(t, "count ").len() >= lines + 7
    });
    assert!(vm.heartbeats().count > beats);
    vm.pause().unwrap();
}
