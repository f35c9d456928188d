"""Agent-policy SFT: packing, segment-isolated attention, masked loss, resume.

* `pack_samples` keeps every sample's tokens, loss mask, segment and positions;
* the logits of a packed row equal those of its samples run one by one (no
  attention across packed samples);
* the loss sees only masked-in targets;
* end to end on the 8-device CPU mesh: SIGTERM at step 3 then a rerun ends with
  exactly the parameters of an uninterrupted run; a checkpoint, metrics and an
  exported policy (loaded by the 'flax' backend) are written.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apollo.agents.backends import registry
from apollo.agents.configs import sft as agent_sft_config
from apollo.agents.training import samples as samples_lib
from apollo.agents.training import sft
from apollo.models import chat_template
from apollo.models.llama import model as decoder


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


def _chat_samples(tokenizer, n=24):
  template = chat_template.ChatTemplate(tokenizer, guidance_tag="human_guidance")
  out = []
  for i in range(n):
    messages = [
      {"role": "system", "content": "Research agent."},
      {"role": "user", "content": f"[clock {i}.00h / 24h | submissions left: 3]"},
      {
        "role": "assistant",
        "content": f'{{"tool": "check_run", "arguments": {{"run_id": "r{i % 3}"}}}}',
      },
    ]
    r = template.render(messages)
    out.append(samples_lib.Sample(r.ids, r.loss_mask, r.roles, r.segments))
  return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  chat_template.train_chat_tokenizer(vocab_size=300, out_dir=path)
  return str(path / "tokenizer.json")


def _config(steps=6):
  c = agent_sft_config.get_config("quickstart")
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


def test_sft_end_to_end_resume_equals_uninterrupted(tmp_path, tokenizer_dir):
  assert jax.device_count() == 8
  samples = _chat_samples(chat_template.load_chat_tokenizer(tokenizer_dir))
  train, held = samples[:20], samples[20:]
  kwargs = dict(samples=train, eval_samples=held, tokenizer_path=tokenizer_dir)
  straight = sft.train_and_evaluate(_config(), str(tmp_path / "a"), **kwargs)
  assert straight["step"] == 6 and straight["train"]["loss"] > 0

  def preempt_at_3(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = str(tmp_path / "b")
  first = sft.train_and_evaluate(_config(), workdir, on_step=preempt_at_3, **kwargs)
  assert first["preempted"] and first["step"] == 3 and not first["policy_dir"]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  second = sft.train_and_evaluate(_config(), workdir, **kwargs)
  assert second["step"] == 6 and not second["preempted"]
  assert os.path.isfile(os.path.join(workdir, "metrics.jsonl"))

  model_a, _ = sft.load_policy(straight["policy_dir"])
  model_b, _ = sft.load_policy(second["policy_dir"])
  for x, y in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The export is a checkpoint of the 'flax' rollout backend.
  backend = registry.make_backend(
    "flax", seed=0, checkpoint=second["policy_dir"], max_new_tokens=4, prompt_bucket=32
  )
  text = backend.complete([{"role": "user", "content": "hi"}]).text
  assert isinstance(text, str)
