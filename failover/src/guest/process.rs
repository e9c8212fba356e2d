//! `process = "separate"`, the active's side: the guest runs here, and a standby process
//! (`understudy standby`) follows it through the take-over journal. This side listens on the
//! attach socket, writes the journal once a standby has announced itself (a batch, then one
//! record per epoch), and holds the guest's console output in those records: the standby
//! releases it, so that output is released by exactly one process whichever of them dies.
//!
//! While no standby is following, the output is released here at each epoch tick. When a
//! standby goes away, the output of the records it had not released (its mark in the
//! journal's header says which) is released here, and the journal is removed. This process
//! holds the guest's active lock ([`ActiveLock`]) from before the guest starts until its
//! machine is fenced for good or the guest has ended.
//!
//! Runs on the guest's own thread; the batch's bulk copy runs in the background.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_core::{DirtyLog, DirtyPages, GuestRam, SerialSink, Vm, VmError, VmEvent};

use super::{us, Context, Finished};
use crate::background::JobId;
use crate::checkpoint::{EpochStats, Precopied};
use crate::config::JournalConfig;
use crate::console::HeldOutput;
use crate::control::protocol::StandbyProcessStatus;
use crate::disk::EpochDisk;
use crate::disk_handoff::{self, SealedEpoch};
use crate::journal::{EpochRecord, Journal, JournalError};
use crate::link::{send, ActiveLock, Lines, LinkError, ToActive, ToStandby};
use crate::remote::ActiveSide;

/// Rounds of copying into the batch while the guest runs, at most.
const BATCH_ROUNDS: u32 = 8;
/// Few enough dirty pages to leave to the pause that seals the batch.
const BATCH_DONE_PAGES: u64 = 1024;

/// Where a standby process's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connected; its `hello` is awaited.
    Hello,
    /// The journal is created and announced; `opened` is awaited.
    Opened,
    /// The batch's bulk is being copied in the background.
    Batching(JobId),
    /// The batch is sealed; the standby is loading it (records are written meanwhile).
    Loading,
    /// The standby has caught up: failover to it is armed.
    Following,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Hello => "hello",
            Phase::Opened => "opening",
            Phase::Batching(_) => "batching",
            Phase::Loading => "loading",
            Phase::Following => "following",
        }
    }
}

/// A record the standby has not said it applied yet: where it lies and what it printed.
struct Unapplied {
    seq: u64,
    offset: u64,
    len: u64,
    output: Vec<u8>,
}

struct Session {
    conn: UnixStream,
    lines: Lines,
    /// Message bytes the connection has not taken yet (it is non-blocking).
    out: Vec<u8>,
    pid: u32,
    phase: Phase,
    journal: Option<Arc<Journal>>,
    /// The last epoch written (the batch is epoch 0).
    seq: u64,
    /// The last record's place.
    last: Option<(u64, u64)>,
    unapplied: VecDeque<Unapplied>,
    /// Pages dirtied by epochs that found no room in the journal, for the next one.
    carry: Option<DirtyPages>,
    /// Output of those epochs.
    carry_output: Vec<u8>,
    since: Instant,
}

/// What a journal epoch did, for the guest to act on.
pub(crate) enum LinkTick {
    /// Nothing to act on.
    Done,
    /// A vCPU of the active stopped on its own; its events.
    ActiveStopped(Vec<VmEvent>),
    /// A vCPU did not answer the pause.
    Unresponsive(u8),
}

/// The active side of a guest whose standby is a process of its own.
pub(crate) struct StandbyLink {
    guest: String,
    config: JournalConfig,
    interval: Duration,
    memory: u64,
    listener: UnixListener,
    held: HeldOutput,
    /// The active's console; with a remote standby, shared with the shipper, which releases
    /// each epoch's output once the standby acknowledged it.
    console: Arc<Mutex<SerialSink>>,
    /// With `process = "remote"`: the shipper to remote standbys.
    remote: Option<Arc<ActiveSide>>,
    session: Option<Session>,
    /// Output taken from the guest but not released: the line it is still printing, while
    /// no record carries output (so that a session's first record never starts mid-line).
    pending: Vec<u8>,
    /// When the unfinished line held back (in `pending` or a session's carry) began.
    tail_since: Option<Instant>,
    /// The guest's active lock, held while this process may run the guest.
    lock: Option<ActiveLock>,
    /// Whether the attach socket's path still belongs to this link (it is given up when the
    /// guest is handed over, for the standby process to bind).
    owns_socket: bool,
    /// Connections of sessions that ended, kept open until the guest's loop has stopped
    /// watching them (a descriptor closed first could come back as the next connection's
    /// while still registered).
    closed: Vec<UnixStream>,
    identifier: u64,
    stats: EpochStats,
    sessions: u64,
    /// Epochs deferred because the journal had no room.
    deferred: u64,
    /// What the guest's crash-loop guard counts, told to each standby that attaches.
    failovers: Vec<u64>,
    /// The guest's checkpointed disks: their epoch logs go with the records
    /// ([`crate::disk_handoff`]).
    disks: Vec<Arc<EpochDisk>>,
}

