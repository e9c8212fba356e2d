//! How a guest starts: its standby placed first (a machine of this process, or a link a
//! standby process attaches to), then its active machine, which boots the kernel, loads a
//! snapshot or carries on a guest a standby process took over. Runs on the thread that
//! starts the guest, before its loop runs.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use vmm_core::{GuestRam, Vm, VmError};

use super::followed::{OtherHost, OtherProcess};
use super::policy::CrashLoopGuard;
use super::same_process::SameProcess;
use super::standby::{NoStandby, Standby};
use super::{us, Context, Guest, Machine, Protection, Record, Run, Running, StartError, State};
use crate::background::Jobs;
use crate::config::GuestConfig;
use crate::console::console_sink;
use crate::disk::GuestDisks;
use crate::liveness::Liveness;
use crate::net::GuestNics;

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
    pub disks: Option<crate::disk::GuestDisks>,
    /// The guest's NICs, over the TAPs the old active passed on (the machine has them
    /// already): used instead of opening the TAPs again.
    pub nics: Option<crate::net::GuestNics>,
}

impl std::fmt::Debug for TakenOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakenOver").finish_non_exhaustive()
    }
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
        let machine_err = |step| StartError::machine(&config.name, step);
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
        let placed = place(config, &mut ctx, &ram, console, &mut from)?;
        let Placed {
            mut standby,
            first_standby,
            console: active_console,
        } = placed;
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
                standby = first_standby.is_some(),
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
                standby = config.standby.is_some(),
                setup_us = us(begun.elapsed()),
                "guest started"
            ),
        }
        let protection = match first_standby {
            Some(first) => standby.sync(&mut ctx, &active, first),
            None => Protection::Unprotected,
        };
        standby.note_failovers(guard.recent_unix_ms(Instant::now()));
        let mut guest = Guest {
            ctx,
            state: State::Running(Running {
                active,
                run: Run::Running,
                protection,
            }),
            standby,
            deferred: VecDeque::new(),
            retired: Vec::new(),
            failed: None,
            guard,
        };
        guest.announce_if_armed();
        Ok(guest)
    }
}

/// A guest's standby as placed before its active starts.
struct Placed {
    /// The standby side.
    standby: Box<dyn Standby>,
    /// For a standby in this process: its first machine, built before the active.
    first_standby: Option<Machine>,
    /// What the active's console writes to.
    console: vmm_core::SerialSink,
}

/// Places `config`'s standby, as its `standby` table says, for a guest over `ram` whose
/// console is `console`.
fn place(
    config: &GuestConfig,
    ctx: &mut Context,
    ram: &GuestRam,
    console: vmm_core::SerialSink,
    from: &mut StartFrom,
) -> Result<Placed, StartError> {
    let Some(standby) = &config.standby else {
        return Ok(Placed {
            standby: Box::new(NoStandby),
            first_standby: None,
            console,
        });
    };
    if !standby.placement.is_own_process() {
        let machine_err = |step| StartError::machine(&config.name, step);
        let (mut same, active_console) = SameProcess::new(standby.resume, ctx, ram, console)
            .map_err(machine_err("allocate standby RAM"))?;
        // The standby is built first, but the active is machine 1.
        ctx.machines_built = 1;
        let first = same
            .build_first_standby(ctx, ram)
            .map_err(machine_err("create standby machine"))?;
        return Ok(Placed {
            standby: Box::new(same),
            first_standby: Some(first),
            console: active_console,
        });
    }
    let (unfinished, mut lock) = match from {
        StartFrom::TakenOver(taken) => (taken.unfinished_line.clone(), taken.lock.take()),
        _ => (Vec::new(), None),
    };
    let taken_over = lock.is_some();
    let made = if standby.placement.remote().is_some() {
        OtherHost::new(ctx, console, unfinished, &mut lock)
            .map(|(s, c)| (Box::new(s) as Box<dyn Standby>, c))
    } else {
        OtherProcess::new(ctx, console, unfinished, &mut lock)
            .map(|(s, c)| (Box::new(s) as Box<dyn Standby>, c))
    };
    match made {
        Ok((standby, console)) => Ok(Placed {
            standby,
            first_standby: None,
            console,
        }),
        // A guest this process took over runs here whatever else fails: it runs
        // unprotected, holding its lock until the process ends.
        Err(unattached) if taken_over => {
            let why = unattached.why;
            lifecycle!(error, "standby-link-failed", guest = %config.name, %why, "no standby process can attach to the guest taken over: it runs on unprotected");
            std::mem::forget(lock);
            Ok(Placed {
                standby: Box::new(NoStandby),
                first_standby: None,
                console: unattached.console,
            })
        }
        Err(unattached) => Err(StartError::Attach {
            guest: config.name.clone(),
            why: unattached.why,
        }),
    }
}
