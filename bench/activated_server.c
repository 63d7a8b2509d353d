// SPDX-License-Identifier: MIT
/*
 * The server of the production-load bench: socket-activated like any systemd
 * service (listeners from fd 3, LISTEN_FDS, LISTEN_PID), READY=1 on
 * NOTIFY_SOCKET, then accept -> write "<generation>\n" -> close, as fast as
 * one core allows (epoll, accept4 until EAGAIN). On SIGTERM it closes its
 * listeners at once without accepting what is queued (whatever waits there
 * migrates to the next generation) and exits 0.
 *
 * Written in C because the bench wants the server not to be the limit at
 * 10,000 connections/s; the Python servers of the other benches top out far
 * below that. Built by bench/bench_reuseport.py with the system's gcc.
 *
 * usage: activated_server [WORKERS]   (default 1; workers are forked after
 * READY=1 and share the listeners, as gunicorn's or nginx's do; SIGTERM to
 * the first process stops them all)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

static int notify_ready(void)
{
	const char *addr = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	const char msg[] = "READY=1";
	socklen_t len;
	int fd, rc;

	if (!addr || !*addr || strlen(addr) >= sizeof(sa.sun_path))
		return -1;
	strcpy(sa.sun_path, addr);
	if (sa.sun_path[0] == '@')
		sa.sun_path[0] = 0;	/* abstract namespace */
	len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(addr));
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	rc = (int)sendto(fd, msg, sizeof(msg) - 1, 0, (struct sockaddr *)&sa, len);
	close(fd);
	return rc < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
	int workers = argc > 1 ? atoi(argv[1]) : 1;
	pid_t kids[64];
	int nkids = 0;
	const char *pid = getenv("LISTEN_PID"), *nfds = getenv("LISTEN_FDS");
	const char *gen = getenv("OFFLOADCTL_REUSEPORT_GENERATION");
	char reply[32];
	int n, ep, rlen;
	struct sigaction sa = { .sa_handler = on_term };
	struct epoll_event evs[64];

	if (!pid || atoi(pid) != getpid() || !nfds || (n = atoi(nfds)) < 1) {
		fprintf(stderr, "activated_server: not socket-activated (LISTEN_PID/LISTEN_FDS)\n");
		return 3;
	}
	rlen = snprintf(reply, sizeof(reply), "%s\n", gen ? gen : "0");
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	ep = epoll_create1(EPOLL_CLOEXEC);
	for (int fd = 3; fd < 3 + n; fd++) {
		struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
		epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	}
	if (notify_ready() < 0)
		fprintf(stderr, "activated_server: could not send READY=1\n");
	for (int w = 1; w < workers && nkids < 64; w++) {
		pid_t kid = fork();

		if (kid == 0) {
			nkids = 0;
			break;
		}
		if (kid > 0)
			kids[nkids++] = kid;
	}
	while (!stop) {
		int got = epoll_wait(ep, evs, 64, 100);

		for (int i = 0; i < got && !stop; i++) {
			for (;;) {
				int c = accept4(evs[i].data.fd, NULL, NULL, SOCK_CLOEXEC);

				if (c < 0)
					break;	/* EAGAIN (listeners are non-blocking) or a vanished peer */
				if (write(c, reply, rlen) < 0) {
					/* the client gave up: nothing to answer */
				}
				close(c);
			}
		}
	}
	for (int fd = 3; fd < 3 + n; fd++)
		close(fd);	/* without accepting: the queue migrates */
	for (int k = 0; k < nkids; k++)
		kill(kids[k], SIGTERM);
	for (int k = 0; k < nkids; k++)
		waitpid(kids[k], NULL, 0);
	return 0;
}
