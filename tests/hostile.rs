//! Hostile-guest containment: the `hostile` test kernel does what a broken or malicious kernel
//! might (every I/O port, garbage all over MMIO and into a virtio disk, unknown MSRs, CPUID,
//! PIT/PIC/APIC garbage, floods, and kernel-mode `ldmxcsr`/`stmxcsr` that understudy completes
//! itself), and understudy must stay up, keep another guest undisturbed, log no error of its
//! own making, and judge the hostile guest by what it does: it ends itself, so it neither
//! goes down nor fails over.

mod common;

use std::path::{Path, PathBuf};

use common::running::Running;
use common::{assert_consecutive, env_file, numbers_after, require_kvm, stderr, understudy};
use serde_json::json;

/// The hostile kernel's last line: done, with every kernel-mode completion as the CPU's.
const DONE: &str = "hostile: done mismatches 0";
/// Its progress lines, in order.
const PROGRESS: [&str; 9] = [
    "hostile: kernel mode done",
    "hostile: mxcsr done",
    "hostile: ports done",
    "hostile: floods done",
    "hostile: pit and pic done",
    "hostile: apic done",
    "hostile: virtio done devices 1",
    "hostile: mmio done",
    DONE,
];
/// The pairs' hostile guest: a third of the ports.
const PAIR_CMDLINE: &str = "port_stride=3";
const CHECKPOINTED: &str = "[guest.standby]\nresume = \"checkpoint\"\n";
/// The counter beside it: 10 ms a line.
const COUNTS: u64 = 1500;

/// The `[[guest]]` table of the hostile guest, with a disk for it to drive with nonsense;
/// `cmdline` its parameters (the pairs sweep a third of the ports, to keep the run short).
fn hostile_guest(cmdline: &str, standby: &str) -> String {
    format!(
        "[[guest]]\nname = \"hostile\"\nkernel = \"KERNELS/hostile\"\nmemory_mib = 64\n\
         cmdline = \"{cmdline}\"\nserial = \"file:hostile.log\"\ncrash_dump = false\n{standby}\
         [[guest.disk]]\npath = \"hostile.img\"\n"
    )
}

/// The environment file of `text`, with the hostile guest's 1 MiB disk beside it.
fn env_with_disk(test: &str, text: &str) -> PathBuf {
    let env = env_file(test, text);
    std::fs::File::create(env.with_file_name("hostile.img"))
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    env
}

fn console(env: &Path, name: &str) -> String {
    let bytes = std::fs::read(env.with_file_name(format!("{name}.log")))
        .unwrap_or_else(|e| panic!("{name}'s console: {e}"));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Lines of the log with lifecycle event `event` for guest `guest`.
fn events<'a>(log: &'a str, event: &str, guest: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(&format!("event=\"{event}\"")))
        .filter(|l| {
            l.contains(&format!(" guest={guest} ")) || l.ends_with(&format!(" guest={guest}"))
        })
        .collect()
}

/// The hostile guest got to its end, every step in order, and ended itself there.
fn assert_hostile_finished(text: &str, log: &str) {
    let mut from = 0;
    for step in PROGRESS {
        match text[from..].find(step) {
            Some(at) => from += at + step.len(),
            None => {
                panic!("the hostile guest did not get to `{step}`; console:\n{text}\nlog:\n{log}")
            }
        }
    }
    assert!(
        !text.contains("MISMATCH") && !text.contains("unexpected exception"),
        "{text}"
    );
    let exited = events(log, "guest-exited", "hostile");
    assert!(
        exited.len() == 1 && exited[0].contains("code=1"),
        "the hostile guest ends itself with status 1: {exited:?}\n{log}"
    );
    assert!(events(log, "guest-down", "hostile").is_empty(), "{log}");
}

