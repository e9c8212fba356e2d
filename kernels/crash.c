/* Heartbeats for crash_after_ms, then dies with a triple fault. Other CPUs spin. */
#include "lib.h"

void main(const char *cmdline, u64 ram_end)
{
    u64 interval_ms = param_or(cmdline, "interval_ms", 100);
    u64 crash_after_ms = param_or(cmdline, "crash_after_ms", 500);
    u64 khz = tsc_khz();
    struct ticker t;

    (void)ram_end;
    if (!interval_ms)
        interval_ms = 1;
    put_str("crash: running\n");
    smp_start(0);

    ticker_start(&t, interval_ms * khz);
    u64 deadline = t.next + crash_after_ms * khz;
    for (u64 n = 0; n * interval_ms < crash_after_ms; n++) {
        ticker_wait(&t);
        put_str("crash: tick ");
        put_u64(n);
        put_str("\n");
        heartbeat((u32)n);
    }
    while ((s64)(rdtsc() - deadline) < 0)
        ;

    put_str("crash: triple fault now\n");
    /* #UD cannot be delivered through the zero-limit IDT: #GP, #DF, shutdown. */
    __asm__ volatile("ud2");
    __builtin_unreachable();
}
