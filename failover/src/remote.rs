//! `[guest.standby] process = "remote"`: the standby runs in a process on another host and
//! follows the active over TCP.
//!
//! Both sides keep the take-over journal of `process = "separate"` ([`crate::journal`]) on
//! their own host, and the journal's bytes travel between them: the batch's data (its holes
//! stay holes: only the pages the guest touched are sent), then each epoch's record, as
//! written, sequence number and checksums included. On the active's host a *shipper*
//! attaches to the guest's attach socket as a local standby would, and sends what the
//! journal gets; on the standby's host a *relay* writes what arrives into a journal of its
//! own and announces it to the follower ([`crate::follower`]) as a local active would. The
//! follower and the active's journal writer are those of the separate standby process.
//!
//! What differs is who releases the console output and who decides to take over:
//! - **Output is released by the active, after the standby acknowledged its epoch**
//!   (Remus's rule): the shipper writes an epoch's output to the active's console once the
//!   standby says it applied that epoch, then tells the standby it did (`released`). A
//!   standby that acknowledges nothing for `ack_timeout_ms` is dropped: the held output is
//!   released and the guest runs on unprotected. The guest never waits for the network.
//! - **The standby never takes over on its own.** There is no lock across hosts: which host
//!   runs the guest is the cluster manager's call (`understudy ctl SOCKET promote`, driven by
//!   the OCF agent `ocf/understudy`). A promote is refused while the peer answers as the
//!   guest's active, or does not answer and is not known to be fenced. A promoted standby
//!   releases the output of the epochs it applied and the active had not said it released,
//!   and resumes from its last whole epoch; one promoted before it ever loaded a batch
//!   boots the guest.
//!
//! Each process of a remote guest listens on its `listen` address (the *peer port*): an
//! active takes its standby's connection there, and either side answers a `role` query.
//! Every connection, both ways, is mutual TLS ([`crate::tls`]) unless `insecure = true`:
//! one that does not authenticate is closed before its first line is read, and a role
//! answer that does not authenticate is not believed.
//!
//! ```text
//! standby (relay)                              active (shipper)
//!   hello {pid, guest}                ->
//!                                     <-       journal {identifier, guest, memory, size, pid}
//!   opened {}                         ->
//!                                     <-       bytes {offset, len} + len bytes ...   (the batch's data)
//!                                     <-       batch {seq}
//!   ready {seq}                       ->
//!                                     <-       bytes {offset, len} + len bytes, record {seq, offset}
//!   applied {seq}                     ->       (the epoch's output is released on the active's console)
//!                                     <-       released {seq}
//!                                     <-       take_over {why, released}   (the active is fenced)
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_core::SerialSink;

use crate::config::{GuestConfig, JournalConfig, PeerAddress, RemoteConfig};
use crate::control::protocol::GuestRole;
use crate::journal::{Journal, PAGE};
use crate::link::{send, ActiveLock, Lines, LinkError, ToActive, ToStandby};
use crate::tls::{LinkSecurity, PeerStream, TlsError};

/// From the active's host to the standby's. `bytes` is followed by `len` raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToRemote {
    /// A journal for writer `identifier`: the standby makes one of its own like it.
    Journal {
        /// The writer's identifier.
        identifier: u64,
        /// The guest.
        guest: String,
        /// The guest's RAM, in bytes.
        memory: u64,
        /// The journal's size, in bytes.
        size: u64,
        /// The active's process.
        pid: u32,
    },
    /// The next `len` bytes on the connection go at `offset` in the journal.
    Bytes {
        /// Where, in the journal.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// The batch of epoch `seq` is whole.
    Batch {
        /// Its epoch.
        seq: u64,
    },
    /// Epoch `seq`'s record is whole, at `offset`.
    Record {
        /// Its epoch.
        seq: u64,
        /// Where it starts.
        offset: u64,
    },
    /// The output of every epoch up to `seq` is released on the active's console.
    Released {
        /// The last released epoch.
        seq: u64,
    },
    /// The active's machine is fenced for good (it failed, or a switchover was asked for):
    /// the standby may be promoted without waiting for the active's process to go. Nothing
    /// after epoch `released` was released by the active.
    TakeOver {
        /// Why.
        why: String,
        /// The last epoch whose output the active released.
        released: u64,
    },
    /// The active will not go on with this standby.
    Refused {
        /// Why.
        why: String,
    },
}

/// The first line of a connection to the peer port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Opening {
    /// A standby announces itself (as [`ToActive::Hello`]).
    Hello {
        /// The standby's process.
        pid: u32,
        /// The guest it stands by for.
        guest: String,
    },
    /// Who runs `guest` here? Answered with one [`PeerRole`] line. Without a guest (as
    /// processes of one remote guest each asked), the port's only guest is meant.
    Role {
        /// The guest asked about.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest: Option<String>,
    },
}

/// What a process says it is for its guest, to a `role` query on its peer port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRole {
    /// `active` (the guest runs here), `handed-over` (it ran here and is fenced), or
    /// `standby`.
    pub role: String,
    /// The guest.
    pub guest: String,
}

/// The longest control line on the connection.
const MAX_LINE: usize = 64 << 10;
/// How long a connection to the peer port may take to say what it is.
const OPENING_PATIENCE: Duration = Duration::from_secs(2);
/// How long a `role` query or a connection attempt waits for the peer.
pub const PEER_PATIENCE: Duration = Duration::from_secs(1);
/// How long a promote waits for the session with the old active to end on its own.
const SESSION_DRAIN: Duration = Duration::from_millis(500);
/// How often the relay tries to reach an active that does not answer.
const CONNECT_RETRY: Duration = Duration::from_millis(200);
/// How a relay's session starts to say that the peer refused this host in the TLS handshake
/// (the listener's verdict reaches the connecting side with its first read).
const REFUSED_BY_PEER: &str = "the peer refused this host's certificate";
/// How often the shipper looks at the oldest unacknowledged epoch.
const ACK_CHECK: Duration = Duration::from_millis(20);

/// Writes one control line.
fn write_line<M: Serialize>(out: &mut impl Write, message: &M) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// Reads one control line into `buf` (kept across calls: a read that times out keeps what
/// it had). `Ok(None)` at the end of the stream.
fn read_line<M: for<'de> Deserialize<'de>>(
    reader: &mut BufReader<PeerStream>,
    buf: &mut Vec<u8>,
) -> Result<Option<M>, LinkError> {
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err.into()),
        };
        if available.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(LinkError::Garbled("the connection ended mid-line".into()))
            };
        }
        let (line_end, used) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (true, i + 1),
            None => (false, available.len()),
        };
        buf.extend_from_slice(&available[..used]);
        reader.consume(used);
        if buf.len() > MAX_LINE {
            return Err(LinkError::Garbled("a line too long".into()));
        }
        if line_end {
            let line = std::mem::take(buf);
            return serde_json::from_slice(&line[..line.len() - 1])
                .map(Some)
                .map_err(|e| LinkError::Garbled(e.to_string()));
        }
    }
}

