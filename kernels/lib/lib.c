#include "lib.h"

#define BOOT_LINUX64 0
#define BOOT_PVH     1

#define E820_RAM        1
#define FOUR_GIB        (4ul << 30)

/* Linux zero page (struct boot_params) offsets. */
#define ZP_E820_ENTRIES 0x1e8
#define ZP_CMD_LINE_PTR 0x228
#define ZP_E820_TABLE   0x2d0
#define ZP_E820_MAX     128

#define PVH_MAGIC       0x336ec578

struct e820_entry {
    u64 addr;
    u64 size;
    u32 type;
} __attribute__((packed));

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

/* What the entry path handed over, kept for debugging from the VMM side. */
u64 boot_protocol;
u64 boot_info_paddr;
static u64 cpl0_tsc_khz;

static u64 ram_end_below_4g(u64 ram_end, u64 addr, u64 size, u32 type)
{
    if (type != E820_RAM || addr >= FOUR_GIB)
        return ram_end;
    u64 end = addr + size > FOUR_GIB ? FOUR_GIB : addr + size;
    return end > ram_end ? end : ram_end;
}

/* Called from entry.S at CPL3. The boot info is read through the identity map. */
__attribute__((noreturn)) void lib_start(u64 protocol, u64 info, u32 hv_max_leaf, u32 hv_tsc_khz);

void lib_start(u64 protocol, u64 info, u32 hv_max_leaf, u32 hv_tsc_khz)
{
    const char *cmdline = 0;
    u64 ram_end = 0;

    boot_protocol = protocol;
    boot_info_paddr = info;
    /* Range checks guard against bare metal, where these leaves are junk. */
    if (hv_max_leaf >= 0x40000010 && hv_max_leaf < 0x40010000 &&
        hv_tsc_khz >= 100000 && hv_tsc_khz <= 10000000)
        cpl0_tsc_khz = hv_tsc_khz;

    if (protocol == BOOT_LINUX64) {
        const u8 *zp = (const u8 *)info;
        u32 n = zp[ZP_E820_ENTRIES];
        const struct e820_entry *e = (const struct e820_entry *)(zp + ZP_E820_TABLE);

        cmdline = (const char *)(u64)*(const u32 *)(zp + ZP_CMD_LINE_PTR);
        if (n > ZP_E820_MAX)
            n = ZP_E820_MAX;
        for (u32 i = 0; i < n; i++)
            ram_end = ram_end_below_4g(ram_end, e[i].addr, e[i].size, e[i].type);
    } else {
        const struct hvm_start_info *si = (const struct hvm_start_info *)info;

        if (si->magic == PVH_MAGIC) {
            cmdline = (const char *)si->cmdline_paddr;
            if (si->version >= 1) {
                const struct hvm_memmap_entry *e = (const struct hvm_memmap_entry *)si->memmap_paddr;
                for (u32 i = 0; i < si->memmap_entries; i++)
                    ram_end = ram_end_below_4g(ram_end, e[i].addr, e[i].size, e[i].type);
            }
        }
    }

    main(cmdline ? cmdline : "", ram_end);
    debug_exit(0);
}

void put_str(const char *s)
{
    while (*s)
        outb(PORT_COM1, (u8)*s++);
}

void put_u64(u64 v)
{
    char buf[21];
    int i = sizeof(buf) - 1;

    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put_str(&buf[i]);
}

void put_hex(u64 v)
{
    char buf[19];
    int i = sizeof(buf) - 1;

    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    put_str(&buf[i]);
}

void debug_exit(u8 v)
{
    outb(PORT_DEBUG_EXIT, v);
    /* Only reached if nothing listens on the port. */
    for (;;)
        cpu_relax();
}

/*
 * Fallback when the hypervisor does not report the TSC frequency (QEMU):
 * count PIT channel 2 ticks against the TSC for 50 ms. The counter is read
 * rather than the OUT bit in port 0x61 because QEMU microvm has no port 0x61
 * (reads 0xff); writing the gate bit there is harmless. Each port access is
 * a VM exit (tens of microseconds), so the TSC is sampled on both sides of
 * the latch command and the midpoint used: the error stays well below 0.1%.
 */
#define PIT_HZ          1193182ul

static u16 pit2_read(u64 *tsc)
{
    u64 t0 = rdtsc();

    outb(0x43, 0x80); /* latch channel 2 */
    *tsc = t0 + (rdtsc() - t0) / 2;
    u8 lo = inb(0x42);
    return (u16)(lo | inb(0x42) << 8);
}

static u64 pit_calibrate_khz(void)
{
    u64 t0, t, ticks = 0;

    outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01)); /* gate on, speaker off */
    outb(0x43, 0xb4);                            /* ch2, lo/hi byte, mode 2 */
    outb(0x42, 0);                               /* period 65536 ticks (55 ms) */
    outb(0x42, 0);
    pit2_read(&t0); /* let the count load */

    u16 prev = pit2_read(&t0);
    while (ticks < PIT_HZ / 20) {
        u16 c = pit2_read(&t);
        ticks += (u16)(prev - c); /* down counter, polled far more often than it wraps */
        prev = c;
        if (t - t0 > (1ul << 32))
            return 0; /* counter not running: no PIT or gate stuck low */
    }
    return (t - t0) * PIT_HZ / (ticks * 1000);
}

#define FALLBACK_KHZ    2000000ul

/* Cached by tsc_khz(): calibrating once is enough. */
static u64 known_khz;

u64 tsc_khz(void)
{
    if (known_khz)
        return known_khz;
    known_khz = cpl0_tsc_khz;
    if (!known_khz) {
        known_khz = pit_calibrate_khz();
        /* Nonsense from a missing or odd PIT: assume 2 GHz. */
        if (known_khz < 100000)
            known_khz = FALLBACK_KHZ;
    }
    return known_khz;
}

u64 tsc_khz_or_guess(void)
{
    if (known_khz)
        return known_khz;
    return cpl0_tsc_khz ? cpl0_tsc_khz : FALLBACK_KHZ;
}

void ticker_start(struct ticker *t, u64 period_ticks)
{
    t->period = period_ticks;
    t->next = rdtsc();
}

bool ticker_due(struct ticker *t, u64 now)
{
    s64 early = (s64)(t->next - now);

    if (early > 0 && (u64)early <= t->period)
        return false;
    /* Due, or the TSC jumped backwards by more than a period: fire now. */
    if (early > 0)
        t->next = now;
    t->next += t->period;
    /* A whole period late (guest was paused): skip the backlog. */
    if ((s64)(now - t->next) >= 0)
        t->next = now + t->period;
    return true;
}

void ticker_wait(struct ticker *t)
{
    while (!ticker_due(t, rdtsc()))
        ;
}

void beat_for(const char *prefix, u64 interval_ms, u64 duration_ms)
{
    u64 khz = tsc_khz();
    struct ticker t;

    if (!interval_ms)
        interval_ms = 1;
    ticker_start(&t, interval_ms * khz);
    u64 deadline = t.next + duration_ms * khz;
    for (u64 n = 0; n * interval_ms < duration_ms; n++) {
        ticker_wait(&t);
        put_str(prefix);
        put_u64(n);
        put_str("\n");
        heartbeat((u32)n);
    }
    while ((s64)(rdtsc() - deadline) < 0)
        ;
}
