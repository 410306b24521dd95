# cython: language_level=3
"""smirror's FUSE binding: libfuse 3's low-level API, served by a compiled
loop on one thread.

The capture mount serves one request at a time, in the order the kernel
sent them, and each handler runs to completion before the next request is
read (that is what makes the op stream exact-order). So nothing here is
asynchronous: the loop polls /dev/fuse (the GIL released), reads one
request, and libfuse calls the handler of its kind through the C callbacks
below, which call the Python handler of the ``ops`` object directly and
reply from what it returns. Per request that is one Python call, where
pyfuse3 made a coroutine and passed through trio's scheduler (measured
there: about 26 us of a bare round trip's 30, against the C passthrough's
5; docs/mount.md).

What may finish later (the backing flush of an fsync, a synchronous
connection's wait) is a handler that returns :class:`Later`: its ``start``
gets a :class:`Reply`, which any thread answers once (libfuse's replies
are a ``writev`` on the device, safe from any thread), while the loop goes
on serving other requests.

The kernel asks for ``security.capability`` before every write (to know
whether to kill set-id bits and file capabilities) unless the server
takes ``FUSE_HANDLE_KILLPRIV_V2``, which libfuse 3.14 cannot ask for. So
the session answers libfuse's replies through its own ``writev`` (libfuse's
custom I/O) and adds that flag to the INIT reply when the kernel offers it;
the kernel then skips the probe after a file's first write (until its
attributes are refreshed). In return the file system kills set-id bits
itself where the kernel says so (``kill_suidgid``: the writer lacks
CAP_FSETID): read from the raw request before libfuse parses it, passed to
``write`` and in ``ctx`` of open, create and setattr. The backing file
system removes file capabilities on write and set-id bits on chown itself.

Between two requests the loop runs the calls other threads queued
(:meth:`Session.call_soon`), the readers of other descriptors
(:meth:`Session.add_reader`: the AIO flush's eventfd) and a periodic tick.

Handlers and what they return (``ctx`` has uid, gid, pid, umask):

=========================================  ======================================
lookup(parent, name, ctx)                  :class:`Entry`
forget([(inode, nlookup), ...])            None (no reply is sent)
getattr(inode, ctx)                        :class:`Entry` (its attributes)
setattr(inode, attr, fields, fh, ctx)      :class:`Entry`; ``attr`` and
                                           ``fields`` are one :class:`SetattrArgs`
readlink(inode, ctx)                       bytes
mknod(parent, name, mode, rdev, ctx)       :class:`Entry`
mkdir(parent, name, mode, ctx)             :class:`Entry`
unlink / rmdir(parent, name, ctx)          None
symlink(parent, name, target, ctx)         :class:`Entry`
rename(p_old, n_old, p_new, n_new, flags, ctx)  None
link(inode, new_parent, new_name, ctx)     :class:`Entry`
open(inode, flags, ctx)                    the file handle (int)
create(parent, name, mode, flags, ctx)     (file handle, :class:`Entry`)
read(fh, offset, size)                     bytes
write(fh, offset, data, kill_suidgid)      bytes written (int)
release(fh) / releasedir(fh)               None
fsync(fh, datasync) / fsyncdir(fh, datasync)  None
fallocate(fh, mode, offset, length)        None
opendir(inode, ctx)                        the directory handle (int)
readdir(fh, start_id, token)               None; entries by :func:`readdir_reply`
statfs(ctx)                                an ``os.statvfs_result``
setxattr(inode, name, value, flags, ctx)   None
getxattr(inode, name, ctx)                 bytes
listxattr(inode, ctx)                      a list of bytes
removexattr(inode, name, ctx)              None
=========================================  ======================================

``write``'s ``data`` is bytes below :data:`VIEW_MIN`, else a read-only
memoryview of the request's own buffer (no copy; over io_uring through
the entry's read-only alias): a handler or what it hands the data to may
keep it (the buffer then goes with it, see :class:`RequestData`), but
copying what it keeps is cheaper.

A handler fails by raising :class:`FUSEError` (its errno to the caller) or
OSError (its errno); anything else is a bug of the handler: EIO to the
caller, logged by the ``smirror.capture.mount`` logger, and the loop goes
on. Calls the file system does not serve (``flush``, ``access``, locks,
ioctl) are answered ENOSYS by libfuse, and the kernel stops sending them.
"""

import collections
import logging
import os
import signal
import threading

from libc.errno cimport EAGAIN, EINTR, EIO, ENODEV, ENOSYS, ENOTCONN, ERANGE, errno
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset, strerror
from posix.fcntl cimport F_GETFL, F_SETFL, O_ACCMODE, O_NONBLOCK, O_WRONLY, fcntl
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from posix.types cimport dev_t, gid_t, mode_t, off_t, pid_t, uid_t
from posix.uio cimport iovec, writev
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport Py_REFCNT

log = logging.getLogger("smirror.capture.mount")

ROOT_INODE = 1
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


cdef extern from "<sys/stat.h>" nogil:
    cdef struct c_stat "stat":
        dev_t st_dev
        uint64_t st_ino
        mode_t st_mode
        uint64_t st_nlink
        uid_t st_uid
        gid_t st_gid
        dev_t st_rdev
        off_t st_size
        long st_blksize
        int64_t st_blocks
        timespec st_atim
        timespec st_mtim
        timespec st_ctim


cdef extern from "<sys/stat.h>" nogil:
    # statx of the mode alone: unlike fstat it does not mark the file's
    # ctime as read, which since Linux 6.13 (multigrain timestamps) makes
    # its next write take a fine-grained time and dirty the inode
    ctypedef struct statx_buf "struct statx":
        uint16_t stx_mode
    int c_statx "statx"(int dirfd, const char *pathname, int flags, unsigned int mask,
                        statx_buf *buf)
    unsigned int STATX_MODE
    int AT_EMPTY_PATH
    int S_ISUID, S_ISGID, S_IXGRP


cdef inline bint _mode_loses_set_id(unsigned int mode) noexcept nogil:
    """Whether a write by a caller without CAP_FSETID changes ``mode``:
    set-user-ID, or set-group-ID with group-execute (FUSE's rule)."""
    return (mode & S_ISUID) != 0 or ((mode & S_ISGID) != 0 and (mode & S_IXGRP) != 0)


def mode_of(int fd):
    """The mode of open file ``fd`` (statx of the mode alone: the file's
    times are not read, so its next write's time stays coarse). OSError
    as os.fstat."""
    cdef statx_buf stx
    cdef int r
    with nogil:
        r = c_statx(fd, "", AT_EMPTY_PATH, STATX_MODE, &stx)
    if r != 0:
        raise OSError(errno, strerror(errno).decode())
    return stx.stx_mode


cdef extern from "<sys/statvfs.h>" nogil:
    cdef struct c_statvfs "statvfs":
        unsigned long f_bsize
        unsigned long f_frsize
        uint64_t f_blocks
        uint64_t f_bfree
        uint64_t f_bavail
        uint64_t f_files
        uint64_t f_ffree
        uint64_t f_favail
        unsigned long f_fsid
        unsigned long f_flag
        unsigned long f_namemax


cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC


cdef extern from "<unistd.h>" nogil:
    ssize_t c_read "read"(int fd, void *buf, size_t count)
    ssize_t c_write "write"(int fd, const void *buf, size_t count)
    int c_close "close"(int fd)


cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    int memfd_create(const char *name, unsigned int flags)
    void *MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FIXED
    unsigned int MFD_CLOEXEC


cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, off_t length)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef extern from "sm_uring.h" nogil:
    # FUSE over io_uring (cext/smirror/mount/sm_uring.h)
    struct sm_uring_ent_in_out:
        uint64_t commit_id
        uint32_t payload_sz
    struct sm_uring_req_header:
        char in_out[128]
        char op_in[128]
        sm_uring_ent_in_out ent
    ctypedef struct sm_ring:
        int fd
    long sm_op_in_size(uint32_t opcode, int setxattr_ext)
    int sm_ring_available()
    int sm_ring_init(sm_ring *r, unsigned entries)
    int sm_ring_cmd(sm_ring *r, int fuse_fd, uint32_t cmd, iovec *iov, uint16_t qid,
                    uint64_t commit_id, void *user)
    int sm_ring_submit(sm_ring *r)
    int sm_ring_wait(sm_ring *r, void **user, int *res)
    unsigned sm_ring_ready(sm_ring *r)
    void sm_ring_exit(sm_ring *r)
    enum:
        ECANCELED
        SM_FUSE_OVER_IO_URING_FLAGS2
        SM_URING_CMD_REGISTER
        SM_URING_CMD_COMMIT_AND_FETCH
        FUSE_INIT_EXT


