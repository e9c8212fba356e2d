//! Crash dumps of a guest's failed machines, written in the background: where each goes and
//! which old ones make room for it, and the three ways one is taken — from a machine nobody
//! will run again, from RAM a resumed guest runs on (through the standby's write trap), and
//! now, before the resume, where no trap was ready.
//!
//! Runs on the guest's thread; the writing itself runs on background threads.

use std::sync::Arc;
use std::time::Instant;

use vmm_core::memory::trap::WriteTrap;
use vmm_core::{GuestRam, VcpuState};

use super::{Context, DumpDone, DumpError, Finished, Machine};
use crate::background::JobId;
use crate::control::protocol::Phase;
use crate::dump::{dump_path, make_room, CoreWriter, Preserver};

/// Writes are let through the trap this many bytes at a time: one held write lets its
/// neighbours through too.
const TRAP_BLOCK: u64 = 64 << 10;

impl Context {
    /// The number of the guest's next dump.
    fn take_dump_number(&mut self) -> u64 {
        let number = self.next_dump;
        self.next_dump += 1;
        number
    }

    /// A job's dump work: makes room in `dump_dir` for dump `number`, then writes it.
    fn write_job(
        &self,
        number: u64,
        writer: CoreWriter,
    ) -> impl FnOnce(Vec<VcpuState>) -> DumpDone + Send + 'static {
        let (dir, guest, keep) = (
            self.config.dump_dir.clone(),
            self.config.name.clone(),
            self.config.max_dumps,
        );
        move |vcpus| {
            let begun = Instant::now();
            let removed = make_room(&dir, &guest, keep, number);
            let path = dump_path(&dir, &guest, number);
            let result = writer.write(&path, &vcpus).map_err(DumpError::Write);
            DumpDone {
                path,
                result,
                took: begun.elapsed(),
                writes_held: None,
                removed,
            }
        }
    }

    /// Stops `failed` (a machine nobody will run again), captures it and writes its dump, all
    /// in the background; the machine is torn down there afterwards.
    pub fn dump_in_background(&mut self, failed: Machine) {
        if !self.config.crash_dump {
            crate::background::retire(failed.vm);
            return;
        }
        let number = self.take_dump_number();
        let (writer, _) = CoreWriter::start(failed.vm.ram());
        let write = self.write_job(number, writer);
        let path = dump_path(&self.config.dump_dir, &self.config.name, number);
        self.jobs.spawn_awaited("dump", move || {
            crate::background::lower_priority();
            let captured = failed.vm.pause().and_then(|()| failed.vm.save());
            let done = match captured {
                Ok(state) => write(state.vcpus),
                Err(err) => DumpDone {
                    path,
                    result: Err(DumpError::NotCaptured(err)),
                    took: std::time::Duration::ZERO,
                    writes_held: None,
                    removed: Vec::new(),
                },
            };
            drop(failed);
            Finished::Dump(done)
        });
    }

    /// Writes the dump of `vcpus` over `ram` in the background while others may overwrite
    /// `ram`; returns the job and the preserver they must call before they do.
    pub fn dump_while_reused(
        &mut self,
        vcpus: Vec<VcpuState>,
        ram: &GuestRam,
    ) -> Option<(JobId, Preserver)> {
        if !self.config.crash_dump {
            return None;
        }
        let number = self.take_dump_number();
        let (writer, preserver) = CoreWriter::start(ram);
        let write = self.write_job(number, writer);
        let job = self.jobs.spawn_awaited("dump", move || {
            crate::background::lower_priority();
            Finished::Dump(write(vcpus))
        });
        Some((job, preserver))
    }

    /// Writes the dump of `vcpus` over `ram`, which a resumed guest writes through `trap`'s
    /// mapping: every write the guest makes first gives the dump the page's failure-time
    /// contents. The trap is lifted once the dump is written. Nothing here waits for a disk:
    /// the guest's first writes are held only for as long as it takes to start a thread.
    /// Returns the job and a preserver, to abandon the dump should another guest take the
    /// RAM over before it is written.
    pub fn dump_through_trap(
        &mut self,
        vcpus: Vec<VcpuState>,
        ram: &GuestRam,
        trap: Arc<WriteTrap>,
    ) -> Option<(JobId, Preserver)> {
        if !self.config.crash_dump {
            release_in_background(trap);
            return None;
        }
        let number = self.take_dump_number();
        let (writer, preserver) = CoreWriter::start(ram);
        let handle = preserver.clone();
        // The trap is served at normal priority: a guest vCPU waits on it.
        let server = {
            let trap = trap.clone();
            std::thread::Builder::new()
                .name("dump-trap".into())
                .spawn(move || {
                    vmm_core::jail::enter(vmm_core::jail::ThreadKind::Background);
                    trap.serve(TRAP_BLOCK, &mut |o, l| preserver.preserve(o, l))
                })
        };
        let server = match server {
            Ok(server) => server,
            Err(err) => {
                tracing::error!(guest = %self.config.name, %err, "cannot serve the write trap; no dump");
                let _ = trap.release();
                return None;
            }
        };
        let write = self.write_job(number, writer);
        let job = self.jobs.spawn_awaited("dump", move || {
            crate::background::lower_priority();
            let mut done = write(vcpus);
            trap.stop();
            done.writes_held = server.join().ok().and_then(Result::ok);
            if let Err(err) = trap.release() {
                tracing::error!(%err, "the write trap could not be lifted");
            }
            Finished::Dump(done)
        });
        Some((job, handle))
    }

    /// Writes the dump of `vcpus` over `ram` now, on this thread: where no trap was ready,
    /// before a standby resumes over `ram`.
    pub fn dump_now(&mut self, vcpus: Vec<VcpuState>, ram: &GuestRam) {
        if !self.config.crash_dump {
            return;
        }
        let number = self.take_dump_number();
        let (writer, _) = CoreWriter::start(ram);
        let done = self.write_job(number, writer)(vcpus);
        self.dump_finished(done);
    }

    /// A dump job reported back.
    pub fn dump_finished(&mut self, done: DumpDone) {
        let DumpDone {
            path,
            result,
            took,
            writes_held,
            removed,
        } = done;
        for old in removed {
            self.record.dumps_removed += 1;
            lifecycle!(info, "dump-removed", guest = %self.config.name, path = %old.display(), max_dumps = self.config.max_dumps, "old crash dump removed to make room");
        }
        match result {
            Ok(bytes) => {
                self.record.dumps_written += 1;
                let held = writes_held
                    .map(|n| format!("; {n} writes of the resumed guest held meanwhile"))
                    .unwrap_or_default();
                self.phase_took(
                    Phase::Dump,
                    took,
                    &format!(
                        "crash dump written to {} ({} KiB of memory{held})",
                        path.display(),
                        bytes >> 10
                    ),
                );
            }
            Err(err) => {
                tracing::warn!(guest = %self.config.name, path = %path.display(), %err, "crash dump could not be written")
            }
        }
    }
}

