/*
 * Prints "count N" every interval_ms. The sequence lives in memory so that a
 * paused, snapshotted and resumed guest continues it exactly where it was.
 * With more than one CPU, each AP k prints its own "cpu<k> count M" as well.
 * With stamp=1 each BSP line ends in " tsc T", the TSC when the line was due, so
 * the guest's own view of an interruption (a failover) is the largest step
 * between consecutive stamps less the interval.
 * With work=1 each BSP line ends in " work W", the number of times the BSP
 * went round its wait loop since the previous line: a measure of how much CPU
 * the guest got, for overhead benchmarks.
 */
#include "lib.h"

volatile u64 counter_seq;
/* The APs' sequences, by CPU index (entry 0 unused: the BSP's is counter_seq). */
volatile u64 counter_ap_seq[MAX_CPUS];

static u64 period_ticks;

/* AP k: "cpu<k> count M" on the same grid as the BSP, no heartbeat. */
static void ap_count(u32 cpu)
{
    struct ticker t;

    ticker_start(&t, period_ticks);
    for (;;) {
        ticker_wait(&t);
        u64 m = counter_ap_seq[cpu];
        console_lock();
        put_str("cpu");
        put_u64(cpu);
        put_str(" count ");
        put_u64(m);
        put_str("\n");
        console_unlock();
        counter_ap_seq[cpu] = m + 1;
    }
}

void main(const char *cmdline, u64 ram_end)
{
    u64 interval_ms = param_or(cmdline, "interval_ms", 100);
    u64 stop_after;
    bool stop = param_u64(cmdline, "stop_after", &stop_after);
    bool stamp = param_or(cmdline, "stamp", 0) != 0;
    bool work = param_or(cmdline, "work", 0) != 0;
    struct ticker t;

    (void)ram_end;
    put_str("counter: interval_ms=");
    put_u64(interval_ms);
    if (stamp) {
        put_str(" tsc_khz=");
        put_u64(tsc_khz());
    }
    put_str("\n");

    period_ticks = interval_ms * tsc_khz();
    smp_start(ap_count);

    ticker_start(&t, period_ticks);
    for (;;) {
        u64 spins = 0;
        while (!ticker_due(&t, rdtsc()))
            spins++;
        u64 due = rdtsc();
        u64 n = counter_seq;
        console_lock();
        put_str("count ");
        put_u64(n);
        if (stamp) {
            put_str(" tsc ");
            put_u64(due);
        }
        if (work) {
            put_str(" work ");
            put_u64(spins);
        }
        put_str("\n");
        heartbeat((u32)n);
        /* Still holding the console: no AP line comes after the last count. */
        if (stop && n == stop_after)
            debug_exit(0);
        console_unlock();
        counter_seq = n + 1;
    }
}
