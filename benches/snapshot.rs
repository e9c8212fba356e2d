//! Cost of moving a running guest between two machines of one process, for 64 MiB and
//! 1 GiB guests: saving the complete vCPU/VM/device state, loading it into a fresh machine,
//! and — separately — copying guest RAM, next to a plain memcpy of the same size measured in
//! the same run (the physical limit of any copy).
//!
//! Run: `cargo bench --bench snapshot` (optionally `-- RUNS`).

mod common;

use common::median;

use std::path::Path;
use std::time::{Duration, Instant};

use vmm_core::{BootSource, MachineSpec, Vm};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn spec(memory_mib: u64) -> MachineSpec {
    MachineSpec {
        name: "bench".into(),
        memory_mib,
        vcpus: 1,
        hidden_cpu_features: vec![],
        dirty_tracking: false,
        dirty_ring: false,
    }
}

fn measure(memory_mib: u64, runs: usize) {
    let kernel = Path::new(env!("UNDERSTUDY_KERNELS")).join("counter");
    let source = BootSource {
        kernel,
        initrd: None,
        cmdline: "interval_ms=1000".into(),
    };
    let active = Vm::create(&spec(memory_mib), Box::new(std::io::sink())).expect("create");
    active.boot(&source).expect("boot");
    active.resume().expect("start");
    let target = Vm::create(&spec(memory_mib), Box::new(std::io::sink())).expect("create");
    let (mut pauses, mut saves, mut restores, mut copies, mut memcpys) =
        (vec![], vec![], vec![], vec![], vec![]);
    let size = (memory_mib << 20) as usize;
    let mut src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    for run in 0..runs {
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        active.pause().expect("pause");
        pauses.push(t.elapsed());
        let t = Instant::now();
        let snapshot = active.save().expect("save");
        saves.push(t.elapsed());
        let t = Instant::now();
        target.restore(&snapshot).expect("restore");
        restores.push(t.elapsed());
        let t = Instant::now();
        target.ram().copy_from(active.ram());
        copies.push(t.elapsed());
        src[run] = run as u8; // keep the copy from being optimised away
        let t = Instant::now();
        dst.copy_from_slice(&src);
        memcpys.push(t.elapsed());
        active.resume().expect("resume");
    }
    std::hint::black_box(&dst);
    println!(
        "{memory_mib:>5} MiB: pause {:.3} ms, save state {:.3} ms, restore state {:.3} ms, \
         copy RAM {:.2} ms, memcpy {:.2} ms (medians of {runs})",
        ms(median(pauses)),
        ms(median(saves)),
        ms(median(restores)),
        ms(median(copies)),
        ms(median(memcpys)),
    );
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    measure(64, runs);
    measure(1024, runs);
}