/// Why no standby link could be made for a guest, with the console it was given.
pub struct Unattached {
    /// Why.
    pub why: String,
    /// The console, unused.
    pub console: SerialSink,
}

impl Unattached {
    fn new(why: impl Into<String>, console: SerialSink) -> Unattached {
        Unattached {
            why: why.into(),
            console,
        }
    }
}

/// A console shared behind a lock, written through it.
struct SharedConsole(Arc<Mutex<SerialSink>>);

impl std::io::Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

impl StandbyLink {
    /// Listens for a standby process of `ctx`'s guest; returns the link and the sink the
    /// active's console writes to. `unfinished` is the line the guest was printing when this
    /// process took it over, released with the rest of it.
    /// The guest's active lock (see [`ActiveLock`]) is `lock` when this process took the
    /// guest over holding it, else taken here: a guest whose lock another process holds is
    /// refused, before it starts. On an error, `lock` holds what it held before and the
    /// console comes back with the reason.
    pub fn new(
        ctx: &Context,
        console: SerialSink,
        unfinished: Vec<u8>,
        lock: &mut Option<ActiveLock>,
    ) -> Result<(StandbyLink, SerialSink), Unattached> {
        let standby = ctx.config.standby.as_ref();
        let placement = standby.map(|s| &s.placement);
        let remote_config = placement.and_then(|p| p.remote()).cloned();
        let Some(config) = placement.and_then(|p| p.journal()).cloned() else {
            return Err(Unattached::new("no journal configured", console));
        };
        let interval = standby
            .and_then(|s| s.checkpoint_interval_ms)
            .map_or(Duration::from_millis(20), Duration::from_millis);
        let taken_here = lock.is_none();
        let held_lock = match lock.take() {
            Some(held) => held,
            None => match ActiveLock::try_take(&config.path) {
                Ok(Some(taken)) => taken,
                Ok(None) => {
                    let why = format!(
                        "another process runs this guest: it holds {}",
                        ActiveLock::path(&config.path).display()
                    );
                    return Err(Unattached::new(why, console));
                }
                Err(err) => {
                    let why = format!("{}: {err}", ActiveLock::path(&config.path).display());
                    return Err(Unattached::new(why, console));
                }
            },
        };
        let give_back = |lock: &mut Option<ActiveLock>, held: ActiveLock| {
            if !taken_here {
                *lock = Some(held);
            }
        };
        // Holding the lock proves no other process may run the guest: a socket still at the
        // path is a dead predecessor's (its listener may outlive its lock while the process
        // is torn down), and is replaced.
        let listener = match crate::control::bind_owner_only_replacing(&config.socket).and_then(
            |listener| {
                listener
                    .set_nonblocking(true)
                    .map(|()| listener)
                    .map_err(|source| crate::control::ControlError::Io {
                        path: config.socket.clone(),
                        step: "make non-blocking",
                        source,
                    })
            },
        ) {
            Ok(listener) => listener,
            Err(err) => {
                give_back(lock, held_lock);
                let why = match err {
                    crate::control::ControlError::NotASocket(path) => format!(
                        "attach socket {}: the path exists and is not a socket; refusing to replace it",
                        path.display()
                    ),
                    other => other.to_string(),
                };
                return Err(Unattached::new(why, console));
            }
        };
        let held = HeldOutput::default();
        let console = Arc::new(Mutex::new(console));
        let remote = match &remote_config {
            Some(remote) => {
                match crate::remote::serve_active(
                    &ctx.config.name,
                    &config,
                    remote,
                    console.clone(),
                ) {
                    Ok(side) => Some(side),
                    Err(why) => {
                        give_back(lock, held_lock);
                        drop(listener);
                        let _ = std::fs::remove_file(&config.socket);
                        let console = match Arc::try_unwrap(console) {
                            Ok(console) => console.into_inner().unwrap_or_else(|e| e.into_inner()),
                            // The remote side kept a handle on it: what it is given now
                            // reaches the same console through that handle.
                            Err(shared) => Box::new(SharedConsole(shared)),
                        };
                        return Err(Unattached::new(why, console));
                    }
                }
            }
            None => None,
        };
        let link = StandbyLink {
            guest: ctx.config.name.clone(),
            config,
            interval,
            memory: ctx.config.memory_mib << 20,
            listener,
            held: held.clone(),
            console,
            remote,
            session: None,
            tail_since: (!unfinished.is_empty()).then(Instant::now),
            pending: unfinished,
            closed: Vec::new(),
            owns_socket: true,
            lock: Some(held_lock),
            identifier: 0,
            stats: EpochStats::default(),
            sessions: 0,
            deferred: 0,
            failovers: Vec::new(),
            disks: ctx.disks.epoch_disks(),
        };
        Ok((link, Box::new(held)))
    }

    /// What the guest's crash-loop guard counts now (milliseconds since the Unix epoch),
    /// for the standbys that attach from now on.
    pub fn note_failovers(&mut self, failovers: Vec<u64>) {
        self.failovers = failovers;
    }

