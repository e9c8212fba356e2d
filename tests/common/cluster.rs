//! A real Pacemaker/Corosync cluster on this machine, for a test or a benchmark: N nodes,
//! each in its own network, mount, UTS, IPC and PID namespaces, joined by a bridge in a
//! namespace of its own, with real fencing through a power switch outside the nodes
//! (`scripts/cluster/netns-cluster` does the work; this is its owner). Everything it makes
//! (nodes and their daemons and guests, namespaces, mounts) is gone when the [`Cluster`] is
//! dropped, on every path including a panic; a cluster left behind by a test process that
//! was itself killed is removed by the next one made. Needs root and Debian's `pacemaker`,
//! `corosync`, `pacemaker-cli-utils`, `resource-agents` and `crmsh` (`.ci/run` installs
//! them). With `UNDERSTUDY_KEEP_CLUSTER` set, the nodes' files (logs, CIB, the guest's
//! console) are kept after the teardown, as they are after a failure.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The cluster, torn down on drop.
pub struct Cluster {
    dir: PathBuf,
    nodes: usize,
    switch: Option<Child>,
}

/// One request the power switch served, from its log.
#[derive(Debug, Clone, PartialEq)]
pub struct Power {
    /// When it was done (Unix milliseconds).
    pub at_ms: u64,
    /// `off`, `on` or `reboot` (and `off` again for the first half of a reboot).
    pub action: String,
    /// The node, `pcmkK`.
    pub node: String,
    /// `ok`, or why not (empty for the first half of a reboot).
    pub answer: String,
}

/// Where `scripts/cluster` is.
fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster")
}

