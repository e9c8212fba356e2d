//! How long a vCPU has had the host CPU it asked for: the clock that judges a guest's
//! liveness, so that a busy host can slow a verdict down but never bring one about.
//!
//! A vCPU's *run time* grows only while the vCPU is the guest's to use:
//! - while its thread is on a CPU running the guest or its exits, by the thread's own CPU
//!   time (which the kernel keeps free of what the hypervisor below steals), less the CPU
//!   time it spends parked, answering its owner;
//! - while the guest has halted the vCPU to wait for an interrupt (HLT), by the time KVM
//!   counts it blocked there (`halt_wait_ns` of its binary statistics), less what its thread
//!   then waited for a CPU to carry on: a guest that waits for a timer has not stopped, and a
//!   guest halted for good has;
//! - while its thread sleeps outside the guest without being parked (stuck in the host
//!   kernel), by the time between two looks that found it so.
//!
//! It does not grow while the thread waits for a CPU (on a run queue: the kernel shows such a
//! wait only once it is over, which is why the wait itself is never used), while the
//! hypervisor below runs something else, while the process is stopped (SIGSTOP), or while
//! the vCPU is parked by its owner. Time the looking thread itself is kept from running is
//! not counted either: the clock only grows by what the vCPU did.
//!
//! Read by whichever thread judges the vCPU (the guest's event loop, an epoch's pause); the
//! vCPU thread only keeps its [`ParkClock`](crate::vcpu) up to date. Each look advances the
//! clock from the previous look, under a lock per vCPU.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `KVM_GET_STATS_FD` (`_IO(KVMIO, 0xce)`), which kvm-ioctls does not wrap.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;

/// A vCPU's KVM statistics that tell a halted vCPU: the file and where its figures are.
struct HaltStats {
    file: OwnedFd,
    /// Byte offset of `halt_wait_ns` (time blocked in completed halts) in the file.
    wait_at: u64,
    /// Byte offset of `blocking` (1 while the vCPU is blocked in a halt).
    blocking_at: u64,
}

impl HaltStats {
    /// The statistics of the vCPU behind `vcpu_fd`, where KVM has them (Linux 5.14+).
    fn open(vcpu_fd: RawFd) -> Option<Self> {
        // SAFETY: an ioctl without an argument on a descriptor the caller keeps open; it
        // returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(vcpu_fd, KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        // The header: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
        let header = read_at(&file, 0, 24)?;
        let word = |i: usize| {
            u32::from_ne_bytes([
                header[i * 4],
                header[i * 4 + 1],
                header[i * 4 + 2],
                header[i * 4 + 3],
            ])
        };
        let (name_size, count, descs, data) = (word(1), word(2), word(4), word(5));
        // Each descriptor: flags u32, exponent i16, size u16, offset u32, bucket_size u32,
        // then the name in `name_size` bytes.
        let step = 16 + name_size as usize;
        let table = read_at(&file, u64::from(descs), step * count as usize)?;
        let (mut wait_at, mut blocking_at) = (None, None);
        for desc in table.chunks_exact(step) {
            let offset = u32::from_ne_bytes([desc[8], desc[9], desc[10], desc[11]]);
            let name = &desc[16..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            match name {
                b"halt_wait_ns" => wait_at = Some(u64::from(data) + u64::from(offset)),
                b"blocking" => blocking_at = Some(u64::from(data) + u64::from(offset)),
                _ => {}
            }
        }
        Some(HaltStats {
            file,
            wait_at: wait_at?,
            blocking_at: blocking_at?,
        })
    }

    /// Time blocked in completed halts so far, and whether the vCPU is blocked in one now.
    fn read(&self) -> Option<(Duration, bool)> {
        let value = |at| {
            read_at(&self.file, at, 8)
                .map(|b| u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        };
        Some((
            Duration::from_nanos(value(self.wait_at)?),
            value(self.blocking_at)? != 0,
        ))
    }
}

fn read_at(file: &OwnedFd, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; len];
    // SAFETY: reads at most `len` bytes into a live buffer of that size.
    let read = unsafe {
        libc::pread(
            file.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            len,
            offset as libc::off_t,
        )
    };
    (read == len as isize).then_some(buffer)
}

/// What one look at a vCPU found.
#[derive(Debug, Clone, Copy)]
struct Look {
    at: Instant,
    /// The thread's CPU time that was the guest's (parked time's left out).
    guest_cpu: Duration,
    /// Time blocked in completed halts.
    halt_wait: Duration,
    /// Blocked in a halt right now.
    halted: bool,
    /// The thread's waits for a CPU that are over.
    run_delay: Duration,
    /// Asleep outside the guest and not parked (only looked at when it used no CPU since
    /// the previous look).
    stuck: bool,
    /// The host's stolen time (all CPUs), read only when it may be needed.
    steal: Option<Duration>,
}

/// What the vCPU thread keeps for its run clock: see [`crate::vcpu`]'s park clock.
pub(crate) trait ParkedCpu: Send + Sync {
    /// CPU time the thread spent parked (answering its owner), the current park included,
    /// given its CPU time now.
    fn parked_cpu(&self, cpu_now: Duration) -> Duration;
    /// Whether the thread is parked now.
    fn is_parked(&self) -> bool;
}

/// The run clock of one vCPU.
pub(crate) struct RunClock {
    tid: Arc<AtomicI32>,
    /// The thread's CPU-time clock, once known.
    cpu_clock: OnceLock<libc::clockid_t>,
    halt: Option<HaltStats>,
    parked: Arc<dyn ParkedCpu>,
    state: Mutex<ClockState>,
}

#[derive(Default)]
struct ClockState {
    last: Option<Look>,
    ran: Duration,
    /// Run time credited for a halt still in progress at the last look.
    credited_halt: Duration,
}

impl RunClock {
    /// The clock of the vCPU behind `vcpu_fd`, whose thread's id appears in `tid`.
    pub fn new(vcpu_fd: RawFd, tid: Arc<AtomicI32>, parked: Arc<dyn ParkedCpu>) -> Self {
        RunClock {
            tid,
            cpu_clock: OnceLock::new(),
            halt: HaltStats::open(vcpu_fd),
            parked,
            state: Mutex::new(ClockState::default()),
        }
    }

