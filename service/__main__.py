"""``python -m service --model PATH_OR_ID [...]`` (also the ``llave-serve`` console script).

Every ``Settings`` field is a flag (``--max-batch-size``) and an env var
(``LLAVE_MAX_BATCH_SIZE``); flags override env vars. ``--help`` lists them all.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from service.settings import Settings, configure_logging

logger = logging.getLogger("llave.main")


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` and extra options for a field's annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _flag_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is typing.Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return str, {"metavar": "A,B,..."}
    if annotation in (int, float):
        return annotation, {}
    if annotation in (str, Path, SecretStr):
        return str, {}
    raise TypeError(f"no flag type for {annotation!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a LLaVE checkpoint: /embed, /v1/embeddings, /health, /ready, /info, /metrics. "
        "Every flag is also an env var: LLAVE_ + the flag name in capitals with underscores "
        "(--max-batch-size = LLAVE_MAX_BATCH_SIZE); flags override env vars.",
    )
    for name, field in Settings.model_fields.items():
        flag_type, extra = _flag_type(field.annotation)
        default = "required" if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default) or "none"
        shown = "set" if name == "api_key" else default
        help_text = f"{field.description} [env LLAVE_{name.upper()}; default: {shown}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text, **extra}
        if flag_type is not None:
            kwargs["type"] = flag_type
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)
    return parser


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from env vars, overridden by the flags in ``argv``."""
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    try:
        return Settings(**flags)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in err['loc']).replace('_', '-') or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None, *, embedder_factory: str | None = None) -> None:
    """Serve until SIGTERM. ``embedder_factory`` ("module:function", called in the engine
    process instead of ``model.load_embedder``) is for tests and the simulated-device
    bench; it is not a server setting."""
    settings = load_settings(argv)
    configure_logging(settings.log_level)
    for adjustment in settings.adjustments:
        logger.warning("%s", adjustment)
    # Every process of the server writes its metrics here; set before prometheus_client is
    # imported (here and, inherited, in every child process).
    metrics_dir = tempfile.TemporaryDirectory(prefix="llave-metrics-")
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name

    from service.server import serve

    logger.info(
        "serving %s on http://%s:%d (%d front end%s, device %s, dtype %s, store %s, auth %s); "
        "the model loads in the background, /ready turns 200 when it is warmed up",
        settings.model,
        settings.host,
        settings.port,
        settings.api_workers,
        "" if settings.api_workers == 1 else "s",
        settings.device,
        settings.dtype,
        "PostgreSQL" if settings.store_url else settings.data_dir,
        "on" if settings.api_key else "off",
    )
    try:
        code = serve(settings, embedder_factory)
    finally:
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
        metrics_dir.cleanup()
    sys.exit(code)


if __name__ == "__main__":
    main()
