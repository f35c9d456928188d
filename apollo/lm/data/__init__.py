"""APOLLO's pretraining data: documents -> logic sentences -> S-MLM + E-CLS batches.

- `text_sources`: where documents come from (text, JSON lines, TFDS, generated);
  `generated_corpus`: the project's own seeded corpus of logical passages.
- `keywords`: the logical-inference keywords and their matcher; `selection`: the
  streaming, resumable job that keeps the sentences holding one.
- `tagging`: part-of-speech tags; `masking`: S-MLM's selective masking;
  `negatives`: E-CLS's perturbed (contradiction-type) sentences.
- `pipeline`: the grain input pipeline that makes the trainer's batches.

Method: Sanyal et al., "APOLLO: A Simple Approach for Adaptive Pretraining of Language
Models for Logical Reasoning", ACL 2023.
"""
