//! A guest with a NIC whose standby runs in a process of its own (`process = "separate"`,
//! one TAP), in a network namespace of the test's own: the `net` kernel sends numbered
//! datagrams to a peer there and answers its echoes while the process running it is
//! SIGKILLed again and again; the peer receives every datagram exactly once and in order,
//! and gets answers after every takeover. A standby whose environment names another TAP or
//! another MAC address is refused before anything is promised, and the active runs on.
//! These tests need root (namespaces and TAP devices) and iproute2's `ip`.

mod common;

use std::ffi::OsStr;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::datagrams::{sequence_numbers, StopOnDrop};
use common::netns::{Netns, GUEST_IP, PEER_IP};
use common::process::{assert_standby_refused, logs, Process};
use common::{env_file, fault_seed, numbers_after, require_kvm, XorShift, PATIENCE};

/// Where the guest sends its numbered datagrams.
const PEER_PORT: u16 = 5000;
/// Where the guest answers echoes.
const ECHO_PORT: u16 = 7;

/// An environment with one `net` guest on `tap` with address `mac`, its standby a process
/// of its own, journal and socket in the test's directory.
fn net_env(test: &str, cmdline: &str, tap: &str, mac: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("understudy-test-{}-{test}", std::process::id()));
    env_file(
        test,
        &format!(
            "[[guest]]\nname = \"net\"\nkernel = \"KERNELS/net\"\nmemory_mib = 64\n\
             cmdline = \"ip={GUEST_IP} peer={PEER_IP} port={PEER_PORT} {cmdline}\"\n\
             crash_dump = false\n\
             [guest.standby]\nresume = \"checkpoint\"\nprocess = \"separate\"\n\
             journal = \"{}\"\n\
             [[guest.net]]\ntap = \"{tap}\"\nmac = \"{mac}\"\n",
            dir.join("net.journal").display()
        ),
    )
}

/// Starts `understudy ARGS ENV` inside `netns`.
fn start_in(netns: &Netns, command: &str, env: &Path, what: &str) -> Process {
    netns.enter(|| Process::start(&[OsStr::new(command), env.as_os_str()], what))
}

/// Sends fresh echo requests from `peer` until one is answered; panics with `context` if
/// none is within the test's patience.
fn echo_answered(peer: &UdpSocket, sequence: &mut u64, context: &str) {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0u8; 2048];
    loop {
        assert!(
            Instant::now() < deadline,
            "{context}: no echo answered after {sequence} requests"
        );
        *sequence += 1;
        let request = format!("ping {sequence}");
        peer.send_to(request.as_bytes(), (GUEST_IP, ECHO_PORT))
            .unwrap();
        // An answer to an earlier request may still be on its way: read until this one.
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            if let Ok((n, from)) = peer.recv_from(&mut buf) {
                assert_eq!(from.port(), ECHO_PORT, "an answer from {from}");
                if buf[..n] == *request.as_bytes() {
                    return;
                }
            }
        }
    }
}

