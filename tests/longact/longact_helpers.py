"""Shared pieces of the LongAct tests: tiny models, the global batches, a train loop, a test-side
input capture and Eq. 2 by the definition. Plain functions; importable by spawned children."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from equivalence import ADAM_EPS_OVERRIDE

from megatron_longact.config import JobConfig, load_config

PerLayer = dict[int, dict[str, torch.Tensor]]
"""{layer number: {projection "q"/"k"/"v": tensor}}: saliency [heads, D] or masks bool [heads, D]."""

SEQ = 32
SEED = 1234
LR = 1e-3
WEIGHT_DECAY = 0.1
BASE = [
    "model.preset=micro-qwen3",
    f"optim.lr={LR}",
    ADAM_EPS_OVERRIDE,  # parallel vs single-process parameters stay comparable (tests/equivalence.py)
    "optim.warmup_steps=0",
    "optim.lr_decay_style=constant",
    f"optim.weight_decay={WEIGHT_DECAY}",
    "train.train_steps=8",
]
PADDED_LENGTHS = [32, 20, 9, 27]
"""Real tokens of the 4 padded rows of a global batch."""
PACKED_SEGMENTS = [[10, 14], [32], [5, 7, 9], [20]]
"""Real samples per packed bin of a global batch; the rest of each bin is padding."""


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


_PARALLEL: dict = {}
"""{"config": ParallelConfig, "dims": ParallelDims} of the parallel state this process holds."""


def reinit(job: JobConfig):
    """megatron's parallel state for ``job.parallel`` in this world (rebuilt only when it
    changes: a rebuild is a round of collective group creations on every rank)."""
    from megatron.core import parallel_state

    from megatron_longact.runtime.distributed import init_distributed

    if parallel_state.model_parallel_is_initialized():
        if _PARALLEL.get("config") == job.parallel:
            return _PARALLEL["dims"]
        parallel_state.destroy_model_parallel()
    _PARALLEL.update(config=job.parallel, dims=init_distributed(job.parallel, seed=SEED))
    return _PARALLEL["dims"]


def build(job: JobConfig):
    """A fresh TrainState for ``job`` (parallel state included) whose initial weights depend
    only on the seed, not on what ran before in the world."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_longact.runtime.setup import setup_train_state

    dims = reinit(job)
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
            gather_tensor_parallel(bias) if isinstance(bias, torch.nn.Parameter) else None,
        )
    return out


# ---- batches ------------------------------------------------------------------------------


def row_segments(*, packed: bool) -> tuple[torch.Tensor, list[list[int]]]:
    """The global batch's token mask [4, SEQ] (1 = real) and each row's segment lengths
    (packed: the samples, then the padding as one more segment)."""
    token_mask = torch.zeros(len(PADDED_LENGTHS), SEQ)
    segments = []
    for index, lengths in enumerate(PACKED_SEGMENTS if packed else PADDED_LENGTHS):
        real = sum(lengths) if packed else lengths
        token_mask[index, :real] = 1.0
        segments.append(([*lengths] + ([SEQ - real] if real < SEQ else [])) if packed else [SEQ])
    return token_mask, segments


