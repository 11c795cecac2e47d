"""Loading local model and tokenizer directories without running code from them.

A Hugging Face directory can ask for its own Python code: an ``auto_map`` in
``config.json`` or ``tokenizer_config.json`` names classes in ``*.py`` files beside it,
which ``transformers`` imports (and so executes) under ``trust_remote_code=True``, and
asks about interactively when the flag is not given.  kdkit never lets it ask: every
directory is checked by :func:`check_remote_code` before ``from_pretrained``, which is
always called with ``local_files_only=True`` and an explicit ``trust_remote_code``.
Without trust a directory asking for code is refused in one line naming the flag, the
file and the classes, even when ``transformers`` has a built-in class of the same
``model_type`` (the directory's code may differ from it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["check_remote_code", "label", "load_causal_lm", "load_tokenizer"]

_CONFIG_FILES: tuple[str, ...] = ("config.json", "tokenizer_config.json")


def label(what: str, path: str | Path) -> str:
    """How messages name a directory: ``--teacher_model '/models/t'``; a ``what`` ending in
    ``=`` is joined without a space (``--teacher t='/models/t'``)."""
    return f"{what}{'' if what.endswith('=') else ' '}{str(path)!r}"


def check_remote_code(path: str | Path, what: str, trust_remote_code: bool) -> None:
    """Raise ``ValueError`` if ``path`` asks for its own code and it is not trusted.

    ``what`` names the flag or argument (``"--teacher_model"``, see :func:`label`).
    Unreadable or non-JSON config files are left to ``transformers`` (its own error follows).
    """
    if trust_remote_code:
        return
    for name in _CONFIG_FILES:
        file = Path(path) / name
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            classes = auto_map if isinstance(auto_map, dict) else {"classes": auto_map}
            shown = ", ".join(f"{k}: {v}" for k, v in list(classes.items())[:3])
            raise ValueError(
                f"{label(what, path)} asks to run its own code ({name} auto_map: {shown}); "
                "kdkit runs no code from a model directory unless you trust it: pass "
                "--trust_remote_code (trust_remote_code=True) if you do"
            )


def load_causal_lm(
    path: str | Path, what: str, *, trust_remote_code: bool = False, **kwargs: Any
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` of a local directory, code checked first.

    Raises:
        ValueError: the directory asks for code without trust, or is not a loadable causal
            LM (one line naming ``what``).
    """
    from transformers import AutoModelForCausalLM

    check_remote_code(path, what, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError, KeyError) as exc:
        text = " ".join(str(exc).split())[:300]
        raise ValueError(
            f"{label(what, path)} is not a loadable causal LM directory: {text}"
        ) from None


def load_tokenizer(path: str | Path, what: str, *, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local directory, code checked first.

    Raises:
        ValueError: the directory asks for code without trust, or holds no loadable
            tokenizer (one line naming ``what``).
    """
    from transformers import AutoTokenizer

    check_remote_code(path, what, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise ValueError(
            f"{label(what, path)} is not a loadable tokenizer directory: {text}"
        ) from None
