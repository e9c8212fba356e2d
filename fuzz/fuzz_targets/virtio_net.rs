//! virtio-net receive and transmit queue handling against guest memory the fuzzer fills:
//! see `vmm_core::devices::virtio::fuzz::net_queues` for how the input is read.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_core::devices::virtio::fuzz::net_queues(data);
});