    /// The epoch length.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether a standby process has caught up and could take over.
    pub fn armed(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Following)
    }

    /// Epoch counters of the journal.
    pub fn stats(&self) -> &EpochStats {
        &self.stats
    }

    /// The descriptors the guest's loop watches for this link: the listener, and the
    /// standby's connection while there is one.
    pub fn fds(&self) -> (RawFd, Option<RawFd>) {
        (
            self.listener.as_raw_fd(),
            self.session.as_ref().map(|s| s.conn.as_raw_fd()),
        )
    }

    /// Closes the connections of ended sessions, once the loop no longer watches them.
    pub fn forget_closed(&mut self) {
        self.closed.clear();
    }

    /// For `status`.
    pub fn status(&self) -> StandbyProcessStatus {
        let session = self.session.as_ref();
        StandbyProcessStatus {
            socket: self.config.socket.clone(),
            journal: self.config.path.clone(),
            pid: session.map(|s| s.pid),
            phase: session.map_or("waiting", |s| s.phase.name()).into(),
            identifier: session
                .and_then(|s| s.journal.as_ref())
                .map(|j| j.header().identifier),
            epoch: session.map(|s| s.seq),
            sessions: self.sessions,
            deferred_epochs: self.deferred,
        }
    }

    /// A standby process is connecting.
    pub fn on_listener(&mut self) {
        loop {
            let (mut conn, _) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    tracing::warn!(guest = %self.guest, %err, "cannot accept a standby process");
                    return;
                }
            };
            if self.session.is_some() {
                let why = "another standby process is attached".to_owned();
                let _ = send(&mut conn, &ToStandby::Refused { why });
                continue;
            }
            if let Err(err) = conn.set_nonblocking(true) {
                tracing::warn!(guest = %self.guest, %err, "cannot use a standby's connection");
                continue;
            }
            let pid = crate::link::peer_pid(&conn).unwrap_or(0);
            self.session = Some(Session {
                conn,
                lines: Lines::default(),
                out: Vec::new(),
                pid,
                phase: Phase::Hello,
                journal: None,
                seq: 0,
                last: None,
                unapplied: VecDeque::new(),
                carry: None,
                carry_output: Vec::new(),
                since: Instant::now(),
            });
        }
    }

    /// The standby's connection has something (or has closed).
    pub fn on_connection(&mut self, ctx: &mut Context, active: Option<&Vm>) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let messages = match session.lines.read::<ToActive>(&mut session.conn) {
            Ok(messages) => messages,
            Err(LinkError::Closed) => {
                return self.lose("the standby process closed the connection")
            }
            Err(err) => return self.lose(&err.to_string()),
        };
        for message in messages {
            if let Err(why) = self.on_message(ctx, active, message) {
                return self.refuse(&why);
            }
            if self.session.is_none() {
                return;
            }
        }
    }

    fn on_message(
        &mut self,
        ctx: &mut Context,
        active: Option<&Vm>,
        message: ToActive,
    ) -> Result<(), String> {
        let identifier = crate::journal::new_identifier(self.identifier);
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        match (session.phase, message) {
            (Phase::Hello, ToActive::Hello { pid, guest }) => {
                if guest != self.guest {
                    return Err(format!("this is guest {}, not {guest}", self.guest));
                }
                // A remote standby's own pid comes in its hello (the connection is the
                // shipper's, in this process).
                if session.pid == 0 || self.remote.is_some() {
                    session.pid = pid;
                }
                // Nothing is written to the journal before a standby has announced itself.
                let journal =
                    Journal::create(&self.config.path, identifier, self.memory, self.config.size)
                        .map_err(|e| e.to_string())?;
                self.identifier = identifier;
                let announce = ToStandby::Journal {
                    identifier,
                    path: self.config.path.clone(),
                    pid: std::process::id(),
                    failovers: self.failovers.clone(),
                };
                session.journal = Some(Arc::new(journal));
                session.phase = Phase::Opened;
                self.sessions += 1;
                lifecycle!(info, "standby-process-attached", guest = %self.guest, standby_pid = session.pid, identifier, journal = %self.config.path.display(), "a standby process attached; writing the journal");
                // The images go with the announcement: the standby shares their locks.
                session
                    .tell_with_fds(&announce, &disk_handoff::image_fds(&ctx.disks))
                    .map_err(|e| e.to_string())
            }
            (Phase::Opened, ToActive::Opened {}) => {
                let Some(active) = active else {
                    return Err("the guest is not running".into());
                };
                let journal = session.journal.clone().ok_or("no journal")?;
                let (source, log) = (active.ram().clone(), active.dirty_log());
                let job = ctx.jobs.spawn("journal-batch", move || {
                    crate::background::lower_priority();
                    Finished::Batch(copy_batch(&journal, &source, &log).map_err(|e| e.to_string()))
                });
                session.phase = Phase::Batching(job);
                Ok(())
            }
            (Phase::Loading, ToActive::Ready { seq }) => {
                session.phase = Phase::Following;
                let took = session.since.elapsed();
                lifecycle!(info, "armed", guest = %self.guest, standby_pid = session.pid, batch_epoch = seq, sync_us = us(took), "active running, standby process caught up: failover armed");
                Ok(())
            }
            (Phase::Loading | Phase::Following, ToActive::Applied { seq }) => {
                while session.unapplied.front().is_some_and(|u| u.seq <= seq) {
                    session.unapplied.pop_front();
                }
                Ok(())
            }
            (_, ToActive::Refused { why }) => {
                self.lose(&format!("the standby process refused: {why}"));
                Ok(())
            }
            (phase, message) => Err(format!("unexpected {message:?} while {}", phase.name())),
        }
    }

    /// The batch's bulk is copied: seals it with the guest paused for the last pages.
    pub fn batch_copied(
        &mut self,
        ctx: &Context,
        job: JobId,
        copied: Result<Precopied, String>,
        active: &Vm,
    ) -> LinkTick {
        let Some(session) = self.session.as_mut() else {
            return LinkTick::Done;
        };
        if session.phase != Phase::Batching(job) {
            return LinkTick::Done;
        }
        let precopied = match copied {
            Ok(precopied) => precopied,
            Err(why) => {
                self.refuse(&format!("the batch could not be written: {why}"));
                return LinkTick::Done;
            }
        };
        let Some(journal) = session.journal.clone() else {
            return LinkTick::Done;
        };
        let paused = Instant::now();
        match active.pause_within(ctx.pause_patience()) {
            Ok(()) => {}
            Err(VmError::VcpuUnresponsive(vcpu)) => return LinkTick::Unresponsive(vcpu),
            Err(err) => {
                self.refuse(&format!("the guest could not be paused: {err}"));
                return LinkTick::Done;
            }
        }
        if let Some(events) = own_stops(active) {
            return LinkTick::ActiveStopped(events);
        }
        // The images are to hold every write up to the batch before the standby loads it.
        drop(SealedEpoch::seal(&self.disks));
        let sealed = (|| -> Result<(Vec<u8>, u64), String> {
            let dirty = active.take_dirty_pages().map_err(|e| e.to_string())?;
            let runs = active.ram().marked_offsets(&dirty.bitmaps);
            journal
                .write_batch_pages(active.ram(), &runs)
                .map_err(|e| e.to_string())?;
            let state = active.save().map_err(|e| e.to_string())?;
            let state = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
            Ok((state, dirty.count()))
        })();
        // Output up to this point is the batch's: no record holds it, so it is released here,
        // but for a line still being printed, which the batch keeps.
        let mut output = std::mem::take(&mut self.pending);
        output.extend(self.held.take());
        let (output, tail) = split_tail(output, &mut self.tail_since);
        let resumed = active.resume();
        let pause = paused.elapsed();
        release(&self.console, &output);
        let (state, final_pages) = match sealed {
            Ok(sealed) => sealed,
            Err(why) => {
                // No record holds the unfinished line: it waits here, as without a standby.
                self.pending = tail;
                self.refuse(&format!("the batch could not be sealed: {why}"));
                return LinkTick::Done;
            }
        };
        if let Err(err) = disk_handoff::apply_sealed(&self.disks) {
            self.pending = tail;
            self.refuse(&format!(
                "the disk writes before the batch could not be applied: {err}"
            ));
            return LinkTick::Done;
        }
        if let Err(err) = journal.commit_batch(0, &state, &tail) {
            self.pending = tail;
            self.refuse(&err.to_string());
            return LinkTick::Done;
        }
        session.carry_output = tail;
        session.seq = 0;
        session.last = None;
        session.phase = Phase::Loading;
        tracing::info!(guest = %self.guest, precopied_pages = precopied.pages, rounds = precopied.rounds, final_pages, pause_us = us(pause), "journal batch written");
        if let Err(err) = session.tell(&ToStandby::Batch { seq: 0 }) {
            self.lose(&err.to_string());
        }
        if let Err(err) = resumed {
            tracing::debug!(guest = %self.guest, %err, "active could not resume after the batch");
        }
        LinkTick::Done
    }

    /// An epoch tick: with a standby loading or following, one epoch into the journal;
    /// otherwise the output held since the last tick is released here.
    pub fn epoch(&mut self, ctx: &Context, active: &Vm) -> LinkTick {
        let writing = self
            .session
            .as_ref()
            .is_some_and(|s| matches!(s.phase, Phase::Loading | Phase::Following));
        if !writing {
            self.pending.extend(self.held.take());
            // The output is released only once the images hold the writes made before it.
            if let Err(err) = disk_handoff::commit_unprotected(&self.disks) {
                tracing::error!(guest = %self.guest, %err, "disk writes could not be applied to the image; the output that follows them is held");
                return LinkTick::Done;
            }
            let pending = std::mem::take(&mut self.pending);
            let (output, tail) = split_tail(pending, &mut self.tail_since);
            release(&self.console, &output);
            self.pending = tail;
            return LinkTick::Done;
        }
        match self.write_epoch(ctx, active, false) {
            Ok(tick) => tick,
            Err(why) => {
                self.refuse(&why);
                LinkTick::Done
            }
        }
    }

    /// One epoch into the journal; with `keep_paused`, the active stays paused after it (a
    /// planned handover), so the record is its state from then on.
    fn write_epoch(
        &mut self,
        ctx: &Context,
        active: &Vm,
        keep_paused: bool,
    ) -> Result<LinkTick, String> {
        let Some(session) = self.session.as_mut() else {
            return Ok(LinkTick::Done);
        };
        let journal = session.journal.clone().ok_or("no journal")?;
        prepare_record(&journal, session, active);
        let paused = Instant::now();
        match active.pause_within(ctx.pause_patience()) {
            Ok(()) => {}
            Err(VmError::VcpuUnresponsive(vcpu)) => return Ok(LinkTick::Unresponsive(vcpu)),
            Err(err) => return Err(format!("the guest could not be paused: {err}")),
        }
        if let Some(events) = own_stops(active) {
            return Ok(LinkTick::ActiveStopped(events));
        }
        let acked = paused.elapsed();
        let written = (|| -> Result<Option<(EpochRecordOwned, u64)>, String> {
            let mut dirty = active.take_dirty_pages().map_err(|e| e.to_string())?;
            let state = active.save().map_err(|e| e.to_string())?;
            let state = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
            if let Some(carried) = session.carry.take() {
                dirty.merge(&carried);
            }
            let mut output = std::mem::take(&mut session.carry_output);
            output.extend(self.held.take());
            let (output, tail) = split_tail(output, &mut self.tail_since);
            let record = EpochRecordOwned {
                seq: session.seq + 1,
                runs: active.ram().marked_offsets(&dirty.bitmaps),
                state,
                output,
                tail,
                end: None,
                disks: SealedEpoch::seal(&self.disks),
            };
            let len = record.borrow().size();
            let Some(offset) = place(&journal, session, len) else {
                // No room until the standby applies what it has: this epoch's pages, output
                // and disk writes go with the next one.
                record.disks.unseal(&self.disks);
                session.carry = Some(dirty);
                session.carry_output = [record.output, record.tail].concat();
                return Ok(None);
            };
            if let Err(err) = journal.write_record(offset, &record.borrow(), Some(active.ram())) {
                // The session ends over this; the epoch's output is released with what the
                // guest prints next, not lost.
                session.carry_output = [record.output, record.tail].concat();
                return Err(err.to_string());
            }
            session.carry_output = record.tail.clone();
            Ok(Some((record, offset)))
        })();
        let resumed = if keep_paused { Ok(()) } else { active.resume() };
        let pause = paused.elapsed();
        tracing::trace!(guest = %self.guest, pause_us = us(pause), acked_us = us(acked), pages = written.as_ref().ok().and_then(|w| w.as_ref()).map_or(0, |(r, _)| r.runs.iter().map(|r| r.1).sum::<u64>() / crate::journal::PAGE), "journal epoch");
        let Some((record, offset)) = written? else {
            self.deferred += 1;
            return Ok(LinkTick::Done);
        };
        if let Some(delay) = seal_delay() {
            // A test's way to widen the window in which the record is written but not yet
            // valid, to kill the process inside it.
            std::thread::sleep(delay);
        }
        let session = self.session.as_mut().ok_or("no session")?;
        // The disk section is copied in with the guest running again.
        journal
            .write_disk_section(offset, &record.borrow(), &record.disks.section())
            .map_err(|e| e.to_string())?;
        journal
            .seal_record(offset, &record.borrow())
            .map_err(|e: JournalError| e.to_string())?;
        let len = record.borrow().size();
        session.seq = record.seq;
        session.last = Some((offset, len));
        session.unapplied.push_back(Unapplied {
            seq: record.seq,
            offset,
            len,
            output: record.output,
        });
        let pages = record.runs.iter().map(|r| r.1).sum::<u64>() / crate::journal::PAGE;
        self.stats.record(pause, pages);
        // The epoch has committed: its disk writes go to the images, then the mark says so.
        disk_handoff::apply_sealed(&self.disks)
            .map_err(|e| format!("the epoch's disk writes could not be applied: {e}"))?;
        journal.set_disk_applied(record.seq);
        let notice = ToStandby::Record {
            seq: record.seq,
            offset,
        };
        let told = session.tell(&notice);
        if let Err(err) = resumed {
            tracing::debug!(guest = %self.guest, %err, "active could not resume after an epoch");
        }
        // The record is in the journal whether or not the standby heard of it; a standby
        // that no longer takes its messages is gone.
        told.map_err(|e| e.to_string())?;
        Ok(LinkTick::Done)
    }

    /// The guest has ended (its machine stopped): its last output goes to the standby in an
    /// end record, which tells the standby how the guest ended; without a standby that has
    /// the batch, it is released here.
    pub fn guest_ended(&mut self, end: &[u8]) {
        let writing = self
            .session
            .as_ref()
            .is_some_and(|s| matches!(s.phase, Phase::Loading | Phase::Following));
        if writing {
            match self.write_end(end) {
                Ok(output) if self.remote.is_some() => {
                    // The remote standby hears of the end before this process goes.
                    let seq = self.session.as_ref().map_or(0, |s| s.seq);
                    if let Some(side) = &self.remote {
                        if !side.wait_sent(seq, HANDOVER_PATIENCE) {
                            tracing::warn!(guest = %self.guest, "the remote standby may not have heard how the guest ended");
                        }
                    }
                    // A remote standby releases nothing unless promoted: the records it
                    // had not acknowledged, and the end, are released here.
                    self.lose("the guest ended");
                    release(&self.console, &output);
                    self.lock = None;
                    return;
                }
                Ok(_) => {
                    // The standby releases everything from here; the session is over, and the
                    // guest has ended: nobody runs it any more.
                    self.session = None;
                    self.lock = None;
                    return;
                }
                Err(why) => {
                    tracing::warn!(guest = %self.guest, %why, "the end record could not be written")
                }
            }
        }
        if self.session.is_some() {
            self.lose("the guest ended");
        }
        self.pending.extend(self.held.take());
        if let Err(err) = disk_handoff::commit_unprotected(&self.disks) {
            tracing::error!(guest = %self.guest, %err, "the guest's last disk writes could not be applied to the image");
        }
        let output = std::mem::take(&mut self.pending);
        release(&self.console, &output);
    }

    /// The last record: the guest's last output and how it ended; no pages, no state.
    /// Returns the output it carries.
    fn write_end(&mut self, end: &[u8]) -> Result<Vec<u8>, String> {
        let Some(session) = self.session.as_mut() else {
            return Err("no session".into());
        };
        let journal = session.journal.clone().ok_or("no journal")?;
        let mut output = std::mem::take(&mut session.carry_output);
        output.extend(self.held.take());
        let record = EpochRecordOwned {
            seq: session.seq + 1,
            runs: Vec::new(),
            state: Vec::new(),
            output,
            tail: Vec::new(),
            end: Some(end.to_vec()),
            disks: SealedEpoch::seal(&self.disks),
        };
        let len = record.borrow().size();
        let Some(offset) = place(&journal, session, len) else {
            session.carry_output = record.output;
            return Err("no room in the journal for the end record".into());
        };
        journal
            .write_record(offset, &record.borrow(), None)
            .and_then(|()| {
                journal.write_disk_section(offset, &record.borrow(), &record.disks.section())
            })
            .and_then(|()| journal.seal_record(offset, &record.borrow()))
            .map_err(|e| e.to_string())?;
        session.seq = record.seq;
        disk_handoff::apply_sealed(&self.disks).map_err(|e| e.to_string())?;
        journal.set_disk_applied(record.seq);
        let notice = ToStandby::Record {
            seq: record.seq,
            offset,
        };
        // The standby finds the record in the journal even if it never hears of it.
        let _ = session.tell(&notice);
        Ok(record.output)
    }

    /// A planned handover: one last epoch with the active kept paused, so the standby's last
    /// record is the guest's state from then on. `Ok(true)` once it is written (the caller
    /// fences the active and hands the guest over); `Ok(false)` if there was no room for it
    /// (the active runs on); a vCPU that stopped or did not answer is handed back.
    pub fn last_epoch(&mut self, ctx: &Context, active: &Vm) -> Result<bool, LinkTick> {
        if !self.armed() {
            return Ok(false);
        }
        let before = self.session.as_ref().map_or(0, |s| s.seq);
        match self.write_epoch(ctx, active, true) {
            Ok(LinkTick::Done) => {}
            Ok(tick) => return Err(tick),
            Err(why) => {
                let _ = active.resume();
                self.refuse(&why);
                return Ok(false);
            }
        }
        let written = self.session.as_ref().is_some_and(|s| s.seq > before);
        if !written {
            let _ = active.resume();
        }
        Ok(written)
    }

    /// The active machine failed and is fenced: the standby process is told to take the
    /// guest over from the last record it has. What the guest printed since (its uncommitted
    /// epoch) is dropped, as at any failover from a checkpoint. Returns the standby's pid.
    pub fn hand_over(&mut self, why: &str) -> Result<u32, String> {
        let mut session = self.session.take().ok_or("no standby process")?;
        // The standby process binds the attach socket as the guest's new active: the path is
        // given up first (the listener stays open, unreachable, until the loop lets it go).
        let _ = std::fs::remove_file(&self.config.socket);
        self.owns_socket = false;
        // The machine is fenced: this process never runs the guest again (nor writes its
        // images), and the standby takes the lock before it resumes it.
        for disk in &self.disks {
            disk.give_up();
        }
        self.lock = None;
        let told = session.tell(&ToStandby::TakeOver {
            why: why.to_owned(),
            failovers: self.failovers.clone(),
        });
        drop(self.held.take());
        self.pending.clear();
        let pid = session.pid;
        self.closed.push(session.conn);
        told.map_err(|e| e.to_string())?;
        if let Some(side) = &self.remote {
            // The remote standby must hear it before this process goes.
            if !side.wait_told(HANDOVER_PATIENCE) {
                tracing::warn!(guest = %self.guest, "the remote standby may not have heard of the handover");
            }
        }
        lifecycle!(warn, "standby-process-told", guest = %self.guest, standby_pid = pid, %why, "the active failed: the standby process takes the guest over from its last epoch");
        Ok(pid)
    }

    /// Ends the session with `why` told to the standby.
    fn refuse(&mut self, why: &str) {
        if let Some(session) = self.session.as_mut() {
            let _ = session.tell(&ToStandby::Refused {
                why: why.to_owned(),
            });
        }
        self.lose(why);
    }

    /// The standby process is gone (or sent away): the output of the records it had not
    /// released is released here, in order, and the guest runs on unprotected.
    fn lose(&mut self, why: &str) {
        let Some(mut session) = self.session.take() else {
            return;
        };
        // The standby may have said why before the connection failed under a write.
        let said = session
            .lines
            .read::<ToActive>(&mut session.conn)
            .unwrap_or_default()
            .into_iter()
            .find_map(|m| match m {
                ToActive::Refused { why } => Some(format!("the standby process refused: {why}")),
                _ => None,
            });
        let why = said.as_deref().unwrap_or(why);
        // A remote standby's shipper releases nothing from here on.
        let shipped = self.remote.as_ref().map_or(0, |side| side.halt());
        let released = session
            .journal
            .as_ref()
            .map_or(0, |j| j.released())
            .max(shipped);
        // Every sealed record's disk writes are in the images before any of its output goes.
        if let Err(err) = disk_handoff::apply_sealed(&self.disks) {
            tracing::error!(guest = %self.guest, %err, "disk writes could not be applied to the image");
        }
        for record in &session.unapplied {
            if record.seq > released {
                release(&self.console, &record.output);
            }
        }
        // The line the guest is still printing waits for its end, as without a standby.
        let mut pending = session.carry_output;
        pending.extend(std::mem::take(&mut self.pending));
        self.pending = pending;
        if session.journal.is_some() {
            let _ = std::fs::remove_file(&self.config.path);
        }
        let armed = session.phase == Phase::Following;
        let (pid, phase) = (session.pid, session.phase);
        self.closed.push(session.conn);
        if phase == Phase::Hello {
            // A connection that never said hello (a probe of the socket) is no standby.
            tracing::debug!(guest = %self.guest, %why, "a connection to the attach socket closed");
            return;
        }
        lifecycle!(warn, "standby-process-lost", guest = %self.guest, standby_pid = pid, was_armed = armed, %why, "the standby process is gone; the guest runs on unprotected until another attaches");
    }
}

