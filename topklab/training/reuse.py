"""Reusing a fine-tuned checkpoint only for the settings it was trained with (checkpoints are written whole by
`topklab.io.atomic_folder`), and naming cached results by the weights they came from."""

from __future__ import annotations

import dataclasses
import json
import logging
import reprlib
from pathlib import Path

log = logging.getLogger(__name__)

NO_EFFECT = ("log_every", "workers")  # training settings that do not change the weights


def _settings(base: list, data, train) -> dict:
    """What a fine-tune's weights depend on, flat and JSON-normalised: its base (`checkpoint_identity`) and its data
    and training settings (the ``data`` / ``train`` dataclasses, or their dicts as training.json records them)."""
    def fields(section):
        return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section or {})

    flat = {"base": base, **{f"data.{k}": v for k, v in fields(data).items()},
            **{f"train.{k}": v for k, v in fields(train).items() if k not in NO_EFFECT}}
    return json.loads(json.dumps(flat, default=str))


def reusable_checkpoint(folder, base: str, data, train) -> bool:
    """Whether ``folder`` holds a finished fine-tune of ``base`` (the same base weights) with these settings; logs
    why an existing one is not, so that a changed config retrains instead of silently reusing stale weights."""
    meta = Path(folder) / "training.json"
    if not meta.is_file():
        return False
    meta = json.loads(meta.read_text())
    recorded = _settings([meta.get("base"), meta.get("base_training")], meta.get("data"), meta.get("train"))
    wanted = _settings(checkpoint_identity(base), data, train)
    changed = [f"{k}: {reprlib.repr(recorded.get(k))} -> {reprlib.repr(v)}" for k, v in wanted.items()
               if json.dumps(recorded.get(k)) != json.dumps(v)]  # as JSON: k = 1 (one key) is not k = 1.0 (all)
    if changed:
        log.info("retraining %s: its settings differ (%s)", folder, "; ".join(changed))
    return not changed


def checkpoint_identity(path) -> list:
    """What identifies a model's weights in a results key: its path and, for a checkpoint trained here, its
    training.json (a retrained checkpoint gets fresh results)."""
    meta = Path(path) / "training.json"
    return [str(path), json.loads(meta.read_text()) if meta.is_file() else None]


__all__ = ["checkpoint_identity", "reusable_checkpoint"]
