/*
 * A hostile guest: it does what a broken or malicious kernel might, from
 * kernel mode and from user mode, to show that understudy contains it. It
 * reads and writes (nearly) every I/O port, writes garbage all over the
 * MMIO space and drives virtio devices with nonsense, reads and writes
 * unknown and known MSRs, runs CPUID on many leaves, programs the PIT, PIC,
 * IOAPIC and local APIC with garbage, floods COM1 and the heartbeat port,
 * and runs ldmxcsr/stmxcsr in kernel mode with operands that straddle
 * pages, are not mapped, are not canonical, and with prefixes: instructions
 * a host may refuse at CPL0 and understudy then completes itself. Each of
 * those also runs in user mode, natively, and the two outcomes are compared.
 *
 * The kernel-mode part runs first, on the way from hostile_entry.S's entry
 * to CPL3 (it is emulated on the CI hosts, so it is kept short); the rest
 * runs at CPL3. Exceptions are expected: hostile_trap() counts them and
 * resumes after the instruction that raised one (trap_resume). Anything it
 * does not expect ends the guest with `hostile: unexpected exception ...`.
 * It never does what would end the guest (see harmless()) until
 * it is done, and never sends itself an INIT, SMI or NMI.
 */
#include "lib.h"

#define VEC_NMI         2
#define VEC_UD          6
#define VEC_DF          8
#define VEC_SS          12
#define VEC_GP          13
#define VEC_PF          14
#define VEC_MC          18
#define NO_TRAP         0xff

#define PF_USER         (1u << 2)

#define PTE_P           0x1ul
#define PTE_RW          0x2ul
#define PTE_US          0x4ul
#define PTE_A           0x20ul
#define PTE_D           0x40ul
#define PTE_PS          0x80ul
#define PTE_TABLE       (PTE_P | PTE_RW | PTE_US | PTE_A)
#define PTE_LEAF        (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)
#define PTE_LEAF_RO     (PTE_P | PTE_US | PTE_A | PTE_D)

/* The window: PML4 slot 2 (1 TiB up), 4 KiB pages first, then 2 MiB slots. */
#define WINDOW          0x10000000000ul
#define WINDOW_PAGES    8
#define WINDOW_SLOTS    512             /* 2 MiB each; slot 0 holds the 4 KiB pages */
/* The last page of the lower canonical half. */
#define LOW_TOP_PAGE    0x00007ffffffff000ul

#define MSR_FS_BASE     0xc0000100
#define MSR_GS_BASE     0xc0000101

#define CR0_WP          (1ul << 16)

#define EXIT_DONE       0
#define EXIT_NO_ENTRY   1
#define EXIT_TRAP       2

/* Kernel-mode tables (hostile_entry.S) and the identity map (entry.S). */
extern u64 pml4[512];
extern u8 hostile_idt[256 * 16];
extern char trap_stubs[];

/* Set by hostile_trap() when an exception lands on trap_resume. */
volatile u64 trap_resume;
volatile u32 trap_vector = NO_TRAP;
volatile u64 trap_error;
volatile u64 trap_cr2;
/* Exceptions taken, by vector; NMIs are counted and ignored. */
volatile u64 trap_counts[32];

/* The kernel-mode part ran (it cannot have, booted through entry.S's PVH entry). */
static volatile bool kernel_mode_ran;

