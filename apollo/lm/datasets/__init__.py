"""The multiple-choice logical-reasoning sets APOLLO is fine-tuned and evaluated on.

- `multiple_choice`: readers of ReClor, LogiQA and LogiQA 2.0 split files, the
  (context, question + option) recipe and ReClor's leaderboard helpers.
- `logic_mc`: a generated stand-in in ReClor's format (no third-party text).
- `tfds_builders`: TFDS builders over the readers (manual download, ArrayRecord).
"""