def block_causal(segments: list[int]) -> torch.Tensor:
    """[1, S, S] bool, True = masked out: causal within each segment only."""
    ids = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(segments))
    allowed = (ids[:, None] == ids[None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    return ~allowed.unsqueeze(0)


def global_rows(step: int, vocab: int, *, packed: bool) -> list[dict]:
    """The 4 rows of one global batch: padded single samples, or packed bins with position
    ids restarting per sample. Masks are explicit: megatron's default causal one is built with
    device="cuda", which the CPU bridge cannot rewrite inside backward (full recompute)."""
    gen = torch.Generator().manual_seed(100 + step)
    token_mask, segments = row_segments(packed=packed)
    rows = []
    for mask, lengths in zip(token_mask, segments):
        tokens = torch.randint(0, vocab, (SEQ,), generator=gen)
        rows.append({
            "tokens": tokens,
            "labels": torch.roll(tokens, -1),
            "loss_mask": mask.clone(),
            "position_ids": torch.cat([torch.arange(n) for n in lengths]),
            "token_mask": mask,
            "attention_mask": block_causal(lengths),
            "segments": torch.tensor(lengths),
        })  # fmt: skip
    return rows


def micro_batches(rows: list[dict], *, dp_rank: int, dp: int, mbs: int, packed: bool) -> list:
    """This DP rank's share of ``rows``, stacked into micro-batches of ``mbs``; packed ones get
    cu_seqlens over their b * S tokens."""
    per_rank = len(rows) // dp
    mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    out = []
    for i in range(0, per_rank, mbs):
        group = mine[i : i + mbs]
        batch = {k: torch.stack([r[k] for r in group]) for k in group[0] if k != "segments"}
        if packed:
            lengths = torch.cat([r["segments"] for r in group])
            batch["cu_seqlens"] = torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32)
        out.append(batch)
    return out


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
    """``steps`` train steps on global batches ``first_step``...; their TrainStepResults."""
    from megatron_longact.runtime.train_step import train_step

    results = []
    for step in range(first_step, first_step + steps):
        rows = global_rows(step, state.arch.vocab_size, packed=packed)
        micro = micro_batches(rows, dp_rank=state.dims.dp_rank, dp=state.dims.dp, mbs=mbs,
                              packed=packed)  # fmt: skip
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


class InputCapture:
    """Test-side forward hooks: each linear_qkv's input per no-grad-replay forward, and how
    often it fired (full recompute fires it twice per micro-batch)."""

    def __init__(self, state) -> None:
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.fires: dict[int, int] = {}
        self.handles = [
            qkv.register_forward_hook(self._hook(n)) for n, qkv in qkv_modules(state).items()
        ]

    def _hook(self, number):
        def hook(_module, args, _output):
            self.fires[number] = self.fires.get(number, 0) + 1
            if torch._C._current_graph_task_id() == -1:  # not a recompute inside backward
                # [s, b, h] -> [b, s, h]
                self.inputs.setdefault(number, []).append(args[0].detach().transpose(0, 1).clone())

        return hook

    def rows(self) -> dict[int, torch.Tensor]:
        """{layer: [rows, S, h]} in the order the micro-batches ran."""
        return {n: torch.cat(chunks) for n, chunks in self.inputs.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---- Eq. 2 by the definition --------------------------------------------------------------


def sample_roots(
    acts_bsr: torch.Tensor, token_mask_bs: torch.Tensor, segments: list[list[int]]
) -> torch.Tensor:
    """sqrt(sum over a sample's real tokens of X^2), one sample at a time with Python loops:
    [samples with real tokens, R] float64. ``segments``: each row's sample lengths."""
    roots = []
    for b, lengths in enumerate(segments):
        start = 0
        for length in lengths:
            real = token_mask_bs[b, start : start + length].bool()
            if real.any():
                tokens = acts_bsr[b, start : start + length][real]
                roots.append(tokens.double().pow(2).sum(dim=0).sqrt())
            start += length
    return torch.stack(roots)


def reference_saliency(observed: dict, *, packed: bool) -> PerLayer:
    """M by the definition for a saliency probe's step on global batch 0 (longact_worlds):
    the captured qkv inputs of all 4 rows times the unsharded weights, per sample, then the
    mean over samples, split per head by the probe's layout."""
    token_mask, segments = row_segments(packed=packed)
    out = {}
    for number, x in observed["inputs"].items():
        weight, bias = observed["weights"][number]
        activations = x.double() @ weight.double().t()
        if bias is not None:
            activations = activations + bias.double()
        mean = sample_roots(activations, token_mask, segments).mean(dim=0)
        out[number] = observed["layout"].per_head(mean.float())
    return out


def cp_reduction_batches() -> list[dict]:
    """Hand-made micro-batches for the CP=2 reduction, whole (before any CP cut): two padded
    ones, b = 3, S = 16 (real tokens per row 16/5/0 and 3/16/11), then one packed THD row of
    segments (padded length, real tokens) (8, 2), (12, 12), (4, 0), each padded to a multiple
    of 2 x CP. Keys: ``token_mask`` [b, S], ``acts`` {layer 3, 5: [b, S, R = 12]}, and for the
    THD row ``cu_seqlens``."""
    gen = torch.Generator().manual_seed(7)
    batches = []
    for real in ([16, 5, 0], [3, 16, 11]):
        token_mask = (torch.arange(16)[None, :] < torch.tensor(real)[:, None]).float()
        batches.append({"token_mask": token_mask})
    segments = [(8, 2), (12, 12), (4, 0)]
    token_mask = torch.cat([(torch.arange(length) < real).float() for length, real in segments])
    lengths = torch.tensor([length for length, _ in segments])
    cu_seqlens = torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32)
    batches.append({"token_mask": token_mask[None, :], "cu_seqlens": cu_seqlens})
    for batch in batches:
        b, s = batch["token_mask"].shape
        batch["acts"] = {n: torch.randn(b, s, 12, generator=gen) for n in (3, 5)}
    return batches
