//! Who may use a device backend shared by the machines of one guest: at most one machine at
//! a time. Its holder is granted it ([`Holder::grant`]) and gives it up ([`Holder::revoke`]);
//! every use names the machine it comes from ([`Holder::run`]), and one from a machine that
//! does not hold it is refused and counted, never carried out. So when a failed machine's
//! backend is revoked before its standby is granted it, nothing the failed machine might
//! still attempt reaches the backend.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Who holds a backend and how often it changed hands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// The machine that holds it, if any (see [`crate::Vm::id`]).
    pub owner: Option<u64>,
    /// Grants so far.
    pub grants: u64,
    /// Revocations so far.
    pub revocations: u64,
    /// Requests refused because the machine making them did not hold the backend.
    pub refused: u64,
}

/// A grant or revocation could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// Another machine holds it.
    #[error("held by machine {0}")]
    HeldBy(u64),
    /// The holder's request in progress did not finish in time.
    #[error("machine {0}'s request in progress did not finish")]
    Busy(u64),
}

/// A use came from a machine that does not hold the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("machine {machine} does not hold the device")]
pub struct NotHolder {
    /// The machine.
    pub machine: u64,
}

struct State {
    owner: Option<u64>,
    in_flight: u32,
    ownership: Ownership,
}

/// The holder of one backend.
pub struct Holder {
    state: Mutex<State>,
    drained: Condvar,
}

impl Default for Holder {
    fn default() -> Self {
        Holder {
            state: Mutex::new(State {
                owner: None,
                in_flight: 0,
                ownership: Ownership::default(),
            }),
            drained: Condvar::new(),
        }
    }
}

impl Holder {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the backend to `machine`. Refused while another machine holds it: that one must
    /// be revoked first.
    pub fn grant(&self, machine: u64) -> Result<(), OwnershipError> {
        let mut state = self.lock();
        match state.owner {
            Some(owner) if owner == machine => Ok(()),
            Some(owner) => Err(OwnershipError::HeldBy(owner)),
            None => {
                state.owner = Some(machine);
                state.ownership.owner = Some(machine);
                state.ownership.grants += 1;
                Ok(())
            }
        }
    }

    /// Takes the backend from `machine`: from this call on its uses are refused, and the
    /// call returns once a use of its still in progress has finished (waiting at most
    /// `patience`). Revoking a machine that does not hold it does nothing.
    pub fn revoke(&self, machine: u64, patience: Duration) -> Result<(), OwnershipError> {
        let mut state = self.lock();
        if state.owner != Some(machine) {
            return Ok(());
        }
        state.owner = None;
        state.ownership.owner = None;
        state.ownership.revocations += 1;
        let deadline = Instant::now() + patience;
        while state.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(OwnershipError::Busy(machine));
            }
            state = self
                .drained
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Who holds the backend, and the count of grants, revocations and refusals.
    pub fn ownership(&self) -> Ownership {
        self.lock().ownership
    }

    /// Whether `machine` holds the backend now.
    pub fn holds(&self, machine: u64) -> bool {
        self.lock().owner == Some(machine)
    }

    /// Runs `op` for `machine` if it holds the backend; a revocation meanwhile waits for it.
    pub fn run<T>(&self, machine: u64, op: impl FnOnce() -> T) -> Result<T, NotHolder> {
        {
            let mut state = self.lock();
            if state.owner != Some(machine) {
                state.ownership.refused += 1;
                return Err(NotHolder { machine });
            }
            state.in_flight += 1;
        }
        let result = op();
        let mut state = self.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            self.drained.notify_all();
        }
        Ok(result)
    }

    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }
}