impl Drop for StandbyLink {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The guest's loop failed: whether its machine has stopped is not known, so the
            // lock, and the connection the standby watches, are kept until the process ends.
            if let Some(lock) = self.lock.take() {
                std::mem::forget(lock);
            }
            if let Some(session) = self.session.take() {
                std::mem::forget(session.conn);
            }
            return;
        }
        if self.owns_socket {
            let _ = std::fs::remove_file(&self.config.socket);
        }
    }
}

/// How long a handover waits for a remote standby to have been told.
const HANDOVER_PATIENCE: Duration = Duration::from_secs(2);

/// The most message bytes a standby may leave unread before it counts as gone.
const MAX_UNREAD: usize = 1 << 20;

impl Session {
    /// Sends `message` with `fds` (the first message of a session: nothing waits before it).
    fn tell_with_fds(
        &mut self,
        message: &ToStandby,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), LinkError> {
        if fds.is_empty() || !self.out.is_empty() {
            return self.tell(message);
        }
        let mut line =
            serde_json::to_vec(message).map_err(|e| LinkError::Garbled(e.to_string()))?;
        line.push(b'\n');
        let sent = crate::link::send_with_fds(&self.conn, &line, fds)?;
        self.out.extend_from_slice(&line[sent..]);
        self.flush()
    }

