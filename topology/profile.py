"""Hardware profile: every constant the cost model uses, named once, with its source."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HardwareProfile(BaseModel):
    """Numbers the cost model multiplies by. `assumptions` lists the ones that are not datasheet
    figures: a capacity planner should treat predictions as only as good as those."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    sources: dict[str, str] = Field(description="Field name -> where its number comes from.")
    assumptions: list[str] = Field(description="Fields that are assumptions, not datasheet "
                                   "figures.")

    def pcie_gb_s(self) -> float:
        """Effective PCIe Gen4 x16 bandwidth per direction for peer-to-peer copies."""
        return self.pcie_gen4_x16_gb_s * self.pcie_efficiency

    def nic_effective_gb_s(self, line_rate_gb_s: float | None = None) -> float:
        return (line_rate_gb_s or self.nic_gb_s) * self.nic_efficiency


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
        "latencies": "assumption: order-of-magnitude link latencies; they matter only for "
        "small messages",
    },
    assumptions=["mfu_dense", "mfu_attention", "pcie_efficiency", "socket_link_gb_s",
                 "nic_efficiency", "memory_reserve_bytes", "latencies"],
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
    sources={
        "peak_bf16_flops": "a bound, not a rate: no single core reaches 1 TFLOP/s; the compute "
        "rates are meant to come from `ringpilot calibrate`",
        "hbm_bytes": "assumption: the memory one worker process may use",
        "mfu_dense": "assumption: a placeholder until calibrated (~50 GFLOP/s)",
        "mfu_attention": "assumption: a placeholder until calibrated (~20 GFLOP/s)",
    },
    assumptions=["peak_bf16_flops", "mfu_dense", "mfu_attention", "hbm_bytes",
                 "memory_reserve_bytes"],
)

PROFILES: dict[str, HardwareProfile] = {"l40s": L40S, "cpu": CPU}


def get_profile(name: str) -> HardwareProfile:
    """The named profile, or a clear error listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown hardware profile {name!r}; known: {sorted(PROFILES)}") from None
