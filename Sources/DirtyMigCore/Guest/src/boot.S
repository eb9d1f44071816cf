/* Boot path of the workload guest: multiboot entry (32-bit protected mode, paging off),
 * identity page tables for the first 4 GiB (2 MiB pages), long mode, then C.
 * The other CPUs enter through the 16-bit trampoline, which the BSP copies to 0x7000. */
#include "layout.h"

        .section .multiboot, "a"
        .align 4
multiboot_header:
        .long 0x1BADB002                        /* magic */
        .long 0x00010000                        /* flags: the address fields below are valid */
        .long -(0x1BADB002 + 0x00010000)        /* checksum */
        .long multiboot_header                  /* header_addr */
        .long _load_start                       /* load_addr */
        .long _load_end                         /* load_end_addr */
        .long _bss_end                          /* bss_end_addr */
        .long _start32                          /* entry_addr */

        .text
        .code32
        .global _start32
_start32:
        cli
        mov     $(STACKS_ADDR + (1 << STACK_SHIFT)), %esp
        lgdt    gdt_pointer
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss

        /* Page tables: PML4, PDPT and four page directories mapping [0, 4 GiB). */
        /* Clear them with plain stores, not `rep stos`: a hypervisor that emulates a tracked
         * rep-store can log thousands of dirty-ring entries in one exit and overrun the ring. */
        mov     $PT_BASE, %edi
        mov     $(6 * 512), %ecx
        xor     %eax, %eax
0:      mov     %eax, (%edi)
        mov     %eax, 4(%edi)
        add     $8, %edi
        loop    0b
        movl    $(PT_BASE + 0x1000 + 3), PT_BASE
        mov     $(PT_BASE + 0x1000), %edi
        mov     $(PT_BASE + 0x2000 + 3), %eax
        mov     $4, %ecx
1:      mov     %eax, (%edi)
        add     $0x1000, %eax
        add     $8, %edi
        loop    1b
        mov     $(PT_BASE + 0x2000), %edi
        xor     %ecx, %ecx
2:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x83, %eax                     /* present, writable, 2 MiB */
        cmp     $(LAPIC_BASE >> 21), %ecx
        jne     3f
        or      $0x18, %eax                     /* the local APIC: uncached */
3:      mov     %eax, (%edi)
        add     $8, %edi
        inc     %ecx
        cmp     $2048, %ecx
        jne     2b

        call    enable_long_mode
        ljmp    $0x18, $bsp_entry64

/* PAE, CR3, EFER.LME, paging. Shared by the BSP and the trampoline. */
        .global enable_long_mode
enable_long_mode:
        mov     %cr4, %eax
        or      $0x20, %eax
        mov     %eax, %cr4
        mov     $PT_BASE, %eax
        mov     %eax, %cr3
        mov     $0xC0000080, %ecx
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax
        mov     %eax, %cr0
        ret

        .code64
bsp_entry64:
        call    load_data_segments_and_stack
        call    guest_main_bsp
        jmp     halt_forever

        .global ap_entry64
ap_entry64:
        call    load_data_segments_and_stack
        call    guest_main_ap
        jmp     halt_forever

/* Data segments, then this CPU's own stack (from its local APIC ID); EDI = APIC ID.
 * Called with a valid stack (the trampoline's or the BSP's); switches stacks on return. */
load_data_segments_and_stack:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        pop     %rsi                            /* return address */
        mov     $(LAPIC_BASE + 0x20), %eax
        mov     (%rax), %edi
        shr     $24, %edi
        lea     1(%rdi), %eax
        shl     $STACK_SHIFT, %rax
        add     $STACKS_ADDR, %rax
        mov     %rax, %rsp
        push    %rsi
        ret

/* Every interrupt vector lands here: acknowledge the local APIC and return. The only
 * interrupt the guest enables is its own LAPIC timer, which ends a paced vCPU's sleep. */
        .global interrupt_stub
interrupt_stub:
        push    %rax
        mov     $(LAPIC_BASE + 0xB0), %eax
        movl    $0, (%rax)
        pop     %rax
        iretq

        .global halt_forever
halt_forever:
        cli
        hlt
        jmp     halt_forever

/* ---- AP trampoline: copied to TRAMPOLINE_ADDR, entered in real mode by SIPI vector 0x07.
 * Position-dependent on purpose: every address below is computed for its copy at 0x7000. */
#define TRAMP(sym) ((sym) - trampoline_start + TRAMPOLINE_ADDR)
        .code16
        .global trampoline_start, trampoline_end
trampoline_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $(TRAMPOLINE_ADDR + 0x1000), %sp       /* a scratch stack above the trampoline */
        lgdtl   TRAMP(trampoline_gdt_pointer)
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $TRAMP(trampoline32)
        .code32
trampoline32:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $(TRAMPOLINE_ADDR + 0x1000), %esp
        mov     $enable_long_mode, %eax
        call    *%eax
        ljmp    $0x18, $ap_entry64
        .align 8
trampoline_gdt_pointer:
        .word   gdt_end - gdt - 1
        .long   gdt
trampoline_end:

        .data
        .align 8
gdt:
        .quad   0
        .quad   0x00CF9A000000FFFF              /* 0x08: 32-bit code */
        .quad   0x00CF92000000FFFF              /* 0x10: data */
        .quad   0x00AF9A000000FFFF              /* 0x18: 64-bit code */
gdt_end:
gdt_pointer:
        .word   gdt_end - gdt - 1
        .long   gdt
