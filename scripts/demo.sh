#!/usr/bin/env bash
# `make demo`: the whole story on a fresh machine, in under 5 minutes.
#   1-2  strict config parsing; what this host's kernel can do (no flowtables: hence the VM)
#   3    one VM boot (Debian 6.1 under QEMU/TCG), one driver process inside it
#        (vm-tests/demo_agent.py): seed topology, `offloadctl agent` with the example
#        router config, offloaded flows, a bridge port joining, a host moving ports
#   4    host: hot restarts under load with the agent's reuseport group, and gunicorn (from PyPI,
#        unchanged) restarted by `offloadctl reuseport exec` (vm-tests/demo_reuseport.py)
#   5    one summary table; exit 1 if a claim did not hold (CI runs this after `make test`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
OC=".venv/bin/offloadctl"
OUT=$PWD/build/demo
START=$(date +%s%N)
elapsed() { echo $(( ($(date +%s%N) - START) / 100000000 )) | sed 's/.$/.&/;s/^\./0./'; }
step() { printf '\n==== [%6ss] %s\n' "$(elapsed)" "$*"; }
rm -rf "$OUT"
mkdir -p "$OUT"
rc=0

step "1. a config is parsed strictly: every problem with its field path and line, nothing applied"
cat > "$OUT/bad.yaml" <<'YAML'
version: 1
flowtables:
  - name: ft
    devices: [wan0, a-name-far-too-long]
    priority: 5000
vlans:
  - {name: lan0.5000, parent: lan0, id: 5000}
YAML
$OC validate "$OUT/bad.yaml" || echo "(exit $?)"
$OC validate examples/configs/router.yaml

step "2. what this host's kernel can do (flowtables and VLANs are proven in the VM)"
$OC probe || true

step "3. VM: boot, seed topology, offloadctl agent, offload, port join, host move"
$PY vm-tests/run --results "$OUT/vm" --timeout 240 -- \
    "$PY" vm-tests/demo_agent.py --out "$OUT/vm/agent.json" || rc=$?

step "4. host: hot restarts under load, zero failed connections (the agent owns the group; then gunicorn, unchanged, restarted by offloadctl reuseport exec)"
$PY vm-tests/demo_reuseport.py --out "$OUT/reuseport.json" || rc=$?

step "5. summary"
$PY vm-tests/demo_summary.py --agent "$OUT/vm/agent.json" --reuseport "$OUT/reuseport.json" \
    --vm-timing "$OUT/vm/vm-timing.json" --seconds "$(elapsed)" || rc=$?
step "done (exit $rc)"
exit "$rc"
