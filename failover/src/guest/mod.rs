//! One supervised guest: its machines and what protects it, as a state machine.
//!
//! A guest is `State::Running` or `State::Ended`. A running guest has an active machine
//! and a `Protection`: `Unprotected` (no standby), `Syncing` (a standby is being built or
//! brought level in the background) or `Armed` (the standby is ready: a failure of the
//! active fails over). Each state owns the machines that exist in it, so a standby that is
//! not ready cannot be failed over to, by construction. The two `resume` settings are two
//! implementations of `mode::ResumeMode`: over the same RAM (`shared`) or over a
//! checkpointed copy (`checkpointed`).
//!
//! Runs on the guest's own thread (see `supervisor::guest_loop`), the only one that changes
//! the guest's roles. Anything slow (syncing a standby, writing a dump, tearing a machine
//! down) runs in the background ([`crate::background`]) and comes back as a `Finished`.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use vmm_core::{GuestRam, VcpuStop, Vm, VmError, VmEvent};

use crate::background::Jobs;
use crate::config::GuestConfig;
use crate::console::console_sink;
use crate::control::protocol::{FailureOutcome, FailureRecord};
use crate::disk::GuestDisks;
use crate::liveness::Liveness;
use crate::net::GuestNics;

mod checkpointed;
mod control;
mod dumps;
mod failover;
mod failure;
mod mode;
pub mod policy;
mod process;
mod shared;
mod state;
mod suspicion;

pub use control::{describe_end, GuestError};
use failover::AfterRewire;
pub use failure::{Change, Failure, GuestEnd, StartError};
use mode::ResumeMode;
pub use mode::{HandoverError, StartStandbyError};
use policy::CrashLoopGuard;
pub(crate) use state::State;
pub(crate) use state::{
    Captured, Context, DumpDone, DumpError, Finished, Machine, Prepared, Protection, Record, Run,
    Running, SyncReport, Syncing,
};

/// The setting `resume` for a guest over `ram` whose console is `console`, and the sink the
/// active machine's console writes to.
fn resume_mode(
    resume: crate::config::ResumeFrom,
    ctx: &mut Context,
    ram: &GuestRam,
    console: vmm_core::SerialSink,
) -> Result<(Box<dyn ResumeMode>, vmm_core::SerialSink), VmError> {
    Ok(match resume {
        crate::config::ResumeFrom::FailedState => {
            (Box::new(shared::SharedRam::new(ram.clone())), console)
        }
        crate::config::ResumeFrom::Checkpoint => {
            let (mode, active_console) = checkpointed::Checkpointed::new(ctx, ram, console)?;
            (Box::new(mode), active_console)
        }
    })
}

pub(crate) fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// How a guest's first active machine gets its guest.
#[derive(Debug)]
pub enum StartFrom {
    /// Its kernel is booted.
    Boot,
    /// A standby process took it over: its machine, built over the RAM it kept, and the
    /// state of the last epoch it holds.
    TakenOver(Box<TakenOver>),
    /// It loads this snapshot (read and checked against the guest already) and carries on
    /// where it was saved.
    Snapshot(Box<vmm_core::Snapshot>),
}

/// What a standby process hands the guest it takes over.
pub struct TakenOver {
    /// The standby's machine, over the RAM the journal kept level with the active's.
    pub vm: Vm,
    /// The state of the last whole epoch.
    pub state: vmm_core::VmSnapshot,
    /// That epoch's number.
    pub epoch: u64,
    /// The process that ran the guest before.
    pub from_pid: u32,
    /// When that process was seen gone (its connection closed, its pidfd said so, or it said
    /// `take_over`).
    pub detected: Instant,
    /// How long after that the guest's active lock came free.
    pub lock_wait: Duration,
    /// The line the guest was printing at that epoch, which no process has released.
    pub unfinished_line: Vec<u8>,
    /// The guest's active lock, taken before the guest is resumed here.
    pub lock: Option<crate::link::ActiveLock>,
    /// When the guest failed over or restarted recently (this takeover included), in
    /// milliseconds since the Unix epoch: the crash-loop guard carries on from these.
    pub failovers: Vec<u64>,
    /// The guest's disks, over the images the old active passed on (the machine has them
    /// already): used instead of opening the images again.
    pub disks: Option<GuestDisks>,
}

