// Load generator for the SSE benchmark: one thread, epoll, raw sockets, so it
// costs far less per delivery than the servers it drives.
//
// Subscribers speak HTTP/1.0, so the stream comes back without chunk framing
// and an event is counted at each "\ndata: " (the benchmark's events have one
// data line, which starts with the publish sequence number). Publishers send
// POST /publish over keep-alive HTTP/1.1 with a text/plain body.
//
//   loadgen MODE PORT CLIENTS [EVENTS INFLIGHT SIZE RATE]
//   MODE fanout:  subscribe CLIENTS, publish EVENTS (INFLIGHT at a time),
//                 wait until every client has every event; print the rate.
//   MODE latency: as fanout, but publish at RATE events/s and report the
//                 publish-to-receive latency over every delivery.
//   MODE idle:    subscribe CLIENTS, print "ready", hold them until stdin closes.
//   MODE churn:   CLIENTS connect/subscribe/disconnect cycles, 64 at a time.
//
// Output is one JSON line. Sources 127.0.0.1..127.0.0.N spread connections
// over several source addresses, past the ephemeral port range.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char PATTERN[] = "\ndata: ";
enum { PATTERN_LEN = 7, MAX_LATENCIES = 1 << 24 };

typedef struct {
  int fd;
  int is_publisher;
  int index;  // a publisher's: which source address it opens from
  int header_done;   // subscriber: saw "\r\n\r\n"
  int header_match;  // progress through "\r\n\r\n"
  int match;         // progress through PATTERN
  int in_seq;        // reading the digits after PATTERN
  long seq;
  long events;
  // publisher: bytes of the current response still to read
  int busy;
  char response[512];
  int response_len;
} conn_t;

static int port;
static int epfd;
static double *send_time;  // by sequence number, for latency
static double *latencies;
static long latency_count;
static int measure_latency;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
  fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
  exit(2);
}

static int open_socket(int index) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (fd < 0) die("socket");
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // Spread over 127.0.0.1-127.0.0.8 so 10,000+ connections fit the port range.
  struct sockaddr_in source = {.sin_family = AF_INET};
  source.sin_addr.s_addr = htonl(0x7f000001 + (index % 8));
  if (bind(fd, (struct sockaddr *)&source, sizeof source) < 0) die("bind");
  struct sockaddr_in target = {.sin_family = AF_INET, .sin_port = htons(port)};
  target.sin_addr.s_addr = htonl(0x7f000001);
  if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
    die("connect");
  }
  return fd;
}

static void send_all(int fd, const char *data, size_t length) {
  // Requests are small and sockets fresh or idle: a blocking write loop is fine.
  while (length > 0) {
    ssize_t n = write(fd, data, length);
    if (n < 0 && errno == EAGAIN) continue;
    if (n < 0) die("write");
    data += n;
    length -= n;
  }
}

static void wait_connected(int fd) {
  struct pollfd target = {.fd = fd, .events = POLLOUT};
  if (poll(&target, 1, 10000) != 1) die("connect timed out");
  int error = 0;
  socklen_t size = sizeof error;
  getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size);
  if (error != 0) {
    errno = error;
    die("connect");
  }
}

static conn_t *subscribe(int index, const char *path) {
  conn_t *c = calloc(1, sizeof *c);
  c->fd = open_socket(index);
  wait_connected(c->fd);
  char request[256];
  int n = snprintf(request, sizeof request, "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", path);
  send_all(c->fd, request, n);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
  return c;
}

