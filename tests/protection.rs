//! Protection at the sizes users run: a 1 GiB checkpointed guest with every default, hundreds
//! of faults in a row, many pairs in one process, a vCPU thread that never answers, and crash
//! dumps written after the guest resumed that still show the moment of the failure.

mod common;

use std::path::Path;
use std::process::Command;

use common::running::Running;
use common::{assert_consecutive, env_file, numbers_after, require_kvm, stderr, stdout, XorShift};
use serde_json::json;

fn run(env: &Path, faults: &[&str]) -> (String, String, Option<i32>) {
    require_kvm();
    let mut args = vec!["run", env.to_str().unwrap()];
    for fault in faults {
        args.extend(["--fault", fault]);
    }
    let out = common::understudy(&args);
    (stdout(&out), stderr(&out), out.status.code())
}

/// The console counted `count N` from 0 to `last`, each line once, and the guest never
/// rebooted.
fn assert_counted_exactly_once(text: &str, last: u64, what: &str) {
    let counts = numbers_after(text, "count ");
    assert_eq!(counts.first(), Some(&0), "{what}:\n{text}");
    assert_eq!(counts.last(), Some(&last), "{what}:\n{text}");
    assert_consecutive(&counts, what);
    assert_eq!(
        text.matches("counter: interval_ms").count(),
        1,
        "{what} rebooted"
    );
}

/// Lines of the log with lifecycle event `event` (for guest `guest`, if given).
fn events<'a>(log: &'a str, event: &str, guest: Option<&str>) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(&format!("event=\"{event}\"")))
        .filter(|l| guest.is_none_or(|g| l.contains(&format!(" guest={g} "))))
        .collect()
}

#[test]
fn a_1_gib_checkpointed_pair_with_the_defaults_survives_kill_mce_and_hang() {
    let env = env_file(
        "gib-defaults",
        "[[guest]]\nname = \"big\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 1024\n\
         cmdline = \"interval_ms=100 stop_after=150\"\ndump_dir = \".\"\n\
         [guest.standby]\nresume = \"checkpoint\"\n",
    );
    // The hang leaves the heartbeat timeout (2 s by default) and then some to notice it:
    // time the VMM holds the guest in checkpoint pauses does not count as silence.
    let (text, log, code) = run(&env, &["big:kill@2000", "big:mce@4000", "big:hang@5500"]);
    assert_eq!(code, Some(1), "the guest's own exit status; log:\n{log}");
    assert_counted_exactly_once(&text, 150, "the 1 GiB guest");
    let detected = events(&log, "failure-detected", None);
    assert_eq!(
        detected.len(),
        3,
        "exactly the three injected failures:\n{log}"
    );
    for reason in ["vcpu-thread-died", "machine-check", "heartbeat-timeout"] {
        assert!(
            detected.iter().any(|l| l.contains(reason)),
            "{reason}: {detected:?}"
        );
    }
    assert_eq!(
        events(&log, "armed", None).len(),
        4,
        "armed at start and after each failover:\n{log}"
    );
    // Three dumps, each costing the disk what the guest used, not its 1 GiB.
    for n in 1..=3 {
        let core = env.with_file_name(format!("big-failure-{n}.core"));
        let on_disk = allocated(&core);
        assert!(
            on_disk < 16 << 20,
            "{}: {on_disk} bytes on disk",
            core.display()
        );
    }
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    meta.blocks() * 512
}

