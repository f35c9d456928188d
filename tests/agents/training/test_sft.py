"""Agent-policy SFT: packing, segment-isolated attention, masked loss, resume.

* `pack_samples` keeps every sample's tokens, loss mask, segment and positions;
* the logits of a packed row equal those of its samples run one by one (no
  attention across packed samples);
* the loss sees only masked-in targets;
* end to end on the 8-device CPU mesh, from a tiny random Llama checkpoint with a
  Jinja template (SmolLM2's): the loss falls, SIGTERM at step 3 then a rerun ends
  with exactly the parameters of an uninterrupted run, and the exported policy is a
  checkpoint `apollo.models.load` reads (weights, tokenizer, template);
* from scratch, the export is a 'flax' backend checkpoint; from SmolLM2 itself, a
  slow smoke test.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apollo import models
from apollo.agents.backends import registry
from apollo.agents.configs import sft as agent_sft_config
from apollo.agents.training import samples as samples_lib
from apollo.agents.training import sft
from apollo.models import chat_template, inference
from apollo.models import registry as model_registry
from apollo.models.llama import model as decoder
from tests.agents.backends import native_helpers


def _samples(lengths, seed=0, vocab=60):
  rng = np.random.default_rng(seed)
  out = []
  for n in lengths:
    mask = np.zeros(n, bool)
    mask[n // 2 :] = True
    out.append(samples_lib.Sample(rng.integers(3, vocab, n).astype(np.int32), mask))
  return out


def test_pack_keeps_masks_segments_and_positions():
  samples = _samples([5, 7, 4, 9, 20])
  packed = sft.pack_samples(samples, seq_len=16, pad_id=1)
  assert int(packed["truncated"]) == 1  # The 20-token sample keeps its last 16.
  found = []
  for r in range(len(packed["input_ids"])):
    seg = packed["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert np.all(np.diff(where) == 1)
      found.append(
        (
          packed["input_ids"][r, where],
          packed["weights"][r, where],
          packed["targets"][r, where],
          packed["positions"][r, where],
        )
      )
    assert np.all(packed["input_ids"][r][seg == 0] == 1)
    assert np.all(packed["weights"][r][seg == 0] == 0)
  assert len(found) == len(samples)
  for sample, (ids, weights, targets, positions) in zip(samples, found):
    want_ids, want_mask = sample.input_ids[-16:], sample.loss_mask[-16:]
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(positions, np.arange(len(ids)))
    np.testing.assert_array_equal(targets[:-1], want_ids[1:])
    np.testing.assert_array_equal(weights, np.append(want_mask[1:], False).astype(np.float32))


def test_stream_is_deterministic_and_resumable():
  samples = _samples([5, 7, 4, 9, 6, 3, 8], seed=1)
  a = sft.PackedRowStream(samples, 16, 3, seed=0)
  batches = [next(a) for _ in range(5)]
  b = sft.PackedRowStream(samples, 16, 3, seed=0)
  next(b), next(b)
  state = b.get_state()
  c = sft.PackedRowStream(samples, 16, 3, seed=0)
  c.set_state(state)
  for want in batches[2:]:
    got = next(c)
    for k in sft.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])


def _tiny_model():
  config = decoder.get_config("tiny", vocab_size=64, max_position_embeddings=64)
  return decoder.Decoder(config, rngs=nnx.Rngs(0))


def test_packed_logits_equal_unpacked():
  model = _tiny_model()
  samples = _samples([6, 9, 5], seed=2)
  packed = sft.pack_samples(samples, seq_len=24)
  assert len(packed["input_ids"]) == 1
  batch = {k: jnp.asarray(packed[k]) for k in sft.BATCH_KEYS}
  logits = np.asarray(sft.packed_logits(model, batch))[0]
  for s, sample in enumerate(samples, start=1):
    alone, _ = model(jnp.asarray(sample.input_ids)[None])
    where = packed["segment_ids"][0] == s
    np.testing.assert_allclose(logits[where], np.asarray(alone)[0], atol=2e-5, rtol=2e-5)


def test_loss_only_on_masked_tokens():
  model = _tiny_model()
  packed = sft.pack_samples(_samples([6, 9, 5], seed=3), seq_len=24)
  batch = {k: jnp.asarray(packed[k]) for k in sft.BATCH_KEYS}
  sums = sft.loss_sums(model, batch)
  assert float(sums["count"]) == float(packed["weights"].sum())
  # Changing the targets outside the mask changes nothing.
  other = np.where(packed["weights"] > 0, packed["targets"], (packed["targets"] + 5) % 64)
  changed = sft.loss_sums(model, dict(batch, targets=jnp.asarray(other)))
  np.testing.assert_allclose(float(changed["loss_sum"]), float(sums["loss_sum"]), rtol=1e-6)
  # And the sum equals the masked cross-entropy computed by hand.
  logits = np.asarray(sft.packed_logits(model, batch), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, packed["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(sums["loss_sum"]), (nll * packed["weights"]).sum(), rtol=1e-4)


# SmolLM2's template: a default system prompt, no tools, no tool calls, no tool role.
SMOLLM2_STYLE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM<|im_end|>\\n' }}"
  "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
  " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
  "{% endif %}"
)


def _chat_samples(template, n=24):
  """Native tool-call conversations (OpenAI format), rendered with `template`."""
  out = []
  for i in range(n):
    call = {
      "id": f"call_{i}",
      "type": "function",
      "function": {"name": "check_run", "arguments": f'{{"run_id": "r{i % 3}"}}'},
    }
    messages = [
      {"role": "user", "content": f"[clock {i}.00h / 24h | submissions left: 3]"},
      {"role": "assistant", "content": "Checking the run.", "tool_calls": [call]},
      {"role": "tool", "tool_call_id": f"call_{i}", "content": f"run r{i % 3}: status=running"},
      {"role": "assistant", "content": "It is running; sleeping."},
    ]
    r = template.render(messages)
    out.append(samples_lib.Sample(r.ids, r.loss_mask, r.roles, r.segments))
  return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A tiny random Llama as a Hugging Face directory, with SmolLM2's Jinja template."""
  path = tmp_path_factory.mktemp("tiny-llama")
  tokenizer = chat_template.train_chat_tokenizer(vocab_size=300)
  return native_helpers.write_tiny_llama(path, tokenizer, SMOLLM2_STYLE)


