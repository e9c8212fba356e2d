//! `understudy ctl` and `understudy status`: a client of the control socket. Sends one
//! request, prints the reply as a table or sentence (or as the raw JSON line with `--json`),
//! and exits 0 when the request was carried out, 1 when it was refused, 4 when the socket
//! cannot be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use failover::control::protocol::{
    wire_name, GuestRole, GuestStatus, MetricsText, PromoteDone, Role, SnapshotDone, Status,
    SwitchoverDone,
};
use failover::control::{Reply, Request};
use failover::fault::FaultKind;

/// Exit status when the server refused the request.
const EXIT_REFUSED: u8 = 1;
/// Exit status when the socket cannot be reached or answered garbage.
const EXIT_UNREACHABLE: u8 = 4;

/// Longer than the server waits for its supervisor, so its own answer arrives first.
const REPLY_PATIENCE: Duration = Duration::from_secs(320);

/// A request, as typed on the command line.
#[derive(Subcommand, Debug)]
pub enum CtlRequest {
    /// Every guest: roles, protection, failovers, last failure, checkpoint counters.
    Status,
    /// Metrics in Prometheus text format.
    Metrics,
    /// Planned switchover: the standby takes over the running guest, nothing lost.
    Switchover {
        /// The guest.
        guest: String,
    },
    /// Inject a fault into the guest's active machine.
    Fault {
        /// The guest.
        guest: String,
        /// kill, stall, hang, mce or panic.
        #[arg(value_parser = parse_kind)]
        kind: FaultKind,
    },
    /// Pause the guest (its standby side takes no checkpoints meanwhile).
    Pause {
        /// The guest.
        guest: String,
    },
    /// Resume a paused guest.
    Resume {
        /// The guest.
        guest: String,
    },
    /// Write a consistent snapshot (state.snap, memory.raw) into a new directory; `run
    /// --restore` starts a guest from it.
    Snapshot {
        /// The guest.
        guest: String,
        /// The directory to create.
        path: PathBuf,
    },
    /// Stop every guest and end `understudy run`.
    Shutdown,
    /// What this process is for the guest, on one line a script can read:
    /// `role=active|standby state=... [epoch=N] score=N`.
    Role {
        /// The guest.
        guest: String,
    },
    /// Make this remote standby the guest's active (`process = "remote"`); refused while
    /// the peer answers as the guest's active, or does not answer unless --peer-fenced.
    Promote {
        /// The guest.
        guest: String,
        /// The peer's host is known to be fenced (powered off or cut off by the cluster).
        #[arg(long)]
        peer_fenced: bool,
    },
}

fn parse_kind(text: &str) -> Result<FaultKind, String> {
    serde_json::from_value(serde_json::Value::String(text.into()))
        .map_err(|_| format!("{text:?} is not a fault kind (kill, stall, hang, mce, panic)"))
}

impl CtlRequest {
    fn into_request(self) -> Request {
        match self {
            CtlRequest::Status => Request::Status {},
            CtlRequest::Metrics => Request::Metrics {},
            CtlRequest::Switchover { guest } => Request::Switchover { guest },
            CtlRequest::Fault { guest, kind } => Request::Fault { guest, kind },
            CtlRequest::Pause { guest } => Request::Pause { guest },
            CtlRequest::Resume { guest } => Request::Resume { guest },
            // The server may run in another directory: send the path as this shell means it.
            CtlRequest::Snapshot { guest, path } => Request::Snapshot {
                guest,
                path: std::path::absolute(&path).unwrap_or(path),
            },
            CtlRequest::Shutdown => Request::Shutdown {},
            CtlRequest::Role { guest } => Request::Role { guest },
            CtlRequest::Promote { guest, peer_fenced } => Request::Promote { guest, peer_fenced },
        }
    }
}

