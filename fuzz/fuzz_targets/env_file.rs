//! Environment-file parsing and validation, and the read-back of what `understudy check`
//! prints, on a thread that cannot change files: see `failover::config::fuzz::env_file`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = failover::config::fuzz::env_file(data);
});
