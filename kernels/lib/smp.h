/* Multiprocessor constants shared by entry.S and the C code: #defines only. */
#ifndef KERNELS_SMP_H
#define KERNELS_SMP_H

/* CPUs the kernels run, BSP included (understudy's MAX_VCPUS). Others stay parked. */
#define MAX_CPUS        32

/* One CPL3 stack per AP, in bss (ap_stacks). */
#define AP_STACK_SHIFT  14
#define AP_STACK_SIZE   (1 << AP_STACK_SHIFT)

/*
 * Page the AP trampoline is copied to before the SIPIs; the SIPI vector is
 * its page number. Free under understudy (its boot data are at 0x500,
 * 0x7000-0xffff, 0x20000 and 0x9fc00) and under QEMU microvm's PVH boot
 * (start info, command line and memory map at 0xef000-0xf3fff, MP table at
 * 0x9fc00).
 */
#define AP_TRAMPOLINE   0x10000

#endif
