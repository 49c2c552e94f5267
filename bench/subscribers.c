// Subscribers for the 100,000-subscriber benchmark (bench/100k.mjs): one
// process holds CLIENTS event streams from one source address, so several
// processes together pass the per-process open-file limit and the ephemeral
// ports of one address. One thread, epoll, raw sockets.
//
//   subscribers PORT CLIENTS SOURCE EVENTS
//
// Connects CLIENTS streams (GET /events, HTTP/1.0) from SOURCE and the next
// three addresses (in 127.0.0.0/8) to 127.0.0.1:PORT, CONNECTING at a time,
// retrying a refused or reset connection. Prints {"connected":...} once every stream has its
// headers, then reads. Events carry "data: <seq> <CLOCK_MONOTONIC ns at
// publish>", seq from 1 to EVENTS; each delivery's latency is its arrival
// time minus that. Reports duplicates, and the distinct orders in which the
// streams received the events (every stream should see the log's one order). Commands on stdin, one per line:
//   wait SEQ   answer "have SEQ" once every stream has event SEQ
//   report     print the summary as one JSON line, close every stream, exit
// Exits 1 when a stream ends early.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING = 64, MAX_ATTEMPTS = 20, SOURCES = 4 };

typedef struct {
  int fd;
  int attempts;
  int header;     // progress through "\r\n\r\n"; 4 once the headers are read
  char line[96];  // the current line of the body
  int line_len;
  uint8_t *seen;  // [seq]: 1 once event seq arrived
  uint64_t order; // a hash of the order the events arrived in
  long duplicates, heartbeats;
} stream_t;

static int port, clients, events;
static uint32_t source;
static int epfd;
static stream_t *streams;
static uint32_t **latency_us;  // [seq][i]: latency of the i-th delivery of seq
static int *delivered;         // [seq]: deliveries of seq
static long waiting_for;       // the seq "wait" asked for, 0 if none

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void die(const char *what) {
  fprintf(stderr, "subscribers: %s: %s\n", what, strerror(errno));
  exit(2);
}

static void open_stream(stream_t *s) {
  s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (s->fd < 0) die("socket");
  // Four source addresses, each with a quarter of the streams: the kernel's
  // search for a free port slows down as an address's ports fill up. The port
  // is picked at connect, by the whole address pair, not at bind by the port
  // alone (bind's search walks every socket of a million that holds the port).
  uint32_t address = source + (uint32_t)(s - streams) % SOURCES;
  struct sockaddr_in from = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(address)};
  int one = 1;
  setsockopt(s->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
  if (bind(s->fd, (struct sockaddr *)&from, sizeof from) < 0) die("bind");
  struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
  to.sin_addr.s_addr = htonl(0x7f000001);
  if (connect(s->fd, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS) {
    die("connect");
  }
  s->attempts++;
  s->header = 0;
  struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = s};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) die("epoll_ctl");
}

/** The stream failed before its headers: try again, a limited number of times. */
static void retry(stream_t *s) {
  close(s->fd);
  if (s->attempts >= MAX_ATTEMPTS) {
    fprintf(stderr, "subscribers: a stream failed %d times\n", s->attempts);
    exit(1);
  }
  open_stream(s);
}

static void on_line(stream_t *s, int64_t arrived) {
  s->line[s->line_len] = 0;
  if (s->line[0] == ':') {
    s->heartbeats++;
    return;
  }
  if (strncmp(s->line, "data: ", 6) != 0) return;
  char *end;
  long seq = strtol(s->line + 6, &end, 10);
  int64_t sent = strtoll(end, NULL, 10);
  if (seq < 1 || seq > events) return;
  if (s->seen[seq]) {
    s->duplicates++;
    return;
  }
  s->seen[seq] = 1;
  s->order = s->order * 1000003 + (uint64_t)seq;
  latency_us[seq][delivered[seq]++] = (uint32_t)((arrived - sent) / 1000);
}

/** Reads what arrived; returns 0 when the peer closed or failed. */
static int read_stream(stream_t *s) {
  static char buffer[1 << 16];
  for (;;) {
    ssize_t n = read(s->fd, buffer, sizeof buffer);
    if (n == 0) return 0;
    if (n < 0) return errno == EAGAIN;
    int64_t arrived = now_ns();
    for (ssize_t i = 0; i < n; i++) {
      char b = buffer[i];
      if (s->header < 4) {
        static const char end[] = "\r\n\r\n";
        s->header = b == end[s->header] ? s->header + 1 : (b == '\r');
        continue;
      }
      if (b == '\n') {
        on_line(s, arrived);
        s->line_len = 0;
      } else if (s->line_len < (int)sizeof s->line - 1) {
        s->line[s->line_len++] = b;
      }
    }
  }
}

static int everyone_has(long seq) { return delivered[seq] == clients; }

static int compare_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

