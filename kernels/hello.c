/*
 * Boot-to-first-output probe: nothing runs before the first byte is sent.
 * Other CPUs are started only after the line, and just spin.
 */
#include "lib.h"

void main(const char *cmdline, u64 ram_end)
{
    (void)cmdline;
    (void)ram_end;
    put_str("hello from understudy\n");
    smp_start(0);
    debug_exit(0);
}
