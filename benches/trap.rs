//! What finishing a half-done `syscall` costs where the host needs it (docs/linux.md): per
//! system call, and per page fault with and without the trap over the page-fault handler
//! (every page fault takes it). Each figure is the mean over a loop of user-mode system calls
//! or page faults in a small VM, three runs in a row; on a host that runs `syscall` itself it
//! says so and measures nothing.
//!
//! Run: `cargo bench --bench trap` (optionally `-- ITERATIONS`, default 5000).

use vmm_core::host_limits::measure_trap_costs;

fn main() {
    let iterations = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    println!("trap: {iterations} rounds per figure, microseconds per round");
    println!("run  syscall  page fault (trap)  page fault (no trap)  added per fault");
    for run in 1..=3 {
        match measure_trap_costs(iterations) {
            Ok(Some(costs)) => {
                let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
                println!(
                    "{run:>3}  {:>7.1}  {:>17.1}  {:>20.1}  {:>15.1}",
                    us(costs.syscall),
                    us(costs.page_fault_trapped),
                    us(costs.page_fault_untrapped),
                    us(costs.page_fault_trapped) - us(costs.page_fault_untrapped)
                );
            }
            Ok(None) => {
                println!("this host runs `syscall` from user mode itself: no trap to measure");
                return;
            }
            Err(err) => {
                eprintln!("trap benchmark failed: {err}");
                std::process::exit(1);
            }
        }
    }
}
