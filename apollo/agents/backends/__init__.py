"""Model backends of the agent loop: the protocol (`base`), backends by name
(`registry`), an OpenAI-compatible client (`openai_chat`) and the project's Flax
policy in process (`flax_policy`)."""
