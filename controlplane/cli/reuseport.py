"""``offloadctl reuseport``: load, inspect and steer listener-migration groups.

Every command names a group with ``--name`` and, optionally, the network
namespace it belongs to (``--netns``; default: the current one, "host" when
it has no 'ip netns' name). Errors print one line on stderr and exit with the
error class's code; there is never a traceback.
"""

from __future__ import annotations

import os

import typer

from controlplane.cli import exec_cmd
from controlplane.cli.errors import handles_errors
from controlplane.cli.fastparse import typer_command, typer_param
from controlplane.core.numbers import ascii_decimal
from controlplane.errors import ConfigError, ConfigIssue
from controlplane.kernel.bpf import loader as bpf_loader
from controlplane.reuseport import COUNTER_NAMES, GroupStatus, ReuseportGroup

__all__ = ["app"]

app = typer.Typer(
    help="Zero-reset restarts behind SO_REUSEPORT (BPF SELECT_OR_MIGRATE).",
    no_args_is_help=True,
)

GenerationOpt = typer.Option(
    ..., "--generation", "-g", min=1, max=2**32 - 1, help="generation number (1 and up)"
)


NameOpt = typer_param(exec_cmd.NAME)
NetnsOpt = typer_param(exec_cmd.NETNS)
BpffsOpt = typer_param(exec_cmd.BPFFS)


def _open(name: str, netns: str | None, bpffs: str) -> ReuseportGroup:
    return ReuseportGroup.open(name, netns=netns, bpffs=bpffs)


@app.command()
@handles_errors
def load(
    name: str = NameOpt,
    netns: str | None = NetnsOpt,
    bpffs: str = BpffsOpt,
    max_listeners: int = typer.Option(
        64, min=1, max=bpf_loader.MAX_CAPACITY, help="listener slots of the group's sockarray"
    ),
    drop_when_no_target: bool = typer.Option(
        False,
        "--drop-when-no-target",
        help="reset migrating connections when no active generation has a listener",
    ),
) -> None:
    """Compile the program, create the maps and pin them.

    Mounts a bpffs at --bpffs if none is there and the directory is missing or
    empty; never over a directory with files in it.
    """
    res = bpf_loader.load_group(
        name,
        netns=netns,
        bpffs=bpffs,
        max_listeners=max_listeners,
        drop_when_no_target=drop_when_no_target,
    )
    if res.mounted_bpffs:
        typer.echo(f"mounted bpffs at {bpffs} (unload of its last group unmounts it)")
    _report_stale(res.stale_staging_removed)
    if res.already_loaded:
        typer.echo(f"group {name!r} in {res.netns} already loaded (prog id {res.prog_id})")
        return
    typer.echo(
        f"loaded group {name!r} in {res.netns}: {res.capacity} listener slots,"
        f" prog id {res.prog_id}, pinned at {res.pin_dir}"
        f" (compiled and verified in {res.compile_seconds:.2f} s)"
    )


