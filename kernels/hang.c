/* Heartbeats for hang_after_ms, then goes silent: a live but hung guest. Other CPUs spin. */
#include "lib.h"

void main(const char *cmdline, u64 ram_end)
{
    u64 interval_ms = param_or(cmdline, "interval_ms", 100);
    u64 hang_after_ms = param_or(cmdline, "hang_after_ms", 500);
    u64 khz = tsc_khz();
    struct ticker t;

    (void)ram_end;
    if (!interval_ms)
        interval_ms = 1;
    put_str("hang: running\n");
    smp_start(0);

    ticker_start(&t, interval_ms * khz);
    u64 deadline = t.next + hang_after_ms * khz;
    for (u64 n = 0; n * interval_ms < hang_after_ms; n++) {
        ticker_wait(&t);
        put_str("hang: beat ");
        put_u64(n);
        put_str("\n");
        heartbeat((u32)n);
    }
    while ((s64)(rdtsc() - deadline) < 0)
        ;

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
