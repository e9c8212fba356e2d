//! A snapshot's state file, parsed as loading a snapshot parses it, as it is and resealed:
//! see `vmm_core::snapshot_fuzz::state_file` for what is checked.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm_core::snapshot_fuzz::state_file(data);
});
