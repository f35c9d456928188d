"""check_config: every trainer refuses, before any work, a config that cannot train as meant."""

import ml_collections
import pytest

from apollo.agents.configs import sft as sft_configs
from apollo.common import config as config_lib
from apollo.common.config import ConfigError, check_config
from apollo.lm.configs import finetune as finetune_configs
from apollo.lm.configs import pretrain as pretrain_configs

FINETUNE_ZERO = dict(train_steps="num_epochs", eval_every="each epoch")


def _pretrain(**overrides):
  c = pretrain_configs.get_config("quickstart")
  for path, value in overrides.items():
    block, _, name = path.rpartition("__")
    (c[block] if block else c)[name] = value
  return c


@pytest.mark.parametrize(
  "overrides, flag",
  [
    (dict(optimizer__learning_rate=-0.01), "--config.optimizer.learning_rate=-0.01 must be"),
    (dict(optimizer__learning_rate=0.0), "--config.optimizer.learning_rate=0.0 must be"),
    (dict(optimizer__learning_rate=float("nan")), "--config.optimizer.learning_rate=nan"),
    (dict(checkpoint_every=0), "--config.checkpoint_every=0 must be > 0"),
    (dict(train_steps=-5), "--config.train_steps=-5 must be > 0"),
    (dict(train_steps=0), "--config.train_steps=0 must be > 0"),
    (dict(log_every=0), "--config.log_every=0 must be > 0"),
    (dict(eval_every=-1), "--config.eval_every=-1 must be > 0"),
    (dict(max_checkpoints=0), "--config.max_checkpoints=0 must be > 0"),
    (dict(data__batch_size=0), "--config.data.batch_size=0 must be > 0"),
    (dict(optimizer__warmup_steps=-1), "--config.optimizer.warmup_steps=-1 must be >= 0"),
    (dict(optimizer__weight_decay=-1e-4), "--config.optimizer.weight_decay=-0.0001 must be"),
    (dict(optimizer__end_lr_fraction=2.0), "--config.optimizer.end_lr_fraction=2.0 must be"),
  ],
)
def test_values_that_cannot_train_are_refused_naming_the_flag(overrides, flag):
  with pytest.raises(ConfigError) as refused:
    check_config(_pretrain(**overrides), pretrain_configs.get_config())
  assert flag in str(refused.value)


def test_every_problem_is_reported_at_once():
  c = _pretrain(optimizer__learning_rate=-0.01, checkpoint_every=0, train_steps=-5)
  with pytest.raises(ConfigError) as refused:
    check_config(c, pretrain_configs.get_config())
  message = str(refused.value)
  for flag in ("learning_rate=-0.01", "checkpoint_every=0", "train_steps=-5"):
    assert flag in message


def test_unknown_fields_name_the_closest_known_field():
  c = pretrain_configs.get_config("quickstart")
  c.optimizer.learnin_rate = 0.1  # A ConfigDict takes new fields silently.
  c.chekpoint_every = 5
  c.zzz = 1
  with pytest.raises(ConfigError) as refused:
    check_config(c, pretrain_configs.get_config())
  message = str(refused.value)
  assert "--config.optimizer.learnin_rate" in message
  assert "did you mean --config.optimizer.learning_rate?" in message
  assert "did you mean --config.checkpoint_every?" in message
  assert "--config.zzz" in message and "known:" in message


def test_unknown_field_error_for_override_paths():
  c = pretrain_configs.get_config()
  assert config_lib.unknown_field_error(c, "optimizer.learning_rate") is None
  message = config_lib.unknown_field_error(c, "optimzer.learning_rate")
  assert "did you mean --config.optimizer?" in message
  message = config_lib.unknown_field_error(c, "train_steps.x")
  assert "--config.train_steps is a value" in message


def test_optimizer_config_unknown_default_suggests_the_field():
  with pytest.raises(ConfigError, match="did you mean warmup_steps"):
    config_lib.optimizer_config(warmup_step=3)


def test_every_preset_of_every_trainer_passes():
  for name in pretrain_configs.PRESETS:
    check_config(pretrain_configs.get_config(name), pretrain_configs.get_config())
  for name in finetune_configs.PRESETS:
    c = finetune_configs.get_config(name)
    check_config(c, finetune_configs.get_config(), zero_means=FINETUNE_ZERO)
  for name in sft_configs.PRESETS:
    check_config(sft_configs.get_config(name), sft_configs.get_config("compare"))


def test_fine_tuning_gives_zero_a_meaning_but_not_a_negative():
  c = finetune_configs.get_config()
  c.train_steps, c.eval_every = 0, 0  # num_epochs; once per epoch.
  check_config(c, finetune_configs.get_config(), zero_means=FINETUNE_ZERO)
  c.num_epochs = 0.0
  with pytest.raises(ConfigError, match="num_epochs=0.0 must be > 0 when train_steps is 0"):
    check_config(c, finetune_configs.get_config(), zero_means=FINETUNE_ZERO)
  c.num_epochs, c.train_steps = 1.0, -5
  with pytest.raises(ConfigError, match=r"train_steps=-5 must be > 0 \(or 0: num_epochs\)"):
    check_config(c, finetune_configs.get_config(), zero_means=FINETUNE_ZERO)


def test_whole_numbers_and_plain_dict_blocks():
  c = ml_collections.ConfigDict(dict(train_steps=2.5, log_every=True))
  with pytest.raises(ConfigError) as refused:
    check_config(c)
  assert "train_steps=2.5 must be a whole number" in str(refused.value)
  assert "log_every=True must be a whole number" in str(refused.value)
