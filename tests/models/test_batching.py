"""Tests for apollo.models.batching: exactness against generate, shared and joined
batches, cancellation, seeded sampling, and no recompilation within a bucket.

One batcher over a tiny random decoder serves every test (compilations are shared:
the compiled pieces are module-level). A ``notify`` callback runs on the batcher's
thread, so one that blocks pauses the batcher at a known token: that is how the
tests join or cancel at a chosen step.
"""

import functools
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apollo.models import batching
from apollo.models.llama import model as decoder_lib
from apollo.models.llama import sampling

MAX_BATCH = 4


@pytest.fixture(scope="module")
def model():
  # A larger init than the default makes the logits peaked, so greedy argmaxes are
  # far from ties and equal across differently shaped (but equal) computations.
  config = decoder_lib.get_config("tiny", initializer_range=0.2)
  return decoder_lib.create_sharded_model(
    lambda: decoder_lib.Decoder(config, rngs=nnx.Rngs(0)), None
  )


@pytest.fixture(scope="module")
def batcher(model):
  with batching.DecodeBatcher(model, max_batch=MAX_BATCH, min_cache_len=64) as b:
    yield b


def _prompt(length, seed=0):
  return [int(t) for t in np.random.default_rng(seed).integers(3, 512, length)]


# Reference runs decode this many tokens once per prompt; shorter runs are prefixes
# (greedy), so one compilation of generate per prompt bucket serves every test.
REFERENCE_TOKENS = 72


@functools.cache
def _greedy(model, prompt: tuple[int, ...]) -> list[int]:
  out = sampling.generate(model, jnp.asarray([prompt]), REFERENCE_TOKENS, temperature=0)
  return [int(t) for t in np.asarray(out.tokens[0])]


def _generate(model, prompt, max_new, stop_ids=()):
  """``sampling.generate``'s greedy tokens, up to a stop id or ``max_new``."""
  tokens = _greedy(model, tuple(prompt))[:max_new]
  ends = [i for i, t in enumerate(tokens) if t in stop_ids]
  return tokens[: ends[0] + 1] if ends else tokens


class _Pause:
  """A notify callback that blocks the batcher at its request's ``at``-th token."""

  def __init__(self, gen_tokens_at: int):
    self.at = gen_tokens_at
    self.calls = 0
    self.reached = threading.Event()
    self.release = threading.Event()

  def __call__(self):
    self.calls += 1
    if self.calls == self.at:
      self.reached.set()
      assert self.release.wait(30), "the test never released the batcher"


def test_single_greedy_request_equals_generate(model, batcher):
  for length, max_new in ((5, 20), (12, 70)):  # 70: the cache grows past 64 slots.
    prompt = _prompt(length, seed=length)
    gen = batcher.submit(batching.GenerationRequest(prompt, max_new))
    assert gen.result(60) == _generate(model, prompt, max_new)
    assert gen.finish_reason == batching.LENGTH
  # A stop id ends the row, the stop token included (as generate's lengths count it).
  prompt = _prompt(7, seed=7)
  stop = _generate(model, prompt, 10)[4]
  gen = batcher.submit(batching.GenerationRequest(prompt, 10, stop_ids=(stop,)))
  assert gen.result(60) == _generate(model, prompt, 10, stop_ids=(stop,))
  assert gen.finish_reason == batching.STOP and gen.tokens[-1] == stop
  out = sampling.generate(model, jnp.asarray([prompt]), 10, temperature=0, eos_id=stop)
  assert gen.tokens == [int(t) for t in np.asarray(out.tokens[0, : int(out.lengths[0])])]


def test_concurrent_requests_share_the_batch_and_equal_solo_runs(model, batcher):
  prompts = [_prompt(n, seed=n) for n in (3, 9, 14, 16)]
  pause = _Pause(1)
  first = batcher.submit(batching.GenerationRequest(prompts[0], 12), notify=pause)
  assert pause.reached.wait(60)
  # The batcher is held at `first`'s first token: the rest queue up and join together.
  rest = [batcher.submit(batching.GenerationRequest(p, 12 + i)) for i, p in enumerate(prompts[1:])]
  pause.release.set()
  gens = [first, *rest]
  for prompt, gen in zip(prompts, gens, strict=True):
    assert gen.result(60) == _generate(model, prompt, gen.request.max_new_tokens)
  assert [g.stats.batch_rows for g in rest] == [MAX_BATCH] * 3
  assert all(g.stats.mean_batch_rows > 3 for g in rest)
  assert all(g.stats.queue_wait_s is not None and g.stats.queue_wait_s >= 0 for g in gens)
  assert batcher.recent_queue_waits()[-4:] == [g.stats.queue_wait_s for g in gens]


