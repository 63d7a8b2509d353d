#!/usr/bin/env bash
# `make demo`: what offloadctl does, end to end, on this machine and in a VM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
OC=".venv/bin/offloadctl"
step() { printf '\n==== %s\n' "$*"; }

step "1. a config is parsed strictly: every problem with its field path and line"
cat > build/demo-bad.yaml <<'YAML'
version: 1
flowtables:
  - name: ft
    devices: [wan0, a-name-far-too-long]
    priority: 5000
vlans:
  - {name: lan0.5000, parent: lan0, id: 5000}
YAML
$OC validate build/demo-bad.yaml || echo "(exit $?)"
$OC validate nft/examples/seed.yaml

step "2. rendering (pure): nft text of the seed topology (br0's ports are resolved at apply)"
$OC render nft/examples/seed.yaml

step "3. what this host's kernel can do"
$OC probe

step "4. the flowtable fast path on Debian's stock kernel (QEMU/TCG)"
$PY vm-tests/run --results build/demo-vm -- "$PY" vm-tests/demo_flowtable.py

step "5. zero-reset service restarts with BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (host netns)"
$PY bench/bench_reuseport.py --restarts 5 --modes program,none
