// SPDX-License-Identifier: GPL-2.0
/*
 * Listener selection and migration for one SO_REUSEPORT group.
 *
 * Loaded by controlplane/kernel/bpf_loader.py through bcc as
 * BPF_PROG_TYPE_SK_REUSEPORT with expected attach type
 * BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, so the kernel calls it both for new
 * connections (migrating_sk == NULL) and for every queued child or request
 * of a listener that closes (migrating_sk != NULL).
 *
 * The control plane owns the policy: it writes, into `policy`, the sockarray
 * slots of the newest active generation (the "target"). This program only
 * reads that table, so a decision costs a few map lookups and the Python side
 * decides everything that is not per-packet.
 *
 * Build-time macros (set by the loader):
 *   SOCKS_FD   fd of the BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, created from Python
 *              because bcc 0.26 cannot declare that map type in C.
 *   MAX_SLOTS  capacity of the group (sockarray entries).
 *
 * Keep the struct layouts in sync with controlplane/reuseport.py.
 */
#include <uapi/linux/bpf.h>

#ifndef SOCKS_FD
#error "SOCKS_FD must be defined by the loader"
#endif
#ifndef MAX_SLOTS
#error "MAX_SLOTS must be defined by the loader"
#endif

/* Slots tried per decision. The verifier walks every iteration, so bound it
 * well below its limits; more consecutive dead or foreign slots than this
 * means the target is effectively gone anyway.
 */
#if MAX_SLOTS < 256
#define MAX_TRIES MAX_SLOTS
#else
#define MAX_TRIES 256
#endif

/* Policy flags (struct target_table.flags). */
#define POLICY_DROP_WHEN_NO_TARGET 1

/* Counter indexes, in the order controlplane/reuseport.py reads them. */
enum {
	CNT_SELECTED = 0,	/* new connection steered to the target */
	CNT_MIGRATED_ESTABLISHED,	/* accept-queue child moved */
	CNT_MIGRATED_REQUEST,	/* half-open request (or TFO SYN_RECV) moved */
	CNT_DROPPED,		/* migration refused on purpose (SK_DROP) */
	CNT_FALLBACK,		/* no target listener: left to the kernel */
	CNT_MAX,
};

/* The listeners a decision may pick from; double-buffered (see `ctl`). */
struct target_table {
	u32 generation;		/* 0: no active generation */
	u32 count;		/* valid entries in slots[] */
	u32 flags;
	u32 reserved;
	u32 slots[MAX_SLOTS];
};

/* ctl[0].live selects policy[0] or policy[1]: the control plane fills the
 * idle entry, then flips `live`, so a reader never sees a half-written table.
 */
struct ctl_state {
	u32 live;
	u32 flags;
};

/* slot -> generation (0 = free). Bookkeeping for the control plane only. */
BPF_ARRAY(slot_gen, u32, MAX_SLOTS);
/* generation -> state bits (1 = active). Control plane only. */
BPF_HASH(gen_state, u32, u32, 1024);
BPF_ARRAY(policy, struct target_table, 2);
BPF_ARRAY(ctl, struct ctl_state, 1);
BPF_ARRAY(counters, u64, CNT_MAX);

static __always_inline void count(u32 idx)
{
	u64 *val = counters.lookup(&idx);

	if (val)
		__sync_fetch_and_add(val, 1);
}

int select_or_migrate(struct sk_reuseport_md *md)
{
	struct bpf_sock *msk = md->migrating_sk;
	struct target_table *table;
	struct ctl_state *state;
	u32 zero = 0, live, n, i, idx, slot;
	u32 outcome = CNT_SELECTED;
	u32 start = md->hash;

	/* The verifier insists on the NULL check before any field access. */
	if (msk) {
		u32 st = msk->state;

		outcome = (st == BPF_TCP_NEW_SYN_RECV || st == BPF_TCP_SYN_RECV) ?
				  CNT_MIGRATED_REQUEST :
				  CNT_MIGRATED_ESTABLISHED;
	}

	state = ctl.lookup(&zero);
	if (!state)
		goto no_target;
	live = state->live & 1;
	table = policy.lookup(&live);
	if (!table)
		goto no_target;
	n = table->count;
	if (n > MAX_SLOTS)
		n = MAX_SLOTS;

	/* Start at the flow hash to spread connections, then walk on: a slot
	 * whose listener has closed (the kernel empties it) or that belongs to
	 * another reuseport group of the same name (other address family) makes
	 * the helper fail, and the next one is tried.
	 */
#pragma clang loop unroll(disable)
	for (i = 0; i < MAX_TRIES; i++) {
		/* Opaque to clang: otherwise it folds the two bounds into one
		 * count-down the verifier cannot prove finite.
		 */
		asm volatile("" : "+r"(n));
		if (i >= n)
			break;
		idx = (start + i) % n;
		if (idx >= MAX_SLOTS)
			break;
		slot = table->slots[idx];
		if (bpf_sk_select_reuseport(md, (void *)bpf_pseudo_fd(1, SOCKS_FD), &slot, 0) == 0) {
			count(outcome);
			return SK_PASS;
		}
	}

	if (msk && (table->flags & POLICY_DROP_WHEN_NO_TARGET)) {
		count(CNT_DROPPED);
		return SK_DROP;
	}
no_target:
	/* SK_PASS without a selection: the kernel picks by hash among the
	 * group's remaining listeners, as it would without this program.
	 */
	count(CNT_FALLBACK);
	return SK_PASS;
}
