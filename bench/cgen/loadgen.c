/*
 * A lean load generator for the tcpnetlock benchmark: one process, one epoll loop, no
 * allocation per cycle. It runs the `cycles` scenario (one TCP connection per lock: connect,
 * `lock,name:P-i`, `ok...`, `release`, `released`, EOF) with N concurrent clients on distinct
 * names, or with `--session 1` the same cycles over sessions (protocol version 3: each client
 * opens one session and then loops `lock,id:0,name:P-i` → `ok,...,id:0` → `release,id:0` →
 * `released,id:0` on it; a cycle is timed from the lock line to `released`), and prints one JSON
 * object: the rate, a latency histogram (1 microsecond buckets up to 1 s, then one overflow
 * bucket), the errors, and its own CPU time over the measured window, so that the benchmark can
 * show the generator's CPU beside the server's.
 *
 * With `--handover 1` it runs the hand-over scenario instead: N clients share `--names K` names
 * (client i uses `P-(i mod K)`) and loop connect, `lock,name:X,wait:W`, (`queued,position:P`)*,
 * `ok,token:T`, `release`, `released`, EOF. It measures the delay from a holder's sending `release`
 * to the next queued waiter's receiving `ok`, the lock→ok time, and (with `--check 1`) checks
 * that a grant never finds another holder, that tokens rise, and that queue positions fall.
 * `--readers F` makes that share of the clients readers (`mode:shared`), the others writers.
 *
 * Built by bench/cgen.ts with the machine's C compiler (`cc -O2`); never committed as a binary.
 *
 *   loadgen --port 7654 [--host 127.0.0.1] --clients 16 --seconds 3 [--warmup 0.5]
 *           [--prefix cyc] [--timeout 5] [--session 0|1]
 *           [--handover 1 --names 4 [--wait 30] [--check 1] [--readers 0.8]]
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

enum state { IDLE, CONNECTING, WAIT_SESSION, WAIT_OK, HOLDING, WAIT_RELEASED, WAIT_EOF, DONE };

struct client {
  int fd;
  enum state state;
  double t0;       /* when this cycle began (connect), seconds */
  double deadline; /* when the current step times out */
  int len;         /* bytes in buf */
  char buf[256];
  char lock_line[96];
  int lock_len;
  /* Hand-over mode. */
  int name;         /* index of its name */
  int reader;       /* takes its name shared */
  int holding;      /* granted and not yet released (for the exclusion check) */
  int queued;       /* got a queued line in this cycle */
  long position;    /* the last queue position received in this cycle */
  double sent;      /* when the lock line was sent */
  struct client *next_release; /* in the list of holders whose release goes out after the batch */
};

/* Hand-over mode: per name, what this process saw (one process holds every client of a name). */
struct name_state {
  long last_token, last_exclusive_token;
  double released_at; /* when a holder last sent `release`; < 0: never */
  long grants, releases, shared_grants, shared_releases;
};

#define HIST_US 1000000
static unsigned int hist[HIST_US + 1];
static long cycles = 0;
static double sum_latency = 0, max_latency = 0;

#define KINDS 9
static const char *kind_names[KINDS] = {"refused", "reset",     "timeout",
                                        "unexpected-reply", "eof", "other",
                                        "exclusion", "token-order", "queue-position"};
enum { E_REFUSED, E_RESET, E_TIMEOUT, E_UNEXPECTED, E_EOF, E_OTHER, E_EXCLUSION, E_TOKEN_ORDER,
       E_POSITION };

/* Hand-over mode: the delay release→next ok, lock→ok, and lock→ok of writers (with readers). */
struct histogram {
  unsigned int *us; /* HIST_US + 1 buckets, allocated only in hand-over mode */
  long count;
  double sum, max;
};
static struct histogram delay_hist, grant_hist, writer_hist;
static long grants = 0, handovers = 0, shared_grants = 0, queued_lines = 0, all_grants = 0;
static struct name_state *names;
static struct client *release_list = NULL;
static int handover_mode = 0, check_locking = 1;

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

static void hist_add(struct histogram *h, double seconds) {
  long us = (long)(seconds * 1e6);
  if (us < 0) us = 0;
  h->us[us > HIST_US ? HIST_US : us]++;
  h->count++;
  h->sum += seconds;
  if (seconds > h->max) h->max = seconds;
}

static int epfd;
static struct sockaddr_in addr;
static double timeout_s = 5;
static int session_mode = 0;

