// CKVM: <linux/kvm.h> for Swift. Constants, struct layouts and union accessors only; no logic.
// Swift cannot import function-like macros (_IOW, _IOR ...), so every ioctl request number is
// re-exported here as a constant, and ioctl's variadic prototype is wrapped once.
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <stdint.h>

// ---- system ioctls (/dev/kvm)
static const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;

// ---- VM ioctls
static const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long CKVM_ENABLE_CAP = KVM_ENABLE_CAP;
static const unsigned long CKVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long CKVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG;
static const unsigned long CKVM_RESET_DIRTY_RINGS = KVM_RESET_DIRTY_RINGS;
static const unsigned long CKVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long CKVM_SET_CLOCK = KVM_SET_CLOCK;
static const unsigned long CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
static const unsigned long CKVM_GET_XSAVE2 = KVM_GET_XSAVE2;

// ---- vCPU ioctls
static const unsigned long CKVM_RUN = KVM_RUN;
static const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CKVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long CKVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long CKVM_GET_FPU = KVM_GET_FPU;
static const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
static const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long CKVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long CKVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long CKVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long CKVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;

// ---- capabilities
static const int CKVM_CAP_IRQCHIP = KVM_CAP_IRQCHIP;
static const int CKVM_CAP_NR_VCPUS = KVM_CAP_NR_VCPUS;
static const int CKVM_CAP_MAX_VCPUS = KVM_CAP_MAX_VCPUS;
static const int CKVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
static const int CKVM_CAP_SET_TSS_ADDR = KVM_CAP_SET_TSS_ADDR;
static const int CKVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
static const int CKVM_CAP_GET_TSC_KHZ = KVM_CAP_GET_TSC_KHZ;
static const int CKVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
static const int CKVM_CAP_DIRTY_LOG_RING = KVM_CAP_DIRTY_LOG_RING;
static const int CKVM_CAP_DIRTY_LOG_RING_ACQ_REL = KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
static const int CKVM_CAP_XSAVE = KVM_CAP_XSAVE;
static const int CKVM_CAP_XSAVE2 = KVM_CAP_XSAVE2;
static const int CKVM_CAP_XCRS = KVM_CAP_XCRS;
static const int CKVM_CAP_DEBUGREGS = KVM_CAP_DEBUGREGS;
static const int CKVM_CAP_VCPU_EVENTS = KVM_CAP_VCPU_EVENTS;
static const int CKVM_CAP_ADJUST_CLOCK = KVM_CAP_ADJUST_CLOCK;
static const int CKVM_CAP_TSC_CONTROL = KVM_CAP_TSC_CONTROL;

static const uint64_t CKVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
static const uint64_t CKVM_DIRTY_LOG_INITIALLY_SET = KVM_DIRTY_LOG_INITIALLY_SET;
static const uint32_t CKVM_MEM_LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES;
static const uint32_t CKVM_DIRTY_GFN_F_DIRTY = KVM_DIRTY_GFN_F_DIRTY;
static const uint32_t CKVM_DIRTY_GFN_F_RESET = KVM_DIRTY_GFN_F_RESET;
static const long CKVM_DIRTY_LOG_PAGE_OFFSET = KVM_DIRTY_LOG_PAGE_OFFSET;
static const int CKVM_API_VERSION = KVM_API_VERSION;
static const int CKVM_MAX_CPUID_ENTRIES = 256;

// ---- exit reasons
static const uint32_t CKVM_EXIT_UNKNOWN = KVM_EXIT_UNKNOWN;
static const uint32_t CKVM_EXIT_IO = KVM_EXIT_IO;
static const uint32_t CKVM_EXIT_HLT = KVM_EXIT_HLT;
static const uint32_t CKVM_EXIT_MMIO = KVM_EXIT_MMIO;
static const uint32_t CKVM_EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN;
static const uint32_t CKVM_EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY;
static const uint32_t CKVM_EXIT_INTR = KVM_EXIT_INTR;
static const uint32_t CKVM_EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR;
static const uint32_t CKVM_EXIT_SYSTEM_EVENT = KVM_EXIT_SYSTEM_EVENT;
static const uint32_t CKVM_EXIT_DIRTY_RING_FULL = KVM_EXIT_DIRTY_RING_FULL;
static const uint8_t CKVM_EXIT_IO_IN = KVM_EXIT_IO_IN;
static const uint8_t CKVM_EXIT_IO_OUT = KVM_EXIT_IO_OUT;

