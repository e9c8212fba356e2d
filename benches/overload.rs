//! Many checkpointed pairs on a busy host, faults injected over the control socket into
//! armed pairs: every failure detected should be one that was injected, and no guest should
//! go down. Each guest is a `counter` that keeps its vCPU busy; busy loops keep the host's
//! cores busy besides.
//!
//! Run: `cargo bench --bench overload` (optionally `-- PAIRS FAULTS HOGS TIMEOUT_MS`,
//! default 16 1000 2 200).

mod common;

use common::{events, kernel, request, scratch};

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A process that keeps one core busy until killed.
fn hog() -> Child {
    Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .expect("start a busy loop")
}

/// A small deterministic random sequence (xorshift64), so a run can be repeated.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let pairs = args.first().copied().unwrap_or(16) as usize;
    let faults = args.get(1).copied().unwrap_or(1000);
    let hogs = args.get(2).copied().unwrap_or(2);
    let timeout_ms = args.get(3).copied().unwrap_or(200);
    let dir = scratch("overload");
    let mut text = String::new();
    for i in 0..pairs {
        text.push_str(&format!(
            "[[guest]]\nname = \"g{i}\"\nkernel = \"{}\"\nmemory_mib = 64\n\
             cmdline = \"interval_ms=10\"\nserial = \"file:g{i}.log\"\ncrash_dump = false\n\
             [guest.standby]\nresume = \"checkpoint\"\ncheckpoint_interval_ms = 10\n\
             heartbeat_timeout_ms = {timeout_ms}\nmax_failovers = 1000000\n",
            kernel("counter").display()
        ));
    }
    let env = dir.join("pairs.toml");
    std::fs::write(&env, text).expect("write env");
    let socket = dir.join("api.sock");
    let log = dir.join("log.txt");
    let mut busy: Vec<Child> = (0..hogs).map(|_| hog()).collect();
    let mut understudy = common::serving(&env, &socket, &log);
    let begun = Instant::now();
    let mut random = XorShift(0x005e_ed0f_f00d);
    let kinds = ["kill", "mce", "panic", "hang"];
    // Per guest: the failure count when its fault was injected, while it is in flight.
    let mut in_flight: BTreeMap<String, u64> = BTreeMap::new();
    let mut injected: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent = 0;
    while sent < faults || !in_flight.is_empty() {
        let status = request(&socket, r#"{"request": "status"}"#);
        let guests = status["guests"].as_array().expect("guests");
        let mut armed = Vec::new();
        for guest in guests {
            let name = guest["name"].as_str().expect("name").to_owned();
            let failures = guest["last_failure"]["number"].as_u64().unwrap_or(0);
            if in_flight.get(&name).is_some_and(|&at| failures > at) {
                in_flight.remove(&name);
            }
            if guest["armed"] == true && !in_flight.contains_key(&name) {
                armed.push((name, failures));
            }
        }
        if guests.iter().all(|g| g["state"] != "running") {
            break;
        }
        if sent < faults && !armed.is_empty() {
            let (name, failures) = &armed[(random.next() % armed.len() as u64) as usize];
            let kind = kinds[(random.next() % 4) as usize];
            request(
                &socket,
                &format!(r#"{{"request": "fault", "guest": "{name}", "kind": "{kind}"}}"#),
            );
            in_flight.insert(name.clone(), *failures);
            *injected.entry(name.clone()).or_default() += 1;
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let ran = begun.elapsed();
    let _ = request(&socket, r#"{"request": "shutdown"}"#);
    let status = understudy.wait().expect("wait for understudy");
    for hog in &mut busy {
        let _ = hog.kill();
        let _ = hog.wait();
    }
    let text = std::fs::read_to_string(&log).expect("read log");
    let detected = events(&text, "failure-detected");
    let down = events(&text, "guest-down");
    let disproven = events(&text, "failure-disproven");
    let mut not_injected = 0;
    for i in 0..pairs {
        let guest = format!("g{i}");
        let of_guest = detected
            .iter()
            .filter(|l| l.contains(&format!(" guest={guest} ")))
            .count() as u64;
        not_injected += of_guest.saturating_sub(injected.get(&guest).copied().unwrap_or(0));
    }
    let mut broken = Vec::new();
    for i in 0..pairs {
        let console = std::fs::read_to_string(dir.join(format!("g{i}.log"))).unwrap_or_default();
        let counts: Vec<u64> = console
            .lines()
            .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
            .collect();
        if counts.first() != Some(&0) || counts.windows(2).any(|w| w[1] != w[0] + 1) {
            broken.push(format!("g{i}"));
        }
    }
    println!(
        "{pairs} pairs, {hogs} busy loops, heartbeat timeout {timeout_ms} ms: {sent} faults \
         injected in {:.0} s, {} failures detected, {not_injected} not injected, {} disproven \
         afterwards, {} guests down, consoles not counted exactly once: {broken:?}; \
         understudy ended with {status}",
        ran.as_secs_f64(),
        detected.len(),
        disproven.len(),
        down.len(),
    );
    for line in detected
        .iter()
        .filter(|l| l.contains("vcpu-unresponsive"))
        .take(5)
        .chain(down.iter().take(5))
    {
        println!("  {line}");
    }
    println!("log: {}", log.display());
}
