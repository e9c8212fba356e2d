//! What the seccomp filters cost: the same runs with the jail on (the default) and off
//! (`--no-seccomp`), in one bench run, arranged so that this host's drift (other builds, a
//! noisy 2-core machine) hits both alike:
//! - CPU-bound work: a checkpointed `counter` pair (`work=1`, 100 ms lines, 20 ms epochs),
//!   the median `work W` per line, and the guest's whole work per CPU second its process
//!   used (`wait4`'s usage), which other load on the host cannot move; the on and off runs
//!   of a round run *at the same time*, so they share whatever else the machine does, and
//!   each round gives one ratio. Every
//!   epoch's system calls on the guest's loop and every vCPU exit's `KVM_RUN` pass the filters;
//! - failover downtime: the same pair killed eight times a run (`--fault g:kill@800` ...,
//!   re-armed in between), `downtime_us` from the log (detection to the standby running);
//!   the on and off runs of a round one after the other, which goes first alternating.
//!
//! The work figures are the medians over every round, and the median of the rounds' own
//! ratios with their range; the downtime figures are the median and quartiles of every
//! failover of every round (a failover that lands while the host is busy waits milliseconds
//! for a CPU, in either mode, so their tail says nothing about the filters).
//!
//! - the cost per system call: a `getpid` and a `KVM_RUN` `ioctl` (on no descriptor, so it
//!   fails at once after the filters) timed on a thread under the filters a vCPU thread has (the
//!   supervisor's, the guest loop's and its own), against an unfiltered thread.
//!
//! Run: `cargo bench --bench seccomp` (optionally `-- ROUNDS`, default 11).

mod common;

use common::{field, kernel, median, spread};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Instant;
use vmm_core::jail::ThreadKind;

/// What one run left: its console, its log, and the CPU time its process used, in seconds.
struct Ran {
    console: String,
    log: String,
    cpu_s: f64,
}

/// `understudy run` of a checkpointed counter pair, filters `on` or not, with `faults`.
fn run(on: bool, name: &str, cmdline: &str, faults: &[&str]) -> Ran {
    let text = format!(
        "[[guest]]\nname = \"g\"\nkernel = \"{}\"\nmemory_mib = 64\ncmdline = \"{cmdline}\"\n\
         crash_dump = false\n[guest.standby]\nresume = \"checkpoint\"\nheartbeat_timeout_ms = 0\n\
         max_failovers = 100\n",
        kernel("counter").display()
    );
    let env = common::scratch(name).join(format!("{name}.toml"));
    std::fs::write(&env, text).expect("write env");
    let mut command = Command::new(env!("CARGO_BIN_EXE_understudy"));
    command.args(["--log", "info", "run"]).arg(&env);
    if !on {
        command.arg("--no-seccomp");
    }
    for fault in faults {
        command.args(["--fault", fault]);
    }
    // Reaped by `wait4` below, which `Child` does not know of.
    #[allow(clippy::zombie_processes)]
    let mut child = command
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run understudy");
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let console = read_all(Box::new(child.stdout.take().expect("piped")));
    let log = read_all(Box::new(child.stderr.take().expect("piped")));
    let pid = child.id() as libc::pid_t;
    // wait4 rather than `Child::wait`: it also reports the CPU time the process used.
    // SAFETY: a zeroed rusage is valid; wait4 writes the status and usage of our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status = 0;
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait for understudy");
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ran {
        console: console.join().expect("stdout reader"),
        log: log.join().expect("stderr reader"),
        cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
    }
}

/// One CPU-bound run's figures: the median work per line, and the guest's whole work per
/// CPU second the process used (which the host's other load cannot change, since a
/// preempted process does no work and uses no CPU alike).
fn work(on: bool) -> (f64, f64) {
    let name = if on {
        "seccomp-work-on"
    } else {
        "seccomp-work-off"
    };
    let ran = run(on, name, "interval_ms=100 stop_after=30 work=1", &[]);
    let total: f64 = ran
        .console
        .lines()
        .filter_map(|l| l.split(" work ").nth(1)?.trim().parse::<f64>().ok())
        .sum();
    (common::median_work(&ran.console), total / ran.cpu_s)
}