fn timed_out(err: &LinkError) -> bool {
    matches!(err, LinkError::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// Asks the process at `peer` what it is for `guest` (a name is looked up first). A peer
/// that does not authenticate is an error of kind `PermissionDenied`, never an answer.
pub fn query_role(
    peer: &PeerAddress,
    guest: &str,
    security: &LinkSecurity,
    patience: Duration,
) -> std::io::Result<PeerRole> {
    let tcp = TcpStream::connect_timeout(&peer.resolve()?, patience)?;
    let mut conn = security.connect(tcp, patience).map_err(TlsError::into_io)?;
    conn.set_read_timeout(Some(patience))?;
    conn.set_write_timeout(Some(patience))?;
    let question = Opening::Role {
        guest: Some(guest.to_owned()),
    };
    write_line(&mut conn, &question)?;
    let tls = conn.is_tls();
    let mut reader = BufReader::new(conn);
    let mut buf = Vec::new();
    match read_line::<PeerRole>(&mut reader, &mut buf) {
        Ok(Some(role)) => Ok(role),
        Ok(None) => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without answering",
        )),
        // The listener's verdict on this host's certificate arrives with the first read.
        Err(LinkError::Io(err)) if tls && err.kind() == std::io::ErrorKind::InvalidData => Err(
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, err),
        ),
        Err(LinkError::Io(err)) => Err(err),
        Err(err) => Err(std::io::Error::other(err.to_string())),
    }
}

/// Asks the peer what it is, as a promote does: a connection reset or closed unanswered
/// (a process whose sockets are being torn down as it dies) is asked again, a few times,
/// until the port is gone for good or answers.
fn query_peer(
    peer: &PeerAddress,
    guest: &str,
    security: &LinkSecurity,
) -> std::io::Result<PeerRole> {
    let mut tries = 0;
    loop {
        match query_role(peer, guest, security, PEER_PATIENCE) {
            Err(err)
                if tries < 10
                    && matches!(
                        err.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                    ) =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            answer => return answer,
        }
    }
}

/// What this process is for one of the peer port's guests.
#[derive(Clone)]
enum PortRole {
    /// Nothing yet (or no longer).
    None,
    /// A relay follows an active for this guest.
    Standby(String),
    /// The guest runs here; standbys are shipped to through this.
    Active(Arc<ActiveSide>),
    /// The guest ran here and its machine is fenced.
    HandedOver(String),
    /// A promote of this standby is under way: answered as `active`, so that two standbys
    /// promoted at once both refuse rather than both run the guest.
    Promoting(String),
}

/// One of the process's peer ports: its listener and what it answers for each guest that
/// listens there.
struct PeerPort {
    listen: SocketAddr,
    /// How every connection to it must authenticate (the same for all its guests).
    security: LinkSecurity,
    roles: Mutex<std::collections::BTreeMap<String, PortRole>>,
    /// Connections being served (each on a thread of its own).
    serving: std::sync::atomic::AtomicUsize,
}

/// The most connections the peer port serves at once; more are closed unread (a flood of
/// connections costs threads, not the guest).
const MAX_PEER_CONNECTIONS: usize = 16;

/// The process's peer ports, one per `listen` address: several remote guests of one process
/// may share one, a connection naming the guest it is for.
static PORTS: Mutex<Vec<Arc<PeerPort>>> = Mutex::new(Vec::new());

/// How long a starting process waits for what a previous process of the guest on this host
/// still holds as it ends: its lock, its socket, its port.
const RESTART_PATIENCE: Duration = Duration::from_secs(5);

/// Whether a failed attempt is worth another.
enum Retry {
    Again(String),
    Fail(String),
}

