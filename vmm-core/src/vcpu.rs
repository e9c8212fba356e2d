//! vCPU threads: one per vCPU, each running `KVM_RUN` in a loop and owning its `VcpuFd`.
//!
//! A vCPU thread is either *running* guest code or *parked*, waiting for a request. Requests
//! (run, pause, save, restore, exit) arrive on a channel; a running thread is made to look at
//! its channel by a kick: the sender sets `immediate_exit` in the vCPU's `kvm_run` and then
//! signals the thread. The flag makes a `KVM_RUN` about to be entered return at once; the
//! signal makes one already blocked in the kernel (a halted vCPU, or one waiting for SIPI)
//! return. Setting the flag from the sender's side, rather than in the signal handler, means
//! the kick works even before the thread has run a single instruction of its own.
//!
//! Every `KVM_RUN` that returns `EINTR` has first completed any in-flight I/O exit (KVM
//! finishes a pending `in`/`out` before it honours `immediate_exit`), so a paused vCPU is
//! always at an instruction boundary and its saved state is consistent.
//!
//! Exits that end the guest or mean it failed become [`VmEvent`]s for the machine's owner;
//! the thread then parks. It never decides what happens next.
//!
//! Where the process may raise priorities (`CAP_SYS_NICE`), a parked thread runs at
//! [`ANSWER_BOOST`] nice levels above the process's own, so that it answers its owner (a
//! pause, a save, a restore on a failover) at once even on a host whose cores are busy with
//! other guests; it drops back to the process's nice before it enters the guest again. A
//! parked thread uses no CPU of its own accord, so the boost costs running guests nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_run, KVM_EXIT_DIRTY_RING_FULL, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::regs;
use crate::devices::{Devices, PortEffect};
use crate::host_limits::{
    complete_refused_instruction, refused_code_changed, remove_trap, Look, PageFaultTrap,
};
use crate::memory::GuestRam;
use crate::run_clock::RunClock;
use crate::state::{write_msrs, StateError, VcpuState, VcpuStateLayout};

/// Why a vCPU stopped running guest code on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuStop {
    /// The guest wrote the debug-exit port: a deliberate end with this exit status.
    GuestExit {
        /// `(value << 1) | 1`, as QEMU's isa-debug-exit reports it.
        code: i32,
    },
    /// The guest asked for a reset (i8042 command 0xfe, or a KVM reset event).
    ResetRequested,
    /// The guest reported a panic (pvpanic, or a KVM crash event).
    Panicked,
    /// The guest powered itself off (ACPI S5 through the sleep control port).
    PoweredOff,
    /// The vCPU shut down: a triple fault, or a KVM shutdown event.
    Shutdown,
    /// KVM could not go on with the guest (e.g. an instruction it cannot emulate).
    InternalError {
        /// KVM's suberror code (1 = emulation failure).
        suberror: u32,
        /// Extra data KVM gave, such as the instruction bytes.
        data: Vec<u64>,
        /// The guest RIP at the failure, when it could be read.
        rip: Option<u64>,
    },
    /// Hardware refused to enter the guest.
    FailedEntry {
        /// The hardware's entry failure reason.
        reason: u64,
        /// The host CPU it happened on.
        cpu: u32,
    },
    /// `KVM_RUN` itself failed.
    RunFailed {
        /// The errno it returned.
        errno: i32,
    },
    /// An exit the machine has no use for.
    UnexpectedExit {
        /// The exit, as text.
        exit: String,
    },
    /// The thread running the vCPU ended without being asked to.
    ThreadDied,
}

impl VcpuStop {
    /// Whether this is the guest ending deliberately rather than failing.
    pub fn is_clean_end(&self) -> bool {
        matches!(self, VcpuStop::GuestExit { .. } | VcpuStop::PoweredOff)
    }
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::GuestExit { code } => write!(f, "guest exited with status {code}"),
            VcpuStop::ResetRequested => write!(f, "guest requested a reset"),
            VcpuStop::Panicked => write!(f, "guest panicked"),
            VcpuStop::PoweredOff => write!(f, "guest powered off"),
            VcpuStop::Shutdown => write!(f, "vCPU shut down (triple fault)"),
            VcpuStop::InternalError {
                suberror,
                rip,
                data,
            } => {
                write!(f, "KVM internal error, suberror {suberror}")?;
                if let Some(rip) = rip {
                    write!(f, ", at rip {rip:#x}")?;
                }
                if !data.is_empty() {
                    write!(f, " (data {data:x?})")?;
                }
                Ok(())
            }
            VcpuStop::FailedEntry { reason, cpu } => {
                write!(f, "VM entry failed, reason {reason:#x} on host cpu {cpu}")
            }
            VcpuStop::RunFailed { errno } => {
                write!(
                    f,
                    "KVM_RUN failed: {}",
                    std::io::Error::from_raw_os_error(*errno)
                )
            }
            VcpuStop::UnexpectedExit { exit } => write!(f, "unexpected exit {exit}"),
            VcpuStop::ThreadDied => write!(f, "vCPU thread died"),
        }
    }
}

