//! The control protocol's messages: one JSON object per line each way. A request names its
//! kind in `"request"`; a reply is `{"ok": true, "result": ...}` or `{"ok": false, "error":
//! KIND, "message": TEXT}`. `docs/api.md` is the reference; the types here are it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ResumeFrom;
use crate::fault::FaultKind;

/// Longest request line accepted, newline included. Anything longer is answered with
/// `too-long` and the connection is closed, since the rest of the line cannot be trusted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every guest's roles, protection, failovers, last failure and checkpoint counters.
    Status {},
    /// Metrics in Prometheus text format.
    Metrics {},
    /// A planned, graceful swap of the guest's active and standby.
    Switchover {
        /// The guest.
        guest: String,
    },
    /// Injects a fault into the guest's active machine, as `--fault` does.
    Fault {
        /// The guest.
        guest: String,
        /// What to inject.
        kind: FaultKind,
    },
    /// Stops the guest's vCPUs (and its standby side's work) until `resume`.
    Pause {
        /// The guest.
        guest: String,
    },
    /// Lets a paused guest run again.
    Resume {
        /// The guest.
        guest: String,
    },
    /// Writes a consistent snapshot of the guest to the directory `path`.
    Snapshot {
        /// The guest.
        guest: String,
        /// A directory to create; it must not exist yet.
        path: std::path::PathBuf,
    },
    /// Stops every guest and ends `understudy run`.
    Shutdown {},
    /// What this process is for the guest (active or standby), how current, and its
    /// promotion score: what a cluster manager's resource agent asks.
    Role {
        /// The guest.
        guest: String,
    },
    /// Makes this remote standby the guest's active (`process = "remote"`): refused while
    /// the peer answers as the guest's active, or does not answer and `peer_fenced` is not
    /// set.
    Promote {
        /// The guest.
        guest: String,
        /// The caller knows the peer's host is fenced (the cluster manager fenced it).
        #[serde(default)]
        peer_fenced: bool,
    },
}

impl Request {
    /// The guest the request is about, if it is about one.
    pub fn guest(&self) -> Option<&str> {
        match self {
            Request::Switchover { guest }
            | Request::Fault { guest, .. }
            | Request::Pause { guest }
            | Request::Resume { guest }
            | Request::Snapshot { guest, .. }
            | Request::Role { guest }
            | Request::Promote { guest, .. } => Some(guest),
            Request::Status {} | Request::Metrics {} | Request::Shutdown {} => None,
        }
    }
}

/// Why a request failed; the `error` field of a failed reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The line is not a JSON object.
    NotJson,
    /// A JSON object, but not a request this server knows (unknown `request`, a missing or
    /// unexpected field, a value of the wrong type).
    BadRequest,
    /// The line is longer than [`MAX_REQUEST_BYTES`].
    TooLong,
    /// The request names a guest the environment does not have.
    UnknownGuest,
    /// The guest cannot do this now (it has ended, is paused, has no standby, ...).
    NotPossible,
    /// The request was valid but carrying it out failed (a machine or file error).
    Failed,
    /// More clients are connected than the server serves at once.
    Busy,
    /// The supervisor is shutting down or did not answer.
    Unavailable,
}

/// A reply to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// What it returned, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKind>,
    /// A sentence for the operator, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Reply {
    /// A successful reply carrying `result`.
    pub fn ok(result: impl Serialize) -> Reply {
        Reply {
            ok: true,
            // Every result type is a struct of strings, numbers, bools, options and lists:
            // conversion to a JSON value cannot fail for them.
            result: Some(serde_json::to_value(result).unwrap_or(serde_json::Value::Null)),
            error: None,
            message: None,
        }
    }

    /// A failed reply.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(kind),
            message: Some(message.into()),
        }
    }

    /// The reply as one line of JSON, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"ok":false,"error":"failed","message":"reply could not be encoded"}"#.into()
        });
        line.push('\n');
        line
    }
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, Reply> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| Reply::error(ErrorKind::NotJson, format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(Reply::error(
            ErrorKind::NotJson,
            "a request is a JSON object, e.g. {\"request\":\"status\"}",
        ));
    }
    serde_json::from_value(value).map_err(|e| Reply::error(ErrorKind::BadRequest, e.to_string()))
}