def _config(steps=6, init_from=""):
  c = agent_sft_config.get_config("quickstart")
  c.init_from = init_from
  c.train_steps = steps
  c.log_every = 2
  c.eval_every = 3
  c.checkpoint_every = 100
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.optimizer.warmup_steps = 2
  return c


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["loss"] for r in rows if r["split"] == "train"]


def test_sft_from_a_checkpoint_resumes_exactly_and_exports_a_loadable_policy(
  tmp_path, tiny_checkpoint
):
  assert jax.device_count() == 8
  template = sft.checkpoint_template(tiny_checkpoint)
  assert template.source == SMOLLM2_STYLE
  samples = _chat_samples(chat_template.from_pretrained(tiny_checkpoint, tool_call_format="hermes"))
  train, held = samples[:20], samples[20:]
  config = _config(init_from=tiny_checkpoint)
  kwargs = dict(samples=train, eval_samples=held)  # Tokenizer and template: init_from's.
  straight = sft.train_and_evaluate(config, str(tmp_path / "a"), **kwargs)
  assert straight["step"] == 6 and straight["train"]["loss"] > 0
  losses = _train_losses(tmp_path / "a")
  assert len(losses) == 3 and losses[-1] < losses[0]  # It learns (from the checkpoint).

  def preempt_at_3(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = str(tmp_path / "b")
  first = sft.train_and_evaluate(config, workdir, on_step=preempt_at_3, **kwargs)
  assert first["preempted"] and first["step"] == 3 and not first["policy_dir"]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  second = sft.train_and_evaluate(config, workdir, **kwargs)
  assert second["step"] == 6 and not second["preempted"]

  model_a, _ = sft.load_policy(straight["policy_dir"])
  model_b, _ = sft.load_policy(second["policy_dir"])
  for x, y in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The export is a checkpoint apollo.models.load reads: weights, tokenizer, template.
  policy = models.load(second["policy_dir"])
  assert policy.family == "decoder" and policy.chat_template == SMOLLM2_STYLE
  assert json.loads((tmp_path / "b" / "policy" / "config.json").read_text())["eos_token_id"] == 2
  for x, y in zip(jax.tree.leaves(nnx.state(policy.model)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  messages = [{"role": "user", "content": "hi"}]
  assert inference.render_prompt(policy, messages) == list(
    template.render(messages, add_generation_prompt=True).ids
  )


def test_samples_of_another_tokenizer_are_refused(tmp_path, tiny_checkpoint):
  other = chat_template.ChatTemplate(chat_template.train_chat_tokenizer(vocab_size=280))
  other.save_pretrained(tmp_path / "other")
  with pytest.raises(ValueError, match="vocabulary"):
    sft.train_and_evaluate(
      _config(init_from=tiny_checkpoint),
      str(tmp_path / "w"),
      samples=_chat_samples(other),
      tokenizer_path=str(tmp_path / "other"),
    )


def test_sft_from_scratch_exports_a_flax_backend_policy(tmp_path):
  """A random decoder with ChatML over a demo BPE: the toy policies' path."""
  template = chat_template.ChatTemplate(chat_template.train_chat_tokenizer(vocab_size=300))
  template.save_pretrained(tmp_path / "tokenizer")
  result = sft.train_and_evaluate(
    _config(steps=2),
    str(tmp_path / "w"),
    samples=_chat_samples(template, n=8),
    tokenizer_path=str(tmp_path / "tokenizer" / "tokenizer.json"),
  )
  assert models.load(result["policy_dir"]).chat_template == chat_template.CHATML_TEMPLATE
  # The export is a checkpoint of the 'flax' rollout backend.
  backend = registry.make_backend(
    "flax", seed=0, checkpoint=result["policy_dir"], max_new_tokens=4, prompt_bucket=32
  )
  text = backend.complete([{"role": "user", "content": "hi"}]).text
  assert isinstance(text, str)


@pytest.mark.slow
def test_sft_from_smollm2_smoke(tmp_path):
  """Two full fine-tuning steps of SmolLM2-135M-Instruct through the entry point, on demo
  samples rendered with its own template. A subprocess on one CPU device: the tests'
  8 forced devices would hold 8 copies of activations (5 GB here, OOM on 8)."""
  from apollo.models import gguf

  try:
    gguf.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  workdir = tmp_path / "w"
  flags = [
    "--config=apollo/agents/configs/sft.py:smollm2",
    f"--workdir={workdir}",
    "--config.train_steps=2",
    "--config.log_every=1",
    "--config.eval_every=2",
    "--config.data.demo_episodes=1",
    "--config.data.seq_len=256",
  ]
  env = dict(os.environ, **{model_registry.CACHE_ENV: str(tmp_path / "cache")})
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  done = subprocess.run(
    [sys.executable, "-m", "experiments.agent_sft", *flags],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith("step 2 | train loss")
  template = chat_template.from_pretrained(workdir / "data")
  assert "SmolLM" in template.source and template.tokenizer.get_vocab_size() == 49152
  policy = models.load(workdir / "policy")
  assert policy.chat_template == template.source and policy.model.config.num_layers == 30
