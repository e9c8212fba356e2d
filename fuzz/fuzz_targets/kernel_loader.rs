//! ELF and bzImage kernels with an initrd and a command line, loaded into a small guest RAM:
//! see `vmm_core::boot::fuzz::kernel_loader` for how the input is read.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm_core::boot::fuzz::kernel_loader(data);
});
