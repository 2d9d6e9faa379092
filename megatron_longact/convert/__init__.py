"""Hugging Face <-> megatron checkpoint conversion (Qwen3, Qwen2, Llama).

* :mod:`mapping`: names and tensor layouts (fused QKV per query group, [gate; up], vocab padding).
* :mod:`hf_files`: lazy safetensors reading, bounded-size shard writing.
* :mod:`hf_to_mcore`: import at any TP/PP, every rank reading only its slices.
* :mod:`mcore_to_hf`: export in one process, layer by layer.
* :mod:`cli`: ``longact convert``.

A top-level package, not under ``models/``: it imports the runtime (``runtime.launch``,
``runtime.distributed``) and ``models/``, and ``models/`` imports neither, so imports run downward.
"""