/// `attempt` until it succeeds, fails for good, or `patience` has passed (every 20 ms).
fn within<T>(patience: Duration, attempt: impl Fn() -> Result<T, Retry>) -> Result<T, String> {
    let deadline = Instant::now() + patience;
    loop {
        match attempt() {
            Ok(done) => return Ok(done),
            Err(Retry::Fail(why)) => return Err(why),
            Err(Retry::Again(why)) if Instant::now() >= deadline => return Err(why),
            Err(Retry::Again(_)) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process's peer port at `listen` for `guest`, bound on first use, taking connections
/// that authenticate as `security` asks; guests that share an address share its port, and
/// must share its credentials.
fn port(guest: &str, listen: SocketAddr, security: &LinkSecurity) -> Result<Arc<PeerPort>, String> {
    let mut ports = locked(&PORTS);
    if let Some(port) = ports.iter().find(|p| p.listen == listen) {
        if port.security != *security {
            return Err(format!(
                "guest {guest} listens on {listen} with other credentials than the guests already listening there: guests that share an address share its tls_* keys (or insecure)"
            ));
        }
        return Ok(port.clone());
    }
    let listener = within(RESTART_PATIENCE, || {
        TcpListener::bind(listen).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => Retry::Again(e.to_string()),
            _ => Retry::Fail(e.to_string()),
        })
    })
    .map_err(|e| format!("listen on {listen}: {e}"))?;
    if *security == LinkSecurity::Insecure {
        tracing::warn!(guest, %listen, "insecure = true: the link to the peer is neither authenticated nor encrypted; whoever reaches {listen} can read the guest's memory and answer for the peer");
    }
    let port = Arc::new(PeerPort {
        listen,
        security: security.clone(),
        roles: Mutex::new(std::collections::BTreeMap::new()),
        serving: std::sync::atomic::AtomicUsize::new(0),
    });
    let serving = port.clone();
    std::thread::Builder::new()
        .name("peer-port".into())
        .spawn(move || {
            vmm_core::jail::enter(vmm_core::jail::ThreadKind::Link);
            serving.accept(listener)
        })
        .map_err(|e| format!("peer port thread: {e}"))?;
    ports.push(port.clone());
    Ok(port)
}

/// The peer port at `listen`, if this process has one.
fn port_at(listen: SocketAddr) -> Option<Arc<PeerPort>> {
    locked(&PORTS).iter().find(|p| p.listen == listen).cloned()
}

impl PeerPort {
    fn set(&self, guest: &str, role: PortRole) {
        locked(&self.roles).insert(guest.to_owned(), role);
    }

    /// What this process is for `guest`; without a guest, for the port's only one.
    fn role(&self, guest: Option<&str>) -> (String, PortRole) {
        let roles = locked(&self.roles);
        let found = match guest {
            Some(guest) => roles.get_key_value(guest),
            None if roles.len() == 1 => roles.iter().next(),
            None => None,
        };
        match found {
            Some((guest, role)) => (guest.clone(), role.clone()),
            None => (guest.unwrap_or_default().to_owned(), PortRole::None),
        }
    }

    fn accept(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(%err, listen = %self.listen, "cannot accept a connection on the peer port");
                    std::thread::sleep(CONNECT_RETRY);
                    continue;
                }
            };
            use std::sync::atomic::Ordering;
            if self.serving.fetch_add(1, Ordering::SeqCst) >= MAX_PEER_CONNECTIONS {
                self.serving.fetch_sub(1, Ordering::SeqCst);
                tracing::debug!(listen = %self.listen, "too many connections on the peer port: one closed unread");
                continue;
            }
            let port = self.clone();
            let spawned = std::thread::Builder::new()
                .name("peer-conn".into())
                .spawn(move || {
                    vmm_core::jail::enter(vmm_core::jail::ThreadKind::Link);
                    port.opening(conn);
                    port.serving.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.serving.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// A connection says what it is: a `role` query is answered, a standby's `hello` is
    /// shipped to if the guest runs here.
    fn opening(&self, tcp: TcpStream) {
        let peer = tcp.peer_addr().map_or("?".into(), |a| a.to_string());
        let conn = match self.security.accept(tcp, OPENING_PATIENCE) {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(%peer, listen = %self.listen, %err, "a connection to the peer port did not authenticate: closed, nothing sent");
                return;
            }
        };
        let Ok(reading) = conn.try_clone() else {
            return;
        };
        let _ = conn.set_read_timeout(Some(OPENING_PATIENCE));
        let mut reader = BufReader::new(reading);
        let mut buf = Vec::new();
        let opening = match read_line::<Opening>(&mut reader, &mut buf) {
            Ok(Some(opening)) => opening,
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(%peer, %err, "an unreadable connection to the peer port");
                return;
            }
        };
        let asked = match &opening {
            Opening::Role { guest } => guest.as_deref(),
            Opening::Hello { guest, .. } => Some(guest.as_str()),
        };
        let (named, role) = self.role(asked);
        let mut conn = conn;
        match (opening, role) {
            (Opening::Role { .. }, role) => {
                let (role, guest) = match role {
                    PortRole::Active(side) => ("active", side.guest.clone()),
                    PortRole::Promoting(guest) => ("active", guest),
                    PortRole::HandedOver(guest) => ("handed-over", guest),
                    PortRole::Standby(guest) => ("standby", guest),
                    PortRole::None => ("standby", named),
                };
                let role = PeerRole {
                    role: role.into(),
                    guest,
                };
                let _ = write_line(&mut conn, &role);
            }
            (Opening::Hello { pid, guest }, PortRole::Active(side)) if guest == side.guest => {
                let _ = conn.set_read_timeout(None);
                lifecycle!(info, "remote-standby-connected", guest = %guest, %peer, standby_pid = pid, "a remote standby connected");
                if let Err(why) = side.ship(conn, reader, pid) {
                    tracing::warn!(guest = %guest, %peer, %why, "the remote standby's session ended");
                }
            }
            (Opening::Hello { guest, .. }, _) => {
                let why = format!("guest {guest} does not run on this host");
                let _ = write_line(&mut conn, &ToRemote::Refused { why });
            }
        }
    }
}

/// The active's side of a remote guest: the shipper's settings.
pub(crate) struct ActiveSide {
    guest: String,
    /// Its peer port's address.
    listen: SocketAddr,
    /// The guest's attach socket, which the shipper connects to.
    socket: PathBuf,
    /// The active's console, shared with the guest's loop.
    console: Arc<Mutex<SerialSink>>,
    ack_timeout: Duration,
    /// The session being shipped, if any.
    current: Mutex<Option<Arc<Mutex<Shipped>>>>,
}

/// What one shipping session has sent and released.
struct Shipped {
    journal: Option<Arc<Journal>>,
    unacked: VecDeque<Unacked>,
    /// The last epoch whose output the shipper released.
    released: u64,
    /// Set once the shipper must release nothing more (the session ended, or the guest's
    /// loop took the release over).
    halted: bool,
    /// Whether `take_over` went out whole.
    told: bool,
    /// The last epoch whose record went out whole.
    sent: u64,
    /// Whether the session is over (nothing more will be sent).
    over: bool,
    /// When the whole batch had gone out, and when the standby said it had loaded it: the
    /// standby acknowledges nothing while it loads, so epochs count as unacknowledged only
    /// from then.
    batch_sent: Option<Instant>,
    ready: Option<Instant>,
}

/// How long a remote standby may take to load a batch once it has all of it.
const LOAD_PATIENCE: Duration = Duration::from_secs(60);

struct Unacked {
    seq: u64,
    offset: u64,
    len: u64,
    output: Vec<u8>,
    sent: Instant,
}

/// The shipper of `guest`'s journal to remote standbys, listening on `remote.listen`.
pub(crate) fn serve_active(
    guest: &str,
    journal: &JournalConfig,
    remote: &RemoteConfig,
    console: Arc<Mutex<SerialSink>>,
) -> Result<Arc<ActiveSide>, String> {
    let port = port(guest, remote.listen, &remote.security)?;
    // A guest started here afresh (not promoted here) must not run on the peer already:
    // two `understudy run`s of one guest on two hosts would be two guests.
    let fresh = matches!(port.role(Some(guest)).1, PortRole::None);
    if fresh {
        if let Ok(role) = query_role(&remote.peer, guest, &remote.security, PEER_PATIENCE) {
            if role.role == "active" {
                return Err(format!(
                    "the peer {} runs guest {guest} already: not starting it here too (start a standby here with `understudy standby`)",
                    remote.peer
                ));
            }
        }
    }
    let side = Arc::new(ActiveSide {
        guest: guest.to_owned(),
        listen: remote.listen,
        socket: journal.socket.clone(),
        console,
        ack_timeout: Duration::from_millis(remote.ack_timeout_ms),
        current: Mutex::new(None),
    });
    port.set(guest, PortRole::Active(side.clone()));
    Ok(side)
}

