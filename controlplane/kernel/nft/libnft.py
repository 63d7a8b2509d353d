"""libnftables adapter: one call = one kernel transaction.

Transport: nft's text grammar rendered from the typed model
(:meth:`nft.Transaction.to_text`), the one form that expresses everything we
need (flowtable flags and device removal included) and the faster parser
(docs/nft-behaviour.md, "Transport": ~1,000 rules, text 33 ms vs JSON 63 ms of
CPU, measured by bench/bench_apply.py). Every command here is
built from the object model, whose names passed the config's parsers: no flag,
config or kernel string is pasted into a command.

libnftables 1.0.x does not make its batches conditional on the ruleset
generation (its batch-begin message carries no NFNL_BATCH_GENID), so the
compare-and-swap against concurrent writers is done inside our transaction
(see ``core/plan.py``: the serial swap).
"""

from __future__ import annotations

import errno as errno_mod
import re
from dataclasses import dataclass
from typing import Any

from controlplane.core import nft
from controlplane.core.plan import Observed, parse_listing
from controlplane.errors import EnvironmentProblem, KernelError
from controlplane.kernel.netns import entered

try:  # Debian's python3-nftables, made importable by `make setup`
    import nftables as _libnft
except ImportError:  # pragma: no cover - exercised on machines without it
    _libnft = None

__all__ = ["PROBE_TABLE", "Nft"]

PROBE_TABLE = "offloadctl_probe"

_ERRNO_WORDS = {
    "No such file or directory": errno_mod.ENOENT,
    "File exists": errno_mod.EEXIST,
    "Device or resource busy": errno_mod.EBUSY,
    "Operation not permitted": errno_mod.EPERM,
    "Operation not supported": errno_mod.EOPNOTSUPP,
    "Invalid argument": errno_mod.EINVAL,
    "Numerical result out of range": errno_mod.ERANGE,
    "File too large": errno_mod.EFBIG,
}


def _errno_of(message: str) -> int | None:
    for words, code in _ERRNO_WORDS.items():
        if words in message:
            return code
    return None


def _clean(message: str) -> str:
    """libnftables errors repeat the offending command with carets; keep the words."""
    lines = [ln for ln in message.splitlines() if ln.strip() and not re.fullmatch(r"[\s^~]+", ln)]
    errors = [ln.split("Error: ", 1)[1] for ln in lines if "Error: " in ln]
    return "; ".join(dict.fromkeys(errors)) or " ".join(lines)


@dataclass
class Nft:
    """A libnftables context bound to one network namespace (implements NftPort)."""

    netns: str | None = None

    def __post_init__(self) -> None:
        if _libnft is None:
            raise EnvironmentProblem(
                "the nftables Python bindings are missing (Debian package python3-nftables);"
                " run 'make setup'"
            )
        with entered(self.netns):
            # libnftables binds to the namespace current at creation time.
            self._ctx: Any = _libnft.Nftables()
        self._ctx.set_json_output(False)

    def _list(self, ref: nft.TableRef, *, for_people: bool) -> str | None:
        # Handles (deletes go by handle), stateless (counter values would make
        # every listing differ), numeric priorities (compare as ints).
        self._ctx.set_handle_output(not for_people)
        self._ctx.set_stateless_output(not for_people)
        self._ctx.set_numeric_prio_output(not for_people)
        command = f"list table {ref.spec}"  # ref's names passed the config's parser
        rc, out, err = self._ctx.cmd(command)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise KernelError(command, _clean(err), _errno_of(err))
        return str(out)

    # -- NftPort ---------------------------------------------------------------

    def list_table(self, ref: nft.TableRef) -> Observed | None:
        text = self._list(ref, for_people=False)
        return None if text is None else parse_listing(text)

    def show(self, ref: nft.TableRef) -> str | None:
        return self._list(ref, for_people=True)

    def run(self, txn: nft.Transaction, check: bool = False) -> None:
        """Submit ``txn`` as one batch; with ``check`` the kernel validates it and
        nothing is committed. Raises KernelError with libnftables' words."""
        payload = txn.to_text()
        self._ctx.set_dry_run(check)
        try:
            rc, _out, err = self._ctx.cmd(payload)
        finally:
            self._ctx.set_dry_run(False)
        if rc != 0:
            raise KernelError(
                "nft transaction" + (" (check)" if check else ""),
                _clean(str(err)),
                _errno_of(str(err)),
                payload,
            )

    def flowtables_supported(self) -> tuple[bool, str]:
        """Ask the kernel to *check* (not commit) a throwaway table with a flowtable."""
        ref = nft.TableRef("inet", PROBE_TABLE)
        probe = nft.Flowtable("ft", 0, ("lo",))
        txn = nft.Transaction(ref, (nft.CreateTable(), nft.AddFlowtable(probe)))
        try:
            self.run(txn, check=True)
        except KernelError as exc:
            if exc.errno == errno_mod.ENOENT:
                return False, (
                    "kernel refused 'add flowtable' with ENOENT: no NF_FLOW_TABLE"
                    " (nf_flow_table_inet)"
                )
            return False, f"kernel refused a test flowtable: {exc}"
        return True, "kernel accepted a test flowtable (checked, not committed)"
