//! A failure of the active, from detection to the guest running again (or ending): the
//! policy decides from the cover the standby gives, whatever its placement; the standby
//! takes over (here, or in the standby's process, where the guest is handed over); and the
//! recovery of the failed machine as the next standby runs in the background until its
//! result comes back. Also restarts of unprotected guests, and the results of background
//! jobs. Runs on the guest's thread.

use std::time::Instant;

use vmm_core::{GuestRam, VmError};

use super::mode::{NotArmed, TakeOverFailed};
use super::policy::{self, Cover, Decision, Readiness};
use super::standby::FailedOver;
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

    /// Handles a failure of the active: fail over, restart, or bring the guest down, as the
    /// policy decides from the cover the standby gives now, whatever its placement.
    pub fn on_failure(&mut self, failure: Failure) -> Change {
        let State::Running(running) = &self.state else {
            return Change::None;
        };
        let detected = Instant::now();
        let witness = running.active.vm.witness();
        let cover = self
            .standby
            .cover(&running.protection, self.ctx.config.on_failure);
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
        // A standby that takes the guest over carries on counting from here.
        self.standby
            .note_failovers(self.guard.recent_unix_ms(Instant::now()));
        match decision {
            Decision::FailOver => self.fail_over(failure, detected),
            Decision::Restart => self.restart(failure.to_string()),
            Decision::Down(reason) => self.bring_down(reason),
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
        if !protection.is_armed() {
            // The policy fails over only an armed pair.
            self.state = State::Running(Running {
                active,
                run: Run::Running,
                protection,
            });
            return self.bring_down(format!("{failure} while failover was not armed"));
        }
        match self
            .standby
            .fail_over(&mut self.ctx, &failure, &mut active, protection)
        {
            Ok(FailedOver::Here {
                active: new_active,
                heartbeat_seq,
            }) => {
                let resumed = self.ctx.resumed_at.take().unwrap_or_else(Instant::now);
                let downtime = resumed.saturating_duration_since(detected);
                self.count_failover(&failure, Some(downtime));
                // The guest carries on: if it was judged by its heartbeats, it still is, from
                // the moment it resumed.
                let ran = new_active.vm.run_time();
                self.ctx.liveness.restarted(Instant::now(), &ran);
                let from = self
                    .standby
                    .report()
                    .resume
                    .map(|r| crate::control::protocol::wire_name(&r))
                    .unwrap_or_default();
                lifecycle!(
                    info,
                    "failed-over",
                    guest = %self.ctx.config.name,
                    from = from.as_str(),
                    active = new_active.id,
                    downtime_us = us(downtime),
                    failovers = self.ctx.record.failovers,
                    heartbeat_seq,
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
            Ok(FailedOver::HandedOver { pid }) => {
                // The guest ends here; the failed machine is dumped as for any failure.
                self.failed = Some((active, AfterRewire::Dump));
                self.count_failover(&failure, None);
                self.ended(GuestEnd::HandedOver { pid })
            }
            Err(TakeOverFailed {
                reason,
                standby,
                fenced,
            }) => {
                self.retired.extend(standby);
                let reason = format!("{failure}; {reason}");
                if fenced {
                    self.failed = Some((active, AfterRewire::Dump));
                    return self.ended(GuestEnd::Down { reason });
                }
                self.state = State::Running(Running {
                    active,
                    run: Run::Running,
                    protection: Protection::Unprotected,
                });
                self.bring_down(reason)
            }
        }
    }

    /// Counts a failover of `failure` in the guest's record, and its downtime where this
    /// process saw the guest resume.
    fn count_failover(&mut self, failure: &Failure, downtime: Option<std::time::Duration>) {
        let record = &mut self.ctx.record;
        record.failovers += 1;
        if downtime.is_some() {
            record.last_downtime = downtime;
        }
        *record
            .failovers_by_reason
            .entry(failure.reason())
            .or_default() += 1;
        if let Some(last) = record.last_failure.as_mut() {
            last.outcome = FailureOutcome::FailedOver;
            if let Some(downtime) = downtime {
                last.downtime_us = Some(us(downtime));
            }
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
                match &mut self.state {
                    State::Running(running) if matches!(running.protection, Protection::Syncing(s) if s.job == id) =>
                    {
                        running.protection =
                            self.standby
                                .captured(&mut self.ctx, *captured, &running.active);
                    }
                    _ => captured.retire(),
                }
                Change::None
            }
            Finished::Batch(copied) => {
                let State::Running(running) = &mut self.state else {
                    return Change::None;
                };
                let tick = self
                    .standby
                    .batch_copied(&mut self.ctx, id, copied, running);
                self.on_tick(tick)
            }
            Finished::Dump(done) => {
                self.ctx.dump_finished(done);
                self.standby.dump_written(id);
                Change::None
            }
        }
    }

    fn standby_finished(&mut self, id: JobId, result: Result<super::Prepared, VmError>) -> Change {
        let State::Running(running) = &mut self.state else {
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
            Ok(prepared) => self.standby.arm(&mut self.ctx, &running.active, prepared),
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