impl ActiveSide {
    /// The guest's loop takes the release of output back (the session is over, or the guest
    /// ended): nothing more is released by the shipper. Returns the last epoch it released.
    pub fn halt(&self) -> u64 {
        match locked(&self.current).as_ref() {
            Some(shipped) => {
                let mut shipped = locked(shipped);
                shipped.halted = true;
                shipped.released
            }
            None => 0,
        }
    }

    /// Waits up to `patience` for the `take_over` of the current session to have gone out
    /// (or the session to be over).
    pub fn wait_told(&self, patience: Duration) -> bool {
        self.wait_for(patience, |s| s.told || s.over);
        locked(&self.current)
            .as_ref()
            .is_none_or(|s| locked(s).told)
    }

    /// Waits up to `patience` for the record of epoch `seq` to have gone out (or the
    /// session to be over): the process may end once it has.
    pub fn wait_sent(&self, seq: u64, patience: Duration) -> bool {
        self.wait_for(patience, |s| s.sent >= seq || s.over)
    }

    fn wait_for(&self, patience: Duration, done: impl Fn(&Shipped) -> bool) -> bool {
        let deadline = Instant::now() + patience;
        loop {
            let finished = locked(&self.current)
                .as_ref()
                .is_none_or(|s| done(&locked(s)));
            if finished || Instant::now() >= deadline {
                return finished;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// This process's guest is fenced: the port answers `handed-over` from now on.
    pub fn handed_over(&self) {
        if let Some(port) = port_at(self.listen) {
            port.set(&self.guest, PortRole::HandedOver(self.guest.clone()));
        }
    }

    /// Ships the journal to the remote standby on `tcp` (whose hello was read off
    /// `reader`) until the session ends.
    fn ship(&self, tcp: PeerStream, reader: BufReader<PeerStream>, pid: u32) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        // Shipping is bulk work: the guest's own threads come first (the acknowledgements'
        // thread, started from here, inherits this).
        crate::background::lower_priority();
        let _ = tcp.set_nodelay(true);
        // A write that makes no progress for this long (the link is down) ends the session,
        // as an epoch left unacknowledged does.
        let _ = tcp.set_write_timeout(Some(self.ack_timeout));
        let busy = locked(&self.current)
            .as_ref()
            .is_some_and(|s| !locked(s).halted);
        if busy {
            let why = "another standby follows this guest".to_owned();
            let mut tcp = tcp;
            let _ = write_line(&mut tcp, &ToRemote::Refused { why: why.clone() });
            return Err(why);
        }
        let mut local = UnixStream::connect(&self.socket)
            .map_err(|e| format!("attach socket {}: {e}", self.socket.display()))?;
        let hello = ToActive::Hello {
            pid,
            guest: self.guest.clone(),
        };
        send(&mut local, &hello).map_err(|e| err(&e))?;
        let shipped = Arc::new(Mutex::new(Shipped {
            journal: None,
            unacked: VecDeque::new(),
            released: 0,
            halted: false,
            told: false,
            sent: 0,
            over: false,
            batch_sent: None,
            ready: None,
        }));
        *locked(&self.current) = Some(shipped.clone());
        let writer = Arc::new(Mutex::new(tcp.try_clone().map_err(|e| err(&e))?));
        let acks = {
            let (local, writer, shipped) = (
                local.try_clone().map_err(|e| err(&e))?,
                writer.clone(),
                shipped.clone(),
            );
            let (console, ack_timeout, tcp) = (
                self.console.clone(),
                self.ack_timeout,
                tcp.try_clone().map_err(|e| err(&e))?,
            );
            std::thread::Builder::new()
                .name("remote-acks".into())
                .spawn(move || {
                    vmm_core::jail::enter(vmm_core::jail::ThreadKind::Link);
                    acknowledgements(reader, tcp, local, writer, shipped, console, ack_timeout)
                })
                .map_err(|e| err(&e))?
        };
        let result = self.forward(&mut local, &writer, &shipped);
        if let Err(why) = &result {
            // The guest's loop hears why, unless the acknowledgements' side told it first.
            let halted = std::mem::replace(&mut locked(&shipped).halted, true);
            if !halted {
                let why = format!(
                    "the remote standby at {}: {why}",
                    tcp.peer_addr().map_or("?".into(), |a| a.to_string())
                );
                let _ = send(&mut local, &ToActive::Refused { why });
            }
        }
        let _ = tcp.shutdown(Shutdown::Both);
        let _ = local.shutdown(Shutdown::Both);
        let _ = acks.join();
        let mut ended = locked(&shipped);
        ended.halted = true;
        ended.over = true;
        result
    }

    /// What the guest's loop says to its standby goes to the remote one, with the journal
    /// bytes it names.
    fn forward(
        &self,
        local: &mut UnixStream,
        writer: &Mutex<PeerStream>,
        shipped: &Mutex<Shipped>,
    ) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        // A write the link did not take within the timeout reads as what it is.
        let wrote = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("it took no data for {} ms", self.ack_timeout.as_millis())
            }
            _ => e.to_string(),
        };
        let mut lines = Lines::default();
        loop {
            let messages = match lines.read::<ToStandby>(local) {
                Ok(messages) => messages,
                Err(LinkError::Closed) => return Ok(()),
                Err(e) => return Err(err(&e)),
            };
            for message in messages {
                let journal = locked(shipped).journal.clone();
                let mut out = locked(writer);
                match message {
                    ToStandby::Journal {
                        identifier,
                        path,
                        pid,
                        ..
                    } => {
                        let opened =
                            Arc::new(Journal::open(&path, identifier).map_err(|e| err(&e))?);
                        let header = *opened.header();
                        locked(shipped).journal = Some(opened);
                        let journal = ToRemote::Journal {
                            identifier,
                            guest: self.guest.clone(),
                            memory: header.memory,
                            size: header.size,
                            pid,
                        };
                        write_line(&mut *out, &journal).map_err(wrote)?;
                    }
                    ToStandby::Batch { seq } => {
                        let journal = journal.ok_or("a batch before a journal")?;
                        send_data(&mut out, &journal, PAGE, journal.records_start())
                            .map_err(wrote)?;
                        write_line(&mut *out, &ToRemote::Batch { seq }).map_err(wrote)?;
                        locked(shipped).batch_sent = Some(Instant::now());
                        // The remote has the image; this host's copy is given back.
                        journal.release_batch_ram();
                    }
                    ToStandby::Record { seq, offset } => {
                        let journal = journal.ok_or("a record before a journal")?;
                        let record = journal.read_record(offset, seq).map_err(|e| err(&e))?;
                        locked(shipped).unacked.push_back(Unacked {
                            seq,
                            offset,
                            len: record.len,
                            output: record.output,
                            sent: Instant::now(),
                        });
                        send_range(&mut out, &journal, offset, record.len).map_err(wrote)?;
                        write_line(&mut *out, &ToRemote::Record { seq, offset }).map_err(wrote)?;
                        locked(shipped).sent = seq;
                    }
                    ToStandby::TakeOver { why, .. } => {
                        let released = {
                            let mut shipped = locked(shipped);
                            shipped.halted = true;
                            shipped.released
                        };
                        self.handed_over();
                        write_line(&mut *out, &ToRemote::TakeOver { why, released })
                            .map_err(wrote)?;
                        let _ = out.flush();
                        locked(shipped).told = true;
                        return Ok(());
                    }
                    ToStandby::Refused { why } => {
                        let _ = write_line(&mut *out, &ToRemote::Refused { why: why.clone() });
                        return Err(format!("the guest's loop ended the session: {why}"));
                    }
                    // Only a relay says these, to its follower.
                    ToStandby::Released { .. } | ToStandby::Boot {} => {}
                }
            }
        }
    }
}

