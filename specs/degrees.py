"""ParallelDims: how a stage's workers split the work, one object from the planner to the trainer.

The world is a (dp_replicate, dp_shard, ring) grid of ranks. `ring` ranks split one sequence
(ring attention); the `dp_replicate x dp_shard` rings each train their own sequences (data
parallel). Parameters, gradients and optimizer state are sharded (FSDP2) over `shard` =
dp_shard x ring ranks, and replicated over dp_replicate groups of them (HSDP when > 1): a shard
group keeps its all-gathers among nearby GPUs while still splitting the model state.

    ring_degree          ring          GPUs per ring
    data_parallel_degree dp            rings = dp_replicate x dp_shard
    shard_degree         shard         GPUs a parameter is sharded over = dp_shard x ring

(`ulysses`, a head split inside a ring, is reserved for the layered sequence parallelism; it is
1 until that lands.) The trainer builds its DeviceMesh from exactly these numbers and the plan's
ring order, and the planner's memory model divides the model state by `shard`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MESH_DIMS = ("dp_replicate", "dp_shard", "ring")


class ParallelDims(BaseModel):
    """Degrees of one stage; their product is the world size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dp_replicate: int = Field(1, gt=0, description="Replicas of the sharded model state (HSDP).")
    dp_shard: int = Field(1, gt=0, description="Rings a shard group spans.")
    ring: int = Field(1, gt=0, description="Ranks per ring (sequence split).")
    ulysses: int = Field(1, ge=1, le=1, description="Reserved: head split inside a ring.")

    @classmethod
    def of(cls, ring: int, dp: int, shard: int) -> ParallelDims:
        """From the user-facing degrees (ring_degree, data_parallel_degree, shard_degree)."""
        if shard % ring:
            raise ValueError(f"shard_degree ({shard}) must be a multiple of ring_degree ({ring}): "
                             "a ring's ranks shard the model together; use "
                             f"{ring * max(1, round(shard / ring))}")
        if dp % (shard // ring):
            options = [ring * d for d in range(1, dp + 1) if dp % d == 0]
            raise ValueError(f"shard_degree ({shard}) must be ring_degree ({ring}) times a "
                             f"divisor of data_parallel_degree ({dp}); use one of {options}")
        return cls(dp_replicate=dp // (shard // ring), dp_shard=shard // ring, ring=ring)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ring * self.ulysses

    @property
    def dp(self) -> int:
        """Data-parallel ways: rings, each training its own sequences."""
        return self.dp_replicate * self.dp_shard

    @property
    def shard(self) -> int:
        """Ranks a parameter is sharded over (FSDP2's shard group)."""
        return self.dp_shard * self.ring * self.ulysses

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.dp_replicate, self.dp_shard, self.ring)

    def problems(self, *, seq_len: int, batch_size: int, heads: int | None = None,
                 kv_heads: int | None = None) -> list[str]:
        """What a stage's shape makes impossible for these degrees, one line each with a fix."""
        out = []
        if self.ring > 1 and seq_len % (2 * self.ring):
            out.append(f"seq_len ({seq_len}) must be divisible by 2 x ring_degree "
                       f"({2 * self.ring}) for zigzag sharding; use "
                       f"{-(-seq_len // (2 * self.ring)) * 2 * self.ring} or another ring_degree")
        if batch_size % self.dp:
            out.append(f"batch_size ({batch_size}) must be a multiple of data_parallel_degree "
                       f"({self.dp}); use batch_size {-(-batch_size // self.dp) * self.dp}")
        if heads is not None and kv_heads is not None and heads % kv_heads:
            out.append(f"num_attention_heads ({heads}) must be a multiple of "
                       f"num_key_value_heads ({kv_heads})")
        return out

    def rings_grid(self, rings: list[list[int]]) -> list[list[list[int]]]:
        """Ranks as the (dp_replicate, dp_shard, ring) grid from a plan's rings in plan order:
        ring i is replica i // dp_shard, shard slot i % dp_shard (so consecutive rings share a
        shard group, and the planner puts consecutive rings side by side)."""
        if len(rings) != self.dp or any(len(r) != self.ring for r in rings):
            raise ValueError(f"the plan has {len(rings)} rings of sizes "
                             f"{sorted({len(r) for r in rings})}, the degrees say {self.dp} "
                             f"rings of {self.ring}")
        return [rings[i * self.dp_shard:(i + 1) * self.dp_shard]
                for i in range(self.dp_replicate)]

    def describe(self) -> str:
        parts = [f"ring {self.ring}", f"dp {self.dp}", f"shard {self.shard}"]
        if self.dp_replicate > 1:
            parts.append(f"{self.dp_replicate} replicas (HSDP)")
        return " x ".join(parts[:2]) + ", " + ", ".join(parts[2:])
