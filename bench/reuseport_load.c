// SPDX-License-Identifier: MIT
/*
 * Open-loop TCP connection load for bench/bench_reuseport.py: opens RATE new
 * connections per second for SECONDS, whatever the server does, and records
 * every one of them.
 *
 * Why not wrk or ab from Debian: they keep connections alive (wrk) or run a
 * fixed number of requests closed-loop (ab), so a server that stalls lowers
 * the offered load instead of showing failures; neither records connect
 * latency per connection with its start time, which the restart-vs-quiet
 * comparison of one run needs. This is ~250 lines of epoll, built by the
 * bench with the system's gcc.
 *
 * Each connection: non-blocking connect(); writable = connected (connect
 * latency); with -H send an HTTP/1.0 GET; read the answer until EOF; close
 * with SO_LINGER 0 (RST, so no TIME_WAIT and source ports recycle at once).
 * Failures: refused, reset, timeout (TIMEOUT_MS without an answer), closed
 * without an answer, a non-200 HTTP answer.
 *
 * Output: a binary file of records {u32 start_us, u32 connect_us, u32 outcome,
 * u32 answer}, where answer is the number the server's reply starts with (the
 * generation), and a summary line on stdout.
 *
 * usage: reuseport_load -a ADDR -p PORT -r RATE -d SECONDS -o FILE [-H] [-t TIMEOUT_MS]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { OK, REFUSED, RESET, TIMEOUT, CLOSED, OTHER, BAD_REPLY, N_OUTCOMES };
static const char *names[] = { "ok", "refused", "reset", "timeout", "closed", "other", "bad-reply" };

struct rec {
	uint32_t start_us, connect_us, outcome, answer;
};

struct conn {
	int fd;			/* -1: free */
	uint32_t idx;		/* record index */
	uint64_t start;
	int connected;
	int len;
	char buf[512];	/* enough for HTTP headers and the first body bytes */
};

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

#define MAX_CONNS 65536
static struct conn conns[MAX_CONNS];	/* indexed by fd */
static struct rec *recs;
static uint64_t counts[N_OUTCOMES];
static volatile sig_atomic_t interrupted;	/* SIGINT/SIGTERM: stop opening, drain, write */

static void on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

static const char http_get[] = "GET / HTTP/1.0\r\nHost: bench\r\n\r\n";

static void finish(int ep, struct conn *c, int outcome)
{
	struct linger lg = { 1, 0 };

	recs[c->idx].outcome = outcome;
	if (outcome == OK || outcome == BAD_REPLY) {
		const char *p = c->buf;

		if (!strncmp(p, "HTTP/1.", 7)) {	/* the body follows the blank line */
			p = strstr(c->buf, "\r\n\r\n");
			p = p ? p + 4 : c->buf + c->len;
		}
		recs[c->idx].answer = (uint32_t)strtoul(p, NULL, 10);
	}
	counts[outcome]++;
	epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(c->fd);
	c->fd = -1;
}

static int errno_outcome(int err)
{
	if (err == ECONNREFUSED)
		return REFUSED;
	if (err == ECONNRESET || err == EPIPE || err == ECONNABORTED)
		return RESET;
	if (err == ETIMEDOUT)
		return TIMEOUT;
	return OTHER;
}