    /// Sends `message`, after whatever is still waiting: whole lines, in order, whatever the
    /// connection takes at a time.
    fn tell(&mut self, message: &ToStandby) -> Result<(), LinkError> {
        let mut line =
            serde_json::to_vec(message).map_err(|e| LinkError::Garbled(e.to_string()))?;
        line.push(b'\n');
        self.out.extend_from_slice(&line);
        self.flush()
    }

    /// Writes what the connection takes of the waiting bytes.
    fn flush(&mut self) -> Result<(), LinkError> {
        use std::io::Write as _;
        while !self.out.is_empty() {
            match self.conn.write(&self.out) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err.into()),
            }
        }
        if self.out.len() > MAX_UNREAD {
            return Err(LinkError::Garbled(
                "the standby process leaves its messages unread".into(),
            ));
        }
        Ok(())
    }
}

/// Where a record of `len` bytes goes: after the last one (or at the start of the area),
/// if that overlaps no record the standby has yet to apply.
fn place(journal: &Journal, session: &Session, len: u64) -> Option<u64> {
    let offset = match session.last {
        Some((offset, last_len)) => journal.next_offset(offset, last_len, len),
        None => journal.records_start(),
    };
    let end = offset + len;
    if end > journal.header().size {
        return None;
    }
    let overlaps = session
        .unapplied
        .iter()
        .any(|u| offset < u.offset + u.len && u.offset < end);
    (!overlaps).then_some(offset)
}

