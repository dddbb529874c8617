"""Helpers shared by the topology tests (a module name no other test area uses)."""

from pathlib import Path

from specs.run import RunSpec

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"


def small_run(ring="auto", dp="auto", seq_len=16384, batch=1, hidden=2048, layers=16,
              workers=8) -> RunSpec:
    """A ~1B Llama run with one stage (the cost model only needs the shapes)."""
    return RunSpec.model_validate({
        "name": "small",
        "model": {"vocab_size": 32000, "hidden_size": hidden, "intermediate_size": 4 * hidden,
                  "num_hidden_layers": layers, "num_attention_heads": 16,
                  "num_key_value_heads": 4, "rope_theta": 500000.0, "pretrain_seq_len": 8192},
        "stages": [{"name": "s1", "seq_len": seq_len, "steps": 10, "batch_size": batch,
                    "grad_accum_steps": 1, "lr": 1e-5, "ring_degree": ring,
                    "data_parallel_degree": dp}],
        "resources": {"workers": workers},
        "storage": {"path": "/tmp/x"},
    })


# ---- the namespace fabric of configs/clusters/netns-4x2.yaml, for tomography tests ----------
NBYTES = 4 << 20  # bytes per timed hop
UPLINK = ("host1/nic0", "leaf0")  # host1's NIC towards the bridge: tbf on host1's veth
DOWNLINK = ("leaf0", "host2/nic0")  # the bridge towards host2


def ring_host_by_host() -> list[str]:
    """One ring through the 8 ranks of netns-4x2, host by host."""
    return [f"host{i}/gpu{g}" for i in range(4) for g in range(2)]


def simulated_preflight(router, truth, noise: float = 0.0, seed: int = 0):
    """Round one (the ring's hops at once) timed on `truth`, its explanation, the probe
    round's batches and the refined explanation: (first, batches, final)."""
    import numpy as np

    from topology.cost import ring_flows
    from topology.tomography import explain, probe_pairs, refine, simulate_round

    rng = np.random.default_rng(seed)
    ring = ring_host_by_host()
    first = explain(router, simulate_round(router, truth, [ring_flows([ring])], NBYTES, noise,
                                           rng))
    batches = probe_pairs(router, first, ring)
    final = refine(router, first, simulate_round(router, truth, batches, NBYTES, noise, rng))
    return first, batches, final
