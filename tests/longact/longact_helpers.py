"""Shared pieces of the LongAct tests: tiny models, batches, the by-definition saliency
reference and a test-side input capture. Plain functions; importable by spawned children.

Layers: conftest.py (fixtures) -> longact_worlds.py (one entry point per spawned world) ->
longact_saliency_cases.py / longact_training_cases.py (one case each, typed results) -> here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from equivalence import ADAM_EPS_OVERRIDE

from megatron_longact.config import JobConfig, load_config

PerLayer = dict[int, dict[str, torch.Tensor]]
"""{layer number: {projection "q"/"k"/"v": tensor}}: saliency [heads, D] or masks bool [heads, D]."""

SEQ = 32
GLOBAL_ROWS = 4
SEED = 1234
LR = 1e-3
BASE = [
    "model.preset=micro-qwen3",
    f"optim.lr={LR}",
    ADAM_EPS_OVERRIDE,  # parallel vs single-process parameters stay comparable (tests/equivalence.py)
    "optim.warmup_steps=0",
    "optim.lr_decay_style=constant",
    "optim.weight_decay=0.1",
    "train.train_steps=8",
]


# ---- models -------------------------------------------------------------------------------


def write_arch(
    folder: str | Path,
    *,
    heads: int,
    groups: int,
    head_dim: int,
    bias: bool = False,
    hidden: int = 64,
    vocab: int = 256,
) -> str:
    """A tiny Qwen3 config.json (qk-norm; ``bias`` adds q/k/v biases) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": bias,
        "vocab_size": vocab,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def make_job(overrides: list[str]) -> JobConfig:
    return load_config(JobConfig, None, [*BASE, *overrides])


def reinit(job: JobConfig):
    """(Re)initialises megatron's parallel state for ``job.parallel`` in this world."""
    from megatron.core import parallel_state

    from megatron_longact.runtime.distributed import init_distributed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    return init_distributed(job.parallel, seed=SEED)


