"""Command-line options generated from configuration dataclasses, so a command and its library call cannot drift.

A field becomes ``--field-name`` (``metadata["flag"]`` renames it), typed from its annotation, with its default and
``metadata["help"]``; ``metadata["cli"] = False`` keeps a field off the command line, ``min`` bounds a number,
``comma`` splits each value of a list option on commas, ``off_alias`` adds a second "off" flag for a boolean
(``--full`` for ``--no-lora``). Every command built here also takes ``--config FILE`` (YAML or JSON, as lm-eval
does): its values stand where an option is not given on the command line.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, List, Literal, Optional, Sequence

import typer

CONFIG_PARAM = "config_file"
CONFIG_HELP = ("YAML or JSON file of option values, keyed by option name (e.g. `suite: bundled`, `max-new-tokens: "
               "16`); options given on the command line win.")


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be read, or that names an option the command does not have."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One generated option: which config class and field it fills."""

    owner: type
    field: str
    param: str
    flag: str
    annotation: Any
    default: Any
    help: str
    comma: bool = False
    off_alias: str | None = None
    minimum: int | float | None = None
    argument: bool = False


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _cli_type(annotation: Any) -> Any:
    """The annotation typer understands: ``X | None`` as ``Optional[X]``, sequences as ``List[str]``."""
    inner, optional = _unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if origin in (list, tuple, Sequence, typing.Sequence) or inner in (list, tuple):
        item = (typing.get_args(inner) or (str,))[0]
        return List[item]  # type: ignore[valid-type]
    if origin is Literal:
        return Optional[inner] if optional else inner
    return Optional[inner] if optional else inner


def options_of(cls: type, *, exclude: Iterable[str] = ()) -> list[Option]:
    """The command-line options of a config dataclass (fields with ``metadata["cli"] = False`` left out)."""
    hints = typing.get_type_hints(cls)
    skip = set(exclude)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or meta.get("cli", True) is False:
            continue
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text for the command line")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = ...  # required
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        out.append(Option(owner=cls, field=f.name, param=flag.lstrip("-").replace("-", "_"), flag=flag,
                          annotation=_cli_type(hints[f.name]), default=default, help=meta["help"],
                          comma=bool(meta.get("comma")), off_alias=meta.get("off_alias"), minimum=meta.get("min"),
                          argument=bool(meta.get("argument"))))
    return out


def _parameter(option: Option) -> list[inspect.Parameter]:
    inner, _ = _unwrap_optional(option.annotation)
    kwargs: dict[str, Any] = {"help": option.help}
    if option.minimum is not None:
        kwargs["min"] = option.minimum
    default = list(option.default) if isinstance(option.default, (list, tuple)) else option.default
    if option.argument:
        info = typer.Argument(default, **kwargs)
    else:
        decls = [f"{option.flag}/--no-{option.flag[2:]}"] if inner is bool else [option.flag]
        info = typer.Option(default, *decls, **kwargs)
    params = [inspect.Parameter(option.param, inspect.Parameter.KEYWORD_ONLY, default=info,
                                annotation=option.annotation)]
    if option.off_alias:
        params.append(inspect.Parameter(
            f"{option.param}__off", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, option.off_alias, help=f"same as --no-{option.flag[2:]}")))
    return params


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file; :class:`ConfigFileError` naming the file otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigFileError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    try:
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:  # noqa: BLE001 - yaml and json raise their own types
        raise ConfigFileError(f"--config {path}: not valid {'YAML' if Path(path).suffix in ('.yaml', '.yml') else 'JSON'}"
                              f" ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path}: expected a mapping of option names to values, got "
                              f"{type(data).__name__}")
    return data