/// Runs `netns-cluster ARGS...`; panics with what it said when it fails.
fn netns_cluster(args: &[&str]) -> Output {
    let out = Command::new(scripts().join("netns-cluster"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/cluster/netns-cluster");
    assert!(
        out.status.success(),
        "netns-cluster {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails the test with a clear message when a tool the cluster needs is missing.
fn require_tools() {
    for (tool, package) in [
        ("corosync", "corosync"),
        ("pacemakerd", "pacemaker"),
        ("crm_mon", "pacemaker-cli-utils"),
        ("crm", "crmsh"),
        ("nsenter", "util-linux"),
    ] {
        let found = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: apt-get install pacemaker corosync pacemaker-cli-utils \
             resource-agents crmsh ({package}; .ci/run does)"
        );
    }
}

/// Tears down clusters whose test process is gone (killed before its drop could run).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("understudy-cluster-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        let _ = Command::new(scripts().join("netns-cluster"))
            .arg("destroy")
            .arg(&dir)
            .output();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl Cluster {
    /// Makes a cluster of `nodes` nodes (`pcmk1`..) named after `tag`, powers them all on and
    /// waits until they are all online with a DC. `properties` are cluster properties written
    /// into each node's CIB before it starts (so that `dc-deadtime` shortens the first
    /// election too).
    pub fn new(tag: &str, nodes: usize, properties: &[(&str, &str)]) -> Cluster {
        require_tools();
        remove_stale();
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("understudy-cluster-{pid}-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // From here on, a panic tears down whatever was made.
        let mut cluster = Cluster {
            dir,
            nodes,
            switch: None,
        };
        let prefix = format!("uscl{}{}", pid % 100_000, &tag[..tag.len().min(3)]);
        netns_cluster(&["create", cluster.path(), &prefix, &nodes.to_string()]);
        let nvpairs: String = properties
            .iter()
            .map(|(name, value)| {
                format!(
                    "<nvpair id=\"cib-bootstrap-options-{name}\" name=\"{name}\" value=\"{value}\"/>"
                )
            })
            .collect();
        let cib = format!(
            "<cib crm_feature_set=\"3.16.1\" validate-with=\"pacemaker-3.9\" epoch=\"1\" \
             num_updates=\"0\" admin_epoch=\"0\"><configuration><crm_config>\
             <cluster_property_set id=\"cib-bootstrap-options\">{nvpairs}</cluster_property_set>\
             </crm_config><nodes/><resources/><constraints/></configuration><status/></cib>\n"
        );
        for k in 1..=nodes {
            let file = cluster.node_dir(k).join("var-lib-pacemaker/cib/cib.xml");
            std::fs::write(&file, &cib).unwrap();
            let chown = Command::new("chown")
                .arg("hacluster:haclient")
                .arg(&file)
                .status()
                .unwrap();
            assert!(chown.success());
        }
        cluster.switch = Some(
            Command::new(scripts().join("netns-cluster"))
                .arg("switch")
                .arg(&cluster.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the power switch"),
        );
        for k in 1..=nodes {
            cluster.power_on(k);
        }
        let all: Vec<usize> = (1..=nodes).collect();
        cluster.wait_online(1, &all);
        cluster
    }

    /// The cluster's directory, as a string for the script.
    fn path(&self) -> &str {
        self.dir
            .to_str()
            .expect("a temporary directory's path is UTF-8")
    }

    /// Node `k`'s directory: `understudy/` in it is what the node sees as `/run/understudy`.
    pub fn node_dir(&self, k: usize) -> PathBuf {
        self.dir.join(format!("node{k}"))
    }

    /// Powers node `k` on (its init, then Corosync and Pacemaker).
    pub fn power_on(&self, k: usize) {
        netns_cluster(&["start", self.path(), &k.to_string()]);
    }

    /// Powers node `k` off, outside the cluster's knowledge (a power loss): its init and
    /// everything in its PID namespace are killed. Returns when (Unix milliseconds).
    pub fn power_off(&self, k: usize) -> u64 {
        netns_cluster(&["stop", self.path(), &k.to_string()]);
        unix_ms()
    }

    /// Connects or cuts node `k`'s link to the others.
    pub fn set_link(&self, k: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        netns_cluster(&["link", self.path(), &k.to_string(), state]);
    }

    /// Makes the power switch refuse (or serve again) every request: fencing fails.
    pub fn refuse_fencing(&self, refuse: bool) {
        let flag = self.dir.join("switch/refuse");
        if refuse {
            std::fs::write(flag, b"").unwrap();
        } else {
            let _ = std::fs::remove_file(flag);
        }
    }

    /// What the power switch did so far.
    pub fn power_log(&self) -> Vec<Power> {
        let text = std::fs::read_to_string(self.dir.join("switch/log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut fields = line.splitn(4, ' ');
                let at_ms = fields.next()?.parse().ok()?;
                let (first, second) = (fields.next()?, fields.next()?);
                // "T NODE off" (first half of a reboot) or "T ACTION NODE ANSWER".
                let (action, node, answer) = if second == "off" && first.starts_with("pcmk") {
                    ("off", first, "")
                } else {
                    (first, second, fields.next().unwrap_or(""))
                };
                Some(Power {
                    at_ms,
                    action: action.into(),
                    node: node.into(),
                    answer: answer.into(),
                })
            })
            .collect()
    }

    /// Runs `args` inside node `k`.
    pub fn exec(&self, k: usize, args: &[&str]) -> Output {
        let home = self.node_dir(k);
        let mut all = vec!["exec", self.path()];
        let k = k.to_string();
        all.push(&k);
        all.extend_from_slice(args);
        Command::new(scripts().join("netns-cluster"))
            .args(&all)
            // crmsh keeps its history and cache under HOME: the node's, not the machine's.
            .env("HOME", home)
            .stdin(Stdio::null())
            .output()
            .expect("run a command in a node")
    }

    /// Runs `args` inside node `k` and panics with its output unless it succeeds.
    pub fn must(&self, k: usize, args: &[&str]) -> String {
        let out = self.exec(k, args);
        assert!(
            out.status.success(),
            "{args:?} on pcmk{k}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `crm_mon -1 -r` as node `k` sees the cluster.
    pub fn status(&self, k: usize) -> String {
        let out = self.exec(k, &["crm_mon", "-1", "-r"]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits until node `k` sees `online` online, with a DC.
    pub fn wait_online(&self, k: usize, online: &[usize]) {
        let want = format!(
            "Online: [ {} ]",
            online
                .iter()
                .map(|n| format!("pcmk{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        self.wait(&format!("{want} as pcmk{k} sees it"), k, |status| {
            status.contains(&want) && status.contains("Current DC: pcmk")
        });
    }

    /// Waits until `done` holds for node `k`'s `crm_mon` output.
    pub fn wait(&self, what: &str, k: usize, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + CLUSTER_PATIENCE;
        loop {
            let status = self.status(k);
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; crm_mon says:\n{status}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Loads `configuration` (crmsh's syntax) into the cluster's CIB.
    pub fn load_crm(&self, name: &str, configuration: &str) {
        let file = format!("{name}.crm");
        std::fs::write(
            self.node_dir(1).join("understudy").join(&file),
            configuration,
        )
        .unwrap();
        let seen = format!("/run/understudy/{file}");
        self.must(1, &["crm", "configure", "load", "update", &seen]);
    }

    /// Configures the guest `counter` (the counting test kernel, 64 MiB, booted with
    /// `cmdline`) as docs/cluster.md does, on nodes `pcmk1` and `pcmk2` (never on a third):
    /// each node's environment file at `/run/understudy/counter.toml`, the OCF agent running
    /// `binary`, its log at `/run/understudy/counter.log`, fencing by the power switch.
    pub fn configure_guest(&self, binary: &Path, cmdline: &str) {
        // The link's credentials, made by `understudy certs`: each node gets the pair's CA
        // and its own certificate and key.
        let certs = self.node_dir(1).join("certs");
        let _ = std::fs::remove_dir_all(&certs);
        let made = Command::new(binary)
            .args([OsStr::new("certs"), certs.as_os_str()])
            .args(["--hosts", "pcmk1,pcmk2"])
            .output()
            .expect("run understudy certs");
        assert!(made.status.success(), "{made:?}");
        for k in [1, 2] {
            let peer = 3 - k;
            let dir = self.node_dir(k).join("understudy");
            for (from, to) in [
                ("ca.pem".to_owned(), "ca.pem"),
                (format!("pcmk{k}.pem"), "host.pem"),
                (format!("pcmk{k}.key"), "host.key"),
            ] {
                std::fs::copy(certs.join(from), dir.join(to)).unwrap();
            }
            let env = format!(
                "[[guest]]\nname = \"counter\"\nkernel = \"{}/counter\"\nmemory_mib = 64\n\
                 cmdline = \"{cmdline}\"\ncrash_dump = false\n\
                 [guest.standby]\nresume = \"checkpoint\"\nprocess = \"remote\"\n\
                 listen = \"10.99.0.{k}:7770\"\npeer = \"10.99.0.{peer}:7770\"\n\
                 tls_ca = \"ca.pem\"\ntls_cert = \"host.pem\"\ntls_key = \"host.key\"\n",
                env!("UNDERSTUDY_KERNELS"),
            );
            std::fs::write(dir.join("counter.toml"), env).unwrap();
        }
        let binary = binary.display();
        // docs/cluster.md's configuration, with this machine's paths and shorter monitors.
        let configuration = format!(
            "property stonith-enabled=true no-quorum-policy=stop\n\
             primitive fence-switch stonith:fence_understudy_switch \\\n\
             \tparams pcmk_host_list=\"pcmk1 pcmk2 pcmk3\" pcmk_host_check=static-list \\\n\
             \top monitor interval=60s\n\
             primitive guest ocf:understudy:understudy \\\n\
             \tparams config=/run/understudy/counter.toml guest=counter binary={binary} \\\n\
             \tlog=/run/understudy/counter.log peer_node=\"pcmk1 pcmk2\" \\\n\
             \top start timeout=30s op stop timeout=30s op promote timeout=30s \\\n\
             \top demote timeout=60s \\\n\
             \top monitor interval=3s role=Unpromoted timeout=20s \\\n\
             \top monitor interval=2s role=Promoted timeout=20s\n\
             clone guest-clone guest \\\n\
             \tmeta promotable=true promoted-max=1 promoted-node-max=1 clone-max=2 \
             clone-node-max=1\n\
             location guest-not-on-pcmk3 guest-clone -inf: pcmk3\n"
        );
        self.load_crm("guest", &configuration);
    }

    /// Whether any node's Pacemaker log has `text`.
    pub fn logs_contain(&self, text: &str) -> bool {
        (1..=self.nodes).any(|k| {
            std::fs::read_to_string(self.node_dir(k).join("log/pacemaker/pacemaker.log"))
                .is_ok_and(|log| log.contains(text))
        })
    }

    /// The ends of the nodes' Pacemaker logs and the power switch's log, for failures.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for k in 1..=self.nodes {
            let log = self.node_dir(k).join("log/pacemaker/pacemaker.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- pcmk{k} {}:\n", log.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str("--- power switch:\n");
        out.push_str(&std::fs::read_to_string(self.dir.join("switch/log")).unwrap_or_default());
        out
    }
}

/// Cluster operations (an election, a fencing, a node's boot) take seconds, on a loaded
/// machine tens of them.
pub const CLUSTER_PATIENCE: Duration = Duration::from_secs(120);

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut switch) = self.switch.take() {
            let _ = switch.kill();
            let _ = switch.wait();
        }
        let _ = Command::new(scripts().join("netns-cluster"))
            .arg("destroy")
            .arg(&self.dir)
            .output();
        if std::thread::panicking() || std::env::var_os("UNDERSTUDY_KEEP_CLUSTER").is_some() {
            eprintln!("the cluster's files are kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
