//! The control socket as an operator drives it: a running pair is watched, switched over,
//! faulted, paused, snapshotted, measured and shut down through the socket alone, and
//! garbage from many clients at once leaves the guests running.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::running::Running;
use common::{assert_consecutive, config, env_file, numbers_after, PATIENCE};
use serde_json::{json, Value};

/// An environment with one `counter` guest in a hot-standby pair resuming from `resume`.
fn pair_env(test: &str, resume: &str, heartbeat_timeout_ms: u64) -> PathBuf {
    let interval = if resume == "checkpoint" {
        "checkpoint_interval_ms = 20\n"
    } else {
        ""
    };
    env_file(
        test,
        &format!(
            r#"
[[guest]]
name = "counter"
kernel = "KERNELS/counter"
memory_mib = 64
cmdline = "interval_ms=20"
crash_dump = false

[guest.standby]
heartbeat_timeout_ms = {heartbeat_timeout_ms}
resume = "{resume}"
max_failovers = 10
{interval}"#
        ),
    )
}

fn machines(status: &Value) -> Vec<(u64, String, String)> {
    status["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["role"].as_str().unwrap().to_owned(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn status_reflects_each_phase_of_a_failover_driven_over_the_socket() {
    let env = pair_env("api-status", "failed-state", 1000);
    let mut run = Running::start(&env, &[]);
    let mode = std::fs::metadata(&run.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is for its owner only");

    run.wait_for_more_counts(5);
    let before = run.status("counter");
    assert_eq!(before["state"], "running", "{before}");
    assert_eq!(before["resume"], "failed-state", "{before}");
    assert_eq!(before["armed"], true, "{before}");
    assert_eq!(before["failovers"], 0, "{before}");
    assert!(before.get("last_failure").is_none(), "{before}");
    assert_eq!(
        machines(&before),
        [
            (1, "active".into(), "running".into()),
            (2, "standby".into(), "ready".into())
        ]
    );
    assert!(
        before["heartbeat"]["count"].as_u64().unwrap() > 0,
        "{before}"
    );

    let reply = run.ok(json!({"request": "fault", "guest": "counter", "kind": "kill"}));
    assert_eq!(reply["injected"], "kill");
    run.wait_until("failover and re-arm", |r| {
        let s = r.status("counter");
        s["failovers"] == 1 && s["armed"] == true
    });
    let after = run.status("counter");
    let failure = &after["last_failure"];
    assert_eq!(failure["reason"], "vcpu-thread-died", "{after}");
    assert_eq!(failure["outcome"], "failed-over", "{after}");
    assert!(failure["downtime_us"].as_u64().unwrap() > 0, "{after}");
    let phases: Vec<&str> = failure["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["fence", "capture", "resume", "recover"], "{after}");
    assert_eq!(
        machines(&after),
        [
            (2, "active".into(), "running".into()),
            (3, "standby".into(), "ready".into())
        ],
        "the standby took over and a new standby was built"
    );

    let counts = run.wait_for_more_counts(5);
    assert_consecutive(&counts, "counter across the failover");

    run.ok(json!({"request": "shutdown"}));
    let status = run.wait_for_exit();
    assert_eq!(status.code(), Some(0), "log:\n{}", run.log.text());
    assert!(!run.socket.exists(), "the socket is removed on exit");
}

/// Reads a guest's console file, empty until it exists.
fn console_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn planned_switchovers_keep_both_kinds_of_pair_counting_without_a_gap() {
    let env = env_file(
        "api-switchover",
        r#"
[[guest]]
name = "shared"
kernel = "KERNELS/counter"
memory_mib = 64
cmdline = "interval_ms=10"
serial = "file:shared.log"
crash_dump = false
[guest.standby]
resume = "failed-state"

[[guest]]
name = "checkpointed"
kernel = "KERNELS/counter"
memory_mib = 64
cmdline = "interval_ms=10"
serial = "file:checkpointed.log"
crash_dump = false
[guest.standby]
resume = "checkpoint"
checkpoint_interval_ms = 20
"#,
    );
    let mut run = Running::start(&env, &[]);
    let logs = ["shared", "checkpointed"].map(|g| (g, env.with_file_name(format!("{g}.log"))));
    for round in 1..=5u64 {
        for (guest, log) in &logs {
            let seen = numbers_after(&console_file(log), "count ").len();
            run.wait_until("the guest to count on", |_| {
                numbers_after(&console_file(log), "count ").len() >= seen + 3
            });
            let done = run.ok(json!({"request": "switchover", "guest": guest}));
            let status = run.status(guest);
            assert_eq!(status["switchovers"], round, "{status}");
            assert_eq!(status["armed"], true, "{status}");
            assert_eq!(
                machines(&status)[0],
                (
                    done["active"].as_u64().unwrap(),
                    "active".into(),
                    "running".into()
                ),
                "{status}"
            );
            assert_eq!(machines(&status)[1].0, done["standby"].as_u64().unwrap());
        }
    }
    // The former active, now the standby, still takes over on a failure.
    run.ok(json!({"request": "fault", "guest": "checkpointed", "kind": "mce"}));
    run.wait_until("the failover", |r| {
        r.status("checkpointed")["failovers"] == 1
    });
    for (guest, log) in &logs {
        let seen = numbers_after(&console_file(log), "count ").len();
        run.wait_until("the guest to count on", |_| {
            numbers_after(&console_file(log), "count ").len() >= seen + 5
        });
        let text = console_file(log);
        let counts = numbers_after(&text, "count ");
        assert_eq!(counts.first(), Some(&0), "{guest}");
        assert_consecutive(&counts, guest);
        assert_eq!(
            text.matches("counter: interval_ms").count(),
            1,
            "{guest} rebooted:\n{text}"
        );
        assert_eq!(
            run.status(guest)["failovers"],
            (*guest == "checkpointed") as u64
        );
    }
    run.ok(json!({"request": "shutdown"}));
    assert_eq!(run.wait_for_exit().code(), Some(0));
}

/// Checks every line is Prometheus text exposition syntax; returns the samples by their
/// name-and-labels key.
fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "bad type in {line:?}"
            );
            assert!(typed.insert(name.to_owned()), "{name} typed twice");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = key.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "{line:?} before its TYPE");
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels in {line:?}"
                );
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').unwrap();
                    assert!(
                        !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                        "{line:?}"
                    );
                }
            }
        }
        assert!(
            samples.insert(key.to_owned(), value).is_none(),
            "{key} twice"
        );
    }
    samples
}

