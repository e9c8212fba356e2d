//! `resume = "failed-state"`: the standby maps the guest's own RAM (a mapping of its own of
//! the same memfd) and takes over the failed active's exact registers and memory. Nothing is
//! copied, ever: a failover loads about a fifth of a millisecond of vCPU/VM/device state,
//! whatever the RAM size, and a new standby is a new machine over the same RAM.
//!
//! With crash dumps on, each standby's mapping carries a write trap, laid down in the
//! background while it stands by: after a takeover the dump is written from the shared RAM
//! while the guest already runs on, each page kept as it was before the guest's first write
//! to it. Where no trap is ready (just after a switchover, or on a host without
//! userfaultfd write-protect for shared memory) the dump is written before the resume.

use std::time::Instant;

use vmm_core::{GuestRam, VmError};

use super::dumps::{arm_trap, release_in_background};
use super::mode::{
    start_standby, Handover, HandoverError, NotArmed, ResumeMode, TakeOverError, TakeOverFailed,
};
use super::{Context, Failure, Finished, Machine, Prepared, Protection};
use crate::config::ResumeFrom;
use crate::control::protocol::Phase;

/// The standby side of a failed-state pair.
pub(crate) struct SharedRam {
    ram: GuestRam,
    /// The dump of the RAM being written, while it is.
    dump: Option<(crate::background::JobId, crate::dump::Preserver)>,
}

impl SharedRam {
    pub fn new(ram: GuestRam) -> Self {
        SharedRam { ram, dump: None }
    }

    /// Builds a standby over a new mapping of the guest's RAM in the background, with its
    /// trap laid down when dumps are on.
    fn build_in_background(&mut self, ctx: &mut Context) -> Protection {
        let (ram, builder, id) = (self.ram.clone(), ctx.builder(), ctx.next_machine_id());
        let with_trap = ctx.config.crash_dump;
        let job = ctx.jobs.spawn("standby", move || {
            let begun = Instant::now();
            let built = ram
                .view()
                .map_err(VmError::Memory)
                .and_then(|view| builder.create(view, Box::new(std::io::sink())));
            // Built at normal priority (its vCPU threads inherit it); the trap is bulk work.
            crate::background::lower_priority();
            Finished::Standby(
                built
                    .map(|vm| {
                        let mut machine = Machine::new(vm, id);
                        if with_trap {
                            match vmm_core::memory::trap::WriteTrap::arm(machine.vm.ram()) {
                                Ok(trap) => machine.trap = Some(std::sync::Arc::new(trap)),
                                Err(err) => tracing::warn!(%err, "no write trap: crash dumps will be written before the standby resumes"),
                            }
                        }
                        Prepared {
                            machine,
                            precopied: None,
                            took: begun.elapsed(),
                            replaced_ram: None,
                        }
                    }),
            )
        });
        Protection::syncing(job, Some(id))
    }
}

impl ResumeMode for SharedRam {
    fn resume(&self) -> ResumeFrom {
        ResumeFrom::FailedState
    }

    fn build_first_standby(
        &mut self,
        ctx: &mut Context,
        ram: &GuestRam,
    ) -> Result<Machine, VmError> {
        ctx.build_machine(ram.view()?)
    }

    fn sync(&mut self, ctx: &mut Context, _active: &Machine, standby: Machine) -> Protection {
        // Nothing to copy: the standby maps the guest's RAM and is handed the state at the
        // failover. Only its trap takes a while to lay down, and failover needs none.
        arm_trap(ctx, &standby);
        Protection::Armed(standby)
    }

    fn arm(
        &mut self,
        ctx: &mut Context,
        _active: &Machine,
        prepared: Prepared,
    ) -> Result<Machine, NotArmed> {
        ctx.last_sync = Some(super::SyncReport {
            sync: prepared.took,
            ..Default::default()
        });
        Ok(prepared.machine)
    }