cdef extern from "<linux/fuse.h>" nogil:
    # the kernel's protocol: what libfuse 3.14 reads but does not pass on
    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_init_in:
        uint32_t major
        uint32_t minor
        uint32_t max_readahead
        uint32_t flags
        uint32_t flags2
    struct fuse_init_out:
        uint32_t major
        uint32_t minor
        uint32_t max_readahead
        uint32_t flags
        uint32_t flags2
    enum:
        FUSE_INIT
        FUSE_WRITE
        FUSE_SETATTR
        FUSE_OPEN
        FUSE_CREATE
        FUSE_HANDLE_KILLPRIV_V2
        FUSE_WRITE_KILL_SUIDGID
        FATTR_KILL_SUIDGID
        FUSE_OPEN_KILL_SUIDGID


cdef extern from "fuse_lowlevel.h" nogil:
    ctypedef uint64_t fuse_ino_t
    struct fuse_req:
        pass
    ctypedef fuse_req *fuse_req_t
    struct fuse_session:
        pass

    struct fuse_args:
        int argc
        char **argv
        int allocated

    struct fuse_entry_param:
        fuse_ino_t ino
        uint64_t generation
        c_stat attr
        double attr_timeout
        double entry_timeout

    struct fuse_ctx:
        uid_t uid
        gid_t gid
        pid_t pid
        mode_t umask

    struct fuse_file_info:
        int flags
        unsigned int direct_io
        unsigned int keep_cache
        unsigned int nonseekable
        uint64_t fh

    struct fuse_conn_info:
        unsigned capable
        unsigned want

    struct fuse_forget_data:
        fuse_ino_t ino
        uint64_t nlookup

    struct fuse_buf:
        size_t size
        void *mem

    struct fuse_custom_io:
        ssize_t (*writev)(int fd, iovec *iov, int count, void *userdata)
        ssize_t (*read)(int fd, void *buf, size_t buf_len, void *userdata)
    int fuse_session_custom_io(fuse_session *se, const fuse_custom_io *io, int fd)

    struct fuse_lowlevel_ops:
        void (*init)(void *userdata, fuse_conn_info *conn)
        void (*lookup)(fuse_req_t req, fuse_ino_t parent, const char *name)
        void (*forget)(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
        void (*getattr)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*setattr)(fuse_req_t req, fuse_ino_t ino, c_stat *attr, int to_set, fuse_file_info *fi)
        void (*readlink)(fuse_req_t req, fuse_ino_t ino)
        void (*mknod)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
        void (*mkdir)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
        void (*unlink)(fuse_req_t req, fuse_ino_t parent, const char *name)
        void (*rmdir)(fuse_req_t req, fuse_ino_t parent, const char *name)
        void (*symlink)(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
        void (*rename)(fuse_req_t req, fuse_ino_t parent, const char *name,
                       fuse_ino_t newparent, const char *newname, unsigned int flags)
        void (*link)(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
        void (*open)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*read)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info *fi)
        void (*write)(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                      fuse_file_info *fi)
        void (*release)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*fsync)(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info *fi)
        void (*opendir)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*releasedir)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi)
        void (*fsyncdir)(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info *fi)
        void (*statfs)(fuse_req_t req, fuse_ino_t ino)
        void (*setxattr)(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                         size_t size, int flags)
        void (*getxattr)(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
        void (*listxattr)(fuse_req_t req, fuse_ino_t ino, size_t size)
        void (*removexattr)(fuse_req_t req, fuse_ino_t ino, const char *name)
        void (*create)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                       fuse_file_info *fi)
        void (*forget_multi)(fuse_req_t req, size_t count, fuse_forget_data *forgets)
        void (*fallocate)(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                          fuse_file_info *fi)
        void (*readdirplus)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                            fuse_file_info *fi)

    unsigned FUSE_CAP_WRITEBACK_CACHE
    unsigned FUSE_CAP_READDIRPLUS
    unsigned FUSE_CAP_READDIRPLUS_AUTO
    unsigned FUSE_CAP_POSIX_ACL
    int FUSE_SET_ATTR_MODE
    int FUSE_SET_ATTR_UID
    int FUSE_SET_ATTR_GID
    int FUSE_SET_ATTR_SIZE
    int FUSE_SET_ATTR_ATIME
    int FUSE_SET_ATTR_MTIME
    int FUSE_SET_ATTR_ATIME_NOW
    int FUSE_SET_ATTR_MTIME_NOW

    fuse_session *fuse_session_new(fuse_args *args, const fuse_lowlevel_ops *op, size_t op_size,
                                   void *userdata)
    int fuse_session_mount(fuse_session *se, const char *mountpoint)
    int fuse_session_fd(fuse_session *se)
    int fuse_session_receive_buf(fuse_session *se, fuse_buf *buf)
    void fuse_session_process_buf(fuse_session *se, const fuse_buf *buf)
    void fuse_session_exit(fuse_session *se)
    int fuse_session_exited(fuse_session *se)
    void fuse_session_unmount(fuse_session *se)
    void fuse_session_destroy(fuse_session *se)
    int fuse_opt_add_arg(fuse_args *args, const char *arg)
    void fuse_opt_free_args(fuse_args *args)

    void *fuse_req_userdata(fuse_req_t req)
    const fuse_ctx *fuse_req_ctx(fuse_req_t req)
    int fuse_reply_err(fuse_req_t req, int err)
    void fuse_reply_none(fuse_req_t req)
    int fuse_reply_entry(fuse_req_t req, const fuse_entry_param *e)
    int fuse_reply_create(fuse_req_t req, const fuse_entry_param *e, const fuse_file_info *fi)
    int fuse_reply_attr(fuse_req_t req, const c_stat *attr, double attr_timeout)
    int fuse_reply_readlink(fuse_req_t req, const char *link)
    int fuse_reply_open(fuse_req_t req, const fuse_file_info *fi)
    int fuse_reply_write(fuse_req_t req, size_t count)
    int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
    int fuse_reply_statfs(fuse_req_t req, const c_statvfs *stbuf)
    int fuse_reply_xattr(fuse_req_t req, size_t count)
    size_t fuse_add_direntry_plus(fuse_req_t req, char *buf, size_t bufsize, const char *name,
                                  const fuse_entry_param *e, off_t off)


class FUSEError(Exception):
    """A handler's failure: ``errno`` goes to the calling program."""

    def __init__(self, int errno_):
        super().__init__(errno_, os.strerror(errno_))
        self.errno = errno_

    def __str__(self):
        return os.strerror(self.errno)


class Later:
    """Returned by a handler whose reply comes later: ``start(reply)`` is
    called at once, on the loop, with the :class:`Reply` to answer."""
    __slots__ = ("start",)

    def __init__(self, start):
        self.start = start


cdef struct SessionState:
    # what libfuse hands the callbacks (the session's userdata): the
    # Session object, and what the loop read of the raw request
    void *session               # the Session (which embeds this struct)
    uint64_t init_unique        # the INIT request's, until it is answered
    bint offer_killpriv_v2      # the kernel offers HANDLE_KILLPRIV_V2, and we want it
    bint killpriv_v2            # taken
    bint kill_suidgid           # of the request being served
    bint direct_writes          # write-only handles skip the page cache
    # FUSE over io_uring
    bint want_uring
    bint offer_uring            # the kernel offers it, and we want it
    bint uring_taken            # the INIT reply took it: the loop registers the queues
    bint from_ring              # the request being served came over the ring
    RingEnt *cur_ent            # its entry (under serve_lock)
    # a buffer made ready for the entry whose write data a handler keeps
    # (see _ring_keep): its memfd and read-only mapping, -1/NULL when none
    int spare_mfd
    char *spare_alias
    RingEnt *ents
    int nalloc                  # entries allocated
    int nents                   # entries registered: the ring is in use
    RingQ *queues               # one a CPU, each its own ring and thread
    int nq
    int fuse_fd
    # held by whoever serves a request or runs the loop's Python (the
    # handlers run one at a time, in the order they took it: the order of
    # the ops), never taken with the GIL held
    pthread_mutex_t serve_lock
    int waiting                 # ring threads with a request, waiting for serve_lock


