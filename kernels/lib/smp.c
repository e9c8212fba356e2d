/*
 * Multiprocessor start-up. All of it runs at CPL3: the MP table is plain
 * memory and the local APIC is reached through the user-accessible identity
 * map, so the BSP sends INIT and SIPIs with ordinary stores. Only the APs'
 * first thirty-odd instructions (the trampoline in entry.S) run at CPL0.
 */
#include "lib.h"

/* MP specification 1.4. */
#define MP_POINTER_SIG  0x5f504d5f      /* "_MP_" */
#define MP_TABLE_SIG    0x504d4350      /* "PCMP" */
#define MP_ENTRY_CPU    0
#define MP_ENTRY_LAST   4               /* types 1-4 are 8 bytes long */
#define MP_CPU_ENABLED  1

struct mp_pointer {
    u32 signature;
    u32 table;
    u8 length;                          /* in 16-byte units: 1 */
    u8 revision;
    u8 checksum;
    u8 features[5];
};

struct mp_table {
    u32 signature;
    u16 length;                         /* base table, header included */
    u8 revision;
    u8 checksum;
    char oem[8];
    char product[12];
    u32 oem_table;
    u16 oem_table_size;
    u16 entry_count;                    /* 0 in qboot's table: walk by length */
    u32 lapic;
    u16 ext_length;
    u8 ext_checksum;
    u8 reserved;
};

struct mp_cpu {
    u8 type;
    u8 apic_id;
    u8 apic_version;
    u8 flags;
    u32 signature;
    u32 features;
    u32 reserved[2];
};

#define LAPIC_DEFAULT   0xfee00000u
#define LAPIC_ID        0x020
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
/* Physical destination, edge, assert. No INIT de-assert: KVM and every APIC since the P6 ignore it. */
#define ICR_INIT        0x4500
#define ICR_STARTUP     0x4600          /* | vector */
#define ICR_PENDING     (1 << 12)

#define SIPI_GAP_US     20              /* after each SIPI, as Linux on current CPUs */
#define ONLINE_WAIT_MS  5000            /* only a broken VMM needs it */

/* Read by entry.S at CPL0: CPU index by initial APIC id, 0 = not started by us. */
u8 smp_apic_to_cpu[256];

extern const char ap_trampoline[], ap_trampoline_end[];
__attribute__((noreturn)) void lib_ap_start(u32 cpu);

static void (*ap_entry)(u32 cpu);
static u32 aps_online;
static u32 aps_released;

/* Physical address as a pointer, hidden from gcc, which warns about constant addresses below 4 KiB. */
static const void *phys(u64 addr)
{
    __asm__("" : "+r"(addr));
    return (const void *)addr;
}

static u8 sum_bytes(const void *p, u64 len)
{
    const u8 *b = p;
    u8 sum = 0;

    while (len--)
        sum += *b++;
    return sum;
}

static const struct mp_pointer *mp_scan(u64 start, u64 len)
{
    for (u64 a = start; a + sizeof(struct mp_pointer) <= start + len; a += 16) {
        const struct mp_pointer *p = phys(a);
        if (p->signature == MP_POINTER_SIG && p->length == 1 && sum_bytes(p, sizeof(*p)) == 0)
            return p;
    }
    return 0;
}

/*
 * Looks where the MP specification says: the first KiB of the EBDA (segment
 * in the BDA at 0x40e), the last KiB of base memory, the BIOS ROM. understudy
 * and QEMU microvm (qboot) both put the pointer at 0x9fc00.
 */
static const struct mp_table *mp_find(void)
{
    u64 ebda = (u64)*(const u16 *)phys(0x40e) << 4;
    const struct mp_pointer *p = 0;

    if (ebda)
        p = mp_scan(ebda, 1024);
    if (!p)
        p = mp_scan(0x9fc00, 1024);
    if (!p)
        p = mp_scan(0xf0000, 0x10000);
    if (!p || !p->table)
        return 0;
    const struct mp_table *t = phys(p->table);
    if (t->signature != MP_TABLE_SIG || t->length < sizeof(*t) || sum_bytes(t, t->length) != 0)
        return 0;
    return t;
}

/*
 * The APIC ids of the enabled processor entries, in table order, at most
 * max of them; returns how many there are in all. Entries are walked by the
 * table's length, as Linux does, since qboot leaves the entry count 0.
 */
static u32 mp_cpus(const struct mp_table *t, u8 *ids, u32 max)
{
    const u8 *e = (const u8 *)(t + 1);
    const u8 *end = (const u8 *)t + t->length;
    u32 n = 0;

    while (e < end) {
        if (*e == MP_ENTRY_CPU) {
            const struct mp_cpu *c = (const struct mp_cpu *)e;
            if (e + sizeof(*c) > end)
                break;
            if (c->flags & MP_CPU_ENABLED) {
                if (n < max)
                    ids[n] = c->apic_id;
                n++;
            }
            e += sizeof(*c);
        } else if (*e <= MP_ENTRY_LAST) {
            e += 8;
        } else {
            break; /* unknown type, unknown size */
        }
    }
    return n;
}