static void close_client(struct client *c) {
  if (c->holding) {
    /* Closing a holding connection frees the lock too. */
    names[c->name].releases++;
    if (c->reader) names[c->name].shared_releases++;
    c->holding = 0;
  }
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

static int starts(const char *line, int n, const char *prefix) {
  int k = (int)strlen(prefix);
  return n >= k && memcmp(line, prefix, k) == 0;
}

/* The decimal number in line[from, n), or -1 when it is not one. */
static long number_at(const char *line, int from, int n) {
  if (from >= n || n - from > 18) return -1;
  long v = 0;
  for (int i = from; i < n; i++) {
    if (line[i] < '0' || line[i] > '9') return -1;
    v = v * 10 + (line[i] - '0');
  }
  return v;
}

/* Hand-over mode: `ok,token:T` for a waiting client. */
static void on_grant(struct client *c, const char *line, int n, double t, double measure_from,
                     double stop_at) {
  long token = number_at(line, 9, n);
  if (token < 1) {
    char detail[120];
    snprintf(detail, sizeof detail, "bad token in %.*s", n > 100 ? 100 : n, line);
    error_kind(E_UNEXPECTED, detail);
  }
  struct name_state *st = &names[c->name];
  st->grants++;
  if (c->reader) st->shared_grants++;
  c->holding = 1;
  if (check_locking) {
    /* Every grant but the first needs a release the server has seen, which this process sent
     * earlier: grants received never run more than one ahead of releases sent. With readers: a
     * writer's grant finds nobody holding, a reader's finds no writer. */
    long holders = st->grants - st->releases;
    long writers = holders - (st->shared_grants - st->shared_releases);
    if (c->reader ? writers > 0 : holders > 1) {
      char detail[120];
      snprintf(detail, sizeof detail, "name %d granted with %ld holder(s) before", c->name,
               holders - 1);
      error_kind(E_EXCLUSION, detail);
    }
    /* A writer's grant comes after every grant before it was let go, a reader's after every
     * writer's: their tokens are larger. */
    long before = c->reader ? st->last_exclusive_token : st->last_token;
    if (token <= before) {
      char detail[120];
      snprintf(detail, sizeof detail, "token %ld after %ld on name %d", token, before, c->name);
      error_kind(E_TOKEN_ORDER, detail);
    }
    if (token > st->last_token) st->last_token = token;
    if (!c->reader) st->last_exclusive_token = token;
  }
  all_grants++;
  if (c->sent >= measure_from && t <= stop_at) {
    if (c->queued && st->released_at >= 0) {
      hist_add(&delay_hist, t - st->released_at);
      handovers++;
    }
    hist_add(&grant_hist, t - c->sent);
    if (c->reader) shared_grants++;
    else if (writer_hist.us) hist_add(&writer_hist, t - c->sent);
    grants++;
  }
  /* The release goes out once the whole batch of events is handled: a second grant the server
   * sent at the same moment (a double grant) is seen before this release counts. */
  c->state = HOLDING;
  c->next_release = release_list;
  release_list = c;
}

/* Hand-over mode: one complete line for c. Returns -1 when the client was closed. */
static int on_handover_line(struct client *c, const char *line, int n, double t,
                            double measure_from, double stop_at) {
  if (c->state == WAIT_OK && starts(line, n, "queued,position:")) {
    long p = number_at(line, 16, n);
    if (check_locking && !(p >= 1 && p < c->position)) {
      char detail[120];
      snprintf(detail, sizeof detail, "%.*s after position %ld", n > 80 ? 80 : n, line,
               c->position);
      error_kind(E_POSITION, detail);
    }
    c->position = p;
    c->queued = 1;
    queued_lines++;
    return 0;
  }
  if (c->state == WAIT_OK && starts(line, n, "ok,token:")) {
    on_grant(c, line, n, t, measure_from, stop_at);
    return 0;
  }
  if (c->state == WAIT_RELEASED && n == 8 && memcmp(line, "released", 8) == 0) {
    c->state = WAIT_EOF;
    c->deadline = t + timeout_s;
    return 0;
  }
  char detail[120];
  snprintf(detail, sizeof detail, "%.*s", n > 100 ? 100 : n, line);
  error_kind(E_UNEXPECTED, detail);
  close_client(c);
  return -1;
}

/* Hand-over mode: the releases of the holders granted in the batch just handled. */
static void send_releases(void) {
  while (release_list != NULL) {
    struct client *c = release_list;
    release_list = c->next_release;
    c->next_release = NULL;
    if (c->state != HOLDING) continue; /* closed meanwhile (its release was counted then) */
    struct name_state *st = &names[c->name];
    st->releases++;
    if (c->reader) st->shared_releases++;
    c->holding = 0;
    double t = now();
    st->released_at = t;
    if (send_all(c, "release\n", 8) < 0) {
      close_client(c);
      continue;
    }
    c->state = WAIT_RELEASED;
    c->deadline = t + timeout_s;
  }
}

/* One complete line (without \n) arrived for c. Returns -1 when the client was closed. */
static int on_line(struct client *c, const char *line, int n, double t, double measure_from,
                   double stop_at) {
  if (handover_mode) return on_handover_line(c, line, n, t, measure_from, stop_at);
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
    c->sent = t;
    c->queued = 0;
    c->position = 1L << 62;
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
        if (handover_mode) close_client(c);
        else finish(c, t, measure_from, stop_at);
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

/* Is client i of a hand-over run (on `nnames` names, a share `readers` of them readers) a reader?
 * The same rule as `isReader` in bench/load.ts. */
static int is_reader(int i, int nnames, double readers) {
  if (readers <= 0) return 0;
  long k = i / nnames;
  double w = 1 - readers;
  return (long)((k + 1) * w + 1e-9) == (long)(k * w + 1e-9);
}

static void print_histogram(const char *key, const struct histogram *h) {
  printf("\"%s\":{\"count\":%ld,\"sum\":%.6f,\"max\":%.6f,\"us\":[", key, h->count, h->sum,
         h->max);
  int first = 1;
  for (long us = 0; h->us && us <= HIST_US; us++) {
    if (!h->us[us]) continue;
    printf("%s[%ld,%u]", first ? "" : ",", us, h->us[us]);
    first = 0;
  }
  printf("]},");
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1", *prefix = "cyc";
  int port = 0, nclients = 16, nnames = 4;
  double seconds = 3, warmup = 0.5, wait_s = 30, readers = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--host")) host = argv[i + 1];
    else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--clients")) nclients = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--warmup")) warmup = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--prefix")) prefix = argv[i + 1];
    else if (!strcmp(argv[i], "--timeout")) timeout_s = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--session")) session_mode = atoi(argv[i + 1]) != 0;
    else if (!strcmp(argv[i], "--handover")) handover_mode = atoi(argv[i + 1]) != 0;
    else if (!strcmp(argv[i], "--names")) nnames = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--wait")) wait_s = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--check")) check_locking = atoi(argv[i + 1]) != 0;
    else if (!strcmp(argv[i], "--readers")) readers = atof(argv[i + 1]);
    else {
      fprintf(stderr, "loadgen: unknown option %s\n", argv[i]);
      return 2;
    }
  }
  if (port <= 0 || nclients <= 0 || seconds <= 0 || nnames <= 0 || readers < 0 || readers >= 1 ||
      (handover_mode && session_mode)) {
    fprintf(stderr, "usage: loadgen --port P [--host H] --clients N --seconds S [--warmup W] "
                    "[--prefix X] [--timeout T] [--session 0|1 | --handover 1 [--names K] "
                    "[--wait S] [--check 0|1] [--readers F (0 <= F < 1)]]\n");
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
  if (handover_mode) {
    names = calloc(nnames, sizeof *names);
    for (int k = 0; k < nnames; k++) names[k].released_at = -1;
    delay_hist.us = calloc(HIST_US + 1, sizeof(unsigned int));
    grant_hist.us = calloc(HIST_US + 1, sizeof(unsigned int));
    if (readers > 0) writer_hist.us = calloc(HIST_US + 1, sizeof(unsigned int));
  }
  for (int i = 0; i < nclients; i++) {
    struct client *c = &clients[i];
    c->fd = -1;
    if (handover_mode) {
      c->name = i % nnames;
      c->reader = is_reader(i, nnames, readers);
      c->lock_len = snprintf(c->lock_line, sizeof c->lock_line, "lock,name:%s-%d,wait:%g%s\n",
                             prefix, c->name, wait_s,
                             readers <= 0 ? "" : c->reader ? ",mode:shared" : ",mode:exclusive");
    } else {
      c->lock_len = snprintf(c->lock_line, sizeof c->lock_line,
                             session_mode ? "lock,id:0,name:%s-%d\n" : "lock,name:%s-%d\n", prefix,
                             i);
    }
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
    send_releases();
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
  int first = 1;
  if (handover_mode) {
    printf("{\"clients\":%d,\"names\":%d,\"readers\":%g,\"grants\":%ld,\"handovers\":%ld,"
           "\"sharedGrants\":%ld,\"queuedLines\":%ld,\"allGrants\":%ld,\"seconds\":%.3f,"
           "\"cpuSeconds\":%.4f,",
           nclients, nnames, readers, grants, handovers, shared_grants, queued_lines, all_grants,
           seconds, cpu_to - cpu_from);
    print_histogram("delay", &delay_hist);
    print_histogram("grantLatency", &grant_hist);
    print_histogram("writerGrantLatency", &writer_hist);
  } else {
    printf("{\"clients\":%d,\"cycles\":%ld,\"seconds\":%.3f,\"rate\":%.0f,", nclients, cycles,
           seconds, cycles / seconds);
    printf("\"cpuSeconds\":%.4f,\"sumLatency\":%.6f,\"maxLatency\":%.6f,\"histogramUs\":[",
           cpu_to - cpu_from, sum_latency, max_latency);
    for (long us = 0; us <= HIST_US; us++) {
      if (!hist[us]) continue;
      printf("%s[%ld,%u]", first ? "" : ",", us, hist[us]);
      first = 0;
    }
    printf("],");
  }
  printf("\"errors\":{\"total\":%ld,\"kinds\":{", errors);
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
  free(names);
  free(delay_hist.us);
  free(grant_hist.us);
  free(writer_hist.us);
  return 0;
}
