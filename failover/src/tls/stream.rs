//! A connection between the two hosts of a remote guest: TLS over TCP, or plain TCP with
//! `insecure = true`. The threads of one session share it: one reads, the others write
//! (each write is whole: records go out in the order they were sealed), and the reading
//! side never holds the TLS state while it waits for the network, so a blocked writer does
//! not keep the reader from taking what arrives, nor the other way round.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::TlsError;

/// How much is read off the socket at once for TLS.
const READ_CHUNK: usize = 256 << 10;
/// How much of a file is sealed and sent at once over TLS: large writes keep the cost per
/// byte close to plaintext's `sendfile`.
const FILE_CHUNK: usize = 1 << 20;

/// One end of a connection between the hosts; clones share it.
pub struct PeerStream {
    inner: Inner,
}

enum Inner {
    Plain(TcpStream),
    Tls(Arc<Session>),
}

struct Session {
    tcp: TcpStream,
    conn: Mutex<rustls::Connection>,
    /// Held by whoever sends: sealed records waiting to be written, in order.
    sending: Mutex<Vec<u8>>,
    /// Held by whoever reads: bytes off the socket not yet given to rustls.
    inbound: Mutex<Inbound>,
}

/// Bytes read off the socket: `buf[start..end]` are not yet given to rustls.
struct Inbound {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream")
            .field("peer", &self.peer_addr().ok())
            .field("tls", &self.is_tls())
            .finish()
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl PeerStream {
    /// Plain TCP, as `insecure = true` asks.
    pub fn plain(tcp: TcpStream) -> PeerStream {
        PeerStream {
            inner: Inner::Plain(tcp),
        }
    }

    /// `conn` over `tcp`, once its handshake is done within `patience`: the peer's
    /// certificate is verified by then (the listening side's verdict on this host's own
    /// reaches a connecting host with its first read).
    pub(super) fn tls(
        mut tcp: TcpStream,
        mut conn: rustls::Connection,
        patience: Duration,
    ) -> Result<PeerStream, TlsError> {
        let failed = |tcp: &TcpStream, source| TlsError::Handshake {
            peer: tcp.peer_addr().map_or("?".into(), |a| a.to_string()),
            source,
        };
        let timeouts = |tcp: &TcpStream, t| {
            tcp.set_read_timeout(t)
                .and_then(|()| tcp.set_write_timeout(t))
        };
        timeouts(&tcp, Some(patience)).map_err(|e| failed(&tcp, e))?;
        while conn.is_handshaking() {
            if let Err(err) = conn.complete_io(&mut tcp) {
                return Err(failed(&tcp, err));
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut tcp).map_err(|e| failed(&tcp, e))?;
        }
        timeouts(&tcp, None).map_err(|e| failed(&tcp, e))?;
        // Whole writes are sealed at once (see `Session::write`).
        conn.set_buffer_limit(None);
        Ok(PeerStream {
            inner: Inner::Tls(Arc::new(Session {
                tcp,
                conn: Mutex::new(conn),
                sending: Mutex::new(Vec::new()),
                inbound: Mutex::new(Inbound {
                    buf: vec![0; READ_CHUNK].into_boxed_slice(),
                    start: 0,
                    end: 0,
                }),
            })),
        })
    }

    fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(tcp) => tcp,
            Inner::Tls(session) => &session.tcp,
        }
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<PeerStream> {
        let inner = match &self.inner {
            Inner::Plain(tcp) => Inner::Plain(tcp.try_clone()?),
            Inner::Tls(session) => Inner::Tls(session.clone()),
        };
        Ok(PeerStream { inner })
    }

    /// Whether the connection is encrypted and its peer authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// As [`TcpStream::set_read_timeout`] (shared by every handle).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.tcp().set_read_timeout(timeout)
    }

    /// As [`TcpStream::set_write_timeout`] (shared by every handle).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.tcp().set_write_timeout(timeout)
    }

    /// As [`TcpStream::set_nodelay`].
    pub fn set_nodelay(&self, nodelay: bool) -> std::io::Result<()> {
        self.tcp().set_nodelay(nodelay)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    /// Ends the connection under every handle (a blocked read returns).
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        self.tcp().shutdown(how)
    }

    /// Sends `len` bytes of `file` at `offset`: `sendfile` on plain TCP, sealed 1 MiB at a
    /// time over TLS.
    pub fn send_file(&mut self, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.inner {
            Inner::Plain(tcp) => send_file_plain(tcp, file, offset, len),
            Inner::Tls(session) => {
                let mut chunk = vec![0u8; (len as usize).min(FILE_CHUNK)];
                let mut done = 0u64;
                while done < len {
                    let want = (len - done).min(chunk.len() as u64) as usize;
                    file.read_exact_at(&mut chunk[..want], offset + done)
                        .map_err(|e| match e.kind() {
                            std::io::ErrorKind::UnexpectedEof => std::io::Error::new(
                                e.kind(),
                                "the journal is shorter than its record",
                            ),
                            _ => e,
                        })?;
                    session.write(&chunk[..want])?;
                    done += want as u64;
                }
                Ok(())
            }
        }
    }
}

