"""Native generation with the megatron policy itself: no weight copy, KV cache, batched.

Prompts are left-padded so every row decodes in lockstep; a padding-aware causal mask keeps pads
out of attention. The KV cache is megatron's ``StaticInferenceContext`` holding rotated keys
(:mod:`rl.rollout.kv_cache`: each key is rotated once, not at every step), and megatron's local
attention reads it once per query group instead of copying K/V to every head. At TP=1 the
parallel linears skip their (identity) TP regions (:func:`_tp1_linears`) and split a decode
step's matmul over 512-row tiles of the weight (:func:`_linear`), and with megatron's local
attention the decode steps run under ``torch.inference_mode`` (:func:`_only_local_attention`)
and through each layer's modules without the layer's training bookkeeping
(:mod:`rl.rollout.decode_layer`). Works on CPU (local attention) and GPU, at any TP, with
sequence parallel, and under context parallel; pipeline parallel generation is not supported
(use vLLM for PP > 1).

Per decode step the loop keeps everything on the device: sampling (the generator lives on the
device), the log-probs, and the stop-token / stop-sequence check (:class:`stops.StopTable`). The
host looks every ``SYNC_EVERY_CUDA`` steps on GPU (every step on CPU, where looking is free) to
end the batch once every row has stopped, and every ``TEXT_CHECK_EVERY`` steps to find stop
strings in the decoded tails (:func:`stops.first_text_stop`). A row that stops between looks
runs on for a few tokens that are cut afterwards: rows never influence each other, and each
batch has its own generator, so the outputs do not depend on when the host looks.

Layouts, all inside :meth:`NativeEngine.generate`:

* sequence parallel: switched off for generation (one-token steps cannot be split over TP) with
  megatron's ``set_model_to_sequence_parallel``, as megatron's own text generation controller
  does for non-MoE layers (``inference/text_generation_controllers/
  text_generation_controller.py`` ~1113-1125), and restored afterwards;
* context parallel: each CP rank generates whole sequences of its own (the caller splits the
  prompts, :func:`rl.experience.generate_groups`), so attention runs as plain local attention
  (``models.cp_attention.local_attention_only``) and RoPE is not cut per CP rank (GPTModel's
  rotary module would cut its table, ``rotary_pos_embedding.py`` ~199-204).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_longact.device import current_device
from megatron_longact.errors import UserError
from megatron_longact.rl.rollout.decode_layer import lean_decode_layers
from megatron_longact.rl.rollout.kv_cache import (
    attention_modules,
    grouped_query_attention,
    has_local_attention,
    rotated_key_cache,
)
from megatron_longact.rl.rollout.stops import (
    StopTable,
    first_text_stop,
    response_text,
    tail_tokens,
)
from megatron_longact.rl.rollout.types import Rollout, SamplingParams
from megatron_longact.runtime import cpu_compat
from megatron_longact.runtime.mcore_compat import patched_methods

SYNC_EVERY_CUDA = 8
"""Decode steps between the host's looks at the "all rows stopped" flag on GPU."""
TEXT_CHECK_EVERY = 8
"""Decode steps between decoded-tail stop-string checks (the host decodes each row's tail)."""
NOT_GENERATED = -2
"""Token id that fills the stop window left of the first response token (matches no stop)."""


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples one token per row from ``logits`` [b, V] (fp32).

    Returns ``(tokens [b] int64, logprobs [b])`` where the log-probability is under the
    temperature-scaled distribution (before top-p truncation, as verl/vLLM report it).
    ``temperature`` 0 is greedy decoding (log-probs then at temperature 1). ``generator`` is on
    the device of ``logits`` (no host round trip).
    """
    if temperature == 0:
        logprobs_all = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs_all = torch.log_softmax(logits / temperature, dim=-1)
    probs = logprobs_all.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


def batch_seed(seed: int, batch_index: int) -> int:
    """Generator seed of batch ``batch_index`` of a ``generate`` call (batch 0: ``seed``)."""
    return seed if batch_index == 0 else (seed * 1_000_003 + batch_index) % (2**63 - 1)


class NativeEngine:
    """Generates with a (DDP-wrapped) megatron GPTModel chunk. See module docstring.

    ``tokenizer`` (a Hugging Face tokenizer) is needed for stop strings: the decoded-tail check
    and the response text the reward sees.
    """

    def __init__(self, model, *, pad_token_id: int, batch_size: int = 64, tokenizer=None):
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise UserError(
                "rl.engine=native does not support pipeline parallel; use "
                "parallel.pipeline_model_parallel_size=1 or rl.engine=vllm"
            )
        from megatron_longact.runtime.setup import unwrap_gpt

        self.model = unwrap_gpt(model)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sync_every = SYNC_EVERY_CUDA if self.device == "cuda" else 1
        # MoE with expert parallel: a forward is an all-to-all over the EP ranks, which hold
        # different prompts, so every rank must run the same batches and decode steps
        # (:func:`_lockstep_group`); the dispatcher also allocates through the CPU bridge.
        self.lockstep = _lockstep_group(self.model)
        # An MoE layer needs the bridge even at EP=1: megatron's router moves its weight to
        # torch.cuda.current_device() in every forward (transformer/moe/router.py ~88-92).
        self.bridge_free_decode = (
            parallel_state.get_tensor_model_parallel_world_size() == 1
            and self.lockstep is None
            and getattr(self.model.config, "num_moe_experts", None) is None
        )
        self.inference_mode_decode = self.bridge_free_decode and _only_local_attention(self.model)
        self.num_generated = 0

    def sleep(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Nothing to do: the engine reads the trainer's parameters directly."""

    def close(self) -> None:
        """Nothing to do: the engine holds no resources of its own."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """One response per prompt, in input order; batches of ``batch_size``. All TP ranks of
        a replica call it with the same prompts and params (TP collectives in the forward)."""
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer: NativeEngine(..., tokenizer=)")
        results: list[Rollout] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with _generation_layout(self.model):
                starts = range(0, len(prompts), self.batch_size)
                for index in range(_lockstep_count(len(starts), self.lockstep)):
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed(batch_seed(params.seed, index))
                    if index >= len(starts):  # only to keep the EP all-to-alls paired
                        # (a rank may hold no prompt at all: fewer prompts than DP replicas)
                        self._generate_batch(prompts[:1] or [[self.pad_token_id]], params,
                                             generator)  # fmt: skip
                        continue
                    chunk = prompts[starts[index] : starts[index] + self.batch_size]
                    results.extend(self._generate_batch(chunk, params, generator))
        finally:
            self.model.train(was_training)
        self.num_generated += len(results)
        return results

    @torch.no_grad()
    def _generate_batch(self, prompts, params: SamplingParams, generator) -> list[Rollout]:
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, new = len(prompts), params.max_new_tokens
        prompt_len = max(len(p) for p in prompts)
        total = prompt_len + new
        tokens = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros(batch, total, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, prompt_len - len(prompt) : prompt_len] = torch.tensor(prompt)
            valid[row, prompt_len - len(prompt) : prompt_len] = True
        valid[:, prompt_len:] = True  # generated positions; finished rows are cut afterwards
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        tokens, valid, positions = (t.to(self.device) for t in (tokens, valid, positions))
        table = StopTable(params.stop_token_ids, params.stop_sequences, device=self.device)
        # Response tokens with width-1 non-generated slots in front: the stop window of step i
        # is window[:, i : i + width].
        window = torch.full((batch, table.width - 1 + new), NOT_GENERATED, dtype=torch.long,
                            device=self.device)  # fmt: skip
        text_stops = TextStops(self, params, prompt_len=prompt_len)

        context = StaticInferenceContext(batch, total)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        lengths = torch.full((batch,), new, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(batch, new, device=self.device)
        start, end = 0, prompt_len
        with contextlib.ExitStack() as decode_steps:
            for step in range(new):
                if step == 1 and self.bridge_free_decode:
                    # After the prompt step a TP=1 decode step asks nothing of CUDA (megatron's
                    # lru_cache holds RoPE's table, the KV cache exists; TP's gathers would
                    # allocate on "the current CUDA device"), and the CPU bridge's per-call
                    # Python dispatch would cost more than the small kernels.
                    decode_steps.enter_context(cpu_compat.suspended())
                if step == 1 and self.inference_mode_decode:
                    # No version counters or autograd bookkeeping: ~15% less per small op,
                    # ~6% of a SmolLM2 decode step on CPU. Safe only because every tensor a
                    # decode step creates dies with the batch (:func:`_only_local_attention`).
                    decode_steps.enter_context(torch.inference_mode())
                logits = self.model(
                    input_ids=tokens[:, start:end],
                    position_ids=positions[:, start:end],
                    attention_mask=_padded_causal_mask(valid, start, end),
                    inference_context=context,
                    runtime_gather_output=True,
                )
                context.sequence_len_offset += end - start
                next_tokens, next_logprobs = sample_next(
                    logits[:, -1].float(),
                    temperature=params.temperature,
                    top_p=params.top_p,
                    generator=generator,
                )
                next_tokens = torch.where(finished, self.pad_token_id, next_tokens)
                tokens[:, end] = next_tokens
                logprobs[:, step] = next_logprobs
                window[:, table.width - 1 + step] = next_tokens
                just_stopped = ~finished & table.matches(window[:, step : step + table.width])
                lengths = torch.where(just_stopped, step + 1, lengths)
                finished |= just_stopped
                last = step == new - 1
                if (step + 1) % TEXT_CHECK_EVERY == 0 or last:
                    text_stops.check(tokens, end=end + 1, finished=finished, lengths=lengths)
                if ((step + 1) % self.sync_every == 0 or last) and _all_stopped(
                    finished, self.lockstep
                ):
                    break
                start, end = end, end + 1
            # Inside the decode context: it updates ``lengths`` (made there) in place.
            text_stops.check(tokens, end=prompt_len + step + 1, finished=finished, lengths=lengths)
        responses = tokens[:, prompt_len:].cpu()
        lengths_host, logprobs_host = lengths.cpu().tolist(), logprobs.cpu()
        stopped = finished.cpu().tolist()
        rollouts = []
        for row, prompt in enumerate(prompts):
            n = lengths_host[row]
            ids = responses[row, :n].tolist()
            rollouts.append(
                Rollout(
                    prompt_ids=list(prompt),
                    response_ids=ids,
                    logprobs=logprobs_host[row, :n].tolist(),
                    finish_reason="stop" if stopped[row] else "length",
                    text=response_text(self.tokenizer, ids, stop_strings=params.stop_strings)
                    if params.stop_strings
                    else None,
                )
            )
        return rollouts


class TextStops:
    """The host's decoded-tail check of one batch: rows whose text reached a stop string."""

    def __init__(self, engine: NativeEngine, params: SamplingParams, *, prompt_len: int):
        self.strings = params.stop_strings
        self.tokenizer = engine.tokenizer
        self.prompt_len = prompt_len
        self.window = tail_tokens(self.strings)
        self.checked = 0  # response tokens already searched

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def check(self, tokens, *, end: int, finished, lengths) -> None:
        """Ends rows whose response ``tokens[:, prompt_len:end]`` reaches a stop string in its
        unsearched part, at the exact token, unless they stopped earlier (``finished`` and
        ``lengths`` are updated in place). One device->host copy of the new stretch."""
        if not self.strings or end - self.prompt_len <= self.checked:
            return
        left = max(0, self.checked - self.window)
        stretch = tokens[:, self.prompt_len + left : end].cpu().tolist()
        limits = lengths.cpu().tolist()
        for row, ids in enumerate(stretch):
            hit = first_text_stop(self._decode, ids[: limits[row] - left],
                                  stop_strings=self.strings, first=self.checked - left,
                                  window=self.window)  # fmt: skip
            if hit is not None:
                finished[row] = True
                lengths[row] = left + hit
        self.checked = end - self.prompt_len


