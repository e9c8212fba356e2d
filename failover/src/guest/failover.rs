//! A failure of the active, from detection to the guest running again (or ending): the
//! policy decides, the resume mode takes over, and the recovery of the failed machine as the
//! next standby runs in the background until its result comes back. Also restarts of
//! unprotected guests, and the results of background jobs. Runs on the guest's thread.

use std::time::Instant;

use vmm_core::{GuestRam, VmError};

use super::mode::{NotArmed, TakeOverFailed};
use super::policy::{self, Cover, Decision, Readiness};
use super::{
    us, Change, Failure, Finished, Guest, GuestEnd, Machine, Protection, Run, Running, State,
};
use crate::background::JobId;
use crate::control::protocol::{FailureOutcome, Phase};

/// What becomes of a machine once the loop no longer watches it.
pub(crate) enum AfterRewire {
    /// It is recovered as the next standby (or let go, with `rearm = false`).
    Recover,
    /// It is captured and dumped, then torn down.
    Dump,
}

impl Guest {
    /// Takes the running guest's machines out of its state for a transition, which puts
    /// them (or others) back.
    pub(super) fn take_running(&mut self) -> Option<Running> {
        let placeholder = State::Ended(GuestEnd::Down {
            reason: "in transition".into(),
        });
        match std::mem::replace(&mut self.state, placeholder) {
            State::Running(running) => Some(running),
            ended => {
                self.state = ended;
                None
            }
        }
    }

    /// Handles a failure of the active: fail over, restart, or bring the guest down.
    pub fn on_failure(&mut self, failure: Failure) -> Change {
        let State::Running(running) = &self.state else {
            return Change::None;
        };
        let detected = Instant::now();
        let witness = running.active.vm.witness();
        if self.link.as_ref().is_some_and(|l| l.armed()) {
            // A standby process is ready: the same policy as for a standby in this process,
            // and the crash-loop guard counts the handover (the standby carries the count on).
            let cover = Cover::Standby {
                resume: crate::config::ResumeFrom::Checkpoint,
                ready: Readiness::Ready,
            };
            let decision = policy::decide(&failure, cover, &mut self.guard, detected);
            self.tell_link_failovers();
            return match decision {
                Decision::FailOver => self.hand_over(failure, witness),
                Decision::Restart => self.restart(failure.to_string()),
                Decision::Down(reason) => {
                    self.begin_failure_record(&failure);
                    lifecycle!(error, "failure-detected", guest = %self.ctx.config.name, phase = "detect", failure = %failure, reason = failure.reason(), armed = true, "active failed");
                    self.bring_down(reason)
                }
            };
        }
        let cover = match &self.mode {
            None => Cover::Unprotected(self.ctx.config.on_failure),
            Some(mode) => Cover::Standby {
                resume: mode.resume(),
                ready: match &running.protection {
                    Protection::Armed(_) => Readiness::Ready,
                    Protection::Syncing(_) => Readiness::Syncing,
                    Protection::Unprotected => Readiness::Missing,
                },
            },
        };
        let span = tracing::info_span!("failure", guest = %self.ctx.config.name, n = self.ctx.record.failures + 1);
        let _entered = span.enter();
        self.begin_failure_record(&failure);
        let number = self.ctx.record.failures;
        self.ctx.suspicions.suspect(number, &failure, witness);
        lifecycle!(
            error,
            "failure-detected",
            guest = %self.ctx.config.name,
            phase = "detect",
            failure = %failure,
            reason = failure.reason(),
            armed = matches!(cover, Cover::Standby { ready: Readiness::Ready, .. }),
            "active failed"
        );
        let decision = policy::decide(&failure, cover, &mut self.guard, detected);
        self.tell_link_failovers();
        match decision {
            Decision::FailOver => self.fail_over(failure, detected),
            Decision::Restart => self.restart(failure.to_string()),
            Decision::Down(reason) => self.bring_down(reason),
        }
    }

    /// Tells a standby process what the crash-loop guard counts now, for the standbys that
    /// attach, or are handed the guest, from now on.
    fn tell_link_failovers(&mut self) {
        if let Some(link) = self.link.as_mut() {
            link.note_failovers(self.guard.recent_unix_ms(Instant::now()));
        }
    }

