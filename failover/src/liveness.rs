//! Is the active alive? Judged from its own heartbeats, against its own run time: a guest
//! is silent only once its vCPUs have *run* for the timeout without a heartbeat. A vCPU's run
//! time ([`vmm_core::run_clock`]) grows while its thread has a host CPU (its CPU time, which
//! the kernel keeps free of what the hypervisor below steals) or while the guest has halted it
//! to wait for an interrupt; it does not grow while the thread waits for a CPU, while the
//! VMM parks it (checkpoint pauses, an operator's pause, a snapshot) or while the process is
//! stopped. A guest cannot beat while it is not allowed to run, so a busy host, a slow
//! supervisor or a stopped process delays a verdict and never makes a healthy guest look
//! dead; a guest that hangs while it gets the CPU is found after the timeout of its own run.
//!
//! [`Liveness`] is plain arithmetic over run times, unit-tested without KVM; [`Deadline`] is
//! the non-blocking timerfd the guest's event loop wakes on to ask it.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// What [`Liveness::verdict`] concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The guest is not judged by heartbeats (no timeout, or no heartbeat yet).
    NotJudged,
    /// Alive; the verdict can change no sooner than this from now.
    Alive(Duration),
    /// Silent for longer than the timeout (time kept from running excluded).
    Silent(Duration),
}

/// How a silence adds up, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence {
    /// Wall time since the last heartbeat was seen (or the guest started on its machine).
    pub since_seen: Duration,
    /// The part of it the guest's vCPUs ran (the least of any vCPU): the silence judged.
    pub ran: Duration,
}

/// The heartbeat watch of one guest.
#[derive(Debug, Clone)]
pub struct Liveness {
    timeout: Option<Duration>,
    /// When the active's last heartbeat was seen, or the moment the guest last started
    /// running again on a machine; `None` until the first heartbeat.
    since: Option<Instant>,
    /// The device's stamp of the last heartbeat seen, to tell a new one from it.
    last_stamp: Option<Instant>,
    /// An operator holds the guest (paused): nothing is judged meanwhile.
    holding: bool,
    /// Each vCPU's run time (see `Vm::run_time`) when `since` was set.
    ran_at_since: Vec<Duration>,
}

impl Liveness {
    /// A watch with `timeout` (`None`: heartbeats are not watched).
    pub fn new(timeout: Option<Duration>) -> Self {
        Liveness {
            timeout,
            since: None,
            last_stamp: None,
            holding: false,
            ran_at_since: Vec::new(),
        }
    }

    /// The timeout, when heartbeats are watched.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The active's last heartbeat was taken at `at` (as its device stamped it) and is seen
    /// now, at `seen`, when its vCPUs' run times are `ran`. Silence counts from this look:
    /// what a vCPU ran between its beat and the look is not known apart, so a late look
    /// postpones a verdict and never hastens one.
    pub fn beat(&mut self, at: Instant, seen: Instant, ran: &[Duration]) {
        if self.timeout.is_none() || self.last_stamp.is_some_and(|last| at <= last) {
            return;
        }
        self.last_stamp = Some(at);
        self.since = Some(seen.max(at));
        self.ran_at_since = ran.to_vec();
    }

    /// An operator holds the guest (pauses it) until [`Liveness::release`]: it is not judged
    /// meanwhile (and its parked vCPUs run no time).
    pub fn hold(&mut self) {
        self.holding = true;
    }

    /// The hold begun by [`Liveness::hold`] ends.
    pub fn release(&mut self) {
        self.holding = false;
    }

    /// The guest starts running again at `now` on a machine whose heartbeats are new (after
    /// a failover or a switchover) and whose vCPUs' run times are `ran`: silence counts from
    /// here, if the guest is judged at all.
    pub fn restarted(&mut self, now: Instant, ran: &[Duration]) {
        if self.since.is_some() {
            self.since = Some(now);
            self.ran_at_since = ran.to_vec();
        }
        self.holding = false;
    }

