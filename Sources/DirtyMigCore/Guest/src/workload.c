/* The workload guest's 64-bit part: start the other CPUs, then on every CPU run the workload
 * its config entry describes, counting the touched pages in its stats record.
 * Freestanding: no libc, no interrupts (IF stays 0 forever), identity-mapped memory.
 *
 * Two halves. Setup (ring 0): validate the config, map RAM, start the APs, turn each vCPU's
 * config entry into a `plan`. The workload loop (ring 3, section .text.user): reads only its
 * plan and writes only its working set, its stats record and (check) its output record, and it
 * keeps all its state in registers (check: some in its output record), so the only page a
 * reading vCPU dirties is the stats page (build.sh checks the
 * compiled loop for stack accesses). Ring 3 because PVM-style KVM runs an unmodified guest's
 * ring-0 code in an instruction emulator and only ring 3 natively (see boot.S). */
#include "layout.h"

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct config_header {
    u32 magic, version, header_size, entry_size, nr_vcpus, flags;
    u64 tsc_hz, memory_size, low_memory_size, workload_base, reserved;
};

struct vcpu_config {
    u32 kind;
    u16 pattern, content;
    u32 write_percent, hot_ppm;
    u64 ws_offset, ws_size, rate, passes, seed, emit_us;
};

struct stats_header {
    u32 magic, version, booted, error;
    u64 reserved[6];
};

struct vcpu_stats {
    u64 pages, passes;
    u32 state, apic_id;
    u64 writes, tsc_start, tsc_now, errors, reserved;
};

/* A check vCPU's output record: written just before it tells the host on OUTPUT_PORT. */
struct output_record {
    u64 sequence;                   /* 1 for the first record, then +1 per record */
    u64 pages;                      /* pages touched when it was written */
    u64 errors;                     /* mismatches found so far */
    u64 checksum;                   /* wrapping sum of the first words read in the last complete pass */
    u64 passes;                     /* complete passes (the checksum is the last one's; 0: none) */
    u64 tsc;                        /* when it was written */
    u32 apic_id, reserved32;
    u64 next_tsc;                   /* the guest's own: when the next record is due */
    /* `passes` and `next_tsc` are the check loop's own state too (it has no register left for
     * them), so they are kept up to date with or without emit=. */
};

_Static_assert(sizeof(struct config_header) == CONFIG_HEADER_SIZE, "config header layout");
_Static_assert(sizeof(struct vcpu_config) == CONFIG_ENTRY_SIZE, "config entry layout");
_Static_assert(sizeof(struct stats_header) == 64, "stats header layout");
_Static_assert(sizeof(struct vcpu_stats) == 64, "stats record layout");
_Static_assert(sizeof(struct output_record) == 64, "output record layout");

#define CONFIG ((volatile struct config_header *)CONFIG_ADDR)
#define VCPU_CONFIG(i) ((volatile struct vcpu_config *)(u64)(CONFIG_ADDR + CONFIG_HEADER_SIZE + CONFIG_ENTRY_SIZE * (u64)(i)))
#define STATS ((volatile struct stats_header *)STATS_ADDR)
#define VCPU_STATS(i) ((volatile struct vcpu_stats *)(u64)(STATS_ADDR + 64 + 64 * (u64)(i)))
#define OUTPUT_RECORD(i) ((volatile struct output_record *)(u64)(OUTPUT_ADDR + 64 * (u64)(i)))
#define LAPIC(reg) (*(volatile u32 *)(u64)(LAPIC_BASE + (reg)))

/* Everything a vCPU's ring-3 loop needs, computed once in ring 0; read-only afterwards. */
struct plan {
    volatile struct vcpu_stats *stats;
    volatile struct output_record *output;
    u64 emit_ticks;                 /* check: write an output record this often (0 = never) */
    u64 base, low, hole;            /* RAM offset of page 0; RAM below 4 GiB; 4 GiB - low */
    u64 pages;                      /* working-set pages (n) */
    u64 limit;                      /* touches after which the vCPU finishes (0 = never) */
    u64 paced, step, step_rem, rate, max_debt;  /* ticks per page = step + step_rem / rate */
    u64 publish_ticks;              /* publish the counters this often */
    u64 mask, shift, seed;          /* random: LCG modulo mask + 1, scrambled */
    u64 hot_pages, cold_pages, hot_threshold;   /* hot: part sizes; P(hot) = threshold / 2^32 */
    u64 write_percent;              /* mix */
    u64 apic_id;
    u32 kind, pattern;
    u64 content;                    /* write: CONTENT_* (mix has no register left to fill pages) */
};

