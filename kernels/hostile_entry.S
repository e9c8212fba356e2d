/*
 * The hostile kernel's own entry, trap handling and instruction variants
 * (hostile.c has the rest).
 *
 * Unlike the other kernels, hostile needs CPL0 more than once: an IDT whose
 * handlers count an exception and resume past the instruction that raised
 * it, and a TSS whose I/O permission bitmap allows every port to CPL3 (the
 * CI hosts check the bitmap even with IOPL=3). So it is linked with
 * hostile_start64 as its ELF entry instead of entry.S's _start64. Its CPL0
 * path loads its own GDT (entry.S's segments plus the TSS), the TSS and the
 * IDT, runs the kernel-mode part of hostile.c (hostile_kernel_mode, on the
 * CPL0 stack) and then enters CPL3 as entry.S does, at lib_start with the
 * same arguments. The PVH entry stays entry.S's: booted that way, hostile
 * has no IDT and no TSS, and says so.
 *
 * Exceptions from either privilege level reach hostile_trap() (hostile.c)
 * through one stub per vector; with trap_resume set it records the
 * exception and returns to trap_resume instead of the faulting instruction.
 */

#define SEL_KCODE       0x08
#define SEL_KDATA       0x10
#define SEL_UDATA       (0x18 | 3)
#define SEL_UCODE       (0x20 | 3)
#define SEL_TSS         0x30

/* IOPL=3, IF=0, as entry.S. */
#define USER_RFLAGS     0x3002

#define CR0_WP          (1 << 16)
#define CR4_TSD         (1 << 2)
#define CR4_OSFXSR      (1 << 9)
#define CR4_OSXMMEXCPT  (1 << 10)
#define CR4_SMEP        (1 << 20)
#define CR4_SMAP        (1 << 21)

/* TSS: 104 bytes, then the I/O bitmap for 64 Ki ports and its 0xff end byte. */
#define TSS_IOMAP       104
#define TSS_LIMIT       (TSS_IOMAP + 8192)
#define TSS_AVAILABLE   (0x89 << 40)

#define KSTACK_SIZE     16384

        .text
        .globl hostile_start64
hostile_start64:
        /*
         * CPL3 needs rdtsc; CPL0 must run from and read the user-accessible
         * pages; ldmxcsr needs OSFXSR; WP makes CPL0 stores honour read-only
         * pages as CPL3 stores do (the kernel-mode part clears it once to
         * see the difference).
         */
        mov     %cr4, %rax
        and     $~(CR4_TSD | CR4_SMEP | CR4_SMAP), %rax
        or      $(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
        mov     %rax, %cr4
        mov     %cr0, %rax
        or      $CR0_WP, %rax
        mov     %rax, %cr0
        mov     $pml4, %eax
        mov     %rax, %cr3
        /* The TSS descriptor's base is split across fields: built here (the TSS is below 16 MiB). */
        mov     $hostile_tss, %eax
        shl     $16, %rax
        or      $TSS_LIMIT, %rax
        movabs  $TSS_AVAILABLE, %rdx
        or      %rdx, %rax
        mov     %rax, hostile_gdt + SEL_TSS(%rip)
        lgdt    hostile_gdt_desc(%rip)
        /*
         * CS and SS still hold the boot GDT's selectors, which name other
         * segments here: an iretq from a kernel-mode exception would load
         * those. Reload both from this GDT.
         */
        pushq   $SEL_KCODE
        lea     1f(%rip), %rax
        push    %rax
        lretq
1:      mov     $SEL_KDATA, %eax
        mov     %eax, %ss
        mov     $SEL_TSS, %eax
        ltr     %ax
        lidt    hostile_idt_desc(%rip)
        mov     %rsi, %r12              /* the zero page, kept across the call */
        mov     $hostile_kstack_top, %esp
        call    hostile_kernel_mode

        /* As entry.S: the TSC frequency leaves must be read at CPL0. */
        mov     $0x40000000, %eax
        cpuid
        mov     %eax, %r8d
        mov     $0x40000010, %eax
        cpuid
        mov     %eax, %ecx
        mov     %r8d, %edx
        mov     %r12, %rsi
        xor     %edi, %edi              /* BOOT_LINUX64 */
        mov     $hostile_iret_frame, %esp
        iretq

hostile_user_entry:
        call    lib_start
        ud2

/*
 * One 16-byte stub per exception vector 0-31: the CPU pushes an error code
 * for some vectors; the others push a zero in its place, so every frame has
 * the same layout (struct trap_frame in hostile.c).
 */
        .macro  trap_stub vector
        .balign 16
        .if (\vector == 8) || ((\vector >= 10) && (\vector <= 14)) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30)
        .else
        pushq   $0
        .endif
        pushq   $\vector
        jmp     trap_common
        .endm

        .balign 16
        .globl  trap_stubs