/// Nothing in the VMM failed or complained because of what the guest did: no thread
/// panicked, and nothing at warning level or above but the lifecycle and what the host is
/// (a guest's nonsense is logged at debug level only).
fn assert_no_vmm_trouble(log: &str) {
    assert!(!log.contains("panicked"), "a thread panicked:\n{log}");
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("understudy::lifecycle") && !l.contains("vmm_core::host_limits"))
        .collect();
    assert!(loud.is_empty(), "warnings or errors:\n{}", loud.join("\n"));
}

#[test]
fn a_hostile_guest_leaves_the_vmm_and_its_neighbour_alone() {
    require_kvm();
    let env = env_with_disk(
        "beside",
        &format!(
            "{}[[guest]]\nname = \"counter\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
             cmdline = \"interval_ms=10 stop_after={COUNTS}\"\nserial = \"file:counter.log\"\n\
             crash_dump = false\n",
            hostile_guest("", "")
        ),
    );
    let out = understudy(&["run", env.to_str().unwrap()]);
    let log = stderr(&out);
    assert_hostile_finished(&console(&env, "hostile"), &log);

    let counter = console(&env, "counter");
    let counts = numbers_after(&counter, "count ");
    assert_eq!(counts.first(), Some(&0), "{counter}");
    assert_eq!(counts.last(), Some(&COUNTS), "{counter}");
    assert_consecutive(&counts, "the counter beside the hostile guest");
    assert_eq!(
        counter.lines().count() as u64,
        COUNTS + 2,
        "nothing but its banner and its counts:\n{counter}"
    );
    let exited = events(&log, "guest-exited", "counter");
    assert!(
        exited.len() == 1 && exited[0].contains("code=1"),
        "{exited:?}\n{log}"
    );

    assert_no_vmm_trouble(&log);
    // Several guests, all ended cleanly.
    assert_eq!(out.status.code(), Some(0), "{log}");
}

#[test]
fn a_hostile_checkpointed_pair_does_not_fail_over() {
    require_kvm();
    let env = env_with_disk("pair", &hostile_guest(PAIR_CMDLINE, CHECKPOINTED));
    let out = understudy(&["run", env.to_str().unwrap()]);
    let log = stderr(&out);
    assert_hostile_finished(&console(&env, "hostile"), &log);
    for event in ["failure-detected", "failed-over"] {
        assert!(
            events(&log, event, "hostile").is_empty(),
            "no failure, so no {event}:\n{log}"
        );
    }
    assert!(
        !events(&log, "armed", "hostile").is_empty(),
        "the pair was protected:\n{log}"
    );
    assert_no_vmm_trouble(&log);
    // One guest, which ended itself by writing 0 to the debug-exit port.
    assert_eq!(out.status.code(), Some(1), "{log}");
}

#[test]
fn a_hostile_pair_fails_over_from_a_real_failure_with_all_its_odd_state() {
    let env = env_with_disk("pair-killed", &hostile_guest(PAIR_CMDLINE, CHECKPOINTED));
    let mut run = Running::start(&env, &[]);
    // Killed once its kernel-mode part has left its MSRs, APIC and CPU state odd, while it
    // sweeps the ports; the standby goes on from the last checkpoint.
    run.wait_until("the hostile guest's kernel-mode part", |_| {
        std::fs::read(env.with_file_name("hostile.log"))
            .is_ok_and(|text| String::from_utf8_lossy(&text).contains(PROGRESS[0]))
    });
    run.ok(json!({"request": "fault", "guest": "hostile", "kind": "kill"}));
    let status = run.wait_for_exit();
    let log = run.log.text();
    let text = console(&env, "hostile");
    assert_hostile_finished(&text, &log);
    assert_eq!(
        text.matches("hostile: kernel mode\n").count(),
        1,
        "it did not start over:\n{text}"
    );
    assert_eq!(
        events(&log, "failure-detected", "hostile").len(),
        1,
        "{log}"
    );
    assert_eq!(events(&log, "failed-over", "hostile").len(), 1, "{log}");
    assert_no_vmm_trouble(&log);
    assert_eq!(status.code(), Some(1), "{log}");
}
