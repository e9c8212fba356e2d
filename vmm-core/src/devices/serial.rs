//! COM1: a 16550 UART (vm-superio) at 0x3f8, raising IRQ 4 through an irqfd.
//!
//! Called on vCPU threads (register accesses) and on whatever thread feeds console input; the
//! owner of the machine serializes them with the device lock. Where the output goes is the
//! owner's choice: any `Write` sink.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub use crate::layout::{COM1_BASE, COM1_IRQ, COM1_PORTS};

/// Where guest console output goes.
pub type SerialSink = Box<dyn Write + Send>;

/// The UART's registers and pending input, as a plain value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Cloning the interrupt eventfd failed.
    #[error("cannot clone the COM1 interrupt eventfd: {0}")]
    Interrupt(std::io::Error),
    /// A saved state could not be loaded (e.g. more pending input than the FIFO holds).
    #[error("cannot restore COM1 state: {0}")]
    Restore(String),
}

/// The UART's interrupt line: an eventfd registered as an irqfd for IRQ 4.
struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 with its interrupt line and output sink.
pub struct Com1 {
    uart: Serial<IrqLine, NoEvents, SerialSink>,
    interrupt: EventFd,
}

impl Com1 {
    /// A UART in reset state raising `interrupt` and writing to `sink`.
    pub fn new(interrupt: EventFd, sink: SerialSink) -> Result<Self, SerialError> {
        let trigger = IrqLine(interrupt.try_clone().map_err(SerialError::Interrupt)?);
        Ok(Com1 {
            uart: Serial::new(trigger, sink),
            interrupt,
        })
    }

    /// Register read at `offset` from 0x3f8.
    pub fn read(&mut self, offset: u8) -> u8 {
        let value = self.uart.read(offset);
        tracing::trace!(offset, value, "COM1 read");
        value
    }

    /// Register write at `offset` from 0x3f8. Output the sink refuses (a write error) is
    /// dropped rather than failing the guest's `out`.
    pub fn write(&mut self, offset: u8, value: u8) {
        tracing::trace!(offset, value, "COM1 write");
        if let Err(err) = self.uart.write(offset, value) {
            tracing::debug!(%err, "COM1 write failed");
        }
    }

    /// Queues console input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flushes the output sink.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    /// The registers and pending input.
    pub fn state(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    /// Loads `state`, keeping this device's interrupt line and sink.
    pub fn restore(&mut self, state: &SerialDeviceState) -> Result<(), SerialError> {
        let trigger = IrqLine(self.interrupt.try_clone().map_err(SerialError::Interrupt)?);
        // Build the new UART around a placeholder sink, then move the real sink over, so the
        // sink survives a failed restore.
        let restored = Serial::from_state(
            &state.into(),
            trigger,
            NoEvents,
            Box::new(std::io::sink()) as SerialSink,
        )
        .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        let old = std::mem::replace(&mut self.uart, restored);
        *self.uart.writer_mut() = old.into_writer();
        Ok(())
    }

    /// Replaces the output sink, returning the old one.
    pub fn set_sink(&mut self, sink: SerialSink) -> SerialSink {
        std::mem::replace(self.uart.writer_mut(), sink)
    }
}