#[test]
fn two_hundred_faults_over_the_socket_fail_over_exactly_as_often_and_lose_no_line() {
    let seed = std::env::var("UNDERSTUDY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0011_5eed_u64);
    let env = env_file(
        "soak",
        "[[guest]]\nname = \"counter\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
         cmdline = \"interval_ms=10\"\nserial = \"file:console.log\"\ndump_dir = \".\"\n\
         [guest.standby]\nresume = \"checkpoint\"\ncheckpoint_interval_ms = 10\n\
         heartbeat_timeout_ms = 200\nmax_failovers = 1000\n",
    );
    let mut run = Running::start(&env, &[]);
    let mut random = XorShift(seed);
    let kinds = ["kill", "mce", "panic", "hang"];
    let failures = |r: &Running| {
        r.status("counter")["last_failure"]["number"]
            .as_u64()
            .unwrap_or(0)
    };
    for injected in 0..200 {
        run.wait_until("the pair to be armed", |r| {
            r.status("counter")["armed"] == true && failures(r) == injected
        });
        let kind = kinds[(random.next() % 4) as usize];
        run.ok(json!({"request": "fault", "guest": "counter", "kind": kind}));
        run.wait_until(
            &format!("fault {} ({kind}) to be detected", injected + 1),
            |r| failures(r) > injected,
        );
    }
    run.wait_until("the last re-arm", |r| r.status("counter")["armed"] == true);
    let status = run.status("counter");
    run.ok(json!({"request": "shutdown"}));
    assert_eq!(run.wait_for_exit().code(), Some(0), "{}", run.log.text());
    let log = run.log.text();
    let context = format!("seed {seed} (set UNDERSTUDY_FAULT_SEED to repeat)");
    assert_eq!(status["failovers"], 200, "{context}: {status}");
    assert_eq!(
        status["last_failure"]["number"], 200,
        "{context}: a failure nobody injected: {status}"
    );
    assert_eq!(
        events(&log, "failure-detected", None).len(),
        200,
        "{context}"
    );
    let text = std::fs::read_to_string(env.with_file_name("console.log")).unwrap();
    let counts = numbers_after(&text, "count ");
    assert_eq!(counts.first(), Some(&0), "{context}");
    assert_consecutive(&counts, &context);
    assert_eq!(
        text.matches("counter: interval_ms").count(),
        1,
        "{context}: rebooted"
    );
    // The newest four dumps are kept.
    let cores: Vec<_> = std::fs::read_dir(env.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".core"))
        .collect();
    assert_eq!(cores.len(), 4, "{context}: {cores:?}");
    assert!(
        env.with_file_name("counter-failure-200.core").exists(),
        "{context}: the newest dump is kept"
    );
    // Each of the others was removed to make room, or given up unwritten because the guest
    // failed again (on a busy host) before it was.
    let abandoned = log.matches("crash dump is abandoned").count();
    let removed = events(&log, "dump-removed", None).len();
    assert!(
        removed + abandoned >= 196,
        "{context}: {removed} removed, {abandoned} abandoned"
    );
}

#[test]
fn ten_checkpointed_pairs_in_one_process_fail_over_only_where_a_fault_hit() {
    // Ten guests that each keep a vCPU busy, on a host of two cores: time a vCPU waits for
    // a core is not silence, so a hang takes several heartbeat timeouts of wall time to
    // notice here. The run lasts until every fault has been handled, and then some.
    let mut text = String::new();
    for i in 0..10 {
        text.push_str(&format!(
            "[[guest]]\nname = \"g{i}\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
             cmdline = \"interval_ms=20\"\nserial = \"file:g{i}.log\"\n\
             crash_dump = false\n[guest.standby]\nresume = \"checkpoint\"\n\
             heartbeat_timeout_ms = 500\n"
        ));
    }
    let env = env_file("ten-pairs", &text);
    let faults = ["g0:kill", "g3:mce", "g6:hang", "g9:panic"];
    let planned: Vec<String> = faults
        .iter()
        .zip([800, 1200, 1600, 2000])
        .flat_map(|(f, at)| ["--fault".to_owned(), format!("{f}@{at}")])
        .collect();
    let planned: Vec<&str> = planned.iter().map(String::as_str).collect();
    let mut run = Running::start(&env, &planned);
    let hit = |guest: &str| faults.iter().any(|f| f.starts_with(&format!("{guest}:")));
    run.wait_until("every fault handled", |r| {
        let status = r.ok(json!({"request": "status"}));
        status["guests"].as_array().unwrap().iter().all(|g| {
            let name = g["name"].as_str().unwrap();
            g["failovers"] == u64::from(hit(name)) && (!hit(name) || g["armed"] == true)
        })
    });
    // A while longer, every guest counting: nobody else fails.
    let consoles: Vec<_> = (0..10)
        .map(|i| env.with_file_name(format!("g{i}.log")))
        .collect();
    let counted =
        |p: &Path| numbers_after(&std::fs::read_to_string(p).unwrap_or_default(), "count ").len();
    let before: Vec<usize> = consoles.iter().map(|p| counted(p)).collect();
    run.wait_until("every guest to count 50 more", |_| {
        consoles
            .iter()
            .zip(&before)
            .all(|(p, n)| counted(p) >= n + 50)
    });
    run.ok(json!({"request": "shutdown"}));
    assert_eq!(run.wait_for_exit().code(), Some(0), "{}", run.log.text());
    let log = run.log.text();
    for (i, path) in consoles.iter().enumerate() {
        let guest = format!("g{i}");
        let console = std::fs::read_to_string(path).unwrap();
        let counts = numbers_after(&console, "count ");
        assert_eq!(counts.first(), Some(&0), "{guest}");
        assert_consecutive(&counts, &guest);
        assert_eq!(
            console.matches("counter: interval_ms").count(),
            1,
            "{guest} rebooted"
        );
        let failovers = events(&log, "failed-over", Some(&guest)).len();
        assert_eq!(
            (
                events(&log, "failure-detected", Some(&guest)).len(),
                failovers
            ),
            if hit(&guest) { (1, 1) } else { (0, 0) },
            "{guest}: failures and failovers:\n{log}"
        );
    }
}

