//! Booting each test kernel through vmm-core's public API and checking what it printed and
//! how its vCPU stopped.

mod common;

use std::time::Duration;

use common::{numbers_after, start, PATIENCE};
use vmm_core::{VcpuStop, Vm};

fn next_stop(vm: &Vm) -> VcpuStop {
    vm.next_event(PATIENCE)
        .expect("no vCPU event before the timeout")
        .stop
}

#[test]
fn hello_prints_its_line_and_exits_through_the_debug_port() {
    let (vm, transcript) = start("hello", "", 1);
    assert_eq!(next_stop(&vm), VcpuStop::GuestExit { code: 1 });
    assert_eq!(transcript.text(), "hello from understudy\n");
}

#[test]
fn counter_counts_up_and_heartbeats_each_line() {
    let (vm, transcript) = start("counter", "interval_ms=10 stop_after=20", 1);
    assert_eq!(next_stop(&vm), VcpuStop::GuestExit { code: 1 });
    let counts = numbers_after(&transcript.text(), "count ");
    assert_eq!(counts, (0..=20).collect::<Vec<_>>());
    let beats = vm.heartbeats();
    assert_eq!((beats.count, beats.last_sequence), (21, 20));
}

#[test]
fn counter_runs_on_every_vcpu() {
    let (vm, transcript) = start("counter", "interval_ms=10 stop_after=20", 3);
    assert_eq!(next_stop(&vm), VcpuStop::GuestExit { code: 1 });
    let text = transcript.text();
    assert!(text.contains("smp: 3 cpus online"), "{text}");
    assert_eq!(numbers_after(&text, "count "), (0..=20).collect::<Vec<_>>());
    for cpu in ["cpu1 count ", "cpu2 count "] {
        let counts = numbers_after(&text, cpu);
        assert!(!counts.is_empty(), "no {cpu:?} lines:\n{text}");
        assert_eq!(
            counts,
            (0..counts.len() as u64).collect::<Vec<_>>(),
            "{text}"
        );
    }
}

/// The UART's transmitter interrupt, raised through its irqfd, arrives at the vector the
/// guest routed IOAPIC pin 4 to, with IIR saying why (THR empty, FIFOs on), in a guest that
/// masks LINT0 as Linux does (unmasked, the never-programmed 8259 delivers IRQ 4 first, as
/// vector 4: the kernel has a gate there to say so).
#[test]
fn com1_transmitter_interrupt_arrives_through_ioapic_pin_4() {
    let (vm, transcript) = start("com1_irq", "", 1);
    let stop = next_stop(&vm);
    assert_eq!(
        transcript.text(),
        "com1_irq: vector 0x34 iir 0xc2\n",
        "the guest stopped with {stop:?}"
    );
    assert_eq!(stop, VcpuStop::GuestExit { code: 0x25 });
}

#[test]
fn crash_ends_in_a_triple_fault() {
    let (vm, transcript) = start("crash", "crash_after_ms=100", 1);
    assert_eq!(next_stop(&vm), VcpuStop::Shutdown);
    assert!(transcript.text().contains("crash: triple fault now"));
}

#[test]
fn hang_stops_heartbeating_but_keeps_its_vcpu() {
    let (vm, transcript) = start("hang", "interval_ms=20 hang_after_ms=100", 1);
    transcript.wait_until("the hang announcement", |t| {
        t.contains("hang: spinning with interrupts off")
    });
    let beats = vm.heartbeats().count;
    assert!(beats > 0, "hang sent no heartbeat before hanging");
    // The vCPU is still running (no stop event) yet no heartbeat arrives any more.
    assert!(vm.next_event(Duration::from_millis(300)).is_none());
    assert_eq!(vm.heartbeats().count, beats);
    vm.pause().expect("a spinning vCPU can still be paused");
}

#[test]
fn dirty_reports_the_pages_it_wrote() {
    let (vm, transcript) = start("dirty", "dirty_mib_per_s=32 interval_ms=50", 1);
    let text = transcript.wait_until("three dirty reports", |t| {
        numbers_after(t, "dirty: seq ").len() >= 3
    });
    let pages: Vec<u64> = text
        .lines()
        .filter_map(|l| l.rsplit_once("pages ").and_then(|(_, p)| p.parse().ok()))
        .collect();
    assert!(pages.windows(2).all(|w| w[1] >= w[0]), "{text}");
    assert!(
        pages.last().copied().unwrap_or(0) > 0,
        "no page written: {text}"
    );
    vm.pause().unwrap();
}

#[test]
fn known_devices_are_not_counted_as_unknown_accesses() {
    // hello uses only COM1 and the debug-exit port, so nothing it does may be counted as an
    // unknown access. (Answering and counting unknown ports and MMIO is proved by vmm-core's
    // device unit tests.)
    let (vm, _) = start("hello", "", 1);
    assert_eq!(next_stop(&vm), VcpuStop::GuestExit { code: 1 });
    assert_eq!(vm.unknown_accesses(), vmm_core::UnknownAccesses::default());
}
