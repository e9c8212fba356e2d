/* Heartbeats for crash_after_ms, then dies with a triple fault. Other CPUs spin. */
#include "lib.h"

void main(const char *cmdline, u64 ram_end)
{
    u64 interval_ms = param_or(cmdline, "interval_ms", 100);
    u64 crash_after_ms = param_or(cmdline, "crash_after_ms", 500);

    (void)ram_end;
    put_str("crash: running\n");
    smp_start(0);
    beat_for("crash: tick ", interval_ms, crash_after_ms);

    put_str("crash: triple fault now\n");
    /* #UD cannot be delivered through the zero-limit IDT: #GP, #DF, shutdown. */
    __asm__ volatile("ud2");
    __builtin_unreachable();
}
