"""The local search over partition and ring order: hill climbing on `rank`, then kicks."""

from __future__ import annotations

import random
import time

from topology.cost import StageShape
from topology.planner.evaluation import TIE, Evaluated, Evaluator, rank
from topology.planner.moves import FULL_NEIGHBOURHOOD, Moves

NO_MOVE_HELPS = "no move helps"


# The search stops after its budget of moves; the wall clock only guards against a machine so
# slow that the budget would take this many times its nominal seconds.
WALL_CLOCK_GUARD = 10

class LocalSearch:
    """One search from `start`: first-improvement hill climbing on `rank`, each move evaluated
    on the full contention model, until no move helps or the budget of `search_seconds` is
    spent; on small placements, kicks out of the local optimum. Deterministic for a seed."""

    def __init__(self, evaluator: Evaluator, moves: Moves, start: Evaluated, shape: StageShape,
                 floor: tuple[float, float] | None, search_seconds: float, seed: int):
        self.evaluator = evaluator
        self.moves = moves
        self.start = start
        self.shape = shape
        self.search_seconds = search_seconds
        self.rng = random.Random(seed)
        # The budget is counted in moves, at a nominal cost per move on a 2-core machine, so
        # a plan does not depend on how busy the machine is; the wall clock only guards (10x).
        total, u = len(start.rings) * len(start.rings[0]), shape.ulysses
        per_move = 2e-4 + 1.5e-6 * total * (1 if u == 1 else 2) + 0.5e-6 * total * (u - 1)
        self.budget = max(1, int(search_seconds / per_move))  # Ulysses: all-to-alls priced
        self.deadline = time.perf_counter() + WALL_CLOCK_GUARD * search_seconds
        self.floor = floor or (start.cost.step_seconds, start.ring.seconds)
        self.tried = 0  # moves evaluated
        self.stop = NO_MOVE_HELPS  # why the search stopped
        self.gains: dict[str, list[float]] = {}  # per move kind: count, step and hop gained

    def run(self, spare: list[str]) -> tuple[Evaluated, list[str]]:
        """The best placement found, with notes saying which moves improved it and by how
        much. `spare`: the unused GPUs the moves may bring in."""
        flat = [v for r in self.start.rings for v in r]
        best, flat, spare = self._climb(self.start, flat, list(spare), log=True)
        best, kicks = self._kick_and_climb(best, flat, spare)
        return best, self._notes(best, kicks)

    def _kick_and_climb(self, best: Evaluated, flat: list[str], spare: list[str]
                        ) -> tuple[Evaluated, int]:
        """Small placements: kick the local optimum (two random swaps, with positions or unused
        GPUs) and climb again, keeping what comes out better: moves that only pay off
        together (a GPU moved and its ring rotated, two rings rebuilt across nodes)."""
        kicks = 0
        while len(flat) <= FULL_NEIGHBOURHOOD // 2 and len(flat) > 1 \
                and kicks < 4 * len(flat) and not self._out_of_budget():
            kicks += 1
            cand, rest = self._kicked(flat, spare)
            ev, cand, rest = self._climb(self._evaluate(cand), cand, rest, log=False)
            if self._better(ev, best):
                self._note("kick and climb", best, ev)
                best, flat, spare = ev, cand, rest
        return best, kicks

    def _kicked(self, flat: list[str], spare: list[str]) -> tuple[list[str], list[str]]:
        """Two random swaps of a position with another position or an unused GPU."""
        cand, rest = flat[:], spare[:]
        for _ in range(2):
            i = self.rng.randrange(len(cand))
            j = self.rng.randrange(len(cand) + len(rest))
            if j < len(cand):
                cand[i], cand[j] = cand[j], cand[i]
            else:
                cand[i], rest[j - len(cand)] = rest[j - len(cand)], cand[i]
        return cand, rest

    def _climb(self, ev: Evaluated, flat: list[str], spare: list[str], log: bool
               ) -> tuple[Evaluated, list[str], list[str]]:
        """Take the first move that is `_better`, from there again, until none is or the
        budget is spent; `log`: note each move's gain."""
        while not self._out_of_budget():
            for kind, cand, rest in self.moves.generate(ev, flat, spare, self.shape, self.rng):
                if self._out_of_budget():
                    break
                new = self._evaluate(cand)
                if self._better(new, ev):
                    if log:
                        self._note(kind, ev, new)
                    ev, flat, spare = new, cand, rest
                    break
            else:
                break  # no move helps
        return ev, flat, spare

    def _evaluate(self, flat: list[str]) -> Evaluated:
        self.tried += 1
        n, dp = self.shape.ring * self.shape.ulysses, self.shape.dp
        return self.evaluator.evaluate([flat[k * n:(k + 1) * n] for k in range(dp)], self.shape)

    def _better(self, ev: Evaluated, than: Evaluated) -> bool:
        """`rank` with the floors moved by `ev` (they only fall: no cycle)."""
        f = (min(self.floor[0], ev.cost.step_seconds), self.floor[1])
        if ev.cost.step_seconds <= f[0] * (1 + TIE):
            f = (f[0], min(f[1], ev.ring.seconds))
        if rank(ev, f) < rank(than, f):
            self.floor = f
            return True
        return False

    def _note(self, kind: str, old: Evaluated, new: Evaluated) -> None:
        gain = self.gains.setdefault(kind, [0, 0.0, 0.0])
        gain[0] += 1
        gain[1] += old.cost.step_seconds - new.cost.step_seconds
        gain[2] += old.ring.seconds - new.ring.seconds

    def _out_of_budget(self) -> bool:
        if self.tried >= self.budget:
            self.stop = (f"the budget of {self.search_seconds:g} s ({self.budget} moves) is "
                         "spent")
        elif time.perf_counter() > self.deadline:
            self.stop = (f"{WALL_CLOCK_GUARD:g}x the time budget of {self.search_seconds:g} s "
                         "passed")
        return self.stop != NO_MOVE_HELPS

    def _notes(self, best: Evaluated, kicks: int) -> list[str]:
        """What the search did: the moves that improved the start, or that none did."""
        stop = self.stop if not kicks or self.stop != NO_MOVE_HELPS else \
            f"{NO_MOVE_HELPS}, {kicks} kicks tried"
        if not self.gains:
            return [f"search: no move improved it ({self.tried} moves evaluated; stopped: "
                    f"{stop})"]
        done = "; ".join(f"{k} x{c} (step {ds * 1e3:+.3g} ms, slowest hop {dh * 1e3:+.3g} ms)"
                         for k, (c, ds, dh) in sorted(self.gains.items()))
        start = self.start
        return [f"search: {sum(g[0] for g in self.gains.values())} moves improved it, "
                f"gains as reductions: {done}; slowest hop "
                f"{start.ring.seconds * 1e3:.3f} -> {best.ring.seconds * 1e3:.3f} ms, step "
                f"{start.cost.step_seconds:.4g} -> {best.cost.step_seconds:.4g} s "
                f"({self.tried} moves evaluated; stopped: {stop})"]