/// Sends `request` to the socket at `socket` and prints the reply.
pub fn run(socket: &Path, request: CtlRequest, json: bool) -> ExitCode {
    let request = request.into_request();
    let (reply, line) = match exchange(socket, &request) {
        Ok(answer) => answer,
        Err(message) => {
            eprintln!("understudy: {}: {message}", socket.display());
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    if json {
        print!("{line}");
    } else if reply.ok {
        print_result(&request, reply.result.unwrap_or_default());
    }
    if reply.ok {
        return ExitCode::SUCCESS;
    }
    if !json {
        let kind = reply
            .error
            .and_then(|k| serde_json::to_value(k).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "error".into());
        eprintln!("understudy: {kind}: {}", reply.message.unwrap_or_default());
    }
    ExitCode::from(EXIT_REFUSED)
}

fn exchange(socket: &Path, request: &Request) -> Result<(Reply, String), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("cannot connect: {e}"))?;
    stream
        .set_read_timeout(Some(REPLY_PATIENCE))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("no reply: {e}"))?;
    let reply = serde_json::from_str(&answer)
        .map_err(|e| format!("the reply is not a control-protocol reply ({e}): {answer:?}"))?;
    Ok((reply, answer))
}

fn print_result(request: &Request, result: serde_json::Value) {
    match request {
        Request::Status {} => match serde_json::from_value::<Status>(result) {
            Ok(status) => print!("{}", status_table(&status.guests)),
            Err(err) => eprintln!("understudy: unexpected status reply: {err}"),
        },
        Request::Metrics {} => match serde_json::from_value::<MetricsText>(result) {
            Ok(metrics) => print!("{}", metrics.text),
            Err(err) => eprintln!("understudy: unexpected metrics reply: {err}"),
        },
        Request::Switchover { guest } => {
            if let Ok(done) = serde_json::from_value::<SwitchoverDone>(result) {
                println!(
                    "{guest}: machine {} is now active, machine {} the standby (paused {})",
                    done.active,
                    done.standby,
                    millis(done.paused_us)
                );
            }
        }
        Request::Fault { guest, kind } => println!("{guest}: injected {kind}"),
        Request::Pause { guest } => println!("{guest}: paused"),
        Request::Resume { guest } => println!("{guest}: running"),
        Request::Snapshot { guest, .. } => {
            if let Ok(done) = serde_json::from_value::<SnapshotDone>(result) {
                println!(
                    "{guest}: snapshot in {} (state.snap, memory.raw with {} KiB of data; paused {})",
                    done.path.display(),
                    done.memory_bytes_written >> 10,
                    millis(done.paused_us)
                );
            }
        }
        Request::Shutdown {} => println!("shutting down"),
        Request::Role { .. } => match serde_json::from_value::<GuestRole>(result) {
            Ok(role) => {
                let name = match role.role {
                    Role::Active => "active",
                    Role::Standby => "standby",
                };
                let epoch = role
                    .epoch
                    .map(|e| format!(" epoch={e}"))
                    .unwrap_or_default();
                println!(
                    "role={name} state={}{epoch} score={}",
                    role.state, role.score
                );
            }
            Err(err) => eprintln!("understudy: unexpected role reply: {err}"),
        },
        Request::Promote { guest, .. } => match serde_json::from_value::<PromoteDone>(result) {
            Ok(done) => match done.epoch {
                Some(epoch) => println!("{guest}: promoted: resuming from epoch {epoch}"),
                None if done.outcome == "booting" => {
                    println!("{guest}: promoted: booting the guest")
                }
                None => println!("{guest}: already active here"),
            },
            Err(err) => eprintln!("understudy: unexpected promote reply: {err}"),
        },
    }
}