#[test]
fn metrics_and_the_events_file_count_and_tell_what_happened() {
    // The fault is a machine check, seen at once; the heartbeat timeout is long so that a
    // host stalled for a second cannot add a failure the counts below do not expect.
    let env = pair_env("api-metrics", "checkpoint", 5000);
    let events = env.with_file_name("events.jsonl");
    let _ = std::fs::remove_file(&events);
    let mut run = Running::start(&env, &["--events", events.to_str().unwrap()]);
    run.wait_for_more_counts(5);
    run.ok(json!({"request": "fault", "guest": "counter", "kind": "mce"}));
    run.wait_until("failover and re-arm", |r| {
        let s = r.status("counter");
        s["failovers"] == 1 && s["armed"] == true
    });
    run.ok(json!({"request": "switchover", "guest": "counter"}));
    run.wait_for_more_counts(3);

    let text = run.ok(json!({"request": "metrics"}))["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let samples = parse_prometheus(&text);
    let sample = |key: &str| {
        *samples
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
    };
    let guest = r#"{guest="counter"}"#;
    assert_eq!(
        sample(r#"understudy_failovers_total{guest="counter",reason="machine-check"}"#),
        1.0
    );
    assert_eq!(sample(&format!("understudy_failures_total{guest}")), 1.0);
    assert_eq!(sample(&format!("understudy_switchovers_total{guest}")), 1.0);
    assert_eq!(sample(&format!("understudy_guest_up{guest}")), 1.0);
    assert_eq!(sample(&format!("understudy_guest_armed{guest}")), 1.0);
    assert!(sample(&format!("understudy_last_failover_downtime_seconds{guest}")) > 0.0);
    assert!(sample(&format!("understudy_heartbeat_age_seconds{guest}")) >= 0.0);
    let epochs = sample(&format!("understudy_checkpoint_epochs_total{guest}"));
    assert!(epochs > 0.0, "{text}");
    assert_eq!(
        sample(&format!("understudy_checkpoint_pause_seconds_count{guest}")),
        epochs
    );
    assert_eq!(
        sample(r#"understudy_checkpoint_pause_seconds_bucket{guest="counter",le="+Inf"}"#),
        epochs
    );
    assert_eq!(
        sample(&format!("understudy_checkpoint_dirty_pages_count{guest}")),
        epochs
    );
    assert!(text.contains("understudy_unknown_accesses_total{guest=\"counter\",space=\"port\""));

    run.ok(json!({"request": "shutdown"}));
    assert_eq!(run.wait_for_exit().code(), Some(0));

    let lines: Vec<Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(lines
        .iter()
        .all(|e| e["guest"] == "counter" && e["timestamp"].is_string()));
    let story: Vec<String> = lines
        .iter()
        .map(|e| match e["phase"].as_str() {
            Some(phase) if e["event"] == "failover-phase" => format!("phase:{phase}"),
            _ => e["event"].as_str().unwrap().to_owned(),
        })
        .collect();
    let expected = [
        "guest-started",
        "armed",
        "fault-injected",
        "failure-detected",
        "phase:fence",
        "phase:resume",
        "failed-over",
        "phase:recover",
        "armed",
        "switched-over",
        "guest-stopped",
    ];
    let mut rest = story.iter();
    for step in expected {
        assert!(
            rest.any(|s| s == step),
            "the events file lacks {step} in order; it tells: {story:?}"
        );
    }
    let rearm = lines
        .iter()
        .filter(|e| e["event"] == "armed")
        .map(|e| e["rearmed"].as_bool().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(rearm, [false, true], "{story:?}");
    let failed_over = lines.iter().find(|e| e["event"] == "failed-over").unwrap();
    assert!(failed_over["downtime_us"].as_u64().unwrap() > 0);
}

/// What one misbehaving client sends, and the error kind it must get back (None: the
/// connection is dropped without a reply, or the reply is irrelevant).
fn misbehave(socket: &Path, round: usize) -> Vec<(String, Option<String>)> {
    let mut seen = Vec::new();
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ask = |line: &[u8]| {
        stream.write_all(line).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        let reply: Value = serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("reply {reply:?} to {line:?} is not JSON: {e}"));
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        reply["error"].as_str().unwrap().to_owned()
    };
    for (line, kind) in [
        (&b"status\n"[..], "not-json"),
        (b"\xff\xfe\x00garbage\n", "not-json"),
        (b"[\"status\"]\n", "not-json"),
        (b"{\"request\":\"reboot\"}\n", "bad-request"),
        (b"{\"request\":\"pause\"}\n", "bad-request"),
        (
            b"{\"request\":\"fault\",\"guest\":\"counter\",\"kind\":7}\n",
            "bad-request",
        ),
        (
            b"{\"request\":\"pause\",\"guest\":\"nobody\"}\n",
            "unknown-guest",
        ),
        (
            b"{\"request\":\"resume\",\"guest\":\"counter\"}\n",
            "not-possible",
        ),
    ] {
        let got = ask(line);
        seen.push((
            String::from_utf8_lossy(line).into_owned(),
            Some(got.clone()),
        ));
        assert_eq!(got, kind, "reply to {:?}", String::from_utf8_lossy(line));
    }
    match round % 3 {
        0 => {
            // A line far over the limit: one too-long reply, then the connection closes.
            let huge = vec![b'x'; 1 << 20];
            let _ = stream.write_all(&huge);
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
            let reply: Value = serde_json::from_str(&reply).unwrap();
            assert_eq!(reply["error"], "too-long", "{reply}");
            seen.push(("huge".into(), Some("too-long".into())));
        }
        1 => {
            // Half a request, then gone.
            stream.write_all(b"{\"request\":\"sta").unwrap();
            seen.push(("half".into(), None));
        }
        _ => {
            // A valid request whose reply nobody reads.
            stream.write_all(b"{\"request\":\"status\"}\n").unwrap();
            seen.push(("unread".into(), None));
        }
    }
    seen
}

#[test]
fn garbage_from_many_clients_at_once_leaves_the_guest_running() {
    let env = pair_env("api-garbage", "checkpoint", 1000);
    let run = Running::start(&env, &[]);
    let before = run.wait_for_more_counts(3).len();
    let clients: Vec<_> = (0..12)
        .map(|round| {
            let socket = run.socket.clone();
            std::thread::spawn(move || misbehave(&socket, round))
        })
        .collect();
    for client in clients {
        client.join().expect("a client saw a wrong reply");
    }
    // Clients that connect and say nothing hold their slots; the rest are turned away.
    let idle: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&run.socket).unwrap())
        .collect();
    let busy = idle
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut line = String::new();
            BufReader::new(*s).read_line(&mut line).is_ok() && line.contains("\"busy\"")
        })
        .count();
    assert!(busy >= 4, "only {busy} of 20 idle clients were turned away");
    drop(idle);

    let counts = run.wait_for_more_counts(10);
    assert!(counts.len() > before);
    assert_consecutive(&counts, "counter under a storm of bad requests");
    let status = run.status("counter");
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["armed"], true, "{status}");
    assert_eq!(status["failovers"], 0, "{status}");
}