static void report(double connect_seconds) {
  long duplicates = 0, min_heartbeats = -1;
  uint64_t *orders = malloc(sizeof *orders * clients);
  for (int i = 0; i < clients; i++) {
    duplicates += streams[i].duplicates;
    orders[i] = streams[i].order;
    if (min_heartbeats < 0 || streams[i].heartbeats < min_heartbeats) {
      min_heartbeats = streams[i].heartbeats;
    }
  }
  // The distinct orders the streams saw the events in: one when all agree.
  qsort(orders, clients, sizeof *orders, compare_u64);
  printf("{\"clients\":%d,\"connectSeconds\":%.3f,\"duplicates\":%ld,\"minHeartbeats\":%ld,"
         "\"orders\":[",
         clients, connect_seconds, duplicates, min_heartbeats);
  for (int i = 0, first = 1; i < clients; i++) {
    if (i > 0 && orders[i] == orders[i - 1]) continue;
    printf("%s\"%llu\"", first ? "" : ",", (unsigned long long)orders[i]);
    first = 0;
  }
  printf("],\"delivered\":[");
  for (int seq = 1; seq <= events; seq++) printf("%s%d", seq > 1 ? "," : "", delivered[seq]);
  printf("],\"latencyUs\":[");
  for (int seq = 1; seq <= events; seq++) {
    printf("%s[", seq > 1 ? "," : "");
    for (int i = 0; i < delivered[seq]; i++) printf("%s%u", i ? "," : "", latency_us[seq][i]);
    printf("]");
  }
  printf("]}\n");
  fflush(stdout);
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: subscribers PORT CLIENTS SOURCE EVENTS\n");
    return 2;
  }
  port = atoi(argv[1]);
  clients = atoi(argv[2]);
  struct in_addr address;
  if (inet_pton(AF_INET, argv[3], &address) != 1) die("SOURCE");
  source = ntohl(address.s_addr);
  events = atoi(argv[4]);
  streams = calloc(clients, sizeof *streams);
  for (int i = 0; i < clients; i++) streams[i].seen = calloc(events + 1, 1);
  delivered = calloc(events + 1, sizeof *delivered);
  latency_us = calloc(events + 1, sizeof *latency_us);
  for (int seq = 1; seq <= events; seq++) latency_us[seq] = malloc(sizeof(uint32_t) * clients);
  epfd = epoll_create1(0);
  struct epoll_event ready[1024];
  static const char request[] = "GET /events HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";

  // Connect, CONNECTING at a time: more would overflow the servers' listen queues.
  int64_t start = now_ns();
  int opened = 0, started = 0;
  while (started < clients) {
    while (opened < clients && opened - started < CONNECTING) open_stream(&streams[opened++]);
    int n = epoll_wait(epfd, ready, 1024, 30000);
    if (n == 0) {
      fprintf(stderr, "subscribers: only %d of %d streams started\n", started, clients);
      return 1;
    }
    for (int i = 0; i < n; i++) {
      stream_t *s = ready[i].data.ptr;
      if (ready[i].events & (EPOLLERR | EPOLLHUP)) {
        retry(s);
        continue;
      }
      if (ready[i].events & EPOLLOUT) {
        if (write(s->fd, request, sizeof request - 1) != sizeof request - 1) {
          retry(s);
          continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev);
      }
      if (ready[i].events & EPOLLIN) {
        int was = s->header == 4;
        if (!read_stream(s)) {
          if (was) {
            fprintf(stderr, "subscribers: a stream ended\n");
            return 1;
          }
          retry(s);
          continue;
        }
        if (!was && s->header == 4) started++;
      }
    }
  }
  double connect_seconds = (now_ns() - start) / 1e9;
  printf("{\"connected\":%d,\"seconds\":%.3f}\n", clients, connect_seconds);
  fflush(stdout);

  // Read streams and commands. stdin is in the same epoll set.
  struct epoll_event in = {.events = EPOLLIN, .data.ptr = NULL};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &in) < 0) die("epoll_ctl stdin");
  fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
  char command[64];
  int command_len = 0;
  for (;;) {
    int n = epoll_wait(epfd, ready, 1024, 1000);
    for (int i = 0; i < n; i++) {
      stream_t *s = ready[i].data.ptr;
      if (s != NULL) {
        if (!read_stream(s)) {
          fprintf(stderr, "subscribers: a stream ended\n");
          return 1;
        }
        continue;
      }
      char chunk[256];
      ssize_t got = read(0, chunk, sizeof chunk);
      if (got == 0) return 0;  // stdin closed: the benchmark is gone
      for (ssize_t j = 0; j < got; j++) {
        if (chunk[j] != '\n') {
          if (command_len < (int)sizeof command - 1) command[command_len++] = chunk[j];
          continue;
        }
        command[command_len] = 0;
        command_len = 0;
        if (strncmp(command, "wait ", 5) == 0) waiting_for = atol(command + 5);
        if (strcmp(command, "report") == 0) {
          report(connect_seconds);
          return 0;
        }
      }
    }
    if (waiting_for > 0 && waiting_for <= events && everyone_has(waiting_for)) {
      printf("have %ld\n", waiting_for);
      fflush(stdout);
      waiting_for = 0;
    }
  }
}
