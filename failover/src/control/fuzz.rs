//! The entry point of the control-line fuzz target (`fuzz/fuzz_targets/control_line.rs`):
//! the fuzzer's bytes as what a client sends on the control socket, served as a connection
//! serves them (lines read through a buffer, blank ones skipped, each parsed as a request,
//! every reply written back), with the requests carried out by a stand-in that answers each
//! with itself. Whatever the bytes, nothing may panic, and the replies must be what the
//! protocol promises: one per line that is not blank, in order, each one line of JSON; a line
//! longer than the limit ends the connection with `too-long`; a request survives being
//! written out and read back.

use std::cell::{Cell, RefCell};
use std::io::{BufReader, Read};

use super::protocol::{parse_request, ErrorKind, Reply, Request, MAX_REQUEST_BYTES};
use super::server::{serve_lines, Carry};

/// How many bytes each read of the socket returns, picked by the input's length: single
/// bytes, a few, a packet, a page, everything the buffer takes.
const PIECES: [usize; 5] = [1, 3, 64, 4096, 1 << 20];

/// Serves `data` as one connection's bytes and returns the requests carried out and the
/// replies written, in order.
pub fn control_line(data: &[u8]) -> (Vec<Request>, Vec<Reply>) {
    let piece = PIECES[data.len() % PIECES.len()];
    let carry = Echo::default();
    let mut written = Vec::new();
    serve_lines(
        &mut BufReader::new(Pieces { data, piece }),
        &mut written,
        &carry,
    );
    let requests = carry.requests.into_inner();
    assert_eq!(
        carry.delivered.get(),
        requests.len(),
        "every reply to a request carried out is delivered"
    );
    // What the protocol says the replies are, from the lines found without the server's
    // reader, `Echo` answering each request with itself.
    let expected: Vec<Reply> = lines_served(data)
        .into_iter()
        .map(|line| match line.map(parse_request) {
            Some(Ok(request)) => Reply::ok(request),
            Some(Err(reply)) => reply,
            None => Reply::error(
                ErrorKind::TooLong,
                format!("a request line is at most {MAX_REQUEST_BYTES} bytes"),
            ),
        })
        .collect();
    let text = String::from_utf8(written).expect("replies are UTF-8");
    let replies: Vec<Reply> = text
        .split_inclusive('\n')
        .map(|line| {
            assert!(line.ends_with('\n'), "a reply {line:?} without its newline");
            serde_json::from_str(line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
        })
        .collect();
    assert_eq!(
        replies, expected,
        "one reply per line that is not blank, in order"
    );
    for request in &requests {
        let line = serde_json::to_vec(request).expect("a request is JSON");
        assert_eq!(
            parse_request(&line).as_ref(),
            Ok(request),
            "{request:?} written as {}",
            String::from_utf8_lossy(&line)
        );
    }
    for reply in &replies {
        assert!(
            reply.ok
                || matches!(
                    reply.error,
                    Some(ErrorKind::NotJson | ErrorKind::BadRequest | ErrorKind::TooLong)
                ),
            "{reply:?}: only the line itself can be at fault here"
        );
    }
    (requests, replies)
}

/// The lines of `data` a connection answers, found without the server's reader: each line
/// that is not blank, in order, and `None` for a line longer than [`MAX_REQUEST_BYTES`],
/// which is the last; a last line without its newline is not answered.
fn lines_served(data: &[u8]) -> Vec<Option<&[u8]>> {
    let mut lines = Vec::new();
    let mut rest = data;
    loop {
        match rest.iter().position(|&b| b == b'\n') {
            Some(end) if end < MAX_REQUEST_BYTES => {
                let line = &rest[..end];
                if !line.iter().all(u8::is_ascii_whitespace) {
                    lines.push(Some(line));
                }
                rest = &rest[end + 1..];
            }
            None if rest.len() <= MAX_REQUEST_BYTES => return lines,
            _ => {
                lines.push(None);
                return lines;
            }
        }
    }
}

/// A client's bytes arriving in pieces of at most `piece` bytes, as a socket may deliver them.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Carries out nothing: answers each request with the request itself.
#[derive(Default)]
struct Echo {
    requests: RefCell<Vec<Request>>,
    delivered: Cell<usize>,
}

impl Carry for Echo {
    fn ask(&self, request: Request) -> Reply {
        self.requests.borrow_mut().push(request.clone());
        Reply::ok(request)
    }

    fn delivered(&self) {
        self.delivered.set(self.delivered.get() + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_core::seeded_inputs::{seeds, Inputs};

    /// Pieces of JSON and of the protocol that mutations insert.
    const WORDS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"",
        "\\",
        "\n",
        " ",
        "\r\n",
        "null",
        "true",
        "1e999",
        "-0",
        "18446744073709551616",
        "\"request\"",
        "\"status\"",
        "\"fault\"",
        "\"guest\"",
        "\"kind\"",
        "\"mce\"",
        "\"path\"",
        "\"snapshot\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "{\"request\":",
        "\u{feff}",
    ];

    #[test]
    fn the_seeds_are_served_as_the_api_documents() {
        for (name, seed) in seeds("control_line") {
            let (requests, replies) = control_line(&seed);
            let lines = seed
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            match name.as_str() {
                "session" => {
                    assert_eq!(requests.len(), lines - 1, "{name}: all but `status`");
                    assert_eq!(replies[4].error, Some(ErrorKind::NotJson), "{name}");
                }
                _ => assert_eq!(
                    (requests.len(), replies.len()),
                    (lines, lines),
                    "{name}: every line is a request"
                ),
            }
        }
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_served_and_one_more_byte_is_too_long() {
        let line = |len: usize| {
            let mut line = br#"{"request": "status", "pad": ""#.to_vec();
            line.resize(len - 3, b'x');
            line.extend_from_slice(b"\"}\n");
            line
        };
        let (requests, replies) = control_line(&line(MAX_REQUEST_BYTES));
        assert_eq!(requests.len() + replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].error, Some(ErrorKind::BadRequest));
        let mut input = b"{\"request\": \"status\"}\n".to_vec();
        input.extend(line(MAX_REQUEST_BYTES + 1));
        input.extend_from_slice(b"{\"request\": \"status\"}\n");
        let (requests, replies) = control_line(&input);
        assert_eq!(
            requests,
            [Request::Status {}],
            "the connection ends at the long line"
        );
        assert_eq!(replies[1].error, Some(ErrorKind::TooLong));
    }

    /// A bounded run of what the fuzz target does, on every build: random bytes and random
    /// changes to the documented requests. None may panic or break what `control_line`
    /// checks.
    #[test]
    fn random_and_mutated_request_lines_get_the_replies_the_protocol_promises() {
        let mut inputs = Inputs::new(0x5eed_c7e1);
        let seeds: Vec<(String, String)> = seeds("control_line")
            .into_iter()
            .map(|(name, bytes)| (name, String::from_utf8(bytes).expect("text seeds")))
            .collect();
        let mut carried_out = 0;
        for round in 0..3000 {
            let input = if round % 4 == 0 {
                inputs.random(256)
            } else {
                let (_, seed) = &seeds[inputs.below(seeds.len())];
                inputs.mutated_text(seed.as_bytes(), WORDS)
            };
            carried_out += control_line(&input).0.len();
        }
        assert!(
            carried_out > 500,
            "the mutations were never requests ({carried_out})"
        );
    }
}
