//! The errors of machine operations ([`VmError`]): building, running, pausing, saving and
//! restoring a [`crate::vm::Vm`], and the host probes and dirty log that work on its behalf.
//!
//! A leaf of its own so that the modules `vm` builds on (`vcpu`, `host_limits`, `dirty_log`,
//! `memslots`) can report errors of this type without importing `vm`. No thread of its own.

use kvm_ioctls::Cap;

use crate::boot::BootError;
use crate::devices::serial::SerialError;
use crate::devices::virtio;
use crate::devices::DeviceRestoreError;
use crate::memory::MemoryError;
use crate::state::StateError;

/// Errors of machine operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    KvmUnavailable(kvm_ioctls::Error),
    /// The host KVM lacks a capability the machine needs.
    #[error("the host KVM lacks {0:?}, which understudy needs")]
    MissingCapability(Cap),
    /// A KVM call while building the machine failed.
    #[error("{step} failed: {source}")]
    Kvm {
        /// The call.
        step: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The spec asks for something impossible.
    #[error("invalid machine: {0}")]
    InvalidSpec(String),
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The serial device failed.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A device's state could not be loaded.
    #[error(transparent)]
    DeviceState(#[from] DeviceRestoreError),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Virtio(#[from] virtio::SlotError),
    /// A virtio device's I/O thread did not stop between two requests in time.
    #[error("virtio device {0} did not stop: a request of its did not finish")]
    DeviceUnresponsive(usize),
    /// A disk or NIC could not change hands.
    #[error("{kind} {index}: {source}")]
    DeviceOwnership {
        /// "disk" or "NIC".
        kind: &'static str,
        /// Which one of that kind.
        index: usize,
        /// Why.
        source: crate::devices::holder::OwnershipError,
    },
    /// Saving or loading state failed.
    #[error("{what}: {source}")]
    State {
        /// What was being saved or loaded ("vCPU 1 state", "VM state").
        what: String,
        /// The KVM call that failed.
        source: StateError,
    },
    /// A dirty ring could not be mapped or reset.
    #[error("dirty ring: {0}")]
    DirtyRing(std::io::Error),
    /// The dirty bitmap could not be cleared.
    #[error("KVM_CLEAR_DIRTY_LOG failed: {0}")]
    DirtyLog(std::io::Error),
    /// An eventfd could not be created (out of file descriptors?).
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    /// A vCPU thread did not answer in time.
    #[error("vCPU {0} did not respond")]
    VcpuUnresponsive(u8),
    /// A vCPU's thread has ended, so it cannot run or take requests.
    #[error("vCPU {0}'s thread has ended")]
    VcpuGone(u8),
    /// A snapshot of another shape was given.
    #[error("snapshot does not fit this machine: {0}")]
    ShapeMismatch(String),
}
