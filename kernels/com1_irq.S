/*
 * com1_irq: does COM1's transmitter interrupt reach the guest, and by which
 * way? The whole kernel runs at CPL0 (no C, no lib), in about 40
 * instructions, since kernel-mode code is emulated on the CI hosts.
 *
 * It loads an IDT with two gates: vector 0x34, where it routes IOAPIC pin 4
 * (fixed, physical, edge, active high, to APIC 0), and vector 4, where the
 * never-initialised 8259 sends IRQ 4 through LINT0 (ExtINT; the 8259's
 * vector base is 0 until a guest programs it). understudy wires LINT0 to the
 * 8259 as firmware does, and IRQ 4 reaches both, so like any system that
 * uses the IOAPIC (Linux does the same) it masks LINT0. It software-enables
 * the local APIC, sets IER.THRI on COM1 with interrupts off (the transmitter
 * is always empty, so the UART raises its interrupt at once), then enables
 * interrupts and halts. Each handler reads IIR, clears IER, writes one line
 * and exits through the debug-exit port:
 *
 *   IOAPIC pin 4:  "com1_irq: vector 0x34 iir 0xNN"  exit status 0x25
 *   8259, IRQ 4:   "com1_irq: vector 4 iir 0xNN"     exit status 0x45
 *
 * Any other vector has no gate (a triple fault); no interrupt at all leaves
 * it halted.
 */

#define COM1            0x3f8
#define COM1_IER        (COM1 + 1)
#define COM1_IIR        (COM1 + 2)
#define IER_THRI        0x02
#define EXIT_PORT       0xf4

#define IOAPIC          0xfec00000
#define IOAPIC_WINDOW   (IOAPIC + 0x10)
#define REDIR_PIN4      0x18            /* redirection entry of pin 4, low half */
#define LAPIC_SVR       0xfee000f0
#define LAPIC_EOI       0xfee000b0
#define LAPIC_LVT0      0xfee00350
#define LVT0_MASKED     0x10700         /* masked, ExtINT */
#define SVR_ENABLE      0x1ff           /* software enable, spurious vector 0xff */

#define IOAPIC_VECTOR   0x34
#define PIC_VECTOR      4

/* An interrupt gate: handler \handler, selector in %ax, at vector \vector. */
        .macro  gate vector, handler
        lea     \handler(%rip), %rdx
        lea     idt + \vector * 16(%rip), %rdi
        mov     %dx, (%rdi)
        mov     %ax, 2(%rdi)
        movw    $0x8e00, 4(%rdi)        /* present, DPL0, 64-bit interrupt gate */
        shr     $16, %rdx
        mov     %dx, 6(%rdi)            /* the image is below 4 GiB: bits 63:32 stay 0 */
        .endm

/* The handlers' common part: %rsi the line's start, %bl the exit value. */
        .macro  handler name, line, exit
\name:
        lea     \line(%rip), %rsi
        mov     $\exit, %bl
        jmp     report
        .endm

        .section .text.entry, "ax"
        .globl  com1_irq_start64
com1_irq_start64:
        mov     %cs, %eax               /* the boot GDT's code selector */
        gate    IOAPIC_VECTOR, on_ioapic
        gate    PIC_VECTOR, on_pic
        lidt    idt_desc(%rip)
        mov     $LAPIC_SVR, %eax        /* zero-extended: 32-bit absolute addresses sign-extend */
        movl    $SVR_ENABLE, (%rax)
        mov     $LAPIC_LVT0, %eax
        movl    $LVT0_MASKED, (%rax)
        mov     $IOAPIC, %eax
        movl    $REDIR_PIN4, (%rax)
        movl    $IOAPIC_VECTOR, 0x10(%rax)
        movl    $REDIR_PIN4 + 1, (%rax)
        movl    $0, 0x10(%rax)          /* destination: APIC 0 */
        mov     $COM1_IER, %dx
        mov     $IER_THRI, %al
        out     %al, %dx
        sti
1:      hlt
        jmp     1b

        handler on_ioapic, ioapic_line, 0x12
        handler on_pic, pic_line, 0x22

report:
        mov     $COM1_IIR, %dx
        in      %dx, %al
        mov     %al, %cl                /* IIR, for the line */
        mov     $COM1_IER, %dx
        xor     %al, %al
        out     %al, %dx
        mov     $LAPIC_EOI, %eax
        movl    $0, (%rax)
        mov     $COM1, %dx
2:      lodsb                           /* the line, up to its NUL */
        test    %al, %al
        jz      3f
        out     %al, %dx
        jmp     2b
3:      lea     hex(%rip), %rdi
        movzbl  %cl, %eax
        shr     $4, %eax
        mov     (%rdi, %rax), %al
        out     %al, %dx
        movzbl  %cl, %eax
        and     $0xf, %eax
        mov     (%rdi, %rax), %al
        out     %al, %dx
        mov     $'\n', %al
        out     %al, %dx
        mov     %bl, %al
        out     %al, $EXIT_PORT
        hlt

        .section .rodata
ioapic_line:
        .asciz  "com1_irq: vector 0x34 iir 0x"
pic_line:
        .asciz  "com1_irq: vector 4 iir 0x"
hex:
        .ascii  "0123456789abcdef"
        .balign 2
idt_desc:
        .word   (IOAPIC_VECTOR + 1) * 16 - 1
        .quad   idt

        .data
        .balign 16
idt:
        .fill   (IOAPIC_VECTOR + 1) * 16, 1, 0

        .section .note.GNU-stack, "", @progbits