static struct plan plans[MAX_VCPUS];

extern void halt_forever(void) __attribute__((noreturn));
extern void enter_user(u64 rip, u64 rsp, u64 arg) __attribute__((noreturn));
extern void user_park(u64 apic_id) __attribute__((noreturn));

/* Jumps (no call: that would push) to user_park. */
#define USER_PARK(apic_id) do { \
        __asm__ volatile("jmp user_park" : : "D"(apic_id) : "memory"); __builtin_unreachable(); \
    } while (0)
extern char trampoline_start[], trampoline_end[];

static inline __attribute__((always_inline)) u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline __attribute__((always_inline)) void cpu_relax(void) { __asm__ volatile("pause"); }
static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outl(u16 port, u32 value) { __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port)); }
static inline void wrmsr(u32 msr, u64 value) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)));
}
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

/* ======================= ring 3: the workload loop ======================= */

#define USER __attribute__((section(".text.user")))
#define LCG_MUL 6364136223846793005ul       /* = 1 mod 4 */
#define LCG_ADD 1442695040888963407ul       /* odd: full period modulo any power of two */
#define SCRAMBLE_MUL 0x9E3779B97F4A7C15ul   /* odd */

/* Publishes the counters (plain 8-byte stores; the host reads them while we run). */
static inline __attribute__((always_inline))
void publish(const volatile struct plan *p, u64 touched, u32 kind, u64 tsc) {
    volatile struct vcpu_stats *st = p->stats;
    st->pages = touched;
    /* The mix accumulator starts at 0, so after t touches exactly floor(t * pct / 100) wrote. */
    st->writes = kind == KIND_WRITE || kind == KIND_CHECK ? touched
               : kind == KIND_MIX ? touched * p->write_percent / 100 : 0;
    st->passes = touched / p->pages;    /* every pattern's pass is n touches */
    st->tsc_now = tsc;
}

/* The check workload's mix, and the value of `page` in the pass whose key is
 * `key` = seed + pass * CHECK_MUL (see layout.h). */
static inline __attribute__((always_inline)) u64 check_mix(u64 x) {
    x ^= x >> 32;
    x *= CHECK_MUL;
    x ^= x >> 29;
    x *= CHECK_MUL;
    x ^= x >> 32;
    return x;
}

static inline __attribute__((always_inline)) u64 check_value(u64 page, u64 key) {
    return check_mix((page * CHECK_MUL) ^ check_mix(key)) | 1;
}

/* Text-like content: words of English, each with its space (some with a full stop), one of 64
 * chosen per word by an xorshift. zstd -1 compresses such pages about 3x, as it does prose.
 * An entry holds the word's bytes (at most 7) and, in its top byte, how many there are. */
