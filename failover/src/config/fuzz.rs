//! The entry point of the environment-file fuzz target (`fuzz/fuzz_targets/env_file.rs`): the
//! fuzzer's bytes parsed and validated as an environment file in `configs/`, as `understudy
//! check` does it. Whatever the bytes, the result must be an error or an environment, never a
//! panic; and an environment, written out as `check` prints it, must read back as itself.
//!
//! Validation looks at the file system (kernels, initrds and disk images must exist; paths
//! are resolved), and the fuzzer's paths name anything at all. So it runs on a thread of its
//! own that cannot create, change or remove a file: a seccomp filter answers every such
//! system call `EROFS`, as a read-only file system would. Reading and `stat` are left alone.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SendError, Sender};
use std::sync::{Mutex, PoisonError};

use super::{ConfigError, Environment};

/// Parses and validates `data` (as UTF-8, invalid bytes replaced) as an environment file
/// in `configs/`, on a thread that cannot write to the file system, and checks that a valid
/// environment reads back from what `to_toml` writes.
pub fn env_file(data: &[u8]) -> Result<Environment, ConfigError> {
    let text = String::from_utf8_lossy(data).into_owned();
    on_read_only_thread(move || {
        let base = configs_dir();
        let path = base.join("fuzzed.toml");
        let parsed = Environment::parse(&text, &path, &base);
        if let Ok(environment) = &parsed {
            let written = environment.to_toml();
            match Environment::parse(&written, &path, &base) {
                Ok(again) => assert_eq!(
                    &again, environment,
                    "the environment written as\n{written}\nreads back different"
                ),
                Err(err) => {
                    panic!("the environment written as\n{written}\ndoes not read back: {err}")
                }
            }
        }
        parsed
    })
}

/// The folder of the example environment files, whose relative paths the seeds use.
pub fn configs_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// Work for the read-only thread.
type Job = Box<dyn FnOnce() + Send>;

/// Runs `work` on this process's read-only thread (started on first use, and kept: starting
/// a thread and its filter costs more than most inputs) and returns what it returned; a
/// panic in it is a panic here.
fn on_read_only_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    static WORKER: Mutex<Option<Sender<Job>>> = Mutex::new(None);
    let (done, outcome) = std::sync::mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = done.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
    });
    {
        // A panic while this is held cannot leave the sender half-changed.
        let mut worker = WORKER.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = worker.get_or_insert_with(start_read_only_thread);
        if let Err(SendError(job)) = sender.send(job) {
            // The thread is gone (its filter could not be installed): try a new one.
            let _ = worker.insert(start_read_only_thread()).send(job);
        }
    }
    match outcome.recv() {
        Ok(Ok(value)) => value,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("the read-only thread ended without doing the work"),
    }
}

/// Starts a thread that forbids itself file changes, then does the jobs sent to it.
fn start_read_only_thread() -> Sender<Job> {
    let (jobs, queue) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("read-only".into())
        .spawn(move || {
            forbid_file_changes();
            for job in queue {
                job();
            }
        })
        .expect("a thread for the environment-file fuzz target");
    jobs
}

/// System calls that create, change or remove a file, or could be used to (`io_uring` and
/// `openat2`, whose arguments a filter cannot see, and mounting), whatever their arguments.
/// `open` and `openat` are refused only with flags that write or create.
const CHANGE_FILES: &[libc::c_long] = &[
    libc::SYS_creat,
    libc::SYS_openat2,
    libc::SYS_open_by_handle_at,
    libc::SYS_io_uring_setup,
    libc::SYS_truncate,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_futimesat,
    libc::SYS_utimensat,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    // Binding a Unix socket creates a file.
    libc::SYS_bind,
    libc::SYS_mount,
    libc::SYS_umount2,
];

/// `open` flags that write or create.
const WRITE_FLAGS: libc::c_int =
    libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND;

