// Load generator for the Durable Streams benchmark (bench/streams.mjs): one
// thread, epoll, raw sockets, like bench/loadgen.c, but speaking the Durable
// Streams protocol against one stream that the caller has created (PUT).
//
//   streams_loadgen MODE PORT PATH READERS [APPENDS INFLIGHT SIZE RATE]
//   MODE run:  open READERS live SSE reads (GET PATH?offset=now&live=sse),
//              wait until each has its first control event (its offset is
//              fixed), then append APPENDS times (POST PATH, text/plain),
//              INFLIGHT at a time (closed loop) or at RATE appends/s, and
//              wait until every reader has every append.
//   MODE idle: open READERS live SSE reads, print "ready" once each has its
//              first control event, hold them until stdin closes.
//
// Each append's body is one line of SIZE bytes: "SEQ MICROS xxx...\n", its
// sequence number and send time (CLOCK_MONOTONIC, microseconds). A reader
// parses the SSE events line by line: every `data:` line of an `event: data`
// that starts with a digit is one append (a server may put several appends in
// one event, or one per event), and `event: control` gives the offset and
// cursor to reconnect with when a server ends the response (ours does after
// 60 s). Checks: the first reader to reach position i of the stream records
// which append is there; every other reader must find the same append at i,
// and no append may appear at two positions, so every reader gets every append
// once, in the stream's order (appends in flight together may land in either
// order). Latency is receive time minus the send time in the body, over every
// delivery.
//
// Readers speak HTTP/1.0, so the body comes without chunk framing; appends use
// keep-alive HTTP/1.1 connections. Output is one JSON line. Stops by itself
// when nothing arrives for 20 s.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { LINE_CAP = 256, TOKEN_CAP = 96, MAX_LATENCIES = 1 << 24, STALL_SECONDS = 20 };

typedef struct {
  int fd;
  int is_appender;
  int index;
  // reader
  int in_header;      // reading the response head
  int first_line;     // the status line is next
  char line[LINE_CAP];
  int line_len;       // may exceed LINE_CAP - 1: the rest of a long line is dropped
  int event;          // 0 none, 1 data, 2 control
  int started;        // has had a control event
  int closed;         // a control event said streamClosed
  int gone;           // failed, no longer read
  long received;      // appends delivered, in order
  char offset[TOKEN_CAP];
  char cursor[TOKEN_CAP];
  // appender
  int busy;
  char response[1024];
  int response_len;
} conn_t;

