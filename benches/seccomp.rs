//! What the seccomp filters cost: the same runs with the filters on (the default) and off
//! (`--no-seccomp`), interleaved round by round so the machine's drift hits both alike.
//! - CPU-bound work: a checkpointed `counter` pair (`work=1`, 100 ms lines, 20 ms epochs),
//!   the median `work W` per line — every epoch's system calls on the guest's loop and every
//!   vCPU exit's `KVM_RUN` pass the filters;
//! - failover downtime: the same pair killed (`--fault g:kill@1500`), `downtime_us` from the
//!   log (detection to the standby running).
//!
//! - the cost per system call: a `getpid` and a KVM `ioctl` (on no descriptor, so it fails at
//!   once after the filters) timed on a thread under the filters a vCPU thread has (the
//!   supervisor's, the guest loop's and its own), against an unfiltered thread.
//!
//! Run: `cargo bench --bench seccomp` (optionally `-- ROUNDS`, default 5).

mod common;

use common::{field, kernel, median};
use std::time::Instant;
use vmm_core::jail::ThreadKind;

/// `understudy run` of a checkpointed counter pair, filters `on` or not, with `faults`;
/// returns its console and its log.
fn run(on: bool, name: &str, cmdline: &str, faults: &[&str]) -> (String, String) {
    let text = format!(
        "[[guest]]\nname = \"g\"\nkernel = \"{}\"\nmemory_mib = 64\ncmdline = \"{cmdline}\"\n\
         crash_dump = false\n[guest.standby]\nresume = \"checkpoint\"\nheartbeat_timeout_ms = 0\n",
        kernel("counter").display()
    );
    let extra: &[&str] = if on { &[] } else { &["--no-seccomp"] };
    common::understudy_with(&text, name, faults, extra)
}

/// Median work per line of one run.
fn work(on: bool) -> f64 {
    let (console, _) = run(
        on,
        "seccomp-work",
        "interval_ms=100 stop_after=30 work=1",
        &[],
    );
    common::median_work(&console)
}

/// Detection to the standby running, in ms, of one killed run.
fn downtime_ms(on: bool) -> Option<f64> {
    let (_, log) = run(
        on,
        "seccomp-failover",
        "interval_ms=50 stop_after=50",
        &["g:kill@1500"],
    );
    log.lines()
        .find(|l| l.contains("event=\"failed-over\""))
        .and_then(|l| field(l, "downtime_us"))
        .map(|us| us / 1000.0)
}

/// Nanoseconds per call of `getpid` and of a KVM `ioctl` on a bad descriptor, on a thread
/// under `kinds`' filters (each entered on a thread started by the one before, as the
/// process does), or on an unfiltered thread if `kinds` is empty.
fn per_call_ns(kinds: &'static [ThreadKind]) -> (f64, f64) {
    std::thread::spawn(move || {
        if let Some((last, parents)) = kinds.split_last() {
            if !parents.is_empty() {
                // The parents' filters first, on threads of their own.
                return nested(parents, *last);
            }
            vmm_core::jail::try_enter(*last).expect("filter installs");
        }
        time_calls()
    })
    .join()
    .expect("timing thread")
}

/// Enters `parents[0]`, then on a new thread the rest, and finally `last`, and times there.
fn nested(parents: &'static [ThreadKind], last: ThreadKind) -> (f64, f64) {
    vmm_core::jail::try_enter(parents[0]).expect("filter installs");
    std::thread::spawn(move || {
        if parents.len() > 1 {
            nested(&parents[1..], last)
        } else {
            vmm_core::jail::try_enter(last).expect("filter installs");
            time_calls()
        }
    })
    .join()
    .expect("timing thread")
}

/// Times the two calls on this thread.
fn time_calls() -> (f64, f64) {
    const CALLS: u32 = 200_000;
    let time = |call: &dyn Fn()| {
        let start = Instant::now();
        for _ in 0..CALLS {
            call();
        }
        start.elapsed().as_nanos() as f64 / f64::from(CALLS)
    };
    // SAFETY: getpid has no preconditions.
    let getpid = time(&|| unsafe {
        libc::syscall(libc::SYS_getpid);
    });
    // SAFETY: KVM_GET_API_VERSION on descriptor -1 fails with EBADF, touching nothing.
    let ioctl = time(&|| unsafe {
        libc::ioctl(-1, 0xAE00);
    });
    (getpid, ioctl)
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let (mut work_on, mut work_off, mut down_on, mut down_off) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        work_on.push(work(true));
        work_off.push(work(false));
        down_on.extend(downtime_ms(true));
        down_off.extend(downtime_ms(false));
    }
    let (mut bare, mut jailed) = (vec![], vec![]);
    for _ in 0..rounds {
        bare.push(per_call_ns(&[]));
        jailed.push(per_call_ns(&[
            ThreadKind::Supervisor,
            ThreadKind::GuestLoop,
            ThreadKind::Vcpu,
        ]));
    }
    let pick = |v: &[(f64, f64)], second: bool| {
        median(
            v.iter()
                .map(|p| if second { p.1 } else { p.0 })
                .collect::<Vec<_>>(),
        )
    };
    let (won, woff) = (median(work_on), median(work_off));
    println!("seccomp on against off, medians of {rounds} rounds:");
    println!(
        "  CPU-bound work per line: on {won:.0}, off {woff:.0}; off/on = {:.3}",
        woff / won
    );
    println!(
        "  per call on a vCPU thread's filters: getpid {:.0} ns (unfiltered {:.0} ns), KVM ioctl {:.0} ns (unfiltered {:.0} ns)",
        pick(&jailed, false),
        pick(&bare, false),
        pick(&jailed, true),
        pick(&bare, true)
    );
    if down_on.is_empty() || down_off.is_empty() {
        println!("  failover downtime: no failover seen");
        return;
    }
    let (don, doff) = (median(down_on), median(down_off));
    println!(
        "  failover downtime: on {don:.2} ms, off {doff:.2} ms; on/off = {:.3}",
        don / doff
    );
}
