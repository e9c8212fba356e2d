//! What an operator can ask of one guest: its status and metrics, a planned switchover, pause
//! and resume, a snapshot to files, and a stop. Requests that change the guest's state are
//! mirrored to its standby side where they concern it: a paused guest takes no checkpoints
//! and is not judged by heartbeats; a switchover leaves the pair armed. Runs on the guest's
//! thread, between the events it watches. Errors are [`GuestError`]s; the control layer turns
//! them into replies.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vmm_core::{Snapshot, SnapshotError, VmError};

use super::mode::{Handover, HandoverError};
use super::{us, Change, Guest, GuestEnd, Protection, Run, Running, State, Syncing};
use crate::control::protocol::{
    CheckpointStatus, DiskStatus, GuestStatus, HeartbeatStatus, MachineState, MachineStatus,
    NetStatus, Role, RunState, SnapshotDone, SwitchoverDone,
};
use crate::metrics::MetricsPage;

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
    fn not_now(&self, what: &'static str, why: impl Into<String>) -> GuestError {
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

    fn running(&mut self) -> Result<&mut Running, GuestError> {
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
            epoch: self.link.as_ref().and_then(|l| l.status().epoch),
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
                    Protection::Syncing(_) | Protection::Unprotected => {}
                }
                (state, machines)
            }
        };
        let record = &self.ctx.record;
        let now = Instant::now();
        GuestStatus {
            name: self.ctx.config.name.clone(),
            state,
            end: self.end().map(describe_end),
            resume: self.mode.as_ref().map(|m| m.resume()).or(self
                .link
                .as_ref()
                .map(|_| crate::config::ResumeFrom::Checkpoint)),
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
            checkpoint: self
                .mode
                .as_ref()
                .and_then(|m| m.checkpoint())
                .map(|c| (c.interval(), c.stats()))
                .or(self.link.as_ref().map(|l| (l.interval(), l.stats())))
                .map(|(interval, stats)| CheckpointStatus {
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
            standby_copy_resident_bytes: self.standby_copy_resident_bytes(),
            disks: self.disk_status(),
            nets: self.net_status(),
            standby_process: self.link.as_ref().map(|l| l.status()),
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

    /// Host memory the checkpointed standby's copy of guest RAM takes.
    fn standby_copy_resident_bytes(&self) -> Option<u64> {
        let checkpoint = self.mode.as_ref().and_then(|m| m.checkpoint())?;
        Some(checkpoint.standby_ram().resident_bytes())
    }

    /// This guest's samples of every metric family, in [`crate::metrics::FAMILIES`] order.
    pub fn metrics(&self) -> Vec<String> {
        crate::metrics::FAMILIES
            .iter()
            .map(|(family, _, _)| {
                let mut page = MetricsPage::default();
                self.write_metrics(family, &mut page);
                page.finish()
            })
            .collect()
    }

    /// Adds this guest's samples of metric `family` (one of [`crate::metrics::FAMILIES`]).
    fn write_metrics(&self, family: &str, page: &mut MetricsPage) {
        let name = &self.ctx.config.name;
        let guest: &[(&str, &str)] = &[("guest", name)];
        let record = &self.ctx.record;
        // Epoch counters: in-process checkpoints, or the journal of a standby process.
        let checkpoint = self
            .mode
            .as_ref()
            .and_then(|m| m.checkpoint())
            .map(|c| c.stats())
            .or(self.link.as_ref().map(|l| l.stats()));
        match family {
            "understudy_guest_up" => page.sample(family, guest, self.end().is_none() as u8 as f64),
            "understudy_guest_armed" => page.sample(family, guest, self.armed() as u8 as f64),
            "understudy_failovers_total" => {
                for (reason, count) in &record.failovers_by_reason {
                    page.sample(
                        family,
                        &[("guest", name), ("reason", reason)],
                        *count as f64,
                    );
                }
            }
            "understudy_failures_total" => page.sample(family, guest, record.failures as f64),
            "understudy_switchovers_total" => page.sample(family, guest, record.switchovers as f64),
            "understudy_restarts_total" => page.sample(family, guest, record.restarts as f64),
            "understudy_last_failover_downtime_seconds" => {
                if let Some(downtime) = record.last_downtime {
                    page.sample(family, guest, downtime.as_secs_f64());
                }
            }
            "understudy_heartbeat_age_seconds" => {
                let ran = self.active_run_time();
                if let Some(silence) = self.ctx.liveness.silence(Instant::now(), &ran) {
                    page.sample(family, guest, silence.as_secs_f64());
                }
            }
            "understudy_heartbeats_total" => page.sample(
                family,
                guest,
                self.active().map_or(0, |vm| vm.heartbeats().count) as f64,
            ),
            "understudy_checkpoint_epochs_total" => {
                if let Some(stats) = checkpoint {
                    page.sample(family, guest, stats.epochs as f64);
                }
            }
            "understudy_checkpoint_pause_seconds" => {
                if let Some(stats) = checkpoint {
                    page.histogram(family, guest, &stats.pauses);
                }
            }
            "understudy_checkpoint_dirty_pages" => {
                if let Some(stats) = checkpoint {
                    page.histogram(family, guest, &stats.dirty_pages);
                }
            }
            "understudy_ram_resident_bytes" => {
                if let Some(vm) = self.active() {
                    let bytes = vm.ram().resident_bytes() as f64;
                    page.sample(family, &[("guest", name), ("copy", "active")], bytes);
                }
                if let Some(bytes) = self.standby_copy_resident_bytes() {
                    let labels = [("guest", name.as_str()), ("copy", "standby")];
                    page.sample(family, &labels, bytes as f64);
                }
            }
            "understudy_dumps_written_total" => {
                page.sample(family, guest, record.dumps_written as f64)
            }
            "understudy_dumps_removed_total" => {
                page.sample(family, guest, record.dumps_removed as f64)
            }
            "understudy_unknown_accesses_total" => {
                let mut total = record.retired_unknown;
                if let State::Running(running) = &self.state {
                    total += running.active.vm.unknown_accesses();
                    if let Protection::Armed(standby) = &running.protection {
                        total += standby.vm.unknown_accesses();
                    }
                }
                for (space, access, count) in [
                    ("port", "read", total.port_reads),
                    ("port", "write", total.port_writes),
                    ("mmio", "read", total.mmio_reads),
                    ("mmio", "write", total.mmio_writes),
                ] {
                    page.sample(
                        family,
                        &[("guest", name), ("space", space), ("access", access)],
                        count as f64,
                    );
                }
            }
            "understudy_disk_requests_total" => {
                device_samples(page, family, name, "disk", &self.ctx.disks.0, |d| {
                    let io = d.disk.counters();
                    vec![
                        (vec![("op", "read")], io.reads),
                        (vec![("op", "write")], io.writes),
                        (vec![("op", "flush")], io.flushes),
                        (vec![("op", "error")], io.errors),
                    ]
                })
            }
            "understudy_disk_bytes_total" => {
                device_samples(page, family, name, "disk", &self.ctx.disks.0, |d| {
                    let io = d.disk.counters();
                    vec![
                        (vec![("op", "read")], io.read_bytes),
                        (vec![("op", "write")], io.written_bytes),
                    ]
                })
            }
            "understudy_disk_ownership_changes_total" => {
                device_samples(page, family, name, "disk", &self.ctx.disks.0, |d| {
                    ownership_samples(d.disk.ownership())
                })
            }
            "understudy_disk_refused_requests_total" => {
                device_samples(page, family, name, "disk", &self.ctx.disks.0, |d| {
                    vec![(vec![], d.disk.ownership().refused)]
                })
            }
            "understudy_disk_epoch_commits_total" => {
                device_samples(page, family, name, "disk", &self.ctx.disks.0, |d| {
                    d.epoch
                        .iter()
                        .map(|e| (vec![], e.stats().commits))
                        .collect()
                })
            }
            "understudy_disk_discarded_sectors_total" => {
                device_samples(page, family, name, "disk", &self.ctx.disks.0, |d| {
                    d.epoch
                        .iter()
                        .map(|e| (vec![], e.stats().discarded_sectors))
                        .collect()
                })
            }
            "understudy_net_frames_total" => {
                device_samples(page, family, name, "nic", &self.ctx.nics.0, |n| {
                    let c = n.nic.counters();
                    vec![
                        (
                            vec![("direction", "rx"), ("outcome", "delivered")],
                            c.rx_frames,
                        ),
                        (
                            vec![("direction", "rx"), ("outcome", "dropped")],
                            c.rx_dropped,
                        ),
                        (vec![("direction", "tx"), ("outcome", "sent")], c.tx_frames),
                        (
                            vec![("direction", "tx"), ("outcome", "dropped")],
                            c.tx_dropped,
                        ),
                    ]
                })
            }
            "understudy_net_bytes_total" => {
                device_samples(page, family, name, "nic", &self.ctx.nics.0, |n| {
                    let c = n.nic.counters();
                    vec![
                        (vec![("direction", "rx")], c.rx_bytes),
                        (vec![("direction", "tx")], c.tx_bytes),
                    ]
                })
            }
            "understudy_net_ownership_changes_total" => {
                device_samples(page, family, name, "nic", &self.ctx.nics.0, |n| {
                    ownership_samples(n.nic.ownership())
                })
            }
            "understudy_net_held_frames" => {
                device_samples(page, family, name, "nic", &self.ctx.nics.0, |n| {
                    n.epoch
                        .iter()
                        .map(|e| (vec![], e.stats().held_frames))
                        .collect()
                })
            }
            "understudy_net_discarded_frames_total" => {
                device_samples(page, family, name, "nic", &self.ctx.nics.0, |n| {
                    n.epoch
                        .iter()
                        .map(|e| (vec![], e.stats().discarded_frames))
                        .collect()
                })
            }
            _ => {}
        }
    }

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

    /// A planned switchover: the standby takes over the running guest with nothing lost,
    /// and the former active becomes the standby, so the pair stays armed.
    pub fn switchover(&mut self) -> (Result<SwitchoverDone, GuestError>, Change) {
        if self.link.is_some() {
            return self.switch_to_process();
        }
        let hot_standby = self.mode.is_some();
        let running = match self.running() {
            Ok(running) => running,
            Err(err) => return (Err(err), Change::None),
        };
        let why_not = if !hot_standby {
            Some("it has no standby")
        } else if running.run == Run::Paused {
            Some("it is paused")
        } else if !matches!(running.protection, Protection::Armed(_)) {
            Some("its standby is not ready")
        } else if running.active.machine_check {
            Some("a machine check is pending")
        } else {
            None
        };
        if let Some(why) = why_not {
            return (Err(self.not_now("switch over", why)), Change::None);
        }
        let (State::Running(running), Some(mode)) = (&mut self.state, self.mode.as_mut()) else {
            return (
                Err(self.not_now("switch over", "it has no standby")),
                Change::None,
            );
        };
        let Protection::Armed(standby) = &mut running.protection else {
            return (
                Err(self.not_now("switch over", "its standby is not ready")),
                Change::None,
            );
        };
        let begun = Instant::now();
        match mode.switch_over(&mut self.ctx, &mut running.active, standby) {
            Ok(()) => {}
            Err(Handover::Refused(source)) => {
                let err = GuestError::SwitchOver {
                    guest: self.ctx.config.name.clone(),
                    source,
                };
                return (Err(err), Change::None);
            }
            Err(Handover::StandbyLost(source)) => {
                self.standby_lost();
                let err = GuestError::SwitchOver {
                    guest: self.ctx.config.name.clone(),
                    source,
                };
                return (Err(err), Change::None);
            }
            Err(Handover::Unresponsive(vcpu)) => {
                let err = self.not_now("switch over", format!("vCPU {vcpu} did not answer"));
                let change = self.on_failure(super::Failure::Unresponsive { vcpu });
                return (Err(err), change);
            }
            Err(Handover::ActiveStopped(events)) => {
                self.deferred.extend(events);
                let err = self.not_now("switch over", "the active stopped on its own meanwhile");
                let change = self.on_vcpu_events();
                return (Err(err), change);
            }
        }
        let paused = begun.elapsed();
        let State::Running(running) = &mut self.state else {
            return (Err(self.not_now("switch over", "it ended")), Change::None);
        };
        if let Protection::Armed(standby) = &mut running.protection {
            std::mem::swap(&mut running.active, standby);
        }
        self.ctx.record.switchovers += 1;
        let ran = running.active.vm.run_time();
        self.ctx.liveness.restarted(Instant::now(), &ran);
        let standby_id = match &running.protection {
            Protection::Armed(standby) => standby.id,
            _ => 0,
        };
        let done = SwitchoverDone {
            active: running.active.id,
            standby: standby_id,
            paused_us: us(paused),
            process: None,
        };
        lifecycle!(
            info,
            "switched-over",
            guest = %self.ctx.config.name,
            active = done.active,
            standby = done.standby,
            paused_us = done.paused_us,
            "planned switchover: the standby is now the active"
        );
        (Ok(done), Change::NewActive)
    }
}

impl Guest {
    /// A planned switchover to the guest's standby process: a last epoch with the active
    /// kept paused, then the active fenced and the standby told to take over from that
    /// epoch, nothing lost or repeated. The guest ends here as handed over; this process
    /// can then go (to be upgraded, say) while the guest runs on in the other.
    fn switch_to_process(&mut self) -> (Result<SwitchoverDone, GuestError>, Change) {
        let armed = self.link.as_ref().is_some_and(|l| l.armed());
        let running = match self.running() {
            Ok(running) => running,
            Err(err) => return (Err(err), Change::None),
        };
        let why_not = if running.run == Run::Paused {
            Some("it is paused")
        } else if !armed {
            Some("its standby process has not caught up")
        } else if running.active.machine_check {
            Some("a machine check is pending")
        } else {
            None
        };
        if let Some(why) = why_not {
            return (Err(self.not_now("switch over", why)), Change::None);
        }
        let begun = Instant::now();
        let (State::Running(running), Some(link)) = (&self.state, self.link.as_mut()) else {
            return (Err(self.not_now("switch over", "it ended")), Change::None);
        };
        match link.last_epoch(&self.ctx, &running.active.vm) {
            Ok(true) => {}
            Ok(false) => {
                let why = "the last epoch could not be written; the guest runs on here";
                return (Err(self.not_now("switch over", why)), Change::None);
            }
            Err(tick) => {
                let err = self.not_now("switch over", "the active stopped or did not answer");
                let change = self.on_link_tick(tick);
                return (Err(err), change);
            }
        }
        let Some(Running { active, .. }) = self.take_running() else {
            return (Err(self.not_now("switch over", "it ended")), Change::None);
        };
        active.vm.fence();
        drop(active.vm.set_serial_sink(Box::new(std::io::sink())));
        let handed = self
            .link
            .as_mut()
            .map(|link| link.hand_over("planned switchover"));
        let paused_us = us(begun.elapsed());
        self.retired.push(active);
        match handed {
            Some(Ok(pid)) => {
                self.ctx.record.switchovers += 1;
                lifecycle!(info, "switched-over", guest = %self.ctx.config.name, standby_pid = pid, paused_us, "planned switchover: the standby process runs the guest now");
                let done = SwitchoverDone {
                    active: 1,
                    standby: 0,
                    paused_us,
                    process: Some(pid),
                };
                (Ok(done), self.ended(GuestEnd::HandedOver { pid }))
            }
            Some(Err(why)) => {
                let err = GuestError::StandbyProcess {
                    guest: self.ctx.config.name.clone(),
                    why: why.clone(),
                };
                let change = self.ended(GuestEnd::Down {
                    reason: format!("the standby process could not be told to take over: {why}"),
                });
                (Err(err), change)
            }
            None => (
                Err(self.not_now("switch over", "it has no standby")),
                Change::None,
            ),
        }
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

/// Extra labels of one sample, and its value.
type DeviceSample = (Vec<(&'static str, &'static str)>, u64);

/// Samples of `family` for each of a guest's disks or NICs (`items`), labelled with the guest
/// and `kind` = the device's index, plus what `samples` gives for each.
fn device_samples<T>(
    page: &mut MetricsPage,
    family: &str,
    guest: &str,
    kind: &str,
    items: &[T],
    samples: impl Fn(&T) -> Vec<DeviceSample>,
) {
    for (index, item) in items.iter().enumerate() {
        let index = index.to_string();
        for (extra, value) in samples(item) {
            let mut labels = vec![("guest", guest), (kind, index.as_str())];
            labels.extend(extra);
            page.sample(family, &labels, value as f64);
        }
    }
}

/// Grants and revocations of a disk or NIC, as `change` samples.
fn ownership_samples(ownership: vmm_core::Ownership) -> Vec<DeviceSample> {
    vec![
        (vec![("change", "grant")], ownership.grants),
        (vec![("change", "revocation")], ownership.revocations),
    ]
}
