"""Calibrated profiles: numbers measured on the cluster a plan is for, in place of datasheets.

`ringpilot calibrate` writes one (a `CalibratedProfile` YAML or JSON file) and `ringpilot plan
--profile FILE` plans with it: each measured link type's bandwidth and latency replace the
ClusterSpec's, and the measured dense and attention throughput replace the hardware profile's
assumed utilisation. What was not measured keeps its datasheet or assumed value and the plan's
assumptions say so, one line each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specs.cluster import ClusterSpec, LinkType
from topology.profile import HardwareProfile, get_profile

KIND = "ringpilot.io/calibrated-profile"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Measured(_Spec):
    """One measured number: the median of `samples` repeats and their spread."""

    value: float = Field(gt=0, description="Median of the repeats.")
    spread: float = Field(0.0, ge=0, description="(max - min) / median of the repeats.")
    samples: int = Field(1, ge=1, description="Repeats measured.")


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
    dense_flops: Measured | None = Field(None, description="Achieved dense matmul FLOP/s per "
                                         "device at the model's shapes.")
    attention_flops: Measured | None = Field(None, description="Achieved FLOP/s per device of "
                                             "the attention block kernel, forward.")
    attention_bwd_over_fwd: Measured | None = Field(None, description="Attention block backward "
                                                    "time over its forward time.")
    links: dict[str, LinkMeasurement] = Field(default_factory=dict,
                                              description="Measured link types, by name.")
    collectives: dict[str, Measured] = Field(
        default_factory=dict, description="Collective bus bandwidth, GB/s, by "
        "'<op>/<group size>' (e.g. 'all_reduce/2'); reported, not yet used by the model.")

    @model_validator(mode="after")
    def _something_measured(self) -> CalibratedProfile:
        if not (self.links or self.dense_flops or self.attention_flops):
            raise ValueError("the profile measures nothing: give links, dense_flops or "
                             "attention_flops (ringpilot calibrate writes them)")
        return self


class CalibrationError(ValueError):
    """A calibrated profile that does not fit the plan's cluster, or is not physical."""


def line_rates(base: HardwareProfile) -> dict[str, float]:
    """Datasheet line rate per direction (GB/s) of the link classes the presets name; a measured
    bandwidth above it is not physical."""
    return {"pcie": base.pcie_gen4_x16_gb_s, "nic": base.nic_gb_s}


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
    for field, m in (("dense_flops", cal.dense_flops), ("attention_flops", cal.attention_flops)):
        if m is not None and m.value > base.peak_bf16_flops:
            raise CalibrationError(
                f"--profile: {field} {m.value:.3g} FLOP/s is above the {base.gpu_model} peak of "
                f"{base.peak_bf16_flops:.3g}; measure again")

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
    profile = base.model_copy(update={**update, "sources": sources, "assumptions": assumptions})
    return spec.model_copy(update={"link_types": link_types}), profile, notes