trap_stubs:
        .irp    vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        trap_stub \vector
        .endr

trap_common:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        mov     %rsp, %rdi
        cld
        call    hostile_trap
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        add     $16, %rsp               /* vector and error code */
        iretq

/*
 * The instruction variants, each a function of the operand's address (%rdi)
 * that runs one instruction with trap_resume pointing just past it, so an
 * exception it raises lands there. `setup` and `undo` put the address where
 * the instruction's encoding wants it and restore what they changed.
 */
        .macro  variant name, setup, insn, undo
        .globl  \name
\name:
        \setup
        lea     1f(%rip), %r11
        mov     %r11, trap_resume(%rip)
        \insn
1:      movq    $0, trap_resume(%rip)
        \undo
        ret
        .endm

        /* Plain forms and addressing modes. */
        variant v_ld,           "", "ldmxcsr (%rdi)", ""
        variant v_st,           "", "stmxcsr (%rdi)", ""
        variant v_ld_rex_b,     "mov %rdi, %r8", "ldmxcsr (%r8)", ""
        variant v_st_rex_b,     "mov %rdi, %r9", "stmxcsr (%r9)", ""
        variant v_ld_rex_w,     "", ".byte 0x48, 0x0f, 0xae, 0x17", ""
        variant v_ld_sib,       "mov $1, %r9d", "ldmxcsr -4(%rdi, %r9, 4)", ""
        variant v_ld_disp32,    "sub $0x12345, %rdi", "ldmxcsr 0x12345(%rdi)", ""
        variant v_ld_no_base,   "", "ldmxcsr 0(, %rdi, 1)", ""
        variant v_ld_rbp,       "push %rbp; mov %rdi, %rbp", "ldmxcsr 0(%rbp)", "pop %rbp"
        variant v_st_rbp,       "push %rbp; mov %rdi, %rbp", "stmxcsr 0(%rbp)", "pop %rbp"
        variant v_ld_rip,       "", "ldmxcsr rip_operand(%rip)", ""
        variant v_ld_rip32,     "", "ldmxcsr rip_operand(%eip)", ""
        variant v_ld_addr32,    "", ".byte 0x67, 0x0f, 0xae, 0x17", ""
        /* Segment overrides: ignored in 64-bit mode but for FS/GS's base, and SS's #SS. */
        variant v_ld_ds,        "", ".byte 0x3e, 0x0f, 0xae, 0x17", ""
        variant v_ld_ss,        "", ".byte 0x36, 0x0f, 0xae, 0x17", ""
        variant v_ld_fs,        "", ".byte 0x64, 0x0f, 0xae, 0x17", ""
        variant v_ld_gs,        "", ".byte 0x65, 0x0f, 0xae, 0x17", ""
        variant v_ld_ds_rbp,    "push %rbp; mov %rdi, %rbp", ".byte 0x3e, 0x0f, 0xae, 0x55, 0x00", "pop %rbp"
        variant v_ld_fs_rbp,    "push %rbp; mov %rdi, %rbp", ".byte 0x64, 0x0f, 0xae, 0x55, 0x00", "pop %rbp"
        variant v_st_gs,        "", ".byte 0x65, 0x0f, 0xae, 0x1f", ""
        variant v_ld_many,      "", ".byte 0x2e, 0x3e, 0x26, 0x36, 0x40, 0x48, 0x0f, 0xae, 0x17", ""
        /* 15 bytes, the longest an instruction may be; then 16, which is #GP(0). */
        variant v_ld_15,        "", ".fill 12, 1, 0x3e; .byte 0x0f, 0xae, 0x17", ""
        variant v_ld_16,        "", ".fill 13, 1, 0x3e; .byte 0x0f, 0xae, 0x17", ""
        /* Prefixes that make it no instruction at all (#UD). */
        variant v_ld_66,        "", ".byte 0x66, 0x0f, 0xae, 0x17", ""
        variant v_ld_f3,        "", ".byte 0xf3, 0x0f, 0xae, 0x17", ""
        variant v_ld_f2,        "", ".byte 0xf2, 0x0f, 0xae, 0x17", ""
        variant v_ld_lock,      "", ".byte 0xf0, 0x0f, 0xae, 0x17", ""
        variant v_st_66,        "", ".byte 0x66, 0x0f, 0xae, 0x1f", ""
        variant v_ld_rex_66,    "", ".byte 0x48, 0x66, 0x0f, 0xae, 0x17", ""
        variant v_ld_66_rex,    "", ".byte 0x66, 0x48, 0x0f, 0xae, 0x17", ""

        /* rdmsr/wrmsr/cpuid with the same resume, for the kernel-mode part. */
        .globl  try_rdmsr, try_wrmsr
