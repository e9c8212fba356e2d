//! Runs the guests of an environment and watches them until every one has ended.
//!
//! One thread (the caller's) runs an `event-manager` loop woken by each machine's vCPU event
//! eventfd; it alone decides what a stopped vCPU means for its guest. vCPU threads only
//! report. A guest's end never touches the other guests.

use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_core::{SerialSink, VcpuStop, Vm, VmError};

use crate::config::{Environment, GuestConfig, SerialInput, SerialOutput};

/// How a guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest wrote the debug-exit port.
    Exited {
        /// Its exit status, `(value << 1) | 1`.
        code: i32,
    },
    /// The guest asked for a reset (i8042), which ends it.
    Reset,
    /// The guest failed: a vCPU stopped for a reason that is not a deliberate end.
    Failed {
        /// The vCPU that stopped.
        vcpu: u8,
        /// Why.
        stop: VcpuStop,
    },
}

/// A guest's name and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOutcome {
    /// The guest.
    pub name: String,
    /// How it ended.
    pub end: GuestEnd,
}

/// Starting a guest failed; nothing of the environment keeps running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The guest's machine could not be built or booted.
    #[error("guest {guest}: {step}: {source}")]
    Start {
        /// The guest.
        guest: String,
        /// "create machine", "boot", "start".
        step: &'static str,
        /// What failed.
        source: VmError,
    },
    /// The guest's console file cannot be created.
    #[error("guest {guest}: cannot create console file {path}: {source}")]
    SerialFile {
        /// The guest.
        guest: String,
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
}

fn serial_sink(guest: &GuestConfig) -> Result<SerialSink, RunError> {
    Ok(match &guest.serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File(path) => {
            Box::new(File::create(path).map_err(|source| RunError::SerialFile {
                guest: guest.name.clone(),
                path: path.clone(),
                source,
            })?)
        }
    })
}

/// Builds, boots and starts one guest's machine.
pub fn start_guest(guest: &GuestConfig) -> Result<Vm, RunError> {
    let start_err = |step| {
        let guest = guest.name.clone();
        move |source| RunError::Start {
            guest,
            step,
            source,
        }
    };
    let begun = Instant::now();
    let vm = Vm::create(&guest.machine_spec(), serial_sink(guest)?)
        .map_err(start_err("create machine"))?;
    vm.boot(&guest.boot_source()).map_err(start_err("boot"))?;
    vm.resume().map_err(start_err("start"))?;
    tracing::info!(
        guest = %guest.name,
        memory_mib = guest.memory_mib,
        vcpus = guest.vcpus,
        setup_us = begun.elapsed().as_micros() as u64,
        "guest started"
    );
    Ok(vm)
}

/// Feeds standard input to `vm`'s console until input ends or the machine is gone.
fn forward_stdin(vm: std::sync::Weak<Vm>) {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 256];
    while let Ok(n) = stdin.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let Some(vm) = vm.upgrade() else { return };
            let taken = vm.serial_input(pending);
            pending = &pending[taken..];
            if taken == 0 {
                // The UART FIFO is full until the guest reads; try again shortly.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

struct Watched {
    name: String,
    vm: Arc<Vm>,
    end: Option<GuestEnd>,
}

/// The event-loop subscriber: one registered eventfd per guest, its index as the data.
struct Watcher {
    guests: Vec<Watched>,
}

impl Watcher {
    fn on_vcpu_event(&mut self, index: usize) {
        let guest = &mut self.guests[index];
        while let Some(event) = guest.vm.next_event(Duration::ZERO) {
            if guest.end.is_some() {
                continue; // a second vCPU stopping after the guest already ended
            }
            let end = match event.stop {
                VcpuStop::GuestExit { code } => GuestEnd::Exited { code },
                VcpuStop::ResetRequested => GuestEnd::Reset,
                stop => GuestEnd::Failed {
                    vcpu: event.vcpu,
                    stop,
                },
            };
            // Stop the guest's other vCPUs too: the guest is over either way.
            if let Err(err) = guest.vm.pause() {
                tracing::warn!(guest = %guest.name, %err, "could not stop the remaining vCPUs");
            }
            guest.vm.flush_serial();
            match &end {
                GuestEnd::Failed { vcpu, stop } => {
                    tracing::error!(guest = %guest.name, vcpu, %stop, "guest failed")
                }
                GuestEnd::Exited { code } => {
                    tracing::info!(guest = %guest.name, code, "guest exited")
                }
                GuestEnd::Reset => {
                    tracing::info!(guest = %guest.name, "guest requested a reset; ending it")
                }
            }
            guest.end = Some(end);
        }
    }

    fn all_ended(&self) -> bool {
        self.guests.iter().all(|g| g.end.is_some())
    }
}

impl MutEventSubscriber for Watcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.on_vcpu_event(events.data() as usize);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, guest) in self.guests.iter().enumerate() {
            let events = Events::with_data(guest.vm.events_ready(), index as u32, EventSet::IN);
            if let Err(err) = ops.add(events) {
                tracing::error!(guest = %guest.name, ?err, "cannot watch guest events");
            }
        }
    }
}

/// Starts every guest of `env` and returns once each has ended, with how it ended.
pub fn run_environment(env: &Environment) -> Result<Vec<GuestOutcome>, RunError> {
    let mut guests = Vec::with_capacity(env.guest.len());
    for config in &env.guest {
        let vm = Arc::new(start_guest(config)?);
        if config.serial_input == SerialInput::Stdin {
            let weak = Arc::downgrade(&vm);
            std::thread::Builder::new()
                .name(format!("{}-stdin", config.name))
                .spawn(move || forward_stdin(weak))
                .map_err(|e| RunError::Start {
                    guest: config.name.clone(),
                    step: "start console input",
                    source: VmError::Thread(e),
                })?;
        }
        guests.push(Watched {
            name: config.name.clone(),
            vm,
            end: None,
        });
    }
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(RunError::EventLoop)?;
    let watcher = Arc::new(Mutex::new(Watcher { guests }));
    manager.add_subscriber(watcher.clone());
    loop {
        {
            let watcher = watcher.lock().unwrap_or_else(|e| e.into_inner());
            if watcher.all_ended() {
                break;
            }
        }
        manager.run().map_err(RunError::EventLoop)?;
    }
    let mut watcher = watcher.lock().unwrap_or_else(|e| e.into_inner());
    Ok(watcher
        .guests
        .drain(..)
        .map(|g| GuestOutcome {
            name: g.name,
            // The loop above ends only when every guest has an end.
            end: g.end.unwrap_or(GuestEnd::Reset),
        })
        .collect())
}
