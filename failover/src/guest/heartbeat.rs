//! The active's heartbeats as the guest judges them: when it could first be judged silent,
//! and the failure once it is. Runs on the guest's thread; looking never blocks.

use std::time::{Duration, Instant};

use super::{Failure, Guest, State};

impl Guest {
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
}
