//! The seccomp filters as a user meets them: a thread that makes a call its filter forbids
//! kills the process with SIGSYS, after a line naming the thread and the call; `--no-seccomp`
//! turns the filters off and says so; every thread of a running guest is filtered and keeps
//! only its kind's capabilities, through a failover and a re-arm. (Every other integration
//! test runs under the filters.)
//!
//! The forbidden call is made on purpose: `UNDERSTUDY_SECCOMP_SELF_TEST=KIND` has a thread of
//! that kind call `execve` as soon as its filter is on (see `vmm_core::jail`).

mod common;

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;

use common::running::Running;
use common::{config, env_file, require_kvm, stderr, stdout, understudy_command};
use serde_json::json;

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
    let checkpointed = config("checkpoint-pair.toml");
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
        // A checkpointed pair always syncs its first standby on a background job; a pair
        // resumed from the failed state may start none, on a host whose probe is cached.
        (
            "background",
            &["retire", "standby", "standby-sync"],
            vec!["run", &checkpointed],
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

/// Capability numbers (linux/capability.h), for reading `/proc/PID/task/TID/status`.
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_NICE: u32 = 23;

fn mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, &c| m | 1 << c)
}

/// One thread of a process as `/proc` shows it: its name, effective capabilities, seccomp
/// mode and number of filters.
#[derive(Debug)]
struct ThreadStatus {
    name: String,
    cap_eff: u64,
    seccomp_mode: u32,
    filters: u32,
}

/// Every thread of process `pid` but the kernel's own (KVM's workers).
fn threads(pid: u32) -> Vec<ThreadStatus> {
    let mut threads = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let name = field("Name:");
        if name.starts_with("kvm-") {
            continue;
        }
        threads.push(ThreadStatus {
            cap_eff: u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(u64::MAX),
            seccomp_mode: field("Seccomp:").parse().unwrap_or(0),
            filters: field("Seccomp_filters:").parse().unwrap_or(0),
            name,
        });
    }
    threads
}

/// The capabilities each thread should keep, by its name, as docs/security.md lists them
/// for a process started as root (files, a privileged peer port, raised priorities; no TAP
/// once the TAPs are open).
fn expected_caps(name: &str) -> Option<u64> {
    let files = mask(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH]);
    let ptrace = if std::path::Path::new("/dev/userfaultfd").exists() {
        0
    } else {
        mask(&[CAP_SYS_PTRACE])
    };
    let wide = files | mask(&[CAP_NET_BIND_SERVICE, CAP_SYS_NICE]) | ptrace;
    if name.contains("-vcpu") {
        Some(mask(&[CAP_SYS_NICE]))
    } else if name.contains("-virtio") || name.starts_with("control-") || name == "metrics-http" {
        Some(0)
    } else if name.ends_with("-watch") || name == "understudy" {
        Some(wide)
    } else if name == "active-lock" {
        Some(files | mask(&[CAP_NET_BIND_SERVICE]))
    } else {
        None
    }
}

/// Whether this test runs with every capability understudy keeps (as root does), so that
/// what its threads keep is exactly what the docs list rather than less.
fn test_has_every_kept_capability() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let needed = mask(&[
        CAP_DAC_OVERRIDE,
        CAP_DAC_READ_SEARCH,
        CAP_NET_BIND_SERVICE,
        CAP_NET_ADMIN,
        CAP_SYS_NICE,
        CAP_SYS_PTRACE,
    ]);
    eff & needed == needed
}

/// Checks every thread of `pid` runs under seccomp filters and keeps no more capabilities
/// than its kind's (exactly its kind's when the test runs as root); returns their names.
fn check_threads(pid: u32, exact: bool, log: &str) -> Vec<String> {
    let threads = threads(pid);
    for thread in &threads {
        assert!(
            thread.seccomp_mode == 2 && thread.filters >= 1,
            "thread {} runs without a filter: {thread:?}; log:\n{log}",
            thread.name
        );
        assert_eq!(
            thread.cap_eff & mask(&[CAP_SYS_ADMIN, CAP_NET_ADMIN]),
            0,
            "{thread:?}"
        );
        if let Some(expected) = expected_caps(&thread.name) {
            if exact {
                assert_eq!(thread.cap_eff, expected, "{thread:?}");
            } else {
                assert_eq!(thread.cap_eff & !expected, 0, "{thread:?}");
            }
        }
    }
    threads.into_iter().map(|t| t.name).collect()
}

#[test]
fn every_kind_of_thread_does_its_work_filtered_and_keeps_only_its_capabilities() {
    require_kvm();
    // A checkpointed pair (epochs, background jobs, failover, re-arm), a guest with a disk
    // (a virtio I/O thread) and one whose standby would run in a process of its own (its
    // journal and active lock: a link thread), served on a control socket and a metrics
    // port. (NICs and the remote link do their work under the filters in their own suites.)
    let env = env_file(
        "seccomp-kinds",
        "[[guest]]\nname = \"counter\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
         cmdline = \"interval_ms=20\"\ncrash_dump = false\n\
         [guest.standby]\nresume = \"checkpoint\"\ncheckpoint_interval_ms = 20\n\
         max_failovers = 10\n\
         [[guest]]\nname = \"blk\"\nkernel = \"KERNELS/blk\"\nmemory_mib = 64\n\
         cmdline = \"passes=1000 sectors=64\"\nserial = \"none\"\n[[guest.disk]]\npath = \"disk.img\"\n\
         [[guest]]\nname = \"solo\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
         serial = \"none\"\ncrash_dump = false\n[guest.standby]\nresume = \"checkpoint\"\n\
         process = \"separate\"\njournal = \"solo.journal\"\n",
    );
    let image = std::fs::File::create(env.with_file_name("disk.img")).unwrap();
    image.set_len(1 << 20).unwrap();
    let mut run = Running::start(&env, &["--metrics-addr", "127.0.0.1:0"]);
    run.wait_until("the guest armed and the metrics port served", |r| {
        r.status("counter")["armed"] == true && r.log.text().contains("metrics served at http://")
    });
    run.wait_for_more_counts(3);
    let pid = run.child.id();
    let exact = test_has_every_kept_capability();

    // The metrics port and a snapshot: control threads and the guest's own.
    let addr = run
        .log
        .text()
        .split("metrics served at http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let mut http = std::net::TcpStream::connect(&addr).unwrap();
    http.set_read_timeout(Some(common::PATIENCE)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let snapshot = env.with_file_name("snapshot");
    run.ok(json!({"request": "snapshot", "guest": "counter", "path": snapshot}));
    assert!(std::fs::read_dir(&snapshot).unwrap().next().is_some());

    let names = check_threads(pid, exact, &run.log.text());
    for wanted in [
        "understudy",
        "counter-watch",
        "counter-vcpu0",
        "blk-virtio0",
        "control-accept",
        "active-lock",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "no {wanted} in {names:?}"
        );
    }
    let main = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(main.contains("NoNewPrivs:\t1"), "{main}");

    // A failover and a re-arm with those capabilities, and again every thread filtered.
    run.ok(json!({"request": "fault", "guest": "counter", "kind": "kill"}));
    run.wait_until("failover and re-arm", |r| {
        let s = r.status("counter");
        s["failovers"] == 1 && s["armed"] == true
    });
    let counts = run.wait_for_more_counts(5);
    common::assert_consecutive(&counts, "counts across the failover");
    check_threads(pid, exact, &run.log.text());
    run.ok(json!({"request": "shutdown"}));
    run.wait_for_exit();
}
