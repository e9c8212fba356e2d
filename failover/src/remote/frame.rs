//! One control line of the remote link: a JSON message ended by a newline, written whole,
//! and read back through a buffer that keeps a partial line across timeouts. The payload of
//! a `bytes` frame is not a line: its writer and its reader handle it.
//!
//! Runs on whichever thread owns the connection (the link's threads: `peer-conn`,
//! `remote-acks`, `relay`, `relay-answers`, and a `role` query's caller); it keeps no state.

use std::io::{BufRead, BufReader, Write};

use serde::{Deserialize, Serialize};

use crate::link::LinkError;
use crate::tls::PeerStream;

/// The longest control line on the connection.
const MAX_LINE: usize = 64 << 10;

/// Writes one control line.
pub(super) fn write_line<M: Serialize>(out: &mut impl Write, message: &M) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// Reads one control line into `buf` (kept across calls: a read that times out keeps what
/// it had). `Ok(None)` at the end of the stream.
pub(super) fn read_line<M: for<'de> Deserialize<'de>>(
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

pub(super) fn timed_out(err: &LinkError) -> bool {
    matches!(err, LinkError::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    use crate::remote::{Opening, ToRemote};

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
}