struct trap_frame {
    u64 r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

void hostile_trap(struct trap_frame *f);
void hostile_kernel_mode(void);

static inline u64 read_cr2(void)
{
    u64 v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}

static inline u64 read_cr0(void)
{
    u64 v;
    __asm__ volatile("mov %%cr0, %0" : "=r"(v));
    return v;
}

static inline void write_cr0(u64 v)
{
    __asm__ volatile("mov %0, %%cr0" : : "r"(v) : "memory");
}

static inline void invlpg(u64 va)
{
    __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
}

static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static inline void outw(u16 port, u16 v)
{
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline u16 inw(u16 port)
{
    u16 v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* Deterministic garbage (xorshift64), so a run can be repeated. */
static u64 rand_state = 0x9e3779b97f4a7c15ul;

static u64 garbage(void)
{
    rand_state ^= rand_state << 13;
    rand_state ^= rand_state >> 7;
    rand_state ^= rand_state << 17;
    return rand_state;
}

/*
 * Heartbeats every 50 ms while it works, so a supervisor watching them never
 * takes the guest for hung (the floods send thousands more).
 */
static struct ticker beat_ticker;
static u32 beat_seq;

static void keepalive(void)
{
    if (ticker_due(&beat_ticker, rdtsc()))
        heartbeat(beat_seq++);
}

/* ---------------------------------------------------------------- traps */

void hostile_trap(struct trap_frame *f)
{
    u64 v = f->vector & 31;

    trap_counts[v]++;
    if (v == VEC_NMI)
        return;
    if (trap_resume && v != VEC_DF && v != VEC_MC) {
        trap_vector = (u32)v;
        trap_error = f->error;
        trap_cr2 = v == VEC_PF ? read_cr2() : 0;
        f->rip = trap_resume;
        trap_resume = 0;
        return;
    }
    put_str("\nhostile: unexpected exception ");
    put_u64(v);
    put_str(" error ");
    put_hex(f->error);
    put_str(" at rip ");
    put_hex(f->rip);
    put_str(" cs ");
    put_hex(f->cs);
    if (v == VEC_PF) {
        put_str(" cr2 ");
        put_hex(read_cr2());
    }
    put_str("\n");
    debug_exit(EXIT_TRAP);
}

/* Interrupt gates for the exceptions, DPL0, at each vector's stub. */
static void install_idt(void)
{
    for (u64 v = 0; v < 32; v++) {
        u64 handler = (u64)trap_stubs + 16 * v;
        u64 *gate = (u64 *)(hostile_idt + 16 * v);
        gate[0] = (handler & 0xffff) | (0x08ul << 16) | (0x8eul << 40) |
                  (((handler >> 16) & 0xffff) << 48);
        gate[1] = handler >> 32;
    }
}

/* --------------------------------------------------------- page tables */

/*
 * Page tables of the window and of the last page of the lower half. Window
 * page i (4 KiB) maps window_frame[i], or nothing, or read-only, or with a
 * reserved bit set; the 2 MiB slots 1.. are mapped at CPL3 for the MMIO
 * sweeps above 4 GiB (new entries need no TLB flush).
 */
static u64 win_pdpt[512] __attribute__((aligned(4096)));
static u64 win_pd[512] __attribute__((aligned(4096)));
static u64 win_pt[512] __attribute__((aligned(4096)));
static u64 top_pdpt[512] __attribute__((aligned(4096)));
static u64 top_pd[512] __attribute__((aligned(4096)));
static u64 top_pt[512] __attribute__((aligned(4096)));
static u8 frames[8][4096] __attribute__((aligned(4096)));
/* Low scratch: two identity-mapped pages (a 4 KiB boundary inside a 2 MiB page). */
static u8 low_scratch[2][4096] __attribute__((aligned(4096)));

enum window_page {
    WP_A,               /* frames[3] */
    WP_B,               /* frames[1]: not next to frames[3] */
    WP_C,               /* frames[5] */
    WP_UNMAPPED,        /* not present */
    WP_READ_ONLY,       /* frames[6], read-only */
    WP_RESERVED,        /* frames[7], with a reserved address bit */
};

static u8 *const window_frame[WINDOW_PAGES] = {
    frames[3], frames[1], frames[5], 0, frames[6], frames[7], 0, 0,
};

static u32 phys_bits = 36;

static void map_window(void)
{
    pml4[2] = (u64)win_pdpt | PTE_TABLE;
    win_pdpt[0] = (u64)win_pd | PTE_TABLE;
    win_pd[0] = (u64)win_pt | PTE_TABLE;
    win_pt[WP_A] = (u64)frames[3] | PTE_LEAF;
    win_pt[WP_B] = (u64)frames[1] | PTE_LEAF;
    win_pt[WP_C] = (u64)frames[5] | PTE_LEAF;
    win_pt[WP_READ_ONLY] = (u64)frames[6] | PTE_LEAF_RO;
    if (phys_bits < 52)
        win_pt[WP_RESERVED] = (u64)frames[7] | PTE_LEAF | (1ul << 51);

    pml4[255] = (u64)top_pdpt | PTE_TABLE;
    top_pdpt[511] = (u64)top_pd | PTE_TABLE;
    top_pd[511] = (u64)top_pt | PTE_TABLE;
    top_pt[511] = (u64)frames[0] | PTE_LEAF;
}

/* Where the byte at `va` lives, through the identity map; 0 if `va` is not mapped. */
static u8 *backing(u64 va)
{
    if (va >= WINDOW && va < WINDOW + WINDOW_PAGES * PAGE_SIZE) {
        u8 *frame = window_frame[(va - WINDOW) / PAGE_SIZE];
        if ((va - WINDOW) / PAGE_SIZE == WP_RESERVED && phys_bits >= 52)
            frame = 0;
        return frame ? frame + (va & 0xfff) : 0;
    }
    if (va >= LOW_TOP_PAGE && va < LOW_TOP_PAGE + PAGE_SIZE)
        return frames[0] + (va & 0xfff);
    if (va < (4ul << 30))
        return (u8 *)va;
    return 0;
}

/* ------------------------------------------------------ ldmxcsr/stmxcsr */

/* Variants (hostile_entry.S): each runs one instruction on the operand at `address`. */
typedef void (*variant_fn)(u64 address);
#define VARIANT(name) extern void name(u64 address);
VARIANT(v_ld) VARIANT(v_st) VARIANT(v_ld_rex_b) VARIANT(v_st_rex_b) VARIANT(v_ld_rex_w)
VARIANT(v_ld_sib) VARIANT(v_ld_disp32) VARIANT(v_ld_no_base) VARIANT(v_ld_rbp) VARIANT(v_st_rbp)
VARIANT(v_ld_rip) VARIANT(v_ld_rip32) VARIANT(v_ld_addr32) VARIANT(v_ld_ds) VARIANT(v_ld_ss)
VARIANT(v_ld_fs) VARIANT(v_ld_gs) VARIANT(v_st_gs) VARIANT(v_ld_many) VARIANT(v_ld_15)
VARIANT(v_ld_16) VARIANT(v_ld_66) VARIANT(v_ld_f3) VARIANT(v_ld_f2) VARIANT(v_ld_lock)
VARIANT(v_st_66) VARIANT(v_ld_rex_66) VARIANT(v_ld_66_rex) VARIANT(v_ld_ds_rbp) VARIANT(v_ld_fs_rbp)
extern u32 rip_operand;
extern u64 try_rdmsr(u32 msr);
extern void try_wrmsr(u32 msr, u64 value);

/* Where an operand is. */
enum kind {
    K_GOOD,                     /* an ordinary page */
    K_STRADDLE,                 /* across two mapped pages of unrelated frames */
    K_STRADDLE_UNMAPPED,        /* its last two bytes on a page that is not present */
    K_UNMAPPED,                 /* on a page that is not present */
    K_READ_ONLY,                /* on a read-only page (CR0.WP is set) */
    K_RESERVED,                 /* on a page whose entry has a reserved bit set */
    K_NON_CANONICAL,            /* at a non-canonical address */
    K_NON_CANONICAL_STRADDLE,   /* from the last canonical byte of the lower half on */
    K_TOP,                      /* the last bytes of the address space, not mapped */
    K_LOW_STRADDLE,             /* across a 4 KiB boundary inside a 2 MiB page */
    K_HIGH_JUNK,                /* K_GOOD with junk in bits 63:32 (for 32-bit addressing) */
    K_HIGH_JUNK_STRADDLE,       /* K_LOW_STRADDLE with junk in bits 63:32 */
    KIND_COUNT
};

static const char *const kind_names[KIND_COUNT] = {
    "good", "straddle", "straddle-unmapped", "unmapped", "read-only", "reserved-bit",
    "non-canonical", "non-canonical-straddle", "top", "low-straddle", "high-junk",
    "high-junk-straddle",
};

#define HIGH_JUNK       0xdeadbeef00000000ul

static u64 kind_address(enum kind k)
{
    switch (k) {
    case K_GOOD:
        return (u64)&low_scratch[0][0x100];
    case K_STRADDLE:
        return WINDOW + (WP_A + 1) * PAGE_SIZE - 2;
    case K_STRADDLE_UNMAPPED:
        return WINDOW + (WP_C + 1) * PAGE_SIZE - 2;
    case K_UNMAPPED:
        return WINDOW + WP_UNMAPPED * PAGE_SIZE + 0x40;
    case K_READ_ONLY:
        return WINDOW + WP_READ_ONLY * PAGE_SIZE + 0x80;
    case K_RESERVED:
        return WINDOW + WP_RESERVED * PAGE_SIZE + 0x10;
    case K_NON_CANONICAL:
        return 0x8000000000000100ul;
    case K_NON_CANONICAL_STRADDLE:
        return LOW_TOP_PAGE + PAGE_SIZE - 2;
    case K_TOP:
        return 0xfffffffffffffffeul;
    case K_LOW_STRADDLE:
        return (u64)&low_scratch[1][0] - 2;
    case K_HIGH_JUNK:
        return (u64)&low_scratch[0][0x100] | HIGH_JUNK;
    case K_HIGH_JUNK_STRADDLE:
        return ((u64)&low_scratch[1][0] - 2) | HIGH_JUNK;
    default:
        return 0;
    }
}

#define BIT(k) (1u << (k))
#define LOAD_KINDS (BIT(K_GOOD) | BIT(K_STRADDLE) | BIT(K_STRADDLE_UNMAPPED) | BIT(K_UNMAPPED) | \
                    BIT(K_NON_CANONICAL))
#define ALL_KINDS (BIT(K_GOOD) | BIT(K_STRADDLE) | BIT(K_STRADDLE_UNMAPPED) | BIT(K_UNMAPPED) | \
                   BIT(K_READ_ONLY) | BIT(K_RESERVED) | BIT(K_NON_CANONICAL) | \
                   BIT(K_NON_CANONICAL_STRADDLE) | BIT(K_TOP) | BIT(K_LOW_STRADDLE))

struct variant {
    const char *name;
    variant_fn fn;
    bool store;
    u32 kinds;
};

static const struct variant variants[] = {
    { "ldmxcsr", v_ld, false, ALL_KINDS },
    { "stmxcsr", v_st, true, ALL_KINDS },
    { "ldmxcsr rex.b", v_ld_rex_b, false, LOAD_KINDS },
    { "stmxcsr rex.b", v_st_rex_b, true, LOAD_KINDS | BIT(K_READ_ONLY) },
    { "ldmxcsr rex.w", v_ld_rex_w, false, LOAD_KINDS },
    { "ldmxcsr sib", v_ld_sib, false, LOAD_KINDS },
    { "ldmxcsr disp32", v_ld_disp32, false, LOAD_KINDS },
    { "ldmxcsr no base", v_ld_no_base, false, LOAD_KINDS },
    { "ldmxcsr rbp", v_ld_rbp, false, LOAD_KINDS },
    { "stmxcsr rbp", v_st_rbp, true, LOAD_KINDS },
    { "ldmxcsr rip", v_ld_rip, false, BIT(K_GOOD) },
    { "ldmxcsr addr32 rip", v_ld_rip32, false, BIT(K_GOOD) },
    { "ldmxcsr addr32", v_ld_addr32, false, BIT(K_HIGH_JUNK) | BIT(K_HIGH_JUNK_STRADDLE) },
    { "ldmxcsr ds:", v_ld_ds, false, LOAD_KINDS },
    { "ldmxcsr ss:", v_ld_ss, false, LOAD_KINDS },
    { "ldmxcsr fs:", v_ld_fs, false, LOAD_KINDS },
    { "ldmxcsr gs:", v_ld_gs, false, LOAD_KINDS },
    { "ldmxcsr ds: rbp", v_ld_ds_rbp, false, LOAD_KINDS },
    { "ldmxcsr fs: rbp", v_ld_fs_rbp, false, LOAD_KINDS },
    { "stmxcsr gs:", v_st_gs, true, LOAD_KINDS },
    { "ldmxcsr 6 prefixes", v_ld_many, false, LOAD_KINDS },
    { "ldmxcsr 15 bytes", v_ld_15, false, LOAD_KINDS },
    { "ldmxcsr 16 bytes", v_ld_16, false, BIT(K_GOOD) },
    { "ldmxcsr 66", v_ld_66, false, BIT(K_GOOD) | BIT(K_UNMAPPED) },
    { "ldmxcsr f3", v_ld_f3, false, BIT(K_GOOD) },
    { "ldmxcsr f2", v_ld_f2, false, BIT(K_GOOD) },
    { "ldmxcsr lock", v_ld_lock, false, BIT(K_GOOD) },
    { "stmxcsr 66", v_st_66, true, BIT(K_GOOD) },
    { "ldmxcsr rex 66", v_ld_rex_66, false, BIT(K_GOOD) },
    { "ldmxcsr 66 rex", v_ld_66_rex, false, BIT(K_GOOD) },
};
#define VARIANT_COUNT (sizeof(variants) / sizeof(variants[0]))
#define MAX_TRIALS (VARIANT_COUNT * KIND_COUNT)

/* What one run of a variant did. */
struct outcome {
    u32 vector;         /* NO_TRAP if none */
    u32 error;          /* without the #PF user-mode bit, which differs by design */
    u64 cr2;            /* for #PF */
    u32 mxcsr;          /* MXCSR afterwards */
    u32 memory;         /* the operand's four bytes afterwards (0xee where unmapped) */
};

/* A valid MXCSR with bits set in every byte; and one with reserved bits. */
#define MXCSR_BASELINE  0x1f80u
#define MXCSR_TEST      0xffd5u
#define MXCSR_RESERVED  0xffff0000u
#define MEMORY_FILL     0x5a

static struct outcome kernel_outcomes[MAX_TRIALS];
static u32 trial_count;

static const struct variant *variant_of(variant_fn fn)
{
    for (u32 i = 0; i < VARIANT_COUNT; i++)
        if (variants[i].fn == fn)
            return &variants[i];
    return &variants[0];
}
/* Kernel-mode only: a gs: operand with a GS base, a store to a read-only page with CR0.WP clear. */
static struct outcome kernel_gs_based[2], kernel_plain_for_gs[2], kernel_wp_clear;
static struct outcome kernel_reserved_value, user_reserved_value;

static inline void load_mxcsr(u32 v)
{
    __asm__ volatile("ldmxcsr %0" : : "m"(v));
}

static inline u32 store_mxcsr(void)
{
    u32 v;
    __asm__ volatile("stmxcsr %0" : "=m"(v));
    return v;
}

static void put_operand(u64 address, u32 value)
{
    for (u64 i = 0; i < 4; i++) {
        u8 *p = backing(address + i);
        if (p)
            *p = (u8)(value >> (8 * i));
    }
}

static u32 get_operand(u64 address)
{
    u32 v = 0;
    for (u64 i = 0; i < 4; i++) {
        u8 *p = backing(address + i);
        v |= (u32)(p ? *p : 0xee) << (8 * i);
    }
    return v;
}

/*
 * Runs `v` once with its operand at `address` (the operand's bytes found
 * through `shown_at`, which differs only for based and 32-bit addressing).
 */
static struct outcome run_variant(const struct variant *v, u64 address, u64 shown_at, u32 value)
{
    struct outcome o;

