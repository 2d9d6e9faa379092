"""Hugging Face <-> megatron weights, below the runtime: the name and layout mapping, lazy
safetensors reading, and the streaming loader an HF-started run and the rollout refit use.

* :mod:`mapping`: names and tensor layouts (fused QKV per query group, [gate; up], vocab padding).
* :mod:`hf_files`: lazy safetensors reading, bounded-size shard writing.
* :mod:`hf_to_mcore`: streams an HF folder's tensors into this rank's GPTModel chunk.
* :mod:`progress`: a progress bar that costs nothing when disabled.

``convert/`` (the ``longact convert`` command) builds on these.
"""
