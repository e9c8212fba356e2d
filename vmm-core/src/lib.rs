//! vmm-core: one KVM virtual machine — guest memory, vCPU threads, boot, devices, and the
//! capture and restore of its complete state as plain values.
//!
//! It knows nothing of pairs, roles or failover: a [`Vm`] can be created, booted, run,
//! paused, saved and restored into another `Vm` of the same [`MachineSpec`], written to disk
//! as a [`Snapshot`] and loaded back from one, and it reports every way a vCPU stops as a
//! [`VmEvent`]. What to do about those events is its owner's business.

pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod dirty_log;
pub mod dirty_ring;
mod error;
pub mod host_limits;
pub mod jail;
pub mod layout;
pub mod mce;
pub mod memory;
mod memslots;
pub mod run_clock;
#[cfg(any(test, feature = "seeded-inputs"))]
#[doc(hidden)]
pub mod seeded_inputs;
pub mod snapshot;
pub mod snapshot_fuzz;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod witness;

pub use boot::{BootError, BootSource};
pub use cpuid::CpuFeature;
pub use devices::disk::{Disk, DiskBackend, DiskCounters, ImageError, Ownership, RawImage};
pub use devices::heartbeat::HeartbeatStatus;
pub use devices::net::{NetBackend, Nic, NicCounters, Tap, TapError, Transmitted};
pub use devices::serial::SerialSink;
pub use devices::{DeviceStates, UnknownAccesses};
pub use dirty_log::{DirtyLog, DirtyPages};
pub use host_limits::HostLimits;
pub use memory::{GuestRam, MemoryError};
pub use snapshot::{Snapshot, SnapshotError};
pub use state::{VcpuState, VmSnapshot, VmState};
pub use vcpu::{VcpuStop, VmEvent, ANSWER_BOOST};
pub use vm::{Faults, MachineSpec, Peripherals, Vm, VmError};