static const uint32_t CKVM_MP_STATE_RUNNABLE = KVM_MP_STATE_RUNNABLE;
static const uint32_t CKVM_MP_STATE_UNINITIALIZED = KVM_MP_STATE_UNINITIALIZED;

static const uint32_t CKVM_IRQCHIP_PIC_MASTER = KVM_IRQCHIP_PIC_MASTER;
static const uint32_t CKVM_IRQCHIP_PIC_SLAVE = KVM_IRQCHIP_PIC_SLAVE;
static const uint32_t CKVM_IRQCHIP_IOAPIC = KVM_IRQCHIP_IOAPIC;
/* kvm_clock_data.flags KVM_SET_CLOCK accepts; KVM_GET_CLOCK may report more. */
static const uint32_t CKVM_CLOCK_REALTIME = KVM_CLOCK_REALTIME;
/* Size of struct kvm_xsave without its flexible tail (KVM_GET_XSAVE / KVM_SET_XSAVE). */
static const int CKVM_XSAVE_LEGACY_SIZE = sizeof(struct kvm_xsave);

// ---- ioctl, wrapped once: ioctl(2) is variadic, which Swift cannot call directly.
static inline int ckvm_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
static inline int ckvm_ioctl_value(int fd, unsigned long request, unsigned long value) {
    return ioctl(fd, request, value);
}

// ---- kvm_run's anonymous unions
struct ckvm_io_exit { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; };
static inline struct ckvm_io_exit ckvm_run_io(const struct kvm_run *run) {
    struct ckvm_io_exit v = { run->io.direction, run->io.size, run->io.port, run->io.count, run->io.data_offset };
    return v;
}
static inline uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}
static inline uint32_t ckvm_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
struct ckvm_mmio_exit { uint64_t phys_addr; uint32_t len; uint8_t is_write; };
static inline struct ckvm_mmio_exit ckvm_run_mmio(const struct kvm_run *run) {
    struct ckvm_mmio_exit v = { run->mmio.phys_addr, run->mmio.len, run->mmio.is_write };
    return v;
}
/* The 8 bytes an MMIO exit carries: a write's data, or where a read's goes. */
static inline uint8_t *ckvm_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }
static const int CKVM_MMIO_DATA_SIZE = sizeof(((struct kvm_run *)0)->mmio.data);
static inline uint32_t ckvm_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

// ---- kvm_cpuid2 with room for its flexible array
// Same layout as struct kvm_cpuid2 followed by 256 entries.
struct ckvm_cpuid {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[256];
};

// ---- struct kvm_msrs / kvm_msr_list headers (their entries follow, counted by nmsrs).
// Swift builds these buffers by hand: a header, then the array.
static const int CKVM_MSRS_HEADER_SIZE = sizeof(struct kvm_msrs);
static const int CKVM_MSR_ENTRY_SIZE = sizeof(struct kvm_msr_entry);
static const int CKVM_MSR_LIST_HEADER_SIZE = sizeof(struct kvm_msr_list);

// ---- dirty ring entry flags: acquire/release accesses (the ring is shared with the kernel)
static inline uint32_t ckvm_dirty_gfn_load_flags(const struct kvm_dirty_gfn *gfn) {
    return __atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE);
}
static inline void ckvm_dirty_gfn_store_flags(struct kvm_dirty_gfn *gfn, uint32_t flags) {
    __atomic_store_n(&gfn->flags, flags, __ATOMIC_RELEASE);
}
// kvm_run.immediate_exit is read by the kernel on entry to KVM_RUN; written from another thread.
static inline void ckvm_run_set_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}



// ---- syscalls Glibc's Swift overlay does not declare (no logic: thin shims)
#include <sys/syscall.h>
#include <unistd.h>
static inline int ckvm_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}
static inline int ckvm_gettid(void) { return (int)syscall(SYS_gettid); }
// prctl is variadic, which Swift cannot call.
#include <sys/prctl.h>
static inline int ckvm_set_thread_name(const char *name) { return prctl(PR_SET_NAME, name, 0, 0, 0); }

// ---- KVM_PRE_FAULT_MEMORY (Linux 6.10; newer than some distributions' headers, so spelled out)
struct ckvm_pre_fault_memory { uint64_t gpa; uint64_t size; uint64_t flags; uint64_t padding[5]; };
static const int CKVM_CAP_PRE_FAULT_MEMORY = 236;
static const unsigned long CKVM_PRE_FAULT_MEMORY = _IOWR(KVMIO, 0xd5, struct ckvm_pre_fault_memory);
#endif