fn millis(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// The guests as a table, a second table for the checkpointed ones, and a third for disks.
fn status_table(guests: &[GuestStatus]) -> String {
    let mut rows = vec![[
        "GUEST",
        "STATE",
        "RESUME",
        "ARMED",
        "ACTIVE",
        "STANDBY",
        "FAILOVERS",
        "SWITCHOVERS",
        "LAST FAILURE",
    ]
    .map(String::from)
    .to_vec()];
    for g in guests {
        let machine = |role: Role| {
            g.machines
                .iter()
                .find(|m| m.role == role)
                .map_or("-".to_owned(), |m| {
                    format!("#{} {}", m.id, wire_name(&m.state))
                })
        };
        let last = g.last_failure.as_ref().map_or("-".to_owned(), |f| {
            let downtime = f
                .downtime_us
                .map(|us| format!(", downtime {}", millis(us)))
                .unwrap_or_default();
            format!("{} ({}{downtime})", f.reason, wire_name(&f.outcome))
        });
        rows.push(vec![
            g.name.clone(),
            match &g.end {
                Some(end) => format!("{} ({end})", wire_name(&g.state)),
                None => wire_name(&g.state),
            },
            g.resume.map_or_else(|| "-".into(), |r| wire_name(&r)),
            if g.armed { "yes" } else { "no" }.into(),
            machine(Role::Active),
            machine(Role::Standby),
            g.failovers.to_string(),
            g.switchovers.to_string(),
            last,
        ]);
    }
    let mut out = table(&rows);
    let checkpointed: Vec<_> = guests
        .iter()
        .filter_map(|g| g.checkpoint.as_ref().map(|c| (g, c)))
        .collect();
    if !checkpointed.is_empty() {
        let mut rows = vec![[
            "CHECKPOINTS",
            "INTERVAL",
            "EPOCHS",
            "MEAN PAUSE",
            "MAX PAUSE",
            "LAST DIRTY PAGES",
        ]
        .map(String::from)
        .to_vec()];
        for (g, c) in checkpointed {
            rows.push(vec![
                g.name.clone(),
                format!("{} ms", c.interval_ms),
                c.epochs.to_string(),
                millis(c.mean_pause_us),
                millis(c.max_pause_us),
                c.last_dirty_pages.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    let disks: Vec<_> = guests
        .iter()
        .flat_map(|g| g.disks.iter().enumerate().map(move |(i, d)| (g, i, d)))
        .collect();
    if !disks.is_empty() {
        let mut rows = vec![[
            "DISKS",
            "DISK",
            "HOLDER",
            "MODE",
            "READS",
            "WRITES",
            "ERRORS",
            "HANDOVERS",
            "REFUSED",
            "IMAGE",
        ]
        .map(String::from)
        .to_vec()];
        for (g, index, d) in disks {
            rows.push(vec![
                g.name.clone(),
                index.to_string(),
                d.holder.map_or("-".to_owned(), |id| format!("#{id}")),
                if d.read_only { "ro" } else { "rw" }.into(),
                d.reads.to_string(),
                d.writes.to_string(),
                d.errors.to_string(),
                d.revocations.to_string(),
                d.refused.to_string(),
                d.path.clone(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    let nets: Vec<_> = guests
        .iter()
        .flat_map(|g| g.nets.iter().enumerate().map(move |(i, n)| (g, i, n)))
        .collect();
    if !nets.is_empty() {
        let mut rows = vec![[
            "NICS",
            "NIC",
            "HOLDER",
            "RX",
            "TX",
            "DROPPED",
            "HELD",
            "HANDOVERS",
            "REFUSED",
            "TAP",
            "MAC",
        ]
        .map(String::from)
        .to_vec()];
        for (g, index, n) in nets {
            rows.push(vec![
                g.name.clone(),
                index.to_string(),
                n.holder.map_or("-".to_owned(), |id| format!("#{id}")),
                n.frames.rx_frames.to_string(),
                n.frames.tx_frames.to_string(),
                (n.frames.rx_dropped + n.frames.tx_dropped).to_string(),
                n.epochs
                    .as_ref()
                    .map_or("-".to_owned(), |e| e.held_frames.to_string()),
                n.revocations.to_string(),
                n.refused.to_string(),
                n.tap.clone(),
                n.mac.clone(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    let linked: Vec<_> = guests
        .iter()
        .filter_map(|g| g.standby_process.as_ref().map(|p| (g, p)))
        .collect();
    if !linked.is_empty() {
        let mut rows = vec![[
            "STANDBY PROCESS",
            "PHASE",
            "PEER PID",
            "EPOCH",
            "SESSIONS",
            "DEFERRED",
            "JOURNAL",
        ]
        .map(String::from)
        .to_vec()];
        for (g, p) in linked {
            rows.push(vec![
                g.name.clone(),
                p.phase.clone(),
                p.pid.map_or("-".to_owned(), |pid| pid.to_string()),
                p.epoch.map_or("-".to_owned(), |e| e.to_string()),
                p.sessions.to_string(),
                p.deferred_epochs.to_string(),
                p.journal.display().to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
