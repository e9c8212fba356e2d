//! The control socket: a Unix stream socket served by its own threads. The accept thread
//! takes connections; each connection gets a thread that reads request lines, hands each
//! parsed request to the supervisor (a channel, plus an eventfd that wakes its loop) and
//! writes the reply back. These threads touch no guest: every request is carried out on the
//! supervisor thread, one at a time, between the events it watches. A client can only ever
//! cost its own connection: bad lines get an error reply, an oversized line or a stalled
//! reader closes the connection, and clients beyond [`MAX_CLIENTS`] are turned away.

use std::io::{BufRead, BufReader, ErrorKind as IoErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{parse_request, ErrorKind, Reply, Request, MAX_REQUEST_BYTES};

/// Clients served at once; more are answered `busy` and closed.
pub const MAX_CLIENTS: usize = 16;

/// How long a connection waits for the supervisor's answer. Generous: a snapshot of a large
/// guest writes its whole RAM before it answers.
const REPLY_PATIENCE: Duration = Duration::from_secs(300);

/// A client that does not take its reply within this long is dropped.
const WRITE_PATIENCE: Duration = Duration::from_secs(10);

/// When serving stops, how long replies already decided (a `shutdown`'s own) may take to
/// reach their clients.
const DRAIN_PATIENCE: Duration = Duration::from_secs(2);

/// The control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another live instance answers on the path.
    #[error("control socket {0}: another understudy is already serving it")]
    InUse(PathBuf),
    /// Something that is not a socket is at the path; it is left alone.
    #[error("control socket {0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The OS refused.
    #[error("control socket {path}: {step}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A request waiting for the supervisor, with where its reply goes.
pub struct PendingRequest {
    /// The request.
    pub request: Request,
    /// Where the reply goes; the asking thread waits on the other end.
    pub reply: SyncSender<Reply>,
}

/// The way from the front ends (the control socket, the metrics endpoint) to the supervisor:
/// a channel of requests and an eventfd written whenever one is queued. Cloned into every
/// thread that asks.
#[derive(Clone)]
pub struct RequestQueue {
    requests: Sender<PendingRequest>,
    wake: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    /// Requests asked whose replies are not yet delivered.
    in_flight: Arc<AtomicUsize>,
}

impl RequestQueue {
    /// A queue, and the receiving end the supervisor drains.
    pub fn new() -> std::io::Result<(RequestQueue, Receiver<PendingRequest>)> {
        let (requests, receiver) = std::sync::mpsc::channel();
        let queue = RequestQueue {
            requests,
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            stopping: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        Ok((queue, receiver))
    }

    /// Written whenever a request is waiting.
    pub fn wake(&self) -> &EventFd {
        &self.wake
    }

    /// Asks the supervisor and waits for its reply. Call [`RequestQueue::delivered`] once
    /// the reply has been passed on (or could not be).
    pub fn ask(&self, request: Request) -> Reply {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let unavailable = || Reply::error(ErrorKind::Unavailable, "understudy is shutting down");
        if self.stopping.load(Ordering::SeqCst) {
            return unavailable();
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        if self
            .requests
            .send(PendingRequest { request, reply })
            .is_err()
        {
            return unavailable();
        }
        let _ = self.wake.write(1);
        answer.recv_timeout(REPLY_PATIENCE).unwrap_or_else(|_| {
            Reply::error(
                ErrorKind::Unavailable,
                "the supervisor did not answer (shutting down?)",
            )
        })
    }

    /// The reply of an [`RequestQueue::ask`] has reached its client, or never will.
    pub fn delivered(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether serving is ending.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Refuses further requests, then gives replies already decided (a `shutdown`'s own) a
    /// moment to reach their clients.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + DRAIN_PATIENCE;
        while self.in_flight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A bound control socket, not yet served. Removes its path when dropped.
pub struct ControlSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ControlSocket {
    /// Binds `path` with mode 0600. A socket already there is replaced only if nothing answers
    /// on it (a previous instance that did not clean up); anything else there is refused.
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        Ok(ControlSocket {
            path: path.to_owned(),
            listener: bind_owner_only(path)?,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts serving: each request goes to `queue`. Serving stops when the returned handle
    /// is dropped.
    pub fn serve(self, queue: RequestQueue) -> Result<Serving, ControlError> {
        let listener = self
            .listener
            .try_clone()
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                step: "clone listener",
                source,
            })?;
        let accept = Acceptor {
            listener,
            queue: queue.clone(),
            clients: Arc::new(AtomicUsize::new(0)),
        };
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || {
                vmm_core::jail::enter(vmm_core::jail::ThreadKind::Control);
                accept.run()
            })
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                step: "start the accept thread",
                source,
            })?;
        tracing::info!(path = %self.path.display(), "control socket listening");
        Ok(Serving {
            socket: self,
            queue,
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A control socket being served. Dropping it stops the accept thread and removes the path;
/// connections still open get `unavailable` for any further request.
pub struct Serving {
    socket: ControlSocket,
    queue: RequestQueue,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.queue.stop();
        // Shutting a listening socket down makes a blocked accept() return at once (Linux).
        // SAFETY: the fd is the live listener this struct owns.
        unsafe { libc::shutdown(self.socket.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

struct Acceptor {
    listener: UnixListener,
    queue: RequestQueue,
    clients: Arc<AtomicUsize>,
}

impl Acceptor {
    fn run(self) {
        loop {
            let accepted = self.listener.accept();
            if self.queue.stopping() {
                return;
            }
            let mut stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == IoErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::warn!(%err, "control socket: accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let _ = stream.set_write_timeout(Some(WRITE_PATIENCE));
            if self.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                self.clients.fetch_sub(1, Ordering::SeqCst);
                let busy = Reply::error(
                    ErrorKind::Busy,
                    format!("more than {MAX_CLIENTS} clients are connected"),
                );
                let _ = stream.write_all(busy.to_line().as_bytes());
                continue;
            }
            let connection = Connection {
                queue: self.queue.clone(),
            };
            let clients = self.clients.clone();
            let spawned = std::thread::Builder::new()
                .name("control-client".into())
                .spawn(move || {
                    vmm_core::jail::enter(vmm_core::jail::ThreadKind::Control);
                    connection.run(stream);
                    clients.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(err) = spawned {
                self.clients.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(%err, "control socket: cannot serve a client");
            }
        }
    }
}

struct Connection {
    queue: RequestQueue,
}

/// Where a connection's requests are carried out: the supervisor, through a
/// [`RequestQueue`]; or, for the control-line fuzz target, a stand-in.
pub(super) trait Carry {
    /// Carries out `request` and returns its reply.
    fn ask(&self, request: Request) -> Reply;
    /// The reply of a [`Carry::ask`] has reached its client, or never will.
    fn delivered(&self);
}

impl Carry for RequestQueue {
    fn ask(&self, request: Request) -> Reply {
        RequestQueue::ask(self, request)
    }

    fn delivered(&self) {
        RequestQueue::delivered(self)
    }
}

/// One line read from a client.
enum Line {
    /// A line, without its newline.
    Complete(Vec<u8>),
    /// More than [`MAX_REQUEST_BYTES`] without a newline.
    TooLong,
    /// The client closed the connection (or it failed); a line it did not finish is lost.
    Closed,
}

impl Connection {
    fn run(self, stream: UnixStream) {
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        serve_lines(&mut BufReader::new(stream), writer, &self.queue);
    }
}

/// Serves one connection: reads request lines from `reader` until it closes or a line is too
/// long, has `carry` carry out each request, and writes every reply to `writer`.
pub(super) fn serve_lines(reader: &mut impl BufRead, mut writer: impl Write, carry: &impl Carry) {
    loop {
        let reply = match read_line(reader) {
            Line::Closed => return,
            Line::TooLong => {
                let reply = Reply::error(
                    ErrorKind::TooLong,
                    format!("a request line is at most {MAX_REQUEST_BYTES} bytes"),
                );
                let _ = writer.write_all(reply.to_line().as_bytes());
                return;
            }
            Line::Complete(line) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Complete(line) => match parse_request(&line) {
                Ok(request) => {
                    let reply = carry.ask(request);
                    let written = writer.write_all(reply.to_line().as_bytes());
                    carry.delivered();
                    if written.is_err() {
                        // The client left or stopped reading; the request was carried out.
                        return;
                    }
                    continue;
                }
                Err(reply) => reply,
            },
        };
        if writer.write_all(reply.to_line().as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads up to a newline, never holding more than [`MAX_REQUEST_BYTES`].
fn read_line(reader: &mut impl BufRead) -> Line {
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok([]) => return Line::Closed,
            Ok(bytes) => bytes,
            Err(err) if err.kind() == IoErrorKind::Interrupted => continue,
            Err(_) => return Line::Closed,
        };
        let (taken, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (available.len(), false),
        };
        if line.len() + taken > MAX_REQUEST_BYTES {
            return Line::TooLong;
        }
        line.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if complete {
            line.pop();
            return Line::Complete(line);
        }
    }
}

/// Binds a Unix socket at `path`, owner-only from its first moment, replacing a stale socket
/// nobody answers on; a live one, or a path that is not a socket, is refused.
pub fn bind_owner_only(path: &Path) -> Result<UnixListener, ControlError> {
    bind_at(path, Occupant::RefuseLive)
}

/// Binds a Unix socket at `path` as [`bind_owner_only`] does, replacing whatever socket is
/// there, answering or not: for a caller that has proved nobody else may serve the path
/// (the holder of a guest's active lock, whose predecessor may still be dying with its
/// listener open). A path that is not a socket is still refused.
pub fn bind_owner_only_replacing(path: &Path) -> Result<UnixListener, ControlError> {
    bind_at(path, Occupant::Replace)
}

/// What to do with a socket already at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Occupant {
    /// Refuse one that answers; replace one that does not.
    RefuseLive,
    /// Replace it.
    Replace,
}

fn bind_at(path: &Path, occupant: Occupant) -> Result<UnixListener, ControlError> {
    let io = |step| {
        let path = path.to_owned();
        move |source| ControlError::Io { path, step, source }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if occupant == Occupant::RefuseLive && UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            match std::fs::remove_file(path) {
                Ok(()) => {}
                // Removed by its dying owner in the meantime.
                Err(err) if err.kind() == IoErrorKind::NotFound => {}
                Err(err) => return Err(io("remove stale socket")(err)),
            }
        }
        Ok(_) => return Err(ControlError::NotASocket(path.to_owned())),
        Err(err) if err.kind() == IoErrorKind::NotFound => {}
        Err(err) => return Err(io("inspect path")(err)),
    }
    // Bind under a umask that leaves the socket owner-only from its first moment. The mask
    // is the process's: a file another thread creates in this instant is owner-only too,
    // which is never less safe.
    // SAFETY: umask only swaps the process file-creation mask.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(io("bind"))?;
    // Belt and braces, should the file system ignore the umask for sockets.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("set mode 0600"))?;
    Ok(listener)
}
