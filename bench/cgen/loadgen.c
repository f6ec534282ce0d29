/*
 * A lean load generator for the tcpnetlock benchmark: one process, one epoll loop, no
 * allocation per cycle. It runs the `cycles` scenario (one TCP connection per lock: connect,
 * `lock,name:P-i`, `ok...`, `release`, `released`, EOF) with N concurrent clients on distinct
 * names, or with `--session 1` the same cycles over sessions (protocol version 3: each client
 * opens one session and then loops `lock,id:0,name:P-i` → `ok,...,id:0` → `release,id:0` →
 * `released,id:0` on it; a cycle is timed from the lock line to `released`), and prints one JSON object: the rate, a latency histogram (1 microsecond buckets up to
 * 1 s, then one overflow bucket), the errors, and its own CPU time over the measured window, so
 * that the benchmark can show the generator's CPU beside the server's.
 *
 * Built by bench/cgen.ts with the machine's C compiler (`cc -O2`); never committed as a binary.
 *
 *   loadgen --port 7654 [--host 127.0.0.1] --clients 16 --seconds 3 [--warmup 0.5]
 *           [--prefix cyc] [--timeout 5] [--session 0|1]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { IDLE, CONNECTING, WAIT_SESSION, WAIT_OK, WAIT_RELEASED, WAIT_EOF, DONE };

struct client {
  int fd;
  enum state state;
  double t0;       /* when this cycle began (connect), seconds */
  double deadline; /* when the current step times out */
  int len;         /* bytes in buf */
  char buf[256];
  char lock_line[96];
  int lock_len;
};

#define HIST_US 1000000
static unsigned int hist[HIST_US + 1];
static long cycles = 0;
static double sum_latency = 0, max_latency = 0;

#define KINDS 6
static const char *kind_names[KINDS] = {"refused", "reset", "timeout", "unexpected-reply", "eof",
                                        "other"};
static long kind_counts[KINDS];
static char examples[10][160];
static int n_examples = 0;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec / 1e6;
}

static void error_kind(int kind, const char *detail) {
  kind_counts[kind]++;
  if (n_examples < 10) {
    snprintf(examples[n_examples++], sizeof examples[0], "%s: %s", kind_names[kind], detail);
  }
}

static int epfd;
static struct sockaddr_in addr;
static double timeout_s = 5;
static int session_mode = 0;

static void close_client(struct client *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  c->state = IDLE;
  c->len = 0;
}

static void start_cycle(struct client *c, double t) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    error_kind(5, strerror(errno));
    return;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->fd = fd;
  c->t0 = t;
  c->deadline = t + timeout_s;
  c->len = 0;
  int r = connect(fd, (struct sockaddr *)&addr, sizeof addr);
  struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
  if (r == 0 || errno == EINPROGRESS) {
    c->state = CONNECTING;
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
  } else {
    error_kind(errno == ECONNREFUSED ? 0 : 5, strerror(errno));
    close_client(c);
  }
}

static int send_all(struct client *c, const char *s, int n) {
  ssize_t w = send(c->fd, s, n, MSG_NOSIGNAL);
  if (w == n) return 0;
  error_kind(w < 0 && errno == ECONNRESET ? 1 : 5, w < 0 ? strerror(errno) : "short write");
  return -1;
}

static void finish(struct client *c, double t, double measure_from, double stop_at) {
  if (c->t0 >= measure_from && t <= stop_at) {
    double lat = t - c->t0;
    long us = (long)(lat * 1e6);
    hist[us > HIST_US ? HIST_US : us]++;
    sum_latency += lat;
    if (lat > max_latency) max_latency = lat;
    cycles++;
  }
  if (!session_mode) close_client(c);
}

/* Session mode: the next cycle on the open session (or nothing more after the stop time). */
static int begin_lock(struct client *c, double t, double stop_at) {
  if (t >= stop_at) {
    c->state = DONE;
    return 0;
  }
  c->t0 = t;
  c->deadline = t + timeout_s;
  if (send_all(c, c->lock_line, c->lock_len) < 0) {
    close_client(c);
    return -1;
  }
  c->state = WAIT_OK;
  return 0;
}

/* One complete line (without \n) arrived for c. Returns -1 when the client was closed. */
static int on_line(struct client *c, const char *line, int n, double t, double measure_from,
                   double stop_at) {
  if (c->state == WAIT_SESSION && n >= 17 && memcmp(line, "session,version:3", 17) == 0) {
    return begin_lock(c, t, stop_at);
  }
  if (c->state == WAIT_OK && n >= 2 && line[0] == 'o' && line[1] == 'k' &&
      (n == 2 || line[2] == ',')) {
    if ((session_mode ? send_all(c, "release,id:0\n", 13) : send_all(c, "release\n", 8)) < 0) {
      close_client(c);
      return -1;
    }
    c->state = WAIT_RELEASED;
    c->deadline = t + timeout_s;
    return 0;
  }
  if (c->state == WAIT_RELEASED && session_mode && n == 13 &&
      memcmp(line, "released,id:0", 13) == 0) {
    finish(c, t, measure_from, stop_at);
    return begin_lock(c, t, stop_at);
  }
  if (c->state == WAIT_RELEASED && !session_mode && n == 8 && memcmp(line, "released", 8) == 0) {
    c->state = WAIT_EOF;
    c->deadline = t + timeout_s;
    return 0;
  }
  char detail[120];
  snprintf(detail, sizeof detail, "%.*s", n > 100 ? 100 : n, line);
  error_kind(3, detail);
  close_client(c);
  return -1;
}

