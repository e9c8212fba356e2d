//! How a guest ends and how its active can fail, what the guest's loop must do after an
//! event, and what can go wrong starting a guest: the plain values the rest of `guest` and
//! its callers speak in.

use vmm_core::{VcpuStop, VmError};

use crate::console::ConsoleError;

/// How a guest ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestEnd {
    /// The guest wrote the debug-exit port.
    Exited {
        /// Its exit status, `(value << 1) | 1`.
        code: i32,
    },
    /// The guest asked for a reset (i8042), which ends it.
    Reset,
    /// An operator stopped it (the control socket's `shutdown`, or a signal).
    Stopped,
    /// The guest powered itself off (ACPI).
    PoweredOff,
    /// The guest failed here and a standby process took it over from its last epoch: it
    /// runs on there.
    HandedOver {
        /// The standby's process.
        pid: u32,
    },
    /// The guest failed and was brought down.
    Down {
        /// What failed, and why it could not be carried on.
        reason: String,
    },
}

/// Why the supervisor considers a guest's active VM failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A vCPU stopped for a reason that is not a deliberate end.
    Vcpu {
        /// Which vCPU.
        vcpu: u8,
        /// Why.
        stop: VcpuStop,
        /// Set when the stop followed an injected machine check.
        machine_check: bool,
    },
    /// No heartbeat for longer than the timeout.
    HeartbeatTimeout {
        /// How long the guest's vCPUs had run without a heartbeat (time they were not given a
        /// CPU, were parked or stopped does not count).
        silent_ms: u64,
        /// Since its last heartbeat was seen, all told.
        since_seen_ms: u64,
    },
    /// The guest reported a panic (pvpanic), injected or its own.
    Panic,
    /// A vCPU of the active did not answer a pause in time: its thread is stuck.
    Unresponsive {
        /// Which vCPU.
        vcpu: u8,
    },
}

impl Failure {
    /// Whether the failure lies in the guest's own state, so that handing that state to the
    /// standby would fail the same way.
    pub fn breaks_guest_state(&self) -> bool {
        match self {
            Failure::Vcpu { machine_check, .. } if *machine_check => true,
            Failure::Vcpu { stop, .. } => {
                matches!(stop, VcpuStop::Shutdown | VcpuStop::Panicked)
            }
            Failure::Panic => true,
            Failure::HeartbeatTimeout { .. } | Failure::Unresponsive { .. } => false,
        }
    }

    /// The failure's class, as metrics label it.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Vcpu {
                machine_check: true,
                ..
            } => "machine-check",
            Failure::Vcpu { stop, .. } => match stop {
                VcpuStop::ThreadDied => "vcpu-thread-died",
                VcpuStop::Shutdown => "triple-fault",
                VcpuStop::Panicked => "panic",
                VcpuStop::InternalError { .. } => "internal-error",
                VcpuStop::FailedEntry { .. } => "failed-entry",
                VcpuStop::RunFailed { .. } => "run-failed",
                _ => "vcpu-stopped",
            },
            Failure::HeartbeatTimeout { .. } => "heartbeat-timeout",
            Failure::Panic => "panic",
            Failure::Unresponsive { .. } => "vcpu-unresponsive",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Vcpu {
                machine_check: true,
                vcpu,
                stop,
            } => write!(f, "machine check on vCPU {vcpu} ({stop})"),
            Failure::Vcpu { vcpu, stop, .. } => write!(f, "vCPU {vcpu}: {stop}"),
            Failure::HeartbeatTimeout {
                silent_ms,
                since_seen_ms,
            } => {
                write!(f, "no heartbeat for {silent_ms} ms")?;
                if since_seen_ms > silent_ms {
                    let kept_off = since_seen_ms - silent_ms;
                    write!(f, " of its run ({since_seen_ms} ms since the last, {kept_off} ms of them not running)")?;
                }
                Ok(())
            }
            Failure::Panic => write!(f, "guest panicked"),
            Failure::Unresponsive { vcpu } => write!(f, "vCPU {vcpu} did not answer"),
        }
    }
}

/// What the guest's event loop must do after the guest handled an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing changed that the loop watches.
    None,
    /// The active machine was replaced: watch the new one's eventfds, then call
    /// [`super::Guest::after_rewire`].
    NewActive,
    /// The guest has ended: stop watching it, then call [`super::Guest::after_rewire`].
    Ended,
}

/// Errors while starting a guest.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A machine could not be built, booted or started.
    #[error("guest {guest}: {step}: {source}")]
    Machine {
        /// The guest.
        guest: String,
        /// What was being done.
        step: &'static str,
        /// What failed.
        source: VmError,
    },
    /// The socket a standby process attaches through could not be opened.
    #[error("guest {guest}: standby.process = \"separate\": {why}")]
    Attach {
        /// The guest.
        guest: String,
        /// What failed.
        why: String,
    },
    /// The snapshot to start from could not be loaded into the machine.
    #[error("guest {guest}: cannot restore: {source}")]
    Restore {
        /// The guest.
        guest: String,
        /// What failed.
        source: vmm_core::SnapshotError,
    },
    /// The console could not be opened.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// The guest's background work could not be set up (out of file descriptors?).
    #[error("guest {guest}: cannot set up background work: {source}")]
    Background {
        /// The guest.
        guest: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl StartError {
    /// The error for a machine of guest `guest` that failed at `step`, for `map_err`.
    pub(crate) fn machine(guest: &str, step: &'static str) -> impl FnOnce(VmError) -> StartError {
        let guest = guest.to_owned();
        move |source| StartError::Machine {
            guest,
            step,
            source,
        }
    }
}
