"""The command line of train.py / eval.py: config overrides, model fields, errors naming the fix."""

import pytest
from absl import flags

from ir_lora import cli


def _parse(*args):
    argv = ["train.py", *args]
    flag_values = flags.FlagValues()
    cli.define_config_flag(flag_values, argv)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    cli.parse_flags(argv, flag_values)
    return flag_values.config


def test_any_model_field_and_any_list_are_settable():
    config = _parse(
        "--config=configs/finetune_lora.py",
        "--config.model.overrides.width=16",
        "--config.model.overrides.enc_blk_nums=(1, 1)",
        "--config.model.overrides.dec_blk_nums=[1, 1]",
        "--config.lora.also_train=['params/ending/.*']",
    )
    assert config.model.overrides.width == 16
    assert config.model.overrides.enc_blk_nums == (1, 1)
    assert config.model.overrides.dec_blk_nums == (1, 1)
    assert config.lora.also_train == ("params/ending/.*",)
    config = _parse("--config=configs/pretrain_prod.py", "--config.prod.ops=['blur','haze']")
    assert config.prod.ops == ("blur", "haze")


def test_remat_and_dtype_on_a_config_and_on_each_stage_of_the_quickstart():
    config = _parse(
        "--config=configs/finetune_lora.py:variant=restormer",
        "--config.model.overrides.remat=blocks",
        "--config.model.overrides.dtype=bfloat16",
    )
    assert dict(config.model.overrides) == {"remat": "blocks", "dtype": "bfloat16"}
    config = _parse(
        "--config=configs/quickstart.py", "--config.finetune.model.overrides.dtype=bfloat16"
    )
    assert config.finetune.model.overrides.dtype == "bfloat16"
    assert "dtype" not in config.pretrain.model.overrides
    with pytest.raises(flags.IllegalFlagValueError, match="no backbone section 'fine.model'"):
        _parse("--config=configs/quickstart.py", "--config.fine.model.overrides.dtype=bfloat16")
    with pytest.raises(
        flags.IllegalFlagValueError, match="dtype=.bfloat61. .*not a floating-point dtype"
    ):
        _parse("--config=configs/finetune_lora.py", "--config.model.overrides.dtype=bfloat61")


def test_an_unknown_model_field_is_an_error_naming_the_valid_ones():
    with pytest.raises(flags.IllegalFlagValueError, match=r"\['widht'\].*valid fields: .*width"):
        _parse("--config=configs/finetune_lora.py", "--config.model.overrides.widht=16")


def test_a_section_of_another_method_names_that_method():
    with pytest.raises(flags.IllegalFlagValueError) as error:
        _parse("--config=configs/colora.py", "--config.lora.tune_bias_norm=False")
    message = str(error.value)
    assert "method 'colora'" in message and "section of method 'lora'" in message
    with pytest.raises(flags.IllegalFlagValueError, match="config.colora has no key 'rnak'"):
        _parse("--config=configs/colora.py", "--config.colora.rnak=3")


def test_the_config_arg_is_key_value_settings():
    config = _parse("--config=configs/pretrain_prod.py:variant=restormer")
    assert config.model.variant == "restormer"
    with pytest.raises((ValueError, flags.Error), match="key one of \\['variant'\\]"):
        _parse("--config=configs/pretrain_prod.py:restormer")