/// While the guest still runs: allocates the journal pages the next record will take,
/// sized from the pages the guest has dirtied so far (where the dirty log can be looked at
/// without resetting it) or else from the last record, so that the pause pays for copying
/// them, not for faulting them in.
fn prepare_record(journal: &Journal, session: &Session, active: &Vm) {
    let pages = match active.dirty_log().peek() {
        Ok(Some(ahead)) => ahead.count() * crate::journal::PAGE,
        _ => session.last.map_or(0, |(_, len)| len),
    };
    let carried = session
        .carry
        .as_ref()
        .map_or(0, |c| c.count() * crate::journal::PAGE);
    // The metadata (run table, state, output) takes a few pages.
    let len = pages + carried + 16 * crate::journal::PAGE;
    if let Some(offset) = place(journal, session, len) {
        journal.prepare(offset, len);
    }
}

/// An epoch record's parts, owned.
struct EpochRecordOwned {
    seq: u64,
    runs: Vec<(u64, u64)>,
    state: Vec<u8>,
    output: Vec<u8>,
    tail: Vec<u8>,
    end: Option<Vec<u8>>,
    /// Its disk writes, sealed; copied into the record after the pause.
    disks: SealedEpoch,
}

impl EpochRecordOwned {
    fn borrow(&self) -> EpochRecord<'_> {
        EpochRecord {
            seq: self.seq,
            runs: &self.runs,
            state: &self.state,
            output: &self.output,
            tail: &self.tail,
            end: self.end.as_deref(),
            disk: &[],
            disk_after: self.disks.section_len(),
        }
    }
}

