//! A guest under a real Pacemaker cluster (three nodes on this machine, as `tests/cluster.rs`
//! makes them): from the power loss of the node running the guest to the guest running on
//! another node, and the same cluster moving a plain `ocf:pacemaker:Stateful` promotable
//! clone the same way, in one run. Each round powers the promoted node off (SIGKILL of its
//! init), waits for the other to take over and for the lost node to come back; the parts:
//! - to the fencing: Corosync's token timeout and the new membership, then the fencing by
//!   the power switch (its log's time);
//! - to running: from the fencing to the guest running (`resumed_unix_us` of `taken-over`),
//!   or to Stateful's promote writing its state file (its modification time).
//!
//! Run (as root, with Pacemaker installed as `.ci/run` does): `cargo bench --bench cluster`
//! (optionally `-- ROUNDS`, default 5).

#[path = "../tests/common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};

use cluster::{Cluster, CLUSTER_PATIENCE};
use common::spread;

/// The nodes that may run the resource; the third only votes.
const NODES: [usize; 2] = [1, 2];

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_understudy"));
    let c = Cluster::new("bench", 3, &[("dc-deadtime", "2s")]);
    c.configure_guest(&binary, "interval_ms=20 stop_after=100000000");

    let role = |k: usize| -> String {
        let socket = c.node_dir(k).join("understudy/counter.sock");
        Command::new(&binary)
            .arg("ctl")
            .arg(&socket)
            .args(["role", "counter"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let guest_active = || {
        NODES
            .into_iter()
            .find(|&k| role(k).starts_with("role=active"))
    };
    let log = |k: usize| {
        std::fs::read_to_string(c.node_dir(k).join("understudy/counter.log")).unwrap_or_default()
    };
    let resumed_ms = |k: usize| -> Option<u64> {
        log(k)
            .lines()
            .rev()
            .filter(|l| l.contains("event=\"taken-over\""))
            .find_map(|l| common::field(l, "resumed_unix_us"))
            .map(|us| us as u64 / 1000)
    };

    let mut guest = Rounds::default();
    let (mut a, mut b) = wait_for(|| guest_active().map(|a| (a, 3 - a)), "the guest running");
    wait_for(
        || role(b).contains("state=following").then_some(()),
        "a standby",
    );
    for round in 0..rounds {
        let before = resumed_ms(b);
        let off = c.power_off(a);
        let resumed = wait_for(
            || resumed_ms(b).filter(|&r| Some(r) != before && r >= off),
            "the guest resumed on the other node",
        );
        guest.record(&c, a, off, resumed);
        wait_for(
            || role(a).contains("state=following").then_some(()),
            "the lost node back, following",
        );
        eprintln!("guest round {round}: {} ms", resumed - off);
        (a, b) = (b, a);
    }

    // The same cluster, the guest stopped, moving a plain promotable clone instead.
    c.must(3, &["crm", "resource", "stop", "guest-clone"]);
    wait_for(
        || NODES.iter().all(|&k| role(k).is_empty()).then_some(()),
        "the guest stopped",
    );
    c.load_crm(
        "plain",
        "primitive plain ocf:pacemaker:Stateful params state=/run/understudy/plain.state \\\n\
         \top monitor interval=3s role=Unpromoted timeout=20s \\\n\
         \top monitor interval=2s role=Promoted timeout=20s\n\
         clone plain-clone plain meta promotable=true promoted-max=1 promoted-node-max=1 \
         clone-max=2 clone-node-max=1\n\
         location plain-not-on-pcmk3 plain-clone -inf: pcmk3\n",
    );
    let state = |k: usize| c.node_dir(k).join("understudy/plain.state");
    let promoted =
        |k: usize| std::fs::read_to_string(state(k)).is_ok_and(|s| s.trim() == "Promoted");
    let mut plain = Rounds::default();
    let (mut a, mut b) = wait_for(
        || NODES.into_iter().find(|&k| promoted(k)).map(|a| (a, 3 - a)),
        "Stateful promoted",
    );
    for round in 0..rounds {
        wait_for(
            || {
                std::fs::read_to_string(state(b))
                    .is_ok_and(|s| s.trim() == "Unpromoted")
                    .then_some(())
            },
            "Stateful unpromoted on the other node",
        );
        let off = c.power_off(a);
        let promoted_at = wait_for(|| promoted(b).then(|| modified_ms(&state(b))), "promote");
        plain.record(&c, a, off, promoted_at);
        eprintln!("Stateful round {round}: {} ms", promoted_at - off);
        (a, b) = (b, a);
    }

    println!("node loss to running on the other node, {rounds} rounds, median (min–max), s:");
    println!("| resource | to the fencing | fencing to running | total |");
    println!("| --- | --- | --- | --- |");
    for (name, rounds) in [
        ("understudy guest", guest),
        ("ocf:pacemaker:Stateful", plain),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            spread(rounds.to_fence, 1),
            spread(rounds.fence_to_running, 2),
            spread(rounds.total, 1)
        );
    }
}

/// Each round's parts, in seconds.
#[derive(Default)]
struct Rounds {
    to_fence: Vec<f64>,
    fence_to_running: Vec<f64>,
    total: Vec<f64>,
}

impl Rounds {
    /// Records a round: node `lost` powered off at `off`, the resource running at `running`
    /// (Unix milliseconds); the fencing's time is the power switch's.
    fn record(&mut self, c: &Cluster, lost: usize, off: u64, running: u64) {
        let node = format!("pcmk{lost}");
        let fenced = c
            .power_log()
            .iter()
            .find(|p| p.node == node && p.at_ms >= off && p.action == "off")
            .map_or(running, |p| p.at_ms);
        self.to_fence.push((fenced - off) as f64 / 1000.0);
        self.fence_to_running
            .push(running.saturating_sub(fenced) as f64 / 1000.0);
        self.total.push((running - off) as f64 / 1000.0);
    }
}

/// A file's modification time, in Unix milliseconds.
fn modified_ms(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Polls `ready` until it gives a value.
fn wait_for<T>(mut ready: impl FnMut() -> Option<T>, what: &str) -> T {
    let deadline = Instant::now() + CLUSTER_PATIENCE;
    loop {
        if let Some(value) = ready() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
