/* The workload guest's 64-bit part: start the other CPUs, then on every CPU run the workload
 * its config entry describes, counting every touched page in its stats record.
 * Freestanding: no libc, no interrupts (IF stays 0 forever), identity-mapped memory. */
#include "layout.h"

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct config_header {
    u32 magic, version, header_size, entry_size, nr_vcpus, flags;
    u64 tsc_hz, memory_size, low_memory_size, workload_base, reserved;
};

struct vcpu_config {
    u32 kind, pattern, write_percent, hot_ppm;
    u64 ws_offset, ws_size, rate, passes, seed, reserved;
};

struct stats_header {
    u32 magic, version, booted, error;
    u64 reserved[6];
};

struct vcpu_stats {
    u64 pages, passes;
    u32 state, apic_id;
    u64 writes, tsc_start, tsc_now, reserved[2];
};

#define CONFIG ((volatile struct config_header *)CONFIG_ADDR)
#define VCPU_CONFIG(i) ((volatile struct vcpu_config *)(u64)(CONFIG_ADDR + 64 + 64 * (u64)(i)))
#define STATS ((volatile struct stats_header *)STATS_ADDR)
#define VCPU_STATS(i) ((volatile struct vcpu_stats *)(u64)(STATS_ADDR + 64 + 64 * (u64)(i)))
#define LAPIC(reg) (*(volatile u32 *)(u64)(LAPIC_BASE + (reg)))

extern void halt_forever(void) __attribute__((noreturn));
extern void interrupt_stub(void);
extern char trampoline_start[], trampoline_end[];

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outl(u16 port, u32 value) { __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port)); }
static inline void cpu_relax(void) { __asm__ volatile("pause"); }

static void console(const char *text) {
    while (*text) outb(CONSOLE_PORT, (u8)*text++);
}

static void console_number(u64 value) {
    char digits[24];
    int n = 0;
    do { digits[n++] = (char)('0' + value % 10); value /= 10; } while (value);
    while (n) outb(CONSOLE_PORT, (u8)digits[--n]);
}

static __attribute__((noreturn)) void fail(u32 code, volatile struct vcpu_stats *stats) {
    STATS->error = code;
    if (stats) stats->state = STATE_FAILED;
    outl(ERROR_PORT, code);
    halt_forever();
}

static void delay_us(u64 us) {
    u64 hz = CONFIG->tsc_hz ? CONFIG->tsc_hz : 2000000000ul;
    u64 end = rdtsc() + hz / 1000000 * us;
    while (rdtsc() < end) cpu_relax();
}

/* ---- Sleeping: paced vCPUs halt until their next page is due instead of spinning, woken by
 * their LAPIC timer (one-shot). The timer's rate is calibrated against the TSC at boot; if it
 * does not count, vCPUs spin as before. */
#define TIMER_VECTOR 0x20
struct idt_gate { u16 offset_low, selector; u8 ist, type; u16 offset_mid; u32 offset_high, zero; };
static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile u64 lapic_per_tsc_q16;          /* LAPIC timer ticks per TSC tick, 16.16 */

static void install_interrupts(void) {
    u64 handler = (u64)interrupt_stub;
    for (int v = 0; v < 256; v++) {
        idt[v] = (struct idt_gate){ (u16)handler, 0x18, 0, 0x8E, (u16)(handler >> 16), (u32)(handler >> 32), 0 };
    }
}

static void load_interrupts(void) {
    struct __attribute__((packed)) { u16 limit; u64 base; } pointer = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(pointer));
    LAPIC(0xF0) = 0x1FF;                 /* software-enable, spurious vector 0xFF */
    LAPIC(0x3E0) = 0xB;                  /* timer divide by 1 */
    LAPIC(0x320) = TIMER_VECTOR;         /* one-shot, unmasked */
}

static void calibrate_timer(void) {
    u64 hz = CONFIG->tsc_hz;
    if (!hz) return;
    LAPIC(0x380) = 0xFFFFFFFFu;
    u64 start = rdtsc();
    while (rdtsc() - start < hz / 100) cpu_relax();
    u64 elapsed = rdtsc() - start;
    u64 ticks = 0xFFFFFFFFu - LAPIC(0x390);
    LAPIC(0x380) = 0;
    lapic_per_tsc_q16 = (ticks << 16) / elapsed;
}