/** Counts events in what a subscriber received; returns 0 when the peer closed. */
static int read_subscriber(conn_t *c) {
  static char buffer[1 << 16];
  for (;;) {
    ssize_t n = read(c->fd, buffer, sizeof buffer);
    if (n == 0) return 0;
    if (n < 0) return errno == EAGAIN ? 1 : 0;
    double received = measure_latency ? now() : 0;
    for (ssize_t i = 0; i < n; i++) {
      char b = buffer[i];
      if (!c->header_done) {
        static const char end[] = "\r\n\r\n";
        c->header_match = b == end[c->header_match] ? c->header_match + 1 : (b == '\r');
        if (c->header_match == 4) {
          c->header_done = 1;
          c->match = 1;  // the body starts after a line break
        }
        continue;
      }
      if (c->in_seq) {
        if (b >= '0' && b <= '9') {
          c->seq = c->seq * 10 + (b - '0');
          continue;
        }
        c->in_seq = 0;
        c->events++;
        if (measure_latency && latency_count < MAX_LATENCIES && send_time[c->seq] > 0) {
          latencies[latency_count++] = received - send_time[c->seq];
        }
      }
      if (b == PATTERN[c->match]) {
        if (++c->match == PATTERN_LEN) {
          c->match = 0;
          c->in_seq = 1;
          c->seq = 0;
        }
      } else {
        c->match = b == '\n';
      }
    }
  }
}

static conn_t *publisher(int index) {
  conn_t *c = calloc(1, sizeof *c);
  c->is_publisher = 1;
  c->index = index;
  c->fd = open_socket(index);
  wait_connected(c->fd);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
  return c;
}

static char *padding;

static void publish(conn_t *p, long seq, int size) {
  char body[8192];
  int length = snprintf(body, sizeof body, "%ld %.*s", seq, size, padding);
  char request[9000];
  int n = snprintf(request, sizeof request,
                   "POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                   "Content-Length: %d\r\n\r\n%s",
                   length, body);
  if (measure_latency) send_time[seq] = now();
  p->busy = 1;
  p->response_len = 0;
  send_all(p->fd, request, n);
}

/** Reads a publish response; returns 1 when one is complete (needs Content-Length). */
static int read_publisher(conn_t *p) {
  for (;;) {
    ssize_t n = read(p->fd, p->response + p->response_len, sizeof p->response - 1 - p->response_len);
    if (n == 0 && !p->busy) {
      // A keep-alive connection left unused, which a server may close (Bun
      // does after 10 s without a request): open another.
      epoll_ctl(epfd, EPOLL_CTL_DEL, p->fd, NULL);
      close(p->fd);
      p->fd = open_socket(p->index);
      wait_connected(p->fd);
      struct epoll_event ev = {.events = EPOLLIN, .data.ptr = p};
      if (epoll_ctl(epfd, EPOLL_CTL_ADD, p->fd, &ev) < 0) die("epoll_ctl");
      return 0;
    }
    if (n == 0) {
      fprintf(stderr, "loadgen: the server closed a publishing connection\n");
      exit(2);
    }
    if (n < 0) {
      if (errno == EAGAIN) return 0;
      die("read");
    }
    p->response_len += n;
    p->response[p->response_len] = 0;
    char *end = strstr(p->response, "\r\n\r\n");
    if (end == NULL) continue;
    if (strncmp(p->response, "HTTP/1.1 200", 12) != 0) {
      fprintf(stderr, "loadgen: publish failed: %.80s\n", p->response);
      exit(2);
    }
    char *length = strcasestr(p->response, "content-length:");
    if (length == NULL) {
      fprintf(stderr, "loadgen: publish response without content-length\n");
      exit(2);
    }
    int body = atoi(length + 15);
    int have = p->response_len - (int)(end + 4 - p->response);
    if (have < body) continue;
    p->busy = 0;
    return 1;
  }
}