/// A guest's state as `status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The guest.
    pub name: String,
    /// Whether it runs.
    pub state: RunState,
    /// How it ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// What its standby resumes from, for a hot-standby guest; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumeFrom>,
    /// Whether a failure of the active would now fail over.
    pub armed: bool,
    /// Failovers so far.
    pub failovers: u32,
    /// Planned switchovers so far.
    pub switchovers: u32,
    /// Restarts of an unprotected guest so far.
    pub restarts: u32,
    /// The guest's machines and their roles.
    pub machines: Vec<MachineStatus>,
    /// Heartbeat watch.
    pub heartbeat: HeartbeatStatus,
    /// The last failure, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailureRecord>,
    /// Epoch counters, for a checkpointed guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,
    /// Host memory the guest's RAM takes: pages ever written, holes excluded.
    #[serde(default)]
    pub ram_resident_bytes: u64,
    /// Host memory the checkpointed standby's copy of it takes, for a checkpointed guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_copy_resident_bytes: Option<u64>,
    /// The guest's disks, in device order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskStatus>,
    /// The guest's NICs, in device order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetStatus>,
    /// With `process = "separate"`: the standby process and the journal it follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_process: Option<StandbyProcessStatus>,
}

/// The reply to `role`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRole {
    /// The guest.
    pub guest: String,
    /// `active` (the guest runs in this process) or `standby`.
    pub role: Role,
    /// For an active: `protected` (a standby follows and failover is armed) or `running`.
    /// For a standby: `following` (it holds the last epoch of a live active), `handed-over`
    /// (it holds the last epoch of an active that is fenced), `holding` (it holds an epoch,
    /// but the active is not heard from), `syncing` (it loads a first batch) or `empty`.
    pub state: String,
    /// The last epoch the standby applied, or the active wrote for its standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// How much this instance should be the one promoted: one of [`GuestRole`]'s `SCORE_`
    /// constants.
    pub score: i64,
}

impl GuestRole {
    /// The promotion score of an active: it stays where it is.
    pub const SCORE_ACTIVE: i64 = 10000;
    /// Of a standby following a live active, or handed the guest over by it.
    pub const SCORE_CURRENT: i64 = 1000;
    /// Of a standby holding an epoch whose active is no longer heard.
    pub const SCORE_HOLDING: i64 = 500;
    /// Of a standby loading its first batch.
    pub const SCORE_SYNCING: i64 = 10;
    /// Of a standby holding nothing.
    pub const SCORE_EMPTY: i64 = 5;
}

/// The reply to `promote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteDone {
    /// `already-active`, `resuming` or `booting`.
    pub outcome: String,
    /// With `resuming`: the epoch the guest resumes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

impl PromoteDone {
    /// The reply of a process that runs the guest already.
    pub fn already_active() -> PromoteDone {
        PromoteDone {
            outcome: "already-active".into(),
            epoch: None,
        }
    }
}

/// The active's view of a guest's standby process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyProcessStatus {
    /// The socket a standby process attaches through.
    pub socket: PathBuf,
    /// The take-over journal.
    pub journal: PathBuf,
    /// The attached standby's process, if one is attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `waiting` (none attached), `hello`, `opening`, `batching`, `loading` or `following`
    /// (caught up: failover to it is armed).
    pub phase: String,
    /// The journal's writer identifier, once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<u64>,
    /// The last epoch written to the journal (the batch is 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Standby processes that attached so far.
    pub sessions: u64,
    /// Epochs put off because the journal had no room until the standby caught up.
    pub deferred_epochs: u64,
}

/// One NIC of a guest: who holds it, how often it changed hands, the frames it carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStatus {
    /// The TAP device.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// The number of the machine holding it (see `machines`); absent while none of the
    /// guest's current machines does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<u32>,
    /// Grants so far.
    pub grants: u64,
    /// Revocations so far.
    pub revocations: u64,
    /// Uses refused because their machine did not hold the NIC.
    pub refused: u64,
    /// The frames carried.
    #[serde(flatten)]
    pub frames: vmm_core::NicCounters,
    /// For a checkpointed guest: what the transmit hold holds and sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<crate::net::EpochNetStats>,
}

/// One disk of a guest: who holds it, how often it changed hands, the I/O it served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// The image file.
    pub path: String,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// The number of the machine holding it (see `machines`); absent while none of the
    /// guest's current machines does (between a failure and the takeover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<u32>,
    /// Ownership changes and refused requests.
    pub grants: u64,
    /// Revocations so far.
    pub revocations: u64,
    /// Requests refused because their machine did not hold the disk: a failed machine that
    /// tried to go on after it was fenced.
    pub refused: u64,
    /// Requests served.
    pub reads: u64,
    /// Write requests served.
    pub writes: u64,
    /// Flush requests served.
    pub flushes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Requests completed with an error status.
    pub errors: u64,
    /// For a checkpointed guest: the epoch log's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<crate::disk::EpochDiskStats>,
}

/// One machine of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// The machine's number within its guest: 1 for the first built, counting up; a machine
    /// keeps its number across role changes.
    pub id: u32,
    /// Its role.
    pub role: Role,
    /// What it is doing.
    pub state: MachineState,
}

/// Whether a guest runs: `running`, `paused` or `ended`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Its active machine runs.
    Running,
    /// An operator paused it.
    Paused,
    /// It has ended.
    Ended,
    /// This process stands by for it (`understudy standby`); another process runs it.
    StandingBy,
}

