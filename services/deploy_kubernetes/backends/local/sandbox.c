/* binder-sandbox: what the local backend starts every app through. Static, run by the server
 * (as root when apps run as other users). Why it exists and what it leaves to bwrap: helper.py.
 *
 * Direct form (trusted templates, `[deploy.local] sandbox = false`; the app runs in place):
 *   binder-sandbox [--as=BYTES] [--uid=UID --gid=GID] [--reach=/DIR...] -- PROGRAM [ARGS...]
 *     --as       RLIMIT_AS (soft and hard) set to BYTES;
 *     --uid, --gid   no supplementary groups, then the real, effective and saved group and user
 *                ids set and checked (root cannot be taken back); PROGRAM looked up on PATH;
 *     --reach    as in the parked form below (an app run as another user runs from DIR).
 *
 * Parked form (sandboxed apps; made ahead of the launch, in a pool of slots):
 *   binder-sandbox --park --cgroup=DIR... --netns=PATH --uid=UID --gid=GID [--reach=/DIR...]
 *                  -- /PROGRAM ARGS...
 *     joins each cgroup DIR ("0" written to DIR/cgroup.procs: one per v1 hierarchy, one in v2),
 *     enters the network namespace PATH (setns), and makes the app's sandbox at once: PROGRAM
 *     (bwrap ... -- binder-sandbox --wait, or the waiter alone) forked as UID/GID (not 0), with
 *     no_new_privs, an empty environment, /dev/null for stdin, its stdout and stderr a pipe (the
 *     app's output), and on descriptor 3 one end of a socket pair. The waiter, once the sandbox is
 *     set up around it, says "W" there. Then the helper writes "R" on stdout (the server waits for
 *     it before the slot may be claimed: a cgroup renamed before the join breaks the join), and
 *     reads its launch request from stdin to end of file: NUL-terminated words
 *       --log=PATH --log-max=BYTES --status=PATH -- PROGRAM ARGS... "" K=V...
 *     and hands what follows "--" to the waiter, which execs the app's PROGRAM (looked up on the
 *     PATH of the environment given) in place of itself, in the sandbox made ahead.
 *     End of file without a request (the server went away, or dropped the slot): the waiter gets
 *     end of file too and exits 0, and so does the helper. A sandbox that ends before its request
 *     (its processes killed) ends the helper too (exit 126): the server drops such a slot.
 *     Why parked: in cgroup v1 a join costs an RCU grace period (~10 ms here) unless another
 *     join happened in the last few ms, and bwrap's namespaces and mounts take 1-5 ms; made
 *     ahead, the launch is a write to a pipe and one to a socket.
 *   A sandbox that could not be set up (PROGRAM ended before the waiter said "W": bwrap's mount
 *   setup races with mounts changing on the host, bubblewrap issue #650, such as the network
 *   namespaces of other apps coming and going) is made again, SETUP_TRIES times in all; then the
 *   helper writes "F" and PROGRAM's last output on stdout instead of "R", and exits 126.
 *   After the launch the helper is the app's "shim": it stays the app's parent as root, ignores
 *   SIGTERM, is the subreaper of every process of the app, copies the app's output into --log
 *   (opened O_APPEND|O_NOFOLLOW, 0600) keeping it and its one predecessor PATH.1 under --log-max
 *   bytes together (at half of it the log is renamed to PATH.1, replacing the one before, and a
 *   new one begun, with a line saying how much older output was dropped), reaps everything,
 *   writes "exit N" or "signal N" of its child to --status, and exits with the child's code
 *   (128+N for signal N).
 *   --reach=DIR: a folder the app runs from (the suite's installation) under a folder others
 *   cannot search (a clone in a 0700 mktemp folder, a checkout in root's home): bwrap, which
 *   runs as the app's user, could not bind it. The app's process gets a mount namespace of its
 *   own before it becomes the app's user, with a tmpfs (0755) over the topmost such folder and
 *   DIR bound back in it; bwrap's view of the system is made from that namespace. Nothing else
 *   of the closed folder is shown, and the host's mounts are not touched.
 *
 * Waiter (inside the sandbox, as the app's user): binder-sandbox --wait
 *     "W" on descriptor 3, then PROGRAM ARGS... "" K=V... read from it to end of file, then
 *     exec; end of file with nothing read: exit 0.
 *
 * Exit 127 when PROGRAM does not exist, 126 for any other failure (a message on stderr, which in
 * the parked form is the log). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_CGROUPS 8
#define REQUEST_MAX (1 << 20)
#define WORDS_MAX 8192
#define MIN_LOG_MAX 8192
#define SETUP_TRIES 3
#define MAX_REACH 4
#define WAIT_FD 3
#define FAILURE_MAX 2048

struct opts {
    unsigned long long as, uid, gid, log_max;
    int has_as, has_uid, has_gid, ncg, nreach;
    const char *cgroups[MAX_CGROUPS], *netns, *log_path, *status_path, *reach[MAX_REACH];
};

static int fail(const char *what, const char *detail) {
    fprintf(stderr, "binder-sandbox: %s%s%s: %s\n", what, detail ? " " : "", detail ? detail : "",
            strerror(errno));
    return 126;
}

static int number(const char *text, unsigned long long max, unsigned long long *out) {
    char *end;
    if (*text < '0' || *text > '9') return -1;
    errno = 0;
    *out = strtoull(text, &end, 10);
    return (errno || *end || *out > max) ? -1 : 0;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Options up to "--" (*i is left on it). `park` allows the parked form's, `launch` its launch
 * request's, neither the direct form's. */