#[test]
fn pause_holds_the_guest_without_a_false_failover_and_snapshot_writes_it() {
    let env = pair_env("api-pause", "failed-state", 300);
    let mut run = Running::start(&env, &[]);
    run.wait_for_more_counts(5);
    run.ok(json!({"request": "pause", "guest": "counter"}));
    let status = run.status("counter");
    assert_eq!(status["state"], "paused", "{status}");
    let held = numbers_after(&run.console.text(), "count ").len();
    // Longer than the heartbeat timeout: a paused guest must not be failed over.
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(numbers_after(&run.console.text(), "count ").len(), held);

    let dir = env.with_file_name("snap");
    let _ = std::fs::remove_dir_all(&dir);
    let done = run.ok(json!({"request": "snapshot", "guest": "counter", "path": dir}));
    assert!(done["memory_bytes_written"].as_u64().unwrap() > 0, "{done}");
    let snapshot = vmm_core::Snapshot::load(&dir).unwrap();
    assert_eq!(snapshot.state().vcpus.len(), 1);
    assert_eq!(snapshot.machine().spec.memory_mib, 64);
    assert_eq!(
        std::fs::metadata(dir.join("memory.raw")).unwrap().len(),
        64 << 20
    );
    // A second snapshot into the same place is refused, leaving the first alone.
    let again = run.request(json!({"request": "snapshot", "guest": "counter", "path": dir}));
    assert_eq!(again["error"], "failed", "{again}");

    run.ok(json!({"request": "resume", "guest": "counter"}));
    let counts = run.wait_for_more_counts(10);
    assert_consecutive(&counts, "counter across the pause");
    let status = run.status("counter");
    assert_eq!(status["failovers"], 0, "{status}");
    assert_eq!(status["state"], "running", "{status}");
    run.wait_until("the log to show the pause", |r| {
        r.log.text().contains("event=\"resumed\"")
    });
}

