"""Network tomography on simulated timings: the cost model's predictions, slowed on a link or a
device, with and without noise (topology.tomography)."""

import pytest
from topology_helpers import (
    DOWNLINK,
    NBYTES,
    UPLINK,
    ring_host_by_host,
)
from topology_helpers import simulated_preflight as preflight

from topology import tomography
from topology.cost import ring_flows
from topology.tomography import (
    HopTiming,
    classify,
    explain,
    predict_hops,
    probe_pairs,
    refine,
    route_suspects,
    simulate_round,
    slowed,
)


def test_throttled_uplink_is_named_after_the_probe_round(netns):
    """The issue's case: one ring through 4 hosts x 2 ranks, host1's uplink throttled. Only the
    hop host1/gpu1 -> host2/gpu0 crosses it, and every suspect on that hop that no fast hop
    crosses fits: host1's uplink, host2's downlink (and the two ranks' own links to their
    stacks). The probes tell them apart; refine names the throttled link alone."""
    first, batches, final = preflight(netns, slowed(netns, {UPLINK: 40}))
    assert [(h.src, h.dst) for h in first.slow_hops] == [("host1/gpu1", "host2/gpu0")]
    assert not first.unique and len(first.candidates) >= 2
    assert {frozenset({UPLINK}), frozenset({DOWNLINK})} <= set(first.candidates)
    assert batches and all(batches)
    assert final.unique and final.candidates == (frozenset({UPLINK}),)
    assert final.unexplained == ()
    # the NIC's PCIe side is crossed by every route that crosses its uplink: one suspect
    assert final.aliases[UPLINK] == (("host1/sw0", "host1/nic0"), UPLINK)


def test_each_probe_separates_candidates_and_a_batch_shares_no_link(netns):
    first, batches, _ = preflight(netns, slowed(netns, {UPLINK: 40}))
    suspects = set(first.suspects())
    for batch in batches:
        used: set = set()
        for src, dst in batch:
            route = netns.route(src, dst)
            assert used.isdisjoint(route), f"{src} -> {dst} shares a link in its batch"
            used.update(route)
            crossed = route_suspects(netns, src, dst) & suspects
            outcomes = {bool(c & crossed) for c in first.candidates}
            assert outcomes == {True, False}, f"{src} -> {dst} separates no explanations"


def test_probe_round_on_the_downlink_names_the_downlink(netns):
    _, _, final = preflight(netns, slowed(netns, {DOWNLINK: 25}))
    assert final.candidates == (frozenset({DOWNLINK}),)


def test_unthrottled_fabric_names_nothing(netns):
    first, batches, final = preflight(netns, netns)
    assert first.slow_hops == () and first.candidates == () and not first.found
    assert batches == [] and final is first
    assert first.median_ratio == pytest.approx(1.0)


def test_a_slow_gpu_is_a_device_not_a_link(netns):
    """A rank that slows everything through it: both its hops (in and out) are slow, and only
    the vertex explains both with one suspect."""
    first, _, final = preflight(netns, slowed(netns, {"host2/gpu1": 20}))
    assert {(h.src, h.dst) for h in first.slow_hops} == {("host2/gpu0", "host2/gpu1"),
                                                         ("host2/gpu1", "host3/gpu0")}
    assert first.candidates == (frozenset({"host2/gpu1"}),)
    assert final.candidates == (frozenset({"host2/gpu1"}),)


@pytest.mark.parametrize("seed", range(8))
def test_noise_of_ten_percent_does_not_change_the_answer(netns, seed):
    _, _, final = preflight(netns, slowed(netns, {UPLINK: 15}), noise=0.1, seed=seed)
    assert final.candidates == (frozenset({UPLINK}),)
    _, _, clean = preflight(netns, netns, noise=0.1, seed=seed)
    assert clean.candidates == () and not clean.found


def test_a_fabric_uniformly_off_its_profile_is_a_fabric_finding_not_a_link(netns):
    ring = ring_host_by_host()
    pairs = ring_flows([ring])
    hops = [HopTiming(s, d, NBYTES, p, 3 * p)
            for (s, d), p in zip(pairs, predict_hops(netns, pairs, NBYTES))]
    e = explain(netns, hops)
    assert e.median_ratio == pytest.approx(3.0) and e.fabric_off and e.found
    assert e.slow_hops == () and e.candidates == ()


def test_two_slow_links_need_two_suspects(netns):
    _, _, final = preflight(netns, slowed(netns, {UPLINK: 30, ("leaf0", "host0/nic0"): 30}))
    assert final.unique
    assert final.candidates == (frozenset({UPLINK, ("leaf0", "host0/nic0")}),)


def test_a_slow_hop_whose_every_suspect_carried_a_fast_hop_is_inconsistent(netns):
    """host0/gpu0 -> host1/gpu0 slow, but host0/gpu0 -> host1/gpu1 and host0/gpu1 ->
    host1/gpu0 fast: together they cross every link and vertex of the slow one."""
    pairs = [("host0/gpu0", "host1/gpu0"), ("host0/gpu0", "host1/gpu1"),
             ("host0/gpu1", "host1/gpu0"), ("host2/gpu0", "host3/gpu0")]
    predicted = predict_hops(netns, pairs, NBYTES)
    hops = [HopTiming(s, d, NBYTES, p, p * (10 if k == 0 else 1))
            for k, ((s, d), p) in enumerate(zip(pairs, predicted))]
    e = explain(netns, hops)
    assert e.unexplained == (hops[0],) and e.candidates == ()
    assert e.found


def test_greedy_fallback_says_it_is_not_proven_smallest(netns, monkeypatch):
    monkeypatch.setattr(tomography, "MAX_COMBINATIONS", 1)
    first, _, _ = preflight(netns, slowed(netns, {UPLINK: 40}))
    assert len(first.candidates) == 1 and len(first.candidates[0]) == 1
    assert "greedy explanation" in first.notes[0] and "smaller one may exist" in first.notes[0]


