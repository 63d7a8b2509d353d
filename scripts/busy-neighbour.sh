#!/usr/bin/env bash
# A busy neighbour for the host-netns suite: in a namespace of its own, what a
# loaded CI machine runs beside our tests (issue 19). Every part stops by itself.
#
#   scripts/busy-neighbour.sh [SECONDS]      (default 900; Ctrl-C or SIGTERM ends it early)
#
# In netns $BUSY_NETNS (default busy-<pid>): `offloadctl agent`, `offloadctl watch`,
# an `offloadctl apply` loop alternating two configs on a table of its own, and
# conntrack churn (batches of entries created and deleted through ctnetlink, so
# the agent and the watch get NEW and DESTROY events); plus one CPU hog
# (`python3 -c 'while True: pass'`). The agent and the watch keep conntrack event
# listeners bound the whole time: the kernel counts those machine-wide
# (docs/kernel-facts.md), which is what the netns tests must not depend on.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-900}
NS=${BUSY_NETNS:-busy-$$}
PY=$PWD/.venv/bin/python
CTL=$PWD/.venv/bin/offloadctl
WORK=$(mktemp -d /tmp/busy-neighbour.XXXXXX)
pids=()

say() { printf 'busy-neighbour: %s\n' "$*" >&2; }

cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
  say "stopped"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

[[ -x $CTL ]] || { say "run 'make setup' first"; exit 1; }
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add wan0 type veth peer name wan0p
ip -n "$NS" link set wan0 up
ip -n "$NS" link set wan0p up

nat() { printf 'version: 1\ntable: {family: inet, name: %s}\nnat:\n  masquerade:\n    - {oifname: wan0, saddr: [%s]}\n' "$1" "$2"; }
nat offloadctl 10.0.1.0/24 >"$WORK/agent.yaml"
nat busy_apply 10.0.1.0/24 >"$WORK/apply-a.yaml"
nat busy_apply 10.0.2.0/24 >"$WORK/apply-b.yaml"

# Each part is bounded by `timeout`, so nothing outlives DURATION even if this shell dies.
run() { timeout "$DURATION" "$@" & pids+=($!); }

run "$CTL" agent "$WORK/agent.yaml" --netns "$NS" --socket "$WORK/agent.sock" \
  --state-file "$WORK/state.json" >/dev/null 2>"$WORK/agent.log"
run "$CTL" watch --netns "$NS" --json >/dev/null 2>"$WORK/watch.log"
run bash -c "while :; do
  '$CTL' apply '$WORK/apply-a.yaml' --netns '$NS' >/dev/null 2>&1
  '$CTL' apply '$WORK/apply-b.yaml' --netns '$NS' >/dev/null 2>&1
  sleep 0.2
done"
cat >"$WORK/churn.py" <<'EOF'
import sys, time
from controlplane.core.flowpath import CtTuple, Family, Flow
from controlplane.kernel.ctnetlink.conntrack import ConntrackSocket

def flow(i: int) -> Flow:
    src, dst = f"10.0.1.{1 + i % 250}", "192.0.2.1"
    return Flow(CtTuple(Family.IPV4, 6, src, dst, 10_000 + i, 80),
                CtTuple(Family.IPV4, 6, dst, src, 80, 10_000 + i))

with ConntrackSocket(sys.argv[1]) as ct:
    while True:  # ended by timeout(1)
        ct.create((flow(i), 60) for i in range(500))
        ct.delete([f for f in ct.dump() if f.orig.dport == 80])
        time.sleep(0.05)
EOF
run "$PY" "$WORK/churn.py" "$NS"
run python3 -c 'while True: pass'
say "running in netns $NS for ${DURATION}s (agent, watch, apply loop, conntrack churn, CPU hog)"
rc=0; wait -n -p done "${pids[@]}" || rc=$?
if ((SECONDS < DURATION - 1)); then  # a part died early: the load is not what it says
  say "part $done exited $rc after ${SECONDS}s; logs:"
  tail -n 5 "$WORK"/*.log >&2 || true
  exit 1
fi