/// Lifts `trap` in the background, letting held writes through meanwhile: for a trapped
/// standby that takes over without a dump to write (a switchover).
pub(crate) fn release_in_background(trap: Arc<WriteTrap>) {
    let server = {
        let trap = trap.clone();
        std::thread::Builder::new()
            .name("trap-release".into())
            .spawn(move || {
                vmm_core::jail::enter(vmm_core::jail::ThreadKind::Background);
                trap.serve(TRAP_BLOCK, &mut |_, _| {})
            })
    };
    crate::background::detached("trap-release", move || {
        crate::background::lower_priority();
        if let Err(err) = trap.release() {
            tracing::error!(%err, "the write trap could not be lifted");
        }
        trap.stop();
        if let Ok(server) = server {
            let _ = server.join();
        }
    });
}

/// Lays a write trap on `machine`'s mapping in the background, for its dump should it take
/// over after a failure.
pub(crate) fn arm_trap(ctx: &mut Context, machine: &Machine) {
    if !ctx.config.crash_dump {
        return;
    }
    let (id, ram) = (machine.id, machine.vm.ram().clone());
    ctx.jobs.spawn("trap", move || {
        crate::background::lower_priority();
        Finished::Trap {
            machine: id,
            trap: vmm_core::memory::trap::WriteTrap::arm(&ram).map(Arc::new),
        }
    });
}
