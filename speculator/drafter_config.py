"""Reading a drafter folder's config.json: one place for its errors, whatever the drafter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


def read_drafter_config(
    folder: str | Path, model_type: str, config_cls: type[C], error: type[Exception], drop: frozenset[str]
) -> C:
    """The folder's config.json as `config_cls`, after checking its `model_type` and dropping the keys in `drop`
    (Hugging Face bookkeeping); any problem raises `error` with one line naming the file."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"{path}: {e}") from None
    if not isinstance(data, dict) or data.get("model_type") != model_type:
        raise error(f"{path}: model_type is not '{model_type}'")
    try:
        return config_cls(**{k: v for k, v in data.items() if k not in drop})
    except ValidationError as e:
        raise error(f"{path}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
