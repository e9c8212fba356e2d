//! Time from `understudy run` to the first console byte of the `hello` kernel, as a median
//! over many runs, next to QEMU `-M microvm` booting the same kernel when QEMU is installed.
//!
//! Run: `cargo bench --bench boot` (optionally `-- RUNS`). Prints one line per figure; the
//! figures are whole-process times measured from this process, so they include fork/exec.

mod common;

use common::{median, qemu_installed, qemu_microvm};

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `command`, returns the time until its first stdout byte, then lets it finish.
fn time_to_first_byte(command: &mut Command) -> Duration {
    let start = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("start the command");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut byte = [0u8; 1];
    let got = stdout.read(&mut byte).expect("read the first byte");
    let elapsed = start.elapsed();
    assert_eq!(got, 1, "the command printed nothing");
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let _ = child.wait();
    elapsed
}

fn qemu_command(kernel: &Path) -> Option<Command> {
    if !qemu_installed() {
        return None;
    }
    let mut command = qemu_microvm(32);
    command.arg("-kernel").arg(kernel);
    Some(command)
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hello.toml");
    let kernel = Path::new(env!("UNDERSTUDY_KERNELS")).join("hello");
    let understudy = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_understudy"));
        command.arg("run").arg(&config).env("RUST_LOG", "off");
        command
    };
    // One warm-up each so page cache and KVM module state are the same for both.
    time_to_first_byte(&mut understudy());
    let mut ours = Vec::with_capacity(runs);
    let mut theirs = Vec::with_capacity(runs);
    let qemu_available = qemu_command(&kernel).is_some();
    if let Some(mut q) = qemu_command(&kernel) {
        time_to_first_byte(&mut q);
    }
    // Interleaved, so drift in machine speed affects both alike.
    for _ in 0..runs {
        ours.push(time_to_first_byte(&mut understudy()));
        if let Some(mut q) = qemu_command(&kernel) {
            theirs.push(time_to_first_byte(&mut q));
        }
    }
    let ours = median(ours);
    println!(
        "boot to first serial byte, understudy run (hello, 32 MiB), median of {runs}: {:.2} ms",
        ours.as_secs_f64() * 1e3
    );
    if qemu_available {
        let theirs = median(theirs);
        println!(
            "boot to first serial byte, qemu -M microvm (same kernel), median of {runs}: {:.2} ms",
            theirs.as_secs_f64() * 1e3
        );
        println!(
            "ratio understudy / qemu: {:.3}",
            ours.as_secs_f64() / theirs.as_secs_f64()
        );
    } else {
        println!(
            "qemu-system-x86_64 not installed: no comparison (apt-get install qemu-system-x86)"
        );
    }
}
