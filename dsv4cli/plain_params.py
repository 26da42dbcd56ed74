"""Command-line values that need no validation, taken without typer's pydantic layer.

typer (0.29) coerces every value through a pydantic TypeAdapter: importing pydantic and
building the adapters costs about 50 ms per process, a sixth of a warm `dsv4 pack`. A str for
a str, a bool or nothing for a flag, a plain decimal in range for an int and a str for a Path
(through typer's own path checks) are taken as they are; any other value goes to typer's own
coercion, so results and error messages stay exactly typer's. With another typer whose
internals differ, nothing is installed and typer does all the work as usual.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.core

_DECIMAL = re.compile(r"[1-9][0-9]{0,17}|0")
_PLAIN_TYPES = (str, int, bool, Path, list[str])


class PlainCommand(typer.core.TyperCommand):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        install(self.get_params(ctx))
        return super().parse_args(ctx, args)


class PlainGroup(typer.core.TyperGroup):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        install(self.get_params(ctx))
        return super().parse_args(ctx, args)


def install(params: list[Any]) -> None:
    try:
        from typer._coercion import RuntimeParam, build_runtime_param
        from typer._param_types import coerce_cli_path
    except ImportError:
        return
    for param in params:
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or getattr(param, "_runtime_param", False) is not None:
            continue
        info, annotation = descriptor.parameter_info, descriptor.annotation
        if descriptor.file_annotation is not None or getattr(info, "parser", None) is not None:
            continue
        if annotation not in _PLAIN_TYPES or (annotation is Path and info.path_type is not None):
            continue
        param._runtime_param = _plain(RuntimeParam, build_runtime_param, coerce_cli_path, descriptor)


def _plain(base: type, build_runtime_param: Any, coerce_cli_path: Any, descriptor: Any) -> Any:
    info, annotation = descriptor.parameter_info, descriptor.annotation

    class Plain(base):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if annotation is str and isinstance(value, str):
                return value
            if annotation is bool and isinstance(value, bool):
                return value
            if annotation == list[str] and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            if annotation is Path and isinstance(value, str) and value:
                return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
            if annotation is int and isinstance(value, str) and _DECIMAL.fullmatch(value) and not info.clamp:
                number = int(value)
                if (info.min is None or number >= info.min) and (info.max is None or number <= info.max):
                    return number
            return build_runtime_param(descriptor)._coerce_value(value, param=param, ctx=ctx)

    return Plain(parameter_info=info, annotation=annotation)
