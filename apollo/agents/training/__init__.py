"""Training on masked trajectories: the sample type and its file format (`samples`),
episode collection and demo data (`collect`), and the SFT trainer (`sft`)."""