def _from_file(options: Sequence[Option], data: dict[str, Any], path: Path) -> dict[str, Any]:
    """File values keyed by option param; keys may be a field name or a flag, with ``-`` or ``_``."""
    by_key = {}
    for option in options:
        by_key[option.param] = option
        by_key[option.field] = option
    out = {}
    for key, value in data.items():
        option = by_key.get(str(key).lstrip("-").replace("-", "_"))
        if option is None:
            known = ", ".join(sorted({o.flag.lstrip("-") for o in options}))
            raise ConfigFileError(f"--config {path}: unknown option {key!r}; options are: {known}")
        out[option.param] = value
    return out


def collect(options: Sequence[Option], values: dict[str, Any], ctx: Any = None) -> dict[type, dict]:
    """``{config class: {field: value}}`` from a command's parsed values, a ``--config`` file filling what the
    command line left at its default."""
    config_path = values.pop(CONFIG_PARAM, None)
    from_file = _from_file(options, read_config_file(config_path), config_path) if config_path else {}
    params = {p.name: p for p in ctx.command.params} if ctx is not None else {}
    out: dict[type, dict] = {}
    for option in options:
        value = values.get(option.param)
        source = ctx.get_parameter_source(option.param) if ctx is not None else None
        # By name: typer ships its own copy of click, whose ParameterSource is not click's.
        given = source is not None and source.name != "DEFAULT"
        if not given and option.param in from_file:
            raw = from_file[option.param]
            param = params.get(option.param)
            if param is not None and getattr(param, "multiple", False) and not isinstance(raw, list):
                raw = [raw]  # `suite: bundled` for a repeatable option
            # Through the option's own conversion, so a file value is checked and typed like a typed one.
            try:
                value = param.process_value(ctx, raw) if param is not None else raw
            except Exception as error:  # noqa: BLE001 - click's BadParameter, from typer's own copy of click
                message = getattr(error, "message", None) or str(error)
                raise ConfigFileError(f"--config {config_path}: {option.flag.lstrip('-')}: {message}") from None
        if option.off_alias and values.get(f"{option.param}__off"):
            value = False
        if option.comma and value is not None:
            value = [part for item in value for part in str(item).split(",") if part]
        if isinstance(value, tuple):
            value = list(value)
        out.setdefault(option.owner, {})[option.field] = value
    return out


def config_command(
    app: typer.Typer,
    name: str,
    classes: Sequence[type],
    run: Callable[..., Any],
    *,
    help: str,  # noqa: A002
    exclude: Iterable[str] = (),
    with_config_file: bool = True,
) -> Callable[..., Any]:
    """Register ``name`` on ``app`` with one option per field of ``classes``; ``run(*instances)`` does the work.

    The instances are built in the order of ``classes`` from the parsed options (and ``--config``).
    """
    skip = set(exclude)
    options = [o for cls in classes for o in options_of(cls, exclude=skip)]
    seen: dict[str, Option] = {}
    for option in options:
        if option.param in seen:
            raise TypeError(f"option {option.flag} comes from both {seen[option.param].owner.__name__} and "
                            f"{option.owner.__name__}")
        seen[option.param] = option
    params = [p for option in options for p in _parameter(option)]
    if with_config_file:
        params.append(inspect.Parameter(CONFIG_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                        default=typer.Option(None, "--config", help=CONFIG_HELP)))

    def command(ctx: typer.Context, **values: Any) -> Any:
        from speechlm_eval.cli.common import bad_input_exits

        with bad_input_exits():  # a bad --config file or option combination: exit 2 before any work starts
            fields = collect(options, values, ctx)
            configs = [cls(**fields.get(cls, {})) for cls in classes]
        return run(*configs)

    params.insert(0, inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help
    command.__name__ = name.replace("-", "_")
    app.command(name, help=help)(command)
    return command


def parse(app: typer.Typer, argv: Sequence[str]) -> Any:
    """Parse ``argv`` with ``app``'s click command without running it (for tests and wrappers)."""
    command = typer.main.get_command(app)
    return command.make_context(command.name or "speechlm-eval", list(argv))