/* Halts until `deadline` (TSC), or returns at once if the timer is unusable. */
static void sleep_until(u64 deadline) {
    u64 ratio = lapic_per_tsc_q16;
    if (!ratio) return;
    u64 now = rdtsc();
    while (now < deadline) {
        u64 ticks = ((deadline - now) * ratio) >> 16;
        if (ticks > 0xFFFFFFFFu) ticks = 0xFFFFFFFFu;
        if (ticks == 0) break;
        LAPIC(0x380) = (u32)ticks;
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        now = rdtsc();
    }
}

/* Identity-map the GiBs above 4 GiB that hold RAM (the first 4 were mapped before long mode). */
static void map_high_memory(void) {
    u64 total = CONFIG->memory_size, low = CONFIG->low_memory_size;
    if (total <= low) return;
    u64 top = 0x100000000ul + (total - low);
    u64 gib = (top + (1ul << 30) - 1) >> 30;
    if (gib > MAX_GIB) fail(ERR_MEMORY_TOO_LARGE, 0);
    volatile u64 *pdpt = (volatile u64 *)(PT_BASE + 0x1000);
    for (u64 g = 4; g < gib; g++) {
        volatile u64 *pd = (volatile u64 *)(PT_BASE + 0x2000 + g * 0x1000);
        for (u64 i = 0; i < 512; i++) pd[i] = ((g << 30) + (i << 21)) | 0x83;
        pdpt[g] = (u64)pd | 3;
    }
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

/* INIT, then SIPI twice, to all CPUs but this one (the SDM's universal start-up algorithm). */
static void start_other_cpus(void) {
    u8 *dst = (u8 *)TRAMPOLINE_ADDR;
    for (char *src = trampoline_start; src < trampoline_end; src++) *dst++ = (u8)*src;
    LAPIC(0xF0) = 0x1FF;                       /* software-enable, spurious vector 0xFF */
    LAPIC(0x310) = 0;
    LAPIC(0x300) = 0x000C4500;                 /* INIT, all excluding self */
    delay_us(10000);
    for (int i = 0; i < 2; i++) {
        LAPIC(0x300) = 0x000C4600 | (TRAMPOLINE_ADDR >> 12);   /* start-up */
        delay_us(200);
        while (LAPIC(0x300) & (1u << 12)) cpu_relax();         /* delivery pending */
    }
}

/* Guest-physical address of page `page` of a working set that starts at RAM offset `base`. */
static inline u64 page_address(u64 base, u64 page, u64 low) {
    u64 offset = base + (page << 12);
    return offset < low ? offset : offset - low + 0x100000000ul;
}

static inline u64 xorshift(u64 *state) {
    u64 x = *state;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return *state = x;
}

static __attribute__((noreturn)) void run_workload(u32 id) {
    volatile struct vcpu_stats *st = VCPU_STATS(id);
    st->apic_id = id;
    st->pages = 0;
    st->passes = 0;
    st->writes = 0;
    __atomic_fetch_add(&STATS->booted, 1, __ATOMIC_SEQ_CST);
    if (id >= CONFIG->nr_vcpus) { st->state = STATE_IDLE; halt_forever(); }

    volatile struct vcpu_config *cfg = VCPU_CONFIG(id);
    u32 kind = cfg->kind, pattern = cfg->pattern, write_percent = cfg->write_percent;
    u64 n = cfg->ws_size >> 12, rate = cfg->rate, passes_wanted = cfg->passes;
    u64 low = CONFIG->low_memory_size;
    u64 base = CONFIG->workload_base + cfg->ws_offset;
    if (kind == KIND_IDLE || n == 0) { st->state = STATE_IDLE; halt_forever(); }
    if (base + (n << 12) > CONFIG->memory_size || base + (n << 12) < base) fail(ERR_WS_OUT_OF_RANGE, st);

    /* Pacing: the deadline of page k is start + k * tsc_hz * 4096 / rate, kept exactly as an
     * integer step plus a remainder; debt beyond 100 ms is forgiven (a paused VM must not burst). */
    u64 tsc_hz = CONFIG->tsc_hz;
    u64 step = 0, step_remainder = 0, remainder = 0, max_debt = tsc_hz / 10;
    if (rate) { step = tsc_hz * 4096 / rate; step_remainder = tsc_hz * 4096 % rate; }

    /* random: a full-period LCG over the next power of two >= n visits every page once per pass. */
    u64 span = 1;
    while (span < n) span <<= 1;
    u64 lcg = cfg->seed & (span - 1), lcg_steps = 0;
    u64 rng = cfg->seed | 1;
    u64 hot_pages = n * cfg->hot_ppm / 1000000;
    if (hot_pages < 1) hot_pages = 1;
    if (hot_pages > n) hot_pages = n;
    u64 hot_threshold = 1000000 - cfg->hot_ppm;     /* per million accesses that go to the hot part */

    u64 touched = 0, writes = 0, passes = 0, position = 0, accumulator = 0, sink = 0;
    u64 now = rdtsc(), due = now, published = now;
    u64 publish_ticks = tsc_hz / 128;                  /* ~8 ms */
    u64 sleep_slack = tsc_hz / 100;                    /* 10 ms */
    load_interrupts();
    st->tsc_start = now;
    st->tsc_now = now;
    st->state = STATE_RUNNING;

    for (;;) {
        if (step) {
            due += step;
            remainder += step_remainder;
            if (remainder >= rate) { remainder -= rate; due++; }
            now = rdtsc();
            if (now > due + max_debt) due = now - max_debt;
            /* Run ahead by up to 10 ms, then sleep until the page is due: the average
             * stays exact, and the vCPU leaves the CPU to others instead of spinning. */
            if (due > now + sleep_slack) { sleep_until(due); now = rdtsc(); }
            while (!lapic_per_tsc_q16 && now < due) { cpu_relax(); now = rdtsc(); }
        }

        u64 page;
        int pass_done = 0;
        if (pattern == PATTERN_RANDOM) {
            do {
                lcg = (lcg * 6364136223846793005ul + 1442695040888963407ul) & (span - 1);
                if (++lcg_steps == span) { lcg_steps = 0; pass_done = 1; }
            } while (lcg >= n && !pass_done);
            page = lcg < n ? lcg : 0;
        } else if (pattern == PATTERN_HOT) {
            u64 r = xorshift(&rng);
            if (hot_pages == n || (r % 1000000) < hot_threshold) page = (r >> 20) % hot_pages;
            else page = hot_pages + (r >> 20) % (n - hot_pages);
            if (++position == n) { position = 0; pass_done = 1; }
        } else {
            page = position;
            if (++position == n) { position = 0; pass_done = 1; }
        }

        volatile u64 *word = (volatile u64 *)page_address(base, page, low);
        int write = kind == KIND_WRITE;
        if (kind == KIND_MIX) {
            accumulator += write_percent;
            if (accumulator >= 100) { accumulator -= 100; write = 1; }
        }
        touched++;
        if (write) { *word = touched; writes++; }
        else sink += *word;
        /* Publish the counters every 64 pages at most and every publish_ticks at least often:
         * each store to the stats page is a dirty page under tracking (some hypervisors log
         * every store), so a reading vCPU must not look like a writer. */
        if ((touched & 63) == 0) {
            u64 t = step ? now : rdtsc();
            if (t - published >= publish_ticks) {
                published = t;
                st->pages = touched;
                if (writes != st->writes) st->writes = writes;
                if (passes != st->passes) st->passes = passes;
            }
        }

        if (pass_done) {
            passes++;
            if (passes_wanted && passes >= passes_wanted) {
                st->pages = touched;
                st->writes = writes;
                st->passes = passes;
                st->tsc_now = rdtsc();
                st->state = STATE_FINISHED;
                halt_forever();
            }
        }
    }
    (void)sink;
}

void guest_main_bsp(u32 id) {
    STATS->magic = STATS_MAGIC;
    STATS->version = 1;
    if (CONFIG->magic != CONFIG_MAGIC) fail(ERR_BAD_MAGIC, 0);
    if (CONFIG->version != CONFIG_VERSION) fail(ERR_BAD_VERSION, 0);
    if (CONFIG->nr_vcpus > MAX_VCPUS) fail(ERR_TOO_MANY_VCPUS, 0);
    map_high_memory();
    install_interrupts();
    load_interrupts();
    calibrate_timer();
    console("dirtymig guest: ");
    console_number(CONFIG->nr_vcpus);
    console(" vCPUs, ");
    console_number(CONFIG->memory_size >> 20);
    console(" MiB\n");
    if (CONFIG->nr_vcpus > 1) start_other_cpus();
    run_workload(id);
}

void guest_main_ap(u32 id) {
    run_workload(id);
}