static void on_event(struct client *c, unsigned events, double t, double measure_from,
                     double stop_at) {
  if (c->state == CONNECTING) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      error_kind(err == ECONNREFUSED ? 0 : 5, strerror(err));
      close_client(c);
      return;
    }
    if (session_mode ? send_all(c, "session\n", 8) < 0
                     : send_all(c, c->lock_line, c->lock_len) < 0) {
      close_client(c);
      return;
    }
    c->state = session_mode ? WAIT_SESSION : WAIT_OK;
    c->deadline = t + timeout_s;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    return;
  }
  (void)events;
  for (;;) {
    ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      error_kind(errno == ECONNRESET ? 1 : 5, strerror(errno));
      close_client(c);
      return;
    }
    if (r == 0) {
      if (!session_mode && c->state == WAIT_EOF && c->len == 0) {
        finish(c, t, measure_from, stop_at);
      } else {
        error_kind(4, c->state == WAIT_OK        ? "before ok"
                      : c->state == WAIT_SESSION ? "before session"
                                                 : "before released");
        close_client(c);
      }
      return;
    }
    c->len += (int)r;
    int start = 0;
    for (int i = 0; i < c->len; i++) {
      if (c->buf[i] != '\n') continue;
      if (on_line(c, c->buf + start, i - start, t, measure_from, stop_at) < 0) return;
      start = i + 1;
    }
    if (start > 0) {
      memmove(c->buf, c->buf + start, c->len - start);
      c->len -= start;
    }
    if (c->len == (int)sizeof c->buf) {
      error_kind(3, "line too long");
      close_client(c);
      return;
    }
  }
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1", *prefix = "cyc";
  int port = 0, nclients = 16;
  double seconds = 3, warmup = 0.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--host")) host = argv[i + 1];
    else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--clients")) nclients = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--warmup")) warmup = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--prefix")) prefix = argv[i + 1];
    else if (!strcmp(argv[i], "--timeout")) timeout_s = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--session")) session_mode = atoi(argv[i + 1]) != 0;
    else {
      fprintf(stderr, "loadgen: unknown option %s\n", argv[i]);
      return 2;
    }
  }
  if (port <= 0 || nclients <= 0 || seconds <= 0) {
    fprintf(stderr, "usage: loadgen --port P [--host H] --clients N --seconds S [--warmup W] "
                    "[--prefix X] [--timeout T] [--session 0|1]\n");
    return 2;
  }
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
    fprintf(stderr, "loadgen: --host must be an IPv4 address\n");
    return 2;
  }
  epfd = epoll_create1(EPOLL_CLOEXEC);
  struct client *clients = calloc(nclients, sizeof *clients);
  for (int i = 0; i < nclients; i++) {
    clients[i].fd = -1;
    clients[i].lock_len = snprintf(clients[i].lock_line, sizeof clients[i].lock_line,
                                   session_mode ? "lock,id:0,name:%s-%d\n" : "lock,name:%s-%d\n",
                                   prefix, i);
  }
  double start = now();
  double measure_from = start + warmup, stop_at = measure_from + seconds;
  double cpu_from = -1, cpu_to = -1;
  for (int i = 0; i < nclients; i++) start_cycle(&clients[i], start);
  struct epoll_event events[256];
  double last_scan = start;
  for (;;) {
    double t = now();
    if (cpu_from < 0 && t >= measure_from) cpu_from = cpu_seconds();
    if (t >= stop_at) break;
    int n = epoll_wait(epfd, events, 256, 50);
    t = now();
    for (int i = 0; i < n; i++) {
      struct client *c = events[i].data.ptr;
      on_event(c, events[i].events, t, measure_from, stop_at);
      if (c->state == IDLE && t < stop_at) start_cycle(c, t);
    }
    if (t - last_scan >= 0.05) {
      last_scan = t;
      for (int i = 0; i < nclients; i++) {
        struct client *c = &clients[i];
        if (c->state != IDLE && c->state != DONE && t > c->deadline) {
          error_kind(2, c->state == CONNECTING ? "connect" : "reply");
          close_client(c);
        }
        if (c->state == IDLE && t < stop_at) start_cycle(c, t);
      }
    }
  }
  cpu_to = cpu_seconds();
  if (cpu_from < 0) cpu_from = cpu_to;
  for (int i = 0; i < nclients; i++) close_client(&clients[i]);

  long errors = 0;
  for (int k = 0; k < KINDS; k++) errors += kind_counts[k];
  printf("{\"clients\":%d,\"cycles\":%ld,\"seconds\":%.3f,\"rate\":%.0f,", nclients, cycles,
         seconds, cycles / seconds);
  printf("\"cpuSeconds\":%.4f,\"sumLatency\":%.6f,\"maxLatency\":%.6f,\"histogramUs\":[",
         cpu_to - cpu_from, sum_latency, max_latency);
  int first = 1;
  for (long us = 0; us <= HIST_US; us++) {
    if (!hist[us]) continue;
    printf("%s[%ld,%u]", first ? "" : ",", us, hist[us]);
    first = 0;
  }
  printf("],\"errors\":{\"total\":%ld,\"kinds\":{", errors);
  first = 1;
  for (int k = 0; k < KINDS; k++) {
    if (!kind_counts[k]) continue;
    printf("%s\"%s\":%ld", first ? "" : ",", kind_names[k], kind_counts[k]);
    first = 0;
  }
  printf("},\"examples\":[");
  for (int i = 0; i < n_examples; i++) {
    printf("%s\"", i ? "," : "");
    for (char *p = examples[i]; *p; p++) {
      if (*p == '"' || *p == '\\') putchar('\\');
      if ((unsigned char)*p >= 0x20) putchar(*p);
    }
    putchar('"');
  }
  printf("]}}\n");
  free(clients);
  return 0;
}