/// `UNDERSTUDY_JOURNAL_SEAL_DELAY_US`: for tests, how long a record waits, written but not
/// sealed, before its header makes it valid (docs/failover.md).
fn seal_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("UNDERSTUDY_JOURNAL_SEAL_DELAY_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_micros)
    })
}

/// The longest unfinished line held back from release.
const TAIL_LIMIT: usize = 4096;

/// How long an unfinished line is held back at most (a prompt waits for no newline).
const TAIL_PATIENCE: Duration = Duration::from_secs(1);

/// Splits console output into whole lines, to be released with their epoch, and the line
/// the guest is still printing, which goes with the next epoch: so that a takeover never
/// leaves half a line on one process's console and the rest on another's. An unfinished
/// line longer than [`TAIL_LIMIT`], or held back for [`TAIL_PATIENCE`] already (`since`, the
/// time the line began, kept across calls), is not held back.
fn split_tail(mut output: Vec<u8>, since: &mut Option<Instant>) -> (Vec<u8>, Vec<u8>) {
    let cut = output
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let overdue = cut == 0 && since.is_some_and(|t| t.elapsed() >= TAIL_PATIENCE);
    if cut == output.len() || output.len() - cut > TAIL_LIMIT || overdue {
        *since = None;
        return (output, Vec::new());
    }
    if cut > 0 || since.is_none() {
        *since = Some(Instant::now());
    }
    let tail = output.split_off(cut);
    (output, tail)
}

