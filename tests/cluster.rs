//! The remote standby under a real Pacemaker: a three-node Pacemaker/Corosync cluster on this
//! machine (`tests/common/cluster.rs`, `scripts/cluster/`), each node in its own namespaces,
//! with real fencing through a power switch outside the nodes. Nodes `pcmk1` and `pcmk2` run
//! the guest's promotable clone (the OCF agent `ocf/understudy`, configured with crmsh as
//! docs/cluster.md says); `pcmk3` only votes. One cluster serves every scenario, in turn:
//! Pacemaker starts the guest, moves it, survives the power loss of the node running it, a
//! cut link, and a fencing that fails. The guest is the counting test kernel; its console,
//! read across the nodes, says whether anything was lost or repeated, and the events'
//! timestamps against the power switch's log say that no two nodes ever ran it at once.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::cluster::{unix_ms, Cluster, CLUSTER_PATIENCE};
use common::{numbers_after, require_kvm};

/// The nodes that may run the guest; the third only votes.
const GUEST_NODES: [usize; 2] = [1, 2];

/// The most lines one epoch (20 ms) of the counter (a line every 20 ms) can hold, however
/// late the epoch runs on a loaded machine: the bound of the exactly-once window.
const ONE_EPOCH_OF_LINES: usize = 10;

/// The cluster with the guest configured on it.
struct GuestCluster {
    cluster: Cluster,
    binary: PathBuf,
}

impl GuestCluster {
    fn new() -> GuestCluster {
        require_kvm();
        let cluster = Cluster::new("guest", 3, &[("dc-deadtime", "2s")]);
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_understudy"));
        cluster.configure_guest(&binary, "interval_ms=20 stop_after=100000000");
        GuestCluster { cluster, binary }
    }

    /// Node `k`'s answer to `role`, or what went wrong.
    fn role(&self, k: usize) -> String {
        role_of(&self.binary, &self.socket(k))
    }

    fn socket(&self, k: usize) -> PathBuf {
        self.cluster.node_dir(k).join("understudy/counter.sock")
    }

    /// Node `k`'s understudy log: the guest's console and understudy's log, across the
    /// node's boots.
    fn log(&self, k: usize) -> String {
        std::fs::read_to_string(self.cluster.node_dir(k).join("understudy/counter.log"))
            .unwrap_or_default()
    }