static int compare(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: loadgen fanout|latency|idle|churn PORT CLIENTS [EVENTS INFLIGHT SIZE RATE]\n");
    return 2;
  }
  const char *mode = argv[1];
  port = atoi(argv[2]);
  int clients = atoi(argv[3]);
  long events = argc > 4 ? atol(argv[4]) : 0;
  int inflight = argc > 5 ? atoi(argv[5]) : 8;
  int size = argc > 6 ? atoi(argv[6]) : 64;
  double rate = argc > 7 ? atof(argv[7]) : 0;
  epfd = epoll_create1(0);
  padding = malloc(size + 1);
  memset(padding, 'x', size);
  padding[size] = 0;
  struct epoll_event ready[1024];

  if (strcmp(mode, "churn") == 0) {
    // Connect, wait for the stream to start, disconnect; 64 cycles in flight.
    int done = 0, started = 0, open = 0;
    double start = now();
    while (done < clients) {
      while (open < 64 && started < clients) {
        subscribe(started++, "/events");
        open++;
      }
      int n = epoll_wait(epfd, ready, 1024, 10000);
      if (n == 0) {
        fprintf(stderr, "loadgen: churn stalled\n");
        return 1;
      }
      for (int i = 0; i < n; i++) {
        conn_t *c = ready[i].data.ptr;
        int alive = read_subscriber(c);
        if (c->header_done || !alive) {
          close(c->fd);
          free(c);
          open--;
          done++;
        }
      }
    }
    printf("{\"cycles\":%d,\"seconds\":%.3f}\n", done, now() - start);
    return 0;
  }

  conn_t **subs = malloc(sizeof *subs * clients);
  for (int i = 0; i < clients; i++) subs[i] = subscribe(i, "/events");
  // Every stream has started (headers read) before anything is published.
  int started = 0;
  while (started < clients) {
    int n = epoll_wait(epfd, ready, 1024, 20000);
    if (n == 0) {
      fprintf(stderr, "loadgen: only %d of %d streams started\n", started, clients);
      return 1;
    }
    for (int i = 0; i < n; i++) {
      conn_t *c = ready[i].data.ptr;
      int was = c->header_done;
      if (!read_subscriber(c)) {
        fprintf(stderr, "loadgen: a stream closed while starting\n");
        return 1;
      }
      if (!was && c->header_done) started++;
    }
  }

  if (strcmp(mode, "idle") == 0) {
    printf("ready\n");
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin) != NULL) {}
    return 0;
  }

  measure_latency = strcmp(mode, "latency") == 0;
  if (measure_latency) {
    send_time = calloc(events + 1, sizeof *send_time);
    latencies = malloc(sizeof *latencies * MAX_LATENCIES);
  }
  conn_t **pubs = malloc(sizeof *pubs * inflight);
  for (int i = 0; i < inflight; i++) pubs[i] = publisher(clients + i);

  long published = 0, acknowledged = 0;
  long long expected = (long long)clients * events, received = 0;
  double start = now(), last_event = start;
  double interval = rate > 0 ? 1.0 / rate : 0;
  while (received < expected || acknowledged < events) {
    // Keep INFLIGHT publishes going (or keep to RATE).
    for (int i = 0; i < inflight && published < events; i++) {
      if (pubs[i]->busy) continue;
      if (interval > 0 && now() < start + published * interval) break;
      publish(pubs[i], ++published, size);
    }
    int timeout = interval > 0 ? 1 : 100;
    int n = epoll_wait(epfd, ready, 1024, timeout);
    if (n > 0) last_event = now();
    else if (now() - last_event > 20) {
      fprintf(stderr, "loadgen: stalled at %lld of %lld deliveries\n", received, expected);
      break;
    }
    for (int i = 0; i < n; i++) {
      conn_t *c = ready[i].data.ptr;
      if (c->is_publisher) {
        acknowledged += read_publisher(c);
        continue;
      }
      long before = c->events;
      if (!read_subscriber(c)) {
        fprintf(stderr, "loadgen: a stream closed after %ld events\n", c->events);
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
      }
      received += c->events - before;
    }
  }
  double seconds = now() - start;
  long complete = 0;
  for (int i = 0; i < clients; i++) complete += subs[i]->events == events;
  printf("{\"clients\":%d,\"events\":%ld,\"seconds\":%.4f,\"deliveries\":%lld,"
         "\"deliveriesPerSecond\":%.0f,\"clientsComplete\":%ld",
         clients, events, seconds, received, received / seconds, complete);
  if (measure_latency && latency_count > 0) {
    qsort(latencies, latency_count, sizeof *latencies, compare);
    printf(",\"samples\":%ld,\"p50ms\":%.3f,\"p99ms\":%.3f,\"maxms\":%.3f", latency_count,
           latencies[latency_count / 2] * 1e3, latencies[(long)(latency_count * 0.99)] * 1e3,
           latencies[latency_count - 1] * 1e3);
  }
  printf("}\n");
  return complete == clients ? 0 : 1;
}
