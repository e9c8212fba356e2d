//! Verdicts that can still be proven false. A guest judged silent or a vCPU judged
//! unresponsive may show later that it was alive at the verdict: the vCPU answers the pause
//! that gave up on it, or the guest beats again. The failover has happened by then (it
//! cannot be taken back), but the operator learns of it from a `failure-disproven` event, so
//! a false failure never passes for a real one, and a run of them points at the host.
//!
//! Runs on the guest's thread: a verdict adds a suspicion, each look at the heartbeats looks
//! at the open ones. Looking never blocks.

use std::time::{Duration, Instant};

use vmm_core::witness::Witness;

use super::Failure;

/// How long a verdict stays open to disproof: a failed machine that is going to answer does
/// so once its threads get a CPU, which a busy host may take seconds to give.
const OPEN_FOR: Duration = Duration::from_secs(60);

/// One verdict open to disproof.
struct Suspicion {
    /// The failure's number in the guest's record.
    number: u32,
    reason: &'static str,
    witness: Witness,
    at: Instant,
}

/// The verdicts of one guest still open to disproof.
#[derive(Default)]
pub(crate) struct Suspicions {
    open: Vec<Suspicion>,
}

impl Suspicions {
    /// Failure `number` was judged from the machine's silence or unresponsiveness (other
    /// failures are the machine's own report and cannot be false): keeps `witness`, taken at
    /// the verdict, to look at later.
    pub fn suspect(&mut self, number: u32, failure: &Failure, witness: Witness) {
        if matches!(
            failure,
            Failure::HeartbeatTimeout { .. } | Failure::Unresponsive { .. }
        ) {
            self.open.push(Suspicion {
                number,
                reason: failure.reason(),
                witness,
                at: Instant::now(),
            });
        }
    }

    /// Looks at the open verdicts: reports those disproven, forgets those too old.
    pub fn look(&mut self, guest: &str) {
        if self.open.is_empty() {
            return;
        }
        self.open.retain(|suspicion| {
            if let Some(evidence) = suspicion.witness.evidence() {
                lifecycle!(
                    warn,
                    "failure-disproven",
                    guest = %guest,
                    failure_number = suspicion.number,
                    reason = suspicion.reason,
                    evidence = %evidence,
                    after_ms = suspicion.at.elapsed().as_millis() as u64,
                    "a failure detected was false: the guest was alive"
                );
                return false;
            }
            suspicion.at.elapsed() < OPEN_FOR
        });
    }
}