cdef struct RingQ:
    # the queue of one CPU: a ring of its own, served by a thread on that CPU
    # (a request and its reply stay on the caller's CPU)
    sm_ring ring
    pthread_mutex_t lock        # its submissions (replies come from any thread)
    int live                    # its entries still registered


cdef struct RingEnt:
    # one entry of a queue of the ring: the kernel fills its header and
    # payload with a request; its reply goes back in the same buffers
    RingQ *q
    sm_uring_req_header *hdr
    char *base                  # RING_HEADROOM, then the payload
    # with memfd: base is a shared mapping of the memfd mfd, and alias
    # another one, read-only, through which write data is lent to handlers
    # (see _ring_keep); else base is malloc'd and write data is copied
    bint memfd
    int mfd
    char *alias
    char *payload
    size_t payload_size
    iovec iov[2]
    uint16_t qid
    uint64_t unique             # the request being served in it, 0 when none
    uint64_t commit_id


cdef class Ctx:
    """Who made the request; ``kill_suidgid``: set-id bits go with it
    (open and create with O_TRUNC, setattr of the size)."""
    cdef readonly uid_t uid
    cdef readonly gid_t gid
    cdef readonly pid_t pid
    cdef readonly mode_t umask
    cdef readonly bint kill_suidgid


cdef Ctx _ctx(fuse_req_t req):
    cdef const fuse_ctx *c = fuse_req_ctx(req)
    cdef Ctx out = Ctx.__new__(Ctx)
    out.uid, out.gid, out.pid, out.umask = c.uid, c.gid, c.pid, c.umask
    out.kill_suidgid = (<SessionState *>fuse_req_userdata(req)).kill_suidgid
    return out


cdef inline void _set_time(timespec *t, int64_t ns):
    cdef int64_t sec = ns // 1000000000
    t.tv_sec = sec
    t.tv_nsec = ns - sec * 1000000000


cdef inline int64_t _time_ns(const timespec *t):
    return <int64_t>t.tv_sec * 1000000000 + t.tv_nsec


cdef class Entry:
    """An entry's answer: its inode number and generation, its attributes
    (filled from a stat result), how long the kernel may cache them.
    ``st_size`` and ``st_mtime_ns`` can be changed after (a layer that
    reports sizes of its own)."""
    cdef fuse_entry_param e

    def __cinit__(self, uint64_t ino, uint64_t generation, st, double timeout):
        memset(&self.e, 0, sizeof(self.e))
        self.e.ino = ino
        self.e.generation = generation
        self.e.attr_timeout = timeout
        self.e.entry_timeout = timeout
        a = &self.e.attr
        a.st_ino = ino
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        _set_time(&a.st_atim, st.st_atime_ns)
        _set_time(&a.st_mtim, st.st_mtime_ns)
        _set_time(&a.st_ctim, st.st_ctime_ns)

    @property
    def st_ino(self):
        return self.e.ino

    @property
    def generation(self):
        return self.e.generation

    @property
    def st_mode(self):
        return self.e.attr.st_mode

    @property
    def st_size(self):
        return self.e.attr.st_size

    @st_size.setter
    def st_size(self, off_t value):
        self.e.attr.st_size = value

    @property
    def st_mtime_ns(self):
        return _time_ns(&self.e.attr.st_mtim)

    @st_mtime_ns.setter
    def st_mtime_ns(self, int64_t value):
        _set_time(&self.e.attr.st_mtim, value)


cdef class SetattrArgs:
    """What a setattr asks: the ``update_*`` flags say which of the
    ``st_*`` values to set (the ``*_NOW`` times are given as now)."""
    cdef readonly bint update_mode, update_uid, update_gid, update_size
    cdef readonly bint update_atime, update_mtime
    cdef readonly mode_t st_mode
    cdef readonly uid_t st_uid
    cdef readonly gid_t st_gid
    cdef readonly off_t st_size
    cdef readonly int64_t st_atime_ns, st_mtime_ns


cdef class ReaddirToken:
    """Where :func:`readdir_reply` adds entries (a readdirplus reply)."""
    cdef fuse_req_t req
    cdef char *buf
    cdef size_t size
    cdef size_t used


def readdir_reply(ReaddirToken token, bytes name, Entry entry, off_t next_id):
    """Add ``name`` to the directory listing; False when the reply is full
    (the entry is not in it: the kernel's next readdir starts at it). An
    entry added counts as a lookup of its inode. Only while the readdir
    handler that got ``token`` runs."""
    if token.buf == NULL:
        raise RuntimeError("readdir_reply after its readdir returned")
    cdef size_t n = fuse_add_direntry_plus(token.req, token.buf + token.used,
                                           token.size - token.used, name, &entry.e, next_id)
    if n > token.size - token.used:
        return False
    token.used += n
    return True


# what a handler's result is answered with
cdef enum Kind:
    K_ERR0 = 0          # reply_err(0): done
    K_ENTRY
    K_ATTR
    K_CREATE
    K_OPEN
    K_CREATE_DIRECT     # the same, the handle without the kernel's page cache
    K_OPEN_DIRECT
    K_WRITE
    K_BUF
    K_READLINK
    K_STATFS
    K_XATTR
    K_XATTR_LIST


cdef class Session


cdef class Reply:
    """The reply a :class:`Later` owes: :meth:`ok` with what the handler
    would have returned, or :meth:`fail` with an errno; once, from any
    thread."""
    cdef fuse_req_t req
    cdef int kind
    cdef size_t size
    cdef bint sent
    cdef Session session     # its requests die with it: a reply after close() is dropped

    def ok(self, result=None):
        if self.sent:
            raise RuntimeError("this request was answered already")
        self.sent = True
        if self.session.se != NULL:
            _answer(self.req, self.kind, result, self.size)

    def fail(self, int err):
        if self.sent:
            raise RuntimeError("this request was answered already")
        self.sent = True
        if self.session.se != NULL:
            fuse_reply_err(self.req, err or EIO)

    def __dealloc__(self):
        # never answered (a bug of the code that held it): the caller must
        # not wait forever
        if not self.sent and self.session is not None and self.session.se != NULL:
            fuse_reply_err(self.req, EIO)


cdef int _errno_of(exc) noexcept:
    if isinstance(exc, FUSEError):
        return exc.errno or EIO
    if isinstance(exc, OSError):
        return exc.errno or EIO
    try:
        log.error("capture mount: a handler failed", exc_info=exc)
    except BaseException:
        pass
    return EIO


cdef void _answer(fuse_req_t req, int kind, object r, size_t size) noexcept:
    """Reply to ``req`` from a handler's result ``r`` (EIO when ``r`` is
    not what its kind needs)."""
    cdef Entry entry
    cdef fuse_file_info fi
    cdef c_statvfs sv
    cdef bytes data
    cdef Reply later
    try:
        if type(r) is Later:
            later = Reply.__new__(Reply)
            later.req, later.kind, later.size = req, kind, size
            later.session = _session(req)
            try:
                r.start(later)
            except BaseException as exc:
                if not later.sent:
                    later.sent = True
                    fuse_reply_err(req, _errno_of(exc))
            return
        if kind == K_ERR0:
            fuse_reply_err(req, 0)
        elif kind == K_ENTRY:
            entry = r
            fuse_reply_entry(req, &entry.e)
        elif kind == K_ATTR:
            entry = r
            fuse_reply_attr(req, &entry.e.attr, entry.e.attr_timeout)
        elif kind == K_CREATE or kind == K_OPEN or kind == K_CREATE_DIRECT or kind == K_OPEN_DIRECT:
            memset(&fi, 0, sizeof(fi))
            fi.keep_cache = 1       # the kernel's cached pages stay valid across opens
            fi.direct_io = kind == K_CREATE_DIRECT or kind == K_OPEN_DIRECT
            if kind == K_CREATE or kind == K_CREATE_DIRECT:
                fh, entry = r
                fi.fh = fh
                fuse_reply_create(req, &entry.e, &fi)
            else:
                fi.fh = r
                fuse_reply_open(req, &fi)
        elif kind == K_WRITE:
            fuse_reply_write(req, <size_t>r)
        elif kind == K_BUF:
            data = r
            fuse_reply_buf(req, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        elif kind == K_READLINK:
            data = r
            fuse_reply_readlink(req, PyBytes_AS_STRING(data))
        elif kind == K_STATFS:
            memset(&sv, 0, sizeof(sv))
            sv.f_bsize, sv.f_frsize = r.f_bsize, r.f_frsize
            sv.f_blocks, sv.f_bfree, sv.f_bavail = r.f_blocks, r.f_bfree, r.f_bavail
            sv.f_files, sv.f_ffree, sv.f_favail = r.f_files, r.f_ffree, r.f_favail
            sv.f_namemax = r.f_namemax
            fuse_reply_statfs(req, &sv)
        elif kind == K_XATTR or kind == K_XATTR_LIST:
            data = b"".join(n + b"\0" for n in r) if kind == K_XATTR_LIST else r
            if size == 0:
                fuse_reply_xattr(req, PyBytes_GET_SIZE(data))
            elif <size_t>PyBytes_GET_SIZE(data) > size:
                fuse_reply_err(req, ERANGE)
            else:
                fuse_reply_buf(req, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        else:
            fuse_reply_err(req, EIO)
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))