/// A vCPU stopped; sent to the machine's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    /// Index of the vCPU.
    pub vcpu: u8,
    /// Why.
    pub stop: VcpuStop,
}

pub(crate) enum VcpuRequest {
    /// Put the boot vCPU at the kernel's 64-bit entry.
    Boot(u64, Sender<Result<(), StateError>>),
    /// Run guest code until paused or stopped.
    Run,
    /// Stop at an instruction boundary and acknowledge.
    Pause(Sender<()>),
    /// Save the vCPU's state (parked only).
    Save(Sender<Result<VcpuState, StateError>>),
    /// Load a state (parked only).
    Restore(Box<VcpuState>, Sender<Result<(), StateError>>),
    /// End the thread.
    Exit,
    /// Fail the thread abruptly (fault injection).
    Crash,
    /// Stop answering requests for good, as a thread stuck in the host kernel would (fault
    /// injection).
    Stall,
    /// Inject an uncorrectable machine check (fault injection).
    MachineCheck(Sender<Result<(), StateError>>),
}

/// How many nice levels a parked vCPU thread is raised above the process's own.
pub const ANSWER_BOOST: i32 = 10;

/// The process's own nice value (its main thread's), which vCPU threads run guest code at.
pub fn process_nice() -> i32 {
    // SAFETY: getpriority has no preconditions; -1 is also a valid answer, which only
    // matters when it comes with errno, and a failure leaves the default of 0.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, libc::getpid() as libc::id_t);
        if nice == -1 && *libc::__errno_location() != 0 {
            0
        } else {
            nice
        }
    }
}

/// Sets the calling thread's nice value; a refusal (no privilege to raise it) leaves it.
pub fn set_own_nice(nice: i32) {
    // SAFETY: gettid has no preconditions; setpriority with a thread id changes that thread
    // only, and failing changes nothing.
    unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::gettid() as libc::id_t,
            nice.clamp(-20, 19),
        );
    }
}

/// Whether a vCPU is parked (held out of the guest by its owner: paused, saving, stopped),
/// and the CPU time its thread spent parked, answering its owner, which is not the guest's
/// ([`crate::run_clock`]). Written by the vCPU thread, read by anyone.
pub(crate) struct ParkClock {
    parked: AtomicBool,
    /// The thread's CPU time spent parked, over the parks that have ended (ns).
    cpu_total_ns: AtomicU64,
    /// The thread's CPU time when the current park began (ns).
    cpu_at_park_ns: AtomicU64,
}

/// The calling thread's CPU time, in nanoseconds.
fn own_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec; this clock exists for every thread.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl ParkClock {
    pub fn new() -> Self {
        ParkClock {
            parked: AtomicBool::new(false),
            cpu_total_ns: AtomicU64::new(0),
            cpu_at_park_ns: AtomicU64::new(0),
        }
    }

    /// Called by the vCPU thread as it parks.
    fn park(&self) {
        if !self.parked.load(Ordering::Acquire) {
            self.cpu_at_park_ns.store(own_cpu_ns(), Ordering::Release);
            self.parked.store(true, Ordering::Release);
        }
    }

    /// Called by the vCPU thread as it goes back to the guest.
    fn unpark(&self) {
        if self.parked.load(Ordering::Acquire) {
            let spent = own_cpu_ns().saturating_sub(self.cpu_at_park_ns.load(Ordering::Acquire));
            self.cpu_total_ns.fetch_add(spent, Ordering::AcqRel);
            self.parked.store(false, Ordering::Release);
        }
    }
}

impl crate::run_clock::ParkedCpu for ParkClock {
    fn parked_cpu(&self, cpu_now: std::time::Duration) -> std::time::Duration {
        let current = if !self.parked.load(Ordering::Acquire) {
            0
        } else {
            (cpu_now.as_nanos() as u64).saturating_sub(self.cpu_at_park_ns.load(Ordering::Acquire))
        };
        std::time::Duration::from_nanos(self.cpu_total_ns.load(Ordering::Acquire) + current)
    }

