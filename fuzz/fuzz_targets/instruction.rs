//! The `ldmxcsr`/`stmxcsr` decoder of refused-instruction completion, over code bytes and
//! registers: see `vmm_core::host_limits::fuzz::instruction` for how the input is read.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_core::host_limits::fuzz::instruction(data);
});