@app.command()
@handles_errors
def status(
    name: str = NameOpt,
    netns: str | None = NetnsOpt,
    bpffs: str = BpffsOpt,
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Generations, listener slots, the target and the program's counters."""
    _report_stale(tuple(bpf_loader.remove_stale_staging_if_idle(bpffs)))
    with _open(name, netns, bpffs) as group:
        st = group.status()
    typer.echo(st.to_json() if json_out else _render(st))


def _render(st: GroupStatus) -> str:
    registered = sum(len(g.slots) for g in st.generations)
    policy = "reset" if st.drop_when_no_target else "left to the kernel"
    lines = [
        f"group {st.name} ({st.netns}), prog id {st.prog_id}, pins {st.pin_dir}",
        f"listeners: {registered} of {st.capacity} slots;"
        f" target generation: {st.target_generation or 'none'};"
        f" migrations without a target are {policy}",
    ]
    if st.generations:
        lines.append(f"  {'generation':>10}  {'state':<8}  {'listeners':>9}  slots")
        for g in st.generations:
            state = "target" if g.target else ("active" if g.active else "standby")
            slots = ",".join(map(str, g.slots)) or "-"
            lines.append(f"  {g.generation:>10}  {state:<8}  {len(g.slots):>9}  {slots}")
    counts = "  ".join(f"{n} {getattr(st.counters, n)}" for n in COUNTER_NAMES)
    lines.append(f"counters: {counts}")
    return "\n".join(lines)


@app.command()
@handles_errors
def activate(
    name: str = NameOpt,
    generation: int = GenerationOpt,
    netns: str | None = NetnsOpt,
    bpffs: str = BpffsOpt,
) -> None:
    """Mark a generation active; the newest active one receives connections."""
    with _open(name, netns, bpffs) as group:
        group.activate(generation)
        target = group.status().target_generation
    typer.echo(f"generation {generation} active; target generation {target}")


@app.command()
@handles_errors
def retire(
    name: str = NameOpt,
    generation: int = GenerationOpt,
    netns: str | None = NetnsOpt,
    bpffs: str = BpffsOpt,
) -> None:
    """Stop targeting a generation and free its slots (its sockets stay open)."""
    with _open(name, netns, bpffs) as group:
        freed = group.retire(generation)
        target = group.status().target_generation
    typer.echo(
        f"generation {generation} retired ({len(freed)} slots freed);"
        f" target generation {target or 'none'}"
    )


@app.command()
@handles_errors
def unload(
    name: str = NameOpt,
    netns: str | None = NetnsOpt,
    bpffs: str = BpffsOpt,
) -> None:
    """Remove the pins. A live group keeps the program until its listeners close."""
    res = bpf_loader.unload_group(name, netns=netns, bpffs=bpffs)
    note = (
        f"; {res.live_listeners} registered listeners still open keep the program"
        " attached with its last policy"
        if res.live_listeners
        else ""
    )
    _report_stale(res.stale_staging_removed)
    typer.echo(f"unloaded group {name!r} in {res.netns}{note}")
    if res.unmounted_bpffs:
        typer.echo(f"unmounted bpffs at {bpffs} (load had mounted it)")


def _gid(group: str) -> int:
    import grp

    gid = ascii_decimal(group)
    if gid is not None:
        return gid
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError([ConfigIssue("--socket-group", f"no group named {group!r}")]) from None


def _report_stale(paths: tuple[str, ...]) -> None:
    for path in paths:
        typer.echo(f"removed {path}, left by a load that died", err=True)


def listener_error(mine: int, fd: int, pid: int) -> str | None:
    """Why our copy ``mine`` of fd ``fd`` of process ``pid`` cannot be registered,
    naming the fd the user gave (not our copy's number), or None."""
    from controlplane.kernel.bpf.syscall import listener_problem

    problem = listener_problem(mine)
    if problem is None:
        return None
    theirs = f"fd {fd} of pid {pid}"
    ours = f"fd {mine} "
    return (
        theirs + " " + problem[len(ours) :] if problem.startswith(ours) else f"{theirs}: {problem}"
    )


@app.command()
@handles_errors
def adopt(
    name: str = NameOpt,
    generation: int = GenerationOpt,
    pid: int = typer.Option(..., "--pid", min=1, help="process holding the listener"),
    fd: int = typer.Option(..., "--fd", min=0, help="its file descriptor number"),
    netns: str | None = NetnsOpt,
    bpffs: str = BpffsOpt,
) -> None:
    """Register another process's listener, taken with pidfd_getfd(2)."""
    from controlplane.kernel.bpf.fd_handover import take_fd

    with _open(name, netns, bpffs) as group:
        mine = take_fd(pid, fd)
        try:
            problem = listener_error(mine, fd, pid)
            if problem is not None:
                raise ConfigError([ConfigIssue("--fd", problem)])
            slot = group.register(mine, generation)
        finally:
            os.close(mine)
    typer.echo(f"registered fd {fd} of pid {pid} as generation {generation}, slot {slot}")


@app.command()
@handles_errors
def receive(
    name: str = NameOpt,
    socket_path: str = typer.Option(..., "--socket", help="Unix socket to listen on"),
    clients: int = typer.Option(
        0, min=0, help="stop after this many client connections (0: run until killed)"
    ),
    socket_group: str | None = typer.Option(
        None,
        "--socket-group",
        help="let members of this group (name or gid) connect: services not running as root",
        show_default=False,
    ),
    netns: str | None = NetnsOpt,
    bpffs: str = BpffsOpt,
) -> None:
    """Register listeners sent over a Unix socket with SCM_RIGHTS."""
    from controlplane.kernel.bpf.fd_handover import HandoverServer

    gid = None if socket_group is None else _gid(socket_group)
    with (
        _open(name, netns, bpffs) as group,
        HandoverServer(socket_path, group=gid) as server,
    ):
        typer.echo(f"waiting for listeners on {socket_path}")
        served = 0
        while clients == 0 or served < clients:
            for r in server.serve_one(group.register):
                if r.error is None:
                    typer.echo(f"pid {r.pid}: generation {r.generation} -> slot {r.slot}")
                else:
                    typer.echo(f"pid {r.pid}: refused: {r.error}", err=True)
            served += 1


app.command("exec", context_settings={"allow_interspersed_args": False})(
    typer_command(exec_cmd.PARAMS, exec_cmd.HELP, exec_cmd.run)
)