    /// The thread's CPU-time clock, from its pthread handle (once it runs).
    pub fn set_thread(&self, thread: libc::pthread_t) {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `thread` is a live, unjoined thread of this process; the call only writes
        // the clock id.
        if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } == 0 {
            let _ = self.cpu_clock.set(clock);
        }
    }

    /// Whether halts are told apart from other sleep (KVM has the statistics).
    pub fn sees_halts(&self) -> bool {
        self.halt.is_some()
    }

    /// The vCPU's run time so far (see the module doc), advanced to now. Never goes back.
    pub fn ran(&self) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(look) = self.look(state.last.as_ref()) else {
            return state.ran;
        };
        if let Some(last) = state.last {
            state.advance(&last, &look);
        }
        state.last = Some(look);
        state.ran
    }

    fn thread_cpu(&self) -> Option<Duration> {
        let clock = *self.cpu_clock.get()?;
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes one timespec; a clock of a thread that has ended gives an error.
        if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
            return None;
        }
        Some(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
    }

    fn look(&self, last: Option<&Look>) -> Option<Look> {
        let tid = self.tid.load(Ordering::Acquire);
        if tid <= 0 {
            return None;
        }
        let cpu = self.thread_cpu()?;
        // Never back: a park that ends between the two reads must not undo a look.
        let guest_cpu = cpu
            .saturating_sub(self.parked.parked_cpu(cpu))
            .max(last.map_or(Duration::ZERO, |l| l.guest_cpu));
        let (halt_wait, halted) = match &self.halt {
            Some(stats) => stats.read()?,
            None => (Duration::ZERO, false),
        };
        let idle = last.is_some_and(|l| l.guest_cpu == guest_cpu);
        // The kernel's files are read only when their figures can matter: a halt ended (its
        // wait for a CPU is left out), or the thread used no CPU (it may be stuck). Otherwise
        // the last wait is carried on, and the next read's difference leaves out more than
        // the halt's own wait, never less.
        let (run_delay, sleeping) = match last {
            Some(l) if !idle && l.halt_wait == halt_wait => (l.run_delay, false),
            _ => thread_sched(tid)?,
        };
        // Without KVM's statistics a halt looks like any other sleep: it counts as such.
        let stuck = idle && sleeping && !halted && !self.parked.is_parked();
        let steal = (halted || stuck).then(host_steal);
        Some(Look {
            at: Instant::now(),
            guest_cpu,
            halt_wait,
            halted,
            run_delay,
            stuck,
            steal,
        })
    }
}

