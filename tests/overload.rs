//! A busy host never fails over a healthy guest: checkpointed pairs whose guests keep their
//! vCPUs busy, on a host whose every core also runs a busy loop, take faults over the control
//! socket, and only the guests a fault hit fail over, each once per fault; no guest goes
//! down and every console counts each line exactly once.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command};

use common::running::Running;
use common::{assert_consecutive, env_file, numbers_after, XorShift};
use serde_json::{json, Value};

const PAIRS: usize = 8;
const FAULTS: u32 = 24;

/// A busy loop pinned to host CPU `cpu`, until dropped.
struct Hog(Child);

impl Hog {
    fn on(cpu: usize) -> Hog {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("start a busy loop");
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            // A refusal (a CPU this process may not use) leaves the loop unpinned: still busy.
            libc::sched_setaffinity(child.id() as i32, std::mem::size_of_val(&set), &set);
        }
        Hog(child)
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The guests of a `status` reply, by name.
fn guests(run: &Running) -> BTreeMap<String, Value> {
    let status = run.ok(json!({"request": "status"}));
    status["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["name"].as_str().unwrap().to_owned(), g.clone()))
        .collect()
}

fn failures(guest: &Value) -> u64 {
    guest["last_failure"]["number"].as_u64().unwrap_or(0)
}

fn events_of<'a>(log: &'a str, event: &str, guest: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(&format!("event=\"{event}\"")))
        .filter(|l| l.contains(&format!(" guest={guest} ")))
        .collect()
}

fn counts(path: &Path) -> usize {
    numbers_after(&std::fs::read_to_string(path).unwrap_or_default(), "count ").len()
}

#[test]
fn busy_guests_on_a_busy_host_fail_over_only_where_a_fault_hit() {
    let seed = common::fault_seed();
    let mut text = String::new();
    for i in 0..PAIRS {
        text.push_str(&format!(
            "[[guest]]\nname = \"g{i}\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
             cmdline = \"interval_ms=10\"\nserial = \"file:g{i}.log\"\ncrash_dump = false\n\
             [guest.standby]\nresume = \"checkpoint\"\ncheckpoint_interval_ms = 10\n\
             heartbeat_timeout_ms = 50\nmax_failovers = 1000\n"
        ));
    }
    let env = env_file("overload", &text);
    let _hogs: Vec<Hog> = (0..host_cpus()).map(Hog::on).collect();
    let mut run = Running::start(&env, &[]);
    let mut random = XorShift(seed);
    let kinds = ["kill", "mce", "panic", "hang"];
    // Per guest: faults injected, and the failure count at the one in flight.
    let mut injected: BTreeMap<String, u64> = BTreeMap::new();
    let mut in_flight: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent = 0;
    let context = format!("seed {seed} (set UNDERSTUDY_FAULT_SEED to repeat)");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while sent < FAULTS || !in_flight.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{context}: faults not handled in time; log:\n{}",
            run.log.text()
        );
        let now = guests(&run);
        for (name, guest) in &now {
            assert_eq!(
                guest["state"],
                "running",
                "{context}: {name} is no longer running: {guest}; log:\n{}",
                run.log.text()
            );
            if in_flight.get(name).is_some_and(|&at| failures(guest) > at) {
                in_flight.remove(name);
            }
        }
        let armed: Vec<&String> = now
            .iter()
            .filter(|(name, g)| g["armed"] == true && !in_flight.contains_key(*name))
            .map(|(name, _)| name)
            .collect();
        if sent < FAULTS && !armed.is_empty() {
            let name = armed[(random.next() % armed.len() as u64) as usize].clone();
            let kind = kinds[(random.next() % 4) as usize];
            run.ok(json!({"request": "fault", "guest": name, "kind": kind}));
            in_flight.insert(name.clone(), failures(&now[&name]));
            *injected.entry(name).or_default() += 1;
            sent += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Every guest re-armed and counting on: a while longer, and nobody else fails.
    run.wait_until("every pair armed again", |r| {
        guests(r).values().all(|g| g["armed"] == true)
    });
    let consoles: Vec<_> = (0..PAIRS)
        .map(|i| env.with_file_name(format!("g{i}.log")))
        .collect();
    let before: Vec<usize> = consoles.iter().map(|p| counts(p)).collect();
    run.wait_until("every guest to count 100 more", |_| {
        consoles
            .iter()
            .zip(&before)
            .all(|(p, n)| counts(p) >= n + 100)
    });
    let last = guests(&run);
    run.ok(json!({"request": "shutdown"}));
    assert_eq!(run.wait_for_exit().code(), Some(0), "{}", run.log.text());
    let log = run.log.text();
    assert!(
        !log.contains("event=\"guest-down\""),
        "{context}: a guest went down:\n{log}"
    );
    for (i, console) in consoles.iter().enumerate() {
        let name = format!("g{i}");
        let hit = injected.get(&name).copied().unwrap_or(0);
        assert_eq!(
            events_of(&log, "failure-detected", &name).len() as u64,
            hit,
            "{context}: {name} took {hit} faults; failures detected:\n{log}"
        );
        assert_eq!(
            last[&name]["failovers"].as_u64(),
            Some(hit),
            "{context}: {name}"
        );
        let text = std::fs::read_to_string(console).unwrap();
        let counted = numbers_after(&text, "count ");
        assert_eq!(counted.first(), Some(&0), "{context}: {name}");
        assert_consecutive(&counted, &format!("{context}: {name}"));
        assert_eq!(
            text.matches("counter: interval_ms").count(),
            1,
            "{context}: {name} rebooted"
        );
    }
}

#[test]
fn a_stopped_process_fails_nothing_over_when_it_continues() {
    let mut text = String::new();
    for resume in ["checkpoint", "failed-state"] {
        text.push_str(&format!(
            "[[guest]]\nname = \"{resume}\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
             cmdline = \"interval_ms=10\"\nserial = \"file:{resume}.log\"\ncrash_dump = false\n\
             [guest.standby]\nresume = \"{resume}\"\nheartbeat_timeout_ms = 50\n"
        ));
    }
    let env = env_file("stopped", &text);
    let mut run = Running::start(&env, &[]);
    run.wait_until("both pairs armed", |r| {
        guests(r).values().all(|g| g["armed"] == true)
    });
    let pid = run.child.id() as i32;
    for _ in 0..3 {
        // SAFETY: kill(2) with a pid this test started and has not reaped.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(std::time::Duration::from_millis(500));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let consoles = [
        env.with_file_name("checkpoint.log"),
        env.with_file_name("failed-state.log"),
    ];
    let before: Vec<usize> = consoles.iter().map(|p| counts(p)).collect();
    run.wait_until("both guests to count 50 more", |_| {
        consoles
            .iter()
            .zip(&before)
            .all(|(p, n)| counts(p) >= n + 50)
    });
    let last = guests(&run);
    run.ok(json!({"request": "shutdown"}));
    assert_eq!(run.wait_for_exit().code(), Some(0), "{}", run.log.text());
    let log = run.log.text();
    assert!(
        !log.contains("event=\"failure-detected\""),
        "a stopped process is no failed guest:\n{log}"
    );
    for (name, guest) in &last {
        assert_eq!(guest["failovers"], 0, "{name}: {guest}");
    }
}