int main(int argc, char **argv)
{
	const char *addr = "127.0.0.1", *out = NULL;
	int port = 8080, http = 0, opt, ep;
	double rate = 1000, seconds = 5;
	uint64_t timeout_us = 3000000, t0, stop_at, opened = 0, max_recs, open_now = 0, last_scan = 0;
	int max_fd = 0;
	struct sockaddr_in sa = { .sin_family = AF_INET };
	struct epoll_event evs[512];
	FILE *f;

	while ((opt = getopt(argc, argv, "a:p:r:d:o:Ht:")) != -1) {
		switch (opt) {
		case 'a': addr = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'r': rate = atof(optarg); break;
		case 'd': seconds = atof(optarg); break;
		case 'o': out = optarg; break;
		case 'H': http = 1; break;
		case 't': timeout_us = (uint64_t)atoi(optarg) * 1000; break;
		default:
			fprintf(stderr, "usage: %s -a ADDR -p PORT -r RATE -d SECONDS -o FILE [-H] [-t MS]\n", argv[0]);
			return 2;
		}
	}
	if (!out || inet_pton(AF_INET, addr, &sa.sin_addr) != 1 || rate <= 0 || seconds <= 0) {
		fprintf(stderr, "reuseport_load: need -o FILE, an IPv4 -a, positive -r and -d\n");
		return 2;
	}
	sa.sin_port = htons(port);
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {	/* one fd per connection in flight */
		rl.rlim_cur = rl.rlim_max < MAX_CONNS ? rl.rlim_max : MAX_CONNS;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	max_recs = 1 << 16;	/* grows: the run may be cut short by SIGINT or last long */
	recs = calloc(max_recs, sizeof(*recs));
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (!recs || ep < 0) {
		perror("reuseport_load: setup");
		return 1;
	}
	for (int i = 0; i < MAX_CONNS; i++)
		conns[i].fd = -1;

	struct sigaction act = { .sa_handler = on_signal };

	sigaction(SIGINT, &act, NULL);
	sigaction(SIGTERM, &act, NULL);
	t0 = now_us();
	stop_at = t0 + (uint64_t)(seconds * 1e6);
	/* Open-loop: the schedule, not the server, says when a connection starts. */
	for (;;) {
		uint64_t now = now_us();

		if (interrupted && now < stop_at)
			stop_at = now;
		uint64_t due = now < stop_at ? (uint64_t)((now - t0) * rate / 1e6) + 1 : opened;
		int n;

		if (now >= stop_at && open_now == 0)
			break;
		if (now >= stop_at + timeout_us + 1000000)
			break;
		/* At most 64 per round, so answers are read between bursts when behind. */
		for (int burst = 0; burst < 64 && opened < due; burst++) {
			if (opened == max_recs) {
				struct rec *more = realloc(recs, 2 * max_recs * sizeof(*recs));

				if (!more) {
					perror("reuseport_load: realloc");
					return 1;
				}
				memset(more + max_recs, 0, max_recs * sizeof(*recs));
				recs = more;
				max_recs *= 2;
			}
			int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
			struct rec *r = &recs[opened];
			struct epoll_event ev = { .events = EPOLLOUT };

			r->start_us = (uint32_t)(now - t0);
			if (fd < 0 || fd >= MAX_CONNS) {
				r->outcome = OTHER;
				counts[OTHER]++;
				if (fd >= 0)
					close(fd);
				opened++;
				continue;
			}
			conns[fd] = (struct conn){ .fd = fd, .idx = (uint32_t)opened, .start = now_us() };
			if (fd > max_fd)
				max_fd = fd;
			opened++;
			open_now++;
			if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 && errno != EINPROGRESS) {
				r->outcome = errno_outcome(errno);
				counts[r->outcome]++;
				close(fd);
				conns[fd].fd = -1;
				open_now--;
				continue;
			}
			ev.data.fd = fd;
			epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
		}
		n = epoll_wait(ep, evs, 512, opened < due ? 0 : 1);	/* behind: no sleep */
		for (int i = 0; i < n; i++) {
			struct conn *c = &conns[evs[i].data.fd];
			int err = 0;
			socklen_t len = sizeof(err);

			if (c->fd < 0)
				continue;
			if (!c->connected) {
				getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
				if (err) {
					finish(ep, c, errno_outcome(err));
					open_now--;
					continue;
				}
				c->connected = 1;
				recs[c->idx].connect_us = (uint32_t)(now_us() - c->start);
				if (http && send(c->fd, http_get, sizeof(http_get) - 1, MSG_NOSIGNAL) < 0) {
					finish(ep, c, errno_outcome(errno));
					open_now--;
					continue;
				}
				struct epoll_event ev = { .events = EPOLLIN, .data.fd = c->fd };

				epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
				continue;
			}
			for (;;) {
				char tmp[512];
				ssize_t got = recv(c->fd, tmp, sizeof(tmp), 0);

				if (got > 0) {
					int room = (int)sizeof(c->buf) - 1 - c->len;

					if (room > 0) {
						int take = got < room ? (int)got : room;

						memcpy(c->buf + c->len, tmp, take);
						c->len += take;
						c->buf[c->len] = 0;
					}
					continue;
				}
				if (got < 0 && (errno == EAGAIN || errno == EINTR))
					break;
				if (got < 0)
					finish(ep, c, errno_outcome(errno));
				else if (c->len == 0)
					finish(ep, c, CLOSED);
				else if (http && strncmp(c->buf, "HTTP/1.0 200", 12) && strncmp(c->buf, "HTTP/1.1 200", 12))
					finish(ep, c, BAD_REPLY);
				else
					finish(ep, c, OK);
				open_now--;
				break;
			}
		}
		/* Time out what waited too long; a scan every 100 ms is plenty. */
		now = now_us();
		if (now - last_scan > 100000) {
			last_scan = now;
			for (int fd = 0; fd <= max_fd; fd++) {
				struct conn *c = &conns[fd];

				if (c->fd >= 0 && now - c->start > timeout_us) {
					finish(ep, c, TIMEOUT);
					open_now--;
				}
			}
		}
	}
	f = fopen(out, "wb");
	if (!f || fwrite(recs, sizeof(*recs), opened, f) != opened || fclose(f)) {
		perror("reuseport_load: write");
		return 1;
	}
	printf("{\"opened\": %llu, \"seconds\": %.3f", (unsigned long long)opened,
	       (now_us() - t0) / 1e6);
	for (int i = 0; i < N_OUTCOMES; i++)
		printf(", \"%s\": %llu", names[i], (unsigned long long)counts[i]);
	printf("}\n");
	return 0;
}
