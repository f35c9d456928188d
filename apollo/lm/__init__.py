"""APOLLO: adaptive pretraining of language models for logical reasoning.

S. Sanyal, Y. Xu, S. Wang, Z. Yang, R. Pryzant, W. Yu, C. Zhu and X. Ren, "APOLLO: A
Simple Approach for Adaptive Pretraining of Language Models for Logical Reasoning",
ACL 2023 (arXiv 2212.09282).

Read in this order:
- `data`: the pretraining data, from documents to batches: `text_sources` and
  `generated_corpus` (documents), `keywords` and `selection` (the logic sentences),
  `tagging`, `masking` (S-MLM) and `negatives` (E-CLS), and `pipeline` (batches).
- `datasets`: the downstream multiple-choice sets: the ReClor / LogiQA readers
  (`multiple_choice`), the generated logic set (`logic_mc`), TFDS builders
  (`tfds_builders`).
- `pretrain` and `finetune`: the two trainers; `configs/`: their configs.
The encoder they train is `apollo.models.roberta`.
"""
