//! What an operator can ask of one guest: its status and role, pause and resume, a snapshot
//! to files, and a stop (its metrics are in `metrics`, a planned switchover in
//! `switchover`). Requests that change the guest's state are mirrored to its standby side
//! where they concern it: a paused guest takes no checkpoints and is not judged by
//! heartbeats. Runs on the guest's thread, between the events it watches. Errors are
//! [`GuestError`]s; the control layer turns them into replies.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vmm_core::{Snapshot, SnapshotError, VmError};

use super::mode::HandoverError;
use super::{us, Change, Guest, GuestEnd, Protection, Run, Running, State, Syncing};
use crate::control::protocol::{
    CheckpointStatus, DiskStatus, GuestStatus, HeartbeatStatus, MachineState, MachineStatus,
    NetStatus, Role, RunState, SnapshotDone,
};

/// A request a guest could not carry out.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest has ended.
    #[error("guest {guest} has ended ({how})")]
    Ended {
        /// The guest.
        guest: String,
        /// How it ended.
        how: String,
    },
    /// The request does not fit the guest's state now.
    #[error("guest {guest} cannot {what}: {why}")]
    NotNow {
        /// The guest.
        guest: String,
        /// What was asked.
        what: &'static str,
        /// Why not.
        why: String,
    },
    /// A machine operation failed.
    #[error("guest {guest}: {step}: {source}")]
    Machine {
        /// The guest.
        guest: String,
        /// What was being done.
        step: &'static str,
        /// What failed.
        source: VmError,
    },
    /// The snapshot's directory could not be created.
    #[error("guest {guest}: create {}: {source}", .path.display())]
    SnapshotDir {
        /// The guest.
        guest: String,
        /// The directory.
        path: PathBuf,
        /// Why not.
        source: std::io::Error,
    },
    /// The snapshot could not be written.
    #[error("guest {guest}: write the snapshot: {source}")]
    Snapshot {
        /// The guest.
        guest: String,
        /// Why not.
        source: SnapshotError,
    },
    /// A planned switchover to the standby machine failed.
    #[error("guest {guest}: switch over: {source}")]
    SwitchOver {
        /// The guest.
        guest: String,
        /// Why.
        source: HandoverError,
    },
    /// The standby process could not be told to take over (as its link reports it).
    #[error("guest {guest}: switch over: {why}")]
    StandbyProcess {
        /// The guest.
        guest: String,
        /// What the link to the standby process reported.
        why: String,
    },
}

impl GuestError {
    /// Whether the request was refused as it stands (rather than tried and failed).
    pub fn is_refusal(&self) -> bool {
        matches!(self, GuestError::Ended { .. } | GuestError::NotNow { .. })
    }
}

impl Guest {
    pub(super) fn not_now(&self, what: &'static str, why: impl Into<String>) -> GuestError {
        GuestError::NotNow {
            guest: self.ctx.config.name.clone(),
            what,
            why: why.into(),
        }
    }

    fn machine_error(&self, step: &'static str) -> impl FnOnce(VmError) -> GuestError {
        let guest = self.ctx.config.name.clone();
        move |source| GuestError::Machine {
            guest,
            step,
            source,
        }
    }

    pub(super) fn running(&mut self) -> Result<&mut Running, GuestError> {
        match &mut self.state {
            State::Running(running) => Ok(running),
            State::Ended(end) => Err(GuestError::Ended {
                guest: self.ctx.config.name.clone(),
                how: describe_end(end),
            }),
        }
    }

    /// What this process is for the guest, for `role`: its active.
    pub fn role(&self) -> crate::control::protocol::GuestRole {
        let armed = self.armed();
        crate::control::protocol::GuestRole {
            guest: self.ctx.config.name.clone(),
            role: crate::control::protocol::Role::Active,
            state: if armed { "protected" } else { "running" }.into(),
            epoch: self.standby.report().process.and_then(|p| p.epoch),
            score: crate::control::protocol::GuestRole::SCORE_ACTIVE,
        }
    }

