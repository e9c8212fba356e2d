//! What a test's peer makes of the `net` kernel's datagrams (kernels/README.md).

use std::sync::atomic::{AtomicBool, Ordering};

/// Tells the peer's reader to stop once the datagrams stop coming, when dropped.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Every `seq N` payload the peer received.
pub fn sequence_numbers(datagrams: &[Vec<u8>]) -> Vec<u64> {
    datagrams
        .iter()
        .map(|d| {
            let text = String::from_utf8_lossy(d);
            text.trim()
                .strip_prefix("seq ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("the peer received {text:?}, not a numbered datagram"))
        })
        .collect()
}
