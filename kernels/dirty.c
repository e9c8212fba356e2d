/*
 * Dirties dirty_mib_per_s MiB of guest RAM per second (one 8-byte store per
 * 4 KiB page) for live-migration and dirty-logging tests. Pages are walked
 * cyclically; the stored value is the pass number (1, 2, ...), so every pass
 * really changes every page. With stop_after=K it exits after report K.
 * Other CPUs spin.
 */
#include "lib.h"

#define DIRTY_BASE      (16 * MIB)
#define BATCH_PAGES     64

volatile u64 dirty_seq;
volatile u64 dirty_pages;
volatile u64 dirty_pass = 1;

void main(const char *cmdline, u64 ram_end)
{
    u64 rate = param_or(cmdline, "dirty_mib_per_s", 16);
    u64 interval_ms = param_or(cmdline, "interval_ms", 100);
    u64 stop_after;
    bool stop = param_u64(cmdline, "stop_after", &stop_after);
    u64 image_end = (u64)_end;
    u64 start = image_end > DIRTY_BASE ? image_end : DIRTY_BASE;
    u64 end = ram_end & ~(PAGE_SIZE - 1);
    u64 ticks_per_ms = tsc_khz();

    if (!interval_ms)
        interval_ms = 1;
    if (end <= start) {
        end = start;
        rate = 0;
    }
    put_str("dirty: dirty_mib_per_s=");
    put_u64(rate);
    put_str(" interval_ms=");
    put_u64(interval_ms);
    put_str(" range ");
    put_hex(start);
    put_str("-");
    put_hex(end);
    put_str("\n");
    smp_start(0);

    /*
     * Pacing in 1 ms steps. credit counts thousandths of a page; a batch is
     * capped so the report line stays on time even when stores are slow
     * (first touch of host memory), and the backlog is capped at 1 s.
     */
    u64 pages_per_s = rate * (MIB / PAGE_SIZE);
    u64 credit = 0;
    u64 addr = start;
    u64 last = rdtsc();
    struct ticker report;

    ticker_start(&report, interval_ms * ticks_per_ms);
    for (;;) {
        u64 now = rdtsc();

        if (ticker_due(&report, now)) {
            u64 seq = dirty_seq;
            put_str("dirty: seq ");
            put_u64(seq);
            put_str(" pages ");
            put_u64(dirty_pages);
            put_str("\n");
            heartbeat((u32)seq);
            if (stop && seq == stop_after)
                debug_exit(0);
            dirty_seq = seq + 1;
        }

        if ((s64)(now - last) < 0) /* TSC went backwards */
            last = now;
        u64 steps = (now - last) / ticks_per_ms;
        last += steps * ticks_per_ms;
        if (steps > 1000) /* the guest was paused: no burst */
            steps = 1;
        credit += steps * pages_per_s;
        if (credit > pages_per_s * 1000)
            credit = pages_per_s * 1000;

        u64 n = credit / 1000;
        if (n > BATCH_PAGES)
            n = BATCH_PAGES;
        credit -= n * 1000;
        for (; n; n--) {
            *(volatile u64 *)addr = dirty_pass;
            addr += PAGE_SIZE;
            dirty_pages++;
            if (addr >= end) {
                addr = start;
                dirty_pass++;
            }
        }
    }
}
