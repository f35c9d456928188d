"""Supervision of rollouts: judging every action keep or mask (`judging`, with an
LLM judge in `llm_judge`), the per-judge label table (`labels`), and a simulated
human supervisor for experiments (`simulated_human`)."""
