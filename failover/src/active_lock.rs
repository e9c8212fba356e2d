//! The guest's *active lock*: whoever holds it may run the guest on this host, and nobody
//! else. The active takes it before its guest starts, a standby process before it resumes
//! the guest, a remote standby's relay while it follows.
//!
//! The lock is a robust, process-shared mutex in a page of its own (the journal's path plus
//! `.owner`, on tmpfs by default), held by a thread that does nothing else and never ends
//! before its process does. It is let go of in one of two ways:
//! - on purpose, by dropping the [`ActiveLock`]: once the holder's machine is fenced for good
//!   (a handover) or the guest has ended;
//! - by the kernel, when the holder thread exits: that happens only as its whole process
//!   dies, and the next taker finds the mutex "owner died". The kernel lets go of it early in
//!   the thread's exit, before the process's memory and its KVM VM are torn down (15–25 ms
//!   on some hosts): a standby process waiting for it hears of the death at once.
//!
//! A mutex whose owner died is not yet proof that the old active's guest is stopped: its
//! other threads (its vCPUs) may still be on their way out. The taker then reads, from
//! `/proc`, the flags of every thread of the holder's process (recorded in the page with
//! its start time, so that a reused pid is not mistaken for it) and goes on only once each
//! one is exiting (`PF_EXITING`: it has left any `KVM_RUN` and will never return to user
//! mode) or the process is gone. docs/failover.md ("No split brain") has the argument.
//!
//! Which thread runs what: the holder thread (named `active-lock`) takes, holds and lets go
//! of the mutex; the caller only waits for its answers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// What the page starts with once it is ready, after the mutex.
const MAGIC: u64 = u64::from_le_bytes(*b"USOWNER1");
const PAGE: usize = 4096;
/// Where the fields are in the page.
const MAGIC_AT: usize = 64;
const PID_AT: usize = 72;
const START_AT: usize = 80;
/// `PF_EXITING` in a thread's flags (`include/linux/sched.h`): set as the thread enters
/// `do_exit`, never cleared.
const PF_EXITING: u64 = 0x4;
/// How often an owner-died proof looks at `/proc` again.
const PROOF_POLL: Duration = Duration::from_micros(50);
/// A proof that takes longer than this is reported (once).
const PROOF_SLOW: Duration = Duration::from_secs(1);

/// How a lock was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Nobody held it, or its holder let go of it on purpose.
    Free,
    /// Its holder's process died: it was taken once every thread of that process was seen
    /// exiting or gone.
    FromTheDead {
        /// That process.
        pid: u32,
    },
}

/// The guest's active lock, held (see the module documentation). Dropping it lets go, and
/// returns once the lock is free; forgetting it keeps it until the process dies.
#[derive(Debug)]
pub struct ActiveLock {
    /// Dropping it tells the holder thread to let go.
    release: Option<Sender<()>>,
    /// The holder thread's word that it did.
    released: Receiver<()>,
    how: Taken,
}

impl Drop for ActiveLock {
    fn drop(&mut self) {
        drop(self.release.take());
        // The holder only unlocks and says so: microseconds, unless it cannot run at all.
        let _ = self.released.recv_timeout(Duration::from_secs(1));
    }
}

impl ActiveLock {
    /// Where the lock of the journal at `journal` is.
    pub fn path(journal: &Path) -> PathBuf {
        let mut path = journal.as_os_str().to_owned();
        path.push(".owner");
        PathBuf::from(path)
    }

    /// How it was taken.
    pub fn how(&self) -> Taken {
        self.how
    }

    /// Takes the lock of the journal at `journal`, if nobody holds it (or its holder's
    /// process is dying).
    pub fn try_take(journal: &Path) -> io::Result<Option<ActiveLock>> {
        ActiveLock::take_within(journal, Duration::ZERO)
    }

    /// Takes the lock, waiting for it at most `patience`.
    pub fn take_within(journal: &Path, patience: Duration) -> io::Result<Option<ActiveLock>> {
        let page = Arc::new(Page::open(&ActiveLock::path(journal))?);
        let (answer, answered) = mpsc::channel();
        let deadline = Instant::now() + patience;
        Holder::spawn(page, Until::Deadline(deadline), answer, None)?;
        answered.recv().unwrap_or_else(|_| Err(holder_gone()))
    }

    /// Waits for the lock in the background: `notify` is written once there is an answer,
    /// which [`Waiter::answer`] then gives. Dropping the waiter stops the waiting (within
    /// 100 ms), or lets go of a lock taken meanwhile.
    pub fn wait(journal: &Path, notify: Arc<EventFd>) -> io::Result<Waiter> {
        let page = Arc::new(Page::open(&ActiveLock::path(journal))?);
        let (answer, answered) = mpsc::channel();
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        Holder::spawn(page, Until::Cancelled(cancel.clone()), answer, Some(notify))?;
        Ok(Waiter {
            answered,
            cancel,
            answer: None,
        })
    }
}