cdef inline Session _session(fuse_req_t req):
    return <Session>(<SessionState *>fuse_req_userdata(req)).session


cdef inline object _ops(fuse_req_t req):
    return _session(req).ops


cdef inline void _serve(fuse_req_t req, int kind, size_t size, str method, tuple args) noexcept:
    """``ops.method(*args)``, answered as ``kind`` (its errno if it raised)."""
    try:
        r = getattr(_ops(req), method)(*args)
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    _answer(req, kind, r, size)


# -- the callbacks libfuse calls, inside fuse_session_process_buf, on the loop --------

cdef void ll_init(void *userdata, fuse_conn_info *conn) noexcept with gil:
    # readdirplus always (entries come with their attributes); never the
    # writeback cache (the kernel would send dirty pages later, in its own
    # order); no POSIX ACLs in the kernel (the backing file system has them)
    conn.want &= ~(FUSE_CAP_READDIRPLUS_AUTO | FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_POSIX_ACL)


cdef void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept with gil:
    _serve(req, K_ENTRY, 0, "lookup", (parent, <bytes>name, _ctx(req)))


cdef void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) noexcept with gil:
    try:
        _ops(req).forget([(ino, nlookup)])
    except BaseException as exc:
        _errno_of(exc)
    fuse_reply_none(req)


cdef void ll_forget_multi(fuse_req_t req, size_t count, fuse_forget_data *forgets) noexcept with gil:
    try:
        _ops(req).forget([(forgets[i].ino, forgets[i].nlookup) for i in range(count)])
    except BaseException as exc:
        _errno_of(exc)
    fuse_reply_none(req)


cdef void ll_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _serve(req, K_ATTR, 0, "getattr", (ino, _ctx(req)))


cdef void ll_setattr(fuse_req_t req, fuse_ino_t ino, c_stat *attr, int to_set,
                     fuse_file_info *fi) noexcept with gil:
    cdef SetattrArgs a = SetattrArgs.__new__(SetattrArgs)
    cdef timespec now
    try:
        a.update_mode = (to_set & FUSE_SET_ATTR_MODE) != 0
        a.update_uid = (to_set & FUSE_SET_ATTR_UID) != 0
        a.update_gid = (to_set & FUSE_SET_ATTR_GID) != 0
        a.update_size = (to_set & FUSE_SET_ATTR_SIZE) != 0
        a.update_atime = (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW)) != 0
        a.update_mtime = (to_set & (FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW)) != 0
        a.st_mode, a.st_uid, a.st_gid, a.st_size = attr.st_mode, attr.st_uid, attr.st_gid, attr.st_size
        a.st_atime_ns = _time_ns(&attr.st_atim)
        a.st_mtime_ns = _time_ns(&attr.st_mtim)
        if to_set & (FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW):
            clock_gettime(CLOCK_REALTIME, &now)
            if to_set & FUSE_SET_ATTR_ATIME_NOW:
                a.st_atime_ns = _time_ns(&now)
            if to_set & FUSE_SET_ATTR_MTIME_NOW:
                a.st_mtime_ns = _time_ns(&now)
        r = _ops(req).setattr(ino, a, a, fi.fh if fi != NULL else None, _ctx(req))
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    _answer(req, K_ATTR, r, 0)


cdef void ll_readlink(fuse_req_t req, fuse_ino_t ino) noexcept with gil:
    _serve(req, K_READLINK, 0, "readlink", (ino, _ctx(req)))


cdef void ll_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                   dev_t rdev) noexcept with gil:
    _serve(req, K_ENTRY, 0, "mknod", (parent, <bytes>name, mode, rdev, _ctx(req)))


cdef void ll_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) noexcept with gil:
    _serve(req, K_ENTRY, 0, "mkdir", (parent, <bytes>name, mode, _ctx(req)))


cdef void ll_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept with gil:
    _serve(req, K_ERR0, 0, "unlink", (parent, <bytes>name, _ctx(req)))


cdef void ll_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept with gil:
    _serve(req, K_ERR0, 0, "rmdir", (parent, <bytes>name, _ctx(req)))


cdef void ll_symlink(fuse_req_t req, const char *link, fuse_ino_t parent,
                     const char *name) noexcept with gil:
    _serve(req, K_ENTRY, 0, "symlink", (parent, <bytes>name, <bytes>link, _ctx(req)))


cdef void ll_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                    const char *newname, unsigned int flags) noexcept with gil:
    _serve(req, K_ERR0, 0, "rename",
           (parent, <bytes>name, newparent, <bytes>newname, flags, _ctx(req)))


cdef void ll_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
                  const char *newname) noexcept with gil:
    _serve(req, K_ENTRY, 0, "link", (ino, newparent, <bytes>newname, _ctx(req)))


cdef bint _direct(fuse_req_t req, int flags) noexcept:
    # a handle that can only write skips the kernel's page cache: its data
    # is copied once into the request instead of into the FUSE file's pages
    # (which would cache it a second time above the backing file's), and
    # nothing is lost for reads, which it cannot make
    return (<SessionState *>fuse_req_userdata(req)).direct_writes and (flags & O_ACCMODE) == O_WRONLY


cdef void ll_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _serve(req, K_OPEN_DIRECT if _direct(req, fi.flags) else K_OPEN, 0, "open",
           (ino, fi.flags, _ctx(req)))


cdef void ll_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                    fuse_file_info *fi) noexcept with gil:
    _serve(req, K_CREATE_DIRECT if _direct(req, fi.flags) else K_CREATE, 0, "create",
           (parent, <bytes>name, mode, fi.flags, _ctx(req)))


cdef void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                  fuse_file_info *fi) noexcept with gil:
    _serve(req, K_BUF, 0, "read", (fi.fh, off, size))


# whether this build can serve requests over io_uring (it has liburing)
URING_BUILT = bool(sm_ring_available())


# a write of at least this much reaches the handler as a memoryview of the
# loop's buffer, not as a copy
VIEW_MIN = 64 << 10


cdef class RequestData:
    """The data of a WRITE request where the loop read it, lent to the
    handler as a memoryview: no copy. A view (or this object) still held
    when the handler returns, by an op left in a journal's open frame say,
    takes the loop's buffer with it: the loop reads its next request into
    a new one, so what is held never changes under its holder. Over
    io_uring it takes the entry's alias, and new pages go under the
    address the kernel fills (_ring_keep)."""
    cdef const char *ptr
    cdef Py_ssize_t size
    cdef Py_ssize_t exports
    cdef void *owned           # the loop's buffer, once this took it
    cdef char *mapped          # over the ring: the entry's old alias, once this took it

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, <void *>self.ptr, self.size, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    def __dealloc__(self):
        free(self.owned)
        if self.mapped != NULL:
            munmap(self.mapped, RING_BUF)


