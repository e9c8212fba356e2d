//! The guest `counter` on a [`Cluster`], as `tests/cluster.rs` drives it: configured on
//! nodes `pcmk1` and `pcmk2`, its role, console and events read from outside the nodes (each
//! node's `/run/understudy` is a directory of the cluster's), the console checked across
//! the nodes, and a sampler of both nodes' roles that reports any moment both ran it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cluster::{unix_ms, Cluster, CLUSTER_PATIENCE};
use super::{numbers_after, require_kvm};

/// The nodes that may run the guest; the third only votes.
pub const GUEST_NODES: [usize; 2] = [1, 2];

/// The most lines one epoch (20 ms) of the counter (a line every 20 ms) can hold, however
/// late the epoch runs on a loaded machine: the bound of the exactly-once window.
pub const ONE_EPOCH_OF_LINES: usize = 10;

/// The cluster with the guest configured on it.
pub struct GuestCluster {
    /// The cluster itself.
    pub cluster: Cluster,
    binary: PathBuf,
}

impl GuestCluster {
    pub fn new() -> GuestCluster {
        require_kvm();
        let cluster = Cluster::new("guest", 3, &[("dc-deadtime", "2s")]);
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_understudy"));
        cluster.configure_guest(&binary, "interval_ms=20 stop_after=100000000");
        GuestCluster { cluster, binary }
    }

    /// Node `k`'s answer to `role`, or what went wrong.
    pub fn role(&self, k: usize) -> String {
        role_of(&self.binary, &self.socket(k))
    }

    fn socket(&self, k: usize) -> PathBuf {
        self.cluster.node_dir(k).join("understudy/counter.sock")
    }

    /// Node `k`'s understudy log: the guest's console and understudy's log, across the
    /// node's boots.
    pub fn log(&self, k: usize) -> String {
        std::fs::read_to_string(self.cluster.node_dir(k).join("understudy/counter.log"))
            .unwrap_or_default()
    }

