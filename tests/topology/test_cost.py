"""The cost model on cases small enough to compute by hand (derivations in the comments)."""

import pytest
import torch

from specs.degrees import ParallelDims
from topology.cost import (
    FlowResult,
    StageDoesNotFit,
    StageShape,
    check_fits,
    dp_flows,
    evaluate_flows,
    memory_per_gpu,
    predict_stage,
    ring_flows,
)
from topology.graph import Router, build_graph
from topology.presets import build_l40s_server
from topology.profile import L40S


@pytest.fixture(scope="module")
def router():
    spec = build_l40s_server()
    return Router(spec, build_graph(spec))


def test_one_flow_gets_the_slowest_link(router):
    # gpu3 -> gpu4 crosses gpu3-sw1 (25.2), sw1-cpu0 (25.2), cpu0-cpu1 (16), cpu1-sw2, sw2-gpu4:
    # alone it gets 16 GB/s; latency 1 + 1 + 2 + 1 + 1 = 6 us; 1e8 bytes / 16e9 = 6.25 ms.
    res = evaluate_flows(router, [("node-000/gpu3", "node-000/gpu4")], 1e8)
    assert res.bottleneck == ("node-000/cpu0", "node-000/cpu1")
    assert res.bandwidth_gb_s == pytest.approx(16.0)
    assert res.seconds == pytest.approx(6e-6 + 1e8 / 16e9)


def test_flows_sharing_a_link_split_it(router):
    # gpu3 -> gpu4 and gpu2 -> gpu5 both cross cpu0 -> cpu1 (16 GB/s): 8 GB/s each; they also
    # share sw1 -> cpu0 (25.2 / 2 = 12.6), which is not the minimum. 1e8 / 8e9 = 12.5 ms.
    flows = [("node-000/gpu3", "node-000/gpu4"), ("node-000/gpu2", "node-000/gpu5")]
    res = evaluate_flows(router, flows, 1e8)
    assert res.loads[("node-000/cpu0", "node-000/cpu1")] == 2
    assert res.loads[("node-000/sw1", "node-000/cpu0")] == 2
    assert res.bandwidth_gb_s == pytest.approx(8.0)
    assert res.hop_seconds == pytest.approx([6e-6 + 1e8 / 8e9] * 2)


def test_opposite_directions_do_not_contend(router):
    # Links are full duplex: gpu3 -> gpu4 and gpu4 -> gpu3 each get the full 16 GB/s.
    flows = [("node-000/gpu3", "node-000/gpu4"), ("node-000/gpu4", "node-000/gpu3")]
    assert evaluate_flows(router, flows, 1e8).bandwidth_gb_s == pytest.approx(16.0)


def test_ring_and_dp_flows():
    rings = [["a", "b", "c"], ["d", "e", "f"]]
    assert ring_flows(rings)[:3] == [("a", "b"), ("b", "c"), ("c", "a")]
    # data-parallel groups: same ring rank across rings; two members -> both directions
    assert dp_flows(rings)[:2] == [("a", "d"), ("d", "a")]
    assert ring_flows([["x"]]) == [] and dp_flows([["a", "b"]]) == []


PROFILE = L40S.model_copy(update={"peak_bf16_flops": 100e12, "mfu_dense": 0.5,
                                  "mfu_attention": 0.5, "attention_bwd_over_fwd": 2.5})
SHAPE = StageShape(seq_len=8192, ring=2, dp=1, batch_size=1, grad_accum=1, steps=60, layers=2,
                   hidden=1024, intermediate=4096, heads=8, kv_heads=2, head_dim=128,
                   vocab=32000, params=1_000_000_000, elem_bytes=2)
ONE_GB_S = FlowResult(seconds=0.0, latency_s=0.0, bandwidth_gb_s=1.0, bottleneck=("a", "b"),
                      loads={}, hop_seconds=[])
NO_FLOWS = FlowResult(0.0, 0.0, float("inf"), None, {}, [])