/// A lock being waited for in the background (see [`ActiveLock::wait`]).
#[derive(Debug)]
pub struct Waiter {
    answered: Receiver<io::Result<Option<ActiveLock>>>,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    answer: Option<io::Result<ActiveLock>>,
}

impl Waiter {
    /// The lock, if it has been taken: within `patience`, or at once with
    /// `Duration::ZERO`. `None` while it is still held by another; an error if it cannot be
    /// waited for.
    pub fn answer(&mut self, patience: Duration) -> Option<io::Result<ActiveLock>> {
        if let Some(answer) = self.answer.take() {
            return Some(answer);
        }
        match self.answered.recv_timeout(patience) {
            Ok(Ok(Some(lock))) => Some(Ok(lock)),
            Ok(Ok(None)) => None,
            Ok(Err(err)) => Some(Err(err)),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Err(holder_gone())),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

fn holder_gone() -> io::Error {
    io::Error::other("the active lock's holder thread ended")
}

/// How long the holder thread tries.
enum Until {
    /// Up to this instant (a try, if it has passed).
    Deadline(Instant),
    /// Until the flag is set.
    Cancelled(Arc<std::sync::atomic::AtomicBool>),
}

/// The thread that takes, holds and lets go of the mutex: a robust mutex belongs to the
/// thread that locked it, and is let go of by the kernel when that thread exits.
struct Holder;

impl Holder {
    fn spawn(
        page: Arc<Page>,
        until: Until,
        answer: Sender<io::Result<Option<ActiveLock>>>,
        notify: Option<Arc<EventFd>>,
    ) -> io::Result<()> {
        std::thread::Builder::new()
            .name("active-lock".into())
            .spawn(move || {
                vmm_core::jail::enter(vmm_core::jail::ThreadKind::Link);
                let wake = || {
                    if let Some(notify) = &notify {
                        let _ = notify.write(1);
                    }
                };
                let how = match page.lock(&until) {
                    Ok(Some(how)) => how,
                    Ok(None) => {
                        let _ = answer.send(Ok(None));
                        return wake();
                    }
                    Err(err) => {
                        let _ = answer.send(Err(err));
                        return wake();
                    }
                };
                page.record_holder();
                let (release, let_go) = mpsc::channel::<()>();
                let (done, released) = mpsc::channel::<()>();
                let lock = ActiveLock {
                    release: Some(release),
                    released,
                    how,
                };
                if let Err(mpsc::SendError(Ok(Some(mut unwanted)))) = answer.send(Ok(Some(lock))) {
                    // Nobody waits for it any more (a waiter dropped meanwhile): let go at
                    // once. Its drop would wait for this very thread to say it let go.
                    drop(unwanted.release.take());
                    std::mem::forget(unwanted);
                }
                wake();
                // Holds the lock until the `ActiveLock` is dropped (or forever, if it is
                // forgotten: then the kernel lets go of it as this process dies).
                let _ = let_go.recv();
                page.clear_holder();
                page.unlock();
                let _ = done.send(());
            })
            .map(|_| ())
    }
}

/// The lock's page, mapped shared.
struct Page {
    base: *mut u8,
    _file: File,
}

// SAFETY: the page is only touched through the pthread mutex functions, which are made for
// sharing between threads and processes, and through atomics.
unsafe impl Send for Page {}
// SAFETY: as above.
unsafe impl Sync for Page {}

impl Page {
    /// Opens the page at `path`, making it first if there is none: made ready in a file of
    /// its own and linked into place, so that nobody ever maps a page that is not ready.
    fn open(path: &Path) -> io::Result<Page> {
        loop {
            match OpenOptions::new().read(true).write(true).open(path) {
                Ok(file) => return Page::map(file, path),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
            // Unique to this attempt: threads of one process may make it at once.
            static ATTEMPT: AtomicU64 = AtomicU64::new(0);
            let mut fresh = path.as_os_str().to_owned();
            fresh.push(format!(
                ".new-{}-{}",
                std::process::id(),
                ATTEMPT.fetch_add(1, Ordering::Relaxed)
            ));
            let fresh = PathBuf::from(fresh);
            let _ = std::fs::remove_file(&fresh);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&fresh)?;
            let made = file
                .set_len(PAGE as u64)
                .and_then(|()| Page::map_raw(file))
                .and_then(|page| page.init().map(|()| page))
                .and_then(|page| std::fs::hard_link(&fresh, path).map(|()| page));
            let _ = std::fs::remove_file(&fresh);
            match made {
                Ok(page) => return Ok(page),
                // Another process made it first: that one is used.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(err),
            }
        }
    }

    fn map(file: File, path: &Path) -> io::Result<Page> {
        if file.metadata()?.len() < PAGE as u64 {
            return Err(not_a_lock(path));
        }
        let page = Page::map_raw(file)?;
        if page.word(MAGIC_AT).load(Ordering::Acquire) != MAGIC {
            return Err(not_a_lock(path));
        }
        Ok(page)
    }

    fn map_raw(file: File) -> io::Result<Page> {
        // SAFETY: a new shared mapping of one page of a file this function holds open; the
        // kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Page {
            base: base.cast(),
            _file: file,
        })
    }

    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        self.base.cast()
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is a multiple of 8 inside the page, which lives as long as `self`.
        unsafe { &*self.base.add(at).cast::<AtomicU64>() }
    }

    fn pid(&self) -> &AtomicU32 {
        // SAFETY: as in `word`.
        unsafe { &*self.base.add(PID_AT).cast::<AtomicU32>() }
    }

    /// Makes the mutex robust and shared between processes, then marks the page ready.
    fn init(&self) -> io::Result<()> {
        let check = |ret: libc::c_int| match ret {
            0 => Ok(()),
            err => Err(io::Error::from_raw_os_error(err)),
        };
        // SAFETY: the attribute object is initialised before use and destroyed after; the
        // mutex is in this process's fresh mapping, which nobody else has yet.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            check(libc::pthread_mutexattr_init(&mut attr))?;
            let made = check(libc::pthread_mutexattr_setpshared(
                &mut attr,
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|()| {
                check(libc::pthread_mutexattr_setrobust(
                    &mut attr,
                    libc::PTHREAD_MUTEX_ROBUST,
                ))
            })
            .and_then(|()| check(libc::pthread_mutex_init(self.mutex(), &attr)));
            libc::pthread_mutexattr_destroy(&mut attr);
            made?;
        }
        self.word(MAGIC_AT).store(MAGIC, Ordering::Release);
        Ok(())
    }

    /// Locks the mutex on this thread, as `until` says. `None`: held by another.
    fn lock(&self, until: &Until) -> io::Result<Option<Taken>> {
        loop {
            let deadline = match until {
                Until::Deadline(at) => *at,
                Until::Cancelled(flag) => {
                    if flag.load(Ordering::Relaxed) {
                        return Ok(None);
                    }
                    Instant::now() + Duration::from_millis(100)
                }
            };
            let ret = self.timed_lock(deadline);
            match ret {
                0 => return Ok(Some(Taken::Free)),
                libc::EOWNERDEAD => {
                    let pid = self.pid().load(Ordering::Acquire);
                    let start = self.word(START_AT).load(Ordering::Acquire);
                    wait_until_past_running(pid, start);
                    // SAFETY: this thread owns the mutex (EOWNERDEAD); marking it
                    // consistent keeps it usable after this holder.
                    unsafe { libc::pthread_mutex_consistent(self.mutex()) };
                    return Ok(Some(Taken::FromTheDead { pid }));
                }
                libc::ETIMEDOUT | libc::EBUSY => {
                    if matches!(until, Until::Deadline(_)) {
                        return Ok(None);
                    }
                }
                err => return Err(io::Error::from_raw_os_error(err)),
            }
        }
    }

    /// `pthread_mutex_timedlock` until `deadline` (a try, if it has passed).
    fn timed_lock(&self, deadline: Instant) -> libc::c_int {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // SAFETY: a valid, initialised mutex in the mapped page.
            return unsafe { libc::pthread_mutex_trylock(self.mutex()) };
        }
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `now`.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
        let nanos = now.tv_nsec as u128 + left.as_nanos();
        let at = libc::timespec {
            tv_sec: now.tv_sec + (nanos / 1_000_000_000) as libc::time_t,
            tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: as above; `at` lives for the call.
        unsafe { libc::pthread_mutex_timedlock(self.mutex(), &at) }
    }

    fn record_holder(&self) {
        self.word(START_AT).store(
            start_time(std::process::id()).unwrap_or(0),
            Ordering::Release,
        );
        self.pid().store(std::process::id(), Ordering::Release);
    }

    fn clear_holder(&self) {
        self.pid().store(0, Ordering::Release);
        self.word(START_AT).store(0, Ordering::Release);
    }

    fn unlock(&self) {
        // SAFETY: called only on the thread that locked it.
        unsafe { libc::pthread_mutex_unlock(self.mutex()) };
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map_raw`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), PAGE) };
    }
}

fn not_a_lock(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is not an understudy active lock (remove it if no understudy runs this guest)",
            path.display()
        ),
    )
}

/// Waits until every thread of process `pid` (started at `start`) is exiting, or the
/// process is gone.
fn wait_until_past_running(pid: u32, start: u64) {
    let began = Instant::now();
    let mut said = false;
    while !past_running(pid, start) {
        if !said && began.elapsed() >= PROOF_SLOW {
            said = true;
            tracing::warn!(pid, "the process that held the guest's active lock lost its holder thread but has threads still running: waiting for them to exit before the guest runs here");
        }
        std::thread::sleep(PROOF_POLL);
    }
}

/// Whether no thread of process `pid` (started at `start`) can run anything again.
fn past_running(pid: u32, start: u64) -> bool {
    if pid == 0 {
        // Nobody was recorded: the holder died before it wrote itself down, right after it
        // took the lock, so it had not run the guest yet.
        return true;
    }
    if start_time(pid) != Some(start) {
        return true;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat"));
        let Some(flags) = stat.ok().and_then(|s| stat_field(&s, 9)) else {
            // The thread is gone.
            continue;
        };
        if flags & PF_EXITING == 0 {
            return false;
        }
    }
    // Had the pid been reused during the listing, the process it named is gone: true
    // either way.
    true
}

/// The start time of process `pid` (`/proc/PID/stat`, field 22), if there is one.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 22)
}

/// Field `n` (counted from 1, as proc(5) does) of a `stat` line, for n >= 3.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(n - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "understudy-active-lock-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("guest.journal")
    }

    #[test]
    fn a_held_lock_is_refused_to_the_next_taker_until_it_is_dropped() {
        let journal = scratch("held");
        let first = ActiveLock::try_take(&journal)
            .unwrap()
            .expect("free at first");
        assert_eq!(first.how(), Taken::Free);
        assert!(ActiveLock::try_take(&journal).unwrap().is_none());
        assert!(ActiveLock::take_within(&journal, Duration::from_millis(20))
            .unwrap()
            .is_none());
        drop(first);
        let again = ActiveLock::take_within(&journal, Duration::from_secs(5)).unwrap();
        assert_eq!(again.map(|l| l.how()), Some(Taken::Free));
    }

    #[test]
    fn a_waiter_is_told_when_the_holder_lets_go() {
        let journal = scratch("waiter");
        let held = ActiveLock::try_take(&journal)
            .unwrap()
            .expect("free at first");
        let notify = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut waiter = ActiveLock::wait(&journal, notify.clone()).unwrap();
        assert!(waiter.answer(Duration::from_millis(20)).is_none());
        assert!(notify.read().is_err(), "told before the holder let go");
        drop(held);
        let lock = waiter.answer(Duration::from_secs(5)).expect("an answer");
        assert_eq!(lock.unwrap().how(), Taken::Free);
        // The answer is sent before the eventfd is written, so that whoever wakes on the
        // eventfd finds it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while notify.read().is_err() {
            assert!(Instant::now() < deadline, "the eventfd was never written");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_waiter_dropped_before_the_lock_comes_free_takes_nothing_from_the_next_taker() {
        let journal = scratch("dropped-waiter");
        let held = ActiveLock::try_take(&journal)
            .unwrap()
            .expect("free at first");
        let notify = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        drop(ActiveLock::wait(&journal, notify).unwrap());
        drop(held);
        // The dropped waiter may have taken the lock in passing; it lets go of it at once.
        let next = ActiveLock::take_within(&journal, Duration::from_secs(5)).unwrap();
        assert!(next.is_some(), "the lock stayed with a dropped waiter");
    }

    #[test]
    fn a_file_that_is_not_a_lock_is_refused_and_left_alone() {
        let journal = scratch("foreign");
        let path = ActiveLock::path(&journal);
        std::fs::write(&path, b"not a lock").unwrap();
        let err = ActiveLock::try_take(&journal).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("is not an understudy active lock"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"not a lock");
    }

    #[test]
    fn a_process_whose_threads_all_run_is_not_past_running_and_a_gone_one_is() {
        let me = std::process::id();
        let start = start_time(me).expect("this process has a start time");
        assert!(!past_running(me, start));
        // The same pid with another start time is another process: the recorded one is gone.
        assert!(past_running(me, start + 1));
        assert!(past_running(0, 0));
    }

    #[test]
    fn stat_fields_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 3 0 777 0";
        assert_eq!(stat_field(stat, 3), None);
        assert_eq!(stat_field(stat, 4), Some(1));
        assert_eq!(stat_field(stat, 9), Some(4194560));
        assert_eq!(stat_field(stat, 22), Some(777));
    }
}
