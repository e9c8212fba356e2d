//! The control socket's request lines, read and answered as a connection does: see
//! `failover::control::fuzz::control_line` for what is checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    failover::control::fuzz::control_line(data);
});
