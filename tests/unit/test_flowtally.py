"""core/flowtally.py: counting from samples is counting the whole dump."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from controlplane.core.flowpath import (
    IPS_HW_OFFLOAD,
    IPS_OFFLOAD,
    CtTuple,
    Family,
    Flow,
    Route,
    Topology,
    flow_egress_addresses,
)
from controlplane.core.flowselect import select_flows
from controlplane.core.flowtally import FlowTally

HOSTS = [f"10.0.0.{i}" for i in range(1, 6)]

flows_st = st.lists(
    st.builds(
        lambda src, dst, sport, bits: Flow(
            CtTuple(Family.IPV4, 6, src, dst, sport, 80),
            CtTuple(Family.IPV4, 6, dst, src, 80, sport),
            status=bits,
        ),
        st.sampled_from(HOSTS),
        st.sampled_from(HOSTS),
        st.integers(1024, 1030),
        st.sampled_from([0, IPS_OFFLOAD, IPS_OFFLOAD | IPS_HW_OFFLOAD]),
    ),
    max_size=40,
)


@given(flows_st, st.sets(st.sampled_from(HOSTS)))
def test_weights_of_selected_samples_count_the_whole_dump(
    flows: list[Flow], local: set[str]
) -> None:
    tally = FlowTally()
    for f in flows:
        tally.add(f)
    assert tally.total == len(flows)
    assert tally.addresses() == {a for f in flows for a in flow_egress_addresses(f)}
    routes = {a: Route(oif=1, local=a in local) for a in HOSTS}
    topo = Topology(routes=routes)
    forwarded = [f for f, _ in select_flows(flows, topo, None)]
    sampled = [f for f, _ in select_flows(tally.samples(), topo, None)]
    assert tally.weight(sampled) == len(forwarded)
    assert tally.weight(f for f in sampled if f.offloaded) == sum(f.offloaded for f in forwarded)
    assert tally.weight(f for f in tally.samples() if f.status & IPS_HW_OFFLOAD) == sum(
        1 for f in flows if f.status & IPS_HW_OFFLOAD
    )
    assert len(tally.samples()) <= len(flows)