    for (u64 i = 0; i < 4; i++) {
        u8 *p = backing(shown_at + i);
        if (p)
            *p = MEMORY_FILL;
    }
    if (v->fn == v_ld_rip || v->fn == v_ld_rip32) {
        rip_operand = value;
        shown_at = (u64)&rip_operand;
    } else if (!v->store) {
        put_operand(shown_at, value);
    }
    load_mxcsr(v->store ? value : MXCSR_BASELINE);
    trap_vector = NO_TRAP;
    trap_error = 0;
    trap_cr2 = 0;
    v->fn(address);
    o.vector = trap_vector;
    o.error = (u32)trap_error;
    if (o.vector == VEC_PF)
        o.error &= ~PF_USER;
    o.cr2 = trap_cr2;
    o.mxcsr = store_mxcsr();
    o.memory = get_operand(shown_at);
    load_mxcsr(MXCSR_BASELINE);
    return o;
}

/* Every (variant, kind) pair, in a fixed order, into `out`; returns how many. */
static u32 run_trials(struct outcome *out)
{
    u32 n = 0;

    for (u32 i = 0; i < VARIANT_COUNT; i++)
        for (u32 k = 0; k < KIND_COUNT; k++)
            if (variants[i].kinds & BIT(k)) {
                u64 a = kind_address((enum kind)k);
                u64 shown = a & ~HIGH_JUNK;
                out[n++] = run_variant(&variants[i], a, shown, MXCSR_TEST);
            }
    return n;
}

static bool same_outcome(const struct outcome *a, const struct outcome *b)
{
    return a->vector == b->vector && a->error == b->error && a->cr2 == b->cr2 &&
           a->mxcsr == b->mxcsr && a->memory == b->memory;
}

static void put_outcome(const struct outcome *o)
{
    if (o->vector == NO_TRAP) {
        put_str("ran");
    } else {
        put_str("vector ");
        put_u64(o->vector);
        put_str(" error ");
        put_hex(o->error);
        if (o->vector == VEC_PF) {
            put_str(" cr2 ");
            put_hex(o->cr2);
        }
    }
    put_str(" mxcsr ");
    put_hex(o->mxcsr);
    put_str(" memory ");
    put_hex(o->memory);
}

static u32 mismatches;
/* User-mode #GPs the host turned into #UD (see mxcsr_user_mode). */
static u32 gp_seen_as_ud;

/* Whether `v` raises #UD whatever its operand (its prefixes make it no instruction). */
static bool undefined_encoding(variant_fn v)
{
    return v == v_ld_66 || v == v_ld_f3 || v == v_ld_f2 || v == v_ld_lock || v == v_st_66 ||
           v == v_ld_rex_66 || v == v_ld_66_rex;
}

static void report(const char *what, const struct outcome *kernel, const struct outcome *user,
                   bool verbose)
{
    bool same = same_outcome(kernel, user);
    if (same && !verbose)
        return;
    if (!same)
        mismatches++;
    put_str("hostile: mxcsr ");
    put_str(what);
    put_str(same ? ": kernel " : ": MISMATCH kernel ");
    put_outcome(kernel);
    put_str(", expected ");
    put_outcome(user);
    put_str("\n");
}

/* Kernel mode: every trial, then the checks only kernel mode can make. */
static void mxcsr_kernel_mode(void)
{
    trial_count = run_trials(kernel_outcomes);

    /* gs: with a GS base: the same outcome as the plain form at the same linear address. */
    const u64 gs_base = 0x100000;
    const enum kind gs_kinds[2] = { K_GOOD, K_STRADDLE };
    for (u32 i = 0; i < 2; i++) {
        u64 a = kind_address(gs_kinds[i]);
        try_wrmsr(MSR_GS_BASE, gs_base);
        kernel_gs_based[i] = run_variant(variant_of(v_ld_gs), a - gs_base, a, MXCSR_TEST);
        try_wrmsr(MSR_GS_BASE, 0);
        kernel_plain_for_gs[i] = run_variant(variant_of(v_ld), a, a, MXCSR_TEST);
    }

    /* With CR0.WP clear a kernel-mode store to a read-only page succeeds. */
    u64 ro = kind_address(K_READ_ONLY);
    write_cr0(read_cr0() & ~CR0_WP);
    kernel_wp_clear = run_variant(variant_of(v_st), ro, ro, MXCSR_TEST);
    write_cr0(read_cr0() | CR0_WP);

    u64 good = kind_address(K_GOOD);
    kernel_reserved_value = run_variant(variant_of(v_ld), good, good, MXCSR_TEST | MXCSR_RESERVED);
}

/* User mode: the same trials natively, compared with kernel mode's. */
static void mxcsr_user_mode(bool verbose)
{
    static struct outcome user_outcomes[MAX_TRIALS];
    u32 n = run_trials(user_outcomes);
    u32 t = 0;
    u64 faults[32] = { 0 };
    u64 ran = 0;

    for (u32 i = 0; i < VARIANT_COUNT; i++)
        for (u32 k = 0; k < KIND_COUNT; k++)
            if (variants[i].kinds & BIT(k)) {
                char what[64];
                const char *parts[3] = { variants[i].name, " ", kind_names[k] };
                u32 w = 0;
                for (u32 p = 0; p < 3; p++)
                    for (const char *s = parts[p]; *s && w < sizeof(what) - 1; s++)
                        what[w++] = *s;
                what[w] = 0;
                if (t < n && t < trial_count) {
                    /*
                     * User mode runs natively, but on the CI hosts a user-mode #GP reaches
                     * their hypervisor, which tries to emulate the instruction, cannot, and
                     * raises #UD instead: the architecture's #GP(0) is the reference there.
                     */
                    if (user_outcomes[t].vector == VEC_UD && !undefined_encoding(variants[i].fn)) {
                        user_outcomes[t].vector = VEC_GP;
                        user_outcomes[t].error = 0;
                        gp_seen_as_ud++;
                    }
                    report(what, &kernel_outcomes[t], &user_outcomes[t], verbose);
                    if (user_outcomes[t].vector == NO_TRAP)
                        ran++;
                    else
                        faults[user_outcomes[t].vector & 31]++;
                }
                t++;
            }

    for (u32 i = 0; i < 2; i++)
        report(i ? "gs: with a GS base straddle" : "gs: with a GS base good",
               &kernel_gs_based[i], &kernel_plain_for_gs[i], verbose);
    struct outcome wp = kernel_wp_clear;
    struct outcome wp_expected = { NO_TRAP, 0, 0, MXCSR_TEST, MXCSR_TEST };
    report("stmxcsr read-only with CR0.WP clear", &wp, &wp_expected, verbose);
    u64 good = kind_address(K_GOOD);
    user_reserved_value = run_variant(variant_of(v_ld), good, good, MXCSR_TEST | MXCSR_RESERVED);
    if (user_reserved_value.vector == VEC_UD) {
        user_reserved_value.vector = VEC_GP;
        gp_seen_as_ud++;
    }
    report("ldmxcsr reserved bits", &kernel_reserved_value, &user_reserved_value, verbose);

    put_str("hostile: mxcsr done trials ");
    put_u64(n);
    put_str(" ran ");
    put_u64(ran);
    put_str(" #UD ");
    put_u64(faults[VEC_UD]);
    put_str(" #SS ");
    put_u64(faults[VEC_SS]);
    put_str(" #GP ");
    put_u64(faults[VEC_GP]);
    put_str(" #PF ");
    put_u64(faults[VEC_PF]);
    put_str(" mismatches ");
    put_u64(mismatches);
    put_str(" user #GP seen as #UD ");
    put_u64(gp_seen_as_ud);
    put_str("\n");
}

/* ------------------------------------------------------- cpuid and msrs */

static u32 cpuid_leaves;
static u64 cpuid_sum;

static void cpuid_one(u32 leaf, u32 sub)
{
    u32 r[4];
    cpuid(leaf, sub, r);
    cpuid_sum = (cpuid_sum << 7 | cpuid_sum >> 57) ^ r[0] ^ ((u64)r[1] << 32) ^ r[2] ^
                ((u64)r[3] << 16);
    cpuid_leaves++;
}

static void cpuid_sweep(void)
{
    for (u32 leaf = 0; leaf <= 0x20; leaf++)
        for (u32 sub = 0; sub < 3; sub++)
            cpuid_one(leaf, sub);
    for (u32 leaf = 0x40000000; leaf <= 0x40000020; leaf++)
        cpuid_one(leaf, 0);
    for (u32 leaf = 0x80000000; leaf <= 0x80000030; leaf++)
        cpuid_one(leaf, 0);
    for (u32 i = 0; i < 16; i++) {
        u64 g = garbage();
        cpuid_one((u32)g, (u32)(g >> 32));
    }
    u32 r[4];
    cpuid(0x80000008, 0, r);
    if ((r[0] & 0xff) >= 32 && (r[0] & 0xff) <= 52)
        phys_bits = r[0] & 0xff;
}

/* MSRs no x86 CPU or KVM has (or that KVM refuses in this configuration), then random ones. */
static const u32 unknown_msrs[] = {
    0x2, 0x5, 0x9, 0x2f, 0x88, 0x100, 0x1000, 0x2000, 0x3fff, 0x4000, 0x8000, 0xffff,
    0x10000, 0x12345678, 0x40000000, 0x40000001, 0x40000070, 0x400000ff, 0x4b564d0f,
    0x4b564dff, 0x80000000, 0xc0000000, 0xc00000ff, 0xc0000104, 0xc0001000, 0xc0011fff,
    0xdeadbeef, 0xfffffffe, 0xffffffff, 0x802, 0x808, 0x80b,
};

/* Real MSRs: read, and written back unchanged. */
static const u32 known_msrs[] = {
    0x1b, 0x3b, 0x174, 0x175, 0x176, 0x1a0, 0x277, 0x2ff, 0x200, 0x201, 0x250, 0x258,
    0xc0000080, 0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, 0xc0000100, 0xc0000101,
    0xc0000102, 0xc0000103, 0x4b564d00, 0x4b564d01, 0x4b564d02, 0x4b564d03, 0x4b564d04,
    0x4b564d05, 0x179, 0x17a, 0x6e0,
};

/* Writes the architecture refuses with #GP, whatever the host. */
static const struct {
    u32 msr;
    u64 value;
} bad_writes[] = {
    { 0xc0000082, 0x8000000000000000ul },      /* LSTAR, non-canonical */
    { 0xc0000100, 0x0000800000000000ul },      /* FS base, non-canonical */
    { 0xc0000080, 0xd01ul | (1ul << 63) },     /* EFER, a reserved bit */
    { 0x277, 0x0202020202020202ul },           /* PAT, a reserved memory type */
    { 0x2ff, 0xc06ul | (1ul << 20) },          /* MTRRdefType, a reserved bit */
    { 0xc0000103, 1ul << 40 },                 /* TSC_AUX, bits 63:32 */
    { 0x179, 0 },                              /* MCG_CAP is read-only */
};

static u32 msr_reads, msr_read_faults, msr_writes, msr_write_faults, msr_bad_refused;

static u64 rdmsr_counted(u32 msr)
{
    trap_vector = NO_TRAP;
    u64 v = try_rdmsr(msr);
    msr_reads++;
    if (trap_vector != NO_TRAP)
        msr_read_faults++;
    return v;
}

static bool wrmsr_counted(u32 msr, u64 value)
{
    trap_vector = NO_TRAP;
    try_wrmsr(msr, value);
    msr_writes++;
    if (trap_vector != NO_TRAP) {
        msr_write_faults++;
        return false;
    }
    return true;
}

/* A page of its own RAM for the paravirtual clock MSRs to point KVM at. */
static u8 pv_page[4096] __attribute__((aligned(4096)));

static void msr_sweep(void)
{
    for (u32 i = 0; i < sizeof(unknown_msrs) / sizeof(unknown_msrs[0]); i++) {
        rdmsr_counted(unknown_msrs[i]);
        wrmsr_counted(unknown_msrs[i], garbage());
    }
    for (u32 i = 0; i < 16; i++) {
        u32 msr = (u32)garbage();
        rdmsr_counted(msr);
    }
    for (u32 i = 0; i < sizeof(known_msrs) / sizeof(known_msrs[0]); i++) {
        trap_vector = NO_TRAP;
        u64 v = rdmsr_counted(known_msrs[i]);
        if (trap_vector == NO_TRAP)
            wrmsr_counted(known_msrs[i], v);
    }
    for (u32 i = 0; i < sizeof(bad_writes) / sizeof(bad_writes[0]); i++)
        if (!wrmsr_counted(bad_writes[i].msr, bad_writes[i].value))
            msr_bad_refused++;
    /* kvmclock and steal time into its own page, garbage, then off again. */
    u64 pv = (u64)pv_page;
    wrmsr_counted(0x4b564d00, pv);                      /* wall clock */
    wrmsr_counted(0x4b564d01, pv + 0x100 + 1);          /* system time, enabled */
    wrmsr_counted(0x4b564d01, 0xd0000000ul + 1);        /* ... at MMIO */
    wrmsr_counted(0x4b564d01, garbage() | 1);
    wrmsr_counted(0x4b564d01, 0);
    wrmsr_counted(0x4b564d03, (pv + 0x200) | 1);        /* steal time */
    wrmsr_counted(0x4b564d03, garbage());
    wrmsr_counted(0x4b564d03, 0);
    wrmsr_counted(0x4b564d04, (pv + 0x300) | 1);        /* PV EOI */
    wrmsr_counted(0x4b564d04, 0);
    wrmsr_counted(0x4b564d02, garbage());               /* async page faults */
    wrmsr_counted(0x4b564d02, 0);
}

/* ----------------------------------------------------------- kernel mode */

/* Called at CPL0 from hostile_entry.S before it enters CPL3. Emulated on the CI hosts: short. */
void hostile_kernel_mode(void)
{
    install_idt();
    put_line("hostile: kernel mode");
    cpuid_sweep();
    map_window();
    msr_sweep();
    mxcsr_kernel_mode();
    kernel_mode_ran = true;
}

/* ----------------------------------------------------------------- ports */

/*
 * `value` made harmless for `port` where some values end the guest: the
 * i8042's reset pulse (0xfe at 0x64), pvpanic's bit 0 (0x505), ACPI SLP_EN
 * (bit 5 at 0x600). The debug-exit port (0xf4) ends it whatever is written:
 * the caller never writes it but to end.
 */
static u8 harmless(u16 port, u8 value)
{
    switch (port) {
    case 0x64:
        return value == 0xfe ? 0xfd : value;
    case PORT_PVPANIC:
        return value & (u8)~1;
    case 0x600:
        return value & (u8)~0x20;
    default:
        return value;
    }
}

/* Whether a `width`-byte write at `port` reaches a port where some value ends the guest. */
static bool near_special(u32 port, u32 width)
{
    static const u16 special[] = { PORT_DEBUG_EXIT, 0x64, PORT_PVPANIC, 0x600 };
    for (u32 i = 0; i < 4; i++)
        if (special[i] >= port && special[i] < port + width)
            return true;
    return false;
}

/* COM1 back to 8N1, no loopback, no interrupts, FIFO on, after garbage. */
static void reset_com1(void)
{
    outb(PORT_COM1 + 3, 0x03);
    outb(PORT_COM1 + 1, 0x00);
    outb(PORT_COM1 + 2, 0x07);
    outb(PORT_COM1 + 4, 0x03);
    put_str("\n");
}

static void port_sweep(u64 stride)
{
    u64 reads = 0, writes = 0, skipped = 0;

    for (u32 port = 0; port <= 0xffff; port += (u32)stride) {
        keepalive();
        inb((u16)port);
        reads++;
        if (port == PORT_DEBUG_EXIT) {
            skipped++;
        } else {
            outb((u16)port, harmless((u16)port, (u8)garbage()));
            writes++;
        }
        /* Wider accesses on a sample. */
        if (port % 251 == 0) {
            inw((u16)port);
            inl((u16)port);
            reads += 2;
            if (!near_special(port, 2)) {
                outw((u16)port, (u16)garbage());
                writes++;
            }
            if (!near_special(port, 4)) {
                outl((u16)port, (u32)garbage());
                writes++;
            }
        }
    }
    reset_com1();
    put_str("hostile: ports done reads ");
    put_u64(reads);
    put_str(" writes ");
    put_u64(writes);
    put_str(" skipped ");
    put_u64(skipped);
    put_str("\n");
}

static void floods(void)
{
    static const char line[] = "hostile: flood 0123456789abcdefghijklmnopqrstuvwxyz0123456789\n";
    for (u32 i = 0; i < 256; i++) {
        keepalive();
        put_str(line);
    }
    for (u32 i = 0; i < 8192; i++) {
        outl(PORT_HEARTBEAT, (u32)garbage());
        outw(PORT_HEARTBEAT, (u16)garbage());
        outb(PORT_HEARTBEAT, (u8)garbage());
    }
    /* String I/O: one exit carries many accesses. */
    static const char rep_line[] = "hostile: rep outsb\n";
    static u8 rep_in[64];
    const char *from = rep_line;
    u64 n = sizeof(rep_line) - 1;
    __asm__ volatile("rep outsb" : "+S"(from), "+c"(n) : "d"(PORT_COM1) : "memory");
    u8 *to = rep_in;
    n = sizeof(rep_in);
    __asm__ volatile("rep insb" : "+D"(to), "+c"(n) : "d"(0x80) : "memory");
    from = (const char *)rep_in;
    n = sizeof(rep_in) / 4;
    __asm__ volatile("rep outsl" : "+S"(from), "+c"(n) : "d"(PORT_HEARTBEAT) : "memory");
    put_line("hostile: floods done");
}

/* The PIT and both PICs, programmed with nonsense (in KVM; IF stays 0, so nothing is delivered). */
static void pit_and_pic(void)
{
    /* Every PIT channel, every mode, the shortest count. */
    for (u32 ch = 0; ch < 3; ch++)
        for (u32 mode = 0; mode < 8; mode++) {
            outb(0x43, (u8)(ch << 6 | 3 << 4 | mode << 1));
            outb((u16)(0x40 + ch), 1);
            outb((u16)(0x40 + ch), 0);
            outb(0x43, (u8)(0xc0 | 2 << ch));  /* read-back */
            inb((u16)(0x40 + ch));
            inb((u16)(0x40 + ch));
        }
    outb(0x61, 0x03);
    for (u32 i = 0; i < 64; i++) {
        outb(0x43, (u8)garbage());
        outb((u16)(0x40 + i % 3), (u8)garbage());
        inb((u16)(0x40 + i % 3));
    }
    /* Both PICs: initialised with garbage vectors, everything unmasked, then junk. */
    for (u32 pic = 0; pic < 2; pic++) {
        u16 base = pic ? 0xa0 : 0x20;
        outb(base, 0x11);
        outb((u16)(base + 1), (u8)garbage());
        outb((u16)(base + 1), pic ? 2 : 4);
        outb((u16)(base + 1), 0x01);
        outb((u16)(base + 1), 0x00);
        outb(base, 0x0c);               /* poll */
        inb(base);
        for (u32 i = 0; i < 32; i++) {
            outb((u16)(base + (i & 1)), (u8)garbage());
            inb((u16)(base + (i & 1)));
        }
    }
    outb(0x4d0, (u8)garbage());
    outb(0x4d1, (u8)garbage());
    put_line("hostile: pit and pic done");
}

/* ------------------------------------------------------------------ MMIO */

#define IOAPIC          0xfec00000ul
#define LAPIC           0xfee00000ul
#define LVT_MASKED      (1u << 16)

static void ioapic_write(u32 index, u32 value)
{
    mmio_write32(IOAPIC, index);
    mmio_write32(IOAPIC + 0x10, value);
}

/*
 * The IOAPIC: every register read, garbage into every one, redirection
 * entries masked and with fixed delivery (an INIT or SMI from a pin would
 * stop the guest itself, not test the VMM), odd widths and offsets.
 */
static void ioapic_garbage(void)
{
    for (u32 index = 0; index < 0x100; index++) {
        keepalive();
        mmio_write32(IOAPIC, index);
        mmio_read32(IOAPIC + 0x10);
        u32 g = (u32)garbage();
        if (index >= 0x10 && index < 0x40 && !(index & 1))
            g = (g | LVT_MASKED) & ~0x700u;
        ioapic_write(index, g);
    }
    for (u64 off = 0; off < 0x100; off += 4) {
        mmio_read32(IOAPIC + off);
        if (off != 0 && off != 0x10)
            mmio_write32(IOAPIC + off, (u32)garbage());
    }
    mmio_write8(IOAPIC, (u8)garbage());
    mmio_read8(IOAPIC + 0x10);
    mmio_write64(IOAPIC, 0x10 | garbage() << 32);
    mmio_read64(IOAPIC + 0x10);
    mmio_write32(IOAPIC + 0x40, (u32)garbage());        /* EOI */
    mmio_read32(IOAPIC + 0xffc);
}

/*
 * The local APIC: every register read and written with garbage, except the
 * ICR (an INIT to itself would stop the guest); every LVT entry masked.
 */
static void lapic_garbage(void)
{
    for (u64 off = 0; off < 0x1000; off += 0x10) {
        keepalive();
        mmio_read32(LAPIC + off);
        if (off == 0x300 || off == 0x310)
            continue;
        u32 g = (u32)garbage();
        if (off >= 0x2f0 && off <= 0x370)
            g |= LVT_MASKED;
        mmio_write32(LAPIC + off, g);
    }
    mmio_write32(LAPIC + 0x3e0, 0xb);                   /* divide by 1 */
    mmio_write32(LAPIC + 0x320, LVT_MASKED | 1u << 17); /* periodic, masked */
    mmio_write32(LAPIC + 0x380, 1);                     /* the shortest period */
    for (u64 off = 4; off < 0x1000; off += 0x104) {
        mmio_read8(LAPIC + off);
        mmio_write16(LAPIC + off, (u16)garbage());
    }
    mmio_read64(LAPIC + 0x20);
    mmio_read32(LAPIC + 0xffe);                         /* straddles the page's end */
    mmio_write32(LAPIC + 0xffe, (u32)garbage());
}

/* ---------------------------------------------------------------- virtio */

#define VIRTIO_BASE     0xd0000000ul
#define VIRTIO_SLOTS    8
#define VIRTIO_MAGIC    0x74726976

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

static struct desc evil_desc[256] __attribute__((aligned(4096)));
static u16 evil_avail[2048] __attribute__((aligned(4096)));
static u8 evil_data[4096] __attribute__((aligned(4096)));

static void spin_ms(u64 ms)
{
    u64 end = rdtsc() + ms * tsc_khz();
    while ((s64)(rdtsc() - end) < 0)
        keepalive();
}

static void queue_at(u64 dev, u32 queue, u32 size, u64 desc, u64 avail, u64 used)
{
    mmio_write32(dev + 0x30, queue);
    mmio_write32(dev + 0x38, size);
    mmio_write32(dev + 0x80, (u32)desc);
    mmio_write32(dev + 0x84, (u32)(desc >> 32));
    mmio_write32(dev + 0x90, (u32)avail);
    mmio_write32(dev + 0x94, (u32)(avail >> 32));
    mmio_write32(dev + 0xa0, (u32)used);
    mmio_write32(dev + 0xa4, (u32)(used >> 32));
    mmio_write32(dev + 0x44, 1);
}

/* Garbage descriptors, and an available ring whose index is `avail_idx` and heads anything. */
static void evil_rings(u64 ram_end, u16 avail_idx)
{
    for (u32 i = 0; i < 256; i++) {
        u64 g = garbage();
        evil_desc[i].addr = i % 3 == 0 ? (u64)evil_data + (g & 0xfff)
                          : i % 3 == 1 ? g : ram_end - (g & 0xff);
        evil_desc[i].len = i % 4 == 0 ? 0xffffffff : (u32)(g >> 20) & 0x1fff;
        evil_desc[i].flags = (u16)(g >> 40) & 7;        /* NEXT, WRITE, INDIRECT */
        evil_desc[i].next = (u16)(g >> 48) & 0x1ff;
    }
    for (u32 i = 0; i < 2048; i++)
        evil_avail[i] = (u16)garbage();
    evil_avail[0] = 0;
    evil_avail[1] = avail_idx;
    /* Some heads in range, the rest not. */
    for (u32 i = 2; i < 2 + 16; i += 2)
        evil_avail[i] &= 0xff;
}

/*
 * Resets and negotiates every feature offered, sets queues 0 and 1 as `round`
 * says, starts the device, notifies and lets it work a while.
 */
static void evil_round(u64 dev, u64 ram_end, u32 round)
{
    mmio_write32(dev + 0x70, 0);
    mmio_write32(dev + 0x70, 1 | 2);
    mmio_write32(dev + 0x24, 0);
    mmio_write32(dev + 0x20, 0xffffffff);
    mmio_write32(dev + 0x24, 1);
    mmio_write32(dev + 0x20, 0xffffffff);
    mmio_write32(dev + 0x70, 1 | 2 | 8);
    if (round >= 2)
        evil_rings(ram_end, round == 2 ? 0x8000 : 16);
    for (u32 q = 0; q < 2; q++) {
        mmio_write32(dev + 0x30, q);
        u32 max = mmio_read32(dev + 0x34);
        switch (round) {
        case 0: /* rings in the MMIO hole, on its own registers, straddling the end of RAM */
            queue_at(dev, q, max, 0xfffff000ul, dev, ram_end - 2);
            break;
        case 1: /* rings above any RAM, misaligned, and a size that is no power of two */
            queue_at(dev, q, max - 1, 1ul << 40, (1ul << 40) + 0x1001, 0xfffffffffffff002ul);
            break;
        default: /* garbage descriptors; the used ring on top of them */
            queue_at(dev, q, max, (u64)evil_desc, (u64)evil_avail, (u64)evil_desc + 64);
            break;
        }
    }
    mmio_write32(dev + 0x70, 1 | 2 | 4 | 8);
    for (u32 i = 0; i < 64; i++)
        mmio_write32(dev + 0x50, i & 3);
    mmio_write32(dev + 0x50, 0xffffffff);
    mmio_write16(dev + 0x50, 0);
    spin_ms(20);
    mmio_read32(dev + 0x60);
    mmio_write32(dev + 0x64, 0xffffffff);
}

static void virtio_garbage(u64 ram_end)
{
    u32 devices = 0;

    for (u32 slot = 0; slot < VIRTIO_SLOTS; slot++) {
        u64 dev = VIRTIO_BASE + slot * 0x1000ul;
        if (mmio_read32(dev) != VIRTIO_MAGIC)
            continue;
        devices++;
        for (u32 round = 0; round < 4; round++)
            evil_round(dev, ram_end, round);
    }
    /* Everything in and past the devices' window: read, garbage, read. */
    for (u64 a = VIRTIO_BASE; a < VIRTIO_BASE + 0x10000; a += 4) {
        if ((a & 0xff) == 0)
            keepalive();
        mmio_read32(a);
        mmio_write32(a, (u32)garbage());
    }
    for (u64 a = VIRTIO_BASE; a < VIRTIO_BASE + VIRTIO_SLOTS * 0x1000ul; a += 0x1000) {
        mmio_read8(a + 0x101);
        mmio_read16(a + 0x102);
        mmio_read64(a + 0x108);
        mmio_write8(a + 0x70, (u8)garbage());
        mmio_write64(a + 0x70, garbage());
        mmio_write32(a + 0x70, 0);                      /* and a reset */
    }
    put_str("hostile: virtio done devices ");
    put_u64(devices);
    put_str("\n");
}

/* The 2 MiB window slots 1.., pointed at `target` (2 MiB aligned); returns the address. */
static u32 next_slot = 1;

static u64 map_slot(u64 target)
{
    if (next_slot >= WINDOW_SLOTS)
        next_slot = 1;
    u32 s = next_slot++;
    win_pd[s] = (target & ~0x1ffffful) | PTE_LEAF | PTE_PS;
    return WINDOW + (u64)s * 0x200000;
}

static void poke(u64 a)
{
    mmio_read32(a);
    mmio_write32(a, (u32)garbage());
}

static void mmio_sweeps(u64 ram_end, u64 stride)
{
    u64 pokes = 0;

    /* The 32-bit hole past the virtio window, the APIC pages left to the code above. */
    for (u64 a = VIRTIO_BASE + 0x10000; a < (4ul << 30); a += stride) {
        keepalive();
        if ((a & ~0xffful) == IOAPIC || (a & ~0xffful) == LAPIC)
            continue;
        poke(a);
        pokes++;
    }
    for (u64 a = 0xfeb00000ul; a < 0xfec00000ul; a += 0x1000) {
        keepalive();
        poke(a);
        pokes++;
    }
    poke(0xfed00000ul);                                 /* HPET's place (there is none) */
    poke(0xfffbd000ul);
    poke(0xfffffffcul);
    /* Past the end of RAM, below the hole; the first across it. */
    mmio_write32(ram_end - 2, (u32)garbage());
    mmio_read32(ram_end - 2);
    for (u64 a = ram_end; a < VIRTIO_BASE; a += 0x100000) {
        keepalive();
        poke(a);
        pokes++;
    }
    mmio_read32(VIRTIO_BASE - 2);
    mmio_write32(VIRTIO_BASE - 2, (u32)garbage());
    /* Above 4 GiB, up to the guest's physical address width: through window slots. */
    for (u32 bit = 32; bit < phys_bits; bit++) {
        for (u32 step = 0; step < 2; step++) {
            keepalive();
            u64 target = (1ul << bit) + (step ? (1ul << bit) - 0x200000 : 0);
            if (target >= (1ul << phys_bits))
                continue;
            u64 a = map_slot(target);
            poke(a);
            mmio_write64(a + 8, garbage());
            mmio_read64(a + 8);
            pokes++;
        }
    }
    /* Two slots of unrelated targets side by side: an access across them. */
    u64 first = map_slot(0x200000000ul);
    map_slot(0x1000000000ul);
    mmio_read32(first + 0x200000 - 2);
    mmio_write32(first + 0x200000 - 2, (u32)garbage());
    /* String instructions on unknown MMIO. */
    u64 rep = 0xe0000000ul;
    u64 n = 64;
    __asm__ volatile("rep stosb" : "+D"(rep), "+c"(n) : "a"(0x5a) : "memory");
    rep = 0xe0000000ul;
    n = 64;
    u64 dst = (u64)evil_data;
    __asm__ volatile("rep movsb" : "+S"(rep), "+D"(dst), "+c"(n) : : "memory");
    put_str("hostile: mmio done pokes ");
    put_u64(pokes);
    put_str("\n");
}

/* ------------------------------------------------------------------ main */

void main(const char *cmdline, u64 ram_end)
{
    u64 port_stride = param_or(cmdline, "port_stride", 1);
    u64 hole_stride = param_or(cmdline, "hole_stride_kib", 256) << 10;
    bool verbose = param_or(cmdline, "verbose", 0) != 0;

    if (!kernel_mode_ran) {
        put_line("hostile: needs its own entry (booted through PVH?): nothing done");
        debug_exit(EXIT_NO_ENTRY);
    }
    if (!port_stride)
        port_stride = 1;
    if (hole_stride < 0x1000)
        hole_stride = 0x1000;
    ticker_start(&beat_ticker, 50 * tsc_khz());
    put_str("hostile: running ram_end ");
    put_hex(ram_end);
    put_str(" phys_bits ");
    put_u64(phys_bits);
    put_str("\n");
    put_str("hostile: kernel mode done cpuid ");
    put_u64(cpuid_leaves);
    put_str(" sum ");
    put_hex(cpuid_sum);
    put_str(" rdmsr ");
    put_u64(msr_reads);
    put_str(" faulted ");
    put_u64(msr_read_faults);
    put_str(" wrmsr ");
    put_u64(msr_writes);
    put_str(" faulted ");
    put_u64(msr_write_faults);
    put_str(" bad writes refused ");
    put_u64(msr_bad_refused);
    put_str("\n");

    mxcsr_user_mode(verbose);
    port_sweep(port_stride);
    floods();
    pit_and_pic();
    ioapic_garbage();
    lapic_garbage();
    put_line("hostile: apic done");
    virtio_garbage(ram_end);
    mmio_sweeps(ram_end, hole_stride);

    put_str("hostile: done mismatches ");
    put_u64(mismatches);
    put_str(" nmis ");
    put_u64(trap_counts[VEC_NMI]);
    put_str("\n");
    debug_exit(EXIT_DONE);
}