cdef void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                   fuse_file_info *fi) noexcept with gil:
    cdef SessionState *st = <SessionState *>fuse_req_userdata(req)
    cdef RequestData lent = None
    cdef Session session
    cdef RingEnt *ent = st.cur_ent if st.from_ring else NULL
    cdef int err = 0
    cdef statx_buf stx
    cdef bint kill, looked
    try:                # the data's copy or view may fail: the caller still gets an answer
        if size < VIEW_MIN or (ent != NULL and not _ring_can_lend(st, ent)):
            data = PyBytes_FromStringAndSize(buf, size)
        else:
            lent = RequestData.__new__(RequestData)
            # over the ring: the same bytes through the entry's alias
            lent.ptr = buf if ent == NULL else ent.alias + (buf - ent.base)
            lent.size = size
            data = memoryview(lent)
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    kill = st.kill_suidgid
    if kill:
        # the kernel asks at every write of a caller without CAP_FSETID (a
        # database's user): when the file has no bit to lose, the handler
        # is not asked to look (it would stat the file at every write)
        with nogil:
            looked = c_statx(<int>fi.fh, "", AT_EMPTY_PATH, STATX_MODE, &stx) == 0
        if looked and not _mode_loses_set_id(stx.stx_mode):
            kill = False
    try:
        r = _ops(req).write(fi.fh, off, data, kill)
    except BaseException as exc:
        err = _errno_of(exc)
    data = None
    if lent is not None and (lent.exports or Py_REFCNT(lent) > 1):
        # kept: the buffer goes with it, before the reply (over the ring
        # the reply hands the entry back to the kernel to fill)
        session = <Session>st.session
        if ent == NULL:
            lent.owned = session.buf.mem        # libfuse allocates the next one
            session.buf.mem = NULL
        elif not _ring_keep(st, ent, lent):
            # the entry cannot be given other pages: it is not answered
            # (no request comes into what is kept: its alias goes with the
            # data, and the entry lends no more), the mount stops
            log.error("capture mount: a kept write's buffer could not be replaced (%s): "
                      "the mount stops", os.strerror(errno))
            lent.mapped, ent.alias = ent.alias, NULL
            session.exit()
            return
        session.buffers_lent += 1
    if err:
        fuse_reply_err(req, err)
    else:
        _answer(req, K_WRITE, r, 0)


cdef int _ring_buf_new(int *mfd, char **alias) noexcept nogil:
    """A memfd of an entry's buffer size and a read-only mapping of it: 0,
    or -1 (errno set)."""
    cdef int fd = memfd_create("smirror-ring", MFD_CLOEXEC)
    cdef void *a
    if fd < 0:
        return -1
    if ftruncate(fd, RING_BUF) == 0:
        a = mmap(NULL, RING_BUF, PROT_READ, MAP_SHARED, fd, 0)
        if a != MAP_FAILED:
            mfd[0], alias[0] = fd, <char *>a
            return 0
    c_close(fd)
    return -1


cdef void _ring_buf_close(int mfd, char *alias) noexcept nogil:
    """What _ring_buf_new made: the alias (NULL: a kept write's data holds
    it) and the memfd."""
    if alias != NULL:
        munmap(alias, RING_BUF)
    c_close(mfd)


cdef bint _ring_can_lend(SessionState *st, RingEnt *ent) noexcept nogil:
    """Whether ``ent``'s write data can be lent: it has an alias, and a
    spare buffer is ready to take its place should the data be kept."""
    if not ent.memfd or ent.alias == NULL:
        return False
    if st.spare_mfd < 0 and _ring_buf_new(&st.spare_mfd, &st.spare_alias) != 0:
        st.spare_mfd, st.spare_alias = -1, NULL
        return False
    return True


cdef bint _ring_keep(SessionState *st, RingEnt *ent, RequestData lent) noexcept:
    """A handler keeps write data lent from ``ent`` (a view of its alias).
    The kernel fills the entry's buffer at the address it registered, so
    the spare's memfd is mapped at that address instead; the old pages stay
    with the kept data, through the old alias, which ``lent`` unmaps when
    it goes. False (errno set) if the spare cannot be mapped there."""
    if mmap(ent.base, RING_BUF, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
            st.spare_mfd, 0) == MAP_FAILED:
        return False
    lent.mapped = ent.alias
    c_close(ent.mfd)        # the old alias keeps its pages
    ent.mfd, ent.alias = st.spare_mfd, st.spare_alias
    st.spare_mfd, st.spare_alias = -1, NULL
    return True


cdef void ll_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _serve(req, K_ERR0, 0, "release", (fi.fh,))


cdef void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info *fi) noexcept with gil:
    _serve(req, K_ERR0, 0, "fsync", (fi.fh, datasync != 0))


cdef void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                       fuse_file_info *fi) noexcept with gil:
    _serve(req, K_ERR0, 0, "fallocate", (fi.fh, mode, offset, length))


cdef void ll_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _serve(req, K_OPEN, 0, "opendir", (ino, _ctx(req)))


cdef void ll_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         fuse_file_info *fi) noexcept with gil:
    cdef ReaddirToken token = ReaddirToken.__new__(ReaddirToken)
    token.req, token.size, token.used = req, size, 0
    token.buf = <char *>malloc(size or 1)
    if token.buf == NULL:
        fuse_reply_err(req, 12)             # ENOMEM
        return
    try:
        _ops(req).readdir(fi.fh, off, token)
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
    else:
        fuse_reply_buf(req, token.buf, token.used)
    finally:
        free(token.buf)
        token.buf = NULL


cdef void ll_releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    _serve(req, K_ERR0, 0, "releasedir", (fi.fh,))


cdef void ll_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info *fi) noexcept with gil:
    _serve(req, K_ERR0, 0, "fsyncdir", (fi.fh, datasync != 0))


cdef void ll_statfs(fuse_req_t req, fuse_ino_t ino) noexcept with gil:
    _serve(req, K_STATFS, 0, "statfs", (_ctx(req),))


cdef void ll_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
                      size_t size, int flags) noexcept with gil:
    try:
        data = PyBytes_FromStringAndSize(value, size)
    except BaseException as exc:
        fuse_reply_err(req, _errno_of(exc))
        return
    _serve(req, K_ERR0, 0, "setxattr", (ino, <bytes>name, data, flags, _ctx(req)))


cdef void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) noexcept with gil:
    _serve(req, K_XATTR, size, "getxattr", (ino, <bytes>name, _ctx(req)))


cdef void ll_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) noexcept with gil:
    _serve(req, K_XATTR_LIST, size, "listxattr", (ino, _ctx(req)))


cdef void ll_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name) noexcept with gil:
    _serve(req, K_ERR0, 0, "removexattr", (ino, <bytes>name, _ctx(req)))


# -- libfuse's I/O on /dev/fuse, through us (libfuse's custom I/O) ----------------

cdef ssize_t io_read(int fd, void *buf, size_t buf_len, void *userdata) noexcept nogil:
    return c_read(fd, buf, buf_len)


cdef ssize_t io_writev(int fd, iovec *iov, int count, void *userdata) noexcept nogil:
    cdef SessionState *st = <SessionState *>userdata
    cdef fuse_out_header *out
    if st.init_unique and count >= 2 and iov[0].iov_len >= sizeof(fuse_out_header):
        out = <fuse_out_header *>iov[0].iov_base
        if out.unique == st.init_unique:
            st.init_unique = 0
            if out.error == 0 and st.offer_killpriv_v2 and iov[1].iov_len >= sizeof(fuse_init_out):
                (<fuse_init_out *>iov[1].iov_base).flags |= FUSE_HANDLE_KILLPRIV_V2
                st.killpriv_v2 = True
            if out.error == 0 and st.offer_uring and iov[1].iov_len >= sizeof(fuse_init_out):
                (<fuse_init_out *>iov[1].iov_base).flags |= FUSE_INIT_EXT
                (<fuse_init_out *>iov[1].iov_base).flags2 |= SM_FUSE_OVER_IO_URING_FLAGS2
                st.uring_taken = True
    if st.nents and count >= 1 and iov[0].iov_len >= sizeof(fuse_out_header):
        out = <fuse_out_header *>iov[0].iov_base
        if out.unique:
            ent = _ring_ent_of(st, out.unique)
            if ent != NULL:
                return _ring_reply(st, ent, iov, count)
    return writev(fd, iov, count)


cdef RingEnt *_ring_ent_of(SessionState *st, uint64_t unique) noexcept nogil:
    cdef int i
    for i in range(st.nents):
        if st.ents[i].unique == unique:
            return &st.ents[i]
    return NULL