def test_request_joining_a_running_batch_equals_its_solo_run(model, batcher):
  # The newcomer's prompt bucket (32) exceeds the running row's write index (16 + 3):
  # the cache is re-laid out with the old row shifted right.
  old, new = _prompt(5, seed=1), _prompt(30, seed=2)
  pause = _Pause(3)
  running = batcher.submit(batching.GenerationRequest(old, 30), notify=pause)
  assert pause.reached.wait(60)
  joining = batcher.submit(batching.GenerationRequest(new, 20))
  pause.release.set()
  assert running.result(60) == _generate(model, old, 30)
  assert joining.result(60) == _generate(model, new, 20)
  assert joining.stats.batch_rows == 2


def test_cancelled_row_frees_its_slot_for_a_waiting_request(model, batcher):
  pause = _Pause(1)
  prompts = [_prompt(6, seed=10 + i) for i in range(MAX_BATCH + 1)]
  gens = [batcher.submit(batching.GenerationRequest(prompts[0], 40), notify=pause)]
  assert pause.reached.wait(60)
  gens += [batcher.submit(batching.GenerationRequest(p, 40)) for p in prompts[1:MAX_BATCH]]
  waiting = batcher.submit(batching.GenerationRequest(prompts[-1], 5))
  gens[0].cancel()
  pause.release.set()
  assert waiting.result(60) == _generate(model, prompts[-1], 5)
  # It took the cancelled row while the others were still decoding.
  assert waiting.stats.batch_rows == MAX_BATCH
  assert gens[0].wait(60) and gens[0].finish_reason == batching.CANCELLED
  assert len(gens[0].tokens) < 40
  for prompt, gen in zip(prompts[1:MAX_BATCH], gens[1:], strict=True):
    assert gen.result(60) == _generate(model, prompt, 40)


def test_cancelled_waiting_request_never_runs(batcher):
  pause = _Pause(1)
  holders = [batcher.submit(batching.GenerationRequest(_prompt(4), 3), notify=pause)]
  assert pause.reached.wait(60)
  holders += [batcher.submit(batching.GenerationRequest(_prompt(4), 3)) for _ in range(3)]
  queued = batcher.submit(batching.GenerationRequest(_prompt(4), 3))
  queued.cancel()
  pause.release.set()
  assert queued.wait(60) and queued.finish_reason == batching.CANCELLED
  assert queued.tokens == [] and queued.stats.queue_wait_s is None
  for gen in holders:
    gen.result(60)


def test_seeded_sampling_does_not_depend_on_the_batch(batcher):
  prompt = _prompt(10, seed=3)

  def sample(seed, company=0):
    pause = _Pause(1)
    gen = batcher.submit(
      batching.GenerationRequest(prompt, 16, temperature=0.9, top_p=0.95, seed=seed), notify=pause
    )
    assert pause.reached.wait(60)
    others = [batcher.submit(batching.GenerationRequest(_prompt(8, i), 16)) for i in range(company)]
    pause.release.set()
    for other in others:
      other.result(60)
    return gen.result(60)

  alone = sample(7)
  assert sample(7, company=2) == alone
  assert sample(8) != alone


def test_second_prompt_length_in_a_bucket_compiles_nothing(batcher):
  functions = (batching._prefill, batching._insert, batching._decode_step)
  batcher.submit(batching.GenerationRequest(_prompt(17), 4)).result(60)
  compiled = [f._cache_size() for f in functions]
  for length in (20, 31):  # The same prompt bucket (32) as 17.
    batcher.submit(batching.GenerationRequest(_prompt(length), 4)).result(60)
  assert [f._cache_size() for f in functions] == compiled


def test_invalid_requests_are_refused_at_submit(batcher):
  with pytest.raises(ValueError, match="exceeds the model's context of 512 tokens"):
    batcher.submit(batching.GenerationRequest(_prompt(500), 13))
  with pytest.raises(ValueError, match="empty"):
    batcher.submit(batching.GenerationRequest([], 4))
  with pytest.raises(ValueError, match="top_p"):
    batcher.submit(batching.GenerationRequest(_prompt(4), 4, top_p=0))


def test_stats_count_steps_rows_and_waits(batcher):
  stats = batcher.stats()
  assert stats["decode_steps"] > 0 and stats["requests_finished"] == stats["requests_admitted"]
  assert stats["mean_batch_rows"] >= 1 and stats["decode_steps_per_s"] > 0
  assert stats["queue_wait_s"]["count"] == stats["requests_admitted"]
  assert stats["live_rows"] == 0 and stats["waiting"] == 0


def test_closing_fails_what_is_left(model):
  batcher = batching.DecodeBatcher(model, max_batch=1, min_cache_len=64)
  pause = _Pause(1)
  running = batcher.submit(batching.GenerationRequest(_prompt(4), 50), notify=pause)
  assert pause.reached.wait(60)
  queued = batcher.submit(batching.GenerationRequest(_prompt(4), 5))
  closer = threading.Thread(target=batcher.close)
  closer.start()
  pause.release.set()
  closer.join(60)
  assert running.finish_reason == batching.ERROR and queued.finish_reason == batching.ERROR
  with pytest.raises(RuntimeError, match="closed"):
    batcher.submit(batching.GenerationRequest(_prompt(4), 5))