static int parse(char **words, int n, int *i, struct opts *o, int park, int launch) {
    for (; *i < n && strcmp(words[*i], "--") != 0; (*i)++) {
        char *a = words[*i];
        if (!launch && !strncmp(a, "--uid=", 6) && !number(a + 6, (uid_t)-2, &o->uid)) o->has_uid = 1;
        else if (!launch && !strncmp(a, "--gid=", 6) && !number(a + 6, (gid_t)-2, &o->gid)) o->has_gid = 1;
        else if (!park && !launch && !strncmp(a, "--as=", 5) && !number(a + 5, RLIM_INFINITY, &o->as))
            o->has_as = 1;
        else if (park && !strncmp(a, "--cgroup=", 9) && a[9] == '/' && o->ncg < MAX_CGROUPS)
            o->cgroups[o->ncg++] = a + 9;
        else if (park && !strncmp(a, "--netns=", 8) && a[8] == '/') o->netns = a + 8;
        else if (launch && !strncmp(a, "--log=", 6) && a[6] == '/') o->log_path = a + 6;
        else if (launch && !strncmp(a, "--log-max=", 10) && !number(a + 10, 1ULL << 40, &o->log_max) &&
                 o->log_max >= MIN_LOG_MAX) {
        } else if (launch && !strncmp(a, "--status=", 9) && a[9] == '/') o->status_path = a + 9;
        else if (!launch && !strncmp(a, "--reach=", 8) && a[8] == '/' && o->nreach < MAX_REACH)
            o->reach[o->nreach++] = a + 8;
        else {
            fprintf(stderr, "binder-sandbox: bad option %s\n", a);
            return -1;
        }
    }
    return 0;
}

static int join(const struct opts *o) {
    for (int c = 0; c < o->ncg; c++) {
        char path[4096];
        if (snprintf(path, sizeof path, "%s/cgroup.procs", o->cgroups[c]) >= (int)sizeof path) {
            errno = ENAMETOOLONG;
            return fail("cgroup", o->cgroups[c]);
        }
        int fd = open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) return fail("join cgroup", o->cgroups[c]);
        close(fd);
    }
    if (o->netns) {
        int fd = open(o->netns, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || setns(fd, CLONE_NEWNET)) return fail("setns", o->netns);
        close(fd);
    }
    return 0;
}

/* `fd` read to end of file, split at NULs: a parked helper's launch request (stdin), or the
 * waiter's program and environment (WAIT_FD). *end: the end of the last word read. */
static int read_words(int fd, char ***words_out, int *nwords, char **end) {
    static char buf[REQUEST_MAX];
    static char *words[WORDS_MAX];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, sizeof buf - 1 - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) break;
        len += (size_t)n;
        if (len >= sizeof buf - 1) {
            errno = E2BIG;
            return -1;
        }
    }
    if (len == 0) {
        errno = 0;
        return -1;
    }
    buf[len] = 0;
    int nw = 0;
    for (size_t p = 0; p < len && nw < WORDS_MAX - 2; p += strlen(buf + p) + 1) words[nw++] = buf + p;
    words[nw] = NULL;
    *words_out = words;
    *nwords = nw;
    *end = buf + len;
    return 0;
}

/* PROGRAM ARGS... "" K=V... (from word `first` on) as an argv and an environment, in place. */
static int split(char **words, int n, int first, char ***argv, char ***envp) {
    *argv = words + first;
    *envp = words + n; /* the argv ends at "", the environment follows */
    for (int k = first; k < n; k++)
        if (!words[k][0]) {
            words[k] = NULL;
            *envp = words + k + 1;
            break;
        }
    return first < n && words[first] && words[first][0] ? 0 : -1;
}