    /// The guest as `status` reports it.
    pub fn status(&self) -> GuestStatus {
        let (state, machines) = match &self.state {
            State::Ended(_) => (RunState::Ended, Vec::new()),
            State::Running(running) => {
                let (state, machine) = match running.run {
                    Run::Running => (RunState::Running, MachineState::Running),
                    Run::Paused => (RunState::Paused, MachineState::Paused),
                };
                let mut machines = vec![MachineStatus {
                    id: running.active.id,
                    role: Role::Active,
                    state: machine,
                }];
                match &running.protection {
                    Protection::Armed(standby) => machines.push(MachineStatus {
                        id: standby.id,
                        role: Role::Standby,
                        state: MachineState::Ready,
                    }),
                    // Listed once it has a number (a failed machine is captured first).
                    Protection::Syncing(Syncing {
                        machine: Some(id), ..
                    }) => machines.push(MachineStatus {
                        id: *id,
                        role: Role::Standby,
                        state: MachineState::Syncing,
                    }),
                    // A standby process's own machine is not this process's.
                    Protection::Syncing(_)
                    | Protection::Unprotected
                    | Protection::ArmedElsewhere => {}
                }
                (state, machines)
            }
        };
        let record = &self.ctx.record;
        let now = Instant::now();
        let standby = self.standby.report();
        GuestStatus {
            name: self.ctx.config.name.clone(),
            state,
            end: self.end().map(describe_end),
            resume: standby.resume,
            armed: self.armed(),
            failovers: record.failovers,
            switchovers: record.switchovers,
            restarts: record.restarts,
            machines,
            heartbeat: HeartbeatStatus {
                timeout_ms: self.ctx.liveness.timeout().map(|t| t.as_millis() as u64),
                age_ms: self
                    .ctx
                    .liveness
                    .silence(now, &self.active_run_time())
                    .map(|silence| silence.as_millis() as u64),
                count: self.active().map_or(0, |vm| vm.heartbeats().count),
            },
            last_failure: record.last_failure.clone(),
            checkpoint: standby.epochs.map(|(interval, stats)| CheckpointStatus {
                interval_ms: interval.as_millis() as u64,
                epochs: stats.epochs,
                last_pause_us: us(stats.last_pause),
                max_pause_us: us(stats.max_pause),
                mean_pause_us: us(stats
                    .total_pause
                    .checked_div(stats.epochs.max(1) as u32)
                    .unwrap_or_default()),
                last_dirty_pages: stats.last_dirty_pages,
                total_dirty_pages: stats.total_dirty_pages,
            }),
            ram_resident_bytes: self.active().map_or(0, |vm| vm.ram().resident_bytes()),
            standby_copy_resident_bytes: standby.copy_resident_bytes,
            disks: self.disk_status(),
            nets: self.net_status(),
            standby_process: standby.process,
        }
    }

    /// The guest's machines now, as (the machine's process-wide id, its number).
    fn machine_ids(&self) -> Vec<(u64, u32)> {
        match &self.state {
            State::Running(running) => {
                let mut machines = vec![(running.active.vm.id(), running.active.id)];
                if let Protection::Armed(standby) = &running.protection {
                    machines.push((standby.vm.id(), standby.id));
                }
                machines
            }
            State::Ended(_) => Vec::new(),
        }
    }

    /// Every NIC's holder and counters.
    fn net_status(&self) -> Vec<NetStatus> {
        let machines = self.machine_ids();
        self.ctx
            .nics
            .0
            .iter()
            .map(|n| {
                let ownership = n.nic.ownership();
                NetStatus {
                    tap: n.config.tap.clone(),
                    mac: vmm_core::devices::net::format_mac(&n.config.mac),
                    holder: ownership.owner.and_then(|owner| {
                        machines.iter().find(|(vm, _)| *vm == owner).map(|m| m.1)
                    }),
                    grants: ownership.grants,
                    revocations: ownership.revocations,
                    refused: ownership.refused,
                    frames: n.nic.counters(),
                    epochs: n.epoch.as_ref().map(|e| e.stats()),
                }
            })
            .collect()
    }