#[test]
fn a_vcpu_thread_that_never_answers_stops_neither_its_failover_nor_other_guests() {
    let env = env_file(
        "stall",
        "[[guest]]\nname = \"stuck\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
         cmdline = \"interval_ms=20 stop_after=200\"\nserial = \"file:stuck.log\"\n\
         crash_dump = false\n\
         [guest.standby]\nresume = \"checkpoint\"\nheartbeat_timeout_ms = 500\n\
         [[guest]]\nname = \"steady\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 64\n\
         cmdline = \"interval_ms=20 stop_after=200\"\nserial = \"file:steady.log\"\n\
         crash_dump = false\n\
         [guest.standby]\nresume = \"checkpoint\"\nheartbeat_timeout_ms = 500\n",
    );
    let (_, log, code) = run(&env, &["stuck:stall@800"]);
    assert_eq!(code, Some(0), "both guests end themselves; log:\n{log}");
    for guest in ["stuck", "steady"] {
        let console = std::fs::read_to_string(env.with_file_name(format!("{guest}.log"))).unwrap();
        assert_counted_exactly_once(&console, 200, guest);
    }
    let stuck = events(&log, "failed-over", Some("stuck"));
    assert_eq!(stuck.len(), 1, "{log}");
    // The next epoch's pause goes unanswered (or, failing that, the heartbeats stop).
    let detected = events(&log, "failure-detected", Some("stuck"));
    assert!(
        detected[0].contains("vcpu-unresponsive") || detected[0].contains("heartbeat-timeout"),
        "{log}"
    );
    assert!(
        events(&log, "failure-detected", Some("steady")).is_empty(),
        "{log}"
    );
}

/// The address of symbol `name` in ELF file `elf`, by `nm`.
fn symbol(elf: &Path, name: &str) -> u64 {
    let out = Command::new("nm").arg(elf).output().expect("run nm");
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            let addr = fields.next()?;
            let _kind = fields.next()?;
            (fields.next()? == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("no symbol {name} in {}", elf.display()))
}

