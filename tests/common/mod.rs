//! Helpers shared by the integration tests: where the test kernels are, a console transcript
//! that can be waited on, and a clear failure where KVM is missing.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Generous bound for anything a guest should do "soon": CI machines are slow and shared.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Path of a test kernel built by build.rs.
pub fn kernel(name: &str) -> PathBuf {
    PathBuf::from(env!("UNDERSTUDY_KERNELS")).join(name)
}

/// Fails the test with a clear message when this machine cannot run VMs.
pub fn require_kvm() {
    if let Err(err) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests boot real VMs and need read/write access to /dev/kvm: {err}");
    }
}

/// A console sink that records everything and lets a test wait for text to appear.
#[derive(Clone, Default)]
pub struct Transcript {
    inner: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl Transcript {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.inner.0.lock().unwrap()).into_owned()
    }

    /// Waits until `done(text)` holds, failing with `what` and the transcript after
    /// [`PATIENCE`].
    pub fn wait_until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        let (lock, cvar) = &*self.inner;
        let mut bytes = lock.lock().unwrap();
        loop {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if done(&text) {
                return text;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!("timed out waiting for {what}; console so far:\n{text}");
            }
            bytes = cvar.wait_timeout(bytes, deadline - now).unwrap().0;
        }
    }

    /// Boxed as a vmm-core serial sink.
    pub fn sink(&self) -> Box<dyn Write + Send> {
        Box::new(self.clone())
    }
}

impl Write for Transcript {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (lock, cvar) = &*self.inner;
        lock.lock().unwrap().extend_from_slice(buf);
        cvar.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The values N of every complete line starting `prefix N`, in order. A line still being
/// printed (no newline yet) is left out.
pub fn numbers_after(text: &str, prefix: &str) -> Vec<u64> {
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Asserts that `values` is exactly `first, first+1, first+2, ...`.
pub fn assert_consecutive(values: &[u64], what: &str) {
    for pair in values.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "{what}: {} followed by {} (values: {values:?})",
            pair[0],
            pair[1]
        );
    }
}
