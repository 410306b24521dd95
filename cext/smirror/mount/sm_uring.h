/* FUSE over io_uring for smirror's binding of libfuse 3.14 (which has no
 * io_uring of its own): the kernel's ring protocol (linux/fuse.h of 6.14
 * and later; the structs are repeated here, Debian's headers predate them)
 * and the few liburing calls the loop makes. Without liburing (SM_HAVE_URING
 * unset) every call fails with ENOSYS and the loop stays on /dev/fuse. */
#ifndef SM_URING_H
#define SM_URING_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <linux/fuse.h>

#ifdef SM_HAVE_URING
#include <liburing.h>
#endif

/* FUSE_OVER_IO_URING is (1ULL << 41): bit 9 of the INIT reply's flags2 */
#define SM_FUSE_OVER_IO_URING_FLAGS2 (1u << 9)
#ifndef FUSE_INIT_EXT
#define FUSE_INIT_EXT (1 << 30)
#endif

enum { SM_URING_CMD_REGISTER = 1, SM_URING_CMD_COMMIT_AND_FETCH = 2 };

struct sm_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;         /* the kernel's name of the request, for its commit */
    uint32_t payload_sz;        /* bytes in the payload buffer (request, then reply) */
    uint32_t padding;
    uint64_t reserved;
};

struct sm_uring_req_header {
    char in_out[128];           /* fuse_in_header, then fuse_out_header */
    char op_in[128];            /* the request's first argument (its op's struct) */
    struct sm_uring_ent_in_out ent;
};