    fn is_parked(&self) -> bool {
        self.parked.load(Ordering::Acquire)
    }
}

/// What a vCPU thread needs besides its `VcpuFd`.
pub(crate) struct VcpuContext {
    pub index: u8,
    pub devices: Arc<Devices>,
    pub events: Sender<VmEvent>,
    pub events_ready: EventFd,
    pub layout: Arc<VcpuStateLayout>,
    /// Guest RAM, to read the instruction at a failed emulation.
    pub ram: GuestRam,
    /// Whether instructions the host refused to run are completed where that can be done
    /// exactly ([`crate::host_limits`]).
    pub complete_refused_instructions: bool,
    /// On a host that refuses `int3` at CPL0: the trap over the guest's page-fault handler
    /// that finishes a `syscall` the host leaves half done, where it does
    /// ([`crate::host_limits`]).
    pub fault_trap: Option<PageFaultTrap>,
    /// Set once the machine is fenced: the thread never enters the guest again.
    pub fenced: Arc<AtomicBool>,
    /// How long the vCPU has been parked.
    pub park_clock: Arc<ParkClock>,
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make a blocked KVM_RUN return EINTR. The
    // sender set immediate_exit before signalling.
}

/// A vCPU's `kvm_run` mapping, for setting `immediate_exit` from another thread.
struct KvmRunFlag(*mut kvm_run);

// SAFETY: the pointer is only used for single-byte volatile writes of `immediate_exit`, which
// KVM reads with READ_ONCE at KVM_RUN entry; the mapping lives as long as the VcpuFd, which the
// handle keeps alive (`VcpuHandle::fd`).
unsafe impl Send for KvmRunFlag {}
// SAFETY: as above; concurrent byte writes of the same value are harmless.
unsafe impl Sync for KvmRunFlag {}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result
}

/// The machine's handle on one vCPU thread.
pub(crate) struct VcpuHandle {
    pub requests: Sender<VcpuRequest>,
    pub thread: Option<JoinHandle<()>>,
    pub fd: Arc<Mutex<VcpuFd>>,
    immediate_exit: KvmRunFlag,
    fenced: Arc<AtomicBool>,
    run_clock: Arc<RunClock>,
}

impl VcpuHandle {
    /// Sends `request` and makes sure a running thread sees it.
    pub fn send(&self, request: VcpuRequest) -> bool {
        let sent = self.requests.send(request).is_ok();
        self.kick();
        sent
    }

    /// Fences the vCPU without waiting for its thread: from the moment its `KVM_RUN` returns
    /// (at once, for a running vCPU) it never enters the guest again, whatever it is asked.
    /// A thread blocked in the host kernel leaves the guest with the kick's signal pending,
    /// so it cannot run another guest instruction either.
    pub fn fence(&self) {
        // Before the kick: a thread that clears immediate_exit afterwards sees the flag.
        self.fenced.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// The vCPU's run time so far: how long it has had the host CPU it asked for
    /// ([`crate::run_clock`]).
    pub fn ran(&self) -> std::time::Duration {
        self.run_clock.ran()
    }

    /// Whether its run time tells a halted vCPU from a stuck thread.
    pub fn sees_halts(&self) -> bool {
        self.run_clock.sees_halts()
    }

    fn kick(&self) {
        // SAFETY: see KvmRunFlag; the VcpuFd owning the mapping is kept alive by `self.fd`.
        unsafe { std::ptr::write_volatile(&mut (*self.immediate_exit.0).immediate_exit, 1) };
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Some(thread) = &self.thread {
            // A thread that already ended cannot be signalled; that is fine.
            let _ = thread.kill(kick_signal());
        }
    }
}

/// Spawns the thread for `vcpu`, parked until its first `Run`.
///
/// The `VcpuFd` is shared with the machine so that it outlives its thread: if the thread
/// dies, the machine can still read the vCPU's state (the thread holds the lock for as long
/// as it lives, so nobody else touches the vCPU while it does).
pub(crate) fn spawn(
    vcpu: Arc<Mutex<VcpuFd>>,
    context: VcpuContext,
    machine: &str,
) -> std::io::Result<VcpuHandle> {
    let (requests, inbox) = std::sync::mpsc::channel();
    let name = format!("{machine}-vcpu{}", context.index);
    let (immediate_exit, raw_fd) = {
        let mut fd = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        (
            KvmRunFlag(fd.get_kvm_run() as *mut kvm_run),
            std::os::fd::AsRawFd::as_raw_fd(&*fd),
        )
    };
    let fd = vcpu.clone();
    let fenced = context.fenced.clone();
    let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let own_tid = tid.clone();
    let run_clock = Arc::new(RunClock::new(
        raw_fd,
        tid.clone(),
        context.park_clock.clone(),
    ));
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        crate::jail::enter(crate::jail::ThreadKind::Vcpu);
        // SAFETY: gettid has no preconditions.
        own_tid.store(unsafe { libc::gettid() }, Ordering::Release);
        let mut guard = fd.lock().unwrap_or_else(|e| e.into_inner());
        let mut obituary = Obituary {
            index: context.index,
            events: context.events.clone(),
            events_ready: context.events_ready.try_clone().ok(),
            expected: false,
        };
        VcpuThread {
            vcpu: &mut guard,
            context,
            inbox,
        }
        .run();
        obituary.expected = true;
    })?;
    run_clock.set_thread(std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread));
    Ok(VcpuHandle {
        requests,
        thread: Some(thread),
        fd: vcpu,
        immediate_exit,
        fenced,
        run_clock,
    })
}

