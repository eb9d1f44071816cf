/* The workload guest's ABI. Mirrors GuestLayout.swift (the host side); change both together. */
#ifndef DIRTYMIG_GUEST_LAYOUT_H
#define DIRTYMIG_GUEST_LAYOUT_H

#define TRAMPOLINE_ADDR   0x7000
#define IMAGE_ADDR        0x100000
#define CONFIG_ADDR       0x200000
#define STATS_ADDR        0x210000
#define OUTPUT_ADDR       0x212000    /* output records, 64 bytes per vCPU (check workloads, emit=) */
#define PT_BASE           0x300000
#define STACKS_ADDR       0x400000
#define STACK_SHIFT       14          /* 16 KiB per vCPU */
#define WORKLOAD_BASE     0x1000000
#define MAX_VCPUS         64
#define MAX_GIB           64
#define HIGH_MEMORY_BASE  0x100000000
#define LAPIC_BASE        0xFEE00000
#define CONSOLE_PORT      0xE9
#define ERROR_PORT        0x5D0
#define PARK_PORT         0x5D4       /* dword: APIC ID of a vCPU that finished (ring 3, spinning) */
#define OUTPUT_PORT       0x5D8       /* dword: APIC ID of a vCPU whose output record is new */

#define CONFIG_MAGIC      0x46434D44  /* "DMCF" */
#define CONFIG_VERSION    1
#define CONFIG_HEADER_SIZE 64
#define CONFIG_ENTRY_SIZE 64
#define STATS_MAGIC       0x54534D44  /* "DMST" */
#define STATS_VERSION     1

/* GDT selectors (boot.S builds the table). */
#define SEL_CODE32        0x08
#define SEL_DATA          0x10
#define SEL_CODE64        0x18        /* also STAR's SYSCALL CS; SYSCALL SS = 0x20 */
#define SEL_DATA64        0x20
#define SEL_USER_CODE     0x2B        /* 0x28 | RPL 3 */
#define SEL_USER_DATA     0x33        /* 0x30 | RPL 3 */

#define KIND_IDLE 0
#define KIND_WRITE 1
#define KIND_READ 2
#define KIND_MIX 3
#define KIND_CHECK 4
#define PATTERN_SEQ 0
#define PATTERN_RANDOM 1
#define PATTERN_HOT 2
/* What a write workload puts in a page: one word, the rest as it was (zero unless
 * written otherwise: mostly zero, the default); the whole page as text-like words; the whole
 * page random (incompressible). */
#define CONTENT_SPARSE 0
#define CONTENT_TEXT 1
#define CONTENT_RANDOM 2

#define STATE_NOT_STARTED 0
#define STATE_RUNNING 1
#define STATE_FINISHED 2
#define STATE_IDLE 3
#define STATE_FAILED 4

#define ERR_BAD_MAGIC 1
#define ERR_BAD_VERSION 2
#define ERR_TOO_MANY_VCPUS 3
#define ERR_WS_OUT_OF_RANGE 4
#define ERR_MEMORY_TOO_LARGE 5
#define ERR_NO_LONG_MODE 6
#define ERR_BAD_WORKLOAD 7            /* e.g. check with pattern hot: its passes would not cover every page */

/* The check workload's values (CheckWorkload.swift computes the same). With M = CHECK_MUL and
 * mix(x) = x ^= x >> 32, x *= M, x ^= x >> 29, x *= M, x ^= x >> 32 (each step a bijection: M is
 * odd), the value of page i in pass k >= 1 is mix((i*M) ^ mix(seed + k*M)) with the low bit set,
 * so that it is never 0 (every page's value before its first visit). Distinct within a pass;
 * across passes the pass key is mixed first, or (seed + k*M) ^ (i*M) repeats values between
 * passes (2 in 1,024). One constant, not splitmix64's three: the paced loop had no register
 * left for the other two. */
#define CHECK_MUL         0x9E3779B97F4A7C15ul

#endif