def _lockstep_group(gpt):
    """The group whose ranks must decode in lockstep: the whole world for a MoE model with
    expert parallel (EP ranks exchange tokens in every forward, and TP/CP peers of different
    EP groups tie those groups together), None otherwise (each replica runs on its own)."""
    from megatron.core import parallel_state

    if getattr(gpt.config, "num_moe_experts", None) is None:
        return None
    if parallel_state.get_expert_tensor_and_model_parallel_world_size() == 1:
        return None
    return dist.group.WORLD


def _lockstep_count(count: int, group) -> int:
    """The largest ``count`` over ``group`` (``count`` itself without one). Collective."""
    if group is None:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=current_device())
    dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
    return int(total.item())


def _all_stopped(finished: torch.Tensor, group) -> bool:
    """Whether every row has stopped, on every rank of ``group`` (collective when set)."""
    if group is None:
        return bool(finished.all())
    running = (~finished).sum().to(torch.int64).reshape(1)
    dist.all_reduce(running, group=group)
    return int(running.item()) == 0


@contextlib.contextmanager
def _generation_layout(gpt) -> Iterator[None]:
    """Rotated-key cache; sequence parallel off; under CP, full local attention and an uncut
    RoPE table (module docstring). Restores the training layout on exit."""
    from megatron.core import parallel_state

    with contextlib.ExitStack() as stack:
        stack.enter_context(rotated_key_cache(gpt))
        stack.enter_context(grouped_query_attention(gpt))
        stack.enter_context(_tp1_linears(gpt))
        stack.enter_context(lean_decode_layers(gpt))
        if gpt.config.sequence_parallel:
            from megatron.core.transformer.utils import set_model_to_sequence_parallel

            set_model_to_sequence_parallel(gpt, False)
            stack.callback(set_model_to_sequence_parallel, gpt, True)
        if parallel_state.get_context_parallel_world_size() > 1:
            from megatron_longact.models.cp_attention import local_attention_only

            stack.enter_context(local_attention_only())
            rotary = getattr(gpt, "rotary_pos_emb", None)
            if rotary is not None and getattr(rotary, "cp_group", None) is not None:
                group, rotary.cp_group = rotary.cp_group, None
                stack.callback(setattr, rotary, "cp_group", group)
                # RotaryEmbedding.forward is lru_cached on its arguments, not on cp_group: drop
                # tables cut for training before, and the uncut ones after.
                type(rotary).forward.cache_clear()
                stack.callback(type(rotary).forward.cache_clear)
        yield