static int port;
static const char *path;
static int epfd;
static long appends;
static long *order;          // by stream position: the append found there (0: none yet)
static unsigned char *placed;  // by sequence number: seen at some position
static double *latencies;
static long latency_cap, latency_count;
static long long total_received;
static long errors, reconnects, readers_started, readers_failed;
static double received_at;   // time of the read being parsed

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
  fprintf(stderr, "streams_loadgen: %s: %s\n", what, strerror(errno));
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
  struct pollfd wait = {.fd = fd, .events = POLLOUT};
  if (poll(&wait, 1, 10000) != 1) die("connect timed out");
  int error = 0;
  socklen_t size = sizeof error;
  getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size);
  if (error != 0) {
    errno = error;
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

static void watch(conn_t *c) {
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
}

/** Opens (or reopens) a reader's live SSE read, from "now" or its last offset. */
static void connect_reader(conn_t *c) {
  c->fd = open_socket(c->index);
  char request[512];
  int n;
  if (c->offset[0] == 0) {
    n = snprintf(request, sizeof request,
                 "GET %s?offset=now&live=sse HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", path);
  } else {
    n = snprintf(request, sizeof request,
                 "GET %s?offset=%s&live=sse%s%s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", path,
                 c->offset, c->cursor[0] ? "&cursor=" : "", c->cursor);
  }
  c->in_header = 1;
  c->first_line = 1;
  c->line_len = 0;
  c->event = 0;
  send_all(c->fd, request, n);
  watch(c);
}

/** Copies the JSON string field `name` of `json` into `out` (unchanged when absent). */
static void json_string(const char *json, const char *name, char *out) {
  char key[64];
  snprintf(key, sizeof key, "\"%s\":\"", name);
  const char *start = strstr(json, key);
  if (start == NULL) return;
  start += strlen(key);
  const char *end = strchr(start, '"');
  if (end == NULL || end - start >= TOKEN_CAP) return;
  memcpy(out, start, end - start);
  out[end - start] = 0;
}

static void deliver(conn_t *c, long seq, long long micros) {
  long position = c->received;
  if (seq < 1 || seq > appends || position >= appends) {
    errors++;
    return;
  }
  if (order[position] == 0) {
    if (placed[seq]) errors++;  // the same append at two positions
    placed[seq] = 1;
    order[position] = seq;
  } else if (order[position] != seq) {
    errors++;  // another order than the other readers', a gap or a repeat
    return;
  }
  c->received++;
  total_received++;
  if (latency_count < latency_cap) {
    latencies[latency_count++] = received_at - micros / 1e6;
  }
}

/** Handles one complete line of a reader's response (without its line break). */
static void reader_line(conn_t *c, char *line, int length) {
  if (c->in_header) {
    if (c->first_line) {
      c->first_line = 0;
      if (strncmp(line, "HTTP/1.", 7) != 0 || strncmp(line + 8, " 200", 4) != 0) {
        fprintf(stderr, "streams_loadgen: a read failed: %.80s\n", line);
        exit(2);
      }
    } else if (length == 0) {
      c->in_header = 0;
    } else if (strncasecmp(line, "transfer-encoding:", 18) == 0) {
      // Chunk sizes between the lines would be read as SSE: HTTP/1.0 must not get them.
      fprintf(stderr, "streams_loadgen: a read came chunked: %.80s\n", line);
      exit(2);
    }
    return;
  }
  if (length == 0) {
    c->event = 0;
    return;
  }
  if (strncmp(line, "event:", 6) == 0) {
    const char *name = line[6] == ' ' ? line + 7 : line + 6;
    c->event = strcmp(name, "data") == 0 ? 1 : strcmp(name, "control") == 0 ? 2 : 0;
    return;
  }
  if (strncmp(line, "data:", 5) != 0) return;  // comments, id:, retry:
  char *value = line[5] == ' ' ? line + 6 : line + 5;
  if (c->event == 1) {
    if (*value < '0' || *value > '9') return;  // the empty line after a final line break
    char *rest;
    long seq = strtol(value, &rest, 10);
    long long micros = strtoll(rest, NULL, 10);
    deliver(c, seq, micros);
  } else if (c->event == 2) {
    json_string(value, "streamNextOffset", c->offset);
    json_string(value, "streamCursor", c->cursor);
    if (strstr(value, "\"streamClosed\":true") != NULL) c->closed = 1;
    if (!c->started) {
      c->started = 1;
      readers_started++;
    }
  }
}

/** Reads what a reader has; returns 0 when the server ended the response. */
static int read_reader(conn_t *c) {
  static char buffer[1 << 16];
  for (;;) {
    ssize_t n = read(c->fd, buffer, sizeof buffer);
    if (n == 0) return 0;
    if (n < 0) return errno == EAGAIN ? 1 : 0;
    received_at = now();
    for (ssize_t i = 0; i < n; i++) {
      char b = buffer[i];
      if (b == '\n') {
        int length = c->line_len < LINE_CAP ? c->line_len : LINE_CAP - 1;
        if (length > 0 && c->line[length - 1] == '\r') length--;
        c->line[length] = 0;
        reader_line(c, c->line, length);
        c->line_len = 0;
      } else {
        if (c->line_len < LINE_CAP - 1) c->line[c->line_len] = b;
        c->line_len++;
      }
    }
  }
}

/** A reader whose response ended: reconnect from its offset, as the protocol says. */
static void reader_ended(conn_t *c) {
  epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  if (c->closed || !c->started) {
    if (!c->gone) readers_failed++;
    c->gone = 1;
    fprintf(stderr, "streams_loadgen: a read ended after %ld appends%s\n", c->received,
            c->closed ? " (stream closed)" : " before its first control event");
    return;
  }
  reconnects++;
  connect_reader(c);
}

static void connect_appender(conn_t *c) {
  c->fd = open_socket(c->index);
  c->busy = 0;
  c->response_len = 0;
  watch(c);
}

static const char *padding;

static void append(conn_t *a, long seq, int size) {
  char body[8192];
  int length = snprintf(body, sizeof body, "%ld %lld ", seq, (long long)(now() * 1e6));
  int fill = size - 1 - length;
  if (fill < 0) fill = 0;
  if (fill > (int)sizeof body - length - 2) fill = sizeof body - length - 2;
  memcpy(body + length, padding, fill);
  length += fill;
  body[length++] = '\n';
  char request[9000];
  int n = snprintf(request, sizeof request,
                   "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                   "Content-Length: %d\r\n\r\n",
                   path, length);
  memcpy(request + n, body, length);
  a->busy = 1;
  a->response_len = 0;
  send_all(a->fd, request, n + length);
}

/** Reads an append's response; returns 1 when one is complete and succeeded. */
static int read_appender(conn_t *a) {
  for (;;) {
    ssize_t n = read(a->fd, a->response + a->response_len,
                     sizeof a->response - 1 - a->response_len);
    if (n == 0 || (n < 0 && errno != EAGAIN)) {
      if (a->busy) {
        fprintf(stderr, "streams_loadgen: the server closed a connection with an append on it\n");
        exit(2);
      }
      // An idle keep-alive connection the server timed out: open another.
      epoll_ctl(epfd, EPOLL_CTL_DEL, a->fd, NULL);
      close(a->fd);
      connect_appender(a);
      return 0;
    }
    if (n < 0) return 0;
    a->response_len += n;
    a->response[a->response_len] = 0;
    char *end = strstr(a->response, "\r\n\r\n");
    if (end == NULL) {
      if (a->response_len >= (int)sizeof a->response - 1) {
        fprintf(stderr, "streams_loadgen: an append's response head is too long\n");
        exit(2);
      }
      continue;
    }
    if (strncmp(a->response, "HTTP/1.1 2", 10) != 0) {
      fprintf(stderr, "streams_loadgen: an append failed: %.120s\n", a->response);
      exit(2);
    }
    int have = a->response_len - (int)(end + 4 - a->response);
    if (strcasestr(a->response, "transfer-encoding: chunked") != NULL) {
      if (have < 5 || strcmp(a->response + a->response_len - 5, "0\r\n\r\n") != 0) continue;
    } else {
      char *length = strcasestr(a->response, "content-length:");
      int body = length != NULL && length < end ? atoi(length + 15) : 0;
      if (have < body) continue;
    }
    a->busy = 0;
    return 1;
  }
}

static int compare(const void *x, const void *y) {
  double a = *(const double *)x, b = *(const double *)y;
  return (a > b) - (a < b);
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr,
            "usage: streams_loadgen run|idle PORT PATH READERS [APPENDS INFLIGHT SIZE RATE]\n");
    return 2;
  }
  const char *mode = argv[1];
  port = atoi(argv[2]);
  path = argv[3];
  int readers = atoi(argv[4]);
  appends = argc > 5 ? atol(argv[5]) : 0;
  int inflight = argc > 6 ? atoi(argv[6]) : 8;
  int size = argc > 7 ? atoi(argv[7]) : 64;
  double rate = argc > 8 ? atof(argv[8]) : 0;
  if (inflight < 1) inflight = 1;
  epfd = epoll_create1(0);
  char *fill = malloc(8192);
  memset(fill, 'x', 8192);
  padding = fill;
  order = calloc(appends + 1, sizeof *order);
  placed = calloc(appends + 1, 1);
  long long all = (long long)readers * appends;
  latency_cap = all < MAX_LATENCIES ? all : MAX_LATENCIES;
  latencies = malloc(sizeof *latencies * (latency_cap + 1));
  struct epoll_event ready[1024];

  conn_t *subs = calloc(readers, sizeof *subs);
  for (int i = 0; i < readers; i++) {
    subs[i].index = i;
    connect_reader(&subs[i]);
  }
  // Every read has had its first control event, so its "now" is fixed, before
  // anything is appended.
  double last_event = now();
  while (readers_started + readers_failed < readers) {
    int n = epoll_wait(epfd, ready, 1024, 1000);
    if (n > 0) last_event = now();
    else if (now() - last_event > STALL_SECONDS) break;
    for (int i = 0; i < n; i++) {
      conn_t *c = ready[i].data.ptr;
      if (!read_reader(c)) reader_ended(c);
    }
  }
  if (readers_started < readers) {
    fprintf(stderr, "streams_loadgen: only %ld of %d reads started\n", readers_started, readers);
    return 1;
  }

  if (strcmp(mode, "idle") == 0) {
    printf("ready\n");
    fflush(stdout);
    char line[16];
    while (fgets(line, sizeof line, stdin) != NULL) {}
    return 0;
  }

  conn_t *pubs = calloc(inflight, sizeof *pubs);
  for (int i = 0; i < inflight; i++) {
    pubs[i].is_appender = 1;
    pubs[i].index = readers + i;
    connect_appender(&pubs[i]);
  }
  long sent = 0, acknowledged = 0;
  double start = now(), interval = rate > 0 ? 1.0 / rate : 0;
  last_event = start;
  while (total_received < all || acknowledged < appends) {
    // Keep INFLIGHT appends going (or keep to RATE).
    for (int i = 0; i < inflight && sent < appends; i++) {
      if (pubs[i].busy) continue;
      if (interval > 0 && now() < start + sent * interval) break;
      append(&pubs[i], ++sent, size);
    }
    int n = epoll_wait(epfd, ready, 1024, interval > 0 ? 1 : 100);
    if (n > 0) last_event = now();
    else if (now() - last_event > STALL_SECONDS) {
      fprintf(stderr, "streams_loadgen: stalled at %lld of %lld deliveries, %ld of %ld appends\n",
              total_received, all, acknowledged, appends);
      break;
    }
    for (int i = 0; i < n; i++) {
      conn_t *c = ready[i].data.ptr;
      if (c->is_appender) acknowledged += read_appender(c);
      else if (!read_reader(c)) reader_ended(c);
    }
  }
  double seconds = now() - start;
  long complete = 0;
  for (int i = 0; i < readers; i++) complete += subs[i].received == appends;
  printf("{\"readers\":%d,\"appends\":%ld,\"acknowledged\":%ld,\"seconds\":%.4f,"
         "\"deliveries\":%lld,\"deliveriesPerSecond\":%.0f,\"appendsPerSecond\":%.1f,"
         "\"readersComplete\":%ld,\"errors\":%ld,\"reconnects\":%ld",
         readers, appends, acknowledged, seconds, total_received, total_received / seconds,
         acknowledged / seconds, complete, errors, reconnects);
  if (latency_count > 0) {
    qsort(latencies, latency_count, sizeof *latencies, compare);
    printf(",\"samples\":%ld,\"p50ms\":%.3f,\"p99ms\":%.3f,\"maxms\":%.3f", latency_count,
           latencies[latency_count / 2] * 1e3, latencies[(long)(latency_count * 0.99)] * 1e3,
           latencies[latency_count - 1] * 1e3);
  }
  printf("}\n");
  return complete == readers && errors == 0 ? 0 : 1;
}