/// `sendfile` from `file` to the socket: the kernel copies, nothing passes through here.
fn send_file_plain(tcp: &TcpStream, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut at = offset as libc::off_t;
    let end = offset + len;
    while (at as u64) < end {
        let left = (end - at as u64).min(1 << 30) as usize;
        // SAFETY: sendfile copies from the file's descriptor to the socket's; `at` is a
        // valid offset it advances.
        let sent = unsafe { libc::sendfile(tcp.as_raw_fd(), file.as_raw_fd(), &mut at, left) };
        if sent < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if sent == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the journal is shorter than its record",
            ));
        }
    }
    Ok(())
}

impl Session {
    /// Seals `data` and writes it whole, 1 MiB of records at a time.
    fn write(&self, data: &[u8]) -> std::io::Result<()> {
        let mut sealed = locked(&self.sending);
        for chunk in data.chunks(FILE_CHUNK) {
            sealed.clear();
            {
                let mut conn = locked(&self.conn);
                conn.writer().write_all(chunk)?;
                while conn.wants_write() {
                    conn.write_tls(&mut *sealed)?;
                }
            }
            (&self.tcp).write_all(&sealed)?;
        }
        Ok(())
    }

    /// Writes what rustls has to say on its own (an alert, a key update's answer).
    fn send_pending(&self) -> std::io::Result<()> {
        let mut sealed = locked(&self.sending);
        sealed.clear();
        {
            let mut conn = locked(&self.conn);
            while conn.wants_write() {
                conn.write_tls(&mut *sealed)?;
            }
        }
        (&self.tcp).write_all(&sealed)
    }

    /// Reads what the peer sent: gives rustls what arrived until it has plaintext, and
    /// waits on the socket (without holding the TLS state) while it has none.
    fn read(&self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut inbound = locked(&self.inbound);
        let inbound = &mut *inbound;
        loop {
            let (got, must_send) = {
                let mut conn = locked(&self.conn);
                while inbound.start < inbound.end && conn.wants_read() {
                    let n = conn.read_tls(&mut &inbound.buf[inbound.start..inbound.end])?;
                    if n == 0 {
                        break;
                    }
                    inbound.start += n;
                    if let Err(err) = conn.process_new_packets() {
                        // The connection is broken for good; the peer hears why if it can.
                        inbound.start = inbound.end;
                        drop(conn);
                        let _ = self.send_pending();
                        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, err));
                    }
                }
                let got = match conn.reader().read(out) {
                    Ok(n) => Some(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                    // Closed without a close_notify: as the end of a TCP stream (the
                    // framing above says whether anything was cut short).
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Some(0),
                    Err(e) => return Err(e),
                };
                (got, conn.wants_write())
            };
            if must_send {
                self.send_pending()?;
            }
            if let Some(n) = got {
                return Ok(n);
            }
            // Room at the end for what comes next (what is left moves to the front only when
            // the end is reached).
            if inbound.start == inbound.end {
                (inbound.start, inbound.end) = (0, 0);
            } else if inbound.end == inbound.buf.len() {
                inbound.buf.copy_within(inbound.start..inbound.end, 0);
                (inbound.start, inbound.end) = (0, inbound.end - inbound.start);
            }
            let n = (&self.tcp).read(&mut inbound.buf[inbound.end..])?;
            if n == 0 {
                return Ok(0);
            }
            inbound.end += n;
        }
    }
}

impl Read for PeerStream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(tcp) => tcp.read(out),
            Inner::Tls(session) => session.read(out),
        }
    }
}

impl Write for PeerStream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(tcp) => tcp.write(data),
            Inner::Tls(session) => session.write(data).map(|()| data.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            Inner::Plain(tcp) => tcp.flush(),
            // Every write went out whole.
            Inner::Tls(_) => Ok(()),
        }
    }
}
