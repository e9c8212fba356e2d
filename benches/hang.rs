//! How long a real hang takes to detect, alone and on an overloaded host: a checkpointed pair
//! whose guest keeps its vCPU busy stops its heartbeats (the `hang` fault) again and again,
//! first with the host to itself, then with busy loops making every core N-fold overloaded.
//! A guest is judged by its own run time, so on an N-fold overloaded host a hang should take
//! about N timeouts of wall time to detect, and never less than one.
//!
//! Run: `cargo bench --bench hang` (optionally `-- SAMPLES TIMEOUT_MS OVERLOAD`, default
//! 20 100 8).

mod common;

use common::{events, kernel, request, scratch, timestamp};

use std::process::{Child, Command};
use std::time::Duration;

/// A process that keeps one core busy until killed.
fn hog() -> Child {
    Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .expect("start a busy loop")
}

/// The number after `text` in `line`.
fn number_after(line: &str, text: &str) -> Option<f64> {
    line.split(text)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn percentile(mut samples: Vec<f64>, p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    let at = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[at]
}

/// Milliseconds from each injected hang to its detection, `samples` of them, with `hogs`
/// busy loops running; and for each, the wall time of the silence over the part of it the
/// guest ran (how overloaded the host was, as the guest saw it).
fn detection_ms(samples: u32, timeout_ms: u64, hogs: usize) -> (Vec<f64>, Vec<f64>) {
    let dir = scratch(&format!("hang-{hogs}"));
    let env = dir.join("pair.toml");
    std::fs::write(
        &env,
        format!(
            "[[guest]]\nname = \"busy\"\nkernel = \"{}\"\nmemory_mib = 64\n\
             cmdline = \"interval_ms=2\"\nserial = \"none\"\ncrash_dump = false\n\
             [guest.standby]\nresume = \"checkpoint\"\nheartbeat_timeout_ms = {timeout_ms}\n\
             max_failovers = 1000000\n",
            kernel("counter").display()
        ),
    )
    .expect("write env");
    let socket = dir.join("api.sock");
    let log = dir.join("log.txt");
    let mut busy: Vec<Child> = (0..hogs).map(|_| hog()).collect();
    let mut understudy = common::serving(&env, &socket, &log);
    let status = |field: &str| -> serde_json::Value {
        let status = request(&socket, r#"{"request": "status"}"#);
        status["guests"][0][field].clone()
    };
    for injected in 0..u64::from(samples) {
        while !(status("armed") == true
            && status("last_failure")["number"].as_u64().unwrap_or(0) == injected)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Some heartbeats on the new active first, so the guest is judged by them.
        std::thread::sleep(Duration::from_millis(200));
        request(
            &socket,
            r#"{"request": "fault", "guest": "busy", "kind": "hang"}"#,
        );
        while status("last_failure")["number"].as_u64().unwrap_or(0) <= injected {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = request(&socket, r#"{"request": "shutdown"}"#);
    let _ = understudy.wait();
    for hog in &mut busy {
        let _ = hog.kill();
        let _ = hog.wait();
    }
    let text = std::fs::read_to_string(&log).expect("read log");
    let injected: Vec<f64> = events(&text, "fault-injected")
        .into_iter()
        .filter_map(timestamp)
        .collect();
    let lines = events(&text, "failure-detected");
    let detected: Vec<f64> = lines.iter().copied().filter_map(timestamp).collect();
    // "no heartbeat for RAN ms of its run (WALL ms since the last, ...)"
    let overload: Vec<f64> = lines
        .iter()
        .map(|l| {
            let ran = number_after(l, "no heartbeat for ").unwrap_or(1.0);
            number_after(l, "of its run (").map_or(1.0, |wall| wall / ran)
        })
        .collect();
    assert_eq!(
        detected.len(),
        injected.len(),
        "a failure that was not injected; log: {}",
        log.display()
    );
    let latency = injected
        .iter()
        .zip(&detected)
        .map(|(i, d)| (d - i) * 1e3)
        .collect();
    (latency, overload)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let samples = args.first().copied().unwrap_or(20) as u32;
    let timeout_ms = args.get(1).copied().unwrap_or(100);
    let overload = args.get(2).copied().unwrap_or(8) as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // N-fold overload: N runnable threads per core, the guest's vCPU among them.
    let hogs = (overload * cores).saturating_sub(1);
    for (what, hogs) in [("alone", 0), ("overloaded", hogs)] {
        let (ms, overload) = detection_ms(samples, timeout_ms, hogs);
        println!(
            "{what:>10} ({hogs} busy loops on {cores} cores): a hang detected after median \
             {:.0} ms, p99 {:.0} ms, least {:.0} ms ({} hangs, {timeout_ms} ms timeout); \
             the silence's wall time over its run time: median {:.1}",
            percentile(ms.clone(), 0.5),
            percentile(ms.clone(), 0.99),
            percentile(ms.clone(), 0.0),
            ms.len(),
            percentile(overload, 0.5),
        );
    }
}
