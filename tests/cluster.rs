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

use std::time::{Duration, Instant};

use common::cluster::{unix_ms, CLUSTER_PATIENCE};
use common::cluster_guest::{
    active_and_standby, fenced_off_at, rfc3339_unix_us, GuestCluster, ONE_EPOCH_OF_LINES,
};

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
