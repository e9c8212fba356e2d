//! The seccomp filters as a user meets them: a thread that makes a call its filter forbids
//! kills the process with SIGSYS, after a line naming the thread and the call; `--no-seccomp`
//! turns the filters off and says so. (Every other integration test runs under the filters.)
//!
//! The forbidden call is made on purpose: `UNDERSTUDY_SECCOMP_SELF_TEST=KIND` has a thread of
//! that kind call `execve` as soon as its filter is on (see `vmm_core::jail`).

mod common;

use std::os::unix::process::ExitStatusExt;

use common::{config, env_file, require_kvm, stderr, stdout, understudy_command};

/// `execve` on x86-64.
const EXECVE: i64 = 59;

/// Runs `understudy run ARGS` with a thread of kind `kind` making a forbidden call.
fn run_with_forbidden_call(kind: &str, args: &[&str]) -> std::process::Output {
    let mut command = understudy_command(args);
    command.env("UNDERSTUDY_SECCOMP_SELF_TEST", kind);
    command.output().expect("run understudy")
}

#[test]
fn a_forbidden_call_on_any_kind_of_thread_kills_the_process_with_sigsys_naming_the_thread() {
    require_kvm();
    let socket =
        std::env::temp_dir().join(format!("understudy-seccomp-{}.sock", std::process::id()));
    let socket = socket.to_string_lossy().into_owned();
    let counter = config("counter.toml");
    let pair = config("pair.toml");
    // A guest with a disk (a virtio I/O thread), and one whose standby would run in a process
    // of its own (an active-lock thread), each with its files in a folder of its own.
    let disk = env_file(
        "seccomp-disk",
        "[[guest]]\nname = \"blk\"\nkernel = \"KERNELS/blk\"\nmemory_mib = 64\n\
         cmdline = \"passes=1 sectors=64\"\n[[guest.disk]]\npath = \"disk.img\"\n",
    );
    let image = std::fs::File::create(disk.with_file_name("disk.img")).unwrap();
    image.set_len(1 << 20).unwrap();
    let separate = env_file(
        "seccomp-separate",
        "[[guest]]\nname = \"counter\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
         [guest.standby]\nresume = \"checkpoint\"\nprocess = \"separate\"\n\
         journal = \"counter.journal\"\n",
    );
    let (disk, separate) = (disk.to_string_lossy(), separate.to_string_lossy());
    for (kind, threads, args) in [
        ("vcpu", &["counter-vcpu0"][..], vec!["run", &counter]),
        ("device-io", &["blk-virtio0"], vec!["run", &disk]),
        ("guest-loop", &["counter-watch"], vec!["run", &counter]),
        // Which job starts first may depend on the host (a probe machine to retire, or not).
        (
            "background",
            &["retire", "standby", "standby-sync"],
            vec!["run", &pair],
        ),
        ("link", &["active-lock"], vec!["run", &separate]),
        ("supervisor", &["understudy"], vec!["run", &counter]),
        (
            "control",
            &["control-accept"],
            vec!["run", &counter, "--api-socket", &socket],
        ),
    ] {
        let out = run_with_forbidden_call(kind, &args);
        let log = stderr(&out);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {:?}, log:\n{log}",
            out.status
        );
        let said = |thread: &&str| {
            log.contains(&format!(
                "thread {thread} made system call {EXECVE}, which its seccomp filter forbids"
            ))
        };
        assert!(
            threads.iter().any(said),
            "{kind}: expected thread {threads:?} to be named with call {EXECVE} in:\n{log}"
        );
    }
}

#[test]
fn no_seccomp_runs_the_guest_unfiltered_and_warns() {
    require_kvm();
    let out = run_with_forbidden_call("vcpu", &["run", &config("hello.toml"), "--no-seccomp"]);
    let log = stderr(&out);
    // The guest ends itself with (0 << 1) | 1: the forbidden call failed harmlessly.
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert_eq!(stdout(&out), "hello from understudy\n");
    assert!(
        log.contains("WARN") && log.contains("--no-seccomp"),
        "no warning about running without filters:\n{log}"
    );
}