/// A u64 at guest physical address `addr` in an ELF core (zero where the core has a hole).
fn core_u64(core: &[u8], addr: u64) -> u64 {
    let u16_at = |o: usize| u16::from_le_bytes(core[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(core[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(core[o..o + 8].try_into().unwrap());
    let (phoff, phnum) = (u64_at(32) as usize, u16_at(56) as usize);
    for i in 0..phnum {
        let ph = phoff + i * 56;
        let (kind, offset, paddr, size) =
            (u32_at(ph), u64_at(ph + 8), u64_at(ph + 24), u64_at(ph + 32));
        if kind == 1 && (paddr..paddr + size).contains(&addr) {
            return u64_at((offset + addr - paddr) as usize);
        }
    }
    panic!("{addr:#x} is in no PT_LOAD of the core");
}

/// Runs the `dirty` kernel as a pair resuming from `resume`, kills the active while it writes
/// fast, and checks its dump: the kernel writes pass numbers into its pages and counts every
/// write, so in a consistent image the page values add up to the count (give or take the
/// one write between the store and the count). A dump whose pages were read after the
/// resumed guest wrote them would add up to more.
fn dump_is_the_memory_at_the_failure(resume: &str) -> String {
    let env = env_file(
        &format!("dump-{resume}"),
        &format!(
            "[[guest]]\nname = \"dirty\"\nkernel = \"KERNELS/dirty\"\nmemory_mib = 256\n\
             cmdline = \"dirty_mib_per_s=128 interval_ms=50 stop_after=40\"\ndump_dir = \".\"\n\
             [guest.standby]\nresume = \"{resume}\"\n"
        ),
    );
    let (text, log, code) = run(&env, &["dirty:kill@900"]);
    assert_eq!(code, Some(1), "{log}");
    assert_eq!(
        numbers_after(&text, "dirty: seq "),
        (0..=40).collect::<Vec<_>>(),
        "{text}"
    );
    let failed_over = log.find("event=\"failed-over\"").expect("a failover");
    let dumped = log.find("phase=\"dump\"").expect("a dump");
    assert!(
        dumped > failed_over,
        "the dump is written after the resume:\n{log}"
    );

    let range = text
        .lines()
        .find_map(|l| l.split(" range ").nth(1))
        .expect("the range line");
    let (start, end) = range.split_once('-').unwrap();
    let parse = |h: &str| u64::from_str_radix(h.trim().trim_start_matches("0x"), 16).unwrap();
    let (start, end) = (parse(start), parse(end));
    let core = std::fs::read(env.with_file_name("dirty-failure-1.core")).unwrap();
    let counted = core_u64(&core, symbol(&common::kernel("dirty"), "dirty_pages"));
    let written: u64 = (start..end)
        .step_by(4096)
        .map(|page| core_u64(&core, page))
        .sum();
    assert!(counted > 1000, "the guest had written {counted} pages");
    assert!(
        written == counted || written == counted + 1,
        "{resume}: the dump's pages add up to {written} writes, its counter says {counted}"
    );
    log
}

#[test]
fn a_failed_state_dump_written_after_the_resume_is_the_memory_at_the_failure() {
    let log = dump_is_the_memory_at_the_failure("failed-state");
    let held: u64 = log
        .split("writes of the resumed guest held meanwhile")
        .next()
        .and_then(|before| before.rsplit("; ").next())
        .and_then(|n| n.trim().parse().ok())
        .expect("the dump line says how many writes were held");
    assert!(
        held > 0,
        "the resumed guest wrote while the dump was written:\n{log}"
    );
}

#[test]
fn a_checkpointed_dump_is_the_memory_at_the_failure_while_its_ram_is_recycled() {
    let log = dump_is_the_memory_at_the_failure("checkpoint");
    // The re-arm copied into the failed machine's RAM while the dump was being written.
    let rearmed = events(&log, "armed", None)
        .into_iter()
        .find(|l| l.contains("rearmed=true"))
        .expect("a re-arm");
    let precopied: u64 = rearmed
        .split("precopied_pages=")
        .nth(1)
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .expect("precopied_pages");
    assert!(precopied > 0, "{rearmed}");
}

#[test]
fn a_1_gib_checkpointed_standby_costs_the_memory_the_guest_touched() {
    let env = env_file(
        "gib-memory",
        "[[guest]]\nname = \"big\"\nkernel = \"KERNELS/counter\"\nmemory_mib = 1024\n\
         cmdline = \"interval_ms=20\"\nserial = \"none\"\ncrash_dump = false\n\
         [guest.standby]\nresume = \"checkpoint\"\n",
    );
    let mut run = Running::start(&env, &[]);
    let check = |r: &Running, when: &str| {
        let status = r.status("big");
        let (guest, standby) = (
            status["ram_resident_bytes"].as_u64().unwrap(),
            status["standby_copy_resident_bytes"].as_u64().unwrap(),
        );
        assert!(
            guest > 0 && guest < 8 << 20,
            "{when}: guest RAM takes {guest} bytes"
        );
        assert!(
            standby < 8 << 20,
            "{when}: the standby's copy takes {standby} bytes"
        );
    };
    run.wait_until("armed", |r| r.status("big")["armed"] == true);
    check(&run, "armed");
    run.ok(json!({"request": "fault", "guest": "big", "kind": "kill"}));
    run.wait_until("re-armed", |r| {
        let s = r.status("big");
        s["failovers"] == 1 && s["armed"] == true
    });
    check(&run, "re-armed");
    run.ok(json!({"request": "shutdown"}));
    assert_eq!(run.wait_for_exit().code(), Some(0));
}