    /// Both nodes' logs and the cluster's, for a failure.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for k in GUEST_NODES {
            let log = self.log(k);
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.starts_with("count "))
                .rev()
                .take(25)
                .collect();
            out.push_str(&format!(
                "--- pcmk{k} understudy log (last lines but counts):\n"
            ));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str(&self.cluster.status(3));
        out.push_str(&self.cluster.logs());
        out
    }

    /// Waits until node `k`'s role line satisfies `done`.
    pub fn wait_role(&self, k: usize, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + CLUSTER_PATIENCE;
        loop {
            let role = self.role(k);
            if done(&role) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for pcmk{k} to be {what}; its role: {role:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_active(&self, k: usize) {
        self.wait_role(k, "active", |r| r.starts_with("role=active"));
    }

    pub fn wait_following(&self, k: usize) {
        self.wait_role(k, "a standby following the active", |r| {
            r.contains("state=following")
        });
    }

    /// Waits until the guest has printed `more` lines past `count` on node `k`.
    pub fn wait_counts_past(&self, k: usize, count: u64, more: u64) {
        let deadline = Instant::now() + CLUSTER_PATIENCE;
        while numbers_after(&self.log(k), "count ")
            .last()
            .is_none_or(|&last| last < count + more)
        {
            assert!(
                Instant::now() < deadline,
                "pcmk{k} did not print {more} lines past count {count}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last count any node printed.
    pub fn last_count(&self) -> u64 {
        GUEST_NODES
            .iter()
            .filter_map(|&k| numbers_after(&self.log(k), "count ").into_iter().max())
            .max()
            .unwrap_or(0)
    }

    /// Every count the nodes printed, checked: none of `0..=max` missing, none three times.
    /// Returns the counts printed twice.
    pub fn repeated_counts(&self) -> Vec<u64> {
        let mut all: Vec<u64> = GUEST_NODES
            .iter()
            .flat_map(|&k| numbers_after(&self.log(k), "count "))
            .collect();
        all.sort_unstable();
        let max = *all.last().expect("the guest printed nothing");
        let mut seen = vec![0u8; max as usize + 1];
        for &n in &all {
            seen[n as usize] += 1;
        }
        let missing: Vec<u64> = (0..=max).filter(|&n| seen[n as usize] == 0).collect();
        assert!(
            missing.is_empty(),
            "console lines lost across the nodes: {missing:?}\n{}",
            self.report()
        );
        let thrice: Vec<u64> = (0..=max).filter(|&n| seen[n as usize] > 2).collect();
        assert!(thrice.is_empty(), "lines printed 3 times: {thrice:?}");
        (0..=max).filter(|&n| seen[n as usize] == 2).collect()
    }

    /// The Unix microseconds at which node `k`'s guest last resumed on a takeover
    /// (`taken-over`'s `resumed_unix_us`), if it ever did.
    pub fn last_takeover_us(&self, k: usize) -> Option<u64> {
        self.log(k)
            .lines()
            .rev()
            .filter(|l| l.contains("event=\"taken-over\""))
            .find_map(|l| field(l, "resumed_unix_us")?.parse().ok())
    }

    /// The Unix microseconds of node `k`'s last log line with `event`.
    pub fn last_event_us(&self, k: usize, event: &str) -> Option<u64> {
        let tag = format!("event=\"{event}\"");
        self.log(k)
            .lines()
            .rev()
            .filter(|l| l.contains(&tag))
            .find_map(|l| rfc3339_unix_us(l.split_whitespace().next()?))
    }

    /// Checks the console since the last check: the lines repeated since `before` (the
    /// repeated lines then) are at most `allowed`, in one run of consecutive counts; returns
    /// all repeated lines now.
    pub fn check_console(&self, scenario: &str, before: &[u64], allowed: usize) -> Vec<u64> {
        let now = self.repeated_counts();
        let new: Vec<u64> = now
            .iter()
            .filter(|n| !before.contains(n))
            .copied()
            .collect();
        assert!(
            new.len() <= allowed,
            "{scenario}: {} lines repeated (at most {allowed} allowed): {new:?}\n{}",
            new.len(),
            self.report()
        );
        assert!(
            new.windows(2).all(|w| w[1] == w[0] + 1),
            "{scenario}: the repeated lines are not one run: {new:?}"
        );
        now
    }

    /// Samples both nodes' roles until stopped, and reports any moment both said `active`.
    pub fn watch_roles(&self) -> RoleWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let both = Arc::new(Mutex::new(Vec::new()));
        let sockets = [self.socket(1), self.socket(2)];
        let binary = self.binary.clone();
        let thread = {
            let (stop, both) = (stop.clone(), both.clone());
            std::thread::spawn(move || {
                let mut samples = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let roles: Vec<String> = sockets.iter().map(|s| role_of(&binary, s)).collect();
                    if roles.iter().all(|r| r.starts_with("role=active")) {
                        both.lock()
                            .unwrap()
                            .push(format!("{} ms: {roles:?}", unix_ms()));
                    }
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                samples
            })
        };
        RoleWatch { stop, both, thread }
    }
}

/// `understudy ctl SOCKET role counter`: the role line, or what went wrong.
fn role_of(binary: &Path, socket: &Path) -> String {
    let Ok(out) = Command::new(binary)
        .arg("ctl")
        .arg(socket)
        .args(["role", "counter"])
        .env_remove("RUST_LOG")
        .output()
    else {
        return "ctl did not run".into();
    };
    super::answer(&out)
}

/// The value of `name=` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split_whitespace().next()
}

/// `2026-12-07T01:34:57.212878Z` in Unix microseconds.
pub fn rfc3339_unix_us(stamp: &str) -> Option<u64> {
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (hms.next()??, hms.next()??, hms.next()??);
    let micros: i64 = format!("{frac:0<6}")[..6].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1_000_000 + micros).ok()
}

/// A thread sampling both nodes' roles.
pub struct RoleWatch {
    stop: Arc<AtomicBool>,
    both: Arc<Mutex<Vec<String>>>,
    thread: JoinHandle<u64>,
}

impl RoleWatch {
    /// Stops it; the moments both nodes said they were active, and how many samples it took.
    pub fn finish(self) -> (Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.thread.join().unwrap();
        let both = self.both.lock().unwrap().clone();
        (both, samples)
    }
}

/// Which guest node is active now (waiting until one is), and the other.
pub fn active_and_standby(c: &GuestCluster) -> (usize, usize) {
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    loop {
        for k in GUEST_NODES {
            if c.role(k).starts_with("role=active") {
                return (k, 3 - k);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no node runs the guest\n{}",
            c.report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first successful power-off of `node` the switch did at or after `since_ms`.
pub fn fenced_off_at(c: &GuestCluster, node: &str, since_ms: u64) -> Option<u64> {
    let log = c.cluster.power_log();
    log.iter()
        .filter(|p| p.node == node && p.at_ms >= since_ms)
        .find(|p| p.action == "off" && (p.answer.is_empty() || p.answer == "ok"))
        .map(|p| p.at_ms)
}
