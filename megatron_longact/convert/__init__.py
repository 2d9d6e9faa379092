"""``longact convert``: Hugging Face <-> megatron checkpoint conversion (Qwen3, Qwen3-MoE, Qwen2,
Llama).

* :mod:`hf_import`: import at any TP/PP/EP, every rank streaming only its slices, then one save.
* :mod:`mcore_to_hf`: export in one process, layer by layer.
* :mod:`cli`: ``longact convert``.

The command, one floor above the runtime (it uses its launcher and ``checkpoint/``). The weight
mapping and the streaming loader it builds on live in ``models/hf_weights/``, below the runtime,
where a run started from ``model.hf_path`` and the rollout refit use them too.
"""