/* The log and PATH.1 together stay under log_max: at half of it the log becomes PATH.1 and a new
 * one begins. Returns the new log's descriptor (or the old one when the rotation failed). */
static int rotate(int log, const char *path, unsigned long long *dropped) {
    char old[4096], mark[160];
    struct stat st;
    if (snprintf(old, sizeof old, "%s.1", path) >= (int)sizeof old) return log;
    if (lstat(old, &st) == 0 && S_ISREG(st.st_mode)) *dropped += (unsigned long long)st.st_size;
    if (rename(path, old)) return log;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return log;
    close(log);
    if (*dropped) {
        int m = snprintf(mark, sizeof mark, "[binder: log over its bound, %llu bytes of older output dropped]\n",
                         *dropped);
        write_all(fd, mark, (size_t)m);
    }
    return fd;
}

/* Copy the app's output from `in` to the log (bounded, rotated) until every writer is gone. */
static int pump(int in, int log, const struct opts *o, unsigned long long *dropped) {
    static char buf[65536];
    struct stat st;
    off_t size = fstat(log, &st) == 0 ? st.st_size : 0, half = (off_t)(o->log_max / 2);
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (size + n > half) {
            log = rotate(log, o->log_path, dropped);
            size = fstat(log, &st) == 0 ? st.st_size : 0;
        }
        if (write_all(log, buf, (size_t)n) == 0) size += n;
    }
    close(in);
    return log;
}

/* Reap the child and every orphan of the app (this is their subreaper); the child's status. */
static int reap(pid_t child) {
    int status = 0;
    for (;;) {
        int got;
        pid_t pid = waitpid(-1, &got, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD: nothing of the app is left */
        }
        if (pid == child) status = got;
    }
    return status;
}

static int switch_user(const struct opts *o) {
    uid_t r, e, s;
    gid_t rg, eg, sg;
    if (setgroups(0, NULL)) return fail("setgroups", NULL);
    if (setresgid((gid_t)o->gid, (gid_t)o->gid, (gid_t)o->gid)) return fail("setresgid", NULL);
    if (setresuid((uid_t)o->uid, (uid_t)o->uid, (uid_t)o->uid)) return fail("setresuid", NULL);
    if (getresuid(&r, &e, &s) || r != o->uid || e != o->uid || s != o->uid) return fail("getresuid", NULL);
    if (getresgid(&rg, &eg, &sg) || rg != o->gid || eg != o->gid || sg != o->gid)
        return fail("getresgid", NULL);
    if (getgroups(0, NULL) != 0) return fail("getgroups", NULL);
    if (o->uid != 0 && setuid(0) == 0) {
        fprintf(stderr, "binder-sandbox: root could be taken back\n");
        return 126;
    }
    return 0;
}

/* The length of the topmost folder above `path` (or `path` itself) that others cannot search,
 * 0 when every one can be. */
static size_t closed_prefix(const char *path) {
    char part[4096];
    struct stat st;
    size_t len = strlen(path);
    if (len >= sizeof part) return 0;
    for (size_t end = 1; end <= len; end++) {
        if (end < len && path[end] != '/') continue;
        memcpy(part, path, end);
        part[end] = 0;
        if (stat(part, &st) == 0 && !(st.st_mode & S_IXOTH)) return end;
    }
    return 0;
}

/* See --reach above. Runs as root in the app's process, before it becomes the app's user. */
static int make_reachable(const struct opts *o) {
    int fds[MAX_REACH];
    size_t closed[MAX_REACH];
    if (unshare(CLONE_NEWNS)) return fail("unshare", "mount namespace");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) return fail("mount", "private /");
    for (int r = 0; r < o->nreach; r++) { /* in the new namespace (a bind's source must be) */
        closed[r] = closed_prefix(o->reach[r]);
        fds[r] = open(o->reach[r], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fds[r] < 0) return fail("open", o->reach[r]);
    }
    for (int r = 0; r < o->nreach; r++) {
        char path[4096], source[64];
        if (!closed[r]) continue;
        snprintf(path, sizeof path, "%s", o->reach[r]);
        path[closed[r]] = 0;
        if (mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=65536"))
            return fail("mount tmpfs", path);
        snprintf(path, sizeof path, "%s", o->reach[r]);
        size_t len = strlen(path);
        for (size_t end = closed[r] + 1; end <= len; end++) { /* the folders down to DIR */
            if (end < len && path[end] != '/') continue;
            char keep = path[end];
            path[end] = 0;
            if ((mkdir(path, 0755) && errno != EEXIST) || chmod(path, 0755)) return fail("mkdir", path);
            path[end] = keep;
        }
        snprintf(source, sizeof source, "/proc/self/fd/%d", fds[r]);
        if (mount(source, o->reach[r], NULL, MS_BIND | MS_REC, NULL)) return fail("bind", o->reach[r]);
        close(fds[r]);
    }
    return 0;
}

