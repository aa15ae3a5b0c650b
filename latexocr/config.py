"""Command-line overrides for the constants at the top of each script.

`python train.py --lora_rank=16` sets LORA_RANK = 16 in train.py. Values are checked against the
type of the default; a name that is not a constant of the script is refused with the valid ones.
"""

import sys

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise SystemExit(f"--{name}={text}: expected true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise SystemExit(f"--{name}={text}: expected an integer (default {default})") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise SystemExit(f"--{name}={text}: expected a number (default {default})") from None
    return text


def config_keys(namespace: dict) -> list[str]:
    """The user-tunable constants of a script: upper-case names bound to str, int, float or bool."""
    return [k for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, (str, int, float, bool))]


def apply_overrides(namespace: dict, argv: list[str] | None = None, rules: dict | None = None) -> dict:
    """Apply `--name=value` arguments to the script's constants in place; return the resolved config.

    Call it right after the configuration block, with `globals()`. `rules` (settings.py) maps a setting's lower-case
    name to a check of its value, applied to defaults and overrides alike; what a check returns is the value kept.
    """
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    for arg in argv:
        if arg in ("-h", "--help"):
            doc = (namespace.get("__doc__") or "").strip()
            width = max(len(k) for k in keys)
            lines = [f"  --{k.lower():<{width}} = {namespace[k]!r}" for k in keys]
            raise SystemExit(f"{doc}\n\nOverridable constants (default shown):\n" + "\n".join(lines))
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"unrecognised argument {arg!r}: use --name=value, e.g. --{keys[0].lower()}=...")
        name, text = arg[2:].split("=", 1)
        key = name.upper()
        if key not in keys:
            valid = ", ".join(k.lower() for k in keys)
            raise SystemExit(f"unknown setting --{name}. Valid settings: {valid}")
        namespace[key] = _parse(name, text, namespace[key])
    for name, rule in (rules or {}).items():
        namespace[name.upper()] = rule(name, namespace[name.upper()])
    return {k.lower(): namespace[k] for k in keys}