def test_step_time_by_hand():
    cost = predict_stage(SHAPE, ONE_GB_S, NO_FLOWS, PROFILE)
    rate = 100e12 * 0.5
    n = 8192 // 2  # local tokens
    # dense: (6N + 2N') n FLOPs (fwd+bwd 6N, recompute 2N' of the layers: N less the root's
    # 2 x 32000 x 1024 + 1024 embedding, lm_head and norm) = 0.6447 s
    dense = (6 * 1e9 + 2 * (1e9 - (2 * 32000 * 1024 + 1024))) * n / rate
    assert dense == pytest.approx(0.644622)
    # one block: causal forward 2 S^2 (heads x head_dim) / R per GPU per layer, / R per step
    block = 2 * 8192**2 * (8 * 128) / 2 / 2 / rate  # = 6.872e-4 s
    # K/V block: 2 (K, V) x 4096 tokens x 2 heads x 128 x 2 bytes = 4,194,304 bytes; at 1 GB/s
    kv_t = 4_194_304 / 1e9  # = 4.19 ms > block: the transfer is exposed
    # per layer: forward and recompute expose (R-1)(t - c) each, backward (R-1)(2t - 2.5c)
    exposed = 2 * ((kv_t - block) + (kv_t - block) + (2 * kv_t - 2.5 * block))
    attention = 2 * 2 * (1 + 1 + 2.5) * block  # layers x R blocks x phases
    # weight sharding: hops of the forward's all-gathers of N/R bf16 weights (1e9 bytes),
    # the backward's of the layers' (the root stays gathered: 1e9 - root bytes) and a
    # reduce-scatter of N/R fp32 gradients (2e9 bytes) at 1 GB/s, of which the dense compute
    # hides (the GPU overlaps: comm_overlap 1)
    root = 2 * 32000 * 1024 + 1024
    shard = (1e9 + (1e9 - root) + 2e9) / 1e9 - dense
    # the optimizer reads and writes 36 bytes per parameter of the N/R shard at 864 GB/s
    optimizer = 36 * 1e9 / 2 / 864e9
    assert cost.parts["dense compute"] == pytest.approx(dense)
    assert cost.parts["attention compute"] == pytest.approx(attention)
    assert cost.parts["exposed ring K/V"] == pytest.approx(exposed)
    assert cost.parts["exposed weight sharding"] == pytest.approx(shard)
    assert cost.parts["data-parallel sync"] == 0.0
    assert cost.parts["optimizer"] == pytest.approx(optimizer)
    assert cost.parts["loss all-reduce"] == 0.0  # a link without latency
    assert cost.step_seconds == pytest.approx(dense + attention + exposed + shard + optimizer)
    assert cost.tokens_per_second == pytest.approx(8192 / cost.step_seconds)
    assert cost.wall_minutes == pytest.approx(60 * cost.step_seconds / 60)
    # headroom: block / hop in the worst phase; forward c / t beats backward 2.5c / 2t
    assert cost.ring_headroom == pytest.approx(block / kv_t)


def test_a_calibrated_profile_prices_what_it_measured():
    """Measured collectives price the sharding, measured overlap decides what hides, measured
    optimizer rate and layer overhead add their parts; rates measured by size interpolate."""
    calibrated = PROFILE.model_copy(update={
        "comm_overlap": 0.0, "collective_gb_s": {"all_gather/2": 0.5, "reduce_scatter/2": 0.25},
        "optimizer_params_per_s": 1e9, "layer_overhead_s_at": {4096: 0.01, 16384: 0.04},
        "root_overhead_s_at": {4096: 0.003}})
    cost = predict_stage(SHAPE, ONE_GB_S, NO_FLOWS, calibrated)
    root = 2 * 32000 * 1024 + 1024
    gathered, reduced = 2 * (2e9 - root) / 2, 4 * 1e9 / 2  # per rank, over the ring of 2
    # nothing hides (overlap 0) and the link has no latency: the collectives' whole volume
    assert cost.parts["exposed weight sharding"] == pytest.approx(
        gathered / 0.5e9 + reduced / 0.25e9)
    kv_t = 4_194_304 / 1e9  # every hop exposed whole: 2 layers x (t + t + 2t)
    assert cost.parts["exposed ring K/V"] == pytest.approx(2 * 4 * kv_t)
    assert cost.parts["optimizer"] == pytest.approx(0.5e9 / 1e9)
    # two layers' and the root's, at 4,096 tokens per micro-step
    assert cost.parts["framework overhead (calibrated)"] == pytest.approx(2 * 0.01 + 0.003)
    # between two measured sizes: linear in log(tokens); outside: the nearest
    assert calibrated.layer_overhead(8192) == pytest.approx(0.025)
    assert calibrated.layer_overhead(1024) == 0.01 and calibrated.layer_overhead(1e6) == 0.04
    assert PROFILE.layer_overhead(4096) == 0.0 and PROFILE.dense_rate(10) == 100e12 * 0.5