#define WORD(len, text) ((u64)(len) << 56 | (text))
static const u64 text_words[64] = {
#define W1(a) (u64)(a)
#define W2(a, b) (W1(a) | (u64)(b) << 8)
#define W3(a, b, c) (W2(a, b) | (u64)(c) << 16)
#define W4(a, b, c, d) (W3(a, b, c) | (u64)(d) << 24)
#define W5(a, b, c, d, e) (W4(a, b, c, d) | (u64)(e) << 32)
#define W6(a, b, c, d, e, f) (W5(a, b, c, d, e) | (u64)(f) << 40)
#define W7(a, b, c, d, e, f, g) (W6(a, b, c, d, e, f) | (u64)(g) << 48)
    WORD(4, W4('t','h','e',' ')), WORD(3, W3('o','f',' ')), WORD(4, W4('a','n','d',' ')), WORD(3, W3('t','o',' ')),
    WORD(3, W3('i','n',' ')), WORD(3, W3('i','s',' ')), WORD(5, W5('t','h','a','t',' ')), WORD(4, W4('f','o','r',' ')),
    WORD(3, W3('i','t',' ')), WORD(3, W3('a','s',' ')), WORD(4, W4('w','a','s',' ')), WORD(5, W5('w','i','t','h',' ')),
    WORD(3, W3('b','e',' ')), WORD(3, W3('b','y',' ')), WORD(3, W3('o','n',' ')), WORD(4, W4('n','o','t',' ')),
    WORD(5, W5('p','a','g','e',' ')), WORD(5, W5('t','h','i','s',' ')), WORD(4, W4('a','r','e',' ')), WORD(3, W3('o','r',' ')),
    WORD(7, W7('m','e','m','o','r','y',' ')), WORD(5, W5('f','r','o','m',' ')), WORD(3, W3('a','t',' ')), WORD(6, W6('w','h','i','c','h',' ')),
    WORD(4, W4('b','u','t',' ')), WORD(5, W5('h','a','v','e',' ')), WORD(3, W3('a','n',' ')), WORD(5, W5('t','h','e','y',' ')),
    WORD(4, W4('y','o','u',' ')), WORD(5, W5('w','e','r','e',' ')), WORD(4, W4('h','e','r',' ')), WORD(6, W6('t','h','e','r','e',' ')),
    WORD(5, W5('b','e','e','n',' ')), WORD(4, W4('o','n','e',' ')), WORD(4, W4('a','l','l',' ')), WORD(3, W3('w','e',' ')),
    WORD(6, W6('t','h','e','i','r',' ')), WORD(4, W4('h','a','s',' ')), WORD(6, W6('w','o','u','l','d',' ')), WORD(5, W5('w','h','e','n',' ')),
    WORD(3, W3('i','f',' ')), WORD(3, W3('s','o',' ')), WORD(3, W3('n','o',' ')), WORD(5, W5('w','i','l','l',' ')),
    WORD(5, W5('m','o','r','e',' ')), WORD(4, W4('c','a','n',' ')), WORD(4, W4('o','u','t',' ')), WORD(3, W3('u','p',' ')),
    WORD(4, W4('w','h','o',' ')), WORD(5, W5('t','h','e','m',' ')), WORD(5, W5('s','o','m','e',' ')), WORD(5, W5('i','n','t','o',' ')),
    WORD(5, W5('o','n','l','y',' ')), WORD(6, W6('a','b','o','u','t',' ')), WORD(5, W5('t','h','a','n',' ')), WORD(6, W6('t','h','e','n','.',' ')),
    WORD(6, W6('c','o','u','l','d',' ')), WORD(6, W6('h','o','s','t','.',' ')), WORD(5, W5('w','h','a','t',' ')), WORD(6, W6('t','i','m','e','.',' ')),
    WORD(4, W4('i','t','s',' ')), WORD(6, W6('t','h','e','s','e',' ')), WORD(4, W4('t','w','o',' ')), WORD(5, W5('d','a','y','.',' ')),
};

/* Fills the rest of the page whose first word is `word` (written already) with `content`, text
 * or random, from the xorshift state `x` (never 0): a different page every write. The loop it
 * is inlined into has few registers left (see workload_loop), so this takes two more only: the
 * state and one for the words; `word` itself walks the page (the caller is done with it).
 * Text words go in with one unaligned 8-byte store each (the bytes after a word are overwritten
 * by the next); the last few bytes, where such a store would run past the page, are spaces. */
static inline __attribute__((always_inline))
void fill_page(volatile u64 *word, u64 content, u64 x) {
    volatile u8 *at = (volatile u8 *)(word + 1);
    if (content == CONTENT_RANDOM) {
        do {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *(volatile u64 *)at = x;
            at += 8;
        } while ((u64)at & 4095);
        return;
    }
    do {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        u64 entry = text_words[x & 63];
        *(volatile u64 *)at = entry & 0x00FFFFFFFFFFFFFFul;
        at += entry >> 56;
    } while (((u64)at & 4095) <= 4096 - 8);
    while ((u64)at & 4095) *at++ = ' ';
}