/// Sends the data of `journal` between `from` and `to` (holes are skipped) as `bytes`
/// frames.
fn send_data(out: &mut PeerStream, journal: &Journal, from: u64, to: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = journal.file().as_raw_fd();
    let mut at = from;
    while at < to {
        // SAFETY: lseek on a descriptor the journal owns; no memory is passed.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(());
            }
            return Err(err);
        }
        let data = data as u64;
        if data >= to {
            return Ok(());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let end = if hole < 0 { to } else { (hole as u64).min(to) };
        send_range(out, journal, data, end - data)?;
        at = end;
    }
    Ok(())
}

/// Sends `len` bytes of `journal` at `offset` as one `bytes` frame.
fn send_range(
    out: &mut PeerStream,
    journal: &Journal,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    write_line(out, &ToRemote::Bytes { offset, len })?;
    out.send_file(journal.file(), offset, len)
}

/// The remote standby's answers: each acknowledged epoch's output is released here and the
/// standby told so; the guest's loop hears of it. An epoch left unacknowledged for
/// `ack_timeout` ends the session.
fn acknowledgements(
    mut reader: BufReader<PeerStream>,
    tcp: PeerStream,
    mut local: UnixStream,
    writer: Arc<Mutex<PeerStream>>,
    shipped: Arc<Mutex<Shipped>>,
    console: Arc<Mutex<SerialSink>>,
    ack_timeout: Duration,
) {
    let _ = tcp.set_read_timeout(Some(ACK_CHECK));
    let peer = tcp.peer_addr().map_or("?".into(), |a| a.to_string());
    let mut buf = Vec::new();
    let why = loop {
        let message = match read_line::<ToActive>(&mut reader, &mut buf) {
            Ok(Some(message)) => message,
            Ok(None) => break "the remote standby closed the connection".to_owned(),
            Err(err) if timed_out(&err) => {
                let shipped = locked(&shipped);
                match (shipped.batch_sent, shipped.ready) {
                    (Some(sent), None) if sent.elapsed() >= LOAD_PATIENCE => {
                        break format!(
                            "the remote standby at {peer} did not load the batch in {} s",
                            LOAD_PATIENCE.as_secs()
                        );
                    }
                    (_, Some(ready)) => {
                        // An epoch sent while the standby loaded counts from its ready.
                        let late = shipped
                            .unacked
                            .front()
                            .is_some_and(|u| u.sent.max(ready).elapsed() >= ack_timeout);
                        if late {
                            break format!(
                                "the remote standby at {peer} acknowledged no epoch for {} ms",
                                ack_timeout.as_millis()
                            );
                        }
                    }
                    _ => {}
                }
                continue;
            }
            Err(err) => break format!("the remote standby's connection: {err}"),
        };
        match message {
            ToActive::Applied { seq } => {
                {
                    // The epochs' output is written and the standby told so back to back,
                    // the connection taken first: a death of this process between the two
                    // is the one case where the standby releases an epoch's output again.
                    // (The connection is taken before the session's record, as the
                    // forwarding side takes them.)
                    let mut out = locked(&writer);
                    let mut shipped = locked(&shipped);
                    if shipped.halted {
                        continue;
                    }
                    let mut console = locked(&console);
                    let mut done = Vec::new();
                    while shipped.unacked.front().is_some_and(|u| u.seq <= seq) {
                        let Some(acked) = shipped.unacked.pop_front() else {
                            break;
                        };
                        // A console that cannot be written must not stop the guest.
                        let _ = console.write_all(&acked.output);
                        done.push((acked.offset, acked.len));
                    }
                    let _ = console.flush();
                    let _ = write_line(&mut *out, &ToRemote::Released { seq });
                    drop((console, out));
                    shipped.released = seq;
                    if let Some(journal) = &shipped.journal {
                        journal.set_released(seq);
                        for (offset, len) in done {
                            journal.release_range(offset, len);
                        }
                    }
                }
                if send(&mut local, &ToActive::Applied { seq }).is_err() {
                    break "the guest's loop closed the session".into();
                }
            }
            ToActive::Hello { .. } => {}
            ToActive::Ready { seq } => {
                locked(&shipped).ready = Some(Instant::now());
                if send(&mut local, &ToActive::Ready { seq }).is_err() {
                    break "the guest's loop closed the session".into();
                }
            }
            other => {
                if send(&mut local, &other).is_err() {
                    break "the guest's loop closed the session".into();
                }
            }
        }
    };
    // Nothing is released here from now on: the guest's loop releases the rest.
    // The guest's loop hears why before the session's connections close.
    let halted = std::mem::replace(&mut locked(&shipped).halted, true);
    if !halted {
        let _ = send(&mut local, &ToActive::Refused { why });
    }
    let _ = tcp.shutdown(Shutdown::Both);
}

/// What a relay knows of the guest it follows, for `role` and `promote`.
#[derive(Debug, Default)]
struct RelayState {
    /// The follower loaded a batch of the current journal.
    loaded: bool,
    /// A journal is announced and its batch not loaded yet.
    syncing: bool,
    /// The last epoch the follower applied.
    epoch: Option<u64>,
    /// When the active last sent anything.
    heard: Option<Instant>,
    connected: bool,
    /// The active said its machine is fenced.
    handed_over: bool,
    promoted: bool,
    /// Journals told to the follower that it has not said `opened` to yet: until it has
    /// opened the last, what it says is about an earlier one, and goes nowhere.
    opening: u32,
}

