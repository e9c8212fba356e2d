//! The supervisor: starts the guests of an environment and watches them until every one has
//! ended.
//!
//! One thread (the caller's) runs an `event-manager` loop. It is woken by eventfds and
//! timers, never by polling: each guest's vCPU-event eventfd and heartbeat eventfd, a
//! heartbeat-deadline timerfd per watched guest, and a timerfd per planned fault. It alone
//! decides what an event means and changes roles (through [`Guest`]); vCPU threads only
//! report. One guest's failure never touches the other guests.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{Environment, SerialInput, SerialOutput};
use crate::fault::Fault;
use crate::guest::{Change, Guest, StartError};

pub use crate::guest::GuestEnd;

/// A guest's name and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOutcome {
    /// The guest.
    pub name: String,
    /// How it ended.
    pub end: GuestEnd,
    /// Failovers it went through.
    pub failovers: u32,
}

/// Running the environment failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A guest could not be started.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A fault names a guest the environment does not have.
    #[error("--fault {0}: no such guest")]
    UnknownFaultGuest(String),
    /// The event loop or a timer failed.
    #[error("event loop: {0}")]
    EventLoop(String),
}

/// What an eventfd registered with the loop stands for; packed into the event's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    VcpuEvents(usize),
    Heartbeat(usize),
    HeartbeatDeadline(usize),
    Fault(usize),
    Epoch(usize),
}

impl Source {
    fn pack(self) -> u32 {
        let (kind, index) = match self {
            Source::VcpuEvents(i) => (1, i),
            Source::Heartbeat(i) => (2, i),
            Source::HeartbeatDeadline(i) => (3, i),
            Source::Fault(i) => (4, i),
            Source::Epoch(i) => (5, i),
        };
        (kind << 24) | index as u32
    }

    fn unpack(data: u32) -> Option<Self> {
        let index = (data & 0x00ff_ffff) as usize;
        Some(match data >> 24 {
            1 => Source::VcpuEvents(index),
            2 => Source::Heartbeat(index),
            3 => Source::HeartbeatDeadline(index),
            4 => Source::Fault(index),
            5 => Source::Epoch(index),
            _ => return None,
        })
    }
}

struct Watched {
    guest: Guest,
    deadline: TimerFd,
    /// Fires every checkpoint interval, for a checkpointed guest.
    epochs: Option<TimerFd>,
    /// The active machine's eventfds currently registered with the loop.
    registered: Vec<RawFd>,
}

struct Planned {
    fault: Fault,
    guest: usize,
    timer: TimerFd,
}

/// The event-loop subscriber.
struct Supervisor {
    guests: Vec<Watched>,
    faults: Vec<Planned>,
}

impl Supervisor {
    fn all_ended(&self) -> bool {
        self.guests.iter().all(|w| w.guest.end().is_some())
    }

