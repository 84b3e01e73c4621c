"""The command line of train.py and eval.py: the config flag, its overrides, clear errors.

`--config=configs/NAME.py[:ARG]` loads a config; `--config.a.b=value` overrides any value of
it (a typo is an error that names the nearest key). Two things need more than ml-collections'
own parsing:

* `--config.model.overrides.FIELD=VALUE` sets any constructor field of the backbone (e.g.
  `width=16`, `enc_blk_nums='(1, 1)'`, `dtype=bfloat16`, `remat=blocks`), also one the config
  file did not set; the value is read as a Python literal (else kept as text) and checked
  against the variant's fields at once. A config with several stages takes the same form on
  each stage's section: `--config.finetune.model.overrides.dtype=bfloat16` (the quickstart).
* an override of a section the config does not have names the method that has it: a
  `--config.lora.rank=8` on a CoLoRA run is an error, not silently ignored.
"""

import ast
import importlib.util
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from ir_lora import methods, models, workdir

FLAGS = flags.FLAGS
_MODEL_OVERRIDE = re.compile(r"--config\.((?:\w+\.)*)model\.overrides\.(\w+)=(.*)", re.DOTALL)
_OVERRIDE = re.compile(r"--config\.([\w.]+)(=.*)?", re.DOTALL)


def define_config_flag(flag_values: flags.FlagValues = FLAGS, argv=None) -> None:
    """The `--config` flag; its `--config.*` overrides are read from `argv` (default
    `sys.argv`), as ml-collections defines one flag per override when the flag is defined
    (those of model fields are `parse_flags`'s)."""
    argv = [a for a in (sys.argv if argv is None else argv) if not _MODEL_OVERRIDE.fullmatch(a)]
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Path to a configs/*.py file (and :ARG).",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )


def _literal(text: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def _missing_key_message(config, dotted: str) -> str | None:
    """Why `--config.<dotted>` names no value of `config` (None if it does)."""
    node, walked = config, []
    for key in dotted.split("."):
        if not hasattr(node, "keys") or key not in node:
            where = ".".join(["config", *walked])
            if not walked:
                owner = methods.section_owner(key)
                if owner is not None:
                    method = config.get("method", None)
                    this = f"method {method!r}" if method else f"stage {config.get('stage')!r}"
                    return (
                        f"--config.{dotted}: this config ({this}) has no section {key!r}; it "
                        f"is a section of method {owner!r}. Sections here: {sorted(config)}"
                    )
            known = sorted(node.keys()) if hasattr(node, "keys") else []
            return f"--config.{dotted}: {where} has no key {key!r}; its keys: {known}"
        node, walked = node[key], [*walked, key]
    return None


def _load_config(argv):
    """The config `--config=PATH[:ARG]` names, without its overrides (None if none is named)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg[len("--config=") :]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        path, _, config_arg = value.partition(":")
        spec = importlib.util.spec_from_file_location("_config_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(config_arg or None)
    return None


def _explain(argv, error: Exception) -> str:
    """A message naming the override at fault, from the config loaded without overrides."""
    try:
        config = _load_config(argv)
    except Exception:  # noqa: BLE001 (the original error is the one to report)
        return str(error)
    if config is None:
        return str(error)
    for arg in argv[1:]:
        match = _OVERRIDE.fullmatch(arg)
        if match and not arg.startswith("--config="):
            message = _missing_key_message(config, match.group(1))
            if message:
                return message
    return str(error)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """`absl.app.run`'s flag parser: config overrides applied, with errors that name the fix."""
    model_overrides, rest = {}, []  # {section path: {field: value}}
    for arg in argv:
        match = _MODEL_OVERRIDE.fullmatch(arg)
        if match:
            fields = model_overrides.setdefault(match.group(1).rstrip("."), {})
            fields[match.group(2)] = _literal(match.group(3))
        else:
            rest.append(arg)
    try:
        leftover = flag_values(rest)
    except (KeyError, AttributeError) as error:
        raise flags.IllegalFlagValueError(_explain(rest, error)) from None
    for path, fields in model_overrides.items():
        flag = f"--config.{path + '.' if path else ''}model.overrides"
        section = flag_values.config
        for key in path.split(".") if path else ():
            section = section.get(key) if hasattr(section, "get") else None
        if section is None or not hasattr(section, "get") or "model" not in section:
            raise flags.IllegalFlagValueError(
                f"{flag}.*: this config (stage {flag_values.config.get('stage')!r}) has no "
                f"backbone section '{path + '.' if path else ''}model'"
            )
        with section.unlocked():
            section.model.overrides.update(fields)
        try:
            models.build(section.model.variant, **dict(section.model.overrides))
        except ValueError as error:
            raise flags.IllegalFlagValueError(f"{flag}: {error}") from None
    return leftover


def _parse_flags_with_usage(argv: list[str]) -> list[str]:
    # As absl's own parser: the message and a usage hint, no traceback.
    try:
        return parse_flags(argv)
    except flags.Error as error:
        sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def run(main) -> None:
    """`app.run(main)` with `parse_flags`; a refused multi-host run exits at once (status 3)."""

    def main_or_refused(argv):
        try:
            main(argv)
        except workdir.WorkdirLockedError as error:
            import jax  # train.py has initialised it by then

            if jax.process_count() == 1:
                raise
            workdir.exit_refused(error)

    app.run(main_or_refused, argv=sys.argv, flags_parser=_parse_flags_with_usage)
