#ifndef CULVERT_CCULVERT_H
#define CULVERT_CCULVERT_H

// What Swift's Glibc module does not export: splice, pipe2, accept4, signalfd, the
// GNU-only flags, and variadic calls Swift cannot make. The header stays free of
// _GNU_SOURCE (it would change libc types under Swift's Glibc module); shim.c defines it.

#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

extern const unsigned int CULVERT_SPLICE_F_MOVE;
extern const unsigned int CULVERT_SPLICE_F_NONBLOCK;
extern const unsigned int CULVERT_SPLICE_F_MORE;
extern const int CULVERT_F_SETPIPE_SZ;
extern const int CULVERT_F_GETPIPE_SZ;
extern const int CULVERT_SOCK_NONBLOCK;
extern const int CULVERT_SOCK_CLOEXEC;
extern const int CULVERT_O_NONBLOCK;
extern const int CULVERT_O_CLOEXEC;

ssize_t culvert_splice(int fd_in, int fd_out, size_t len, unsigned int flags);
int culvert_pipe2(int fds[2], int flags);
int culvert_fcntl_int(int fd, int cmd, int arg);
int culvert_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);

/// A non-blocking signalfd for the given signals, which are also blocked in the calling
/// thread (threads created afterwards inherit the mask).
int culvert_signalfd(const int *signals, int count);
/// Blocks the given signals in the calling thread.
int culvert_block_signals(const int *signals, int count);
/// Reads one signal number from a signalfd, or -1 when none is pending.
int culvert_signalfd_read(int fd);
void culvert_ignore_sigpipe(void);
/// prctl(PR_SET_DUMPABLE, value): 0 means no core dump and no ptrace or /proc/PID
/// access by other processes of the same user. prctl is variadic, which Swift cannot call.
int culvert_set_dumpable(int value);

/// One datagram slot for batched UDP I/O: a caller-owned buffer, its length, and the
/// peer address (source on receive, destination on send when `addrlen` is non-zero).
struct culvert_dgram {
    void *buf;
    size_t cap;
    size_t len;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int truncated;
};

/// recvmmsg(2) into up to `count` slots without blocking. Returns the number received
/// (0 with errno EAGAIN when none), or -1. A datagram larger than its slot is marked
/// `truncated`.
int culvert_recv_batch(int fd, struct culvert_dgram *slots, int count);
/// sendmmsg(2) of `count` slots without blocking; slots with addrlen 0 go to the
/// connected peer. Returns the number sent, or -1.
int culvert_send_batch(int fd, struct culvert_dgram *slots, int count);
/// Like `culvert_send_batch`, but every slot goes to the first slot's destination, and
/// runs of equal-sized datagrams leave as one sendmsg with UDP_SEGMENT (generic
/// segmentation offload: one trip through the stack for up to 64 datagrams). Falls
/// back to one message per datagram where the kernel or the path refuses it.
int culvert_send_segmented(int fd, struct culvert_dgram *slots, int count);

#endif
