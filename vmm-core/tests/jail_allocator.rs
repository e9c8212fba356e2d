//! glibc's allocator reads `/proc/sys/vm/overcommit_memory` the first time any thread's heap
//! shrinks, on whichever thread that is. Under a filter that may not open files (a device
//! I/O thread, a vCPU thread), that read would kill the process with `SIGSYS`: the jail has it
//! made before any filter is installed. Its own test binary, so the process starts with the
//! allocator's state untouched.

use vmm_core::jail::{self, ThreadKind};

#[test]
fn a_filtered_thread_whose_heap_shrinks_is_not_killed() {
    // Allocates pieces below the mmap threshold (so they come from the thread's own heap) and
    // frees them from the top down: the heap's top is then trimmed.
    fn churn() -> usize {
        let mut pieces: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 60_000]).collect();
        let total = pieces.iter().map(|p| p.len()).sum();
        while pieces.pop().is_some() {}
        total
    }
    let freed = std::thread::Builder::new()
        .name("jail-churn".into())
        .spawn(|| {
            jail::try_enter(ThreadKind::DeviceIo).expect("the device I/O filter installs");
            (0..4).map(|_| churn()).sum::<usize>()
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(freed, 4 * 64 * 60_000);
}
