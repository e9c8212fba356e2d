/*
 * Boot entry for the test kernels.
 *
 * Kernel-mode (CPL0) guest code is emulated on the CI hosts at ~1e6
 * instructions/s, so both entry paths execute about twenty straight-line
 * instructions and then iretq to CPL3, where everything else runs natively.
 * All tables (GDT, page tables, the iretq frame) are static data in the
 * image; nothing is computed at CPL0.
 *
 * lib_start() receives the boot protocol in %rdi, the address of the
 * boot-info structure in %rsi and the results of CPUID 0x40000000 and
 * 0x40000010 (EAX) in %rdx and %rcx; iretq leaves general registers untouched.
 *
 * Application processors come in through the trampoline below (real mode,
 * then 32-bit, then long mode: about thirty instructions in all) and reach
 * lib_ap_start(cpu) at CPL3 on their own stacks. smp_start() (smp.c) copies
 * the trampoline and sends the INIT/SIPIs.
 */

#include "smp.h"

#define BOOT_LINUX64    0
#define BOOT_PVH        1

#define SEL_KCODE       0x08
#define SEL_UDATA       (0x18 | 3)
#define SEL_UCODE       (0x20 | 3)
#define SEL_KCODE32     0x28

/* IOPL=3 so CPL3 may use in/out; IF=0 because there is no interrupt handling. */
#define USER_RFLAGS     0x3002

#define CR4_TSD         (1 << 2)
#define CR4_PAE         (1 << 5)
#define CR4_SMEP        (1 << 20)
#define CR4_SMAP        (1 << 21)
#define MSR_EFER        0xc0000080
#define EFER_LME        (1 << 8)
#define CR0_PE          (1 << 0)
#define CR0_ET          (1 << 4)
#define CR0_PG          (1 << 31)

/* P|RW|US|A, plus D|PS for 2 MiB leaves. Pre-set A/D bits mean the page
 * walker never writes to the tables. */
#define PTE_TABLE       0x27
#define PTE_LEAF_2M     0xe7

/*
 * PVH entry note. The descriptor is 8 bytes (allowed by the Xen note ABI):
 * readers that take 4 bytes and readers that take 8 both get the address.
 */
        .section .note.Xen, "a"
        .balign 4
        .long 4                 /* namesz */
        .long 8                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .quad _start32

/* From 32-bit protected mode: PAE, the kernel's page tables, EFER.LME. Paging next. */
        .macro long_mode_prologue
        mov     $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        xor     %edx, %edx
        mov     $EFER_LME, %eax
        wrmsr
        .endm

        .section .text.entry, "ax"

/* PVH: 32-bit protected mode, paging off, %ebx = struct hvm_start_info. */
        .code32
        .globl _start32
_start32:
        long_mode_prologue              /* CR4 write also clears TSD/SMEP/SMAP */
        mov     %cr0, %eax
        or      $CR0_PG, %eax
        mov     %eax, %cr0
        lgdt    gdt_desc
        ljmp    $SEL_KCODE, $pvh64

        .code64
pvh64:
        mov     %ebx, %esi              /* zero-extends */
        mov     $BOOT_PVH, %edi
        jmp     to_user

/* Linux 64-bit boot protocol: long mode, some identity map, %rsi = zero page. */
        .globl _start64
_start64:
        /* CPL3 needs rdtsc; CPL0 must run from and read our user-accessible pages. */
        mov     %cr4, %rax
        and     $~(CR4_TSD | CR4_SMEP | CR4_SMAP), %rax
        mov     %rax, %cr4
        mov     $pml4, %eax
        mov     %rax, %cr3
        lgdt    gdt_desc(%rip)
        xor     %edi, %edi              /* BOOT_LINUX64 */

to_user:
        /*
         * The TSC frequency leaf must be read here: on the nested CI hosts
         * CPUID at CPL3 runs natively and returns the host's leaves, not the
         * VMM's. lib_start() checks that leaf 0x40000010 exists.
         */
        mov     $0x40000000, %eax
        cpuid
        mov     %eax, %r8d
        mov     $0x40000010, %eax
        cpuid
        mov     %eax, %ecx
        mov     %r8d, %edx

        /* Zero-limit IDT: any exception escalates to a triple fault. */
        lidt    idt_desc(%rip)
        mov     $iret_frame, %esp
        iretq

/*
 * AP, 32-bit protected mode from the trampoline, paging off. The data
 * segments still hold their real-mode values, so nothing here touches memory.
 */
        .code32