static inline __attribute__((always_inline, noreturn))
void workload_loop(const volatile struct plan *p, const u32 kind, const u32 pattern) {
    u64 touched = 0, cursor, accumulator = 0, remainder = 0;
    u64 now = rdtsc(), due = now, published = now;
    /* check: the sum of the first words read in this pass. Its other state lives in its output
     * record (the passes done, when the next record is due): kept in registers too, the paced
     * loop ran out of them and spilled to the stack. */
    u64 sum = 0;
    if (kind == KIND_CHECK) p->output->next_tsc = now + p->emit_ticks;
    if (pattern == PATTERN_SEQ) cursor = 0;
    else if (pattern == PATTERN_RANDOM) cursor = p->seed & p->mask;
    else cursor = p->seed | 1;                      /* xorshift state, never 0 */
    p->stats->tsc_start = now;
    p->stats->tsc_now = now;
    p->stats->state = STATE_RUNNING;

    for (;;) {
        if (p->paced) {
            /* Deadline pacing: page k is due at start + k * ticks-per-page, exactly (integer step
             * plus a remainder). Falling behind by more than max_debt (a paused VM) forgives the
             * rest, so a resumed guest catches up at most 100 ms worth of pages. */
            due += p->step;
            remainder += p->step_rem;
            if (remainder >= p->rate) { remainder -= p->rate; due++; }
            now = rdtsc();
            if ((i64)(now - due) > (i64)p->max_debt) due = now - p->max_debt;
            while ((i64)(due - now) > 0) { cpu_relax(); now = rdtsc(); }
        }

        u64 page;
        if (pattern == PATTERN_SEQ) {
            page = cursor;
            if (++cursor == p->pages) cursor = 0;
        } else if (pattern == PATTERN_RANDOM) {
            /* A full-period LCG over [0, 2^k) passes every value once per period; a bijective
             * scramble hides its regular low bits; values >= n are skipped. */
            u64 mask = p->mask, shift = p->shift;
            do {
                cursor = (cursor * LCG_MUL + LCG_ADD) & mask;
                page = cursor ^ (cursor >> shift);
                page = (page * SCRAMBLE_MUL) & mask;
                page ^= page >> shift;
            } while (page >= p->pages);
        } else {
            cursor ^= cursor << 13;
            cursor ^= cursor >> 7;
            cursor ^= cursor << 17;
            u64 low32 = cursor & 0xFFFFFFFFul;
            if ((cursor >> 32) < p->hot_threshold) page = (low32 * p->hot_pages) >> 32;
            else page = p->hot_pages + ((low32 * p->cold_pages) >> 32);
        }

        u64 offset = p->base + (page << 12);
        volatile u64 *word = (volatile u64 *)(offset < p->low ? offset : offset + p->hole);
        touched++;
        if (kind == KIND_WRITE) {
            *word = touched;
            if (p->content != CONTENT_SPARSE) fill_page(word, p->content, (touched * SCRAMBLE_MUL) | 1);
        } else if (kind == KIND_READ) {
            (void)*word;
        } else if (kind == KIND_CHECK) {
            /* Read the page's first and last words, compare them with what the last pass wrote
             * (nothing, 0, before the first), then write this pass's value to both: a page lost,
             * stale (an older pass's value) or torn (one end new, the other old) is a mismatch. */
            volatile struct output_record *out = p->output;
            u64 done = out->passes;         /* passes complete before this one */
            u64 expected = done ? check_value(page, p->seed + done * CHECK_MUL) : 0;
            u64 seen = word[0];
            sum += seen;
            if (seen != expected || word[511] != expected) p->stats->errors = p->stats->errors + 1;
            u64 value = check_value(page, p->seed + (out->passes + 1) * CHECK_MUL);
            word[0] = value;
            word[511] = value;
            /* Every pattern check allows visits each page once in every n consecutive touches
             * (seq plainly; random because each period of its LCG yields exactly n accepted
             * values), so a pass ends at every multiple of n touches. */
            if (touched == (out->passes + 1) * p->pages) {
                out->checksum = sum;
                out->passes = out->passes + 1;
                sum = 0;
            }
        } else {
            accumulator += p->write_percent;
            if (accumulator >= 100) {
                accumulator -= 100;
                *word = touched;
            }
            else (void)*word;
        }

        /* Publish about every 8 ms: every store to the stats page dirties it, and a reading
         * vCPU must not look like a writer. Unpaced, look at the clock every 64 pages only. */
        if (p->paced || (touched & 63) == 0) {
            /* (check reads the clock again: keeping `now` across its visit cost the paced random
             * loop a register it did not have) */
            u64 t = p->paced && kind != KIND_CHECK ? now : rdtsc();
            if (t - published >= p->publish_ticks) {
                published = t;
                publish(p, touched, kind, t);
            }
            /* check, emit=: the next output record, due every emit_ticks from the start. A vCPU
             * more than an interval late (a paused VM) skips the records it missed instead of
             * writing them in a burst. One OUT to OUTPUT_PORT hands the record to the host. */
            if (kind == KIND_CHECK && p->emit_ticks && (i64)(t - p->output->next_tsc) >= 0) {
                volatile struct output_record *out = p->output;
                u64 next = out->next_tsc + p->emit_ticks;
                out->next_tsc = (i64)(t - next) >= 0 ? t + p->emit_ticks : next;
                out->sequence = out->sequence + 1;
                out->pages = touched;
                out->errors = p->stats->errors;
                out->tsc = t;
                __asm__ volatile("outl %0, %1" : : "a"((u32)p->apic_id), "Nd"((u16)OUTPUT_PORT) : "memory");
            }
        }

        if (touched == p->limit) {
            publish(p, touched, kind, rdtsc());
            p->stats->state = STATE_FINISHED;
            USER_PARK(p->apic_id);
        }
    }
}