def test_probes_are_judged_against_round_one_median(netns):
    """A probe round of only slow hops has a median of its own that would hide them."""
    first, batches, _ = preflight(netns, slowed(netns, {UPLINK: 40}))
    truth = slowed(netns, {UPLINK: 40})
    uplink_only = [[("host1/gpu0", "host0/gpu0")]]
    probes = simulate_round(netns, truth, uplink_only, NBYTES)
    again = refine(netns, first, probes)
    assert again.slow[-1] and again.median_ratio == first.median_ratio
    assert frozenset({UPLINK}) in again.candidates
    assert frozenset({DOWNLINK}) not in again.candidates  # not hit by the slow probe


@pytest.mark.parametrize("field, value", [("measured_s", 0.0), ("predicted_s", float("nan")),
                                          ("nbytes", -1.0)])
def test_bad_timings_are_refused_naming_the_field(field, value):
    hop = HopTiming("host0/gpu0", "host0/gpu1", NBYTES, 1e-3, 1e-3)
    bad = HopTiming(**{**hop.__dict__, field: value})
    with pytest.raises(ValueError, match=rf"hop host0/gpu0 -> host0/gpu1: {field} is"):
        classify([hop, bad])


def test_bad_factors_and_pairs_are_refused(netns):
    hop = HopTiming("host0/gpu0", "host0/gpu1", NBYTES, 1e-3, 1e-3)
    with pytest.raises(ValueError, match="slow_factor is 1.0; give a finite number > 1"):
        classify([hop], slow_factor=1.0)
    with pytest.raises(ValueError, match="no timed hop"):
        classify([])
    with pytest.raises(ValueError, match="'host9/gpu0' is not a GPU of cluster 'netns-4x2'"):
        predict_hops(netns, [("host0/gpu0", "host9/gpu0")], NBYTES)
    with pytest.raises(ValueError, match="does not send to itself"):
        explain(netns, [HopTiming("host0/gpu0", "host0/gpu0", NBYTES, 1e-3, 1e-3)])
    with pytest.raises(ValueError, match="link host9/nic0->leaf0 is not in the cluster graph"):
        slowed(netns, {("host9/nic0", "leaf0"): 2})
    first, _, _ = preflight(netns, slowed(netns, {UPLINK: 40}))
    with pytest.raises(ValueError, match="gpus: 'host9/gpu0' is not a GPU of cluster"):
        probe_pairs(netns, first, ["host0/gpu0", "host9/gpu0"])
    with pytest.raises(ValueError, match="needs rng"):
        simulate_round(netns, netns, [[("host0/gpu0", "host0/gpu1")]], NBYTES, noise=0.1)


def test_a_fast_hop_limited_elsewhere_does_not_clear_the_slow_link(netns):
    """host1's uplink throttled 4x carries two hops; one of them is limited by host3's slow
    downlink (the profile knows it: a tenth of the bandwidth), so the throttle does not show on
    it. That fast hop must not clear the uplink: the throttle the slow hop implies (4x) is far
    below what it would take to slow the other one (about 10x)."""
    model = slowed(netns, {("leaf0", "host3/nic0"): 10})
    truth = slowed(model, {UPLINK: 4})
    pairs = [("host1/gpu0", "host2/gpu0"), ("host1/gpu1", "host3/gpu0"),
             ("host0/gpu0", "host0/gpu1"), ("host2/gpu1", "host2/gpu0")]
    hops = simulate_round(model, truth, [pairs], NBYTES)
    assert [h.ratio > 2 for h in hops] == [True, False, False, False]
    first = explain(model, hops)
    assert frozenset({UPLINK}) in first.candidates
    final = refine(model, first, simulate_round(model, truth,
                                                probe_pairs(model, first, ring_host_by_host()),
                                                NBYTES))
    assert final.candidates == (frozenset({UPLINK}),)


def test_links_no_gpu_pair_tells_apart_are_one_suspect():
    """Two nodes of one GPU each: every link from node a's GPU to node b's is crossed by the one
    pair a -> b and no other, so they are one suspect (named by a NIC's fabric link), the
    throttled PCIe link among its aliases; a socket with a second, GPU-less PCIe switch is no
    chain the structural rule sees."""
    from specs.cluster import ClusterSpec
    from topology.graph import Router, build_graph

    spec = ClusterSpec.model_validate({
        "name": "pair", "link_types": {"pcie": {"bandwidth_gb_s": 25.0},
                                       "nic": {"bandwidth_gb_s": 20.0}},
        "node_types": {"one": {"socket_link": None, "sockets": [{
            "name": "cpu0", "nics": [{"name": "nic0", "link": "nic"}],
            "switches": [{"name": "sw0", "gpus": [0]}, {"name": "sw1", "gpus": []}]}]}},
        "switches": [{"name": "leaf0", "level": "leaf"}],
        "nodes": [{"name": "a", "node_type": "one", "leaf": "leaf0"},
                  {"name": "b", "node_type": "one", "leaf": "leaf0"}]})
    router = Router(spec, build_graph(spec))
    throttled = ("a/sw0", "a/cpu0")
    truth = slowed(router, {throttled: 20})
    e = explain(router, simulate_round(router, truth, [[("a/gpu0", "b/gpu0"),
                                                        ("b/gpu0", "a/gpu0")]], NBYTES))
    named = ("a/nic0", "leaf0")
    assert e.candidates == (frozenset({named}),)
    assert throttled in e.aliases[named] and ("b/cpu0", "b/sw0") in e.aliases[named]
    assert probe_pairs(router, e, ["a/gpu0", "b/gpu0"]) == []
