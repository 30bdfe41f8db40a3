"""Topology detection and virtual nodes."""
import os

import pytest
from hypothesis import given, strategies as st

from moe_numa.errors import TopologyError
from moe_numa.numa.topology import (Node, Topology, detect, format_cpulist, parse_cpulist,
                                    virtual_topology)


def test_detect_covers_our_cpus():
    t = detect()
    cpus = sorted(c for n in t.nodes for c in n.cpus)
    assert cpus == sorted(os.sched_getaffinity(0))
    for n in t.nodes:
        assert set(n.physical) <= set(n.cpus) and n.cpus[:len(n.physical)] == n.physical


@given(st.lists(st.integers(0, 200), unique=True, min_size=1))
def test_cpulist_round_trip(cpus):
    assert parse_cpulist(format_cpulist(cpus)) == sorted(cpus)


def fake(n_cpus, smt=False):
    phys = tuple(range(n_cpus))
    sib = tuple(range(n_cpus, 2 * n_cpus)) if smt else ()
    return Topology((Node(0, phys + sib, phys, memory_node=0),))


@pytest.mark.parametrize("n_cpus,n_nodes,smt", [(16, 2, False), (16, 4, True), (6, 4, False), (2, 4, False), (2, 1, False)])
def test_virtual_nodes_split_cpus(n_cpus, n_nodes, smt):
    t = virtual_topology(n_nodes, fake(n_cpus, smt))
    assert t.n_nodes == n_nodes
    if n_nodes == 1:
        assert not t.virtual     # one node asked of a one-node machine: the real topology
        return
    phys = [c for n in t.nodes for c in n.physical]
    if n_cpus >= n_nodes:
        assert sorted(phys) == list(range(n_cpus))               # disjoint and complete
        sizes = [len(n.physical) for n in t.nodes]
        assert max(sizes) - min(sizes) <= 1
    else:
        assert set(phys) == set(range(n_cpus)) and any("oversubscribed" in x for x in t.notes)
    assert t.nodes[0].memory_node == 0
    assert all(n.memory_node is None for n in t.nodes[1:])     # no such real node: default policy
    if smt:
        assert all(len(n.cpus) == 2 * len(n.physical) for n in t.nodes)


def test_threads_prefer_physical_cores():
    n = Node(0, (0, 1, 2, 3), (0, 1))
    assert n.threads(2) == [0, 1]
    assert n.threads(2, use_smt=True) == [0, 1]
    assert n.threads(3) == [0, 1, 2]
    assert n.threads() == [0, 1] and n.threads(use_smt=True) == [0, 1, 2, 3]


def test_bad_node_count():
    with pytest.raises(TopologyError, match="at least 1"):
        virtual_topology(0, fake(2))
