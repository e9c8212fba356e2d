//! The standby in the same process: a second machine beside the active, over the guest's own
//! RAM (`resume = "failed-state"`) or over a checkpointed copy (`resume = "checkpoint"`).
//! How the machine is kept, made ready and resumed is the `resume` setting's
//! ([`super::mode::ResumeMode`]); this is that setting seen through the standby seam.
//!
//! Output is released at each epoch's commit, by this process; a failover resumes the guest
//! here, and the failed machine is recovered as the next standby.
//!
//! Runs on the guest's thread.

use std::time::Duration;

use vmm_core::{GuestRam, SerialSink, VmError};

use super::mode::{EpochTick, NotArmed, ResumeMode, TakeOverError, TakeOverFailed};
use super::policy::{Cover, Readiness};
use super::standby::{FailedOver, NotSwitched, Standby, StandbyReport, Switched, Tick, Watch};
use super::{checkpointed, shared};
use super::{Captured, Context, Failure, GuestEnd, Machine, Prepared, Protection, Running};
use crate::background::JobId;
use crate::config::{OnFailure, ResumeFrom};

/// A standby machine in this process.
pub(crate) struct SameProcess {
    mode: Box<dyn ResumeMode>,
}

impl SameProcess {
    /// The standby side for `resume` of a guest over `ram` whose console is `console`; the
    /// first standby machine, built before the active; and the sink the active's console
    /// writes to.
    pub fn new(
        resume: ResumeFrom,
        ctx: &mut Context,
        ram: &GuestRam,
        console: SerialSink,
    ) -> Result<(SameProcess, SerialSink), VmError> {
        let (mode, console): (Box<dyn ResumeMode>, _) = match resume {
            ResumeFrom::FailedState => (Box::new(shared::SharedRam::new(ram.clone())), console),
            ResumeFrom::Checkpoint => {
                let (mode, active_console) = checkpointed::Checkpointed::new(ctx, ram, console)?;
                (Box::new(mode), active_console)
            }
        };
        Ok((SameProcess { mode }, console))
    }

    /// The first standby machine, built before the active starts.
    pub fn build_first_standby(
        &mut self,
        ctx: &mut Context,
        ram: &GuestRam,
    ) -> Result<Machine, VmError> {
        self.mode.build_first_standby(ctx, ram)
    }
}

impl Watch for SameProcess {}

impl Standby for SameProcess {
    fn cover(&self, protection: &Protection, _on_failure: OnFailure) -> Cover {
        Cover::Standby {
            resume: self.mode.resume(),
            ready: match protection {
                Protection::Armed(_) | Protection::ArmedElsewhere => Readiness::Ready,
                Protection::Syncing(_) => Readiness::Syncing,
                Protection::Unprotected => Readiness::Missing,
            },
        }
    }