/// The figures of an on and an off run started together: (on, off).
fn work_side_by_side() -> ((f64, f64), (f64, f64)) {
    let off = std::thread::spawn(|| work(false));
    let on = work(true);
    (on, off.join().expect("the off run's thread"))
}

/// Detection to the standby running, in ms, of each of eight kills of one run.
fn downtimes_ms(on: bool) -> Vec<f64> {
    let faults: Vec<String> = (1..=8).map(|i| format!("g:kill@{}", i * 800)).collect();
    let faults: Vec<&str> = faults.iter().map(String::as_str).collect();
    let ran = run(
        on,
        "seccomp-failover",
        "interval_ms=50 stop_after=150",
        &faults,
    );
    ran.log
        .lines()
        .filter(|l| l.contains("event=\"failed-over\""))
        .filter_map(|l| field(l, "downtime_us"))
        .map(|us| us / 1000.0)
        .collect()
}

/// Nanoseconds per call of `getpid` and of `KVM_RUN` on a bad descriptor, on a thread
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
    // The request a vCPU exit makes, which its filters test first.
    let kvm_run = vmm_core::jail::ioctls::allowed(ThreadKind::Vcpu)[0].number;
    // SAFETY: KVM_RUN on descriptor -1 fails with EBADF, touching nothing.
    let ioctl = time(&|| unsafe {
        libc::ioctl(-1, kvm_run as libc::Ioctl);
    });
    (getpid, ioctl)
}

/// The first quartile, median and third quartile of `samples`, and how many there are: a
/// failover's downtime here has a long tail (a failover that lands when the host is busy
/// waits milliseconds for a CPU), which a median shrugs off and a range would not.
fn quartiles(mut samples: Vec<f64>) -> (f64, f64, f64, usize) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.25), median(samples.clone()), at(0.75), samples.len())
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(11);
    let (mut work_on, mut work_off, mut work_ratios) = (vec![], vec![], vec![]);
    let (mut per_cpu_on, mut per_cpu_off, mut per_cpu_ratios) = (vec![], vec![], vec![]);
    let (mut down_on, mut down_off) = (vec![], vec![]);
    for round in 0..rounds {
        let (on, off) = work_side_by_side();
        work_on.push(on.0);
        work_off.push(off.0);
        work_ratios.push(off.0 / on.0);
        per_cpu_on.push(on.1);
        per_cpu_off.push(off.1);
        per_cpu_ratios.push(off.1 / on.1);
        // Which goes first alternates, so neither always runs on a machine warmed by the other.
        let (on, off) = if round % 2 == 0 {
            let on = downtimes_ms(true);
            (on, downtimes_ms(false))
        } else {
            let off = downtimes_ms(false);
            (downtimes_ms(true), off)
        };
        down_on.extend(on);
        down_off.extend(off);
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
    println!("seccomp on against off, {rounds} rounds:");
    println!(
        "  CPU-bound work per line (side by side): on {:.0}, off {:.0}; off/on: median of rounds {}",
        median(work_on),
        median(work_off),
        spread(work_ratios, 3)
    );
    println!(
        "  guest work per CPU second of the process: on {:.3e}, off {:.3e}; off/on: median of rounds {}",
        median(per_cpu_on),
        median(per_cpu_off),
        spread(per_cpu_ratios, 3)
    );
    println!(
        "  per call on a vCPU thread's filters: getpid {:.0} ns (unfiltered {:.0} ns), KVM_RUN ioctl {:.0} ns (unfiltered {:.0} ns)",
        pick(&jailed, false),
        pick(&bare, false),
        pick(&jailed, true),
        pick(&bare, true)
    );
    if down_on.is_empty() || down_off.is_empty() {
        println!("  failover downtime: no failover seen");
        return;
    }
    let (on, off) = (quartiles(down_on), quartiles(down_off));
    println!(
        "  failover downtime, median (quartiles) of every failover: on {:.3} ms ({:.3}–{:.3}, {} failovers), off {:.3} ms ({:.3}–{:.3}, {}); on/off {:.3}",
        on.1, on.0, on.2, on.3, off.1, off.0, off.2, off.3, on.1 / off.1
    );
}
