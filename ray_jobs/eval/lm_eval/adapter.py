"""ringpilot as an lm-evaluation-harness model backend: a checkpoint answering lm-eval's requests.

lm-eval is the optional `eval` extra: this package depends on it and imports it lazily, so the rest
of ringpilot loads without it. Nothing of lm-eval's or RULER's code is copied here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

MODEL_NAME = "ringpilot"


class LmEvalMissing(ImportError):
    """lm-eval (with its RULER requirements) is not installed."""


class RulerInputError(ValueError):
    """A request that cannot be run: unknown task, length, missing chat template..."""


def offline_environment() -> None:
    """Keep lm-eval's RULER tasks off the network, before huggingface_hub, datasets or nltk are
    imported (they read these at import): the hub in offline mode (tasks needing a download fail
    at once with the reason instead of ~25 s of retries each), and an empty `punkt_tab` on
    NLTK_DATA, because importing lm-eval's NIAH module downloads nltk's sentence splitter when
    it finds none. Only the essay haystacks use it; with eval.data_dir the folder's real
    punkt_tab is put first on nltk's path (offline_data.local_sources)."""
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    stub = Path(tempfile.gettempdir()) / "ringpilot-nltk-offline"
    (stub / "tokenizers" / "punkt_tab").mkdir(parents=True, exist_ok=True)
    paths = os.environ.get("NLTK_DATA", "").split(os.pathsep)
    if str(stub) not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join([p for p in paths if p] + [str(stub)])


def require_lm_eval():
    """The `lm_eval` module, or one clear error naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.api.registry  # noqa: F401
    except ImportError as e:
        raise LmEvalMissing(
            f"lm-evaluation-harness is not installed ({e}); install ringpilot's `eval` extra: "
            "pip install -e '.[eval]' (it brings lm-eval[ruler])") from e
    return lm_eval


# -- the backend -----------------------------------------------------------------------------

def stop_at(text: str, until: Sequence[str]) -> str:
    """`text` cut before the earliest stop sequence it contains."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def gen_settings(gen_kwargs: dict, default_max: int) -> tuple[list[str], int]:
    """(stop sequences, token budget) of lm-eval's generation arguments; sampling is refused."""
    if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0) or 0) > 0:
        raise RulerInputError("the ringpilot backend decodes greedily only; this task asks for "
                              f"sampling ({gen_kwargs})")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    return until, int(gen_kwargs.get("max_gen_toks", default_max))


class _CheckpointModel:
    """A checkpoint's model and tokenizer, answering lm-eval's requests (greedy decoding)."""

    def __init__(self, pretrained: str, device: str = "cpu", max_gen_toks: int = 256,
                 long_generate: Callable | None = None, max_local: int | None = None,
                 compute_dtype: str = "float32"):
        from ray_jobs.eval.model import load_checkpoint, max_model_length

        # Prompts longer than `max_local` tokens go to `long_generate`
        # (ids, max_new_tokens, eos) -> new ids: an evaluation gang (ray_jobs.eval.gang).
        self.long_generate, self.max_local = long_generate, max_local
        self.path = str(pretrained)
        # the evaluator's dtype (bf16 on CUDA for a bf16 run; ray_jobs.eval.model.load_arguments)
        self.model, self.tokenizer = load_checkpoint(pretrained, device, compute_dtype)
        self.max_length = max_model_length(pretrained)
        self.max_gen_toks = max_gen_toks
        self.warned = False
        self.torch_device = next(self.model.parameters()).device

    def encode(self, text: str, *, with_bos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        bos, bos_text = self.tokenizer.bos_token_id, self.tokenizer.bos_token
        # as ringpilot's trainer starts every sequence (unless a chat template already wrote it)
        if with_bos and bos is not None and not (bos_text and text.startswith(bos_text)):
            ids = [bos] + ids
        return ids

    def _check_fits(self, n: int, what: str) -> None:
        """Warn (once) past max_position_embeddings. Not an error: RULER sizes a prompt without
        lm-eval's gen_prefix, so a prompt at the checkpoint's own length can run a few tokens
        over; lengths above the checkpoint's are refused up front (prepare_tasks)."""
        if self.max_length and n > self.max_length and not self.warned:
            self.warned = True
            logging.getLogger(__name__).warning(
                "%s needs %d positions; checkpoint %s has max_position_embeddings=%d",
                what, n, self.path, self.max_length)

    def generate(self, context: str, gen_kwargs: dict) -> str:
        import torch

        from ray_jobs.eval.model import greedy_tokens

        until, max_new = gen_settings(gen_kwargs, self.max_gen_toks)
        ids = self.encode(context)
        self._check_fits(len(ids) + max_new, f"a prompt of {len(ids)} tokens plus {max_new} "
                                              "generated")
        eos = self.tokenizer.eos_token_id
        if (self.long_generate is not None and self.max_local is not None
                and len(ids) > self.max_local):
            new = self.long_generate(ids, max_new, eos)
        else:
            new = greedy_tokens(self.model, torch.tensor([ids], device=self.torch_device),
                                max_new, eos)
        return stop_at(self.tokenizer.decode(new, skip_special_tokens=True), until)

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        import torch

        ctx = self.encode(context)
        if not ctx:  # no BOS and an empty context: condition on the end-of-text token
            ctx = [self.tokenizer.eos_token_id]
        cont = self.tokenizer(continuation, add_special_tokens=False).input_ids
        if not cont:
            return 0.0, True
        self._check_fits(len(ctx) + len(cont), "a loglikelihood request")
        ids = torch.tensor([ctx + cont], device=self.torch_device)
        with torch.inference_mode():
            # logits at positions len(ctx)-1 .. end-1 predict the continuation's tokens
            logits = self.model(input_ids=ids, logits_to_keep=len(cont) + 1).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(cont, device=logp.device)
        total = float(logp.gather(1, target[:, None]).sum())
        return total, bool((logp.argmax(-1) == target).all())

    def chat_template(self) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise RulerInputError(
                f"a chat template was asked for, but the tokenizer of checkpoint {self.path} has "
                "none (no chat_template in tokenizer_config.json); run without it")
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        self.chat_template()
        # with lm-eval's gen_prefix the last message is the assistant's opening: continue it
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)


@functools.cache
def register_backend() -> type:
    """Define and register (once) the lm-eval model class `ringpilot`; returns it."""
    require_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class RingpilotLM(LM):
        """A ringpilot checkpoint (`pretrained`: its local directory) as an lm-eval model."""

        def __init__(self, pretrained: str, device: str | None = None,
                     max_gen_toks: int = 256, long_generate: Callable | None = None,
                     max_local: int | None = None, compute_dtype: str = "float32",
                     **_ignored):
            super().__init__()
            self.ckpt = _CheckpointModel(pretrained, device or "cpu", int(max_gen_toks),
                                         long_generate, max_local, compute_dtype)
            self._device = self.ckpt.torch_device

        @property
        def tokenizer_name(self) -> str:
            return self.ckpt.path.replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.ckpt.chat_template() if chat_template else None

        def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
            return self.ckpt.apply_chat_template(chat_history, add_generation_prompt)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs = req.args
                out.append(self.ckpt.generate(context, dict(gen_kwargs)))
                self.cache_hook.add_partial("generate_until", req.args, out[-1])
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [self.ckpt.loglikelihood(*req.args) for req in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError(
                "the ringpilot backend does not implement loglikelihood_rolling (perplexity "
                "tasks); RULER needs generate_until only")

    register_model(MODEL_NAME)(RingpilotLM)
    return RingpilotLM