impl ClockState {
    fn advance(&mut self, last: &Look, now: &Look) {
        let cpu = now.guest_cpu.saturating_sub(last.guest_cpu);
        let waited = now.run_delay.saturating_sub(last.run_delay);
        let halts_ended = now.halt_wait.saturating_sub(last.halt_wait);
        self.ran += cpu;
        if !halts_ended.is_zero() {
            // KVM counts a halt until its thread runs again: the wait for a CPU after the
            // wake-up is not the guest's.
            self.ran += halts_ended
                .saturating_sub(self.credited_halt)
                .saturating_sub(waited);
            self.credited_halt = Duration::ZERO;
        }
        let wall = now.at.saturating_duration_since(last.at);
        let stolen = match (last.steal, now.steal) {
            (Some(before), Some(after)) => after.saturating_sub(before),
            _ => wall,
        };
        if last.halted && now.halted && halts_ended.is_zero() {
            // One halt spans both looks.
            let credit = wall.saturating_sub(stolen);
            self.ran += credit;
            self.credited_halt += credit;
        } else if last.stuck && now.stuck && cpu.is_zero() && waited.is_zero() {
            self.ran += wall.saturating_sub(stolen);
        }
    }
}

/// A thread's finished waits for a CPU (`/proc/self/task/TID/schedstat`) and whether it is
/// asleep (`S` or `D` in its `stat`) rather than runnable or stopped.
fn thread_sched(tid: i32) -> Option<(Duration, bool)> {
    let sched = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let waited: u64 = sched.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // "pid (comm) state ...": the name may hold anything but not the last ')'.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    Some((Duration::from_nanos(waited), matches!(state, "S" | "D")))
}

/// CPU time the hypervisor under this host took from all of its CPUs so far (the `steal` of
/// `/proc/stat`, zero where there is none). The kernel counts it per CPU, not per thread, and
/// in ticks; the sum over every CPU is a generous bound on what any one thread lost.
pub fn host_steal() -> Duration {
    static TICK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf with a valid name has no preconditions.
    let tick_hz = *TICK.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        hz if hz > 0 => hz as u64,
        _ => 100,
    });
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Duration::ZERO;
    };
    // "cpu  user nice system idle iowait irq softirq steal ..."
    let steal = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(8)?.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(steal.saturating_mul(1_000_000_000 / tick_hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn look(at: Instant, cpu_ms: u64) -> Look {
        Look {
            at,
            guest_cpu: Duration::from_millis(cpu_ms),
            halt_wait: Duration::ZERO,
            halted: false,
            run_delay: Duration::ZERO,
            stuck: false,
            steal: None,
        }
    }

    #[test]
    fn a_thread_waiting_for_a_cpu_runs_no_time() {
        let t0 = Instant::now();
        let mut clock = ClockState::default();
        // 300 ms on, runnable all along but never on a CPU: its CPU time stands still.
        clock.advance(&look(t0, 5), &look(t0 + 300 * MS, 5));
        assert_eq!(clock.ran, Duration::ZERO);
        clock.advance(&look(t0 + 300 * MS, 5), &look(t0 + 310 * MS, 12));
        assert_eq!(clock.ran, 7 * MS);
    }

    #[test]
    fn a_halt_counts_as_the_guests_time_without_the_wait_for_a_cpu_after_it() {
        let t0 = Instant::now();
        let mut clock = ClockState::default();
        let halted = |at, wait_ms| Look {
            halted: true,
            halt_wait: Duration::from_millis(wait_ms),
            steal: Some(Duration::ZERO),
            ..look(at, 1)
        };
        // Halted at both looks, 40 ms apart: all 40 ms are the guest's.
        clock.advance(&halted(t0, 0), &halted(t0 + 40 * MS, 0));
        assert_eq!(clock.ran, 40 * MS);
        // The halt ends after 70 ms in all, 20 of them waiting for a CPU after the wake-up;
        // its first 40 ms are counted already.
        let woke = Look {
            halt_wait: 70 * MS,
            run_delay: 20 * MS,
            ..look(t0 + 90 * MS, 1)
        };
        clock.advance(&halted(t0 + 40 * MS, 0), &woke);
        assert_eq!(clock.ran, 50 * MS);
    }

    #[test]
    fn a_thread_asleep_outside_the_guest_runs_the_time_it_sleeps_less_steal() {
        let t0 = Instant::now();
        let mut clock = ClockState::default();
        let stuck = |at, steal_ms| Look {
            stuck: true,
            steal: Some(Duration::from_millis(steal_ms)),
            ..look(at, 3)
        };
        clock.advance(&stuck(t0, 100), &stuck(t0 + 50 * MS, 110));
        assert_eq!(clock.ran, 40 * MS);
        // Found stuck at one look only: nothing is known of the time between.
        clock.advance(&look(t0 + 50 * MS, 3), &stuck(t0 + 90 * MS, 110));
        assert_eq!(clock.ran, 40 * MS);
    }
}