/// A machine's role: `active` or `standby`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// It runs the guest.
    Active,
    /// It stands by to take over.
    Standby,
}

/// What a machine is doing: `running` or `paused` for the active; `ready` for an armed
/// standby, `syncing` for one being built or brought level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    /// The active, running.
    Running,
    /// The active, paused by an operator.
    Paused,
    /// A standby ready to take over: failover is armed.
    Ready,
    /// A standby being built or synced: failover is not armed yet.
    Syncing,
}

/// The heartbeat watch of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    /// The timeout, or absent when heartbeats are not watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Time since the last heartbeat, or absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// Heartbeats received by the current active machine.
    pub count: u64,
}

/// A failure and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// Which failure, 1 for the guest's first.
    pub number: u32,
    /// What failed, as the log says it.
    pub failure: String,
    /// Its class, as the metrics label it (e.g. `vcpu-thread-died`, `heartbeat-timeout`).
    pub reason: String,
    /// What was done about it.
    pub outcome: FailureOutcome,
    /// When it was detected, in milliseconds since the Unix epoch.
    pub detected_unix_ms: u64,
    /// Each phase that ran, in order, with its duration.
    pub phases: Vec<PhaseTiming>,
    /// Detection to the guest running again, for a failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_us: Option<u64>,
}

/// What was done about a failure: `failed-over`, `restarted` or `down`, or `in-progress`
/// while it is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureOutcome {
    /// Being handled.
    InProgress,
    /// The guest runs on on its former standby.
    FailedOver,
    /// An unprotected guest was booted again.
    Restarted,
    /// The guest was brought down.
    Down,
}

/// A phase of handling a failure, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The failure is noticed.
    Detect,
    /// The failed machine is stopped for good.
    Fence,
    /// Its state is saved.
    Capture,
    /// Its crash dump is written.
    Dump,
    /// The standby runs the guest.
    Resume,
    /// A new standby is ready (or the guest runs on unprotected).
    Recover,
}

/// One phase of a failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTiming {
    /// Which phase.
    pub phase: Phase,
    /// How long it took.
    pub duration_us: u64,
}

/// Epoch counters of a checkpointed guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointStatus {
    /// The epoch length.
    pub interval_ms: u64,
    /// Epochs committed.
    pub epochs: u64,
    /// The last epoch's pause.
    pub last_pause_us: u64,
    /// The longest pause.
    pub max_pause_us: u64,
    /// The mean pause.
    pub mean_pause_us: u64,
    /// Pages the last epoch copied.
    pub last_dirty_pages: u64,
    /// Pages all epochs copied.
    pub total_dirty_pages: u64,
}

/// The `status` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Every guest, in environment-file order.
    pub guests: Vec<GuestStatus>,
}

/// The `metrics` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsText {
    /// Prometheus text exposition format, version 0.0.4.
    pub text: String,
}

/// The result of `switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverDone {
    /// The machine now active.
    pub active: u32,
    /// The machine now standby (0: none yet).
    pub standby: u32,
    /// How long the guest was paused for the swap (for a standby process: until it was told
    /// to take over).
    pub paused_us: u64,
    /// For a guest whose standby is a process: that process, which runs the guest now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<u32>,
}

/// The result of `snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDone {
    /// The directory written.
    pub path: std::path::PathBuf,
    /// Bytes of guest RAM that hold data (the memory file is sparse elsewhere).
    pub memory_bytes_written: u64,
    /// How long the guest was paused.
    pub paused_us: u64,
}

/// The wire name of a protocol value (a unit enum variant), as `status` writes it.
pub fn wire_name(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_their_documented_form() {
        assert_eq!(
            parse_request(br#"{"request":"status"}"#),
            Ok(Request::Status {})
        );
        assert_eq!(
            serde_json::to_string(&Request::Status {}).unwrap(),
            r#"{"request":"status"}"#
        );
        assert_eq!(
            parse_request(br#"{"request":"fault","guest":"a","kind":"mce"}"#),
            Ok(Request::Fault {
                guest: "a".into(),
                kind: FaultKind::Mce
            })
        );
    }

    #[test]
    fn bad_lines_get_the_error_kind_that_says_why() {
        let kind = |line: &[u8]| parse_request(line).unwrap_err().error.unwrap();
        assert_eq!(kind(b"status"), ErrorKind::NotJson);
        assert_eq!(kind(b"[1,2]"), ErrorKind::NotJson);
        assert_eq!(kind(br#"{"request":"reboot"}"#), ErrorKind::BadRequest);
        assert_eq!(kind(br#"{"request":"pause"}"#), ErrorKind::BadRequest);
        assert_eq!(
            kind(br#"{"request":"status","extra":1}"#),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind(br#"{"request":"fault","guest":"a","kind":"melt"}"#),
            ErrorKind::BadRequest
        );
    }
}