def test_fast_links_hide_the_ring_and_dp_sync_adds():
    fast = FlowResult(0.0, 0.0, 1e6, ("a", "b"), {}, [])
    shape = StageShape(**{**SHAPE.__dict__, "dp": 4, "batch_size": 4})
    cost = predict_stage(shape, fast, ONE_GB_S, PROFILE)
    assert cost.parts["exposed ring K/V"] == 0.0
    # all-reduce of the fp32 gradient shard, 4N/R = 2e9 bytes, over 4 rings: 2 (D-1) = 6 hops
    # of 2e9 / 4 bytes at 1 GB/s = 3 s, once per optimizer step
    assert cost.parts["data-parallel sync"] == pytest.approx(6 * 0.5)


def test_the_bytes_priced_are_the_dtypes_that_travel():
    """dK/dV travel in fp32 from rings of 3 on (ring.accumulator_dtype) and in the compute dtype
    on a ring of 2; gradients reduce in fp32 under mixed precision, in the weights' dtype
    without it."""
    from ray_jobs.ring_attention.ring import accumulator_dtype

    for ring in (2, 3, 4):
        shape = StageShape(**{**SHAPE.__dict__, "ring": ring, "seq_len": 8 * 4 * 3 * 1024})
        travelling = accumulator_dtype(ring, torch.bfloat16).itemsize
        assert shape.kv_grad_bytes == shape.kv_block_bytes / 2 * travelling
    assert SHAPE.grad_reduce_bytes == 4  # bf16 layers over fp32 weights
    assert StageShape(**{**SHAPE.__dict__, "state_bytes": 2}).grad_reduce_bytes == 2
    assert StageShape(**{**SHAPE.__dict__, "elem_bytes": 4}).grad_reduce_bytes == 4
    # the backward phase passes K, V and the fp32 dK, dV: 3x the forward's bytes at ring 4
    slow = StageShape(**{**SHAPE.__dict__, "ring": 4})
    cost = predict_stage(slow, ONE_GB_S, NO_FLOWS, PROFILE)
    rate = 100e12 * 0.5
    block = 2 * 8192**2 * (8 * 128) / 4 / 4 / rate
    kv_t = slow.kv_block_bytes / 1e9
    exposed = 2 * 3 * ((kv_t - block) * 2 + (3 * kv_t - 2.5 * block))
    assert cost.parts["exposed ring K/V"] == pytest.approx(exposed)


def test_memory_parts_by_hand():
    """fp32 state, bf16 compute, n = 4096 tokens per GPU, a 1,024-token loss chunk."""
    mem = memory_per_gpu(SHAPE, PROFILE)
    n, root = 4096, 2 * 32000 * 1024 + 1024
    layer = (1e9 - root) / 2
    assert mem["weights (sharded)"] == mem["gradients (sharded)"] == 1e9 * 4 / 2
    assert mem["AdamW state (sharded)"] == 2 * 1e9 * 4 / 2
    assert mem["embedding + lm_head (gathered)"] == root * 2
    assert mem["activations held"] == (2 + 4) * n * 1024 * 2  # (layers + 4) x n x hidden x 2 B
    # the layer phase outweighs the loss chunk (1024 x 32000 x 14 B + one gathered layer)
    assert mem["decoder layer (gathered, and the next)"] == 2 * layer * 2
    assert mem["decoder layer gradients (unsharded, reduced in fp32)"] == layer * 4
    assert mem["lm_head gradient (unsharded until the root's reduce)"] == 32000 * 1024 * 2
    per_token = (10 * 1024 + 3 * 256 + 4 * 4096) * 2 + (1024 + 2 * 256) * 4 + 8 * 4
    assert mem["layer recomputed and backpropagated"] == n * per_token
    assert mem["ring buffers"] == 4 * 4_194_304
    assert "loss chunk (logits)" not in mem
    small = memory_per_gpu(StageShape(**{**SHAPE.__dict__, "params": 100_000_000}), PROFILE)
    assert small["loss chunk (logits)"] == 1024 * 32000 * (2 + 4 + 8)


