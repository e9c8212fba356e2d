/* Heartbeats for hang_after_ms, then goes silent: a live but hung guest. Other CPUs spin. */
#include "lib.h"

void main(const char *cmdline, u64 ram_end)
{
    u64 interval_ms = param_or(cmdline, "interval_ms", 100);
    u64 hang_after_ms = param_or(cmdline, "hang_after_ms", 500);

    (void)ram_end;
    put_str("hang: running\n");
    smp_start(0);
    beat_for("hang: beat ", interval_ms, hang_after_ms);

    put_str("hang: spinning with interrupts off\n");
    /*
     * IF has been 0 since boot (the iretq to CPL3 loads RFLAGS=0x3002), so
     * this is already a spin with interrupts off; the vCPU stays busy at
     * native speed with no exits. No cli: on the nested KVM CI hosts a
     * CPL3 cli/sti faults despite IOPL=3, which would turn the hang into a
     * triple fault.
     */
    __asm__ volatile("1: jmp 1b");
    __builtin_unreachable();
}