static int run(char **argv, char **envp, int path_lookup) {
    if (path_lookup) {
        environ = envp;
        execvp(argv[0], argv);
    } else {
        execve(argv[0], argv, envp);
    }
    fprintf(stderr, "binder-sandbox: %s: %s\n", argv[0], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}

/* What PROGRAM wrote before it ended (the last FAILURE_MAX bytes), into `msg`. */
static size_t drain(int out, char *msg) {
    size_t have = 0;
    char buf[4096];
    for (;;) {
        ssize_t n = read(out, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (ssize_t k = 0; k < n; k++) {
            if (have == FAILURE_MAX) {
                memmove(msg, msg + 1, FAILURE_MAX - 1);
                have--;
            }
            msg[have++] = buf[k];
        }
    }
    close(out);
    return have;
}

/* The sandbox made ahead: PROGRAM forked as the app's user, its output to a pipe (*out: the read
 * end), its descriptor 3 a socket (*sock: the other end). Its pid once the waiter in it said
 * "W"; -1 when it ended before (everything reaped, *out left open with what it wrote). */
static pid_t prepare(const struct opts *o, char **argv, int *out, int *sock) {
    int pipefd[2], pair[2];
    if (pipe2(pipefd, O_CLOEXEC)) return fail("pipe", NULL), -1;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair)) return fail("socketpair", NULL), -1;
    pid_t child = fork();
    if (child < 0) return fail("fork", NULL), -1;
    if (child == 0) {
        static char *none[] = {NULL};
        int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (null < 0 || dup2(null, 0) < 0 || dup2(pipefd[1], 1) < 0 || dup2(pipefd[1], 2) < 0)
            _exit(fail("dup2", NULL));
        /* dup2 onto itself keeps close-on-exec: cleared by hand then */
        if (pair[1] == WAIT_FD ? fcntl(WAIT_FD, F_SETFD, 0) : dup2(pair[1], WAIT_FD) < 0)
            _exit(fail("dup2", NULL));
        if (o->nreach && make_reachable(o)) _exit(126);
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) _exit(fail("no_new_privs", NULL));
        if (switch_user(o)) _exit(126);
        _exit(run(argv, none, 0));
    }
    close(pipefd[1]);
    close(pair[1]);
    *out = pipefd[0];
    *sock = pair[0];
    char said = 0;
    ssize_t n;
    do n = read(pair[0], &said, 1);
    while (n < 0 && errno == EINTR);
    if (n == 1 && said == 'W') return child;
    close(pair[0]);
    reap(child);
    return -1;
}

/* The launch: log and status opened, the app's words handed to the waiter, its output copied,
 * everything reaped, the status written. This process is the shim from here on. */
