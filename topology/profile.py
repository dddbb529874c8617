"""Hardware profile: every constant the cost model uses, named once, with its source."""

from __future__ import annotations

import bisect
import math

from pydantic import BaseModel, ConfigDict, Field

# Bytes AdamW and gradient clipping move per parameter of a shard in one step (fp32 state):
# clipping reads the gradient for its norm and rewrites it scaled; AdamW reads the parameter,
# gradient and two moments and writes the parameter and both moments back.
OPTIMIZER_BYTES_PER_PARAM = 4 * (2 + 4 + 3)

# The most GPUs one server holds (eight or sixteen today): what a topology dump or a node's
# capacity may claim. Beyond it the input is a mistake or an attack, and building its inside
# (per-GPU switches, rings, routes) would take unbounded time.
MAX_GPUS_PER_NODE = 128


class HardwareProfile(BaseModel):
    """Numbers the cost model multiplies by. `assumptions` lists the ones that are not datasheet
    figures: a capacity planner should treat predictions as only as good as those."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="Profile name, e.g. 'l40s'.")
    gpu_model: str = Field(description="GPU the profile describes.")
    peak_bf16_flops: float = Field(gt=0, description="Dense BF16 tensor FLOP/s per GPU.")
    hbm_bytes: float = Field(gt=0, description="GPU memory in bytes.")
    hbm_bandwidth_gb_s: float = Field(gt=0, description="GPU memory bandwidth, GB/s.")
    mfu_dense: float = Field(gt=0, le=1, description="Achieved fraction of peak on the dense "
                             "(matmul) part of a transformer layer.")
    mfu_attention: float = Field(gt=0, le=1, description="Achieved fraction of peak of the "
                                 "flash-attention block kernel.")
    memory_reserve_bytes: float = Field(ge=0, description="Memory kept free per GPU: CUDA "
                                        "context, NCCL buffers, allocator fragmentation.")
    pcie_gen4_x16_gb_s: float = Field(gt=0, description="PCIe Gen4 x16, GB/s per direction.")
    pcie_efficiency: float = Field(gt=0, le=1, description="Achievable fraction of PCIe "
                                   "bandwidth for GPU peer-to-peer copies.")
    pcie_latency_us: float = Field(ge=0, description="Latency of one PCIe link traversal, us.")
    socket_link_gb_s: float = Field(gt=0, description="GPU-to-GPU bandwidth across the CPU "
                                    "inter-socket link, GB/s per direction.")
    socket_link_latency_us: float = Field(ge=0, description="Latency across the socket link, us.")
    nic_gb_s: float = Field(gt=0, description="One NIC port, GB/s per direction.")
    nic_efficiency: float = Field(gt=0, le=1, description="Achievable fraction of NIC line rate "
                                  "for RDMA transfers.")
    nic_latency_us: float = Field(ge=0, description="NIC + first switch latency, us.")
    switch_latency_us: float = Field(ge=0, description="Latency of one fabric switch hop, us.")
    attention_bwd_over_fwd: float = Field(gt=0, description="Backward FLOPs of the flash "
                                          "attention kernel relative to its forward.")
    comm_overlap: float = Field(1.0, ge=0, le=1, description="Fraction of communication that "
                                "can run behind compute (K/V hops, FSDP all-gathers and "
                                "reduce-scatters): 1 with NCCL's own streams on a GPU.")
    optimizer_params_per_s: float | None = Field(
        None, gt=0, description="Parameters of a shard that clipping plus AdamW update per "
        "second per device; None: memory-bound at hbm_bandwidth_gb_s.")
    dense_flops_at: dict[int, float] = Field(
        default_factory=dict, description="Measured FLOP/s of a decoder layer's forward and "
        "backward (its attention excluded) by tokens per device per micro-step; empty: "
        "peak x mfu_dense at every size.")
    attention_flops_at: dict[int, float] = Field(
        default_factory=dict, description="Measured forward FLOP/s of the attention block "
        "kernel by tokens per device per micro-step; empty: peak x mfu_attention.")
    layer_overhead_s_at: dict[int, float] = Field(
        default_factory=dict, description="Measured seconds per decoder layer and micro-step "
        "beyond its priced compute and communication, by tokens per device per micro-step; "
        "empty: none (a GPU's launches run ahead of its kernels).")
    root_overhead_s_at: dict[int, float] = Field(
        default_factory=dict, description="Measured seconds per micro-step of the FSDP root's "
        "own work, by tokens per device per micro-step; empty: none.")
    collective_gb_s: dict[str, float] = Field(
        default_factory=dict, description="Measured bus bandwidth, GB/s, of '<op>/<group "
        "size>' (all_gather/2, reduce_scatter/2): used for the sharding collectives of a "
        "group of that size, else its ring's hop bandwidth.")
    sources: dict[str, str] = Field(description="Field name -> where its number comes from.")
    assumptions: list[str] = Field(description="Fields that are assumptions, not datasheet "
                                   "figures.")

    def pcie_gb_s(self) -> float:
        """Effective PCIe Gen4 x16 bandwidth per direction for peer-to-peer copies."""
        return self.pcie_gen4_x16_gb_s * self.pcie_efficiency

    def nic_effective_gb_s(self, line_rate_gb_s: float | None = None) -> float:
        return (line_rate_gb_s or self.nic_gb_s) * self.nic_efficiency

    def dense_rate(self, tokens: float) -> float:
        """Dense FLOP/s at `tokens` per device per micro-step."""
        return _at(self.dense_flops_at, tokens, self.peak_bf16_flops * self.mfu_dense)

    def attention_rate(self, tokens: float) -> float:
        """Attention kernel FLOP/s (forward) at `tokens` per device per micro-step."""
        return _at(self.attention_flops_at, tokens, self.peak_bf16_flops * self.mfu_attention)

    def layer_overhead(self, tokens: float) -> float:
        """Framework seconds per decoder layer and micro-step at `tokens` per device."""
        return _at(self.layer_overhead_s_at, tokens, 0.0)

    def root_overhead(self, tokens: float) -> float:
        """Framework seconds per micro-step of the FSDP root at `tokens` per device."""
        return _at(self.root_overhead_s_at, tokens, 0.0)

    def optimizer_seconds(self, shard_params: float) -> float:
        """One clipping + AdamW step over `shard_params` parameters on a device."""
        rate = self.optimizer_params_per_s or (
            self.hbm_bandwidth_gb_s * 1e9 / OPTIMIZER_BYTES_PER_PARAM)
        return shard_params / rate


def _at(measured: dict[int, float], tokens: float, default: float) -> float:
    """A rate measured at a few sizes, at `tokens`: interpolated linearly in log(tokens) between
    the two nearest, the nearest one's outside them; `default` when nothing was measured."""
    if not measured:
        return default
    sizes = sorted(measured)
    i = bisect.bisect_left(sizes, tokens)
    if i == 0:
        return measured[sizes[0]]
    if i == len(sizes):
        return measured[sizes[-1]]
    lo, hi = sizes[i - 1], sizes[i]
    f = (math.log(tokens) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return measured[lo] + f * (measured[hi] - measured[lo])


L40S = HardwareProfile(
    name="l40s",
    gpu_model="NVIDIA L40S",
    peak_bf16_flops=362e12,
    hbm_bytes=48e9,
    hbm_bandwidth_gb_s=864.0,
    mfu_dense=0.45,
    mfu_attention=0.40,
    memory_reserve_bytes=4e9,
    pcie_gen4_x16_gb_s=31.5,
    pcie_efficiency=0.80,
    pcie_latency_us=1.0,
    socket_link_gb_s=16.0,
    socket_link_latency_us=2.0,
    nic_gb_s=25.0,
    nic_efficiency=0.90,
    nic_latency_us=3.0,
    switch_latency_us=1.0,
    attention_bwd_over_fwd=2.5,
    sources={
        "peak_bf16_flops": "NVIDIA L40S datasheet: 362 TFLOPS BF16 dense (733 with sparsity)",
        "hbm_bytes": "NVIDIA L40S datasheet: 48 GB GDDR6",
        "hbm_bandwidth_gb_s": "NVIDIA L40S datasheet: 864 GB/s",
        "pcie_gen4_x16_gb_s": "PCIe 4.0: 16 GT/s x 16 lanes x 128/130 encoding / 8 = 31.5 GB/s "
        "per direction (L40S datasheet: PCIe Gen4 x16, 64 GB/s bidirectional)",
        "nic_gb_s": "one 200 Gb/s port (e.g. ConnectX-7 200G) = 25 GB/s per direction",
        "socket_link_gb_s": "assumption: GPU peer traffic between sockets is staged through "
        "host memory (no P2P across the socket link on most two-socket PCIe servers); "
        "observed order of magnitude 10-20 GB/s",
        "mfu_dense": "assumption: typical achieved fraction of peak for Llama-8B-size matmuls",
        "mfu_attention": "assumption: flash-attention-2 on Ada reaches ~40% of dense peak",
        "pcie_efficiency": "assumption: P2P copies through a PCIe switch reach ~80% of line rate",
        "nic_efficiency": "assumption: RDMA reaches ~90% of line rate for MB-sized messages",
        "memory_reserve_bytes": "assumption: CUDA context, NCCL buffers, fragmentation",
        "attention_bwd_over_fwd": "flash-attention backward runs 5 matmuls to the forward's 2",
        "comm_overlap": "assumption: NCCL runs collectives and peer copies on their own CUDA "
        "streams, wholly behind compute (not measured on a GPU yet: ringpilot calibrate)",
        "optimizer_params_per_s": f"memory-bound: {OPTIMIZER_BYTES_PER_PARAM} bytes per "
        "parameter at hbm_bandwidth_gb_s",
        "latencies": "assumption: order-of-magnitude link latencies; they matter only for "
        "small messages",
    },
    assumptions=["mfu_dense", "mfu_attention", "pcie_efficiency", "socket_link_gb_s",
                 "nic_efficiency", "memory_reserve_bytes", "latencies", "comm_overlap"],
)

CPU = HardwareProfile(
    name="cpu",
    gpu_model="CPU worker (one core, fp32)",
    peak_bf16_flops=1e12,
    hbm_bytes=8e9,
    hbm_bandwidth_gb_s=20.0,
    mfu_dense=0.05,
    mfu_attention=0.02,
    memory_reserve_bytes=0.5e9,
    pcie_gen4_x16_gb_s=31.5,
    pcie_efficiency=0.8,
    pcie_latency_us=1.0,
    socket_link_gb_s=16.0,
    socket_link_latency_us=2.0,
    nic_gb_s=1.25,
    nic_efficiency=0.9,
    nic_latency_us=50.0,
    switch_latency_us=10.0,
    attention_bwd_over_fwd=2.5,
    comm_overlap=0.0,
    sources={
        "peak_bf16_flops": "a bound, not a rate: no single core reaches 1 TFLOP/s; the compute "
        "rates are meant to come from `ringpilot calibrate`",
        "hbm_bytes": "assumption: the memory one worker process may use",
        "mfu_dense": "assumption: a placeholder until calibrated (~50 GFLOP/s)",
        "mfu_attention": "assumption: a placeholder until calibrated (~20 GFLOP/s)",
        "comm_overlap": "assumption: gloo's send and receive threads share the worker's core "
        "with compute, so nothing hides behind it until calibrated",
        "hbm_bandwidth_gb_s": "assumption: a core's share of DRAM bandwidth",
    },
    assumptions=["peak_bf16_flops", "mfu_dense", "mfu_attention", "hbm_bytes",
                 "memory_reserve_bytes", "comm_overlap", "hbm_bandwidth_gb_s"],
)

PROFILES: dict[str, HardwareProfile] = {"l40s": L40S, "cpu": CPU}


def get_profile(name: str) -> HardwareProfile:
    """The named profile, or a clear error listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown hardware profile {name!r}; known: {sorted(PROFILES)}") from None
