/* Boot path of the workload guest: multiboot entry (32-bit protected mode, paging off),
 * identity page tables for the first 4 GiB (2 MiB pages), long mode, then C.
 * The other CPUs enter through the 16-bit trampoline, which the BSP copies to 0x7000.
 *
 * Privilege: setup runs in ring 0; every workload loop runs in ring 3 (workload.c enters it with
 * enter_user). Some KVM implementations (PVM, which runs guests without VT-x/SVM) emulate an
 * unmodified guest's ring-0 code instruction by instruction and only run its ring-3 code
 * natively, ~1000x faster. Ring 3 has IOPL 3, so it can still write the host ports. */
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

/* PAE, CR3 = the page tables, EFER.LME, paging on (then a far jump to a 64-bit segment).
 * Inline, without a stack: the APs run it in the trampoline all at the same time. */
.macro ENABLE_LONG_MODE
        mov     %cr4, %eax
        or      $0x20, %eax                     /* PAE */
        mov     %eax, %cr4
        mov     $PT_BASE, %eax
        mov     %eax, %cr3
        mov     $0xC0000080, %ecx               /* EFER */
        rdmsr
        or      $0x100, %eax                    /* LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax               /* PG | PE */
        mov     %eax, %cr0
.endm

/* 64-bit data segments, then this CPU's own stack from its local APIC ID (left in EDI). */
.macro ENTER64_STACK
        mov     $SEL_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $(LAPIC_BASE + 0x20), %eax
        mov     (%rax), %edi
        shr     $24, %edi
        lea     1(%rdi), %eax
        shl     $STACK_SHIFT, %rax
        add     $STACKS_ADDR, %rax
        mov     %rax, %rsp
.endm

        .text
        .code32
        .global _start32
_start32:
        cli
        mov     $(STACKS_ADDR + (1 << STACK_SHIFT)), %esp
        lgdt    gdt_pointer
        ljmp    $SEL_CODE32, $1f
1:      mov     $SEL_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs

        /* Long mode is required; report its absence the way every other error is reported. */
        mov     $0x80000000, %eax
        cpuid
        cmp     $0x80000001, %eax
        jb      no_long_mode
        mov     $0x80000001, %eax
        cpuid
        bt      $29, %edx
        jnc     no_long_mode

        /* Page tables: PML4, PDPT and four page directories mapping [0, 4 GiB), user-accessible
         * (the workload runs in ring 3). workload.c maps any RAM above 4 GiB.
         * Cleared with plain stores, not `rep stos`: a hypervisor that emulates a tracked
         * rep-store can log thousands of dirty-ring entries in one exit and overrun the ring. */
        mov     $PT_BASE, %edi
        mov     $(6 * 512), %ecx
        xor     %eax, %eax
2:      mov     %eax, (%edi)
        mov     %eax, 4(%edi)
        add     $8, %edi
        loop    2b
        movl    $(PT_BASE + 0x1000 + 7), PT_BASE        /* present, writable, user */
        mov     $(PT_BASE + 0x1000), %edi
        mov     $(PT_BASE + 0x2000 + 7), %eax
        mov     $4, %ecx
3:      mov     %eax, (%edi)
        add     $0x1000, %eax
        add     $8, %edi
        loop    3b
        mov     $(PT_BASE + 0x2000), %edi
        xor     %ecx, %ecx
4:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x87, %eax                     /* present, writable, user, 2 MiB */
        cmp     $(LAPIC_BASE >> 21), %ecx
        jne     5f
        or      $0x18, %eax                     /* the local APIC: PCD | PWT */
5:      mov     %eax, (%edi)
        add     $8, %edi
        inc     %ecx
        cmp     $2048, %ecx
        jne     4b

        ENABLE_LONG_MODE
        ljmp    $SEL_CODE64, $bsp_entry64

no_long_mode:
        movl    $STATS_MAGIC, STATS_ADDR
        movl    $STATS_VERSION, STATS_ADDR + 4
        movl    $ERR_NO_LONG_MODE, STATS_ADDR + 12
        mov     $ERR_NO_LONG_MODE, %eax
        mov     $ERROR_PORT, %dx
        out     %eax, %dx
6:      cli
        hlt
        jmp     6b

        .code64
bsp_entry64:
        ENTER64_STACK
        call    guest_main_bsp
        jmp     halt_forever

ap_entry64:
        ENTER64_STACK
        call    guest_main_ap
        jmp     halt_forever

        .global halt_forever
halt_forever:                                   /* also SYSCALL's target (LSTAR) */
        cli
        hlt
        jmp     halt_forever

/* enter_user(rip, rsp, arg): iretq to ring 3 at rip with stack rsp and rdi = arg.
 * RFLAGS: IF = 0 (interrupts stay off), IOPL = 3 (ring 3 may write the host ports). */
        .global enter_user
enter_user:
        pushq   $SEL_USER_DATA
        pushq   %rsi
        pushq   $0x3002
        pushq   $SEL_USER_CODE
        pushq   %rdi
        mov     %rdx, %rdi
        iretq

/* user_park(apic_id), ring 3, never returns: a vCPU whose workload finished tells the host on
 * PARK_PORT (a VMM may stop running it), then halts in ring 0 through SYSCALL. Where CS does
 * not read back as our own user selector the hypervisor runs ring 3 on its own segments (PVM),
 * and a SYSCALL from an unmodified guest does not arrive intact there: spin instead. */
        .section .text.user, "ax"
        .global user_park
user_park:
        mov     %edi, %eax
        mov     $PARK_PORT, %dx
        out     %eax, %dx
        mov     %cs, %eax
        cmp     $SEL_USER_CODE, %eax
        jne     1f
        syscall
1:      pause
        jmp     1b

/* ---- AP trampoline: copied to TRAMPOLINE_ADDR, entered in real mode by SIPI vector 0x07.
 * Position-dependent on purpose: every address below is computed for its copy at 0x7000.
 * No stack: all the APs run it at once. */
#define TRAMP(sym) ((sym) - trampoline_start + TRAMPOLINE_ADDR)
        .text
        .code16
        .global trampoline_start, trampoline_end
trampoline_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        lgdtl   TRAMP(trampoline_gdt_pointer)
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $SEL_CODE32, $TRAMP(trampoline32)
        .code32
trampoline32:
        mov     $SEL_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        ENABLE_LONG_MODE
        ljmp    $SEL_CODE64, $ap_entry64
        .align 8
trampoline_gdt_pointer:
        .word   gdt_end - gdt - 1
        .long   gdt
trampoline_end:

        .data
        .align 16
gdt:
        .quad   0
        .quad   0x00CF9A000000FFFF              /* 0x08: 32-bit code */
        .quad   0x00CF92000000FFFF              /* 0x10: data */
        .quad   0x00AF9A000000FFFF              /* 0x18: 64-bit code (SYSCALL CS) */
        .quad   0x00CF92000000FFFF              /* 0x20: data (SYSCALL SS) */
        .quad   0x00AFFA000000FFFF              /* 0x28: ring-3 64-bit code */
        .quad   0x00CFF2000000FFFF              /* 0x30: ring-3 data */
gdt_end:
gdt_pointer:
        .word   gdt_end - gdt - 1
        .long   gdt
