//! The guest's I/O ports and what answers them: COM1, the i8042 reset line, the QEMU-style
//! debug-exit and pvpanic ports, the heartbeat port, and the ACPI sleep control port; and its
//! virtio-mmio devices ([`virtio`]). Everything else is answered with all ones (reads) or
//! dropped (writes), counted, and logged at debug level.
//!
//! Called on vCPU threads. A port access returns a [`PortEffect`] when it means more than a
//! register change (the guest wants to exit, reset, has panicked), and the vCPU thread turns
//! that into an event for the machine's owner. The devices never stop a vCPU themselves.

pub mod disk;
pub mod heartbeat;
pub mod holder;
pub mod net;
pub mod serial;
pub mod virtio;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vm_superio::{I8042Device, Trigger};

use crate::boot::acpi::{SLEEP_CONTROL_PORT, SLEEP_ENABLE, SLEEP_STATUS_PORT};
use heartbeat::{Heartbeats, HEARTBEAT_PORT};
use serial::{Com1, SerialDeviceState, COM1_BASE, COM1_PORTS};
use virtio::{VirtioSlot, VirtioState, MMIO_BASE, MMIO_SIZE};

/// QEMU `isa-debug-exit` port: a write of v ends the guest with exit status `(v << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// QEMU ISA `pvpanic` port: a write with bit 0 set means the guest panicked.
pub const PVPANIC_PORT: u16 = 0x505;
/// pvpanic reads return the events the device supports: bit 0, "panicked".
const PVPANIC_FEATURES: u8 = 1;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// What a port access means beyond a register change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEffect {
    /// The guest asked to end with this exit status (debug-exit port).
    GuestExit(i32),
    /// The guest asked for a CPU reset through the i8042.
    ResetRequested,
    /// The guest reported a panic through pvpanic.
    Panicked,
    /// The guest entered ACPI S5 (soft off) through the sleep control port.
    PoweredOff,
}

/// Counts of guest accesses nobody answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnknownAccesses {
    /// Port reads answered with all ones.
    pub port_reads: u64,
    /// Port writes dropped.
    pub port_writes: u64,
    /// MMIO reads answered with all ones.
    pub mmio_reads: u64,
    /// MMIO writes dropped.
    pub mmio_writes: u64,
}

impl std::ops::AddAssign for UnknownAccesses {
    fn add_assign(&mut self, other: Self) {
        self.port_reads += other.port_reads;
        self.port_writes += other.port_writes;
        self.mmio_reads += other.mmio_reads;
        self.mmio_writes += other.mmio_writes;
    }
}

/// The state of every device that has guest-visible state, as plain values. The i8042 is
/// absent because its emulation has none: its registers read as constants and a reset request
/// is reported at once, never held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    /// The virtio-mmio devices, in address order.
    #[serde(default)]
    pub virtio: Vec<VirtioState>,
}