static int launch(const struct opts *o, pid_t child, int out, int sock, const char *app, size_t len) {
    int status_fd, null;
    unsigned long long dropped = 0;
    int log = open(o->log_path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (log < 0) return fail("open", o->log_path);
    null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0 || dup2(log, 2) < 0) return fail("dup2", NULL);
    status_fd = open(o->status_path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (status_fd < 0) return fail("open", o->status_path);
    /* a waiter gone meanwhile (killed) is told by its end: its status, like any app's */
    while (len) {
        ssize_t n = send(sock, app, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        app += n;
        len -= (size_t)n;
    }
    close(sock);
    /* best effort: needs CAP_SYS_RESOURCE (the app, forked before, does not inherit it) */
    int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (oom >= 0) {
        write_all(oom, "-1000", 5);
        close(oom);
    }
    signal(SIGTERM, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    dup2(null, 1);
    dup2(null, 2);
    log = pump(out, log, o, &dropped);
    int status = reap(child);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    char line[64];
    int m = WIFEXITED(status) ? snprintf(line, sizeof line, "exit %d\n", code)
                              : snprintf(line, sizeof line, "signal %d\n", WTERMSIG(status));
    write_all(status_fd, line, (size_t)m);
    close(status_fd);
    return code;
}

static int parked(int argc, char **argv) {
    struct opts o;
    char **words, *end, msg[FAILURE_MAX];
    int n, i = 2, out = -1, sock = -1;
    pid_t child = -1;
    size_t said = 0;
    memset(&o, 0, sizeof o);
    if (parse(argv, argc, &i, &o, 1, 0) || i + 1 >= argc || argv[i + 1][0] != '/' || !o.ncg ||
        !o.netns || !o.has_uid || !o.has_gid || !o.uid || !o.gid) {
        fprintf(stderr, "usage: binder-sandbox --park --cgroup=DIR... --netns=PATH --uid=UID --gid=GID "
                        "(not 0) [--reach=/DIR...] -- /PROGRAM...\n");
        return 126;
    }
    if (join(&o)) return 126;
    /* orphans of the app (bwrap's pid 1 when its monitor is killed first) come to the shim, not
     * to the host's init, which may be slow to reap them */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) return fail("subreaper", NULL);
    for (int tries = 1; child < 0 && tries <= SETUP_TRIES; tries++) {
        out = -1;
        child = prepare(&o, argv + i + 1, &out, &sock);
        if (child < 0 && out >= 0) said = drain(out, msg);
    }
    if (child < 0) {
        if (write_all(1, "F", 1) == 0) write_all(1, msg, said);
        return 126;
    }
    if (write(1, "R", 1) != 1) return fail("ready", NULL);
    /* parked: until the request comes, or the sandbox ends before it (killed): then this helper
     * ends too, and the server drops the slot rather than hand a dead sandbox to a launch */
    struct pollfd parked_on[2] = {{.fd = 0, .events = POLLIN}, {.fd = sock, .events = POLLIN}};
    while (poll(parked_on, 2, -1) < 0)
        if (errno != EINTR) return fail("poll", NULL);
    if (parked_on[1].revents && !parked_on[0].revents) {
        close(sock);
        reap(child);
        return 126;
    }
    if (read_words(0, &words, &n, &end)) {
        int code = errno == 0 ? 0 : fail("launch request", NULL);
        close(sock); /* the waiter ends, and then the sandbox */
        reap(child);
        return code;
    }
    i = 0;
    memset(&o, 0, sizeof o);
    if (parse(words, n, &i, &o, 0, 1) || i + 1 >= n || !o.log_path || !o.log_max || !o.status_path) {
        fprintf(stderr, "binder-sandbox: bad launch request (--log --log-max --status -- PROGRAM)\n");
        close(sock);
        reap(child);
        return 126;
    }
    return launch(&o, child, out, sock, words[i + 1], (size_t)(end - words[i + 1]));
}

/* Inside the sandbox, as the app's user: see "Waiter" above. */
static int waiter(void) {
    char **words, *end, **app, **envp;
    int n;
    if (write(WAIT_FD, "W", 1) != 1) return fail("wait", NULL);
    if (read_words(WAIT_FD, &words, &n, &end)) return errno == 0 ? 0 : fail("wait", NULL);
    close(WAIT_FD);
    if (split(words, n, 0, &app, &envp)) {
        fprintf(stderr, "binder-sandbox: no program to run\n");
        return 126;
    }
    return run(app, envp, 1);
}

int main(int argc, char **argv) {
    struct opts o;
    int i = 1;
    if (argc > 1 && !strcmp(argv[1], "--park")) return parked(argc, argv);
    if (argc == 2 && !strcmp(argv[1], "--wait")) return waiter();
    memset(&o, 0, sizeof o);
    if (parse(argv, argc, &i, &o, 0, 0) || i + 1 >= argc || o.has_uid != o.has_gid) {
        fprintf(stderr, "usage: binder-sandbox [--as=BYTES] [--uid=UID --gid=GID] [--reach=DIR] -- "
                        "PROGRAM...\n"
                        "       binder-sandbox --park --cgroup=DIR... --netns=PATH --uid=UID --gid=GID "
                        "[--reach=DIR...] -- /PROGRAM...\n"
                        "       binder-sandbox --wait\n");
        return 126;
    }
    if (o.nreach && make_reachable(&o)) return 126;
    if (o.has_as) {
        struct rlimit limit = {(rlim_t)o.as, (rlim_t)o.as};
        if (setrlimit(RLIMIT_AS, &limit)) return fail("setrlimit", NULL);
    }
    if (o.has_uid && switch_user(&o)) return 126;
    return run(argv + i + 1, environ, 1);
}