#[test]
fn a_socket_in_use_is_refused_and_a_stale_one_replaced() {
    let env = pair_env("api-in-use", "failed-state", 1000);
    let run = Running::start(&env, &[]);
    let second = common::understudy(&[
        "run",
        env.to_str().unwrap(),
        "--api-socket",
        run.socket.to_str().unwrap(),
    ]);
    assert_eq!(second.status.code(), Some(2));
    assert!(
        common::stderr(&second).contains("already serving it"),
        "{}",
        common::stderr(&second)
    );
    assert!(run.socket.exists(), "the live instance keeps its socket");
    drop(run);

    // Left behind by a killed instance: nothing answers, so it is replaced.
    assert!(env.with_file_name("api.sock").exists());
    let run = Running::start(&env, &[]);
    run.ok(json!({"request": "status"}));
    drop(run);

    // Not a socket: left alone.
    let file = env.with_file_name("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let out = common::understudy(&[
        "run",
        env.to_str().unwrap(),
        "--api-socket",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(common::stderr(&out).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn ctl_prints_tables_json_and_errors_with_distinct_statuses() {
    let env = pair_env("api-ctl", "checkpoint", 1000);
    let run = Running::start(&env, &[]);
    let socket = run.socket.to_str().unwrap();

    let out = common::understudy(&["status", socket]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    let table = common::stdout(&out);
    let header = table.lines().next().unwrap();
    for column in ["GUEST", "STATE", "ARMED", "ACTIVE", "STANDBY", "FAILOVERS"] {
        assert!(header.contains(column), "{table}");
    }
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.starts_with("counter") && row.contains("running"),
        "{table}"
    );
    assert!(table.contains("CHECKPOINTS"), "{table}");

    // --json before the socket, and after the request as other tools take it.
    for args in [
        ["ctl", "--json", socket, "status"],
        ["ctl", socket, "status", "--json"],
    ] {
        let out = common::understudy(&args);
        let reply: Value = serde_json::from_str(&common::stdout(&out))
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", common::stderr(&out)));
        assert_eq!(reply["result"]["guests"][0]["name"], "counter");
    }

    let out = common::understudy(&["ctl", socket, "switchover", "counter"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    assert!(common::stdout(&out).contains("is now active"));

    let out = common::understudy(&["ctl", socket, "metrics"]);
    assert!(common::stdout(&out).contains("# TYPE understudy_failovers_total counter"));

    let out = common::understudy(&["ctl", socket, "pause", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        common::stderr(&out).contains("unknown-guest"),
        "{}",
        common::stderr(&out)
    );

    let out = common::understudy(&["ctl", socket, "fault", "counter", "melt"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad argument is a usage error"
    );

    let missing = env.with_file_name("missing.sock");
    let out = common::understudy(&["status", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(common::stderr(&out).contains("cannot connect"));

    let out = common::understudy(&["ctl", socket, "shutdown"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn service_config_runs_until_shut_down_over_its_socket() {
    // The example's own socket path is overridden, so a user's instance is not disturbed.
    let socket =
        std::env::temp_dir().join(format!("understudy-service-{}.sock", std::process::id()));
    let mut run = Running::start_at(Path::new(&config("service.toml")), &socket, &[]);
    run.wait_for_more_counts(2);
    run.ok(json!({"request": "switchover", "guest": "counter"}));
    let counts = run.wait_for_more_counts(1);
    assert_eq!(counts.first(), Some(&0));
    assert_consecutive(&counts, "service counter");
    run.ok(json!({"request": "shutdown"}));
    assert_eq!(run.wait_for_exit().code(), Some(0), "{}", run.log.text());
    assert!(!socket.exists());
}

#[test]
fn sigterm_stops_the_guests_cleanly_and_releases_held_output() {
    let env = env_file(
        "api-sigterm",
        r#"
[[guest]]
name = "counter"
kernel = "KERNELS/counter"
memory_mib = 64
cmdline = "interval_ms=10"
crash_dump = false
[guest.standby]
resume = "checkpoint"
# Long epochs: the console output of the running epoch is held for seconds.
checkpoint_interval_ms = 60000
"#,
    );
    let mut run = Running::start(&env, &[]);
    run.wait_until("the guest to run a while", |r| {
        r.status("counter")["heartbeat"]["count"].as_u64().unwrap() >= 20
    });
    let visible = numbers_after(&run.console.text(), "count ").len();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGTERM) };
    let status = run.wait_for_exit();
    assert_eq!(status.code(), Some(0), "{}", run.log.text());
    let counts = numbers_after(&run.console.text(), "count ");
    // A line goes with each heartbeat: 20 or more were printed, nearly all of them held.
    assert!(
        counts.len() >= 20 && counts.len() >= visible + 10,
        "the held output was not released: {visible} lines before, {} after",
        counts.len()
    );
    assert_eq!(counts.first(), Some(&0));
    assert_consecutive(&counts, "counter stopped by SIGTERM");
    assert!(
        run.log.text().contains("signal=\"SIGTERM\""),
        "{}",
        run.log.text()
    );
    assert!(!run.socket.exists(), "the socket is removed on SIGTERM too");
}

/// One HTTP/1.1 exchange; returns the status line and the body.
fn http(addr: &str, request: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[test]
fn metrics_endpoint_serves_prometheus_text_over_http() {
    let env = pair_env("api-http", "checkpoint", 1000);
    let mut run = Running::start(&env, &["--metrics-addr", "127.0.0.1:0"]);
    run.wait_until("the metrics endpoint's address in the log", |r| {
        r.log.text().contains("metrics served at http://")
    });
    let log = run.log.text();
    let addr = log
        .split("metrics served at http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    run.wait_for_more_counts(3);

    let (status, body) = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let samples = parse_prometheus(&body);
    assert_eq!(samples[r#"understudy_guest_up{guest="counter"}"#], 1.0);
    assert!(samples[r#"understudy_checkpoint_epochs_total{guest="counter"}"#] > 0.0);

    let (status, _) = http(&addr, "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(&addr, "POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    // Garbage without an end of head, then gone: the endpoint serves on.
    let mut garbage = std::net::TcpStream::connect(&addr).unwrap();
    garbage.write_all(&[0xffu8; 20000]).unwrap_or_default();
    drop(garbage);
    let (status, _) = http(&addr, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");

    let counts = run.wait_for_more_counts(3);
    assert_consecutive(&counts, "counter while scraped");
}
