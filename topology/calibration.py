"""Calibrated profiles: numbers measured on the cluster a plan is for, in place of datasheets.

`ringpilot calibrate` writes one (a `CalibratedProfile` YAML or JSON file) and `ringpilot plan
--profile FILE` plans with it: each measured link type's bandwidth and latency replace the
ClusterSpec's, and the measured dense and attention throughput replace the hardware profile's
assumed utilisation. What was not measured keeps its datasheet or assumed value and the plan's
assumptions say so, one line each.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specs.cluster import ClusterSpec, LinkType
from topology.profile import HardwareProfile, get_profile

KIND = "ringpilot.io/calibrated-profile"


class _Spec(BaseModel):
    # inf and nan are refused: a profile is a file anyone can edit, and an infinite bandwidth
    # or FLOP rate divides the cost model by zero downstream.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Sizes the rates were measured at (tokens per device per micro-step): the cost model
# interpolates in log(tokens), so a size must be positive.
Tokens = Annotated[int, Field(gt=0, le=1 << 40)]
MAX_SIZES = 256  # measured sizes per table; `ringpilot calibrate` writes one per stage


class Measured(_Spec):
    """One measured number: the median of `samples` repeats and their spread."""

    value: float = Field(gt=0, description="Median of the repeats.")
    spread: float = Field(0.0, ge=0, description="(max - min) / median of the repeats.")
    samples: int = Field(1, ge=1, description="Repeats measured.")


class MeasuredFraction(Measured):
    """A measured fraction (0 to 1), e.g. how much communication hides behind compute."""

    value: float = Field(ge=0, le=1, description="Median of the repeats.")
    spread: float = Field(0.0, ge=0, le=1, description="max - min of the repeats.")


class MeasuredSeconds(Measured):
    """A measured time that may be zero (an overhead that did not show)."""

    value: float = Field(ge=0, description="Median of the repeats, seconds.")


class LinkMeasurement(_Spec):
    """A link type of the ClusterSpec, measured between two devices that it joins."""

    bandwidth_gb_s: Measured = Field(description="Point-to-point bandwidth per direction, GB/s.")
    latency_us: Measured | None = Field(None, description="One-way latency of a small message.")
    between: str = Field("", description="The two endpoints measured (e.g. 'node-0:gpu0 -> "
                         "node-0:gpu1').")


class CalibratedProfile(_Spec):
    """What `ringpilot calibrate` measured on one cluster, for one node type."""

    kind: Literal["ringpilot.io/calibrated-profile"] = KIND
    cluster: str = Field(description="ClusterSpec name the numbers were measured on.")
    node_type: str = Field(description="Node type (ClusterSpec node_types key) measured.")
    base_profile: str = Field("l40s", description="Hardware profile the unmeasured numbers "
                              "come from (topology.profile).")
    measured_at: str = Field(description="UTC date and time of the measurement.")
    tool: str = Field("", description="How it was measured (command, backend, shapes).")
    dense_flops: Measured | None = Field(None, description="Achieved dense FLOP/s per device of "
                                         "a decoder layer (attention excluded), forward and "
                                         "backward, at the longest stage's micro-batch.")
    attention_flops: Measured | None = Field(None, description="Achieved FLOP/s per device of "
                                             "the attention block kernel, forward.")
    dense_flops_at: dict[Tokens, Measured] = Field(
        default_factory=dict, max_length=MAX_SIZES,
        description="dense_flops by tokens per device per micro-step (each stage's micro-batch).")
    attention_flops_at: dict[Tokens, Measured] = Field(
        default_factory=dict, max_length=MAX_SIZES,
        description="attention_flops by tokens per device per micro-step.")
    layer_overhead_s_at: dict[Tokens, MeasuredSeconds] = Field(
        default_factory=dict, max_length=MAX_SIZES,
        description="Seconds per decoder layer and micro-step beyond the priced compute and "
        "communication (checkpointing, FSDP2 and ring attention wrappers), by tokens per device "
        "per micro-step.")
    root_overhead_s_at: dict[Tokens, MeasuredSeconds] = Field(
        default_factory=dict, max_length=MAX_SIZES,
        description="Seconds per micro-step of the FSDP root's own work (beyond its layers), by "
        "tokens per device per micro-step.")
    comm_overlap: MeasuredFraction | None = Field(
        None, description="Fraction of an all-gather that hid behind concurrent matmuls.")
    optimizer_params_per_s: Measured | None = Field(
        None, description="Shard parameters per second per device that gradient clipping and "
        "AdamW update (the trainer's own, on an FSDP2-sharded decoder layer).")
    attention_bwd_over_fwd: Measured | None = Field(None, description="Attention block backward "
                                                    "time over its forward time.")
    links: dict[str, LinkMeasurement] = Field(default_factory=dict, max_length=MAX_SIZES,
                                              description="Measured link types, by name.")
    collectives: dict[str, Measured] = Field(
        default_factory=dict, max_length=MAX_SIZES,
        description="Collective bus bandwidth, GB/s, by '<op>/<group size>' (e.g. "
        "'all_gather/2'); all_gather and reduce_scatter price the sharding collectives of groups "
        "of that size.")

    @model_validator(mode="after")
    def _something_measured(self) -> CalibratedProfile:
        if not (self.links or self.dense_flops or self.attention_flops or self.dense_flops_at):
            raise ValueError("the profile measures nothing: give links, dense_flops or "
                             "attention_flops (ringpilot calibrate writes them)")
        return self


class CalibrationError(ValueError):
    """A calibrated profile that does not fit the plan's cluster, or is not physical."""