ap_start32:
        long_mode_prologue
        mov     $(CR0_PG | CR0_ET | CR0_PE), %eax
        mov     %eax, %cr0
        ljmp    $SEL_KCODE, $ap64

/*
 * AP, long mode. Its CPU index comes from the table smp_start() filled,
 * looked up by the initial APIC id; the iretq frame is built on that CPU's
 * own stack (64-bit mode ignores the real-mode SS limit). A CPU that
 * smp_start() did not start parks here.
 */
        .code64
ap64:
        lidt    idt_desc(%rip)
        mov     $1, %eax
        cpuid                           /* EBX[31:24] = initial APIC id */
        shr     $24, %ebx
        movzbl  smp_apic_to_cpu(%rbx), %edi
        test    %edi, %edi
        jz      ap_park
        mov     %edi, %eax
        shl     $AP_STACK_SHIFT, %eax
        lea     ap_stacks(%rax), %rcx   /* top of stack cpu - 1 */
        mov     %rcx, %rsp
        pushq   $SEL_UDATA
        push    %rcx
        pushq   $USER_RFLAGS
        pushq   $SEL_UCODE
        pushq   $ap_user_entry
        iretq
ap_park:
        hlt                             /* IF=0: for good */
        jmp     ap_park

/* First CPL3 instruction. */
        .text
user_entry:
        call    lib_start
        ud2

/* First CPL3 instruction of an AP; %edi = its CPU index (1 ..). */
ap_user_entry:
        call    lib_ap_start
        ud2

        .section .rodata
        .balign 8
iret_frame:
        .quad   user_entry, SEL_UCODE, USER_RFLAGS, user_stack_top, SEL_UDATA

idt_desc:
        .word   0
        .quad   0

/*
 * AP trampoline: smp_start() copies it to AP_TRAMPOLINE, where a SIPI starts
 * an AP in real mode at CS = AP_TRAMPOLINE >> 4, IP = 0. Never run in place.
 * Position-independent: it addresses its own bytes only through %cs. It
 * loads the kernel's GDT, sets CR0 to PE|ET (clearing the CD/NW bits INIT
 * leaves) and jumps to ap_start32 in the image.
 */
        .code16
        .globl  ap_trampoline, ap_trampoline_end
ap_trampoline:
        lgdtl   %cs:(ap_gdt_desc - ap_trampoline)
        mov     $(CR0_ET | CR0_PE), %eax
        mov     %eax, %cr0
        ljmpl   $SEL_KCODE32, $ap_start32
        .balign 2
ap_gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
ap_trampoline_end:
        .code64

        .data
        .balign 16
/* Accessed bits pre-set so loading a selector does not write the GDT. */
gdt:
        .quad   0
        .quad   0x00af9b000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf93000000ffff      /* 0x10 kernel data */
        .quad   0x00cff3000000ffff      /* 0x18 user data, DPL3 */
        .quad   0x00affb000000ffff      /* 0x20 user code, 64-bit, DPL3 */
        .quad   0x00cf9b000000ffff      /* 0x28 kernel code, 32-bit (AP trampoline) */
gdt_end:

/* 10 bytes: lgdt in 32-bit mode uses the low 4 of the base, 64-bit mode all 8. */
gdt_desc:
        .word   gdt_end - gdt - 1
        .quad   gdt

/* Identity map of the first 4 GiB with 2 MiB pages, all user-accessible. */
        .section .data.pagetables, "aw"
        .balign 4096
        .globl pml4                     /* hostile.c maps more through it */
pml4:
        .quad   pdpt + PTE_TABLE
        .fill   511, 8, 0
pdpt:
        .quad   pd + 0x0000 + PTE_TABLE
        .quad   pd + 0x1000 + PTE_TABLE
        .quad   pd + 0x2000 + PTE_TABLE
        .quad   pd + 0x3000 + PTE_TABLE
        .fill   508, 8, 0
pd:
        .Lpage = 0
        .rept   2048
        .quad   (.Lpage << 21) + PTE_LEAF_2M
        .Lpage = .Lpage + 1
        .endr

        .bss
        .balign 16
        .globl user_stack_bottom
user_stack_bottom:
        .skip   16384
user_stack_top:

/* CPL3 stacks of CPUs 1 .. MAX_CPUS - 1. */
        .balign 16
ap_stacks:
        .skip   (MAX_CPUS - 1) * AP_STACK_SIZE

        .section .note.GNU-stack, "", @progbits
