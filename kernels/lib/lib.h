/* Tiny runtime shared by the test kernels. Everything here runs at CPL3. */
#ifndef KERNELS_LIB_H
#define KERNELS_LIB_H

#include <stdbool.h>
#include <stdint.h>

#include "smp.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define PORT_COM1       0x3f8
#define PORT_DEBUG_EXIT 0xf4
#define PORT_PVPANIC    0x505
#define PORT_HEARTBEAT  0x5f0

#define MIB             (1024ul * 1024)
#define PAGE_SIZE       4096ul

/* Provided by each kernel. ram_end: end of the highest RAM range below 4 GiB. */
void main(const char *cmdline, u64 ram_end);

/* End of the loaded image (bss included), page aligned; from the linker script. */
extern char _end[];

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u16 port, u32 v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* Spin-wait hint. */
static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* The physical address of a static object (identity map). */
static inline u64 pa(const volatile void *p)
{
    return (u64)p;
}

/* Compiler barrier: memory accesses are not moved across it. */
static inline void barrier(void)
{
    __asm__ volatile("" ::: "memory");
}

/* MMIO accesses of each width, as single mov instructions. */
static inline u8 mmio_read8(u64 a)
{
    u8 v;
    __asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(a) : "memory");
    return v;
}

static inline u16 mmio_read16(u64 a)
{
    u16 v;
    __asm__ volatile("movw (%1), %0" : "=r"(v) : "r"(a) : "memory");
    return v;
}

static inline u32 mmio_read32(u64 a)
{
    u32 v;
    __asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(a) : "memory");
    return v;
}

static inline u64 mmio_read64(u64 a)
{
    u64 v;
    __asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(a) : "memory");
    return v;
}

static inline void mmio_write8(u64 a, u8 v)
{
    __asm__ volatile("movb %0, (%1)" : : "q"(v), "r"(a) : "memory");
}

static inline void mmio_write16(u64 a, u16 v)
{
    __asm__ volatile("movw %0, (%1)" : : "r"(v), "r"(a) : "memory");
}

static inline void mmio_write32(u64 a, u32 v)
{
    __asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(a) : "memory");
}

static inline void mmio_write64(u64 a, u64 v)
{
    __asm__ volatile("movq %0, (%1)" : : "r"(v), "r"(a) : "memory");
}

/* Serial output: one outb per byte, no LSR polling. */
void put_str(const char *s);
void put_u64(u64 v);
void put_hex(u64 v);

static inline void put_line(const char *s)
{
    put_str(s);
    put_str("\n");
}

static inline void heartbeat(u32 seq)
{
    outl(PORT_HEARTBEAT, seq);
}

static inline void pvpanic(void)
{
    outb(PORT_PVPANIC, 1);
}

/* Ends the VM with exit status (v << 1) | 1. */
__attribute__((noreturn)) void debug_exit(u8 v);

/*
 * Command line (cmdline.c): `key=value` tokens separated by spaces, the last
 * occurrence wins. param_u64 takes the last decimal value and returns false
 * if there is none (key absent or not a number).
 */
bool param_u64(const char *cmdline, const char *key, u64 *val);
u64 param_or(const char *cmdline, const char *key, u64 dflt);
/* The value of the last `key=value` token (it ends at a space or NUL), or 0 if there is none. */
const char *param_str(const char *cmdline, const char *key);
/* Whether the value v (ending at a space or NUL) is the string s. */
bool value_is(const char *v, const char *s);
/* Prints "<kernel>: <key> must be <what>" and ends the VM with debug_exit(status). */
__attribute__((noreturn)) void bad_parameter(const char *kernel, const char *key, const char *what,
                                             u8 status);
/*
 * Base addresses from `virtio_mmio.device=<size>@<addr>:<irq>` tokens, in
 * order, at most max of them (addr hex with 0x, or decimal; 4-byte aligned,
 * nonzero, below 4 GiB less a page).
 */
u32 cmdline_devices(const char *cmdline, u64 *addrs, u32 max);

/*
 * TSC ticks per millisecond (see README for where it comes from). The first
 * call may calibrate, which is not safe on two CPUs at once: a kernel whose
 * APs need it calls it before smp_start().
 */
u64 tsc_khz(void);

/* The frequency if already known, else a 2 GHz guess: for short waits that must not calibrate. */
u64 tsc_khz_or_guess(void);

/*
 * Fixed-rate deadline timer on the TSC. It fires on a fixed grid (printing
 * does not accumulate drift) but resynchronises instead of firing a burst
 * after the guest was paused, and survives the TSC going backwards (resume
 * on another host).
 */
struct ticker {
    u64 next;
    u64 period;
};

void ticker_start(struct ticker *t, u64 period_ticks); /* first tick is due at once */
bool ticker_due(struct ticker *t, u64 now);
void ticker_wait(struct ticker *t);
/*
 * Prints "<prefix>N" with heartbeat N every interval_ms (0 counts as 1) for
 * duration_ms, then returns at the end of duration_ms: the lively part of the
 * kernels that later fail on purpose.
 */
void beat_for(const char *prefix, u64 interval_ms, u64 duration_ms);

/*
 * Multiprocessor start-up (smp.c). Counts the CPUs in the MP table and, if
 * there is more than one, starts the others, waits until they reach CPL3,
 * prints "smp: N cpus online" and lets each run ap_main(cpu), cpu = 1 .. N-1,
 * on its own stack (ap_main 0: they spin). With one CPU it prints nothing
 * and touches no APIC register. Returns the number of CPUs running, 1 if alone.
 * Call once, from the BSP, after anything the APs read is set up.
 */
u32 smp_start(void (*ap_main)(u32 cpu));

/*
 * Serial line lock (a fair ticket lock at CPL3): hold it for a whole line, so
 * lines of different CPUs never interleave. Only needed once APs print.
 */
void console_lock(void);
void console_unlock(void);

#endif