/// `AUDIT_ARCH_X86_64`: the architecture a filter's system call numbers are for.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// System call numbers from here on are the x32 ABI's.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Installs, on the calling thread only (and threads it starts), a seccomp filter that fails
/// every system call that would create, change or remove a file with `EROFS`.
fn forbid_file_changes() {
    let filter = file_change_filter();
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS only sets a flag of this thread, which seccomp requires of
    // an unprivileged filter; it cannot fail with these arguments.
    let no_new_privs = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    // SAFETY: `program` points at `filter`, which outlives the call; the kernel copies it.
    // Without SECCOMP_FILTER_FLAG_TSYNC the filter applies to this thread alone.
    let installed = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &program as *const libc::sock_fprog,
        )
    };
    // Fuzzing on without the filter could change files: better to stop.
    assert!(
        no_new_privs == 0 && installed == 0,
        "cannot keep the environment-file fuzz target from writing files: {}",
        std::io::Error::last_os_error()
    );
}

/// The filter of [`forbid_file_changes`], in classic BPF over `struct seccomp_data` (the
/// system call number at offset 0, the architecture at 4, argument N's low half at 16 + 8N).
fn file_change_filter() -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let load = |offset: u32| op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, offset);
    let jump_if =
        |test: u32, k: u32, jt: u8, jf: u8| op(libc::BPF_JMP | test | libc::BPF_K, jt, jf, k);
    let allow = op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW);
    let refuse = op(
        libc::BPF_RET | libc::BPF_K,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | libc::EROFS as u32,
    );
    let mut filter = vec![
        load(4),
        jump_if(libc::BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
        refuse,
        load(0),
        jump_if(libc::BPF_JGE, X32_SYSCALL_BIT, 0, 1),
        refuse,
    ];
    for &nr in CHANGE_FILES {
        filter.extend([jump_if(libc::BPF_JEQ, nr as u32, 0, 1), refuse]);
    }
    filter.extend([
        jump_if(libc::BPF_JEQ, libc::SYS_open as u32, 2, 0),
        jump_if(libc::BPF_JEQ, libc::SYS_openat as u32, 3, 0),
        allow,
        load(16 + 8), // open's flags
        op(libc::BPF_JMP | libc::BPF_JA, 0, 0, 1),
        load(16 + 2 * 8), // openat's flags
        jump_if(libc::BPF_JSET, WRITE_FLAGS as u32, 0, 1),
        refuse,
        allow,
    ]);
    filter
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_core::seeded_inputs::{seeds, Inputs};

    /// Pieces of TOML and of the environment file's schema that mutations insert.
    const WORDS: &[&str] = &[
        "[[guest]]\n",
        "[guest.standby]\n",
        "[guest.cpu]\n",
        "[[guest.disk]]\n",
        "[[guest.net]]\n",
        "name = \"b\"\n",
        "kernel = \"../target/kernels/hello\"\n",
        "initrd = \"disk.img\"\n",
        "path = \"disk.img\"\n",
        "read_only = true\n",
        "tap = \"tap0\"\n",
        "mac = \"01:00:5e:00:00:01\"\n",
        "serial_input = \"stdin\"\n",
        "resume = \"checkpoint\"\n",
        "on_failure = \"restart\"\n",
        "hide = [\"cx16\", \"cx16\"]\n",
        "api_socket = \"\"\n",
        "serial = \"file:\"\n",
        "\"file:/\"",
        "\"file:..\"",
        "\"none\"",
        "=",
        "\"",
        "'",
        "\"\"\"",
        "[",
        "]",
        "{",
        "}",
        ",",
        ".",
        "#",
        "\n",
        "\\",
        "\r\n",
        "0",
        "-1",
        "1",
        "255",
        "256",
        "4294967296",
        "18446744073709551615",
        "9223372036854775807",
        "-9223372036854775808",
        "1e400",
        "nan",
        "inf",
        "true",
        "1979-05-27T07:32:00Z",
        "\u{0}",
        "\u{feff}",
    ];

    /// The seeds, and the same files with the test binary (an ELF file, which the kernel
    /// probe takes) for the test kernels, which a `cargo test` of this crate alone does not
    /// build.
    fn inputs() -> Vec<String> {
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_string_lossy();
        let mut inputs = Vec::new();
        for (_, seed) in seeds("env_file") {
            let text = String::from_utf8(seed).expect("text seeds");
            let mut with_exe = text.clone();
            for kernel in ["hello", "counter", "crash", "hang", "dirty", "blk", "net"] {
                with_exe = with_exe.replace(&format!("../target/kernels/{kernel}"), &exe);
            }
            inputs.extend([text, with_exe]);
        }
        inputs
    }

    #[test]
    fn a_panic_on_the_read_only_thread_is_a_panic_of_its_caller() {
        let caught = std::panic::catch_unwind(|| {
            on_read_only_thread(|| panic!("a panic this test makes on purpose"))
        });
        assert!(caught.is_err());
        assert_eq!(on_read_only_thread(|| 7), 7, "the thread serves on");
    }

    #[test]
    fn the_fuzz_targets_seeds_are_the_example_configs() {
        let seeds = seeds("env_file");
        for entry in std::fs::read_dir(configs_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    seeds.contains(&(name.clone(), std::fs::read(&path).unwrap())),
                    "{} is not in fuzz/seeds/env_file/ as it is; copy it there again",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn the_example_configs_read_back_as_themselves() {
        let valid = inputs()
            .iter()
            .filter(|text| env_file(text.as_bytes()).is_ok())
            .count();
        assert!(valid >= 6, "only {valid} of the example configs are valid");
    }

    /// A bounded run of what the fuzz target does, on every build: random bytes and random
    /// changes to the example configs. None may panic, or be valid and fail to read back.
    #[test]
    fn random_and_mutated_environment_files_are_errors_or_read_back() {
        let mut inputs_from = Inputs::new(0x5eed_e4f1);
        let seeds = inputs();
        let mut valid = 0;
        for round in 0..2000 {
            let input = if round % 5 == 0 {
                inputs_from.random(512)
            } else {
                let seed = &seeds[inputs_from.below(seeds.len())];
                inputs_from.mutated_text(seed.as_bytes(), WORDS)
            };
            valid += usize::from(env_file(&input).is_ok());
        }
        // How many stay valid depends on which example configs are usable here (an image
        // that does not exist makes one invalid), not only on the mutations.
        assert!(
            valid >= 40,
            "the mutations were hardly ever valid ({valid})"
        );
    }

    #[test]
    fn the_read_only_thread_reads_but_cannot_create_change_or_remove_a_file() {
        let dir = std::env::temp_dir().join(format!("understudy-read-only-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let existing = dir.join("existing");
        std::fs::write(&existing, b"before").unwrap();
        let refused = |result: std::io::Result<()>| {
            result.err().and_then(|e| e.raw_os_error()) == Some(libc::EROFS)
        };
        let (dir_there, existing_there) = (dir.clone(), existing.clone());
        let outcomes = on_read_only_thread(move || {
            let (dir, existing) = (dir_there, existing_there);
            [
                ("read", std::fs::read(&existing).map(|_| ()).is_ok()),
                ("stat", std::fs::metadata(&existing).is_ok()),
                ("create", refused(std::fs::write(dir.join("new"), b"x"))),
                (
                    "append",
                    refused(
                        std::fs::OpenOptions::new()
                            .append(true)
                            .open(&existing)
                            .and_then(|mut f| f.write_all(b"x")),
                    ),
                ),
                ("remove", refused(std::fs::remove_file(&existing))),
                (
                    "rename",
                    refused(std::fs::rename(&existing, dir.join("moved"))),
                ),
                ("mkdir", refused(std::fs::create_dir(dir.join("sub")))),
                (
                    "bind",
                    refused(std::os::unix::net::UnixListener::bind(dir.join("sock")).map(|_| ())),
                ),
            ]
        });
        for (what, as_expected) in outcomes {
            assert!(as_expected, "{what} on the read-only thread");
        }
        assert_eq!(std::fs::read(&existing).unwrap(), b"before");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "only `existing`"
        );
        // This thread was never restricted.
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
