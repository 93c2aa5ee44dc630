"""Helpers shared by the config files: parsing the `get_config(arg)` string.

A config is chosen on the command line as `--config configs/bert.py:ARG`, where ARG
is a comma list such as `tiny` or `base,seed=3,corpus=kjv:nt` (big_vision style);
single fields are then overridden with `--config.data.seq_len=64`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses "preset,key=value,flag,..." into a ConfigDict of `defaults`' keys.

    - `key=value` sets `key`, converted to the type of its default (bool accepts
      true/false/yes/no/1/0/on/off).
    - a bare `key` whose default is a bool sets it to True;
    - any other bare word is the value of the first key (the preset), at most once.

    Args:
      arg: the string after ":" in `--config file.py:arg`; None or "" = all defaults.
      **defaults: every accepted key with its default value (order matters: the first
        key takes the bare word).

    Returns:
      ConfigDict with exactly the keys of `defaults`.

    Raises:
      ValueError: an unknown key (the message lists the valid ones), a value that does
        not convert, or two bare words.
    """
    if not defaults:
        raise ValueError("parse_arg needs at least one default (the first one is the preset).")
    values = dict(defaults)
    first = next(iter(defaults))
    positional_seen = False
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if sep:
            if key not in defaults:
                raise ValueError(
                    f"config argument {item!r}: unknown key {key!r}; valid keys: "
                    f"{', '.join(defaults)}."
                )
            values[key] = _convert(key, raw.strip(), defaults[key])
        elif isinstance(defaults.get(key), bool):
            values[key] = True
        else:
            if positional_seen:
                raise ValueError(
                    f"config argument {arg!r}: more than one bare word ({item!r}); only the "
                    f"first ({first}) may be given without 'key='. Valid keys: "
                    f"{', '.join(defaults)}."
                )
            positional_seen = True
            values[first] = _convert(first, item, defaults[first])
    return ml_collections.ConfigDict(values)


def select_preset(presets: Mapping[str, Any], name: str, field: str = "size") -> Any:
    """`presets[name]`, or a ValueError that lists the valid names."""
    if name not in presets:
        raise ValueError(f"{field}={name!r} is not a preset; choose one of: {', '.join(presets)}.")
    return presets[name]


def _convert(key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(
            f"config argument {key}={raw!r}: expected a {type(default).__name__} like the "
            f"default {default!r}."
        ) from None
    return raw
