"""Command-line flags derived from the pydantic option models, so every option is declared once.

A command's options are one pydantic model. Each field becomes a flag named after it (dashes for
underscores), with the field's type, default and description as its help; fields of a nested
option model (``server.media``...) become flags of the same command. Values are checked by the
model, once, and a flag the user did not give is left out, so the model's default is the default
(or the value of a ``--config`` file, for commands that take one). Adding an option is one edit:
a field.

A field says how it differs on the command line in ``json_schema_extra``:

- ``flag``: the flag's name when it is not the field's (``--api-key`` for ``api_keys``);
- ``cli: False``: not a flag (set by the command itself, or in a config file);
- ``csv: True``: a list given as ``a,b,c`` (repeatable too: ``--suite a --suite b,c``);
- ``flags`` on a nested model field: the only fields of that model offered as flags.

``dict[str, str]`` fields take repeated ``KEY=VALUE`` flags. Only typer, click and pydantic are
imported here: building the command line must not cost a torch import.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import typer.main
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from omniserve.validation import describe_validation_error

M = TypeVar("M", bound=BaseModel)

#: Exit code of every option mistake: a usage error, reported before anything heavy starts.
EXIT_USAGE = 2


@dataclass(frozen=True)
class Flag:
    """One field of an option model as a command-line flag."""

    name: str  # the python parameter name typer sees (unique in the command)
    path: tuple[str, ...]  # where the value goes in the model: ("server", "media", "video_fps")
    annotation: Any  # the type typer parses
    default: Any  # shown in --help; None where the model's default is computed or a collection
    help: str
    kind: str  # "value" | "list" | "csv" | "mapping"

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


class OptionError(ValueError):
    """A flag, a config file or a combination of options the model refuses; exit code 2."""

    exit_code = EXIT_USAGE


def flags_of(model: type[BaseModel]) -> list[Flag]:
    """Every flag ``model`` offers, nested option models flattened, in field order."""
    return list(_flags(model, (), None))


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def _flags(model: type[BaseModel], prefix: tuple[str, ...], only: Sequence[str] | None) -> Iterator[Flag]:
    for field, info in model.model_fields.items():
        extra = _extra(info)
        if extra.get("cli") is False or (only is not None and field not in only):
            continue
        inner = _nested_model(info.annotation)
        if inner is not None:
            yield from _flags(inner, (*prefix, field), extra.get("flags"))
            continue
        yield _flag(field, info, extra, (*prefix, field))


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _flag(field: str, info: FieldInfo, extra: dict[str, Any], path: tuple[str, ...]) -> Flag:
    base = _without_none(info.annotation)
    origin = typing.get_origin(base)
    # shown in --help; a required field has none either: the model says "field required" when it is left
    # out, since a group's callback (eval) must parse without its flags when a subcommand runs
    default: Any = None
    if not info.is_required() and info.default_factory is None and isinstance(info.default, str | int | float | Path):
        default = info.default
    help_text = info.description or ""
    if extra.get("csv"):
        kind, annotation = "csv", list[str]
        help_text += " Comma-separated, or repeat the flag."
    elif origin is dict:
        kind, annotation = "mapping", list[str]
        help_text += " KEY=VALUE, repeatable."
    elif origin in (list, tuple):
        kind, annotation = "list", list.__class_getitem__(typing.get_args(base)[0])
        help_text += " Repeatable."
    else:
        kind, annotation = "value", base
    if default is None and kind == "value":
        annotation = annotation | None
    return Flag(
        name=str(extra.get("flag", field)).replace("-", "_"),
        path=path,
        annotation=annotation,
        default=default,
        help=help_text,
        kind=kind,
    )


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def options_command(
    model: type[M], *, config_file: bool = False
) -> Callable[[Callable[[M], None]], Callable[..., None]]:
    """A typer command whose flags are ``model``'s fields; the decorated body receives the validated model.

    With ``config_file``, ``--config FILE`` (YAML or JSON, the model's own field names, nested
    sections as mappings) supplies values that flags given on the command line override.
    """
    flags = flags_of(model)

    def decorate(body: Callable[[M], None]) -> Callable[..., None]:
        @functools.wraps(body)
        def command(ctx: typer.Context, **values: Any) -> None:
            if ctx.invoked_subcommand is not None:  # a group's own options apply only when it runs itself
                return
            given = _given(ctx, values)
            config = given.pop("config", None)
            try:
                options = parse_options(model, given, base=load_config_file(config) if config else None)
            except OptionError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(exc.exit_code) from None
            body(options)

        params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        params += [_parameter(flag) for flag in flags]
        if config_file:
            option = typer.Option(
                help="YAML or JSON file of these options (field names as in the docs, sections nested); "
                "flags given here override it."
            )
            params.append(
                inspect.Parameter(
                    "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, option]
                )
            )
        # typer reads the parameters from the signature: these are the model's fields, not ``**values``
        vars(command)["__signature__"] = inspect.Signature(params)
        command.__annotations__ = {}
        return command

    return decorate


def _parameter(flag: Flag) -> inspect.Parameter:
    declaration = flag.option
    if flag.annotation is bool or flag.annotation == bool | None:  # --x / --no-x (None: neither given)
        declaration = f"{flag.option}/--no-{flag.option.removeprefix('--')}"
    option = typer.Option(declaration, help=flag.help, show_default=flag.default not in (None, ...))
    return inspect.Parameter(
        flag.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=flag.default,
        annotation=Annotated[flag.annotation, option],
    )


def parse_options(model: type[M], given: Mapping[str, Any], *, base: Mapping[str, Any] | None = None) -> M:
    """``model`` from flag values (by parameter name) over ``base`` (a config mapping); ``OptionError`` if refused."""
    flags = {flag.name: flag for flag in flags_of(model)}
    data: dict[str, Any] = _deep_copy(base or {})
    for name, value in given.items():
        flag = flags.get(name)
        if flag is None:
            raise OptionError(f"unknown option {name!r}")
        target = data
        for part in flag.path[:-1]:
            target = target.setdefault(part, {})
        target[flag.path[-1]] = _convert(flag, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise OptionError(_describe(exc, flags.values())) from None


def parse_argv(model: type[M], argv: Sequence[str], *, what: str, config_file: bool = True) -> M:
    """``model`` from a command line of its flags (another command's flags passed through, e.g. ``--deploy-arg``)."""
    command = typer.main.get_command(_single_command_app(model, config_file))
    try:
        with command.make_context(what, list(argv)) as ctx:
            given = _given(ctx, ctx.params)
    except typer.TyperException as exc:  # typer's own parse errors (unknown flag, bad value)
        raise OptionError(f"{what}: {exc}") from None
    config = given.pop("config", None)
    return parse_options(model, given, base=load_config_file(config) if config else None)


def _given(ctx: typer.Context, values: Mapping[str, Any]) -> dict[str, Any]:
    """The flags given on the command line; a flag left out must not override a config file or a default."""
    given = {}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name != "DEFAULT":
            given[name] = value
    return given


@functools.cache
def _single_command_app(model: type[BaseModel], config_file: bool) -> typer.Typer:
    app = typer.Typer(add_completion=False)

    def accept(options: BaseModel) -> None:
        """Parse only."""

    app.command()(options_command(model, config_file=config_file)(accept))
    return app


def load_config_file(path: Path) -> dict[str, Any]:
    """A ``--config`` file's mapping; JSON is YAML, so one parser reads both."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionError(f"--config {path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"--config {path}: not valid YAML or JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError(f"--config {path}: expected a mapping of option names to values")
    return data


def _convert(flag: Flag, value: Any) -> Any:
    if flag.kind == "mapping":
        return parse_key_values(value or [], flag.option)
    if flag.kind == "csv":
        items = value if isinstance(value, list | tuple) else [value]
        return [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if flag.kind == "list":
        return list(value or [])
    return value


def to_argv(flag: Flag, value: Any) -> list[str]:
    """``value`` as the command-line words that parse back to it (for a command another machine runs)."""
    if flag.annotation is bool or flag.annotation == bool | None:
        return [flag.option if value else f"--no-{flag.option.removeprefix('--')}"]
    if flag.kind == "mapping":
        return [word for key, item in dict(value).items() for word in (flag.option, f"{key}={item}")]
    if flag.kind in ("list", "csv"):
        return [word for item in value for word in (flag.option, str(item))]
    return [flag.option, str(value)]


def parse_key_values(items: Sequence[str], option: str) -> dict[str, str]:
    """``["k=v", ...]`` as a mapping; a malformed item is an ``OptionError`` naming ``option``."""
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{option}: expected KEY=VALUE, got {item!r}")
        parsed[key.strip()] = value.strip()
    return parsed


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _describe(exc: ValidationError, flags: Iterable[Flag]) -> str:
    """The first problem, named by its flag when it concerns one field (``--max-queue: ...``)."""
    by_location = {".".join(flag.path): flag.option for flag in flags}
    problem = describe_validation_error(exc, strip=(), union_tags=())
    location = problem.location or ""
    text = problem.message.removeprefix(f"{location}: ") if location else problem.message
    while location:
        if location in by_location:
            return f"invalid option: {by_location[location]}: {text}"
        location = location.rpartition("[")[0] if location.endswith("]") else location.rpartition(".")[0]
    return f"invalid option: {problem.message}"  # a config file's own key, or the options as a whole