    fn report(&self) -> StandbyReport<'_> {
        let checkpoint = self.mode.checkpoint();
        StandbyReport {
            resume: Some(self.mode.resume()),
            epochs: checkpoint.map(|c| (c.interval(), c.stats())),
            copy_resident_bytes: checkpoint.map(|c| c.standby_ram().resident_bytes()),
            process: None,
        }
    }

    fn epoch_interval(&self) -> Option<Duration> {
        self.mode.epoch_interval()
    }

    fn sync(&mut self, ctx: &mut Context, active: &Machine, standby: Machine) -> Protection {
        self.mode.sync(ctx, active, standby)
    }

    fn arm(
        &mut self,
        ctx: &mut Context,
        active: &Machine,
        prepared: Prepared,
    ) -> Result<Machine, NotArmed> {
        self.mode.arm(ctx, active, prepared)
    }

    fn captured(&mut self, ctx: &mut Context, captured: Captured, active: &Machine) -> Protection {
        self.mode.captured(ctx, captured, active)
    }

    fn recover(&mut self, ctx: &mut Context, failed: Machine, running: &mut Running, rearm: bool) {
        running.protection = self.mode.recover(ctx, failed, &running.active, rearm);
    }

    fn rebuild(&mut self, ctx: &mut Context, running: &mut Running) {
        let protection = std::mem::replace(&mut running.protection, Protection::Unprotected);
        if let Protection::Armed(standby) = protection {
            running.protection = self.mode.rebuild(ctx, &running.active, standby);
        }
    }

    fn epoch(&mut self, ctx: &mut Context, running: &mut Running) -> Tick {
        let Protection::Armed(standby) = &running.protection else {
            // Not armed: no failover can repeat the held output, so it is let go.
            self.mode.release_output();
            return Tick::Done;
        };
        match self.mode.epoch(ctx, &running.active, standby) {
            EpochTick::Committed | EpochTick::Nothing => Tick::Done,
            EpochTick::ActiveStopped(events) => Tick::ActiveStopped(events),
            EpochTick::Unresponsive(vcpu) => Tick::Unresponsive(vcpu),
            EpochTick::StandbyLost(err) => Tick::StandbyLost(err),
        }
    }

    fn record_input(&mut self, bytes: &[u8]) {
        self.mode.record_input(bytes);
    }

    fn guest_ended(&mut self, _end: &GuestEnd) {
        // The active has stopped writing: what it printed in its last, uncommitted epoch is
        // released, since no failover can repeat it any more.
        self.mode.release_output();
    }

    fn dump_written(&mut self, job: JobId) {
        self.mode.dump_written(job);
    }

    fn fail_over(
        &mut self,
        ctx: &mut Context,
        failure: &Failure,
        active: &mut Machine,
        protection: Protection,
    ) -> Result<FailedOver, TakeOverFailed> {
        let Protection::Armed(standby) = protection else {
            return Err(TakeOverFailed::elsewhere(TakeOverError::NoStandby, false));
        };
        let new_active = self.mode.take_over(ctx, failure, active, standby)?;
        Ok(FailedOver::Here {
            active: new_active,
            heartbeat_seq: self.mode.checkpoint().and_then(|c| c.committed_heartbeat()),
        })
    }

    fn switch_over(
        &mut self,
        ctx: &mut Context,
        running: &mut Running,
    ) -> Result<Switched, NotSwitched> {
        let Protection::Armed(standby) = &mut running.protection else {
            return Err(NotSwitched::NotNow(self.not_ready()));
        };
        self.mode
            .switch_over(ctx, &mut running.active, standby)
            .map_err(NotSwitched::Machine)?;
        Ok(Switched::Swapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::policy::{decide, CrashLoopGuard, Decision};

    /// A failed-state standby over 1 MiB of RAM: no machine, no KVM needed.
    fn failed_state() -> SameProcess {
        let ram = GuestRam::new(1 << 20).expect("1 MiB of memfd RAM");
        SameProcess {
            mode: Box::new(shared::SharedRam::new(ram)),
        }
    }

    #[test]
    fn a_standby_machine_not_yet_armed_covers_nothing_whatever_on_failure_says() {
        let standby = failed_state();
        let mut guard = CrashLoopGuard::new(3, Duration::from_secs(60));
        let now = std::time::Instant::now();
        let failure = Failure::Unresponsive { vcpu: 0 };
        for (protection, why) in [
            (Protection::Unprotected, "no standby"),
            (Protection::syncing(7, Some(2)), "still being synced"),
        ] {
            // The guest's own `on_failure` does not apply to a hot-standby guest.
            let cover = standby.cover(&protection, OnFailure::Restart);
            let decision = decide(&failure, cover, &mut guard, now);
            assert!(
                matches!(&decision, Decision::Down(w) if w.contains(why)),
                "{decision:?}"
            );
        }
        assert!(guard.allows(now), "no failover was counted");
    }

    #[test]
    fn a_standby_machine_reports_its_resume_setting_and_no_standby_process() {
        let standby = failed_state();
        let report = standby.report();
        assert_eq!(report.resume, Some(ResumeFrom::FailedState));
        assert!(report.epochs.is_none(), "failed-state runs no epochs");
        assert!(report.process.is_none());
        assert_eq!(standby.epoch_interval(), None);
        assert_eq!(standby.watched(), crate::guest::Watched::default());
    }
}
