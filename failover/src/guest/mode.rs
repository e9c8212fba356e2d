//! The two `resume` settings as one trait: how a standby is kept, made ready, failed over to
//! and switched over to. [`super::shared::SharedRam`] (`failed-state`) keeps the standby over
//! the guest's own RAM and hands it the failed state; [`super::checkpointed::Checkpointed`]
//! (`checkpoint`) keeps it over a copy as of the last epoch.
//!
//! Runs on the guest's thread; whatever takes time is started here as a background job and
//! finished when its result comes back.

use std::time::Duration;

use vmm_core::{GuestRam, SerialSink, VmError, VmEvent};

use super::{Captured, Context, Failure, Machine, Prepared, Protection};
use crate::checkpoint::Checkpoint;
use crate::config::ResumeFrom;

/// What an epoch tick did.
pub(crate) enum EpochTick {
    /// There was nothing to do.
    Nothing,
    /// An epoch committed.
    Committed,
    /// A vCPU of the active had stopped on its own; its events, for the guest to act on.
    ActiveStopped(Vec<VmEvent>),
    /// A vCPU of the active did not answer the pause: the active has failed.
    Unresponsive(u8),
    /// The standby side is no longer consistent: it must be rebuilt.
    StandbyLost(String),
}

/// Why a standby that came back from the background could not be armed.
pub(crate) enum NotArmed {
    /// A vCPU of the active stopped meanwhile; its events are to be acted on.
    ActiveStopped(Vec<VmEvent>, Machine),
    /// A vCPU of the active did not answer the pause: the active has failed.
    Unresponsive(u8, Machine),
    /// The standby could not be made consistent.
    Failed(String),
}

/// The standby could not take over.
pub(crate) struct TakeOverFailed {
    /// Why.
    pub reason: String,
    /// The standby, to be torn down.
    pub standby: Machine,
}

impl TakeOverFailed {
    pub fn new(reason: impl Into<String>, standby: Machine) -> Self {
        TakeOverFailed {
            reason: reason.into(),
            standby,
        }
    }
}

/// Why a planned switchover did not happen.
pub(crate) enum Handover {
    /// Nothing changed; the active runs on.
    Refused(String),
    /// The active runs on, but the standby is no longer consistent and must be rebuilt.
    StandbyLost(String),
    /// A vCPU of the active stopped on its own; its events are to be acted on.
    ActiveStopped(Vec<VmEvent>),
    /// A vCPU of the active did not answer the pause: the active has failed.
    Unresponsive(u8),
}

/// How a hot-standby guest's standby is kept and resumes it.
pub(crate) trait ResumeMode: Send {
    /// Which setting this is.
    fn resume(&self) -> ResumeFrom;

    /// The epoch length, when epochs run.
    fn epoch_interval(&self) -> Option<Duration> {
        None
    }

    /// The first standby machine, built before the active starts.
    fn build_first_standby(
        &mut self,
        ctx: &mut Context,
        ram: &GuestRam,
    ) -> Result<Machine, VmError>;

    /// Starts making `standby` ready for `active`.
    fn sync(&mut self, ctx: &mut Context, active: &Machine, standby: Machine) -> Protection;

    /// A standby came back from the background: makes it ready (with the active paused for
    /// a moment at most) so failover can be armed.
    fn arm(
        &mut self,
        ctx: &mut Context,
        active: &Machine,
        prepared: Prepared,
    ) -> Result<Machine, NotArmed>;

    /// One epoch, with the standby ready.
    fn epoch(&mut self, _ctx: &mut Context, _active: &Machine, _standby: &Machine) -> EpochTick {
        EpochTick::Nothing
    }

    /// No failover can repeat held console output any more (the guest is unprotected or
    /// ending): let it go.
    fn release_output(&mut self) {}

    /// Console input the active was given.
    fn record_input(&mut self, _bytes: &[u8]) {}

    /// Resumes the guest on `standby` after `failed` failed. Fences `failed` first: it never
    /// runs again. Returns the new active, or why the standby could not take over.
    fn take_over(
        &mut self,
        ctx: &mut Context,
        failure: &Failure,
        failed: &mut Machine,
        standby: Machine,
    ) -> Result<Machine, TakeOverFailed>;

    /// Once the guest's loop no longer watches `failed`: recovers it (or a replacement) as
    /// the next standby when `rearm`, else lets it go.
    fn recover(
        &mut self,
        ctx: &mut Context,
        failed: Machine,
        active: &Machine,
        rearm: bool,
    ) -> Protection;

    /// The standby was lost (a checkpoint failed): builds another.
    fn rebuild(&mut self, ctx: &mut Context, active: &Machine, lost: Machine) -> Protection;

    /// A failed machine, captured in the background, is back: its dump can be written and
    /// its RAM reused. Only the checkpointed setting captures in the background.
    fn captured(
        &mut self,
        _ctx: &mut Context,
        _captured: Captured,
        _active: &Machine,
    ) -> Protection {
        Protection::Unprotected
    }

    /// Background job `job` (a crash dump) has finished.
    fn dump_written(&mut self, _job: crate::background::JobId) {}

    /// A planned switchover: `standby` takes over the paused `active` with nothing lost.
    /// The machines' roles are swapped by the caller once this succeeds.
    fn switch_over(
        &mut self,
        ctx: &mut Context,
        active: &mut Machine,
        standby: &mut Machine,
    ) -> Result<(), Handover>;

    /// The checkpoint engine, for a checkpointed guest.
    fn checkpoint(&self) -> Option<&Checkpoint> {
        None
    }
}

/// Loads `state` into `standby`, hands it the disks and the console of `from` (whose vCPUs
/// are stopped) and starts it. The disks are taken from `from` before `standby` is given
/// them, so the two never both hold one. On failure `from` gets its disks and console back.
pub(crate) fn start_standby(
    ctx: &Context,
    from: &Machine,
    standby: &Machine,
    state: &vmm_core::VmSnapshot,
    console: Option<SerialSink>,
) -> Result<(), String> {
    standby
        .vm
        .restore(state)
        .map_err(|err| format!("the standby could not load the state: {err}"))?;
    from.vm
        .revoke_devices(ctx.pause_patience())
        .map_err(|err| format!("the disks and NICs could not be taken from the machine: {err}"))?;
    if let Err(err) = standby.vm.grant_devices() {
        let _ = from.vm.grant_devices();
        return Err(format!(
            "the standby could not be given the disks and NICs: {err}"
        ));
    }
    let console = console.unwrap_or_else(|| from.vm.set_serial_sink(Box::new(std::io::sink())));
    standby.vm.set_serial_sink(console);
    if let Err(err) = standby.vm.resume() {
        // Some of its vCPUs may have started: stop them first, so two machines never run the
        // guest at once.
        let _ = standby.vm.pause();
        let console = standby.vm.set_serial_sink(Box::new(std::io::sink()));
        from.vm.set_serial_sink(console);
        let _ = standby.vm.revoke_devices(ctx.pause_patience());
        let _ = from.vm.grant_devices();
        return Err(format!("the standby could not start: {err}"));
    }
    Ok(())
}

/// Drains the events of `active`'s vCPUs that stopped on their own (while it was being
/// paused); `None` if there were none.
pub(crate) fn own_stops(active: &Machine) -> Option<Vec<VmEvent>> {
    let mut stopped = Vec::new();
    while let Some(event) = active.vm.next_event(Duration::ZERO) {
        stopped.push(event);
    }
    (!stopped.is_empty()).then_some(stopped)
}