fn release(console: &Mutex<SerialSink>, output: &[u8]) {
    if !output.is_empty() {
        let mut console = console.lock().unwrap_or_else(|e| e.into_inner());
        // A console that cannot be written must not stop the guest.
        let _ = console.write_all(output);
        let _ = console.flush();
    }
}

fn own_stops(active: &Vm) -> Option<Vec<VmEvent>> {
    let mut stopped = Vec::new();
    while let Some(event) = active.next_event(Duration::ZERO) {
        stopped.push(event);
    }
    (!stopped.is_empty()).then_some(stopped)
}

/// Copies the guest's RAM into the journal's batch image while it runs: every page it ever
/// wrote, then rounds of the pages it dirtied meanwhile, until few are left.
fn copy_batch(journal: &Journal, source: &GuestRam, log: &DirtyLog) -> Result<Precopied, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    // Reset first: whatever the guest writes during the bulk copy is in the next read.
    log.take().map_err(|e| err(&e))?;
    let bytes = source
        .write_to_at(journal.file(), journal.ram_base())
        .map_err(|e| err(&e))?;
    let mut done = Precopied {
        rounds: 1,
        pages: bytes / crate::journal::PAGE,
    };
    loop {
        let next = log.take().map_err(|e| err(&e))?;
        let count = next.count();
        journal
            .write_batch_pages(source, &source.marked_offsets(&next.bitmaps))
            .map_err(|e| err(&e))?;
        done.pages += count;
        done.rounds += 1;
        if count <= BATCH_DONE_PAGES || done.rounds >= BATCH_ROUNDS {
            return Ok(done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_lines_are_released_and_an_unfinished_one_waits_a_while() {
        let mut since = None;
        let (lines, tail) = split_tail(b"count 1\ncount 2\ncou".to_vec(), &mut since);
        assert_eq!(
            (&lines[..], &tail[..]),
            (&b"count 1\ncount 2\n"[..], &b"cou"[..])
        );
        assert!(since.is_some());
        let (lines, tail) = split_tail(b"count 3\n".to_vec(), &mut since);
        assert_eq!((&lines[..], &tail[..]), (&b"count 3\n"[..], &b""[..]));
        assert_eq!(since, None);
        let long = vec![b'x'; TAIL_LIMIT + 1];
        assert_eq!(split_tail(long.clone(), &mut since), (long, Vec::new()));
        // A prompt that waited long enough is released without its newline.
        let mut since = Some(Instant::now() - TAIL_PATIENCE);
        let (lines, tail) = split_tail(b"login: ".to_vec(), &mut since);
        assert_eq!((&lines[..], &tail[..]), (&b"login: "[..], &b""[..]));
    }
}