/// Reports a vCPU thread that ends other than by request (it panicked, or a fault was
/// injected), so its machine's owner learns the vCPU is gone.
struct Obituary {
    index: u8,
    events: Sender<VmEvent>,
    events_ready: Option<EventFd>,
    expected: bool,
}

impl Drop for Obituary {
    fn drop(&mut self) {
        if self.expected {
            return;
        }
        let event = VmEvent {
            vcpu: self.index,
            stop: VcpuStop::ThreadDied,
        };
        if self.events.send(event).is_ok() {
            if let Some(ready) = &self.events_ready {
                let _ = ready.write(1);
            }
        }
    }
}

/// What to do after handling a request.
enum Next {
    Park,
    Run,
    Exit,
}

struct VcpuThread<'a> {
    vcpu: &'a mut VcpuFd,
    context: VcpuContext,
    inbox: Receiver<VcpuRequest>,
}

impl VcpuThread<'_> {
    fn run(mut self) {
        let clock = self.context.park_clock.clone();
        let (running_nice, parked_nice) = {
            let nice = process_nice();
            (nice, nice - ANSWER_BOOST)
        };
        let park = |clock: &ParkClock| {
            clock.park();
            set_own_nice(parked_nice);
        };
        let unpark = |clock: &ParkClock| {
            set_own_nice(running_nice);
            clock.unpark();
        };
        let mut running = false;
        park(&clock);
        loop {
            if !running {
                let next = match self.inbox.recv() {
                    Ok(request) => self.handle(request, false),
                    Err(_) => Next::Exit, // the machine is gone
                };
                match next {
                    Next::Exit => break,
                    Next::Run => {
                        running = true;
                        unpark(&clock);
                    }
                    Next::Park => {}
                }
                continue;
            }
            if self.context.fenced.load(Ordering::SeqCst) {
                // Fenced: requests are still answered (a save, an exit), guest code never runs.
                running = false;
                park(&clock);
                continue;
            }
            match self.run_once() {
                RunOutcome::Continue => {}
                RunOutcome::Interrupted => match self.drain_requests() {
                    Next::Exit => break,
                    Next::Park => {
                        running = false;
                        park(&clock);
                    }
                    Next::Run => {}
                },
                RunOutcome::Stopped(stop) => {
                    self.settle();
                    running = false;
                    park(&clock);
                    self.report(stop);
                }
            }
        }
    }

    /// Handles every queued request after an interrupted `KVM_RUN`.
    fn drain_requests(&mut self) -> Next {
        // Clear before draining: a kick for a request queued after the drain sets it again.
        self.vcpu.set_kvm_immediate_exit(0);
        // Requests queued together are handled in order, each seeing the state the previous
        // one left: a Save queued behind a Pause must not set the vCPU running again.
        let mut next = Next::Run;
        loop {
            match self.inbox.try_recv() {
                Ok(request) => {
                    let running = matches!(next, Next::Run);
                    match self.handle(request, running) {
                        Next::Exit => return Next::Exit,
                        other => next = other,
                    }
                }
                Err(TryRecvError::Empty) => return next,
                Err(TryRecvError::Disconnected) => return Next::Exit,
            }
        }
    }

    fn handle(&mut self, request: VcpuRequest, running: bool) -> Next {
        let keep = if running { Next::Run } else { Next::Park };
        match request {
            VcpuRequest::Run => Next::Run,
            VcpuRequest::Pause(ack) => {
                let _ = ack.send(());
                Next::Park
            }
            VcpuRequest::Save(reply) => {
                let _ = reply.send(VcpuState::save(self.vcpu, &self.context.layout));
                keep
            }
            VcpuRequest::Restore(state, reply) => {
                let restored = state.restore(self.vcpu);
                if restored.is_ok() {
                    self.after_restore();
                }
                let _ = reply.send(restored);
                keep
            }
            VcpuRequest::Boot(entry, reply) => {
                let _ = reply.send(self.set_boot_state(entry));
                keep
            }
            VcpuRequest::Exit => Next::Exit,
            VcpuRequest::MachineCheck(reply) => {
                let _ = reply.send(crate::mce::inject_uncorrectable(self.vcpu));
                keep
            }
            VcpuRequest::Crash => {
                // As if the code running this vCPU had failed: the thread unwinds without
                // any orderly hand-over (the panic hook is skipped, so nothing is printed).
                std::panic::resume_unwind(Box::new("injected vCPU thread failure"))
            }
            VcpuRequest::Stall => loop {
                // Never answers again and keeps the vCPU (and its lock) for good.
                std::thread::park();
            },
        }
    }

    fn set_boot_state(&self, entry: u64) -> Result<(), StateError> {
        let step = |name, r: Result<(), kvm_ioctls::Error>| {
            r.map_err(|source| StateError { step: name, source })
        };
        let sregs = self.vcpu.get_sregs().map_err(|source| StateError {
            step: "KVM_GET_SREGS",
            source,
        })?;
        step(
            "KVM_SET_SREGS",
            self.vcpu.set_sregs(&regs::boot_sregs(sregs)),
        )?;
        step("KVM_SET_REGS", self.vcpu.set_regs(&regs::boot_regs(entry)))?;
        step("KVM_SET_FPU", self.vcpu.set_fpu(&regs::boot_fpu()))?;
        write_msrs(self.vcpu, &regs::boot_msrs())
    }

    /// A restored guest's page-fault handler may be anywhere, with or without the trap of a
    /// host that needs one: where this host needs it, it is looked for before the guest runs;
    /// where it does not, a trap the snapshot carries is taken away (its `int3` would reach
    /// the guest).
    fn after_restore(&mut self) {
        let index = self.context.index;
        match &mut self.context.fault_trap {
            Some(trap) => trap.look_soon(),
            None => match remove_trap(self.vcpu, &self.context.ram) {
                Ok(true) => tracing::debug!(
                    vcpu = index,
                    "took away the page-fault trap the snapshot carried: this host does not need it"
                ),
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(vcpu = index, %err, "could not look for a page-fault trap in the restored guest")
                }
            },
        }
    }

    /// Lays the trap over the guest's page-fault handler where it is due (see
    /// [`PageFaultTrap::look`]).
    fn look_for_fault_trap(&mut self) {
        let Some(trap) = &mut self.context.fault_trap else {
            return;
        };
        match trap.look(self.vcpu, &self.context.ram) {
            Ok(Look::LaidNow(handler)) => tracing::debug!(
                vcpu = self.context.index,
                handler = format_args!("{handler:#x}"),
                "trap laid over the guest's page-fault handler, to finish the system calls this host leaves half done"
            ),
            Ok(Look::Laid(_) | Look::Nothing) => {}
            Err(err) => tracing::warn!(vcpu = self.context.index, %err, "could not look at the guest's page-fault handler"),
        }
    }

    /// Completes an in-flight exit without entering the guest, so saved state is exact.
    fn settle(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        let _ = self.vcpu.run();
        self.vcpu.set_kvm_immediate_exit(0);
    }

    fn report(&self, stop: VcpuStop) {
        tracing::debug!(vcpu = self.context.index, %stop, "vCPU stopped");
        let event = VmEvent {
            vcpu: self.context.index,
            stop,
        };
        // The owner may be gone during teardown; nobody is left to tell then.
        if self.context.events.send(event).is_ok() {
            let _ = self.context.events_ready.write(1);
        }
    }

    fn run_once(&mut self) -> RunOutcome {
        self.look_for_fault_trap();
        let devices = &self.context.devices;
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(err) if err.errno() == libc::EINTR => return RunOutcome::Interrupted,
            Err(err) if err.errno() == libc::EAGAIN => return RunOutcome::Continue,
            Err(err) => return RunOutcome::Stopped(VcpuStop::RunFailed { errno: err.errno() }),
        };
        let stop = match exit {
            VcpuExit::IoIn(port, data) => {
                devices.port_read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => {
                devices.port_write(port, data).map(|effect| match effect {
                    PortEffect::GuestExit(code) => VcpuStop::GuestExit { code },
                    PortEffect::ResetRequested => VcpuStop::ResetRequested,
                    PortEffect::Panicked => VcpuStop::Panicked,
                    PortEffect::PoweredOff => VcpuStop::PoweredOff,
                })
            }
            VcpuExit::MmioRead(addr, data) => {
                devices.mmio_read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                devices.mmio_write(addr, data);
                None
            }
            VcpuExit::Shutdown => Some(VcpuStop::Shutdown),
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                KVM_SYSTEM_EVENT_RESET => VcpuStop::ResetRequested,
                KVM_SYSTEM_EVENT_CRASH => VcpuStop::Panicked,
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::Shutdown,
                other => VcpuStop::UnexpectedExit {
                    exit: format!("SystemEvent({other})"),
                },
            }),
            VcpuExit::FailEntry(reason, cpu) => Some(VcpuStop::FailedEntry { reason, cpu }),
            VcpuExit::InternalError => self.internal_error(),
            VcpuExit::Intr => None,
            VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                // The vCPU dirtied more pages than its ring holds since the last harvest: it
                // can only go on once the owner harvests, at the next checkpoint.
                std::thread::sleep(std::time::Duration::from_micros(200));
                None
            }
            other => Some(VcpuStop::UnexpectedExit {
                exit: format!("{other:?}"),
            }),
        };
        match stop {
            Some(stop) => RunOutcome::Stopped(stop),
            None => RunOutcome::Continue,
        }
    }

    /// A stop for KVM's internal error, or `None` when it was an instruction the host refused
    /// and this thread completed in its place (the guest then simply runs on).
    fn internal_error(&mut self) -> Option<VcpuStop> {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        // SAFETY: an emulation failure's report is `emulation_failure` (the same words as
        // `internal`); its bytes are only taken where its flags say they are there.
        let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
        if let Some(trap) = &mut self.context.fault_trap {
            match trap.at_refused_int3(self.vcpu, &self.context.ram, internal.suberror) {
                Ok(Some(at)) => {
                    tracing::trace!(vcpu = self.context.index, ?at, "page-fault trap taken");
                    return None;
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(vcpu = self.context.index, %err, "could not complete at the page-fault trap")
                }
            }
        }
        if self.context.complete_refused_instructions {
            match complete_refused_instruction(self.vcpu, &self.context.ram, internal.suberror) {
                Ok(Some(instruction)) => {
                    tracing::trace!(
                        vcpu = self.context.index,
                        instruction,
                        "completed an instruction the host refused"
                    );
                    return None;
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(vcpu = self.context.index, %err, "could not complete an instruction the host refused")
                }
            }
        }
        if self.context.complete_refused_instructions {
            let has_bytes = internal.suberror == KVM_INTERNAL_ERROR_EMULATION
                && internal.ndata >= 2
                && failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                    != 0;
            // SAFETY: as above; the union's byte view of the same words.
            let (size, bytes) = unsafe {
                let view = failure.__bindgen_anon_1.__bindgen_anon_1;
                (usize::from(view.insn_size), view.insn_bytes)
            };
            let reported = if has_bytes {
                bytes.get(..size.min(bytes.len())).unwrap_or_default()
            } else {
                &[]
            };
            match refused_code_changed(self.vcpu, &self.context.ram, reported) {
                Ok(true) => {
                    tracing::trace!(
                        vcpu = self.context.index,
                        "the refused instruction was rewritten meanwhile; running what is there now"
                    );
                    return None;
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(vcpu = self.context.index, %err, "could not look at a refused instruction again")
                }
            }
        }
        let count = (internal.ndata as usize).min(internal.data.len());
        let data = internal.data[..count].to_vec();
        let rip = self.vcpu.get_regs().ok().map(|r| r.rip);
        Some(VcpuStop::InternalError {
            suberror: internal.suberror,
            data,
            rip,
        })
    }
}

enum RunOutcome {
    Continue,
    Interrupted,
    Stopped(VcpuStop),
}
