#ifndef CUSERFAULTFD_H
#define CUSERFAULTFD_H
// <linux/userfaultfd.h> for Swift: the ioctl numbers, the structs and the fault message's union.
// No logic: UserFaultFD.swift wraps these once, in typed throwing Swift.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static const unsigned long CUFFD_IOC_NEW = USERFAULTFD_IOC_NEW;
static const unsigned long CUFFDIO_API = UFFDIO_API;
static const unsigned long CUFFDIO_REGISTER = UFFDIO_REGISTER;
static const unsigned long CUFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
static const unsigned long CUFFDIO_WAKE = UFFDIO_WAKE;
static const unsigned long CUFFDIO_COPY = UFFDIO_COPY;
static const unsigned long CUFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
static const uint64_t CUFFD_API = UFFD_API;
static const uint64_t CUFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING;
static const uint64_t CUFFD_FEATURE_MISSING_SHMEM = UFFD_FEATURE_MISSING_SHMEM;
static const uint64_t CUFFD_FEATURE_THREAD_ID = UFFD_FEATURE_THREAD_ID;
static const uint64_t CUFFDIO_COPY_MODE_DONTWAKE = UFFDIO_COPY_MODE_DONTWAKE;
static const uint8_t CUFFD_EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT;
static const uint64_t CUFFD_PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE;
static const int CUFFD_MSG_SIZE = sizeof(struct uffd_msg);
/* Which ioctls a registered range supports (uffdio_register.ioctls is a bit per _UFFDIO_ number). */
static const uint64_t CUFFDIO_COPY_BIT = (uint64_t)1 << _UFFDIO_COPY;
static const uint64_t CUFFDIO_ZEROPAGE_BIT = (uint64_t)1 << _UFFDIO_ZEROPAGE;

// ioctl(2) and syscall(2) are variadic, which Swift cannot call directly.
static inline int cuffd_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
static inline int cuffd_syscall_open(int flags) { return (int)syscall(SYS_userfaultfd, flags); }

// fallocate(2) and pipe2(2) need _GNU_SOURCE, which Glibc's Swift overlay is built without.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <linux/falloc.h>
/* Drops `length` bytes at `offset` of a memory file (a memfd): the pages read as missing after. */
static inline int cuffd_punch_hole(int fd, long offset, long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}
static inline int cuffd_pipe_cloexec_nonblock(int fds[2]) { return pipe2(fds, O_CLOEXEC | O_NONBLOCK); }

// The fault message's union, read field by field.
struct cuffd_fault { uint8_t event; uint64_t flags; uint64_t address; uint32_t thread_id; };
static inline struct cuffd_fault cuffd_read_fault(const void *message) {
    const struct uffd_msg *m = (const struct uffd_msg *)message;
    struct cuffd_fault f = { m->event, 0, 0, 0 };
    if (m->event == UFFD_EVENT_PAGEFAULT) {
        f.flags = m->arg.pagefault.flags;
        f.address = m->arg.pagefault.address;
        f.thread_id = m->arg.pagefault.feat.ptid;
    }
    return f;
}
#endif
