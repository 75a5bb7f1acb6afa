#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <errno.h>
#include <unistd.h>
#include "CCulvert.h"

const unsigned int CULVERT_SPLICE_F_MOVE = SPLICE_F_MOVE;
const unsigned int CULVERT_SPLICE_F_NONBLOCK = SPLICE_F_NONBLOCK;
const unsigned int CULVERT_SPLICE_F_MORE = SPLICE_F_MORE;
const int CULVERT_F_SETPIPE_SZ = F_SETPIPE_SZ;
const int CULVERT_F_GETPIPE_SZ = F_GETPIPE_SZ;
const int CULVERT_SOCK_NONBLOCK = SOCK_NONBLOCK;
const int CULVERT_SOCK_CLOEXEC = SOCK_CLOEXEC;
const int CULVERT_O_NONBLOCK = O_NONBLOCK;
const int CULVERT_O_CLOEXEC = O_CLOEXEC;

ssize_t culvert_splice(int fd_in, int fd_out, size_t len, unsigned int flags) {
    return splice(fd_in, NULL, fd_out, NULL, len, flags);
}

int culvert_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }

int culvert_set_dumpable(int value) { return prctl(PR_SET_DUMPABLE, value, 0, 0, 0); }

int culvert_fcntl_int(int fd, int cmd, int arg) { return fcntl(fd, cmd, arg); }

int culvert_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    return accept4(fd, addr, len, flags);
}

static void fill_set(sigset_t *set, const int *signals, int count) {
    sigemptyset(set);
    for (int i = 0; i < count; i++) sigaddset(set, signals[i]);
}

int culvert_signalfd(const int *signals, int count) {
    sigset_t set;
    fill_set(&set, signals, count);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) return -1;
    return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

int culvert_block_signals(const int *signals, int count) {
    sigset_t set;
    fill_set(&set, signals, count);
    return pthread_sigmask(SIG_BLOCK, &set, NULL);
}

int culvert_signalfd_read(int fd) {
    struct signalfd_siginfo info;
    ssize_t n = read(fd, &info, sizeof info);
    if (n != (ssize_t)sizeof info) return -1;
    return (int)info.ssi_signo;
}

void culvert_ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

#define CULVERT_MAX_BATCH 64

int culvert_recv_batch(int fd, struct culvert_dgram *slots, int count) {
    struct mmsghdr msgs[CULVERT_MAX_BATCH];
    struct iovec iov[CULVERT_MAX_BATCH];
    if (count > CULVERT_MAX_BATCH) count = CULVERT_MAX_BATCH;
    for (int i = 0; i < count; i++) {
        iov[i].iov_base = slots[i].buf;
        iov[i].iov_len = slots[i].cap;
        msgs[i].msg_hdr.msg_name = &slots[i].addr;
        msgs[i].msg_hdr.msg_namelen = sizeof(slots[i].addr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = NULL;
        msgs[i].msg_hdr.msg_controllen = 0;
        msgs[i].msg_hdr.msg_flags = 0;
        msgs[i].msg_len = 0;
    }
    int n;
    do { n = recvmmsg(fd, msgs, (unsigned)count, MSG_DONTWAIT, NULL); } while (n < 0 && errno == EINTR);
    for (int i = 0; i < n; i++) {
        slots[i].len = msgs[i].msg_len;
        slots[i].addrlen = msgs[i].msg_hdr.msg_namelen;
        slots[i].truncated = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
    }
    return n;
}

int culvert_send_batch(int fd, struct culvert_dgram *slots, int count) {
    struct mmsghdr msgs[CULVERT_MAX_BATCH];
    struct iovec iov[CULVERT_MAX_BATCH];
    if (count > CULVERT_MAX_BATCH) count = CULVERT_MAX_BATCH;
    for (int i = 0; i < count; i++) {
        iov[i].iov_base = slots[i].buf;
        iov[i].iov_len = slots[i].len;
        msgs[i].msg_hdr.msg_name = slots[i].addrlen ? &slots[i].addr : NULL;
        msgs[i].msg_hdr.msg_namelen = slots[i].addrlen;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = NULL;
        msgs[i].msg_hdr.msg_controllen = 0;
        msgs[i].msg_hdr.msg_flags = 0;
    }
    int n;
    do { n = sendmmsg(fd, msgs, (unsigned)count, MSG_DONTWAIT | MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n;
}

#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <string.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

/* Largest payload of one segmented send: the IP datagram that carries it must stay under
   64 KiB with IPv6 and UDP headers. */
#define CULVERT_GSO_MAX_BYTES 65000
#define CULVERT_GSO_MAX_SEGMENTS 64

int culvert_send_segmented(int fd, struct culvert_dgram *slots, int count) {
    int done = 0;
    while (done < count) {
        size_t seg = slots[done].len;
        int n = 1;
        size_t total = seg;
        /* A run: datagrams of one size, the last of the run possibly shorter. */
        if (seg > 0) {
            while (done + n < count && n < CULVERT_GSO_MAX_SEGMENTS) {
                size_t next = slots[done + n].len;
                if (next == 0 || next > seg || total + next > CULVERT_GSO_MAX_BYTES) break;
                total += next;
                n++;
                if (next < seg) break;
            }
        }
        if (n == 1) {
            int k = culvert_send_batch(fd, slots + done, 1);
            if (k <= 0) return done > 0 ? done : k;
            done += 1;
            continue;
        }
        struct iovec iov[CULVERT_GSO_MAX_SEGMENTS];
        for (int i = 0; i < n; i++) {
            iov[i].iov_base = slots[done + i].buf;
            iov[i].iov_len = slots[done + i].len;
        }
        union { char buf[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } control;
        memset(&control, 0, sizeof control);
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_name = slots[done].addrlen ? &slots[done].addr : NULL;
        m.msg_namelen = slots[done].addrlen;
        m.msg_iov = iov;
        m.msg_iovlen = (size_t)n;
        m.msg_control = control.buf;
        m.msg_controllen = sizeof control.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t size = (uint16_t)seg;
        memcpy(CMSG_DATA(c), &size, sizeof size);
        ssize_t r;
        do { r = sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
        if (r >= 0) { done += n; continue; }
        if (errno == EINVAL || errno == EIO || errno == EOPNOTSUPP || errno == EMSGSIZE || errno == ENOPROTOOPT) {
            /* No segmentation offload here (or a segment above the path MTU): one
               datagram per message instead. */
            int k = culvert_send_batch(fd, slots + done, n);
            if (k < 0) return done > 0 ? done : -1;
            done += k;
            if (k < n) return done;
            continue;
        }
        return done > 0 ? done : -1;
    }
    return done;
}
