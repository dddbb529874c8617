"""Layered sequence parallelism: Ulysses head all-to-all inside a fast domain, the ring across.

A sequence is split over U x R ranks. The ring's zigzag shard of ring position r (2 chunks of
2R) is cut into U contiguous pieces, one per rank of a Ulysses group, so rank (r, u) holds
S / (R U) tokens with all heads. In attention:

    1. all-to-all inside the Ulysses group: scatter heads, gather sequence, so each of its U
       ranks holds the ring position's whole zigzag shard for H / U query heads (and its share
       of the K/V heads: split when U divides them, replicated U / Hk times when U is larger);
    2. the zigzag ring across the R ring positions, unchanged, on those heads;
    3. the inverse all-to-all: scatter sequence, gather heads, back to (B, S / (R U), H, D).

Both all-to-alls are permutations, so each one's backward is the other. U = 1 is exactly
`ring_attention`; R = 1 is pure Ulysses (the "ring" is one rank: one local kernel call).
The Ulysses index u of a rank is its place in the mesh's Ulysses dim (the plan's order), the
same index its ring joins; the all-to-alls permute their chunks to the process group's sorted
rank order, which all_to_all_single addresses. Before any all-to-all, every rank checks its
layout against the others' with one small all-gather per group, so a mismatch is an error on
every rank, never a hang. That costs two tiny collectives per call (and a host sync on
CUDA), small next to the all-to-alls; it is not skipped, since a rank that skipped it while
another did not would hang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ray_jobs.ring_attention.comm import Ring, resolve_ring
from ray_jobs.ring_attention.ring import ring_attention
from ray_jobs.ring_attention.zigzag import contiguous_shard, zigzag_shard
from specs.degrees import ulysses_problems


@dataclass(frozen=True)
class SequenceMesh:
    """This rank's two sequence-parallel groups: its Ulysses group and its ring."""

    ulysses: dist.ProcessGroup | None  # None: a Ulysses degree of 1
    ulysses_size: int
    ring: Ring
    # The group's global ranks in mesh order: index u holds sequence piece u and head block u,
    # and rings join the same index across groups. Process groups order their ranks sorted,
    # so the all-to-alls permute their chunks between the two orders.
    ulysses_ranks: tuple[int, ...] = ()

    @property
    def ulysses_rank(self) -> int:
        return self.ulysses_ranks.index(dist.get_rank()) if self.ulysses is not None else 0

    @property
    def order(self) -> list[int] | None:
        """Mesh index of each group rank (None when they agree)."""
        order = sorted(range(len(self.ulysses_ranks)), key=lambda i: self.ulysses_ranks[i])
        return None if order == list(range(len(order))) else order

    @property
    def size(self) -> int:
        return self.ulysses_size * self.ring.size


def build_sequence_mesh(ulysses: int, ring: int, ranks: list[int] | None = None
                        ) -> SequenceMesh:
    """Standalone Ulysses and ring groups over `ranks` (default: the world), laid out as a
    (ring, ulysses) grid: consecutive ranks form a Ulysses group (place them in one fast
    domain), rings connect the same Ulysses index across groups. Collective: every rank of the
    world calls it with the same arguments (every group is created everywhere, in one order)."""
    ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
    if ulysses < 1 or ring < 1 or ulysses * ring != len(ranks):
        raise ValueError(f"a sequence mesh of ulysses {ulysses} x ring {ring} needs "
                         f"{ulysses * ring} ranks, got {len(ranks)}; the product of the degrees "
                         "must be the group size")
    me = dist.get_rank()
    mine_u = mine_r = None
    mine_members: tuple[int, ...] = ()
    for r in range(ring):
        members = ranks[r * ulysses:(r + 1) * ulysses]
        group = dist.new_group(members) if ulysses > 1 else None
        if me in members:
            mine_u, mine_members = group, tuple(members)
    for u in range(ulysses):
        members = ranks[u::ulysses]
        group = dist.new_group(members)
        if me in members:
            mine_r = Ring(group=group, ranks=tuple(members))
    if mine_r is None:
        raise ValueError(f"rank {me} is not one of the sequence mesh's ranks {ranks}")
    return SequenceMesh(ulysses=mine_u, ulysses_size=ulysses, ring=mine_r,
                        ulysses_ranks=mine_members)


def sequence_shard(x: torch.Tensor, dim: int, ring_rank: int, ring: int, ulysses_rank: int,
                   ulysses: int, causal: bool = True) -> torch.Tensor:
    """Rank (ring_rank, ulysses_rank)'s shard of a whole sequence along `dim`: the ring's shard
    (zigzag when causal, contiguous otherwise), then its ulysses_rank-th contiguous piece."""
    shard = (zigzag_shard if causal else contiguous_shard)(x, dim, ring_rank, ring)
    return contiguous_shard(shard, dim, ulysses_rank, ulysses)


def sequence_position_ids(seq_len: int, ring_rank: int, ring: int, ulysses_rank: int,
                          ulysses: int, device=None) -> torch.Tensor:
    """Global positions of rank (ring_rank, ulysses_rank)'s causal shard."""
    return sequence_shard(torch.arange(seq_len, device=device), 0, ring_rank, ring,
                          ulysses_rank, ulysses)


