//! The metrics endpoint: `GET /metrics` over HTTP/1.x on a TCP listener, answered with the
//! same Prometheus text as the control socket's `metrics` request, for a Prometheus server to
//! scrape. One thread serves one connection at a time (scrapes are rare and small); a client
//! that sends nothing within a few seconds is dropped. Everything else gets 404 or 405.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::protocol::{MetricsText, Request};
use super::server::RequestQueue;

/// The longest request head read.
const MAX_HEAD_BYTES: usize = 8192;

/// How long a client may take to send its request or take the reply.
const CLIENT_PATIENCE: Duration = Duration::from_secs(5);

/// A metrics listener being served; dropping it stops the thread.
pub struct MetricsEndpoint {
    listener: TcpListener,
    queue: RequestQueue,
}

impl MetricsEndpoint {
    /// Serves `listener` on a thread of its own, asking `queue` for the metrics.
    pub fn serve(listener: TcpListener, queue: RequestQueue) -> std::io::Result<Self> {
        let accepting = listener.try_clone()?;
        let asking = queue.clone();
        std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                vmm_core::jail::enter(vmm_core::jail::ThreadKind::Control);
                for stream in accepting.incoming() {
                    if asking.stopping() {
                        return;
                    }
                    if let Ok(stream) = stream {
                        answer(stream, &asking);
                    }
                }
            })?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics served at http://{addr}/metrics");
        }
        Ok(MetricsEndpoint { listener, queue })
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.queue.stop();
        // SAFETY: the fd is the live listener this struct owns; shutting it down wakes accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn answer(mut stream: TcpStream, queue: &RequestQueue) {
    let _ = stream.set_read_timeout(Some(CLIENT_PATIENCE));
    let _ = stream.set_write_timeout(Some(CLIENT_PATIENCE));
    let Some(head) = read_head(&mut stream) else {
        return;
    };
    let mut words = head.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = match (method, target.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            let reply = queue.ask(Request::Metrics {});
            queue.delivered();
            let text = reply
                .result
                .and_then(|r| serde_json::from_value::<MetricsText>(r).ok());
            match text {
                Some(metrics) => ("200 OK", metrics.text),
                None => (
                    "503 Service Unavailable",
                    reply.message.unwrap_or_default() + "\n",
                ),
            }
        }
        ("GET", _) => ("404 Not Found", "metrics are at /metrics\n".into()),
        _ => ("405 Method Not Allowed", "only GET is served\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// The request line, once the whole head has arrived.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD_BYTES {
            return None;
        }
        let n = stream.read(&mut buf).ok().filter(|&n| n > 0)?;
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next()?;
    Some(String::from_utf8_lossy(line).into_owned())
}