/// The process running `net` is SIGKILLed at a random moment `kills` times, a new standby
/// started after each takeover. The peer receives datagrams 1 to `count` exactly once and
/// in order, and an echo is answered after every takeover; the consoles of the processes,
/// in the order they ran the guest, print each `sent N` once.
fn survives_kills(test: &str, kills: usize, count: u64) {
    require_kvm();
    let netns = Netns::new(&format!("us-{test}-{}", std::process::id()));
    let peer = netns.socket(PEER_PORT);
    peer.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let echo = netns.socket(6000);
    echo.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let seed = fault_seed();
    println!("UNDERSTUDY_FAULT_SEED={seed}");
    let context = format!("seed {seed} (set UNDERSTUDY_FAULT_SEED to repeat)");
    let mut rng = XorShift(seed);
    let env = net_env(
        test,
        &format!("tick_ms=10 count={count}"),
        "tap0",
        "52:54:00:12:34:56",
    );
    let received = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let mut processes = vec![
        start_in(&netns, "run", &env, "the active"),
        start_in(&netns, "standby", &env, "standby 1"),
    ];
    let mut sequence = 0;
    let (status, standby_status) = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Acquire) {
                if let Ok(n) = peer.recv(&mut buf) {
                    received.lock().unwrap().push(buf[..n].to_vec());
                }
            }
            // What the last epochs released after the guest ended.
            while let Ok(n) = peer.recv(&mut buf) {
                received.lock().unwrap().push(buf[..n].to_vec());
            }
        });
        // The peer's reader stops however this ends (a failed wait panics).
        let _stop = StopOnDrop(&stop);
        for kill in 0..kills {
            let (active, standby) = (processes.len() - 2, processes.len() - 1);
            processes[active].wait_log("failover armed", 1);
            std::thread::sleep(Duration::from_millis(rng.next() % 400));
            processes[active].kill();
            processes[standby].wait_log("event=\"taken-over\"", 1);
            echo_answered(&echo, &mut sequence, &context);
            processes.push(start_in(
                &netns,
                "standby",
                &env,
                &format!("standby {}", kill + 2),
            ));
        }
        let (active, standby) = (processes.len() - 2, processes.len() - 1);
        let status = processes[active].wait();
        let standby_status = processes[standby].wait();
        (status, standby_status)
    });
    let all = logs(&processes);
    // `net` ends with exit status 1 after its last datagram.
    assert_eq!(status.code(), Some(1), "{context}\n{all}");
    assert_eq!(standby_status.code(), Some(1), "{context}\n{all}");
    assert_eq!(
        all.matches("event=\"taken-over\"").count(),
        kills,
        "{context}\n{all}"
    );
    let expected: Vec<u64> = (1..=count).collect();
    let console: String = processes.iter().map(|p| p.console.text()).collect();
    assert_eq!(
        numbers_after(&console, "sent "),
        expected,
        "{context}: the consoles do not print every datagram once:\n{all}"
    );
    let received = sequence_numbers(&received.into_inner().unwrap());
    if received != expected {
        let first_bad = received
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(received.len().min(expected.len()));
        panic!(
            "{context}: the peer received {} datagrams where {count} were expected; first difference at {first_bad}: {:?} for {:?}\n{all}",
            received.len(),
            received.get(first_bad),
            expected.get(first_bad)
        );
    }
    assert!(!all.contains("panicked"), "{all}");
}

#[test]
fn a_nic_guest_survives_its_process_being_killed_once() {
    survives_kills("process-net-once", 1, 300);
}

#[test]
fn a_nic_guest_survives_its_process_being_killed_again_and_again() {
    survives_kills("process-net-kills", 6, 2000);
}

/// A standby whose environment names another TAP, or gives the NIC another MAC address,
/// than its active's refuses with a message saying which, exit status 2, before it loads
/// anything; the active says why it runs on unprotected, and the guest finishes there.
#[test]
fn a_standby_given_another_tap_or_mac_is_refused_and_the_active_runs_on() {
    require_kvm();
    let netns = Netns::new(&format!("us-process-net-bad-{}", std::process::id()));
    let peer = netns.socket(PEER_PORT);
    let env = net_env(
        "process-net-refused",
        "tick_ms=10 count=300",
        "tap0",
        "52:54:00:12:34:56",
    );
    let mut active = start_in(&netns, "run", &env, "the active");
    for (n, (tap, mac, says)) in [
        (
            "tap1",
            "52:54:00:12:34:56",
            "net[0].tap is tap1 here, but the active runs the NIC on TAP tap0",
        ),
        (
            "tap0",
            "52:54:00:12:34:57",
            "net[0].mac is 52:54:00:12:34:57 here, but 52:54:00:12:34:56 on the active",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let text = std::fs::read_to_string(&env)
            .unwrap()
            .replace("tap = \"tap0\"", &format!("tap = \"{tap}\""))
            .replace("52:54:00:12:34:56", mac);
        let other = env_file(&format!("process-net-refused-{n}"), &text);
        let mut standby = start_in(&netns, "standby", &other, &format!("standby {}", n + 1));
        assert_standby_refused(&mut standby, &mut active, n + 1, says);
    }
    assert!(!active.log.text().contains("failover armed"));
    let status = active.wait();
    assert_eq!(status.code(), Some(1), "{}", active.log.text());
    assert!(
        active.console.text().contains("done"),
        "{}",
        active.console.text()
    );
    drop(peer);
}