/// The standby's side of a remote guest: follows the active over TCP and feeds the
/// follower through a journal of its own.
pub struct Relay {
    guest: String,
    memory: u64,
    remote: RemoteConfig,
    journal: JournalConfig,
    state: Mutex<RelayState>,
    /// The session's connection, for promote to cut.
    session: Mutex<Option<PeerStream>>,
    /// Held while a frame is being written to the journal or told to the follower.
    frame: Mutex<()>,
    /// The connection to the follower (all writes to it).
    follower: Mutex<Option<UnixStream>>,
    /// The guest's active lock on this host, held until a promote.
    lock: Mutex<Option<ActiveLock>>,
    listener: Mutex<Option<UnixListener>>,
}

/// What a promote did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promoted {
    /// This process runs the guest already.
    Already,
    /// The follower resumes the guest from this epoch.
    Resuming(u64),
    /// Nothing was loaded: the guest boots.
    Booting,
}

/// A relay's answer to `role`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRole {
    /// `following`, `holding`, `handed-over`, `syncing` or `empty`.
    pub state: &'static str,
    /// The last epoch applied.
    pub epoch: Option<u64>,
    /// The promotion score.
    pub score: i64,
}

impl Relay {
    /// Starts following `config`'s active at its `peer`: takes the guest's active lock on
    /// this host, binds the attach socket the follower connects to, and answers `role` on
    /// `listen`.
    pub fn start(
        config: &GuestConfig,
        journal: &JournalConfig,
        remote: &RemoteConfig,
    ) -> Result<Arc<Relay>, String> {
        let remote = remote.clone();
        // A process of this guest that is ending (a demoted active, a standby restarted)
        // holds the lock, the socket and the port until its last thread is gone: they are
        // waited for, a while.
        let lock = ActiveLock::take_within(&journal.path, RESTART_PATIENCE)
            .map_err(|e| format!("{}: {e}", ActiveLock::path(&journal.path).display()))?
            .ok_or_else(|| {
                format!(
                    "another process runs or follows this guest on this host: it holds {}",
                    ActiveLock::path(&journal.path).display()
                )
            })?;
        let listener = within(RESTART_PATIENCE, || {
            crate::control::bind_owner_only(&journal.socket).map_err(|e| match e {
                crate::control::ControlError::InUse(_) => Retry::Again(e.to_string()),
                other => Retry::Fail(other.to_string()),
            })
        })
        .map_err(|e| format!("{}: {e}", journal.socket.display()))?;
        let accepting = listener.try_clone().map_err(|e| e.to_string())?;
        let port = port(&config.name, remote.listen, &remote.security)?;
        port.set(&config.name, PortRole::Standby(config.name.clone()));
        let relay = Arc::new(Relay {
            guest: config.name.clone(),
            memory: config.memory_mib << 20,
            remote,
            journal: journal.clone(),
            state: Mutex::new(RelayState::default()),
            session: Mutex::new(None),
            frame: Mutex::new(()),
            follower: Mutex::new(None),
            lock: Mutex::new(Some(lock)),
            listener: Mutex::new(Some(listener)),
        });
        let running = relay.clone();
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                vmm_core::jail::enter(vmm_core::jail::ThreadKind::Link);
                running.run(accepting)
            })
            .map_err(|e| e.to_string())?;
        Ok(relay)
    }

    /// What this standby holds, and how much the cluster should want it promoted.
    pub fn role(&self) -> RelayRole {
        let state = locked(&self.state);
        let silent = state.heard.is_none_or(|t| t.elapsed() > self.silence());
        let (name, score) = if state.loaded && state.handed_over {
            ("handed-over", GuestRole::SCORE_CURRENT)
        } else if state.loaded && state.connected && !silent {
            ("following", GuestRole::SCORE_CURRENT)
        } else if state.loaded {
            ("holding", GuestRole::SCORE_HOLDING)
        } else if state.syncing {
            ("syncing", GuestRole::SCORE_SYNCING)
        } else {
            ("empty", GuestRole::SCORE_EMPTY)
        };
        RelayRole {
            state: name,
            epoch: state.loaded.then_some(state.epoch).flatten(),
            score,
        }
    }

    /// How long the active may say nothing before this standby stops counting itself as
    /// following (the active drops a standby silent for `ack_timeout_ms`).
    fn silence(&self) -> Duration {
        Duration::from_millis(self.remote.ack_timeout_ms.saturating_mul(2))
            .max(Duration::from_secs(2))
    }

    /// Makes this standby the guest's active: refused while the peer answers as the
    /// guest's active, or does not answer and `peer_fenced` is not given. Otherwise the
    /// session with the old active is cut and the follower told to resume the guest from its
    /// last whole epoch (or to boot it, if it never loaded one).
    pub fn promote(&self, peer_fenced: bool) -> Result<Promoted, String> {
        if locked(&self.state).promoted {
            return Ok(Promoted::Already);
        }
        let peer = self.remote.peer.clone();
        let port = port_at(self.remote.listen);
        let set_port = |role: PortRole| {
            if let Some(port) = &port {
                port.set(&self.guest, role);
            }
        };
        // From here this process answers as the active: a peer promoted at the same time
        // finds it so and refuses.
        set_port(PortRole::Promoting(self.guest.clone()));
        let refused = match query_peer(&peer, &self.guest, &self.remote.security) {
            Ok(role) if role.role == "active" => Some(format!(
                "the peer {peer} answers as the active of guest {}: not promoting (demote it first, or fence its host)",
                role.guest
            )),
            Ok(_) => None,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => None,
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied && !peer_fenced => {
                Some(format!(
                    "the peer {peer} did not authenticate ({err}): what it answers is not believed; not promoting (it may still run the guest)"
                ))
            }
            Err(err) if !peer_fenced => Some(format!(
                "the peer {peer} does not answer ({err}) and is not known to be fenced: not promoting (it may still run the guest)"
            )),
            Err(err) => {
                tracing::warn!(guest = %self.guest, %peer, %err, "the peer does not answer; it is fenced, as the caller says: promoting");
                None
            }
        };
        if let Some(why) = refused {
            set_port(PortRole::Standby(self.guest.clone()));
            tracing::warn!(guest = %self.guest, %peer, %why, "promote refused");
            return Err(why);
        }
        // What the old active sent before it went is read to the end first (its last
        // records, what it said it released): the session ends on its own once the
        // connection's end arrives. One still open after a while (a fenced peer whose
        // connection never closed) is cut.
        let deadline = Instant::now() + SESSION_DRAIN;
        while locked(&self.session).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(session) = locked(&self.session).take() {
            tracing::debug!(guest = %self.guest, "the session with the old active is still open: cut");
            let _ = session.shutdown(Shutdown::Both);
        }
        // No frame is half-written from here on.
        let _frame = locked(&self.frame);
        let loaded = {
            let mut state = locked(&self.state);
            state.promoted = true;
            state.connected = false;
            state.loaded.then_some(state.epoch).flatten()
        };
        // The follower takes the lock and binds the attach socket as the guest's active.
        drop(locked(&self.listener).take());
        let _ = std::fs::remove_file(&self.journal.socket);
        drop(locked(&self.lock).take());
        let mut follower = locked(&self.follower);
        let follower = follower.as_mut().ok_or("the follower is not attached")?;
        let (message, promoted) = match loaded {
            Some(epoch) => (
                ToStandby::TakeOver {
                    why: "promoted".into(),
                    failovers: Vec::new(),
                },
                Promoted::Resuming(epoch),
            ),
            None => (ToStandby::Boot {}, Promoted::Booting),
        };
        send(follower, &message).map_err(|e| e.to_string())?;
        lifecycle!(warn, "promoted", guest = %self.guest, %peer, peer_fenced, resume_epoch = ?loaded, "promoted: this host runs the guest from now on");
        Ok(promoted)
    }

    fn run(self: Arc<Self>, listener: UnixListener) {
        // Bulk work, below the follower and, on a shared host, below the guests.
        crate::background::lower_priority();
        let follower = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(err) => {
                tracing::error!(guest = %self.guest, %err, "the follower could not attach to the relay");
                return;
            }
        };
        drop(listener);
        let Ok(reading) = follower.try_clone() else {
            return;
        };
        *locked(&self.follower) = Some(follower);
        let answers = self.clone();
        let _ = std::thread::Builder::new()
            .name("relay-answers".into())
            .spawn(move || {
                vmm_core::jail::enter(vmm_core::jail::ThreadKind::Link);
                answers.answers(reading)
            });
        let peer = self.remote.peer.clone();
        let (mut waiting_said, mut unauthenticated_said) = (false, false);
        while !locked(&self.state).promoted {
            let tcp = match peer
                .resolve()
                .and_then(|addr| TcpStream::connect_timeout(&addr, PEER_PATIENCE))
            {
                Ok(tcp) => tcp,
                Err(err) => {
                    if !waiting_said {
                        tracing::info!(guest = %self.guest, %peer, %err, "waiting for the guest's active on the peer");
                        waiting_said = true;
                    }
                    std::thread::sleep(CONNECT_RETRY);
                    continue;
                }
            };
            waiting_said = false;
            let tcp = match self.remote.security.connect(tcp, PEER_PATIENCE) {
                Ok(tcp) => tcp,
                Err(err) => {
                    if !unauthenticated_said {
                        tracing::warn!(guest = %self.guest, %peer, %err, "the peer did not authenticate: no session (its certificate must be signed by tls_ca)");
                        unauthenticated_said = true;
                    }
                    std::thread::sleep(CONNECT_RETRY);
                    continue;
                }
            };
            let why = self.session(tcp);
            let was = std::mem::replace(&mut locked(&self.state).connected, false);
            locked(&self.session).take();
            if locked(&self.state).promoted {
                return;
            }
            if was {
                unauthenticated_said = false;
                lifecycle!(warn, "remote-active-lost", guest = %self.guest, %peer, %why, "the session with the active ended; holding the last epoch until promoted or a new session starts");
            } else if why.starts_with(REFUSED_BY_PEER) {
                if !unauthenticated_said {
                    tracing::warn!(guest = %self.guest, %peer, %why, "the peer did not accept this host's certificate: no session (it must be signed by the peer's tls_ca)");
                    unauthenticated_said = true;
                }
            } else {
                tracing::debug!(guest = %self.guest, %peer, %why, "no session with the peer");
            }
            std::thread::sleep(CONNECT_RETRY);
        }
    }

    /// One session with the active at the peer; returns why it ended.
    fn session(&self, tcp: PeerStream) -> String {
        let _ = tcp.set_nodelay(true);
        // Until this standby has loaded a batch, the active may be building one (a 1 GiB
        // guest's takes seconds on a busy host) and sends nothing meanwhile: it is given as
        // long as it gives a standby to load one. Once following, a silence is judged by
        // `silence()`.
        let _ = tcp.set_read_timeout(Some(LOAD_PATIENCE));
        let (mut batch_seen, mut following) = (false, false);
        let Ok(mut writer) = tcp.try_clone() else {
            return "cannot use the connection".into();
        };
        let hello = Opening::Hello {
            pid: std::process::id(),
            guest: self.guest.clone(),
        };
        if let Err(err) = write_line(&mut writer, &hello) {
            return err.to_string();
        }
        *locked(&self.session) = Some(writer);
        let mut reader = BufReader::new(tcp);
        let mut buf = Vec::new();
        let mut journal: Option<Journal> = None;
        loop {
            let message = match read_line::<ToRemote>(&mut reader, &mut buf) {
                Ok(Some(message)) => message,
                Ok(None) => return "the active closed the connection".into(),
                Err(LinkError::Io(err))
                    if reader.get_ref().is_tls()
                        && err.kind() == std::io::ErrorKind::InvalidData
                        && !locked(&self.state).connected =>
                {
                    return format!("{REFUSED_BY_PEER}: {err}");
                }
                Err(err) if timed_out(&err) => {
                    let patience = if following {
                        self.silence()
                    } else {
                        LOAD_PATIENCE
                    };
                    return format!("the active sent nothing for {} ms", patience.as_millis());
                }
                Err(err) => return err.to_string(),
            };
            let _frame = locked(&self.frame);
            if locked(&self.state).promoted {
                return "promoted".into();
            }
            batch_seen |= matches!(message, ToRemote::Batch { .. });
            if !following && batch_seen && locked(&self.state).loaded {
                following = true;
                let _ = reader.get_ref().set_read_timeout(Some(self.silence()));
            }
            if let ToRemote::Refused { why } = &message {
                // A peer that stands by itself answers so: no session was had.
                return format!("the peer refused: {why}");
            }
            {
                let mut state = locked(&self.state);
                state.heard = Some(Instant::now());
                state.connected = true;
            }
            let told = match message {
                ToRemote::Journal {
                    identifier,
                    guest,
                    memory,
                    size,
                    pid,
                } => {
                    if guest != self.guest || memory != self.memory || size != self.journal.size {
                        let why = format!(
                            "the active runs guest {guest} with {} MiB of RAM and a journal of {} MiB; this standby is for guest {} with {} MiB and a journal of {} MiB (both hosts must describe the guest alike)",
                            memory >> 20,
                            size >> 20,
                            self.guest,
                            self.memory >> 20,
                            self.journal.size >> 20
                        );
                        self.tell(&ToStandby::Refused { why: why.clone() });
                        return why;
                    }
                    match Journal::create(&self.journal.path, identifier, memory, size) {
                        Ok(made) => journal = Some(made),
                        Err(err) => return err.to_string(),
                    }
                    {
                        let mut state = locked(&self.state);
                        state.loaded = false;
                        state.syncing = true;
                        state.handed_over = false;
                        state.epoch = None;
                        state.opening += 1;
                    }
                    lifecycle!(info, "remote-journal", guest = %self.guest, identifier, active_pid = pid, "the active started a journal for this standby");
                    self.tell(&ToStandby::Journal {
                        identifier,
                        path: self.journal.path.clone(),
                        pid,
                        failovers: Vec::new(),
                    })
                }
                ToRemote::Bytes { offset, len } => {
                    let Some(journal) = journal.as_ref() else {
                        return "bytes before a journal".into();
                    };
                    let size = journal.header().size;
                    if offset < PAGE || offset.checked_add(len).is_none_or(|end| end > size) {
                        return format!(
                            "{len} bytes at {offset} do not fit a journal of {size} bytes past its header"
                        );
                    }
                    if let Err(err) = receive(&mut reader, journal, offset, len) {
                        return format!("the journal's bytes: {err}");
                    }
                    true
                }
                ToRemote::Batch { seq } => self.tell(&ToStandby::Batch { seq }),
                ToRemote::Record { seq, offset } => self.tell(&ToStandby::Record { seq, offset }),
                ToRemote::Released { seq } => self.tell(&ToStandby::Released { seq }),
                ToRemote::TakeOver { why, released } => {
                    locked(&self.state).handed_over = true;
                    lifecycle!(warn, "remote-handed-over", guest = %self.guest, %why, released, "the active is fenced and handed the guest over: promote this standby to resume it");
                    self.tell(&ToStandby::Released { seq: released })
                }
                ToRemote::Refused { .. } => true,
            };
            if !told {
                return "the follower is gone".into();
            }
        }
    }

    /// Tells the follower `message`; false if it is gone.
    fn tell(&self, message: &ToStandby) -> bool {
        match locked(&self.follower).as_mut() {
            Some(follower) => send(follower, message).is_ok(),
            None => false,
        }
    }

    /// The follower's answers go to the active of the current session.
    fn answers(&self, mut reading: UnixStream) {
        let mut lines = Lines::default();
        loop {
            let messages = match lines.read::<ToActive>(&mut reading) {
                Ok(messages) => messages,
                Err(_) => return,
            };
            for message in messages {
                {
                    let mut state = locked(&self.state);
                    match &message {
                        ToActive::Opened {} => {
                            state.opening = state.opening.saturating_sub(1);
                            if state.opening > 0 {
                                continue;
                            }
                        }
                        ToActive::Refused { .. } => {}
                        _ if state.opening > 0 => continue,
                        ToActive::Ready { seq } | ToActive::Applied { seq } => {
                            state.loaded = true;
                            state.syncing = false;
                            state.epoch = Some(*seq);
                        }
                        ToActive::Hello { .. } => continue,
                    }
                }
                if let Some(session) = locked(&self.session).as_mut() {
                    let _ = write_line(session, &message);
                }
            }
        }
    }
}