    fn fail_over(&mut self, failure: Failure, detected: Instant) -> Change {
        let Some(Running {
            mut active,
            protection,
            ..
        }) = self.take_running()
        else {
            return Change::None;
        };
        let (Protection::Armed(standby), Some(mode)) = (protection, self.mode.as_mut()) else {
            // The policy fails over only an armed pair.
            self.state = State::Running(Running {
                active,
                run: Run::Running,
                protection: Protection::Unprotected,
            });
            return self.bring_down(format!("{failure} while failover was not armed"));
        };
        match mode.take_over(&mut self.ctx, &failure, &mut active, standby) {
            Ok(new_active) => {
                let resumed = self.ctx.resumed_at.take().unwrap_or_else(Instant::now);
                let downtime = resumed.saturating_duration_since(detected);
                let record = &mut self.ctx.record;
                record.failovers += 1;
                record.last_downtime = Some(downtime);
                *record
                    .failovers_by_reason
                    .entry(failure.reason())
                    .or_default() += 1;
                if let Some(last) = record.last_failure.as_mut() {
                    last.outcome = FailureOutcome::FailedOver;
                    last.downtime_us = Some(us(downtime));
                }
                // The guest carries on: if it was judged by its heartbeats, it still is, from
                // the moment it resumed.
                let ran = new_active.vm.run_time();
                self.ctx.liveness.restarted(Instant::now(), &ran);
                let from = crate::control::protocol::wire_name(&mode.resume());
                lifecycle!(
                    info,
                    "failed-over",
                    guest = %self.ctx.config.name,
                    from = from.as_str(),
                    active = new_active.id,
                    downtime_us = us(downtime),
                    failovers = self.ctx.record.failovers,
                    heartbeat_seq = mode.checkpoint().and_then(|c| c.committed_heartbeat()),
                    "the guest runs on the former standby"
                );
                self.failed = Some((active, AfterRewire::Recover));
                self.ctx.recovering_since = Some(Instant::now());
                self.state = State::Running(Running {
                    active: new_active,
                    run: Run::Running,
                    protection: Protection::Unprotected,
                });
                Change::NewActive
            }
            Err(TakeOverFailed { reason, standby }) => {
                self.retired.push(standby);
                self.state = State::Running(Running {
                    active,
                    run: Run::Running,
                    protection: Protection::Unprotected,
                });
                self.bring_down(format!("{failure}; {reason}"))
            }
        }
    }

    /// The active failed while a standby process follows it: the active is fenced, and the
    /// standby process told to take the guest over from its last whole epoch. The guest ends
    /// here; the failed machine is dumped as for any failure.
    fn hand_over(&mut self, failure: Failure, witness: vmm_core::witness::Witness) -> Change {
        let span = tracing::info_span!("failure", guest = %self.ctx.config.name, n = self.ctx.record.failures + 1);
        let _entered = span.enter();
        self.begin_failure_record(&failure);
        let number = self.ctx.record.failures;
        self.ctx.suspicions.suspect(number, &failure, witness);
        lifecycle!(error, "failure-detected", guest = %self.ctx.config.name, phase = "detect", failure = %failure, reason = failure.reason(), armed = true, "active failed");
        let Some(Running { active, .. }) = self.take_running() else {
            return Change::None;
        };
        let t = Instant::now();
        // Fenced before the standby process hears of it: the failed machine never runs
        // again, and its console goes nowhere from this instant.
        active.vm.fence();
        drop(active.vm.set_serial_sink(Box::new(std::io::sink())));
        self.ctx.phase(Phase::Fence, t, "failed machine fenced");
        let handed = self
            .link
            .as_mut()
            .map(|link| link.hand_over(&failure.to_string()));
        self.failed = Some((active, AfterRewire::Dump));
        match handed {
            Some(Ok(pid)) => {
                let record = &mut self.ctx.record;
                record.failovers += 1;
                *record
                    .failovers_by_reason
                    .entry(failure.reason())
                    .or_default() += 1;
                if let Some(last) = record.last_failure.as_mut() {
                    last.outcome = FailureOutcome::FailedOver;
                }
                self.ended(GuestEnd::HandedOver { pid })
            }
            Some(Err(why)) => self.ended(GuestEnd::Down {
                reason: format!("{failure}; the standby process could not be told: {why}"),
            }),
            None => self.ended(GuestEnd::Down {
                reason: format!("{failure}; no standby process"),
            }),
        }
    }

    /// Fences the active, has it dumped in the background, and ends the guest.
    fn bring_down(&mut self, reason: String) -> Change {
        let Some(Running {
            active, protection, ..
        }) = self.take_running()
        else {
            return Change::None;
        };
        let t = Instant::now();
        active.vm.fence();
        // Its console (the operator's, for a guest whose output is not held) is closed now.
        drop(active.vm.set_serial_sink(Box::new(std::io::sink())));
        self.ctx.phase(Phase::Fence, t, "failed machine fenced");
        if let Protection::Armed(standby) = protection {
            self.retired.push(standby);
        }
        self.failed = Some((active, AfterRewire::Dump));
        self.ended(GuestEnd::Down { reason })
    }