DECODE_TILE_ROWS = 512
"""Output features per matmul when a TP=1 linear sees few tokens (:func:`_linear`)."""
DECODE_MAX_TOKENS = 64
"""Token rows (batch x new tokens) up to which :func:`_linear` tiles the weight."""


def _linear(input_: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``input_ @ weight.t()``: input_ [..., K], weight [N, K] -> [..., N].

    On CPU, with at most ``DECODE_MAX_TOKENS`` token rows (a decode step) and N of at least two
    tiles: one matmul per ``DECODE_TILE_ROWS`` rows of the weight, concatenated. At so few rows
    the CPU BLAS (MKL sgemm in torch 2.13) is much slower on a large N whole than in tiles,
    measured on the 2-core CI machine with 8 rows: SmolLM2's fc1 [3072, 576] 0.90 ms whole,
    0.55-0.70 ms tiled; its LM head [49152, 576] 9-32 ms whole, 6-15 ms tiled (1-2 threads).
    Why is the BLAS's business (packing the whole weight per call, most likely); the whole
    engine's gain is measured by ``benchmarks/rollout_throughput.py``. On GPU one GEMM (tiles
    would only multiply kernel launches). Each output is the same K-long dot product either
    way, but whether the BLAS sums it in the same order is its choice (bitwise equal at these
    tiles there), so the tests hold the engine to megatron's own linears within 1e-5.
    """
    tokens = input_.numel() // input_.size(-1)
    if not weight.is_cpu or tokens > DECODE_MAX_TOKENS or weight.size(0) < 2 * DECODE_TILE_ROWS:
        return torch.matmul(input_, weight.t())
    flat = input_.reshape(tokens, input_.size(-1))
    tiles = [torch.mm(flat, tile.t()) for tile in weight.split(DECODE_TILE_ROWS)]
    return torch.cat(tiles, dim=1).view(*input_.shape[:-1], weight.size(0))


def _column_tp1_forward(self, input_, weight=None, runtime_gather_output=None):
    """``ColumnParallelLinear.forward`` at TP=1 without SP (``tensor_parallel/layers.py``
    ~954-1048): its copy/gather regions are identities there, and the matmul and bias are
    ``LinearWithFrozenWeight``'s (~341-343); the matmul is tiled at decode (:func:`_linear`)."""
    weight = self.weight if weight is None else weight
    output = _linear(input_, weight)
    if self.bias is not None and not self.skip_bias_add:
        output = output + self.bias
    return output, self.bias if self.skip_bias_add else None