/// Reads `len` bytes off the connection into `journal` at `offset`.
fn receive(
    reader: &mut BufReader<PeerStream>,
    journal: &Journal,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(chunk.len() as u64) as usize;
        reader.read_exact(&mut chunk[..want])?;
        journal.file().write_all_at(&chunk[..want], offset + done)?;
        done += want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_mangled_frames_are_errors_not_panics() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let valid: Vec<u8> = [
            serde_json::to_vec(&ToRemote::Record {
                seq: 3,
                offset: 8192,
            })
            .unwrap(),
            serde_json::to_vec(&Opening::Hello {
                pid: 1,
                guest: "g".into(),
            })
            .unwrap(),
        ]
        .join(&b'\n');
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..200 {
            let mut bytes = valid.clone();
            for _ in 0..(next() % 8) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            if round % 3 == 0 {
                bytes = (0..next() % 300).map(|_| next() as u8).collect();
            }
            bytes.push(b'\n');
            let mut client = TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            client.write_all(&bytes).unwrap();
            drop(client);
            let mut reader = BufReader::new(PeerStream::plain(server));
            let mut buf = Vec::new();
            // Each line reads as a frame or as an error, and the stream ends.
            for _ in 0..bytes.len() + 1 {
                match read_line::<ToRemote>(&mut reader, &mut buf) {
                    Ok(None) => break,
                    Ok(Some(_)) | Err(LinkError::Garbled(_)) => {}
                    Err(err) => panic!("round {round}: {err}"),
                }
            }
        }
    }

    #[test]
    fn frames_read_back_as_written_and_a_role_query_of_a_closed_port_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let sent = [
            ToRemote::Bytes {
                offset: 4096,
                len: 3,
            },
            ToRemote::TakeOver {
                why: "hang".into(),
                released: 7,
            },
        ];
        write_line(&mut client, &sent[0]).unwrap();
        client.write_all(b"abc").unwrap();
        write_line(&mut client, &sent[1]).unwrap();
        client.write_all(b"{\"record\":{\"seq\":\"x\"}}\n").unwrap();
        drop(client);
        let mut reader = BufReader::new(PeerStream::plain(server));
        let mut buf = Vec::new();
        assert_eq!(
            read_line::<ToRemote>(&mut reader, &mut buf).unwrap(),
            Some(sent[0].clone())
        );
        let mut payload = [0u8; 3];
        reader.read_exact(&mut payload).unwrap();
        assert_eq!(&payload, b"abc");
        assert_eq!(
            read_line::<ToRemote>(&mut reader, &mut buf).unwrap(),
            Some(sent[1].clone())
        );
        assert!(matches!(
            read_line::<ToRemote>(&mut reader, &mut buf),
            Err(LinkError::Garbled(_))
        ));
        assert!(matches!(
            read_line::<ToRemote>(&mut reader, &mut buf),
            Ok(None)
        ));
        drop(listener);
        let peer = PeerAddress::parse(&addr.to_string()).unwrap();
        let refused = query_role(&peer, "g", &LinkSecurity::Insecure, PEER_PATIENCE).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