    /// Boots an unprotected guest again on fresh RAM; the failed machine is dumped.
    fn restart(&mut self, reason: String) -> Change {
        let Some(Running { active, .. }) = self.take_running() else {
            return Change::None;
        };
        active.vm.fence();
        let console = active.vm.set_serial_sink(Box::new(std::io::sink()));
        lifecycle!(warn, "restarting", guest = %self.ctx.config.name, %reason, "restarting the guest");
        let (config, builder) = (&self.ctx.config, self.ctx.builder());
        let revoked = active.vm.revoke_devices(self.ctx.pause_patience());
        self.failed = Some((active, AfterRewire::Dump));
        let restarted = revoked.and_then(|()| {
            let ram = GuestRam::new(config.memory_mib << 20)?;
            let vm = builder.create(ram, console)?;
            vm.boot(&config.boot_source())?;
            vm.grant_devices()?;
            vm.resume()?;
            Ok(vm)
        });
        match restarted {
            Ok(vm) => {
                let id = self.ctx.next_machine_id();
                self.ctx.record.restarts += 1;
                if let Some(last) = self.ctx.record.last_failure.as_mut() {
                    last.outcome = FailureOutcome::Restarted;
                }
                self.ctx.liveness.reset();
                self.state = State::Running(Running {
                    active: Machine::new(vm, id),
                    run: Run::Running,
                    protection: Protection::Unprotected,
                });
                Change::NewActive
            }
            Err(err) => self.ended(GuestEnd::Down {
                reason: format!("{reason}; restart failed: {err}"),
            }),
        }
    }

    /// Acts on one finished background job.
    pub(crate) fn on_finished(&mut self, id: JobId, finished: Finished) -> Change {
        match finished {
            Finished::Standby(result) => self.standby_finished(id, result),
            Finished::Trap { machine, trap } => {
                self.trap_finished(machine, trap);
                Change::None
            }
            Finished::Captured(captured) => {
                match (&mut self.state, self.mode.as_mut()) {
                    (State::Running(running), Some(mode)) if matches!(running.protection, Protection::Syncing(s) if s.job == id) =>
                    {
                        running.protection =
                            mode.captured(&mut self.ctx, *captured, &running.active);
                    }
                    _ => captured.retire(),
                }
                Change::None
            }
            Finished::Batch(copied) => {
                let (State::Running(running), Some(link)) = (&self.state, self.link.as_mut())
                else {
                    return Change::None;
                };
                let tick = link.batch_copied(&self.ctx, id, copied, &running.active.vm);
                self.on_link_tick(tick)
            }
            Finished::Dump(done) => {
                self.ctx.dump_finished(done);
                if let Some(mode) = self.mode.as_mut() {
                    mode.dump_written(id);
                }
                Change::None
            }
        }
    }

    fn standby_finished(&mut self, id: JobId, result: Result<super::Prepared, VmError>) -> Change {
        let (State::Running(running), Some(mode)) = (&mut self.state, self.mode.as_mut()) else {
            if let Ok(prepared) = result {
                crate::background::retire(prepared.machine.vm);
            }
            return Change::None;
        };
        if !matches!(running.protection, Protection::Syncing(s) if s.job == id) {
            if let Ok(prepared) = result {
                crate::background::retire(prepared.machine.vm);
            }
            return Change::None;
        }
        let armed = match result {
            Ok(prepared) => mode.arm(&mut self.ctx, &running.active, prepared),
            Err(why) => Err(NotArmed::Failed(why.into())),
        };
        let recovery = self.ctx.recovering_since.take();
        match armed {
            Ok(standby) => {
                running.protection = Protection::Armed(standby);
                if let Some(since) = recovery {
                    self.ctx.phase(
                        Phase::Recover,
                        since,
                        "recovery done: the new standby is ready",
                    );
                }
                self.announce_if_armed();
                Change::None
            }
            Err(NotArmed::ActiveStopped(events, machine)) => {
                running.protection = Protection::Unprotected;
                crate::background::retire(machine.vm);
                self.deferred.extend(events);
                self.on_vcpu_events()
            }
            Err(NotArmed::Unresponsive(vcpu, machine)) => {
                running.protection = Protection::Unprotected;
                crate::background::retire(machine.vm);
                self.on_failure(Failure::Unresponsive { vcpu })
            }
            Err(NotArmed::Failed(why)) => {
                running.protection = Protection::Unprotected;
                lifecycle!(warn, "unprotected", guest = %self.ctx.config.name, %why, "the standby could not be made ready; the guest runs unprotected");
                if let Some(since) = recovery {
                    self.ctx.phase(
                        Phase::Recover,
                        since,
                        "recovery failed: the guest runs unprotected",
                    );
                }
                Change::None
            }
        }
    }

    fn trap_finished(
        &mut self,
        machine: u32,
        trap: Result<
            std::sync::Arc<vmm_core::memory::trap::WriteTrap>,
            vmm_core::memory::trap::TrapError,
        >,
    ) {
        let trap = match trap {
            Ok(trap) => trap,
            Err(why) => {
                tracing::warn!(guest = %self.ctx.config.name, %why, "no write trap: crash dumps will be written before the standby resumes");
                return;
            }
        };
        if let State::Running(Running {
            protection: Protection::Armed(standby),
            ..
        }) = &mut self.state
        {
            if standby.id == machine {
                standby.trap = Some(trap);
                return;
            }
        }
        // The machine has taken over (or gone) meanwhile: a trap under a running guest is
        // lifted at once.
        super::dumps::release_in_background(trap);
    }
}
