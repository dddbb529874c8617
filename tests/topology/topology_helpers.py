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