def test_memory_of_each_checkpointing_policy_by_hand():
    """SHAPE (2 layers, n = 4096) under `attention` and `none`, against `full`."""
    deep = StageShape(**{**SHAPE.__dict__, "layers": 6, "params": 1.2e9})
    full = memory_per_gpu(deep, PROFILE)
    kept = memory_per_gpu(StageShape(**{**deep.__dict__, "checkpointing": "attention"}),
                          PROFILE)
    n, out_and_lse = 4096, 8 * 128 * 2 + 8 * 4  # bf16 output, fp32 log-sum-exp, 8 heads
    # the layer phase's peak: the second layer backpropagated, 6 - 2 layers' outputs more
    assert kept["ring attention outputs kept"] == 4 * n * out_and_lse
    assert sum(kept.values()) - sum(full.values()) == 4 * n * out_and_lse
    held = memory_per_gpu(StageShape(**{**deep.__dict__, "checkpointing": "none"}), PROFILE)
    per_token = (10 * 1024 + 3 * 256 + 4 * 4096) * 2 + (1024 + 2 * 256) * 4 + 8 * 4
    assert held["activations held"] == 6 * n * per_token  # every layer's, none recomputed
    assert held["layer recomputed and backpropagated"] == 0
    assert "ring attention outputs kept" not in full and "ring attention outputs kept" not in held


def test_stage_that_does_not_fit_names_stage_and_fix(llama8b_run):
    stage = llama8b_run.stages[0]  # 65,536 tokens on Llama-3 8B
    with pytest.raises(StageDoesNotFit, match=r"stage '65k' needs 49\.\d GB per GPU with "
                       r"ring_degree 4 .* above the 48 GB of a NVIDIA L40S; raise ring_degree "
                       r"to 8 or more"):
        check_fits("65k", StageShape.of(llama8b_run, stage, ParallelDims(ring=4)), L40S)
    assert check_fits("65k", StageShape.of(llama8b_run, stage, ParallelDims(ring=8)),
                      L40S) < 48e9


def test_ulysses_shapes_and_all_to_all_by_hand():
    """Ulysses 2 x ring 2: 2048 tokens per GPU, K/V blocks of a ring position's 4096 tokens for
    one of the two K/V heads, and an all-to-all that sends each peer half of the local q, k, v
    and output; half the bandwidth doubles the all-to-all's time."""
    u2 = StageShape(**{**SHAPE.__dict__, "ring": 2, "ulysses": 2})
    assert u2.local_tokens == 8192 // 4
    assert u2.kv_block_bytes == 2 * 4096 * 1 * 128 * 2
    assert u2.all_to_all_bytes == 2048 * (2 * 8 + 2 * 2) * 128 * 2 / 2
    wide = StageShape(**{**SHAPE.__dict__, "ring": 1, "ulysses": 4, "kv_heads": 2})
    assert wide.ring_kv_heads == 1.0  # 2 K/V heads over 4 GPUs: each replicated twice
    fast = FlowResult(0.0, 0.0, 2.0, ("a", "b"), {}, [])
    half = FlowResult(0.0, 0.0, 1.0, ("a", "b"), {}, [])
    a2a = [predict_stage(u2, ONE_GB_S, NO_FLOWS, PROFILE, f).parts["Ulysses all-to-all"]
           for f in (fast, half)]
    assert a2a[0] == pytest.approx(3 * 2 * u2.all_to_all_bytes / 2e9)  # 3 phases, 2 layers
    assert a2a[1] == pytest.approx(2 * a2a[0])


def test_a_micro_batch_of_sequences_pays_each_hop_latency_once():
    """The trainer feeds a ring B = batch_size / dp sequences in one micro-step: compute and
    bytes scale with B, but every K/V hop and every weight all-gather happens once for the
    micro-batch (the `calibrate` check on the tiny run found the per-sequence model 2.7x slow
    on its 16-sequence stage, where hop latency dominates)."""
    slow_hops = FlowResult(1e-3, 1e-3, 1e3, ("a", "b"), {}, [])  # 1 ms latency, 1 TB/s
    one = predict_stage(SHAPE, slow_hops, NO_FLOWS, PROFILE)
    four = predict_stage(StageShape(**{**SHAPE.__dict__, "batch_size": 4}), slow_hops, NO_FLOWS,
                         PROFILE)
    for part in ("dense compute", "attention compute"):
        assert four.parts[part] == pytest.approx(4 * one.parts[part])
    # latency-bound: 4 sequences expose less than 4x one sequence's hops (the blocks grow, the
    # latencies do not), and the sharding collectives are not paid per sequence
    assert four.parts["exposed ring K/V"] < 4 * one.parts["exposed ring K/V"]
    assert four.parts["exposed weight sharding"] <= one.parts["exposed weight sharding"]
    assert four.tokens_per_second > one.tokens_per_second