    /// Watches the current active machine of guest `index` (and forgets the previous one's).
    fn rewire(&mut self, index: usize, ops: &mut EventOps) {
        let watched = &mut self.guests[index];
        for fd in watched.registered.drain(..) {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        if watched.guest.end().is_some() {
            let _ = watched.deadline.clear();
            return;
        }
        let Some(vm) = watched.guest.active() else {
            return;
        };
        let wanted = [
            (vm.events_ready().as_raw_fd(), Source::VcpuEvents(index)),
            (vm.heartbeat_ready().as_raw_fd(), Source::Heartbeat(index)),
        ];
        for (fd, source) in wanted {
            match ops.add(Events::with_data_raw(fd, source.pack(), EventSet::IN)) {
                Ok(()) => watched.registered.push(fd),
                Err(err) => tracing::error!(
                    guest = watched.guest.name(),
                    ?err,
                    "cannot watch the guest's events"
                ),
            }
        }
        // A guest that has sent heartbeats is judged by them on its new machine too, from the
        // moment it resumed there; a freshly booted one only once it sends its first.
        let _ = match watched.guest.heartbeat_deadline() {
            Some(left) => watched.deadline.reset(left, None),
            None => watched.deadline.clear(),
        };
    }

    fn on_failure_or_change(&mut self, index: usize, change: Change, ops: &mut EventOps) {
        match change {
            Change::None => {}
            Change::StandbyLost => self.guests[index].guest.recover(),
            Change::NewActive | Change::Ended => {
                self.rewire(index, ops);
                self.guests[index].guest.recover();
            }
        }
        if self.guests[index].guest.end().is_some() {
            if let Some(epochs) = &self.guests[index].epochs {
                let _ = ops.remove(Events::new(epochs, EventSet::IN));
            }
            self.guests[index].epochs = None;
        }
    }

    fn on_heartbeat(&mut self, index: usize) {
        let watched = &mut self.guests[index];
        if let Some(vm) = watched.guest.active() {
            // The counter saturates; reading it re-arms the eventfd.
            let _ = vm.heartbeat_ready().read();
        }
        watched.guest.heartbeat();
        if let Some(timeout) = watched.guest.heartbeat_timeout() {
            if let Err(err) = watched.deadline.reset(timeout, None) {
                tracing::error!(guest = watched.guest.name(), %err, "cannot arm the heartbeat deadline");
            }
        }
    }

    fn on_deadline(&mut self, index: usize, ops: &mut EventOps) {
        let watched = &mut self.guests[index];
        let _ = watched.deadline.wait();
        let Some(failure) = watched.guest.heartbeat_overdue() else {
            // A beat arrived just before the timer fired; its handler re-armed the timer.
            return;
        };
        let change = watched.guest.on_failure(failure);
        self.on_failure_or_change(index, change, ops);
    }

    fn on_fault(&mut self, fault_index: usize, ops: &mut EventOps) {
        let planned = &mut self.faults[fault_index];
        let _ = planned.timer.wait();
        let _ = ops.remove(Events::new(&planned.timer, EventSet::IN));
        let (index, kind) = (planned.guest, planned.fault.kind);
        let guest = &mut self.guests[index].guest;
        if guest.end().is_some() {
            return;
        }
        if let Some(failure) = guest.inject(kind) {
            let change = guest.on_failure(failure);
            self.on_failure_or_change(index, change, ops);
        }
    }
}

impl MutEventSubscriber for Supervisor {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match Source::unpack(events.data()) {
            Some(Source::VcpuEvents(index)) => {
                let change = self.guests[index].guest.on_vcpu_events();
                self.on_failure_or_change(index, change, ops);
            }
            Some(Source::Heartbeat(index)) => self.on_heartbeat(index),
            Some(Source::HeartbeatDeadline(index)) => self.on_deadline(index, ops),
            Some(Source::Fault(index)) => self.on_fault(index, ops),
            Some(Source::Epoch(index)) => {
                if let Some(epochs) = &mut self.guests[index].epochs {
                    let _ = epochs.wait();
                }
                let change = self.guests[index].guest.run_epoch();
                self.on_failure_or_change(index, change, ops);
            }
            None => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for index in 0..self.guests.len() {
            let deadline = &self.guests[index].deadline;
            let source = Source::HeartbeatDeadline(index).pack();
            if let Err(err) = ops.add(Events::with_data(deadline, source, EventSet::IN)) {
                tracing::error!(?err, "cannot watch heartbeat deadlines");
            }
            if let Some(epochs) = &self.guests[index].epochs {
                let source = Source::Epoch(index).pack();
                if let Err(err) = ops.add(Events::with_data(epochs, source, EventSet::IN)) {
                    tracing::error!(?err, "cannot schedule checkpoints");
                }
            }
            self.rewire(index, ops);
        }
        for (index, planned) in self.faults.iter().enumerate() {
            let source = Source::Fault(index).pack();
            if let Err(err) = ops.add(Events::with_data(&planned.timer, source, EventSet::IN)) {
                tracing::error!(?err, "cannot schedule fault");
            }
        }
    }
}

/// Feeds standard input to a guest's console until input ends or the guest is gone.
fn forward_stdin(supervisor: std::sync::Weak<Mutex<Supervisor>>, index: usize) {
    use std::io::Read;
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 256];
    while let Ok(n) = stdin.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let Some(supervisor) = supervisor.upgrade() else {
                return;
            };
            let taken = {
                let mut supervisor = supervisor.lock().unwrap_or_else(|e| e.into_inner());
                let guest = &mut supervisor.guests[index].guest;
                if guest.end().is_some() {
                    return;
                }
                guest.console_input(pending)
            };
            pending = &pending[taken..];
            if taken == 0 {
                // The UART FIFO is full until the guest reads; try again shortly.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

fn timer_error(err: vmm_sys_util::errno::Error) -> RunError {
    RunError::EventLoop(format!("timerfd: {err}"))
}

/// Starts every guest of `env`, fires the planned `faults`, and returns once every guest has
/// ended, with how each ended.
pub fn run_environment(env: &Environment, faults: &[Fault]) -> Result<Vec<GuestOutcome>, RunError> {
    let mut planned = Vec::with_capacity(faults.len());
    for fault in faults {
        let guest = env
            .guest
            .iter()
            .position(|g| g.name == fault.guest)
            .ok_or_else(|| RunError::UnknownFaultGuest(fault.guest.clone()))?;
        planned.push((fault.clone(), guest));
    }
    // Fault times count from here, before the guests start: starting a checkpointed guest
    // includes copying its RAM once, which must not shift the plan.
    let mut faults = Vec::with_capacity(planned.len());
    for (fault, guest) in planned {
        let mut timer = TimerFd::new().map_err(timer_error)?;
        // A zero duration would disarm the timer; the earliest fault fires after 1 ms.
        timer
            .reset(fault.after.max(Duration::from_millis(1)), None)
            .map_err(timer_error)?;
        faults.push(Planned {
            fault,
            guest,
            timer,
        });
    }
    let stdout_users = env
        .guest
        .iter()
        .filter(|g| g.serial == SerialOutput::Stdout)
        .count();
    let mut guests = Vec::with_capacity(env.guest.len());
    for config in &env.guest {
        let guest = Guest::start(config, stdout_users > 1)?;
        let epochs = match guest.checkpoint_interval() {
            Some(interval) => {
                let mut timer = TimerFd::new().map_err(timer_error)?;
                timer.reset(interval, Some(interval)).map_err(timer_error)?;
                Some(timer)
            }
            None => None,
        };
        guests.push(Watched {
            guest,
            deadline: TimerFd::new().map_err(timer_error)?,
            epochs,
            registered: Vec::new(),
        });
    }
    let supervisor = Arc::new(Mutex::new(Supervisor { guests, faults }));
    if let Some(index) = env
        .guest
        .iter()
        .position(|g| g.serial_input == SerialInput::Stdin)
    {
        let weak = Arc::downgrade(&supervisor);
        std::thread::Builder::new()
            .name("console-input".into())
            .spawn(move || forward_stdin(weak, index))
            .map_err(|e| RunError::EventLoop(format!("console input thread: {e}")))?;
    }
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| RunError::EventLoop(format!("{e:?}")))?;
    manager.add_subscriber(supervisor.clone());
    loop {
        if supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .all_ended()
        {
            break;
        }
        manager
            .run()
            .map_err(|e| RunError::EventLoop(format!("{e:?}")))?;
    }
    let mut supervisor = supervisor.lock().unwrap_or_else(|e| e.into_inner());
    Ok(supervisor
        .guests
        .drain(..)
        .map(|w| GuestOutcome {
            name: w.guest.name().to_owned(),
            end: w.guest.end().cloned().unwrap_or(GuestEnd::Reset),
            failovers: w.guest.failovers(),
        })
        .collect())
}
