"""A Hugging Face Llama/Qwen model on CPU as the study's probe: its Q/K/V projections, Eq. 2
saliency through forward hooks, greedy generation with a chat template.

The analyses (:mod:`.observations`, :mod:`.perturb`) run the HF model rather than megatron's
because they generate hundreds of tokens per sample and HF's KV cache makes that cheap on CPU.
Saliency is the same quantity ``longact saliency`` measures on megatron (paper Eq. 2, on the
projection output before RoPE; Llama has no QK-norm): the per-sample sums of squares come from
:func:`megatron_longact.longact.saliency.per_sample_sum_squares`, so the two paths share one
implementation of the formula.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_longact.longact.profile import SaliencyProfile
from megatron_longact.longact.saliency import describe_micro_batch, per_sample_sum_squares

PROJECTIONS = ("q", "k", "v")


@dataclass(frozen=True, kw_only=True)
class HFShape:
    """Attention shape of an HF decoder: N query heads, G KV heads, D dims per head."""

    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int

    def heads(self, projection: str) -> int:
        return self.num_heads if projection == "q" else self.num_groups


def load_hf(model_dir: str | Path):
    """(model in eval mode, tokenizer, shape) from a local HF folder; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no config.json; make the folder with `longact import-gguf --out {path}`"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer, hf_shape(model)


def hf_shape(model) -> HFShape:
    config = model.config
    heads = config.num_attention_heads
    return HFShape(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_groups=getattr(config, "num_key_value_heads", heads),
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def projection_modules(model) -> dict[int, dict[str, torch.nn.Module]]:
    """``{layer: {"q": q_proj, "k": k_proj, "v": v_proj}}`` of a Llama/Qwen-style HF model."""
    layers = model.model.layers
    return {
        index: {p: getattr(layer.self_attn, f"{p}_proj") for p in PROJECTIONS}
        for index, layer in enumerate(layers)
    }


@contextmanager
def saliency_hooks(model) -> Iterator[dict[int, dict[str, list[torch.Tensor]]]]:
    """Collects per-sample sums of squares of every Q/K/V projection output.

    Yields ``{layer: {proj: [tensor [b, H * D] float32 per forward call]}}``. Every forward call
    must be one unpadded batch [b, s] (no KV cache): each row is one sample.
    """
    sums: dict[int, dict[str, list[torch.Tensor]]] = {}
    handles = []
    for layer, modules in projection_modules(model).items():
        for projection, module in modules.items():
            bucket = sums.setdefault(layer, {}).setdefault(projection, [])

            def hook(_module, _inputs, output_bsr, bucket=bucket):
                # HF is [b, s, rows]; the longact helper takes megatron's [s, b, rows].
                output_sbr = output_bsr.detach().transpose(0, 1)
                b, s = output_bsr.shape[:2]
                samples = describe_micro_batch({"tokens": torch.zeros(b, s, dtype=torch.long)})
                bucket.append(per_sample_sum_squares(output_sbr, samples))

            handles.append(module.register_forward_hook(hook))
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def per_sample_saliency(
    model, token_lists: Sequence[Sequence[int]], *, log_every: int = 0
) -> dict[int, dict[str, torch.Tensor]]:
    """Eq. 2's per-sample term sqrt(sum_s X[s, h, d]^2) for each sample.

    Returns ``{layer: {proj: [num_samples, H, D] float32}}``; the mean over samples is M.
    One sample per forward (no padding), so lengths may differ.
    """
    shape = hf_shape(model)
    with torch.no_grad(), saliency_hooks(model) as sums:
        for index, ids in enumerate(token_lists):
            model(torch.tensor([list(ids)]), use_cache=False)
            if log_every and (index + 1) % log_every == 0:
                print(f"  saliency: {index + 1}/{len(token_lists)} samples", flush=True)
    return {
        layer: {
            p: torch.cat(parts).sqrt().view(-1, shape.heads(p), shape.head_dim)
            for p, parts in per.items()
        }
        for layer, per in sums.items()
    }


def profile_from_samples(
    per_sample: dict[int, dict[str, torch.Tensor]], shape: HFShape, *, rows: slice | None = None
) -> SaliencyProfile:
    """M (mean over the chosen samples) as longact's :class:`SaliencyProfile`."""
    rows = rows or slice(None)
    saliency = {
        layer: {p: values[rows].mean(dim=0) for p, values in per.items()}
        for layer, per in per_sample.items()
    }
    num_samples = next(iter(per_sample[0].values()))[rows].shape[0]
    return SaliencyProfile(
        saliency=saliency,
        num_samples=num_samples,
        num_heads=shape.num_heads,
        num_groups=shape.num_groups,
        head_dim=shape.head_dim,
    )


def chat_ids(tokenizer, user_message: str) -> list[int]:
    """Token ids of one user turn plus the assistant prefix, by the model's chat template."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], add_generation_prompt=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return list(ids)


def greedy(model, tokenizer, prompt_ids: Sequence[int], *, max_new_tokens: int) -> list[int]:
    """Greedy continuation (new token ids only), stopping at the tokenizer's eos."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt_ids)]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()
