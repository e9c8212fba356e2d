//! What an active process and a standby process of a guest say to each other over the
//! attach socket, one JSON object per line. The bulk (pages, states, output) goes through
//! the take-over journal ([`crate::journal`]); these messages only announce and acknowledge.
//!
//! ```text
//! standby                                   active
//!   hello {pid, guest}            ->
//!                                 <-        journal {identifier, path, pid}   (file created)
//!   (opens it, checks identifier)
//!   opened {}                     ->
//!                                 <-        batch {seq}    (full image written)
//!   (loads the batch)
//!   ready {seq}                   ->        failover armed
//!                                 <-        record {seq, offset}   every epoch
//!   applied {seq}                 ->
//! ```
//! `take_over {why}`: the active's machine failed (or a switchover was asked for) and is
//! fenced; the standby resumes the guest from its last record. Either side may send
//! `refused {why}` and close. A `journal` message with a new identifier means the writer
//! started afresh: the standby drops what it had. Who may run the guest is decided by the
//! guest's [`ActiveLock`], not by these messages.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// From the standby process to the active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToActive {
    /// A standby announces itself, for `guest`.
    Hello {
        /// The standby's process.
        pid: u32,
        /// The guest it stands by for.
        guest: String,
    },
    /// The journal was opened and its identifier checked.
    Opened {},
    /// The batch of epoch `seq` is loaded: the standby can take over from now on.
    Ready {
        /// The batch's epoch.
        seq: u64,
    },
    /// Every record up to `seq` is applied (and its output released).
    Applied {
        /// The last applied epoch.
        seq: u64,
    },
    /// The standby will not go on.
    Refused {
        /// Why.
        why: String,
    },
}

/// From the active process to the standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToStandby {
    /// The journal the active writes, for this writer identifier.
    Journal {
        /// The writer's identifier, as in the journal's header.
        identifier: u64,
        /// The journal file.
        path: PathBuf,
        /// The active's process.
        pid: u32,
        /// When the guest failed over or restarted recently, in milliseconds since the Unix
        /// epoch, as the active's crash-loop guard counts them: a standby that takes the
        /// guest over carries on counting from these.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failovers: Vec<u64>,
    },
    /// The batch (a full image) of epoch `seq` is in the journal.
    Batch {
        /// Its epoch.
        seq: u64,
    },
    /// Epoch `seq`'s record is at `offset`.
    Record {
        /// Its epoch.
        seq: u64,
        /// Where it starts in the journal.
        offset: u64,
    },
    /// The active's machine failed, or a switchover was asked for, and it is fenced: the
    /// standby takes the guest over from the last record it has (once it holds the lock the
    /// active gave up), without waiting for the active's process to exit.
    TakeOver {
        /// What failed.
        why: String,
        /// What the active's crash-loop guard counts, this failure included (as in
        /// `journal`): the standby carries on counting from these.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failovers: Vec<u64>,
    },
    /// The active will not go on with this standby.
    Refused {
        /// Why.
        why: String,
    },
    /// From a remote standby's relay: the active released the output of every epoch up to
    /// `seq` (a remote standby releases output only once promoted).
    Released {
        /// The last released epoch.
        seq: u64,
    },
    /// From a remote standby's relay: promoted before any batch was loaded, this process
    /// boots the guest.
    Boot {},
}

pub use crate::active_lock::ActiveLock;

/// The longest line either side accepts.
const MAX_LINE: usize = 64 << 10;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer closed it.
    #[error("the other process closed the connection")]
    Closed,
    /// It failed.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer said something this side does not understand.
    #[error("unreadable message: {0}")]
    Garbled(String),
}

/// Lines off a stream, blocking or not.
#[derive(Default)]
pub struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    /// Reads what `stream` has (all of it, for a non-blocking stream; at least something, for
    /// a blocking one) and returns the complete messages. `Closed` once the peer has closed
    /// and every message before that was returned.
    pub fn read<M: for<'de> Deserialize<'de>>(
        &mut self,
        stream: &mut UnixStream,
    ) -> Result<Vec<M>, LinkError> {
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() > MAX_LINE && !self.buf.contains(&b'\n') {
                        return Err(LinkError::Garbled("a line too long".into()));
                    }
                    if self.buf.contains(&b'\n') {
                        // A blocking stream returns as soon as a message is whole.
                        let nonblocking = stream_nonblocking(stream);
                        if !nonblocking {
                            break;
                        }
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                // What arrived whole before the connection failed is read first.
                Err(_) if self.buf.contains(&b'\n') => {
                    closed = true;
                    break;
                }
                Err(err) => return Err(err.into()),
            }
        }
        let mut messages = Vec::new();
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let message = serde_json::from_slice(&line[..end])
                .map_err(|e| LinkError::Garbled(e.to_string()))?;
            messages.push(message);
        }
        if closed && messages.is_empty() {
            return Err(LinkError::Closed);
        }
        Ok(messages)
    }
}

fn stream_nonblocking(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

/// Sends one message as a line. A non-blocking stream whose buffer is full counts as
/// failed: these lines are small, and a peer that leaves them unread is not following.
pub fn send<M: Serialize>(stream: &mut UnixStream, message: &M) -> Result<(), LinkError> {
    let mut line = serde_json::to_vec(message).map_err(|e| LinkError::Garbled(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

/// The process at the other end of `stream`, as the kernel saw it connect.
pub fn peer_pid(stream: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, which is that large.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_sent_and_garbage_is_an_error() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        send(
            &mut a,
            &ToStandby::Record {
                seq: 3,
                offset: 8192,
            },
        )
        .unwrap();
        send(&mut a, &ToStandby::Batch { seq: 0 }).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut lines = Lines::default();
        let got: Vec<ToStandby> = lines.read(&mut b).unwrap();
        assert_eq!(
            got,
            [
                ToStandby::Record {
                    seq: 3,
                    offset: 8192
                },
                ToStandby::Batch { seq: 0 }
            ]
        );
        a.write_all(b"{\"record\":{\"seq\":\"x\"}}\n").unwrap();
        assert!(matches!(
            lines.read::<ToStandby>(&mut b),
            Err(LinkError::Garbled(_))
        ));
        drop(a);
        let mut lines = Lines::default();
        assert!(matches!(
            lines.read::<ToStandby>(&mut b),
            Err(LinkError::Closed)
        ));
        assert_eq!(peer_pid(&b).unwrap(), std::process::id());
    }
}