    /// Both nodes' logs and the cluster's, for a failure.
    fn report(&self) -> String {
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
    fn wait_role(&self, k: usize, what: &str, done: impl Fn(&str) -> bool) {
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

    fn wait_active(&self, k: usize) {
        self.wait_role(k, "active", |r| r.starts_with("role=active"));
    }

    fn wait_following(&self, k: usize) {
        self.wait_role(k, "a standby following the active", |r| {
            r.contains("state=following")
        });
    }

    /// Waits until the guest has printed `more` lines past `count` on node `k`.
    fn wait_counts_past(&self, k: usize, count: u64, more: u64) {
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
    fn last_count(&self) -> u64 {
        GUEST_NODES
            .iter()
            .filter_map(|&k| numbers_after(&self.log(k), "count ").into_iter().max())
            .max()
            .unwrap_or(0)
    }

    /// Every count the nodes printed, checked: none of `0..=max` missing, none three times.
    /// Returns the counts printed twice.
    fn repeated_counts(&self) -> Vec<u64> {
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
    fn last_takeover_us(&self, k: usize) -> Option<u64> {
        self.log(k)
            .lines()
            .rev()
            .filter(|l| l.contains("event=\"taken-over\""))
            .find_map(|l| field(l, "resumed_unix_us")?.parse().ok())
    }

    /// The Unix microseconds of node `k`'s last log line with `event`.
    fn last_event_us(&self, k: usize, event: &str) -> Option<u64> {
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
    fn check_console(&self, scenario: &str, before: &[u64], allowed: usize) -> Vec<u64> {
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
    fn watch_roles(&self) -> RoleWatch {
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
fn role_of(binary: &PathBuf, socket: &PathBuf) -> String {
    let Ok(out) = Command::new(binary)
        .arg("ctl")
        .arg(socket)
        .args(["role", "counter"])
        .env_remove("RUST_LOG")
        .output()
    else {
        return "ctl did not run".into();
    };
    String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .trim()
    .to_owned()
}

/// The value of `name=` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split_whitespace().next()
}

/// `2026-12-07T01:34:57.212878Z` in Unix microseconds.
fn rfc3339_unix_us(stamp: &str) -> Option<u64> {
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
struct RoleWatch {
    stop: Arc<AtomicBool>,
    both: Arc<Mutex<Vec<String>>>,
    thread: JoinHandle<u64>,
}

impl RoleWatch {
    /// Stops it; the moments both nodes said they were active, and how many samples it took.
    fn finish(self) -> (Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.thread.join().unwrap();
        let both = self.both.lock().unwrap().clone();
        (both, samples)
    }
}

/// Which guest node is active now (waiting until one is), and the other.
fn active_and_standby(c: &GuestCluster) -> (usize, usize) {
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
fn fenced_off_at(c: &GuestCluster, node: &str, since_ms: u64) -> Option<u64> {
    let log = c.cluster.power_log();
    log.iter()
        .filter(|p| p.node == node && p.at_ms >= since_ms)
        .find(|p| p.action == "off" && (p.answer.is_empty() || p.answer == "ok"))
        .map(|p| p.at_ms)
}

#[test]
fn a_pacemaker_cluster_runs_the_guest_once_through_moves_power_loss_cut_links_and_failed_fencing() {
    let c = GuestCluster::new();
    let watch = c.watch_roles();

    // 1. Pacemaker starts the guest: promoted on one node (booted there: nothing to resume
    //    from), the other node's instance follows it.
    let (a, b) = active_and_standby(&c);
    c.wait_following(b);
    assert!(
        c.log(a).contains("event=\"promoted-booting\""),
        "the first promote boots the guest\n{}",
        c.report()
    );
    c.cluster.wait(
        "the clone promoted on one node, unpromoted on the other",
        3,
        |s| {
            s.contains(&format!("Promoted: [ pcmk{a} ]"))
                && s.contains(&format!("Unpromoted: [ pcmk{b} ]"))
        },
    );
    c.wait_counts_past(a, 0, 50);
    let repeated = c.check_console("start", &[], 0);

    // 4. A planned move: Pacemaker demotes the active (a switchover: its last epoch to the
    //    standby, its machine fenced) and promotes the other; nothing lost, nothing repeated.
    c.cluster.must(
        3,
        &[
            "crm_resource",
            "--move",
            "--promoted",
            "--resource",
            "guest-clone",
            "--node",
            &format!("pcmk{b}"),
        ],
    );
    c.wait_active(b);
    c.wait_following(a);
    c.cluster
        .must(3, &["crm_resource", "--clear", "--resource", "guest-clone"]);
    let handed = c
        .last_event_us(a, "handed-over")
        .expect("a handed-over event");
    let resumed = c.last_takeover_us(b).expect("a taken-over event");
    assert!(
        resumed > handed,
        "the move resumed the guest on pcmk{b} ({resumed} us) before pcmk{a} handed it over ({handed} us)"
    );
    c.wait_counts_past(b, c.last_count(), 50);
    let repeated = c.check_console("planned move", &repeated, 0);
    let (a, b) = (b, a);

    // 2. The node running the guest loses power: the cluster fences it (the switch's reboot),
    //    promotes the other, the guest resumes there with at most one epoch's lines
    //    repeated and none lost, and the node, back, follows it as the new standby.
    let off = c.cluster.power_off(a);
    c.wait_active(b);
    let resumed = c.last_takeover_us(b).expect("a taken-over event") / 1000;
    let fenced = fenced_off_at(&c, &format!("pcmk{a}"), off);
    assert!(
        fenced.is_some_and(|f| f <= resumed),
        "pcmk{b} resumed the guest at {resumed} ms, pcmk{a} lost power at {off} ms and was \
         fenced at {fenced:?}\n{}",
        c.report()
    );
    c.wait_following(a);
    c.wait_counts_past(b, c.last_count(), 50);
    let repeated = c.check_console("power loss", &repeated, ONE_EPOCH_OF_LINES);
    let (a, b) = (b, a);

    // 3. The link of the node running the guest is cut: that node loses quorum, the two
    //    others fence it and promote the standby, which resumes from its last acknowledged
    //    epoch: what the cut-off active printed since is printed again (the documented
    //    window), nothing is lost, and the two never run the guest at once.
    let cut = unix_ms();
    c.cluster.set_link(a, false);
    c.wait_active(b);
    let resumed = c.last_takeover_us(b).expect("a taken-over event") / 1000;
    let fenced = fenced_off_at(&c, &format!("pcmk{a}"), cut);
    assert!(
        fenced.is_some_and(|f| f <= resumed),
        "pcmk{b} resumed the guest at {resumed} ms; pcmk{a}, cut off at {cut} ms, was fenced \
         at {fenced:?}\n{}",
        c.report()
    );
    // The fenced node boots again with its link still cut: alone, without quorum, it runs
    // nothing; reconnected, it rejoins and follows.
    c.cluster.set_link(a, true);
    c.wait_following(a);
    c.wait_counts_past(b, c.last_count(), 50);
    let repeated = c.check_console("cut link", &repeated, usize::MAX);
    let (a, b) = (b, a);

    // 5. Fencing that fails: the node running the guest loses power and the switch refuses
    //    every request. Pacemaker retries and gives up; nothing is promoted meanwhile. Once
    //    the switch works again, the administrator's fencing (stonith_admin --reboot) lets
    //    the cluster promote the standby.
    c.cluster.refuse_fencing(true);
    let off = c.cluster.power_off(a);
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    let node = format!("pcmk{a}");
    loop {
        let refused = c
            .cluster
            .power_log()
            .iter()
            .filter(|p| p.node == node && p.at_ms >= off && p.answer.starts_with("refused"))
            .count();
        let gave_up = c.cluster.logs_contain("Too many failures");
        if refused >= 2 && gave_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Pacemaker did not retry and give up fencing {node}: {refused} refused\n{}",
            c.report()
        );
        let role = c.role(b);
        assert!(
            role.starts_with("role=standby"),
            "pcmk{b} is {role:?} while {node} is not fenced\n{}",
            c.report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let role = c.role(b);
    assert!(
        role.starts_with("role=standby") && role.contains("state=holding"),
        "pcmk{b}, unfenced peer, holds the guest: {role}\n{}",
        c.report()
    );
    c.cluster.refuse_fencing(false);
    let fixed = unix_ms();
    c.cluster.must(b, &["stonith_admin", "--reboot", &node]);
    c.wait_active(b);
    let resumed = c.last_takeover_us(b).expect("a taken-over event") / 1000;
    let fenced = fenced_off_at(&c, &node, fixed);
    assert!(
        fenced.is_some_and(|f| f <= resumed),
        "pcmk{b} resumed the guest at {resumed} ms, before {node} was fenced ({fenced:?})"
    );
    c.wait_following(a);
    c.wait_counts_past(b, c.last_count(), 50);
    c.check_console("failed fencing", &repeated, ONE_EPOCH_OF_LINES);

    let (both, samples) = watch.finish();
    assert!(samples > 10, "the role watch sampled {samples} times");
    assert!(
        both.is_empty(),
        "both nodes said they were active at once: {both:?}"
    );
}

#[test]
fn log_timestamps_read_as_unix_microseconds() {
    // A taken-over line of understudy's log, with its own resumed_unix_us.
    assert_eq!(
        rfc3339_unix_us("2026-12-07T01:34:57.220222Z"),
        Some(1_796_607_297_220_222)
    );
    assert_eq!(rfc3339_unix_us("1970-01-01T00:00:01Z"), Some(1_000_000));
    assert_eq!(rfc3339_unix_us("not a time"), None);
}