def _row_tp1_forward(self, input_):
    """``RowParallelLinear.forward`` at TP=1 without SP (``tensor_parallel/layers.py``
    ~1245-1308): the reduce is an identity, the bias is added after it."""
    output = _linear(input_, self.weight)
    if self.skip_bias_add:
        return output, self.bias
    return (output + self.bias if self.bias is not None else output), None


@contextlib.contextmanager
def _tp1_linears(gpt) -> Iterator[None]:
    """At TP=1, megatron's parallel linears of ``gpt`` (exact types) skip the TP machinery:
    per call it is two autograd-Function applies and a dozen checks, which at one token a
    step cost about as much as the small matmuls themselves. Same ops, same bits."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    config = gpt.config
    if (
        parallel_state.get_tensor_model_parallel_world_size() > 1
        or config.sequence_parallel
        or config.defer_embedding_wgrad_compute
        or config._cpu_offloading_context is not None
    ):
        yield
        return
    forwards = {ColumnParallelLinear: _column_tp1_forward, RowParallelLinear: _row_tp1_forward}
    modules = [m for m in gpt.modules() if type(m) in forwards and not m.explicit_expert_comm]
    with patched_methods(modules, "forward", lambda module: forwards[type(module)]):
        yield


def _only_local_attention(gpt) -> bool:
    """Whether every attention of ``gpt`` uses megatron's local ``DotProductAttention`` (read
    per query group, :func:`kv_cache.grouped_query_attention`).

    Then a decode step (after the prompt step) runs only megatron's local modules and ours, and
    every tensor it makes dies with the batch: the KV cache was made by the prompt step under
    ``no_grad``, the RoPE table too (``RotaryEmbedding.forward`` is an ``lru_cache`` keyed on
    the inference context's ``max_sequence_length``, the same at every step:
    ``rotary_pos_embedding.py`` ~177 and ~241), and the grouped attention allocates its scores
    per call. So the decode steps may run under ``torch.inference_mode``, whose tensors must
    never reach autograd. Other attentions (Transformer Engine's, the CP one) keep caches we
    have not audited, so with them the decode steps stay under ``no_grad``.
    """
    attentions = attention_modules(gpt)
    return bool(attentions) and all(has_local_attention(m) for m in attentions)


def _padded_causal_mask(valid: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[b, 1, end-start, end] bool, True = masked out: causal, and no attention to pads."""
    keys = torch.arange(end, device=valid.device)
    queries = torch.arange(start, end, device=valid.device)
    future = keys[None, :] > queries[:, None]
    return (future[None] | ~valid[:, None, :end]).unsqueeze(1)