/* Ring-3 entry (from enter_user): one specialized copy of the loop per kind and pattern. */
USER __attribute__((noreturn)) void user_main(const volatile struct plan *p) {
    u32 kind = p->kind, pattern = p->pattern;
    if (kind == KIND_WRITE) {
        if (pattern == PATTERN_SEQ) workload_loop(p, KIND_WRITE, PATTERN_SEQ);
        if (pattern == PATTERN_RANDOM) workload_loop(p, KIND_WRITE, PATTERN_RANDOM);
        workload_loop(p, KIND_WRITE, PATTERN_HOT);
    } else if (kind == KIND_READ) {
        if (pattern == PATTERN_SEQ) workload_loop(p, KIND_READ, PATTERN_SEQ);
        if (pattern == PATTERN_RANDOM) workload_loop(p, KIND_READ, PATTERN_RANDOM);
        workload_loop(p, KIND_READ, PATTERN_HOT);
    } else if (kind == KIND_CHECK) {
        /* Setup refused pattern hot: its touches do not visit every page once per pass. */
        if (pattern == PATTERN_SEQ) workload_loop(p, KIND_CHECK, PATTERN_SEQ);
        workload_loop(p, KIND_CHECK, PATTERN_RANDOM);
    } else {
        if (pattern == PATTERN_SEQ) workload_loop(p, KIND_MIX, PATTERN_SEQ);
        if (pattern == PATTERN_RANDOM) workload_loop(p, KIND_MIX, PATTERN_RANDOM);
        workload_loop(p, KIND_MIX, PATTERN_HOT);
    }
}

/* ======================= ring 0: setup ======================= */

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

static u64 tsc_hz(void) {
    u64 hz = CONFIG->tsc_hz;
    return hz ? hz : 2000000000ul;      /* a guess; the host always fills it in */
}

static void delay_us(u64 us) {
    u64 end = rdtsc() + tsc_hz() / 1000000 * us;
    while (rdtsc() < end) cpu_relax();
}