static u32 mmio_read(u64 addr)
{
    return *(volatile u32 *)addr;
}

static void mmio_write(u64 addr, u32 v)
{
    *(volatile u32 *)addr = v;
}

static void send_ipi(u64 lapic, u8 apic_id, u32 icr)
{
    /* Everything the AP reads (trampoline, smp_apic_to_cpu) is stored before the IPI. */
    __asm__ volatile("" ::: "memory");
    mmio_write(lapic + LAPIC_ICR_HI, (u32)apic_id << 24);
    mmio_write(lapic + LAPIC_ICR_LO, icr);
    /* Never pending under KVM; a real xAPIC takes a few microseconds. */
    for (int i = 0; i < 1000 && (mmio_read(lapic + LAPIC_ICR_LO) & ICR_PENDING); i++)
        cpu_relax();
}

static void delay_us(u64 us)
{
    u64 t0 = rdtsc();
    u64 ticks = us * tsc_khz_or_guess() / 1000;

    while (rdtsc() - t0 < ticks)
        cpu_relax();
}

u32 smp_start(void (*ap_main)(u32 cpu))
{
    const struct mp_table *t = mp_find();
    u8 ids[MAX_CPUS + 1];

    if (!t || mp_cpus(t, ids, 0) < 2)
        return 1; /* one CPU (or no MP table): no APIC access, no output */

    u64 lapic = t->lapic ? t->lapic : LAPIC_DEFAULT;
    u8 self = (u8)(mmio_read(lapic + LAPIC_ID) >> 24);
    u32 listed = mp_cpus(t, ids, MAX_CPUS + 1);
    if (listed > MAX_CPUS + 1)
        listed = MAX_CPUS + 1;

    /* CPU 0 is this one; the others get 1 .. n-1 in table order. */
    u8 apic_ids[MAX_CPUS];
    u32 n = 1;
    apic_ids[0] = self;
    for (u32 i = 0; i < listed && n < MAX_CPUS; i++) {
        if (ids[i] != self && !smp_apic_to_cpu[ids[i]]) {
            smp_apic_to_cpu[ids[i]] = (u8)n;
            apic_ids[n++] = ids[i];
        }
    }
    if (n < 2)
        return 1;

    u64 size = (u64)(ap_trampoline_end - ap_trampoline);
    u64 dst = AP_TRAMPOLINE;
    const char *src = ap_trampoline;
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(size) : : "memory");
    ap_entry = ap_main;

    /* INIT, SIPI, SIPI to each AP in turn: they all come up together. */
    for (u32 cpu = 1; cpu < n; cpu++)
        send_ipi(lapic, apic_ids[cpu], ICR_INIT);
    for (int round = 0; round < 2; round++) {
        for (u32 cpu = 1; cpu < n; cpu++)
            send_ipi(lapic, apic_ids[cpu], ICR_STARTUP | (AP_TRAMPOLINE >> 12));
        delay_us(SIPI_GAP_US);
    }

    u64 t0 = rdtsc();
    u64 patience = ONLINE_WAIT_MS * tsc_khz_or_guess();
    u32 online;
    while ((online = __atomic_load_n(&aps_online, __ATOMIC_ACQUIRE)) < n - 1 &&
           rdtsc() - t0 < patience)
        cpu_relax();

    put_str("smp: ");
    if (online < n - 1) {
        put_u64(1 + online);
        put_str(" of ");
    }
    put_u64(n);
    put_str(" cpus online\n");
    __atomic_store_n(&aps_released, 1, __ATOMIC_RELEASE);
    return 1 + online;
}

/* Called from entry.S on the AP's own stack, at CPL3. */
void lib_ap_start(u32 cpu)
{
    __atomic_fetch_add(&aps_online, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&aps_released, __ATOMIC_ACQUIRE))
        cpu_relax();
    if (ap_entry)
        ap_entry(cpu);
    for (;;)
        cpu_relax();
}

static u32 console_next;
static u32 console_serving;

void console_lock(void)
{
    u32 ticket = __atomic_fetch_add(&console_next, 1, __ATOMIC_RELAXED);

    while (__atomic_load_n(&console_serving, __ATOMIC_ACQUIRE) != ticket)
        cpu_relax();
}

void console_unlock(void)
{
    __atomic_store_n(&console_serving, console_serving + 1, __ATOMIC_RELEASE);
}