struct sm_uring_cmd_req {       /* in the SQE's 80-byte command area */
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

/* The size of the struct the kernel puts in op_in for an opcode (the first
 * argument; 0 for calls whose arguments are names only, which come in the
 * payload), or -1 for one the binding does not serve over the ring (the
 * caller gets ENOSYS). libfuse 3.14 parses a request only contiguous:
 * header, this struct, then the payload. */
static inline long sm_op_in_size(uint32_t opcode, int setxattr_ext)
{
    switch (opcode) {
    case FUSE_LOOKUP: case FUSE_READLINK: case FUSE_UNLINK: case FUSE_RMDIR:
    case FUSE_SYMLINK: case FUSE_STATFS: case FUSE_REMOVEXATTR: case FUSE_DESTROY:
        return 0;
    case FUSE_FORGET: return sizeof(struct fuse_forget_in);
    case FUSE_BATCH_FORGET: return sizeof(struct fuse_batch_forget_in);
    case FUSE_GETATTR: return sizeof(struct fuse_getattr_in);
    case FUSE_SETATTR: return sizeof(struct fuse_setattr_in);
    case FUSE_ACCESS: return sizeof(struct fuse_access_in);
    case FUSE_MKNOD: return sizeof(struct fuse_mknod_in);
    case FUSE_MKDIR: return sizeof(struct fuse_mkdir_in);
    case FUSE_RENAME: return sizeof(struct fuse_rename_in);
    case FUSE_RENAME2: return sizeof(struct fuse_rename2_in);
    case FUSE_LINK: return sizeof(struct fuse_link_in);
    case FUSE_OPEN: case FUSE_OPENDIR: return sizeof(struct fuse_open_in);
    case FUSE_CREATE: return sizeof(struct fuse_create_in);
    case FUSE_READ: case FUSE_READDIR: case FUSE_READDIRPLUS: return sizeof(struct fuse_read_in);
    case FUSE_WRITE: return sizeof(struct fuse_write_in);
    case FUSE_FLUSH: return sizeof(struct fuse_flush_in);
    case FUSE_RELEASE: case FUSE_RELEASEDIR: return sizeof(struct fuse_release_in);
    case FUSE_FSYNC: case FUSE_FSYNCDIR: return sizeof(struct fuse_fsync_in);
    case FUSE_SETXATTR:
        return setxattr_ext ? (long)sizeof(struct fuse_setxattr_in) : FUSE_COMPAT_SETXATTR_IN_SIZE;
    case FUSE_GETXATTR: case FUSE_LISTXATTR: return sizeof(struct fuse_getxattr_in);
    case FUSE_GETLK: case FUSE_SETLK: case FUSE_SETLKW: return sizeof(struct fuse_lk_in);
    case FUSE_INTERRUPT: return sizeof(struct fuse_interrupt_in);
    case FUSE_BMAP: return sizeof(struct fuse_bmap_in);
    case FUSE_IOCTL: return sizeof(struct fuse_ioctl_in);
    case FUSE_POLL: return sizeof(struct fuse_poll_in);
    case FUSE_FALLOCATE: return sizeof(struct fuse_fallocate_in);
    case FUSE_COPY_FILE_RANGE: return sizeof(struct fuse_copy_file_range_in);
    case FUSE_LSEEK: return sizeof(struct fuse_lseek_in);
    default: return -1;
    }
}

typedef struct sm_ring {
#ifdef SM_HAVE_URING
    struct io_uring ring;
#endif
    int fd;                     /* the ring's, to poll; -1 before init */
} sm_ring;

static inline int sm_ring_available(void)
{
#ifdef SM_HAVE_URING
    return 1;
#else
    return 0;
#endif
}

/* 128-byte SQEs: the uring_cmd's 80-byte command area */
static inline int sm_ring_init(sm_ring *r, unsigned entries)
{
#ifdef SM_HAVE_URING
    struct io_uring_params p;
    int res;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    p.cq_entries = entries * 2;
    res = io_uring_queue_init_params(entries, &r->ring, &p);
    if (res < 0)
        return res;
    r->fd = r->ring.ring_fd;
    return 0;
#else
    (void)entries;
    r->fd = -1;
    return -ENOSYS;
#endif
}

/* Queue one FUSE ring command (not submitted yet): REGISTER with the
 * entry's two buffers (iov), or COMMIT_AND_FETCH of request commit_id. */
static inline int sm_ring_cmd(sm_ring *r, int fuse_fd, uint32_t cmd, struct iovec *iov,
                              uint16_t qid, uint64_t commit_id, void *user)
{
#ifdef SM_HAVE_URING
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    struct sm_uring_cmd_req *req;
    if (sqe == NULL) {
        io_uring_submit(&r->ring);
        sqe = io_uring_get_sqe(&r->ring);
        if (sqe == NULL)
            return -EBUSY;
    }
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd;
    sqe->cmd_op = cmd;
    if (iov != NULL) {
        sqe->addr = (uint64_t)(uintptr_t)iov;
        sqe->len = 2;
    }
    req = (struct sm_uring_cmd_req *)sqe->cmd;
    req->qid = qid;
    req->commit_id = commit_id;
    io_uring_sqe_set_data(sqe, user);
    return 0;
#else
    (void)r; (void)fuse_fd; (void)cmd; (void)iov; (void)qid; (void)commit_id; (void)user;
    return -ENOSYS;
#endif
}

static inline int sm_ring_submit(sm_ring *r)
{
#ifdef SM_HAVE_URING
    return io_uring_submit(&r->ring);
#else
    (void)r;
    return -ENOSYS;
#endif
}

/* Wait for the next completion (blocking): 0 and its entry and result, or
 * a negative errno (-EINTR: a signal came first). */
static inline int sm_ring_wait(sm_ring *r, void **user, int *res)
{
#ifdef SM_HAVE_URING
    struct io_uring_cqe *cqe;
    int ret = io_uring_wait_cqe(&r->ring, &cqe);
    if (ret < 0)
        return ret;
    *user = io_uring_cqe_get_data(cqe);
    *res = cqe->res;
    io_uring_cqe_seen(&r->ring, cqe);
    return 0;
#else
    (void)r; (void)user; (void)res;
    return -ENOSYS;
#endif
}

/* Completions waiting to be taken. */
static inline unsigned sm_ring_ready(sm_ring *r)
{
#ifdef SM_HAVE_URING
    return r->fd >= 0 ? io_uring_cq_ready(&r->ring) : 0;
#else
    (void)r;
    return 0;
#endif
}

static inline void sm_ring_exit(sm_ring *r)
{
#ifdef SM_HAVE_URING
    if (r->fd >= 0)
        io_uring_queue_exit(&r->ring);
#endif
    r->fd = -1;
}

#endif