    fn take_over(
        &mut self,
        ctx: &mut Context,
        _failure: &Failure,
        failed: &mut Machine,
        mut standby: Machine,
    ) -> Result<Machine, TakeOverFailed> {
        // Fence: every vCPU of the failed machine stops for good before anything else; its
        // state is captured once every live vCPU has acknowledged.
        let t = Instant::now();
        failed.vm.fence();
        if let Err(err) = failed.vm.pause_within(ctx.pause_patience()) {
            return Err(TakeOverFailed::new(TakeOverError::NotStopped(err), standby));
        }
        let console = failed.vm.set_serial_sink(Box::new(std::io::sink()));
        ctx.phase(Phase::Fence, t, "failed machine fenced");

        let t = Instant::now();
        let state = match failed.vm.save() {
            Ok(state) => state,
            Err(err) => {
                return Err(TakeOverFailed::new(
                    TakeOverError::NotCaptured(err),
                    standby,
                ));
            }
        };
        ctx.phase(Phase::Capture, t, "state captured");

        // A dump of an earlier failure still being written would see this standby's writes,
        // which no trap of its own holds: it is given up.
        if let Some((_, earlier)) = self.dump.take() {
            earlier.abandon();
            tracing::warn!(guest = %ctx.config.name, "the previous failure's crash dump is abandoned: the guest failed again before it was written");
        }
        // The standby changes the very memory the dump must show as soon as it runs: through
        // its trap, or else by writing the dump first.
        let trap = standby.trap.take();
        if trap.is_none() {
            ctx.dump_now(state.vcpus.clone(), &self.ram);
        }
        let t = Instant::now();
        if let Err(why) = start_standby(ctx, failed, &standby, &state, Some(console)) {
            return Err(TakeOverFailed::new(why, standby));
        }
        ctx.resumed_at = Some(Instant::now());
        if let Some(trap) = trap {
            self.dump = ctx.dump_through_trap(state.vcpus, &self.ram, trap);
        }
        ctx.phase(Phase::Resume, t, "standby is now the active");
        Ok(standby)
    }

    fn recover(
        &mut self,
        ctx: &mut Context,
        failed: Machine,
        _active: &Machine,
        rearm: bool,
    ) -> Protection {
        crate::background::retire(failed.vm);
        if rearm {
            self.build_in_background(ctx)
        } else {
            Protection::Unprotected
        }
    }

    fn rebuild(&mut self, ctx: &mut Context, _active: &Machine, lost: Machine) -> Protection {
        crate::background::retire(lost.vm);
        self.build_in_background(ctx)
    }

    fn dump_written(&mut self, job: crate::background::JobId) {
        if self.dump.as_ref().is_some_and(|(j, _)| *j == job) {
            self.dump = None;
        }
    }

    fn switch_over(
        &mut self,
        ctx: &mut Context,
        active: &mut Machine,
        standby: &mut Machine,
    ) -> Result<(), Handover> {
        match active.vm.pause_within(ctx.pause_patience()) {
            Ok(()) => {}
            Err(VmError::VcpuUnresponsive(vcpu)) => return Err(Handover::Unresponsive(vcpu)),
            Err(err) => return Err(Handover::Refused(HandoverError::Pause(err))),
        }
        if let Some(events) = active.vm.own_stops() {
            return Err(Handover::ActiveStopped(events));
        }
        let state = match active.vm.save() {
            Ok(state) => state,
            Err(err) => {
                let _ = active.vm.resume();
                return Err(Handover::Refused(HandoverError::SaveState(err)));
            }
        };
        if let Err(why) = start_standby(ctx, active, standby, &state, None) {
            let _ = active.vm.resume();
            return Err(Handover::StandbyLost(why.into()));
        }
        // The new active needs no trap; the new standby gets one.
        if let Some(trap) = standby.trap.take() {
            release_in_background(trap);
        }
        arm_trap(ctx, active);
        Ok(())
    }
}