/* Identity-map the GiBs above 4 GiB that hold RAM (the first 4 were mapped before long mode). */
static void map_high_memory(void) {
    u64 total = CONFIG->memory_size, low = CONFIG->low_memory_size;
    if (low > total || low > 0xE0000000ul) fail(ERR_BAD_VERSION, 0);
    if (total <= low) return;
    if (total - low > ((u64)MAX_GIB << 30) - HIGH_MEMORY_BASE) fail(ERR_MEMORY_TOO_LARGE, 0);
    u64 top = HIGH_MEMORY_BASE + (total - low);
    u64 gib = (top + (1ul << 30) - 1) >> 30;
    volatile u64 *pdpt = (volatile u64 *)(PT_BASE + 0x1000);
    for (u64 g = 4; g < gib; g++) {
        volatile u64 *pd = (volatile u64 *)(PT_BASE + 0x2000 + g * 0x1000);
        for (u64 i = 0; i < 512; i++) pd[i] = ((g << 30) + (i << 21)) | 0x87;
        pdpt[g] = (u64)pd | 7;
    }
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

/* INIT, then SIPI twice, to all CPUs but this one (the SDM's universal start-up algorithm). */
static void start_other_cpus(void) {
    volatile u8 *dst = (volatile u8 *)TRAMPOLINE_ADDR;
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

/* Turns this vCPU's config entry into its plan, then enters the ring-3 loop. */
static __attribute__((noreturn)) void run_workload(u32 id) {
    if (id >= MAX_VCPUS) halt_forever();
    volatile struct vcpu_stats *st = VCPU_STATS(id);
    st->pages = 0;
    st->passes = 0;
    st->writes = 0;
    st->tsc_start = 0;
    st->tsc_now = 0;
    st->errors = 0;
    st->apic_id = id;
    __atomic_fetch_add(&STATS->booted, 1, __ATOMIC_SEQ_CST);
    if (id >= CONFIG->nr_vcpus) { st->state = STATE_IDLE; halt_forever(); }

    volatile struct vcpu_config *cfg = VCPU_CONFIG(id);
    u32 kind = cfg->kind, pattern = cfg->pattern;
    u64 n = cfg->ws_size >> 12;
    if (kind == KIND_IDLE || n == 0) { st->state = STATE_IDLE; halt_forever(); }
    if (kind > KIND_CHECK || pattern > PATTERN_HOT || cfg->content > CONTENT_RANDOM) fail(ERR_BAD_VERSION, st);
    if (kind == KIND_CHECK && pattern == PATTERN_HOT) fail(ERR_BAD_WORKLOAD, st);

    struct plan *p = &plans[id];
    u64 total = CONFIG->memory_size, low = CONFIG->low_memory_size;
    u64 base = CONFIG->workload_base + cfg->ws_offset;
    if (base < CONFIG->workload_base || base + (n << 12) < base || base + (n << 12) > total
        || n > (1ul << 40)) fail(ERR_WS_OUT_OF_RANGE, st);
    p->stats = st;
    volatile struct output_record *out = OUTPUT_RECORD(id);
    for (int i = 0; i < 8; i++) ((volatile u64 *)out)[i] = 0;     /* sequence 0: the first line is 1 */
    out->apic_id = id;
    p->output = out;
    p->base = base;
    p->low = low;
    p->hole = HIGH_MEMORY_BASE - low;
    p->pages = n;
    p->apic_id = id;
    p->kind = kind;
    p->pattern = pattern;
    p->content = cfg->content;
    u64 passes = cfg->passes;
    p->limit = passes && passes <= ~0ul / n ? passes * n : 0;

    u64 hz = tsc_hz(), rate = cfg->rate;
    p->publish_ticks = hz / 128;                    /* ~8 ms */
    /* The host allows 1 ms to 10 s (hz * 10^7 fits in 64 bits for any TSC below 1.8 THz). */
    u64 emit_us = kind == KIND_CHECK && cfg->emit_us <= 10000000 ? cfg->emit_us : 0;
    p->emit_ticks = emit_us ? (hz * emit_us / 1000000 ? hz * emit_us / 1000000 : 1) : 0;
    p->max_debt = hz / 10;                          /* 100 ms */
    p->rate = rate;
    if (rate) {
        /* ticks per page = hz * 4096 / rate, as an integer step and a remainder (in units of
         * 1/rate); hz * 4096 fits in 64 bits for any TSC below 4.5 PHz. */
        p->step = hz * 4096 / rate;
        p->step_rem = hz * 4096 % rate;
    }
    p->paced = rate && (p->step || p->step_rem);

    u64 bits = 0;
    while ((1ul << bits) < n) bits++;
    p->mask = (1ul << bits) - 1;
    p->shift = bits / 2 ? bits / 2 : 1;
    p->seed = cfg->seed;

    u64 ppm = cfg->hot_ppm > 1000000 ? 1000000 : cfg->hot_ppm;
    u64 hot = n * ppm / 1000000;
    if (hot < 1) hot = 1;
    if (hot > n) hot = n;
    p->hot_pages = hot;
    p->cold_pages = n - hot;
    /* The hot part takes 1 - F of the accesses (all of them when there is no cold part). */
    p->hot_threshold = hot == n ? (1ul << 32) : ((1000000 - ppm) << 32) / 1000000;
    p->write_percent = cfg->write_percent > 100 ? 100 : cfg->write_percent;

    /* SYSCALL (user_park's way back to ring 0, which halts): CS 0x18, SS 0x20, RIP halt_forever. */
    wrmsr(0xC0000080, rdmsr(0xC0000080) | 1);       /* EFER.SCE */
    wrmsr(0xC0000081, (u64)SEL_CODE64 << 32);       /* STAR */
    wrmsr(0xC0000082, (u64)halt_forever);           /* LSTAR */
    wrmsr(0xC0000084, 0x3700);                      /* FMASK: IOPL, DF, IF, TF */

    u64 stack_top = STACKS_ADDR + ((u64)(id + 1) << STACK_SHIFT);
    enter_user((u64)user_main, stack_top - 8, (u64)p);
}

void guest_main_bsp(u32 id) {
    STATS->booted = 0;
    STATS->error = 0;
    STATS->version = STATS_VERSION;
    STATS->magic = STATS_MAGIC;
    if (CONFIG->magic != CONFIG_MAGIC) fail(ERR_BAD_MAGIC, 0);
    if (CONFIG->version != CONFIG_VERSION || CONFIG->header_size != CONFIG_HEADER_SIZE
        || CONFIG->entry_size != CONFIG_ENTRY_SIZE) fail(ERR_BAD_VERSION, 0);
    if (CONFIG->nr_vcpus > MAX_VCPUS) fail(ERR_TOO_MANY_VCPUS, 0);
    map_high_memory();
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