cdef ssize_t _ring_reply(SessionState *st, RingEnt *ent, iovec *iov, int count) noexcept nogil:
    """A reply that libfuse would write to /dev/fuse, into its ring entry,
    committed (and the entry fetches the next request)."""
    cdef size_t total = 0, whole = iov[0].iov_len
    cdef int i, err = 0
    cdef fuse_out_header *out
    for i in range(1, count):
        whole += iov[i].iov_len
        if total + iov[i].iov_len > ent.payload_size:
            err = -EIO          # cannot be: replies are at most max_write or max_read
            total = 0
            break
        memcpy(ent.payload + total, iov[i].iov_base, iov[i].iov_len)
        total += iov[i].iov_len
    out = <fuse_out_header *>ent.hdr.in_out
    memcpy(out, iov[0].iov_base, sizeof(fuse_out_header))
    if err:
        out.error = err
    out.len = <uint32_t>(sizeof(fuse_out_header) + total)
    ent.hdr.ent.payload_sz = <uint32_t>total
    pthread_mutex_lock(&ent.q.lock)
    ent.unique = 0
    i = sm_ring_cmd(&ent.q.ring, st.fuse_fd, SM_URING_CMD_COMMIT_AND_FETCH, NULL, ent.qid,
                    ent.commit_id, ent)
    if i == 0:
        i = sm_ring_submit(&ent.q.ring)
    pthread_mutex_unlock(&ent.q.lock)
    if i < 0:
        errno = -i
        return -1
    return whole


cdef fuse_custom_io _io
memset(&_io, 0, sizeof(_io))
_io.read = io_read
_io.writev = io_writev


cdef fuse_lowlevel_ops _ll_ops
memset(&_ll_ops, 0, sizeof(_ll_ops))
_ll_ops.init = ll_init
_ll_ops.lookup = ll_lookup
_ll_ops.forget = ll_forget
_ll_ops.forget_multi = ll_forget_multi
_ll_ops.getattr = ll_getattr
_ll_ops.setattr = ll_setattr
_ll_ops.readlink = ll_readlink
_ll_ops.mknod = ll_mknod
_ll_ops.mkdir = ll_mkdir
_ll_ops.unlink = ll_unlink
_ll_ops.rmdir = ll_rmdir
_ll_ops.symlink = ll_symlink
_ll_ops.rename = ll_rename
_ll_ops.link = ll_link
_ll_ops.open = ll_open
_ll_ops.create = ll_create
_ll_ops.read = ll_read
_ll_ops.write = ll_write
_ll_ops.release = ll_release
_ll_ops.fsync = ll_fsync
_ll_ops.fallocate = ll_fallocate
_ll_ops.opendir = ll_opendir
_ll_ops.readdirplus = ll_readdirplus
_ll_ops.releasedir = ll_releasedir
_ll_ops.fsyncdir = ll_fsyncdir
_ll_ops.statfs = ll_statfs
_ll_ops.setxattr = ll_setxattr
_ll_ops.getxattr = ll_getxattr
_ll_ops.listxattr = ll_listxattr
_ll_ops.removexattr = ll_removexattr


cdef double _monotonic() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef enum:
    RING_DEPTH = 4              # entries of each io_uring queue (one queue a CPU)
    RING_HEADROOM = 4096        # in front of an entry's payload: the request's header and struct
    # an entry's payload: libfuse's buffer (256 pages and a page), max_write and more
    RING_PAYLOAD = (256 + 1) * 4096
    RING_BUF = RING_HEADROOM + RING_PAYLOAD     # page-sized: mapped whole


cdef void _ring_buf_free(RingEnt *ent) noexcept nogil:
    """An entry's buffer, as _ring_start made it (or left it, half made)."""
    if not ent.memfd:
        free(ent.base)
        return
    munmap(ent.base, RING_BUF)
    _ring_buf_close(ent.mfd, ent.alias)