def line_rates(base: HardwareProfile) -> dict[str, float]:
    """Datasheet line rate per direction (GB/s) of the link classes the presets name; a measured
    bandwidth above it is not physical."""
    return {"pcie": base.pcie_gen4_x16_gb_s, "nic": base.nic_gb_s}


def rates_of(base: HardwareProfile, spec: ClusterSpec) -> dict[str, float]:
    """The line rate of each of the cluster's link types that has one (by name)."""
    rates = line_rates(base)
    return {name: rates[name] for name in spec.link_types if name in rates}


def apply_profile(spec: ClusterSpec, cal: CalibratedProfile
                  ) -> tuple[ClusterSpec, HardwareProfile, list[str]]:
    """The cluster and hardware profile to plan with, and one note per number kept from the
    datasheet or assumption. CalibrationError when the profile is for another cluster or node
    type, names an unknown link type, or holds a number beyond physical bounds."""
    if cal.cluster != spec.name:
        raise CalibrationError(
            f"--profile: measured on cluster {cal.cluster!r}, but the plan is for {spec.name!r}; "
            f"calibrate {spec.name!r} (ringpilot calibrate) or plan without --profile")
    if cal.node_type not in spec.node_types:
        raise CalibrationError(
            f"--profile: node_type {cal.node_type!r} is not a node type of cluster {spec.name!r} "
            f"({', '.join(sorted(spec.node_types))}); calibrate one of those")
    unknown = sorted(set(cal.links) - set(spec.link_types))
    if unknown:
        raise CalibrationError(
            f"--profile: links {unknown} are not link types of cluster {spec.name!r} "
            f"({', '.join(sorted(spec.link_types))}); name the measured links as the "
            "ClusterSpec does")
    base = get_profile(cal.base_profile)
    if spec.profile != cal.base_profile:
        raise CalibrationError(
            f"--profile: base_profile {cal.base_profile!r} differs from the cluster's profile "
            f"{spec.profile!r}; calibrate against the cluster's own profile")
    rates = line_rates(base)
    for name, m in cal.links.items():
        limit = rates.get(name)
        if limit is not None and m.bandwidth_gb_s.value > limit:
            raise CalibrationError(
                f"--profile: links.{name}.bandwidth_gb_s {m.bandwidth_gb_s.value:g} GB/s is above "
                f"the {name} line rate of {limit:g} GB/s per direction; the measurement is wrong "
                "(a copy that never left the device?): measure again")
    flops = [("dense_flops", cal.dense_flops), ("attention_flops", cal.attention_flops)]
    flops += [(f"dense_flops_at.{k}", m) for k, m in cal.dense_flops_at.items()]
    flops += [(f"attention_flops_at.{k}", m) for k, m in cal.attention_flops_at.items()]
    for field, m in flops:
        if m is not None and m.value > base.peak_bf16_flops:
            raise CalibrationError(
                f"--profile: {field} {m.value:.3g} FLOP/s is above the {base.gpu_model} peak of "
                f"{base.peak_bf16_flops:.3g}; measure again")
    fastest = max([*rates_of(base, spec).values()], default=None)
    for name, m in cal.collectives.items():
        if fastest is not None and m.value > fastest:
            raise CalibrationError(
                f"--profile: collectives.{name} {m.value:g} GB/s is above every link's line rate "
                f"(at most {fastest:g} GB/s per direction); measure again")

    notes = [f"calibrated profile: measured on {cal.cluster} ({cal.node_type}) at "
             f"{cal.measured_at}" + (f" by {cal.tool}" if cal.tool else "")]
    link_types = dict(spec.link_types)
    for name, old in spec.link_types.items():
        m = cal.links.get(name)
        if m is None:
            notes.append(f"link type {name}: not measured; kept {old.bandwidth_gb_s:g} GB/s, "
                         f"{old.latency_us:g} us from the ClusterSpec "
                         f"({old.description or 'as given'})")
            continue
        latency = m.latency_us.value if m.latency_us is not None else old.latency_us
        link_types[name] = LinkType(
            bandwidth_gb_s=m.bandwidth_gb_s.value, latency_us=latency,
            description=f"measured {m.between or name}: median of {m.bandwidth_gb_s.samples}, "
            f"spread {m.bandwidth_gb_s.spread:.0%}")
        if m.latency_us is None:
            notes.append(f"link type {name}: latency not measured; kept {old.latency_us:g} us")

    update: dict = {}  # the name stays the base profile's: its peak and memory still hold
    sources, assumptions = dict(base.sources), list(base.assumptions)
    measured = {"mfu_dense": cal.dense_flops, "mfu_attention": cal.attention_flops}
    for field, m in measured.items():
        if m is None:
            notes.append(f"{field}: not measured; kept the assumed {getattr(base, field):.2f}")
            continue
        update[field] = min(m.value / base.peak_bf16_flops, 1.0)
        sources[field] = (f"measured: {m.value:.3g} FLOP/s per device (median of {m.samples}, "
                          f"spread {m.spread:.0%}) over the {base.peak_bf16_flops:.3g} peak")
        assumptions = [a for a in assumptions if a != field]
    if cal.attention_bwd_over_fwd is not None:
        update["attention_bwd_over_fwd"] = cal.attention_bwd_over_fwd.value
        sources["attention_bwd_over_fwd"] = "measured"
    for field, got in (("dense_flops_at", cal.dense_flops_at),
                       ("attention_flops_at", cal.attention_flops_at),
                       ("layer_overhead_s_at", cal.layer_overhead_s_at),
                       ("root_overhead_s_at", cal.root_overhead_s_at)):
        if got:
            update[field] = {k: m.value for k, m in got.items()}
            sources[field] = "measured at " + ", ".join(f"{k:,}" for k in sorted(got)) + \
                " tokens per device per micro-step"
    for field, m in (("comm_overlap", cal.comm_overlap),
                     ("optimizer_params_per_s", cal.optimizer_params_per_s)):
        if m is None:
            notes.append(f"{field}: not measured; kept {base.sources.get(field, 'the default')}")
            continue
        update[field] = m.value
        sources[field] = f"measured: {m.value:.3g} (median of {m.samples}, spread {m.spread:.2g})"
        assumptions = [a for a in assumptions if a != field]
    used = {k: m.value for k, m in cal.collectives.items()
            if k.startswith(("all_gather/", "reduce_scatter/"))}
    if used:
        update["collective_gb_s"] = used
        sources["collective_gb_s"] = "measured bus bandwidth: " + ", ".join(
            f"{k} {v:.3g} GB/s" for k, v in sorted(used.items()))
    profile = base.model_copy(update={**update, "sources": sources, "assumptions": assumptions})
    return spec.model_copy(update={"link_types": link_types}), profile, notes