    /// Every disk's holder and counters.
    fn disk_status(&self) -> Vec<DiskStatus> {
        let machines = self.machine_ids();
        self.ctx
            .disks
            .0
            .iter()
            .map(|d| {
                let ownership = d.disk.ownership();
                let io = d.disk.counters();
                DiskStatus {
                    path: d.config.path.display().to_string(),
                    read_only: d.config.read_only,
                    holder: ownership.owner.and_then(|owner| {
                        machines.iter().find(|(vm, _)| *vm == owner).map(|m| m.1)
                    }),
                    grants: ownership.grants,
                    revocations: ownership.revocations,
                    refused: ownership.refused,
                    reads: io.reads,
                    writes: io.writes,
                    flushes: io.flushes,
                    read_bytes: io.read_bytes,
                    written_bytes: io.written_bytes,
                    errors: io.errors,
                    epochs: d.epoch.as_ref().map(|e| e.stats()),
                }
            })
            .collect()
    }
}

impl Guest {
    /// Pauses the guest: its vCPUs stop, its standby side takes no checkpoints and its
    /// heartbeats are not awaited until [`Guest::resume`].
    pub fn pause(&mut self) -> Result<(), GuestError> {
        let fail = self.machine_error("pause");
        let running = self.running()?;
        if running.run == Run::Paused {
            return Err(self.not_now("pause", "it is already paused"));
        }
        running.active.vm.pause().map_err(fail)?;
        running.run = Run::Paused;
        self.ctx.liveness.hold();
        lifecycle!(info, "paused", guest = %self.ctx.config.name, "guest paused on request");
        Ok(())
    }

    /// Lets a paused guest run again; it is judged by heartbeats again from now.
    pub fn resume(&mut self) -> Result<(), GuestError> {
        let fail = self.machine_error("resume");
        let running = self.running()?;
        if running.run == Run::Running {
            return Err(self.not_now("resume", "it is not paused"));
        }
        running.active.vm.resume().map_err(fail)?;
        running.run = Run::Running;
        self.ctx.liveness.release();
        lifecycle!(info, "resumed", guest = %self.ctx.config.name, "guest resumed on request");
        Ok(())
    }

    /// Ends the guest on an operator's request.
    pub fn stop(&mut self) -> Change {
        self.finish(GuestEnd::Stopped)
    }

    /// Writes a consistent snapshot to the new directory `path`, in the format of
    /// [`vmm_core::snapshot`]: the state file (every vCPU, the VM, the devices, and the
    /// machine's shape) and the memory file (guest RAM, sparse). The guest is paused while it
    /// is written.
    pub fn snapshot(&mut self, path: &Path) -> Result<SnapshotDone, GuestError> {
        let guest = self.ctx.config.name.clone();
        let (pause_err, resume_err) = (self.machine_error("pause"), self.machine_error("resume"));
        let running = self.running()?;
        std::fs::create_dir(path).map_err(|source| GuestError::SnapshotDir {
            guest: guest.clone(),
            path: path.to_owned(),
            source,
        })?;
        let begun = Instant::now();
        let was_paused = running.run == Run::Paused;
        if !was_paused {
            running.active.vm.pause().map_err(pause_err)?;
        }
        let written = Snapshot::write(&running.active.vm, path);
        let resumed = if was_paused {
            Ok(())
        } else {
            running.active.vm.resume()
        };
        let paused = begun.elapsed();

        let memory_bytes_written = written
            .map_err(|source| GuestError::Snapshot { guest, source })?
            .memory_bytes;
        resumed.map_err(resume_err)?;
        lifecycle!(
            info,
            "snapshot-written",
            guest = %self.ctx.config.name,
            path = %path.display(),
            paused_us = us(paused),
            memory_bytes_written,
            "snapshot written"
        );
        Ok(SnapshotDone {
            path: path.to_owned(),
            memory_bytes_written,
            paused_us: us(paused),
        })
    }
}

/// How an ended guest ended, in words.
pub fn describe_end(end: &GuestEnd) -> String {
    match end {
        GuestEnd::Exited { code } => format!("exited with code {code}"),
        GuestEnd::Reset => "reset by the guest".into(),
        GuestEnd::PoweredOff => "powered off by the guest".into(),
        GuestEnd::Stopped => "stopped on request".into(),
        GuestEnd::HandedOver { pid } => format!("failed here, runs on in standby process {pid}"),
        GuestEnd::Down { reason } => format!("down: {reason}"),
    }
}