/* u64 try_rdmsr(u32 msr): the value, or 0 with trap_vector set. */
try_rdmsr:
        mov     %edi, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        lea     1f(%rip), %r11
        mov     %r11, trap_resume(%rip)
        rdmsr
1:      movq    $0, trap_resume(%rip)
        shl     $32, %rdx
        or      %rdx, %rax
        ret
/* void try_wrmsr(u32 msr, u64 value) */
try_wrmsr:
        mov     %edi, %ecx
        mov     %esi, %eax
        mov     %rsi, %rdx
        shr     $32, %rdx
        lea     1f(%rip), %r11
        mov     %r11, trap_resume(%rip)
        wrmsr
1:      movq    $0, trap_resume(%rip)
        ret

        .section .rodata
        .balign 8
hostile_iret_frame:
        .quad   hostile_user_entry, SEL_UCODE, USER_RFLAGS, user_stack_bottom + 16384, SEL_UDATA

hostile_idt_desc:
        .word   256 * 16 - 1
        .quad   hostile_idt

        .data
        .balign 16
/* entry.S's segments (same selectors), then the 16-byte TSS descriptor (low half built at entry). */
hostile_gdt:
        .quad   0
        .quad   0x00af9b000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf93000000ffff      /* 0x10 kernel data */
        .quad   0x00cff3000000ffff      /* 0x18 user data, DPL3 */
        .quad   0x00affb000000ffff      /* 0x20 user code, 64-bit, DPL3 */
        .quad   0x00cf9b000000ffff      /* 0x28 kernel code, 32-bit */
        .quad   0                       /* 0x30 TSS, low half */
        .quad   0                       /* TSS, high half: base bits 63:32 */
hostile_gdt_end:

hostile_gdt_desc:
        .word   hostile_gdt_end - hostile_gdt - 1
        .quad   hostile_gdt

        .globl  rip_operand
        .balign 4
rip_operand:
        .long   0x1f80

/* 64-bit TSS: RSP0 at 4, the I/O map base at 102; an all-zero bitmap allows every port. */
        .balign 16
hostile_tss:
        .long   0
        .quad   hostile_kstack_top      /* RSP0 */
        .fill   TSS_IOMAP - 12 - 2, 1, 0
        .word   TSS_IOMAP
        .fill   8192, 1, 0
        .byte   0xff

        .bss
        .balign 4096
        .globl  hostile_idt
hostile_idt:
        .skip   256 * 16
        .balign 16
hostile_kstack:
        .skip   KSTACK_SIZE
hostile_kstack_top:

        .section .note.GNU-stack, "", @progbits