def layout_position_ids(layout, ring_rank: int, ring: int, ulysses_rank: int,
                        ulysses: int) -> torch.Tensor:
    """Original positions of rank (ring_rank, ulysses_rank)'s shard of a sequence permuted by
    a documents.DocumentLayout (balanced per document): the layout's order, then the causal
    Ulysses x ring shard. The tokens, labels and RoPE positions a rank holds are the
    sequence's at these positions."""
    if layout.world is not None and layout.world != ring:
        raise ValueError(f"this layout was balanced for a ring of {layout.world}, not {ring}")
    return sequence_shard(layout.positions, 0, ring_rank, ring, ulysses_rank, ulysses)


def kv_replication(kv_heads: int, ulysses: int) -> int:
    """How many times each K/V head is repeated so that U ranks each get a whole one (1 when U
    divides the K/V heads). Repeated heads cost U / Hk times the K/V bytes in the all-to-all and
    the ring, and their gradients are summed back."""
    return ulysses // kv_heads if ulysses > kv_heads else 1


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, order: list[int] | None
                ) -> torch.Tensor:
    """x[j] goes to the member of mesh index j; returns out[i] from the member of index i.
    `order`: mesh index of each group rank (all_to_all_single addresses group ranks)."""
    x = (x[order] if order is not None else x).contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out[torch.argsort(torch.tensor(order))] if order is not None else out


def _sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, u: int,
                       order: list[int] | None) -> torch.Tensor:
    """(B, L, H, D) sequence pieces -> (B, U L, H / U, D): this rank's heads, the whole shard."""
    b, n, h, d = x.shape
    send = x.reshape(b, n, u, h // u, d).permute(2, 0, 1, 3, 4)
    recv = _all_to_all(send, group, order)  # recv[i]: piece i of the sequence, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, u * n, h // u, d)


def _heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup, u: int,
                       order: list[int] | None) -> torch.Tensor:
    """(B, U L, H / U, D) -> (B, L, H, D): the inverse of _sequence_to_heads."""
    b, un, hu, d = x.shape
    send = x.reshape(b, u, un // u, hu, d).permute(1, 0, 2, 3, 4)
    recv = _all_to_all(send, group, order)  # recv[j]: my piece of the sequence, head block j
    return recv.permute(1, 2, 0, 3, 4).reshape(b, un // u, u * hu, d)


class _AllToAll(torch.autograd.Function):
    """One of the two all-to-alls (`to_heads`: sequence pieces to heads, else back); each is a
    permutation, so its backward is the other one."""

    @staticmethod
    def forward(ctx, x, group, u, order, to_heads: bool):
        ctx.args, ctx.to_heads = (group, u, order), to_heads
        return (_sequence_to_heads if to_heads else _heads_to_sequence)(x, group, u, order)

    @staticmethod
    def backward(ctx, grad):
        back = _heads_to_sequence if ctx.to_heads else _sequence_to_heads
        return back(grad.contiguous(), *ctx.args), None, None, None, None


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_layouts_agree(q, k, group, what: str) -> None:
    """One small all-gather: every rank of `group` sees every rank's layout, so all of them
    raise on a mismatch (no rank goes on to post a transfer the others never match)."""
    if group is None:
        return
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    mine = torch.tensor([*q.shape, k.shape[2], dtype], dtype=torch.int64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    layouts = {tuple(t.tolist()) for t in everyone}
    if len(layouts) > 1:
        shown = sorted(f"(batch {b}, local_seq {n}, heads {h}, head_dim {d}, kv_heads {hk})"
                       for b, n, h, d, hk, _ in layouts)
        raise ValueError(f"the ranks of one {what} group hold different layouts: "
                         f"{'; '.join(shown)} (or dtypes); shard every rank's q/k/v the same "
                         "way (sequence_shard)")


def sequence_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                mesh: SequenceMesh, causal: bool = True,
                                scale: float | None = None,
                                doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of a sequence sharded over a Ulysses x ring mesh (see module docstring).

    q: (batch, local_seq, heads, head_dim); k, v: (batch, local_seq, kv_heads, head_dim), this
    rank's `sequence_shard`. Returns out like q; differentiable in q, k, v.
    doc_starts: document masking, as ring_attention takes it (the whole sequence's document
    starts). It passes straight to the ring: after the first all-to-all every rank holds its
    ring position's whole zigzag shard, the layout ring_attention plans documents for.
    """
    u = mesh.ulysses_size
    problems = ulysses_problems(q.shape[2], k.shape[2], u)
    if causal and mesh.ring.size > 1 and (u * q.shape[1]) % 2:
        problems.append(f"a ring position's shard (ulysses {u} x local_seq {q.shape[1]} = "
                        f"{u * q.shape[1]} tokens) must be even for the zigzag ring; make the "
                        f"sequence divisible by 2 x ring x ulysses = {2 * mesh.size}")
    if problems:
        raise ValueError(problems[0])
    _check_layouts_agree(q, k, mesh.ulysses, "Ulysses")
    _check_layouts_agree(q, k, mesh.ring.group if mesh.ring.size > 1 else None, "ring")
    if u == 1:
        return ring_attention(q, k, v, group=mesh.ring, causal=causal, scale=scale,
                              doc_starts=doc_starts)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    rep = kv_replication(k.shape[2], u)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    group, order = mesh.ulysses, mesh.order
    q2, k2, v2 = (_AllToAll.apply(t.contiguous(), group, u, order, True) for t in (q, k, v))
    out = ring_attention(q2, k2, v2, group=resolve_ring(mesh.ring), causal=causal, scale=scale,
                         doc_starts=doc_starts)
    return _AllToAll.apply(out.contiguous(), group, u, order, False)