/// A device state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DeviceRestoreError {
    /// COM1's state.
    #[error(transparent)]
    Serial(#[from] serial::SerialError),
    /// A virtio device's state.
    #[error(transparent)]
    Virtio(#[from] virtio::RestoreError),
    /// The snapshot has another set of virtio devices.
    #[error("the snapshot has {snapshot} virtio devices, the machine {machine}")]
    VirtioCount {
        /// Devices in the snapshot.
        snapshot: usize,
        /// Devices of the machine.
        machine: usize,
    },
}

/// Latches the i8042's "reset the CPU" command so the port access can report it.
#[derive(Default, Clone)]
struct ResetLatch(Arc<AtomicBool>);

impl Trigger for ResetLatch {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// Devices behind the one lock that serializes register access.
struct LockedDevices {
    com1: Com1,
    i8042: I8042Device<ResetLatch>,
}

/// All port-I/O devices of one machine.
pub struct Devices {
    locked: Mutex<LockedDevices>,
    reset: ResetLatch,
    heartbeats: Heartbeats,
    virtio: Vec<VirtioSlot>,
    unknown_port_reads: AtomicU64,
    unknown_port_writes: AtomicU64,
    unknown_mmio_reads: AtomicU64,
    unknown_mmio_writes: AtomicU64,
}

impl Devices {
    /// Devices around `com1` and `heartbeats`.
    pub fn new(com1: Com1, heartbeats: Heartbeats) -> Self {
        let reset = ResetLatch::default();
        Devices {
            locked: Mutex::new(LockedDevices {
                com1,
                i8042: I8042Device::new(reset.clone()),
            }),
            reset,
            heartbeats,
            virtio: Vec::new(),
            unknown_port_reads: AtomicU64::new(0),
            unknown_port_writes: AtomicU64::new(0),
            unknown_mmio_reads: AtomicU64::new(0),
            unknown_mmio_writes: AtomicU64::new(0),
        }
    }

    /// These devices with `virtio` as the virtio-mmio devices, in address order.
    pub(crate) fn with_virtio(mut self, virtio: Vec<VirtioSlot>) -> Self {
        self.virtio = virtio;
        self
    }

    /// The virtio-mmio devices.
    pub(crate) fn virtio(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// The virtio device whose registers hold `addr`, and the offset into them.
    fn virtio_at(&self, addr: u64) -> Option<(&VirtioSlot, u64)> {
        let offset = addr.checked_sub(MMIO_BASE)?;
        let slot = self.virtio.get((offset / MMIO_SIZE) as usize)?;
        Some((slot, offset % MMIO_SIZE))
    }

    fn lock(&self) -> MutexGuard<'_, LockedDevices> {
        // A vCPU thread that panicked while holding the lock left register state that is
        // still plain bytes; keep serving the other vCPUs rather than poisoning them too.
        self.locked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guest `in` from `port`; fills `data`.
    pub fn port_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&p) && data.len() == 1 => {
                data[0] = self.lock().com1.read((p - COM1_BASE) as u8);
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                data[0] = self.lock().i8042.read((port - I8042_DATA_PORT) as u8);
            }
            PVPANIC_PORT if data.len() == 1 => data[0] = PVPANIC_FEATURES,
            // Nothing ever wakes the guest: the wake status stays clear.
            SLEEP_CONTROL_PORT | SLEEP_STATUS_PORT if data.len() == 1 => data[0] = 0,
            _ => {
                data.fill(0xff);
                self.unknown_port_reads.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    port = format_args!("{port:#x}"),
                    size = data.len(),
                    "unknown port read"
                );
            }
        }
    }

    /// A guest `out` of `data` to `port`.
    pub fn port_write(&self, port: u16, data: &[u8]) -> Option<PortEffect> {
        match (port, data) {
            (p, [value]) if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&p) => {
                self.lock().com1.write((p - COM1_BASE) as u8, *value);
                None
            }
            (I8042_DATA_PORT | I8042_COMMAND_PORT, [value]) => {
                // The latch is only set under the device lock, so clearing it right after the
                // write reports each reset command exactly once.
                let _ = self
                    .lock()
                    .i8042
                    .write((port - I8042_DATA_PORT) as u8, *value);
                self.reset
                    .0
                    .swap(false, Ordering::AcqRel)
                    .then_some(PortEffect::ResetRequested)
            }
            (DEBUG_EXIT_PORT, [value, ..]) => {
                Some(PortEffect::GuestExit((i32::from(*value) << 1) | 1))
            }
            (PVPANIC_PORT, [value]) if value & 1 != 0 => Some(PortEffect::Panicked),
            (PVPANIC_PORT, [_]) => None,
            (SLEEP_CONTROL_PORT, [value]) if value & SLEEP_ENABLE != 0 => {
                Some(PortEffect::PoweredOff)
            }
            (SLEEP_CONTROL_PORT | SLEEP_STATUS_PORT, [_]) => None,
            (HEARTBEAT_PORT, [a, b, c, d]) => {
                self.heartbeats.beat(u32::from_le_bytes([*a, *b, *c, *d]));
                None
            }
            _ => {
                self.unknown_port_writes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    port = format_args!("{port:#x}"),
                    size = data.len(),
                    "unknown port write dropped"
                );
                None
            }
        }
    }

    /// A guest MMIO read (the in-kernel IOAPIC and LAPIC take theirs in KVM).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some((slot, offset)) = self.virtio_at(addr) {
            slot.read(offset, data);
            return;
        }
        data.fill(0xff);
        self.unknown_mmio_reads.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            addr = format_args!("{addr:#x}"),
            size = data.len(),
            "unknown MMIO read"
        );
    }

    /// A guest MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.virtio_at(addr) {
            slot.write(offset, data);
            return;
        }
        self.unknown_mmio_writes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            addr = format_args!("{addr:#x}"),
            size = data.len(),
            "unknown MMIO write dropped"
        );
    }

    /// Unanswered accesses so far.
    pub fn unknown_accesses(&self) -> UnknownAccesses {
        UnknownAccesses {
            port_reads: self.unknown_port_reads.load(Ordering::Relaxed),
            port_writes: self.unknown_port_writes.load(Ordering::Relaxed),
            mmio_reads: self.unknown_mmio_reads.load(Ordering::Relaxed),
            mmio_writes: self.unknown_mmio_writes.load(Ordering::Relaxed),
        }
    }

    /// The heartbeat counters.
    pub fn heartbeats(&self) -> &Heartbeats {
        &self.heartbeats
    }

    /// Queues console input; returns how many bytes the UART took.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.lock().com1.enqueue_input(bytes)
    }

    /// Replaces the console output sink, returning the old one.
    pub fn set_serial_sink(&self, sink: serial::SerialSink) -> serial::SerialSink {
        self.lock().com1.set_sink(sink)
    }

    /// Flushes console output.
    pub fn flush_serial(&self) {
        self.lock().com1.flush();
    }

    /// Every device's state. The virtio devices must be paused.
    pub fn save(&self) -> DeviceStates {
        DeviceStates {
            serial: self.lock().com1.state(),
            virtio: self.virtio.iter().map(VirtioSlot::save).collect(),
        }
    }

    /// Loads every device's state. The virtio devices must be paused.
    pub fn restore(&self, states: &DeviceStates) -> Result<(), DeviceRestoreError> {
        if states.virtio.len() != self.virtio.len() {
            return Err(DeviceRestoreError::VirtioCount {
                snapshot: states.virtio.len(),
                machine: self.virtio.len(),
            });
        }
        for (slot, state) in self.virtio.iter().zip(&states.virtio) {
            slot.restore(state)?;
        }
        self.lock().com1.restore(&states.serial)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn devices() -> (Devices, Captured) {
        let out = Captured::default();
        let com1 = Com1::new(EventFd::new(0).unwrap(), Box::new(out.clone())).unwrap();
        let heartbeats = Heartbeats::new(EventFd::new(0).unwrap());
        (Devices::new(com1, heartbeats), out)
    }

    #[test]
    fn debug_exit_maps_value_like_qemu() {
        let (d, _) = devices();
        assert_eq!(
            d.port_write(DEBUG_EXIT_PORT, &[0]),
            Some(PortEffect::GuestExit(1))
        );
        assert_eq!(
            d.port_write(DEBUG_EXIT_PORT, &[3]),
            Some(PortEffect::GuestExit(7))
        );
    }

    #[test]
    fn pvpanic_bit0_is_a_panic_and_other_bits_are_not() {
        let (d, _) = devices();
        assert_eq!(d.port_write(PVPANIC_PORT, &[1]), Some(PortEffect::Panicked));
        assert_eq!(d.port_write(PVPANIC_PORT, &[2]), None);
    }

    #[test]
    fn i8042_reset_command_is_reported_once() {
        let (d, _) = devices();
        assert_eq!(
            d.port_write(I8042_COMMAND_PORT, &[0xfe]),
            Some(PortEffect::ResetRequested)
        );
        assert_eq!(d.port_write(I8042_COMMAND_PORT, &[0x20]), None);
    }

    #[test]
    fn heartbeat_records_sequence_and_count() {
        let (d, _) = devices();
        d.port_write(HEARTBEAT_PORT, &7u32.to_le_bytes());
        d.port_write(HEARTBEAT_PORT, &8u32.to_le_bytes());
        let status = d.heartbeats().status();
        assert_eq!((status.count, status.last_sequence), (2, 8));
    }

    #[test]
    fn unknown_ports_read_all_ones_and_are_counted() {
        let (d, _) = devices();
        let mut data = [0u8; 2];
        d.port_read(0x1234, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(d.port_write(0x80, &[0x55]), None);
        let mut mmio = [0u8; 4];
        d.mmio_read(0xd000_0000, &mut mmio);
        d.mmio_write(0xd000_0000, &mmio);
        assert_eq!(
            d.unknown_accesses(),
            UnknownAccesses {
                port_reads: 1,
                port_writes: 1,
                mmio_reads: 1,
                mmio_writes: 1
            }
        );
        assert_eq!(mmio, [0xff; 4]);
    }

    #[test]
    fn serial_output_reaches_the_sink_and_state_round_trips() {
        let (d, out) = devices();
        for b in b"hi\n" {
            d.port_write(COM1_BASE, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        d.port_write(COM1_BASE + 7, &[0x5a]); // scratch register
        let saved = d.save();
        let (other, _) = devices();
        other.restore(&saved).unwrap();
        let mut scratch = [0u8];
        other.port_read(COM1_BASE + 7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
    }
}