impl std::fmt::Debug for TakenOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakenOver").finish_non_exhaustive()
    }
}

/// One supervised guest.
pub struct Guest {
    ctx: Context,
    state: State,
    /// How a hot-standby guest's standby resumes it; `None` for a guest without one, or
    /// whose standby is a process of its own.
    mode: Option<Box<dyn ResumeMode>>,
    /// The link to the guest's standby process, for `process = "separate"`.
    link: Option<process::StandbyLink>,
    /// vCPU events an epoch or a switchover drained before they could be acted on.
    deferred: VecDeque<VmEvent>,
    /// Machines out of service, kept until the loop has stopped watching their eventfds
    /// (closing them first would leave stale registrations behind).
    retired: Vec<Machine>,
    /// The machine that just failed, waiting for the loop to stop watching it before it is
    /// recovered as the next standby or dumped.
    failed: Option<(Machine, AfterRewire)>,
    guard: CrashLoopGuard,
}

impl Guest {
    /// Starts the guest over its opened `disks` and `nics`: for a hot-standby guest the
    /// standby machine first, then the active, which boots the kernel or loads a snapshot as
    /// `from` says; the standby is then made ready in the background and failover armed once
    /// it is, the same way after either. `stdout_shared` says whether other guests write to
    /// standard output too.
    pub fn start(
        config: &GuestConfig,
        disks: GuestDisks,
        nics: GuestNics,
        stdout_shared: bool,
        mut from: StartFrom,
    ) -> Result<Guest, StartError> {
        let machine_err = |step| {
            let guest = config.name.clone();
            move |source| StartError::Machine {
                guest,
                step,
                source,
            }
        };
        let begun = Instant::now();
        let jobs = Jobs::new().map_err(|source| StartError::Background {
            guest: config.name.clone(),
            source,
        })?;
        let window = |s| Duration::from_secs(s);
        let carried = match &from {
            StartFrom::TakenOver(taken) => taken.failovers.clone(),
            _ => Vec::new(),
        };
        let guard = match &config.standby {
            Some(standby) => CrashLoopGuard::with_recent(
                standby.max_failovers,
                window(standby.failover_window_s),
                &carried,
                Instant::now(),
            ),
            None => CrashLoopGuard::new(config.max_restarts, window(config.restart_window_s)),
        };
        let mut ctx = Context {
            config: config.clone(),
            disks,
            nics,
            jobs,
            record: Record::default(),
            liveness: Liveness::new(config.standby.as_ref().and_then(|s| {
                (s.heartbeat_timeout_ms > 0).then(|| Duration::from_millis(s.heartbeat_timeout_ms))
            })),
            suspicions: Default::default(),
            recovering_since: None,
            last_sync: None,
            resumed_at: None,
            next_dump: crate::dump::next_dump_number(&config.dump_dir, &config.name),
            machines_built: 0,
        };
        let ram = GuestRam::new(config.memory_mib << 20)
            .map_err(|e| machine_err("allocate RAM")(VmError::Memory(e)))?;
        let console = console_sink(config, stdout_shared)?;
        let separate = config
            .standby
            .as_ref()
            .is_some_and(|s| s.placement.is_own_process());
        let mut link = None;
        let (mut mode, standby, active_console): (Option<Box<dyn ResumeMode>>, _, _) = match config
            .standby
            .as_ref()
            .map(|s| s.resume)
        {
            Some(_) if separate => {
                let (unfinished, mut lock) = match &mut from {
                    StartFrom::TakenOver(taken) => {
                        (taken.unfinished_line.clone(), taken.lock.take())
                    }
                    _ => (Vec::new(), None),
                };
                let taken_over = lock.is_some();
                match process::StandbyLink::new(&ctx, console, unfinished, &mut lock) {
                    Ok((made, active_console)) => {
                        link = Some(made);
                        (None, None, active_console)
                    }
                    // A guest this process took over runs here whatever else fails: it
                    // runs unprotected, holding its lock until the process ends.
                    Err(unattached) if taken_over => {
                        let why = unattached.why;
                        lifecycle!(error, "standby-link-failed", guest = %config.name, %why, "no standby process can attach to the guest taken over: it runs on unprotected");
                        std::mem::forget(lock);
                        (None, None, unattached.console)
                    }
                    Err(unattached) => {
                        return Err(StartError::Attach {
                            guest: config.name.clone(),
                            why: unattached.why,
                        })
                    }
                }
            }
            Some(resume) => {
                let (mut mode, active_console) = resume_mode(resume, &mut ctx, &ram, console)
                    .map_err(machine_err("allocate standby RAM"))?;
                // The standby is built first, but the active is machine 1.
                ctx.machines_built = 1;
                let standby = mode
                    .build_first_standby(&mut ctx, &ram)
                    .map_err(machine_err("create standby machine"))?;
                (Some(mode), Some(standby), active_console)
            }
            None => (None, None, console),
        };
        let active = match &from {
            StartFrom::TakenOver(taken) => {
                taken.vm.set_serial_sink(active_console);
                None
            }
            _ => Some(
                ctx.builder()
                    .create(ram, active_console)
                    .map_err(machine_err("create machine"))?,
            ),
        };
        // The snapshot's directory and the bytes of RAM loaded from it, when restored.
        // For a guest taken over: its epoch, the process it came from, when that was seen gone.
        let mut vm_taken = None;
        let (active, restored) = match (active, from) {
            (Some(active), StartFrom::Boot) => {
                active
                    .boot(&config.boot_source())
                    .map_err(machine_err("boot"))?;
                (active, None)
            }
            (_, StartFrom::TakenOver(taken)) => {
                vm_taken = Some((taken.epoch, taken.from_pid, taken.detected, taken.lock_wait));
                taken
                    .vm
                    .restore(&taken.state)
                    .map_err(machine_err("load the taken-over state"))?;
                (taken.vm, None)
            }
            (Some(active), StartFrom::Snapshot(snapshot)) => {
                let loaded =
                    snapshot
                        .restore_into(&active)
                        .map_err(|source| StartError::Restore {
                            guest: config.name.clone(),
                            source,
                        })?;
                let dir = snapshot.dir();
                let restored = (
                    std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()),
                    loaded,
                );
                (active, Some(restored))
            }
            // Only a taken-over guest comes without a machine built here.
            (None, _) => {
                return Err(StartError::Attach {
                    guest: config.name.clone(),
                    why: "no machine to start".into(),
                })
            }
        };
        active
            .grant_devices()
            .map_err(machine_err("give the disks and NICs"))?;
        active.resume().map_err(machine_err("start"))?;
        let active = Machine::new(active, 1);
        ctx.machines_built = ctx.machines_built.max(1);
        match (restored, vm_taken) {
            (_, Some((epoch, from_pid, detected, lock_wait))) => {
                let resumed_unix_us = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                lifecycle!(
                    warn,
                    "taken-over",
                    guest = %config.name,
                    pid = std::process::id(),
                    from_pid,
                    epoch,
                    detect_to_resume_us = us(detected.elapsed()),
                    lock_wait_us = us(lock_wait),
                    resumed_unix_us,
                    "this standby process runs the guest from the last whole epoch"
                )
            }
            (Some((path, memory_bytes_loaded)), None) => lifecycle!(
                info,
                "guest-restored",
                guest = %config.name,
                path = %path.display(),
                memory_mib = config.memory_mib,
                vcpus = config.vcpus,
                standby = standby.is_some(),
                memory_bytes_loaded,
                setup_us = us(begun.elapsed()),
                "guest restored from a snapshot"
            ),
            (None, None) => lifecycle!(
                info,
                "guest-started",
                guest = %config.name,
                memory_mib = config.memory_mib,
                vcpus = config.vcpus,
                standby = standby.is_some() || link.is_some(),
                setup_us = us(begun.elapsed()),
                "guest started"
            ),
        }
        let protection = match (mode.as_mut(), standby) {
            (Some(mode), Some(standby)) => mode.sync(&mut ctx, &active, standby),
            _ => Protection::Unprotected,
        };
        if let Some(link) = link.as_mut() {
            link.note_failovers(guard.recent_unix_ms(Instant::now()));
        }
        let mut guest = Guest {
            ctx,
            state: State::Running(Running {
                active,
                run: Run::Running,
                protection,
            }),
            mode,
            link,
            deferred: VecDeque::new(),
            retired: Vec::new(),
            failed: None,
            guard,
        };
        guest.announce_if_armed();
        Ok(guest)
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.ctx.config.name
    }

    /// The machine currently running the guest, while it runs.
    pub fn active(&self) -> Option<&Vm> {
        match &self.state {
            State::Running(running) => Some(&running.active.vm),
            State::Ended(_) => None,
        }
    }

    /// How the guest ended, once it has.
    pub fn end(&self) -> Option<&GuestEnd> {
        match &self.state {
            State::Ended(end) => Some(end),
            State::Running(_) => None,
        }
    }

    /// Failovers so far.
    pub fn failovers(&self) -> u32 {
        self.ctx.record.failovers
    }

    /// Whether a failure of the active would now fail over.
    pub fn armed(&self) -> bool {
        if let Some(link) = &self.link {
            return self.end().is_none() && link.armed();
        }
        matches!(
            &self.state,
            State::Running(Running {
                protection: Protection::Armed(_),
                ..
            })
        )
    }

    /// Whether an operator has the guest paused.
    pub fn paused(&self) -> bool {
        matches!(
            &self.state,
            State::Running(Running {
                run: Run::Paused,
                ..
            })
        )
    }

    /// The epoch length, for a checkpointed guest.
    pub fn checkpoint_interval(&self) -> Option<Duration> {
        self.mode
            .as_ref()
            .and_then(|m| m.epoch_interval())
            .or_else(|| self.link.as_ref().map(|l| l.interval()))
    }

    /// The descriptors of the link to a standby process: its listener, and its connection
    /// while a standby is attached.
    pub fn link_fds(&self) -> Option<(std::os::fd::RawFd, Option<std::os::fd::RawFd>)> {
        self.link.as_ref().map(|l| l.fds())
    }

    /// The loop no longer watches the connections of standby processes that went away.
    pub fn link_forget_closed(&mut self) {
        if let Some(link) = self.link.as_mut() {
            link.forget_closed();
        }
    }

    /// A standby process is connecting.
    pub fn on_link_listener(&mut self) {
        if let Some(link) = self.link.as_mut() {
            link.on_listener();
        }
    }

    /// The attached standby process said something, or went away.
    pub fn on_link_connection(&mut self) {
        let active = match &self.state {
            State::Running(running) => Some(&*running.active.vm),
            State::Ended(_) => None,
        };
        if let Some(link) = self.link.as_mut() {
            link.on_connection(&mut self.ctx, active);
        }
    }

    /// What a journal epoch (or the batch's seal) asks of the guest.
    fn on_link_tick(&mut self, tick: process::LinkTick) -> Change {
        match tick {
            process::LinkTick::Done => Change::None,
            process::LinkTick::ActiveStopped(events) => {
                self.deferred.extend(events);
                self.on_vcpu_events()
            }
            process::LinkTick::Unresponsive(vcpu) => {
                self.on_failure(Failure::Unresponsive { vcpu })
            }
        }
    }

    /// Background job results arrive on this eventfd.
    pub fn jobs_ready(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.ctx.jobs.wake()
    }

    /// Background jobs still running whose effect matters after the guest's end (dumps).
    pub fn jobs_awaited(&self) -> usize {
        self.ctx.jobs.awaited()
    }

    /// Looks at the active's heartbeats (the time its vCPU took the last one) and returns
    /// how long until the guest could first be judged silent, if it is judged at all.
    pub fn heartbeat_deadline(&mut self) -> Option<Duration> {
        self.ctx.suspicions.look(&self.ctx.config.name);
        let ran = self.observe_heartbeat();
        match self.ctx.liveness.verdict(Instant::now(), &ran) {
            crate::liveness::Verdict::Alive(left) => Some(left),
            crate::liveness::Verdict::Silent(_) => Some(Duration::ZERO),
            crate::liveness::Verdict::NotJudged => None,
        }
    }

    /// The heartbeat failure, if the active has been silent too long.
    pub fn heartbeat_overdue(&mut self) -> Option<Failure> {
        let ran = self.observe_heartbeat();
        let now = Instant::now();
        match self.ctx.liveness.verdict(now, &ran) {
            crate::liveness::Verdict::Silent(silent) => Some(Failure::HeartbeatTimeout {
                silent_ms: silent.as_millis() as u64,
                since_seen_ms: self
                    .ctx
                    .liveness
                    .breakdown(now, &ran)
                    .map_or(0, |s| s.since_seen.as_millis() as u64),
            }),
            _ => None,
        }
    }

    /// Takes in the active's last heartbeat; returns its vCPUs' run times now.
    fn observe_heartbeat(&mut self) -> Vec<Duration> {
        let State::Running(running) = &self.state else {
            return Vec::new();
        };
        if self.ctx.liveness.timeout().is_none() {
            return Vec::new();
        }
        let ran = running.active.vm.run_time();
        if let Some(at) = running.active.vm.last_heartbeat_at() {
            self.ctx.liveness.beat(at, Instant::now(), &ran);
        }
        ran
    }

    /// The active's vCPUs' run times, for the heartbeat watch.
    pub(crate) fn active_run_time(&self) -> Vec<Duration> {
        match &self.state {
            State::Running(running) if self.ctx.liveness.timeout().is_some() => {
                running.active.vm.run_time()
            }
            _ => Vec::new(),
        }
    }

    /// Reads the active's vCPU events and acts on them.
    pub fn on_vcpu_events(&mut self) -> Change {
        let mut change = Change::None;
        loop {
            let event = match self.deferred.pop_front() {
                Some(event) => Some(event),
                None => self.active().and_then(|vm| vm.next_event(Duration::ZERO)),
            };
            let Some(event) = event else {
                return change;
            };
            if change != Change::None {
                // A second vCPU stopping after the guest ended, or a stale event of the
                // machine that was just replaced.
                continue;
            }
            change = match event.stop {
                VcpuStop::GuestExit { code } => self.finish(GuestEnd::Exited { code }),
                VcpuStop::ResetRequested => self.finish(GuestEnd::Reset),
                VcpuStop::PoweredOff => self.finish(GuestEnd::PoweredOff),
                stop => {
                    let machine_check = match &self.state {
                        State::Running(running) => running.active.machine_check,
                        State::Ended(_) => false,
                    };
                    self.on_failure(Failure::Vcpu {
                        vcpu: event.vcpu,
                        stop,
                        machine_check,
                    })
                }
            };
        }
    }

    /// Ends the guest cleanly: standby first, then the active.
    pub(crate) fn finish(&mut self, end: GuestEnd) -> Change {
        let State::Running(running) = std::mem::replace(&mut self.state, State::Ended(end.clone()))
        else {
            return Change::None;
        };
        let Running {
            active, protection, ..
        } = running;
        if let Protection::Armed(standby) = protection {
            self.retired.push(standby);
        }
        let _ = active.vm.pause();
        active.vm.flush_serial();
        self.retired.push(active);
        self.ended(end)
    }

    /// The guest has ended (its machines are out of its state already).
    pub(crate) fn ended(&mut self, end: GuestEnd) -> Change {
        // After the active has stopped writing: what it printed in its last, uncommitted
        // epoch is released, since no failover can repeat it any more.
        if let Some(mode) = self.mode.as_mut() {
            mode.release_output();
        }
        if let Some(link) = self.link.as_mut() {
            // A standby process that follows hears how the guest ended, after its last
            // output, and ends the same way.
            let told = serde_json::to_vec(&end).unwrap_or_default();
            link.guest_ended(&told);
        }
        let name = self.ctx.config.name.clone();
        match &end {
            GuestEnd::Exited { code } => {
                lifecycle!(info, "guest-exited", guest = %name, code, "guest exited")
            }
            GuestEnd::Reset => {
                lifecycle!(info, "guest-reset", guest = %name, "guest requested a reset; ending it")
            }
            GuestEnd::Stopped => {
                lifecycle!(info, "guest-stopped", guest = %name, "guest stopped on request")
            }
            GuestEnd::HandedOver { pid } => {
                lifecycle!(warn, "handed-over", guest = %name, standby_pid = pid, "the guest runs on in its standby process")
            }
            GuestEnd::PoweredOff => {
                lifecycle!(info, "guest-powered-off", guest = %name, "guest powered off")
            }
            GuestEnd::Down { reason } => {
                if let Some(record) = self.ctx.record.last_failure.as_mut() {
                    record.outcome = FailureOutcome::Down;
                }
                lifecycle!(error, "guest-down", guest = %name, %reason, "guest down")
            }
        }
        self.state = State::Ended(end);
        Change::Ended
    }

    /// Injects `kind` into the active machine. Returns a failure to handle at once (an
    /// injected panic), if any.
    pub fn inject(&mut self, kind: crate::fault::FaultKind) -> Option<Failure> {
        use crate::fault::FaultKind;
        let State::Running(running) = &mut self.state else {
            return None;
        };
        let name = &self.ctx.config.name;
        lifecycle!(warn, "fault-injected", guest = %name, fault = %kind, "injecting fault");
        let active = &mut running.active;
        match kind {
            FaultKind::Kill => active.vm.faults().kill_vcpu_threads(),
            FaultKind::Stall => active.vm.faults().stall_vcpu_threads(),
            FaultKind::Hang => active.vm.faults().drop_heartbeats(true),
            FaultKind::Mce => {
                active.machine_check = true;
                if let Err(err) = active.vm.faults().machine_check() {
                    active.machine_check = false;
                    tracing::error!(guest = %name, %err, "machine check injection failed");
                }
            }
            FaultKind::Panic => return Some(Failure::Panic),
        }
        None
    }

    /// An epoch tick: a checkpoint epoch when armed; while not armed, the held console output
    /// is let go (no failover can repeat it then).
    pub fn run_epoch(&mut self) -> Change {
        if let (State::Running(running), Some(link)) = (&self.state, self.link.as_mut()) {
            if running.run == Run::Paused || running.active.machine_check {
                return Change::None;
            }
            let tick = link.epoch(&self.ctx, &running.active.vm);
            return self.on_link_tick(tick);
        }
        let (State::Running(running), Some(mode)) = (&mut self.state, self.mode.as_mut()) else {
            return Change::None;
        };
        if running.run == Run::Paused || running.active.machine_check {
            // An injected machine check taints the state until its failure is handled.
            return Change::None;
        }
        let standby = match &running.protection {
            Protection::Armed(standby) => standby,
            _ => {
                mode.release_output();
                return Change::None;
            }
        };
        match mode.epoch(&mut self.ctx, &running.active, standby) {
            mode::EpochTick::Committed | mode::EpochTick::Nothing => Change::None,
            mode::EpochTick::ActiveStopped(events) => {
                self.deferred.extend(events);
                self.on_vcpu_events()
            }
            mode::EpochTick::Unresponsive(vcpu) => self.on_failure(Failure::Unresponsive { vcpu }),
            mode::EpochTick::StandbyLost(err) => {
                lifecycle!(warn, "checkpoint-failed", guest = %self.ctx.config.name, %err, "checkpoint failed: failover disarmed, rebuilding the standby");
                self.standby_lost();
                Change::None
            }
        }
    }

    /// The standby can no longer be trusted: it is torn down and a new one built.
    fn standby_lost(&mut self) {
        let (State::Running(running), Some(mode)) = (&mut self.state, self.mode.as_mut()) else {
            return;
        };
        let protection = std::mem::replace(&mut running.protection, Protection::Unprotected);
        if let Protection::Armed(standby) = protection {
            running.protection = mode.rebuild(&mut self.ctx, &running.active, standby);
        }
    }

    /// Console input for the guest (from standard input): given to the active and, for a
    /// checkpointed guest, kept for replay until the epoch that consumed it commits. Returns
    /// how many bytes the guest's UART took.
    pub fn console_input(&mut self, bytes: &[u8]) -> usize {
        let State::Running(running) = &self.state else {
            return 0;
        };
        let taken = running.active.vm.serial_input(bytes);
        if let Some(mode) = self.mode.as_mut() {
            mode.record_input(&bytes[..taken]);
        }
        taken
    }

    /// Announces that failover is armed, when it just became so.
    fn announce_if_armed(&mut self) {
        let State::Running(Running {
            active,
            protection: Protection::Armed(standby),
            ..
        }) = &self.state
        else {
            return;
        };
        let rearmed = std::mem::replace(&mut self.ctx.record.ever_armed, true);
        let sync = self.ctx.last_sync.take().unwrap_or_default();
        lifecycle!(
            info,
            "armed",
            guest = %self.ctx.config.name,
            rearmed,
            active = active.id,
            standby = standby.id,
            sync_us = us(sync.sync),
            active_paused_us = us(sync.active_paused),
            precopied_pages = sync.precopied_pages,
            precopy_rounds = sync.rounds,
            final_pages = sync.final_pages,
            "active running, standby ready: failover armed"
        );
    }

    /// Starts the record of a new failure.
    fn begin_failure_record(&mut self, failure: &Failure) {
        let record = &mut self.ctx.record;
        record.failures += 1;
        let detected_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        record.last_failure = Some(FailureRecord {
            number: record.failures,
            failure: failure.to_string(),
            reason: failure.reason().into(),
            outcome: FailureOutcome::InProgress,
            detected_unix_ms,
            phases: Vec::new(),
            downtime_us: None,
        });
    }

    /// Once the loop watches the current active (and no longer any machine replaced): tears
    /// retired machines down and starts recovering (or dumping) the one that failed.
    pub fn after_rewire(&mut self) {
        for machine in self.retired.drain(..) {
            self.ctx.record.retired_unknown += machine.vm.unknown_accesses();
            crate::background::retire(machine.vm);
        }
        let Some((failed, after)) = self.failed.take() else {
            return;
        };
        self.ctx.record.retired_unknown += failed.vm.unknown_accesses();
        let (State::Running(running), Some(mode), AfterRewire::Recover) =
            (&mut self.state, self.mode.as_mut(), &after)
        else {
            self.ctx.dump_in_background(failed);
            return;
        };
        let rearm = self.ctx.config.standby.as_ref().is_some_and(|s| s.rearm);
        running.protection = mode.recover(&mut self.ctx, failed, &running.active, rearm);
        if !rearm {
            self.ctx.recovering_since = None;
            lifecycle!(warn, "unprotected", guest = %self.ctx.config.name, "rearm = false: the guest runs on without a standby");
        }
    }

    /// Acts on the background jobs that finished.
    pub fn on_jobs(&mut self) -> Change {
        let mut change = Change::None;
        for (id, finished) in self.ctx.jobs.finished() {
            let this = self.on_finished(id, finished);
            if change == Change::None {
                change = this;
            }
        }
        change
    }
}