    /// The guest starts over from its first instruction (a restart): it is judged only once
    /// it sends a heartbeat again.
    pub fn reset(&mut self) {
        self.since = None;
        self.holding = false;
    }

    /// How long the guest has been silent at `now`, with its vCPUs' run times at `ran`: the
    /// least any of its vCPUs ran since (no vCPU figures: no silence).
    pub fn silence(&self, now: Instant, ran: &[Duration]) -> Option<Duration> {
        self.breakdown(now, ran).map(|s| s.ran)
    }

    /// What [`Liveness::silence`] is made of.
    pub fn breakdown(&self, now: Instant, ran: &[Duration]) -> Option<Silence> {
        let since = self.since?;
        let ran = ran
            .iter()
            .enumerate()
            .map(|(i, total)| {
                let before = self.ran_at_since.get(i).copied().unwrap_or(*total);
                total.saturating_sub(before)
            })
            .min()
            .unwrap_or_default();
        Some(Silence {
            since_seen: now.saturating_duration_since(since),
            ran,
        })
    }

    /// The verdict at `now`, with the vCPUs' run times at `ran`.
    pub fn verdict(&self, now: Instant, ran: &[Duration]) -> Verdict {
        let (Some(timeout), Some(silence)) = (self.timeout, self.silence(now, ran)) else {
            return Verdict::NotJudged;
        };
        if self.holding {
            // Held by the VMM: nothing to judge until it lets go.
            return Verdict::NotJudged;
        }
        if silence >= timeout {
            Verdict::Silent(silence)
        } else {
            Verdict::Alive(timeout - silence)
        }
    }
}

/// CPU time the hypervisor under this host took from all of its CPUs so far: see
/// [`vmm_core::run_clock::host_steal`].
pub use vmm_core::run_clock::host_steal;

/// How finely this host can judge a guest's run time: what `understudy check` compares
/// heartbeat timeouts with.
///
/// A busy vCPU is judged by its thread's CPU time, which is exact. A vCPU the guest halted, or
/// a thread asleep outside the guest, is credited with the wall time between two looks less
/// what the hypervisor below stole meanwhile; the kernel accounts steal per CPU at its timer
/// tick and reports it in units of `1/USER_HZ`, so a steal can be seen up to one unit and a
/// tick late. A timeout that short cannot tell a guest that waited for a timer on a stolen CPU
/// from a guest that stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostJudgment {
    /// The unit steal is reported in, where the host has a hypervisor that steals (zero
    /// otherwise).
    pub steal_unit: Duration,
    /// The kernel's timer tick, at which CPU time and steal are accounted.
    pub tick: Duration,
}

impl HostJudgment {
    /// Looks at this host.
    pub fn of_this_host() -> Self {
        // SAFETY: sysconf with a valid name has no preconditions.
        let user_hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
            hz if hz > 0 => hz as u64,
            _ => 100,
        };
        HostJudgment {
            steal_unit: if host_steal().is_zero() {
                Duration::ZERO
            } else {
                Duration::from_micros(1_000_000 / user_hz)
            },
            tick: Duration::from_micros(1_000_000 / kernel_hz().unwrap_or(250)),
        }
    }

    /// The shortest heartbeat timeout this host judges without false failures for a guest
    /// that halts between heartbeats: a steal unit, and a tick on either side of it.
    pub fn floor(&self) -> Duration {
        self.steal_unit + 2 * self.tick
    }

    /// What to tell the user of guest `guest` with heartbeat timeout `timeout`, if it is
    /// below [`HostJudgment::floor`].
    pub fn warning(&self, guest: &str, timeout: Duration) -> Option<String> {
        (!timeout.is_zero() && timeout < self.floor()).then(|| {
            format!(
                "guest {guest}: heartbeat_timeout_ms = {} is below what this host can judge \
                 ({} ms: steal counted in {} ms units, a {} ms scheduler tick); a guest that \
                 halts between heartbeats may be failed over while it is well (a guest that \
                 keeps its vCPUs busy is judged by their CPU time and is not affected)",
                timeout.as_millis(),
                self.floor().as_millis(),
                self.steal_unit.as_millis(),
                self.tick.as_millis(),
            )
        })
    }
}

