//! The heartbeat port (0x5f0): each 32-bit write is one heartbeat carrying a guest-chosen
//! sequence number.
//!
//! Written by vCPU threads, read by whoever watches the guest. Lock-free: a heartbeat costs a
//! few atomic stores and one eventfd write, so a guest beating fast cannot stall on a lock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// The heartbeat port.
pub const HEARTBEAT_PORT: u16 = 0x5f0;

/// What the watcher sees of a guest's heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    /// Heartbeats received since the machine was created.
    pub count: u64,
    /// Sequence number of the last heartbeat.
    pub last_sequence: u32,
    /// When the last heartbeat arrived, in nanoseconds since the machine was created.
    pub last_at_ns: u64,
}

/// Heartbeat counters plus an eventfd that is written on each beat.
pub struct Heartbeats {
    count: Arc<AtomicU64>,
    last_sequence: Arc<AtomicU32>,
    last_at_ns: AtomicU64,
    epoch: Instant,
    notify: EventFd,
    dropped: AtomicBool,
}

impl Heartbeats {
    /// No heartbeats yet; `notify` is signalled on each one.
    pub fn new(notify: EventFd) -> Self {
        Heartbeats {
            count: Arc::new(AtomicU64::new(0)),
            last_sequence: Arc::new(AtomicU32::new(0)),
            last_at_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            notify,
            dropped: AtomicBool::new(false),
        }
    }

    /// Records one heartbeat.
    pub fn beat(&self, sequence: u32) {
        if self.dropped.load(Ordering::Relaxed) {
            return;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.last_sequence.store(sequence, Ordering::Relaxed);
        self.last_at_ns.store(now, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Release);
        // An eventfd counter saturates rather than grows, so a flood of beats costs nothing
        // more than the writes; a failed write only delays the watcher until its next look.
        let _ = self.notify.write(1);
    }

    /// While `dropped`, beats are ignored (fault injection).
    pub fn set_dropped(&self, dropped: bool) {
        self.dropped.store(dropped, Ordering::Relaxed);
    }

    /// The current counters.
    pub fn status(&self) -> HeartbeatStatus {
        let count = self.count.load(Ordering::Acquire);
        HeartbeatStatus {
            count,
            last_sequence: self.last_sequence.load(Ordering::Relaxed),
            last_at_ns: self.last_at_ns.load(Ordering::Relaxed),
        }
    }

    /// The count and the last sequence number, shared: they can be read after the machine
    /// is gone.
    pub fn counters(&self) -> (Arc<AtomicU64>, Arc<AtomicU32>) {
        (self.count.clone(), self.last_sequence.clone())
    }

    /// The eventfd written on each beat.
    pub fn notify_fd(&self) -> &EventFd {
        &self.notify
    }

    /// When the last heartbeat arrived, as the vCPU thread that took it saw the clock; `None`
    /// before the first. A watcher that looks late still learns when the guest last beat.
    pub fn last_beat_at(&self) -> Option<Instant> {
        let status = self.status();
        (status.count > 0).then(|| self.epoch + std::time::Duration::from_nanos(status.last_at_ns))
    }

    /// Nanoseconds since the machine was created, on the same clock as `last_at_ns`.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}