def _possible_cpus():
    """The kernel's num_possible_cpus(): the ring has a queue for each."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) - int(lo) + 1) if hi else 1
    return n


cdef enum:
    MAX_READERS = 8         # descriptors the loop polls: /dev/fuse, its wake-up, readers


cdef class Session:
    """One FUSE mount of ``ops`` at ``mountpoint`` (``options``: mount
    options, such as ``fsname=x``, ``allow_other``), served by :meth:`run`
    on the calling thread until :meth:`exit` or an unmount; :meth:`close`
    then unmounts and frees it. Several sessions may live in one process."""
    cdef fuse_session *se
    cdef SessionState st
    cdef fuse_buf buf
    cdef int fd
    cdef int wake_fd
    cdef readonly object ops
    cdef readonly str mountpoint
    cdef object calls
    cdef list readers
    cdef bint stopping
    cdef bint running
    cdef bint want_killpriv_v2
    cdef readonly Py_ssize_t buffers_lent     # request buffers write data kept (RequestData)
    cdef list ring_threads

    def __cinit__(self):
        self.se = NULL
        memset(&self.st, 0, sizeof(self.st))
        self.st.session = <void *>self
        self.fd = -1
        self.wake_fd = -1
        memset(&self.buf, 0, sizeof(self.buf))

    def __init__(self, ops, mountpoint, options, *, bint killpriv_v2=True,
                 bint direct_writes=False, bint uring=False):
        """``killpriv_v2``: take FUSE_HANDLE_KILLPRIV_V2 when the kernel
        offers it (``ops`` then kills set-id bits where ``kill_suidgid``
        says; see the module doc). ``direct_writes``: a file opened
        write-only (O_WRONLY) is served without the kernel's page cache
        (FOPEN_DIRECT_IO), each write a request of up to 1 MiB. ``uring``:
        requests come over io_uring when the kernel offers it (FUSE over
        io_uring: the fuse module's ``enable_uring`` parameter, Linux 6.14
        and later) and smirror was built with liburing; else over
        /dev/fuse (:attr:`uring` says which, after INIT)."""
        cdef fuse_args args
        self.ops = ops
        self.want_killpriv_v2 = killpriv_v2
        self.st.direct_writes = direct_writes
        self.st.want_uring = uring and sm_ring_available()
        self.st.spare_mfd, self.st.spare_alias = -1, NULL
        if uring and not self.st.want_uring:
            log.warning("capture mount: FUSE over io_uring asked for, but this build of smirror "
                        "has no liburing (liburing-dev when it was built): requests come over "
                        "/dev/fuse")
        pthread_mutex_init(&self.st.serve_lock, NULL)
        self.ring_threads = []
        self.mountpoint = os.fsdecode(mountpoint)
        self.calls = collections.deque()
        self.readers = []
        memset(&args, 0, sizeof(args))
        opts = ",".join(sorted(options)).encode()
        if fuse_opt_add_arg(&args, b"smirror") or \
                (opts and (fuse_opt_add_arg(&args, b"-o") or fuse_opt_add_arg(&args, opts))):
            fuse_opt_free_args(&args)
            raise MemoryError()
        self.se = fuse_session_new(&args, &_ll_ops, sizeof(_ll_ops), <void *>&self.st)
        fuse_opt_free_args(&args)
        if self.se == NULL:
            raise RuntimeError(f"libfuse refused the mount options {opts.decode()!r}")
        if fuse_session_mount(self.se, os.fsencode(mountpoint)) != 0:
            fuse_session_destroy(self.se)
            self.se = NULL
            raise RuntimeError(f"fuse_session_mount of {self.mountpoint} failed (see the "
                               f"message above from libfuse)")
        self.fd = fuse_session_fd(self.se)
        if fuse_session_custom_io(self.se, &_io, self.fd) != 0:
            fuse_session_unmount(self.se)
            fuse_session_destroy(self.se)
            self.se = NULL
            raise RuntimeError("libfuse refused the session's own I/O (fuse_session_custom_io)")
        # non-blocking: a poll said readable, yet another reader (none
        # here) or an interrupt may have taken the request
        fcntl(self.fd, F_SETFL, fcntl(self.fd, F_GETFL) | O_NONBLOCK)
        self.st.fuse_fd = self.fd
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wake_fd < 0:
            raise OSError(errno, strerror(errno).decode())

    def add_reader(self, int fd, callback):
        """``callback()`` on the loop whenever ``fd`` is readable (before
        :meth:`run`)."""
        if len(self.readers) >= MAX_READERS - 3:     # /dev/fuse, the wake-up, signals
            raise ValueError(f"at most {MAX_READERS - 3} readers")
        self.readers.append((fd, callback))

    def call_soon(self, fn):
        """Run ``fn()`` on the loop, between two requests (from any thread)."""
        cdef uint64_t one = 1
        self.calls.append(fn)
        if self.wake_fd >= 0:
            c_write(self.wake_fd, &one, 8)

    def exit(self):
        """End :meth:`run` (from any thread): no request is read after the
        call being served, if any."""
        cdef uint64_t one = 1
        self.stopping = True
        if self.wake_fd >= 0:
            c_write(self.wake_fd, &one, 8)

    @property
    def killpriv_v2(self):
        """Whether the kernel took FUSE_HANDLE_KILLPRIV_V2 (after INIT)."""
        return self.st.killpriv_v2

    @property
    def uring(self):
        """Whether requests come over io_uring: every queue registered, and
        none refused since (an entry the kernel refuses completes with an
        error; until every queue has one, requests come over /dev/fuse)."""
        cdef int i
        if self.st.nents == 0:
            return False
        for i in range(self.st.nq):
            if self.st.queues[i].live <= 0:
                return False
        return True

    def serve_unlocked(self, fn, *args):
        """``fn(*args)`` with the serve lock let go, from a handler: over
        io_uring the other CPUs' requests are served meanwhile (a wait that
        changes nothing the handlers share, say a backing flush on a
        descriptor of its own). The handler's own request stays open; the
        lock is held again when ``fn`` returns."""
        if not self.running:
            raise RuntimeError("serve_unlocked() outside a handler of a served session")
        with nogil:
            pthread_mutex_unlock(&self.st.serve_lock)
        try:
            return fn(*args)
        finally:
            with nogil:
                pthread_mutex_lock(&self.st.serve_lock)

    def queued(self):
        """Whether a request waits to be read now."""
        cdef pollfd p
        cdef int i
        if self.st.waiting:
            return True
        for i in range(self.st.nq):
            if sm_ring_ready(&self.st.queues[i].ring):
                return True
        p.fd, p.events, p.revents = self.fd, POLLIN, 0
        return self.fd >= 0 and poll(&p, 1, 0) > 0

    cdef _ring_start(self):
        """After an INIT reply that took FUSE over io_uring: for every
        possible CPU a queue of RING_DEPTH entries on a ring of its own,
        served by a thread bound to that CPU (the kernel queues a request
        on its caller's CPU, and serves none over the ring until every
        queue has an entry)."""
        cdef int nq, i
        cdef RingEnt *ent
        cdef void *mapped
        self.st.uring_taken = False
        nq = _possible_cpus()
        n = nq * RING_DEPTH
        queues = <RingQ *>calloc(nq, sizeof(RingQ))
        ents = <RingEnt *>calloc(n, sizeof(RingEnt))
        if queues == NULL or ents == NULL:
            free(queues)
            free(ents)
            raise MemoryError()
        self.st.queues, self.st.nq = queues, nq
        self.st.ents, self.st.nalloc = ents, n
        for i in range(nq):
            queues[i].ring.fd = -1
            pthread_mutex_init(&queues[i].lock, NULL)
        for i in range(n):
            ent = &ents[i]
            ent.qid = i // RING_DEPTH
            ent.q = &queues[ent.qid]
            ent.hdr = <sm_uring_req_header *>calloc(1, sizeof(sm_uring_req_header))
            if ent.hdr == NULL:
                raise MemoryError()
            # a memfd mapped twice (write data lent without a copy, see
            # _ring_keep), else plain memory (write data copied)
            ent.mfd, ent.alias, ent.base = -1, NULL, NULL
            if _ring_buf_new(&ent.mfd, &ent.alias) == 0:
                mapped = mmap(NULL, RING_BUF, PROT_READ | PROT_WRITE, MAP_SHARED, ent.mfd, 0)
                if mapped != MAP_FAILED:
                    ent.base, ent.memfd = <char *>mapped, True
                else:
                    _ring_buf_close(ent.mfd, ent.alias)
                    ent.mfd, ent.alias = -1, NULL
            if ent.base == NULL:
                ent.base = <char *>malloc(RING_BUF)
                if ent.base == NULL:
                    raise MemoryError()
            ent.payload = ent.base + RING_HEADROOM
            ent.payload_size = RING_PAYLOAD
            ent.iov[0].iov_base, ent.iov[0].iov_len = ent.hdr, sizeof(sm_uring_req_header)
            ent.iov[1].iov_base, ent.iov[1].iov_len = ent.payload, RING_PAYLOAD
        started = threading.Semaphore(0)
        for i in range(nq):
            t = threading.Thread(target=self._ring_thread, args=(i, started),
                                 name=f"capture-mount-ring{i}", daemon=True)
            t.start()
            self.ring_threads.append(t)
        for i in range(nq):
            started.acquire()
        self.st.nents = n if all(queues[i].live for i in range(nq)) else 0
        if not self.st.nents:
            log.error("capture mount: FUSE over io_uring was agreed, but not every queue "
                      "could be registered: requests come over /dev/fuse")

    def _ring_thread(self, int qid, started):
        """One CPU's queue: its ring set up and its entries registered here
        (so their completions come to this thread), then its requests
        served, each under serve_lock, until the connection ends."""
        cdef RingQ *q = &self.st.queues[qid]
        cdef int i, res, r, registered = 0
        cdef void *user
        cdef RingEnt *ent
        try:
            try:
                os.sched_setaffinity(0, {qid})      # the queue's CPU (qid is the CPU number)
            except OSError:
                pass
            res = sm_ring_init(&q.ring, RING_DEPTH * 2)
            if res == 0:
                pthread_mutex_lock(&q.lock)
                for i in range(qid * RING_DEPTH, (qid + 1) * RING_DEPTH):
                    res = sm_ring_cmd(&q.ring, self.fd, SM_URING_CMD_REGISTER, self.st.ents[i].iov,
                                      <uint16_t>qid, 0, &self.st.ents[i])
                    if res < 0:
                        break
                    registered += 1
                if res == 0:
                    res = sm_ring_submit(&q.ring)
                pthread_mutex_unlock(&q.lock)
            if res < 0:
                log.error("capture mount: io_uring queue %d: %s", qid, strerror(-res).decode())
                return
            q.live = registered
        finally:
            started.release()
        while q.live > 0:
            with nogil:
                r = sm_ring_wait(&q.ring, &user, &res)
            if r == -EINTR:
                continue
            if r < 0:
                log.error("capture mount: io_uring queue %d: %s", qid, strerror(-r).decode())
                return
            ent = <RingEnt *>user
            if res < 0:
                q.live -= 1         # the connection ended (or the entry was refused)
                if res != -ENOTCONN and res != -ENODEV and res != -ECANCELED:
                    log.error("capture mount: io_uring queue %d: an entry failed: %s", qid,
                              strerror(-res).decode())
                continue
            if self.stopping:
                # as over /dev/fuse: left to the unmount (which fails it);
                # the entry is not answered, so it completes no more
                q.live -= 1
                continue
            with nogil:
                self.st.waiting += 1
                pthread_mutex_lock(&self.st.serve_lock)
                self.st.waiting -= 1
            try:
                self._ring_request(ent)
            finally:
                with nogil:
                    pthread_mutex_unlock(&self.st.serve_lock)

    cdef _ring_request(self, RingEnt *ent):
        """Serve the request the kernel put in ``ent`` (under serve_lock)."""
        cdef long arg
        cdef char *start
        cdef fuse_in_header *h = <fuse_in_header *>ent.hdr.in_out
        cdef fuse_out_header *out
        cdef fuse_buf fb
        cdef uint32_t length
        arg = sm_op_in_size(h.opcode, 0)
        ent.commit_id = ent.hdr.ent.commit_id
        ent.unique = h.unique
        if arg < 0 or ent.hdr.ent.payload_sz > ent.payload_size:
            out = <fuse_out_header *>ent.hdr.in_out
            out.len, out.error = sizeof(fuse_out_header), -ENOSYS
            ent.hdr.ent.payload_sz = 0
            pthread_mutex_lock(&ent.q.lock)
            ent.unique = 0
            sm_ring_cmd(&ent.q.ring, self.fd, SM_URING_CMD_COMMIT_AND_FETCH, NULL, ent.qid,
                        ent.commit_id, ent)
            sm_ring_submit(&ent.q.ring)
            pthread_mutex_unlock(&ent.q.lock)
            return
        # libfuse 3.14 parses a request contiguous: the header and the op's
        # struct go in front of the payload, in the headroom
        start = ent.payload - arg - <long>sizeof(fuse_in_header)
        memcpy(start, h, sizeof(fuse_in_header))
        memcpy(start + sizeof(fuse_in_header), ent.hdr.op_in, arg)
        length = <uint32_t>(sizeof(fuse_in_header) + arg + ent.hdr.ent.payload_sz)
        (<fuse_in_header *>start).len = length
        self._inspect(start, length)
        memset(&fb, 0, sizeof(fb))
        fb.mem, fb.size = start, length
        self.st.from_ring, self.st.cur_ent = True, ent
        try:
            fuse_session_process_buf(self.se, &fb)
        finally:
            self.st.from_ring, self.st.cur_ent = False, NULL

    cdef _ring_free(self):
        """After the connection ended (its entries complete with an error):
        the ring threads end, then the rings and buffers go."""
        cdef int i
        for t in self.ring_threads or ():
            t.join(10)
            if t.is_alive():
                log.error("capture mount: %s did not end: its buffers are kept", t.name)
                return
        self.ring_threads = []
        for i in range(self.st.nq):
            sm_ring_exit(&self.st.queues[i].ring)
        free(self.st.queues)
        self.st.queues, self.st.nq = NULL, 0
        if self.st.ents != NULL:
            for i in range(self.st.nalloc):
                free(self.st.ents[i].hdr)
                _ring_buf_free(&self.st.ents[i])
            free(self.st.ents)
            self.st.ents = NULL
        if self.st.spare_mfd >= 0:
            _ring_buf_close(self.st.spare_mfd, self.st.spare_alias)
            self.st.spare_mfd, self.st.spare_alias = -1, NULL
        self.st.nents = self.st.nalloc = 0

    def run(self, double tick=0.0, on_tick=None):
        """Serve requests until :meth:`exit` or the file system is unmounted;
        ``on_tick()`` every ``tick`` seconds (0: never). Returns normally
        then; OSError when the device fails."""
        cdef pollfd fds[MAX_READERS]
        cdef int nfds, i, n, res, timeout_ms
        cdef uint64_t counter
        cdef double now, next_tick
        if self.se == NULL:
            raise RuntimeError("the session is closed")
        if self.running:
            raise RuntimeError("the session is served already")
        self.running = True
        readers = list(self.readers)
        old_wakeup = None
        if threading.current_thread() is threading.main_thread():
            # a signal that lands between two polls must still wake the
            # loop for its Python handler: Python writes a byte to this
            # pipe at every signal (the self-pipe trick)
            sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            old_wakeup = signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)

            def signalled():
                try:
                    while os.read(sig_r, 512):
                        pass
                except BlockingIOError:
                    pass
                PyErr_CheckSignals()
            readers.append((sig_r, signalled))
        nfds = 2 + len(readers)
        fds[0].fd, fds[0].events = self.fd, POLLIN
        fds[1].fd, fds[1].events = self.wake_fd, POLLIN
        for i in range(len(readers)):
            fds[2 + i].fd, fds[2 + i].events = readers[i][0], POLLIN
        next_tick = _monotonic() + tick
        # the loop's Python runs under serve_lock, as the ring threads'
        # requests do; it lets go only while it waits in poll
        with nogil:
            pthread_mutex_lock(&self.st.serve_lock)
        try:
            while not self.stopping and not fuse_session_exited(self.se):
                if self.calls:
                    self._run_calls()
                    continue
                timeout_ms = -1
                if tick > 0:
                    now = _monotonic()
                    if now >= next_tick:
                        next_tick = now + tick
                        on_tick()
                        continue
                    timeout_ms = <int>((next_tick - now) * 1000) + 1
                for i in range(nfds):
                    fds[i].revents = 0
                with nogil:
                    pthread_mutex_unlock(&self.st.serve_lock)
                    n = poll(fds, nfds, timeout_ms)
                    pthread_mutex_lock(&self.st.serve_lock)
                if n < 0:
                    if errno == EINTR:
                        # a signal: its Python handler runs now (on the main
                        # thread), between two requests; its exception ends run()
                        PyErr_CheckSignals()
                        continue
                    raise OSError(errno, strerror(errno).decode())
                if fds[1].revents:
                    c_read(self.wake_fd, &counter, 8)
                for i in range(2, nfds):
                    if fds[i].revents:
                        readers[i - 2][1]()
                if fds[0].revents and not self.stopping:
                    with nogil:
                        res = fuse_session_receive_buf(self.se, &self.buf)
                    if res == -EINTR or res == -EAGAIN:
                        continue
                    if res == 0:
                        break               # unmounted
                    if res < 0:
                        raise OSError(-res, f"reading /dev/fuse: {strerror(-res).decode()}")
                    self._inspect(<const char *>self.buf.mem, res)
                    fuse_session_process_buf(self.se, &self.buf)
                    if self.st.uring_taken:     # INIT was answered: the ring's turn
                        self._ring_start()
        finally:
            pthread_mutex_unlock(&self.st.serve_lock)
            self.running = False
            if old_wakeup is not None:
                signal.set_wakeup_fd(old_wakeup)
                os.close(sig_r)
                os.close(sig_w)

    cdef void _inspect(self, const char *req, ssize_t n) noexcept:
        """What libfuse does not pass on, from the raw request: the kill of
        set-id bits the kernel asks for, and the INIT (whose reply gets
        HANDLE_KILLPRIV_V2)."""
        cdef const fuse_in_header *h = <const fuse_in_header *>req
        cdef const char *arg = req + sizeof(fuse_in_header)
        cdef const fuse_init_in *init
        cdef uint32_t op
        self.st.kill_suidgid = False
        if n < <ssize_t>sizeof(fuse_in_header):
            return
        n -= sizeof(fuse_in_header)
        op = h.opcode
        # the flags' offsets in fuse_write_in (write_flags), fuse_setattr_in
        # (valid), fuse_open_in and fuse_create_in (open_flags): linux/fuse.h
        if op == FUSE_WRITE and n >= 24:
            self.st.kill_suidgid = ((<const uint32_t *>(arg + 20))[0] & FUSE_WRITE_KILL_SUIDGID) != 0
        elif op == FUSE_SETATTR and n >= 4:
            self.st.kill_suidgid = ((<const uint32_t *>arg)[0] & FATTR_KILL_SUIDGID) != 0
        elif op == FUSE_OPEN and n >= 8:
            self.st.kill_suidgid = ((<const uint32_t *>(arg + 4))[0] & FUSE_OPEN_KILL_SUIDGID) != 0
        elif op == FUSE_CREATE and n >= 16:
            self.st.kill_suidgid = ((<const uint32_t *>(arg + 12))[0] & FUSE_OPEN_KILL_SUIDGID) != 0
        elif op == FUSE_INIT and n >= 16:      # major, minor, max_readahead, flags: every version
            init = <const fuse_init_in *>arg
            self.st.init_unique = h.unique
            self.st.offer_killpriv_v2 = self.want_killpriv_v2 and init.major == 7 and \
                init.minor >= 33 and (init.flags & FUSE_HANDLE_KILLPRIV_V2) != 0
            # flags2 is in the extended INIT (64 bytes), FUSE_INIT_EXT says so
            self.st.offer_uring = self.st.want_uring and init.major == 7 and \
                n >= <ssize_t>sizeof(fuse_init_in) and (init.flags & FUSE_INIT_EXT) != 0 and \
                (init.flags2 & SM_FUSE_OVER_IO_URING_FLAGS2) != 0
            if self.st.want_uring and not self.st.offer_uring:
                log.warning("capture mount: FUSE over io_uring asked for, but the kernel does not "
                            "offer it (Linux 6.14 or later, with the fuse module's enable_uring: "
                            "echo Y > /sys/module/fuse/parameters/enable_uring): requests come "
                            "over /dev/fuse")

    cdef _run_calls(self):
        while self.calls and not self.stopping:
            self.calls.popleft()()

    def close(self, bint unmount=True):
        """Unmount (``unmount``) and free the session, after :meth:`run`
        ended. Calls still queued are dropped."""
        if self.running:
            raise RuntimeError("close() while the session is served: exit() first")
        if self.se != NULL:
            if unmount:
                fuse_session_unmount(self.se)
            fuse_session_destroy(self.se)
            self.se = NULL
            self.fd = -1
        self._ring_free()               # after the connection ended: no entry is filled again
        if self.buf.mem != NULL:
            free(self.buf.mem)
            self.buf.mem = NULL
        if self.wake_fd >= 0:
            c_close(self.wake_fd)
            self.wake_fd = -1
        self.calls.clear()

    def __dealloc__(self):
        if self.se != NULL:
            fuse_session_unmount(self.se)
            fuse_session_destroy(self.se)
        self._ring_free()
        if self.buf.mem != NULL:
            free(self.buf.mem)
        if self.wake_fd >= 0:
            c_close(self.wake_fd)