/// The kernel's `CONFIG_HZ`, where its configuration can be read.
fn kernel_hz() -> Option<u64> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let config = std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|hz| hz.trim().parse().ok())
        .filter(|&hz| hz > 0)
}

/// A one-shot timer for an event loop, non-blocking: reading it when it has not fired (a
/// spurious wake-up, or a re-arm in the same loop turn) returns at once.
pub struct Deadline {
    timer: TimerFd,
}

impl Deadline {
    /// A disarmed timer.
    pub fn new() -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(std::io::Error::from)?;
        set_nonblocking(timer.as_raw_fd())?;
        Ok(Deadline { timer })
    }

    /// Fires once, `after` from now (at least 1 ms: zero would disarm it).
    pub fn arm(&mut self, after: Duration) -> std::io::Result<()> {
        self.timer
            .reset(after.max(Duration::from_millis(1)), None)
            .map_err(std::io::Error::from)
    }

    /// Fires every `period`, the first time `period` from now.
    pub fn arm_periodic(&mut self, period: Duration) -> std::io::Result<()> {
        let period = period.max(Duration::from_millis(1));
        self.timer
            .reset(period, Some(period))
            .map_err(std::io::Error::from)
    }

    /// Stops it firing.
    pub fn disarm(&mut self) -> std::io::Result<()> {
        self.timer.clear().map_err(std::io::Error::from)
    }

    /// Consumes the expirations so far (none, harmlessly, when woken spuriously); never
    /// blocks. Returns how many there were.
    pub fn acknowledge(&mut self) -> u64 {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live 8-byte buffer from a descriptor we own.
        let read = unsafe { libc::read(self.timer.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        if read == 8 {
            u64::from_ne_bytes(count)
        } else {
            0
        }
    }
}

impl AsRawFd for Deadline {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with plain integer flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_guest_is_judged_only_once_it_has_beaten() {
        let t0 = Instant::now();
        let mut live = Liveness::new(Some(100 * MS));
        assert_eq!(
            live.verdict(t0 + 1000 * MS, &[900 * MS]),
            Verdict::NotJudged
        );
        live.beat(t0, t0, &[Duration::ZERO]);
        assert_eq!(
            live.verdict(t0 + 40 * MS, &[40 * MS]),
            Verdict::Alive(60 * MS)
        );
        assert_eq!(
            live.verdict(t0 + 150 * MS, &[150 * MS]),
            Verdict::Silent(150 * MS)
        );
        assert_eq!(
            Liveness::new(None).verdict(t0, &[MS]),
            Verdict::NotJudged,
            "no timeout, no watch"
        );
    }

    #[test]
    fn only_the_time_its_vcpus_ran_is_silence() {
        let t0 = Instant::now();
        let mut live = Liveness::new(Some(100 * MS));
        // Two vCPUs; at the beat they had run 5 and 7 ms in all.
        live.beat(t0, t0, &[5 * MS, 7 * MS]);
        // 10 s on, vCPU 0 has run 300 ms more, vCPU 1 only 60 (it waited for a host CPU,
        // or was parked, or the process was stopped): the guest may not have been able to
        // beat, so it is not silent yet.
        assert_eq!(
            live.verdict(t0 + 10_000 * MS, &[305 * MS, 67 * MS]),
            Verdict::Alive(40 * MS)
        );
        assert_eq!(
            live.verdict(t0 + 10_100 * MS, &[400 * MS, 107 * MS]),
            Verdict::Silent(100 * MS)
        );
        // An operator's pause: not judged at all meanwhile.
        live.hold();
        assert_eq!(
            live.verdict(t0 + 50_000 * MS, &[400 * MS, 107 * MS]),
            Verdict::NotJudged
        );
        live.release();
        assert_eq!(
            live.breakdown(t0 + 50_000 * MS, &[400 * MS, 107 * MS]),
            Some(Silence {
                since_seen: 50_000 * MS,
                ran: 100 * MS
            })
        );
    }

    #[test]
    fn silence_counts_from_when_a_beat_was_seen() {
        let t0 = Instant::now();
        let mut live = Liveness::new(Some(100 * MS));
        // Stamped at t0, seen later, when the vCPU had run 30 ms: it counts from the look.
        live.beat(t0, t0 + 30 * MS, &[30 * MS]);
        assert_eq!(
            live.verdict(t0 + 100 * MS, &[100 * MS]),
            Verdict::Alive(30 * MS)
        );
    }

    #[test]
    fn a_late_look_at_an_old_heartbeat_changes_nothing() {
        let t0 = Instant::now();
        let mut live = Liveness::new(Some(100 * MS));
        live.beat(t0 + 80 * MS, t0 + 80 * MS, &[80 * MS]);
        // The loop looks again and sees the same (or an older) stamp: the base stays.
        live.beat(t0 + 80 * MS, t0 + 80 * MS, &[90 * MS]);
        live.beat(t0, t0, &[90 * MS]);
        assert_eq!(
            live.verdict(t0 + 150 * MS, &[140 * MS]),
            Verdict::Alive(40 * MS)
        );
    }

    #[test]
    fn after_a_failover_silence_counts_from_the_resume() {
        let t0 = Instant::now();
        let mut live = Liveness::new(Some(100 * MS));
        live.beat(t0, t0, &[400 * MS]);
        // The new machine's vCPU has run less in all than the old one's had.
        live.restarted(t0 + 500 * MS, &[MS]);
        assert_eq!(
            live.verdict(t0 + 550 * MS, &[51 * MS]),
            Verdict::Alive(50 * MS)
        );
        let mut fresh = Liveness::new(Some(100 * MS));
        fresh.restarted(t0, &[]);
        assert_eq!(
            fresh.verdict(t0 + 500 * MS, &[500 * MS]),
            Verdict::NotJudged
        );
        live.reset();
        assert_eq!(
            live.verdict(t0 + 5000 * MS, &[5000 * MS]),
            Verdict::NotJudged
        );
    }

    #[test]
    fn a_timeout_below_what_the_host_judges_is_warned_of() {
        let host = HostJudgment {
            steal_unit: 10 * MS,
            tick: 4 * MS,
        };
        assert_eq!(host.floor(), 18 * MS);
        let warning = host.warning("web", 10 * MS).unwrap();
        assert!(
            warning.contains("guest web: heartbeat_timeout_ms = 10"),
            "{warning}"
        );
        assert_eq!(host.warning("web", 18 * MS), None);
        assert_eq!(host.warning("web", Duration::ZERO), None, "no watch");
    }

    /// The freeze this guards against: the deadline fired, a heartbeat handled in the same
    /// loop turn re-armed it, and then reading the timer blocked the loop for good.
    #[test]
    fn reading_a_deadline_rearmed_after_it_fired_never_blocks() {
        let mut deadline = Deadline::new().unwrap();
        deadline.arm(MS).unwrap();
        std::thread::sleep(20 * MS);
        // Fired (the loop was told so); a heartbeat re-arms it before the read.
        deadline.arm(Duration::from_secs(3600)).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let count = deadline.acknowledge();
            let _ = done.send(count);
        });
        let count = finished
            .recv_timeout(Duration::from_secs(5))
            .expect("reading the re-armed deadline blocked");
        assert_eq!(count, 0, "the re-arm discarded the expiry");
    }
}