def build(job: JobConfig, dims):
    """A fresh TrainState whose initial weights depend only on the seed (not on history)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_longact.runtime.setup import setup_train_state

    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)
    return setup_train_state(job, dims)


def qkv_modules(state) -> dict[int, torch.nn.Module]:
    from megatron_longact.longact.meter import find_qkv_modules

    return find_qkv_modules(state.model)


def full_qkv(state) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """{layer: (full weight [(N+2G)D, h], full bias or None)}; all TP ranks must call."""
    from megatron_longact.runtime.params import gather_tensor_parallel

    out = {}
    for number, qkv in qkv_modules(state).items():
        bias = getattr(qkv, "bias", None)
        out[number] = (
            gather_tensor_parallel(qkv.weight),
            None if not isinstance(bias, torch.nn.Parameter) else gather_tensor_parallel(bias),
        )
    return out


# ---- batches ------------------------------------------------------------------------------

PADDED_LENGTHS = [32, 20, 9, 27]
PACKED_SEGMENTS = [[10, 14], [32], [5, 7, 9], [20]]  # real samples per bin; rest is padding


def _row(tokens: torch.Tensor, real: int, position_ids: torch.Tensor) -> dict:
    token_mask = torch.zeros(SEQ)
    token_mask[:real] = 1.0
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1),
        "loss_mask": token_mask.clone(),
        "position_ids": position_ids,
        "token_mask": token_mask,
        # Explicit causal mask: megatron's default one is built with device="cuda", which the
        # CPU bridge cannot rewrite inside backward (the full-recompute forward runs there).
        "attention_mask": block_causal(torch.tensor([SEQ])),
    }


def global_rows(step: int, vocab: int, *, packed: bool) -> list[dict]:
    """The 4 rows of one global batch: padded single samples, or packed bins."""
    gen = torch.Generator().manual_seed(100 + step)
    rows = []
    for index in range(GLOBAL_ROWS):
        tokens = torch.randint(0, vocab, (SEQ,), generator=gen)
        if not packed:
            rows.append(_row(tokens, PADDED_LENGTHS[index], torch.arange(SEQ)))
            continue
        lengths = PACKED_SEGMENTS[index]
        real = sum(lengths)
        segments = lengths + ([SEQ - real] if real < SEQ else [])
        position_ids = torch.cat([torch.arange(n) for n in segments])
        row = _row(tokens, real, position_ids)
        row["segments"] = torch.tensor(segments)
        row["attention_mask"] = block_causal(row["segments"])
        rows.append(row)
    return rows


def block_causal(segments: torch.Tensor) -> torch.Tensor:
    """[1, S, S] bool, True = masked out: causal within each segment only."""
    ids = torch.repeat_interleave(torch.arange(segments.numel()), segments)
    allowed = (ids[:, None] == ids[None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    return ~allowed.unsqueeze(0)


def collate(rows: list[dict]) -> dict:
    """Stacks rows into a micro-batch; packed rows get cu_seqlens over the b * S tokens."""
    batch = {
        k: torch.stack([r[k] for r in rows])
        for k in ("tokens", "labels", "loss_mask", "position_ids", "token_mask", "attention_mask")
    }
    if "segments" in rows[0]:
        lengths = torch.cat([r["segments"] for r in rows])
        batch["cu_seqlens"] = torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return batch


def micro_batches(rows: list[dict], *, dp_rank: int, dp: int, mbs: int) -> list[dict]:
    per_rank = len(rows) // dp
    mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [collate(mine[i : i + mbs]) for i in range(0, per_rank, mbs)]


def forward_step(data_iterator, model):
    """lm_forward_step without THD params: megatron's local (CPU) attention takes the
    block-causal mask; LongAct still reads cu_seqlens from the observed batch."""
    from megatron_longact.runtime.forward import lm_forward_step

    batch = next(data_iterator)
    plain = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
    return lm_forward_step(iter([plain]), model)


def train_steps(
    state, controller, *, steps: int, packed: bool, mbs: int, first_step: int = 0
) -> list:
    from megatron_longact.runtime.train_step import train_step

    results = []
    for step in range(first_step, first_step + steps):
        rows = global_rows(step, state.arch.vocab_size, packed=packed)
        micro = micro_batches(rows, dp_rank=state.dims.dp_rank, dp=state.dims.dp, mbs=mbs)
        iterator = iter(micro) if controller is None else controller.observe(iter(micro))
        results.append(
            train_step(
                state,
                forward_step_func=forward_step,
                data_iterator=iterator,
                num_microbatches=len(micro),
                seq_length=SEQ,
                micro_batch_size=mbs,
            )
        )
    return results


# ---- references ---------------------------------------------------------------------------


def reference_saliency(
    rows: list[dict],
    inputs: dict[int, torch.Tensor],
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
) -> dict:
    """Eq. 2 by the definition, one sample at a time, from unsharded weights.

    ``inputs[layer]``: the ``linear_qkv`` input of every global row, [rows, S, h]. Returns
    {layer: [(N + 2G) * D]} float64 = mean over samples of sqrt(sum over real tokens of X^2).
    """
    out = {}
    for number, x in inputs.items():
        weight, bias = qkv[number]
        activations = x.double() @ weight.double().t()
        if bias is not None:
            activations = activations + bias.double()
        roots = []
        for index, row in enumerate(rows):
            segments = row.get("segments", torch.tensor([SEQ]))
            start = 0
            for length in segments.tolist():
                real = row["token_mask"][start : start + length].bool()
                if real.any():
                    tokens = activations[index, start : start + length][real]
                    roots.append(tokens.pow(2).sum(dim=0).sqrt())
                start += length
        out[number] = torch.stack(roots).mean(dim=0)
    return out


class InputCapture:
    """Test-side forward hooks: each linear_qkv's input per fire, and how often it fired."""

    def __init__(self, state) -> None:
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.fires: dict[int, int] = {}
        self.handles = [
            qkv.register_forward_hook(self._hook(n)) for n, qkv in qkv_modules(state).items()
        ]

    def _hook(self, number):
        def hook(_module, args, _output):
            self.fires[number] = self.fires.get(number, 0) + 1
            if torch._C._current_graph_task_id() == -1:
                # [s, b, h] -> [b, s, h]
                self.inputs.setdefault(number, []).append(args[0].detach().transpose(0, 1).clone())

        return hook

    def rows(self) -> dict[int, torch.Tensor]:
        return {n: torch.cat(chunks) for n, chunks in self.inputs.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
