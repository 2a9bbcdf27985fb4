"""Shared CLI plumbing: the rich console, config loading and friendly failures."""

from __future__ import annotations

import logging
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from epochwise.problems import InputError, Problem, UserError

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo
    from rich.console import Console

    from epochwise.config import Settings
    from epochwise.config.settings import Resolved


class LazyConsole:
    """A rich ``Console`` made on first use: importing rich.console is about a fifth of ``epochwise --help``,
    which prints nothing through it. Every attribute is the real console's."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


console: Any = LazyConsole(highlight=False)
err_console: Any = LazyConsole(stderr=True, highlight=False)

# Settings of every `typer.Typer` of the CLI. Help and usage errors are click's plain text: typer's rich
# renderer (typer.rich_utils) loads rich's markdown, syntax and traceback modules, more than the rest of
# ``epochwise --help`` together (bench/cli_start.py), and it reads help text as rich markup, so
# ``list[float | None]`` in an option's help showed as ``list``. Lines up to 120 columns where the
# terminal has them (click's default stops at 80 and cuts the command list's summaries short).
APP_SETTINGS: dict[str, Any] = {"rich_markup_mode": None, "context_settings": {"max_content_width": 120}}

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="YAML config file (default: $EPOCHWISE_CONFIG, else ./epochwise.yaml when present).",
    exists=True,
    dir_okay=False,
)

PresetOption = typer.Option(
    None,
    "--preset",
    help="Preset to apply over the config file (repeat to compose, later wins): shipped quick_test or "
    "cpu_debug, or NAME.yaml in presets/ beside the config file. Below EPOCHWISE_* and flags.",
)


def config_field(dotted: str) -> FieldInfo:
    """The pydantic field behind a settings path such as ``"train.hyper.learning_rate"``."""
    from epochwise.config import SECTIONS

    section, *parents, leaf = dotted.split(".")
    model: Any = SECTIONS[section]
    for part in parents:
        field = model.model_fields[part]
        model = field.default_factory if field.default_factory is not None else type(field.default)
    return model.model_fields[leaf]


def field_default(dotted: str) -> Any:
    """The default in code of the settings field ``dotted`` (what applies when nothing sets it)."""
    return config_field(dotted).get_default(call_default_factory=True)


def show_default(value: Any) -> str | None:
    """A default as the help shows it (``0.0001``, ``true``, ``all-linear``), None when it is unset."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def field_help(dotted: str, text: str | None = None) -> str:
    """Help of the option that sets ``dotted``: ``text`` (default: the field's description) followed by
    the field's own default and path, e.g. ``Peak learning rate. (default: 0.0001; train.hyper.learning_rate)``.

    The default and the description are read from the config models, so the help never restates them:
    from the table `epochwise.cli.help_table` generates from them while it matches their sources
    (``--help`` then imports no pydantic), else from the models themselves.
    """
    entry = _help_fields().get(dotted)
    if entry is None:
        entry = (config_field(dotted).description or "", show_default(field_default(dotted)))
    description, default = entry
    words = text or description
    where = dotted if default is None else f"default: {default}; {dotted}"
    return f"{words} ({where})".strip()


# The config model sources the generated help table is keyed by (settings.py and presets.py only load them).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
NOT_MODELS = {"settings.py", "presets.py"}
_HELP_FIELDS: dict[str, tuple[str, str | None]] | None = None


def config_digest() -> str:
    """CRC-32 of the config model sources (file names and bytes), the key the table is valid for.

    A change detector, not a security check: zlib loads in a fraction of the time hashlib (OpenSSL) takes.
    """
    digest = 0
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.name not in NOT_MODELS:
            digest = zlib.crc32(path.name.encode() + b"\0" + path.read_bytes() + b"\0", digest)
    return f"{digest:08x}"


def _help_fields() -> dict[str, tuple[str, str | None]]:
    """The generated help table when it was built from the current config sources, else ``{}``."""
    global _HELP_FIELDS
    if _HELP_FIELDS is None:
        import epochwise.cli._help_fields as table  # the module alone: `from epochwise.cli` is the package

        _HELP_FIELDS = table.FIELDS if table.DIGEST == config_digest() else {}
    return _HELP_FIELDS


def prefect_defaults() -> None:
    """Environment defaults that make Prefect's ephemeral API usable on small, offline machines.

    The 20 s ephemeral start-up timeout is too short on 2 loaded cores (cold starts timed out at load
    average ~2.7), and offline every server start logs a "Failed to send telemetry" DNS error.
    Explicit user settings win.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    prefect_logger = logging.getLogger("prefect")
    if not any(isinstance(f, HideTemporaryServerBanner) for f in prefect_logger.filters):
        prefect_logger.addFilter(HideTemporaryServerBanner())


def before_flow_run() -> None:
    """What a command does before it runs a flow: `prefect_defaults`, and Prefect's temporary API server
    (when no ``PREFECT_API_URL`` is set) started in a session of its own.

    In a terminal, Ctrl-C signals the whole foreground process group. Prefect starts its temporary server
    as a child in that group, so Ctrl-C used to stop the server too, and the interrupted run then spent
    minutes retrying to record its end against a dead API (with tracebacks). In its own session the
    server keeps answering while the run cancels its Together jobs and ends; it stops when the CLI exits.
    """
    prefect_defaults()
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    import subprocess

    from prefect.server.api import server as prefect_server

    temporary = prefect_server.SubprocessASGIServer()  # the instance Prefect's get_client() starts
    if getattr(temporary, "_epochwise_own_session", False):
        return
    spawn = temporary._run_uvicorn_command

    def spawn_in_own_session() -> subprocess.Popen:
        popen = subprocess.Popen
        subprocess.Popen = _own_session_popen()  # only for the one Popen call Prefect makes here
        try:
            return spawn()
        finally:
            subprocess.Popen = popen

    temporary._run_uvicorn_command = spawn_in_own_session
    temporary._epochwise_own_session = True


def _own_session_popen() -> type:
    import subprocess

    class OwnSessionPopen(subprocess.Popen):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    return OwnSessionPopen


class HideTemporaryServerBanner(logging.Filter):
    """Drops the lines Prefect logs each time the CLI boots or stops its ephemeral API server
    ("Starting temporary server on http://127.0.0.1:8xxx / See https://docs.prefect.io/..." and
    "Stopping temporary server on ..."): a notice, on every command, about something the CLI chose.
    They are logged by the ``prefect`` logger itself, so a filter there touches no other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Starting temporary server on", "Stopping temporary server on"))


def config_path(config: Path | None) -> Path | None:
    """The config file in use: ``--config``, else ``$EPOCHWISE_CONFIG``, else ``./epochwise.yaml`` when present."""
    if config is not None:
        return config
    env = os.environ.get("EPOCHWISE_CONFIG")
    return Path(env) if env else (Path("epochwise.yaml") if Path("epochwise.yaml").is_file() else None)


def nested(given: dict[str, Any]) -> dict[str, Any]:
    """``{"data.seed": 1}`` -> ``{"data": {"seed": 1}}``."""
    overrides: dict[str, Any] = {}
    for dotted_path, value in given.items():
        node = overrides
        *parents, leaf = dotted_path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return overrides


def resolve_settings(
    config: Path | None,
    presets: list[str] | None = None,
    records: Path | None = None,
    flag_names: dict[str, str] | None = None,
    **flags: Any,
) -> Resolved:
    """`settings`, keeping the layers each value came from (what ``epochwise config show`` prints).

    ``flag_names`` spells the flag of a dotted path in messages when it is not the command's own
    option (``config show --set``).
    """
    import yaml
    from pydantic import ValidationError

    from epochwise.config.presets import find_preset, records_config
    from epochwise.config.settings import UnknownSettingError, read_layers, validate_layers

    config = config_path(config)
    given = {dotted_path: value for dotted_path, value in flags.items() if value is not None}
    layers: list[Any] = []
    try:
        files = [find_preset(name, config) for name in presets or []]
        records_file = records_config(records) if records is not None else None
        layers = read_layers(config, nested(given), files, records_file, line_of=yaml_line)
        resolved = validate_layers(layers)
    except UnknownSettingError as exc:
        fail_lines(exc.lines)
    except ValidationError as exc:
        fail_lines([config_problem(error, layers, given, flag_names) for error in exc.errors()])
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        name = getattr(mark, "name", None) or config
        where = f"{name}:{mark.line + 1}" if mark is not None else str(name)
        fail_lines([f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}"])
    except (FileNotFoundError, ValueError) as exc:
        fail_lines([str(exc)])
    return resolved


def defaults_apply(config: Path | None, presets: list[str] | None = None) -> bool:
    """Whether nothing can set a setting: no config file (`config_path`), no preset, no ``EPOCHWISE_*``
    variable. `settings` would then return the defaults in code, so a command that needs one default
    may read it directly and skip pydantic-settings and YAML (a tenth of ``epochwise validate``)."""
    if config_path(config) is not None or presets:
        return False
    return not any(name.upper().startswith(ENV_PREFIX_) for name in os.environ)


def settings(
    config: Path | None, presets: list[str] | None = None, records: Path | None = None, **flags: Any
) -> Settings:
    """Load settings; ``flags`` maps dotted paths (``"data.seed"``) to CLI values, ``None`` meaning unset.

    ``presets`` are preset names (``--preset``), applied in order over the config file; ``records`` is
    ``prepare``'s input, whose directory's own ``epochwise.yaml`` supplies ``data.mapping`` below the
    config file. A bad value is reported against whatever set it: the flag (``--epochs: ...``), the
    environment variable (``EPOCHWISE_TRAIN__EPOCHS=0: ...``) or the YAML file or preset and line
    (``epochwise.yaml:12: ...``); an unknown key names its source and the closest valid key.
    """
    return resolve_settings(config, presets, records, **flags).settings


def settings_values(
    config: Path | None, presets: list[str] | None, paths: tuple[str, ...], **flags: Any
) -> dict[str, Any]:
    """The values at the dotted ``paths`` of `settings` (JSON values), answered from the record of an
    earlier passed load of the same inputs when there is one (`epochwise.config.checked`): no YAML, no
    `Settings` validation. Otherwise (or when a preset name does not resolve) the full load runs, with
    its messages, and a pass is recorded."""
    from epochwise.config import checked
    from epochwise.config.presets import find_preset

    config_file = config_path(config)
    given = {dotted_path: value for dotted_path, value in flags.items() if value is not None}
    environment = {k: v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX_)}
    try:
        preset_files = [find_preset(name, config_file) for name in presets or []]
        digest = checked.inputs_digest(config_file, preset_files, environment, given, paths)
    except (OSError, ValueError):  # a missing file or an unknown preset: the full load says which
        digest = None
    if digest is not None and (values := checked.recorded_values(digest)) is not None:
        return values
    loaded = settings(config, presets, **flags)
    values = {}
    for dotted_path in paths:
        node: Any = loaded
        for part in dotted_path.split("."):
            node = getattr(node, part)
        values[dotted_path] = node
    if digest is not None:
        checked.record_values(digest, values)
    return values


# The app, set by `epochwise.cli` once its commands are registered (this module does not import it back).
APP: Any = None

# Settings fields whose flag's parameter is not named like the field's last part.
FLAG_PARAMETERS = {
    "train.local_model": "model",
    "deploy.inactive_timeout_min": "inactive_timeout",
    "data.mapping.format": "mapping_format",
    "data.mapping.columns": "column",
}


def config_problem(
    error: Any, layers: list[Any], flags: dict[str, Any], flag_names: dict[str, str] | None = None
) -> str:
    """One pydantic error as ``SOURCE: reason``, SOURCE being the flag, variable, file or preset that set it."""
    from epochwise.config.settings import Resolved

    loc = [str(part) for part in error["loc"]]
    reason = error["msg"].removeprefix("Value error, ")  # a validator's own message reads best alone
    reason = reason[:1].lower() + reason[1:]
    found = Resolved(None, layers).source(loc)  # type: ignore[arg-type]
    field = ".".join(loc)
    if found is None:
        return f"settings: {field}: {reason}"
    layer, path = found
    if layer.kind == "flag":
        dotted_path = ".".join(path)
        name = (flag_names or {}).get(dotted_path) or flag_name(dotted_path)
        return f"{name}: {reason} (got {flags.get(dotted_path)!r})"
    if layer.kind == "env":
        variable = ENV_PREFIX_ + "__".join(path).upper()
        value = next((v for k, v in os.environ.items() if k.upper() == variable), None)
        return f"{variable}={value}: {reason}"
    line = yaml_line(layer.path, loc)
    return f"{layer.name}{'' if line is None else f':{line}'}: {field}: {reason}"


ENV_PREFIX_ = "EPOCHWISE_"


def source_text(layer: Any, path: list[str], flag_names: dict[str, str] | None = None) -> str:
    """Where a value came from, for ``config show``: ``epochwise.yaml:4``,
    ``preset quick_test (.../quick_test.yaml:6)``, ``EPOCHWISE_TRAIN__EPOCHS``, ``--epochs``."""
    if layer.kind == "flag":
        dotted_path = ".".join(path)
        return (flag_names or {}).get(dotted_path) or flag_name(dotted_path)
    if layer.kind == "env":
        return ENV_PREFIX_ + "__".join(path).upper()
    line = yaml_line(layer.path, path)
    where = f"{layer.name}{'' if line is None else f':{line}'}"
    if layer.kind == "preset":
        return f"preset {layer.label} ({where})"
    return f"the records' {where}" if layer.kind == "records" else where


def flag_name(dotted: str) -> str:
    """The command-line spelling (``--lr``) of the flag that sets the settings field ``dotted``.

    Flags are looked up by parameter name in every command of the app (a name is spelled the same
    in every command that has it); the shortest long form is shown.
    """
    import typer.main

    parameter = FLAG_PARAMETERS.get(dotted, dotted.rsplit(".", 1)[-1])
    commands = [typer.main.get_command(APP)] if APP is not None else []
    while commands:
        command = commands.pop()
        commands.extend(getattr(command, "commands", {}).values())
        for param in command.params:
            longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
            if param.name == parameter and longs:
                return min(longs, key=len)
    return "--" + parameter.replace("_", "-")


def yaml_line(path: Path, loc: list[str]) -> int | None:
    """1-based line of the deepest key of ``loc`` found in the YAML file (None when absent)."""
    import yaml

    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == key), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def print_line(text: str, err: bool = False) -> None:
    """``text`` and a newline on stdout (stderr with ``err``), as it is: never wrapped, no rich markup and
    no emoji codes (rich turns ``:x:`` in a path or reason into an emoji even with ``markup=False``).
    Plain ``print``, so ``epochwise validate`` does not import rich.console to report a line."""
    print(text, file=sys.stderr if err else sys.stdout, flush=err)


def fail_lines(lines: list[str], code: int = 1) -> NoReturn:
    for line in lines:
        print_line(line, err=True)  # one problem per line, never wrapped
    raise typer.Exit(code)


def report_problems(problems: list[Problem]) -> NoReturn:
    fail_lines([str(p) for p in problems] + [f"{len(problems)} problem(s) found"])


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn expected failures (bad input, missing files or keys) into clear messages and exit code 1."""
    try:
        with quiet_user_errors():
            yield
    except InputError as exc:
        report_problems(exc.problems)
    except (FileNotFoundError, UserError) as exc:
        fail_lines([f"error: {exc}"])
    except RuntimeError as exc:
        if not str(exc).startswith(EPHEMERAL_TIMEOUT):
            raise
        fail_lines([ephemeral_timeout_message()])
    except KeyboardInterrupt:  # the run cancelled its Together jobs and recorded its end (see before_flow_run)
        fail_lines(["interrupted"], code=130)


def run_ended(exc: BaseException) -> str:
    """How a flow run called in this process ended, from what the call raised: cancelled, crashed or failed.

    Commands take a flow's value from the call itself (``flow(...)``), never from ``return_state=True``
    and ``state.result()``: when the API answers the final Completed proposal too slowly, the client
    sends it again, the API refuses the duplicate and the engine keeps the API's copy of the state,
    which carries no value unless results are persisted (``MissingResult`` after a run that did its
    work). The call returns the value the flow returned in this process either way."""
    from prefect.exceptions import CancelledRun, CrashedRun

    return "cancelled" if isinstance(exc, CancelledRun) else "crashed" if isinstance(exc, CrashedRun) else "failed"


# What Prefect raises when its ephemeral API server does not answer in time (prefect.server.api.server).
EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def ephemeral_timeout_message() -> str:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout

    return (
        f"error: Prefect's temporary API server did not start within {timeout.value()} s (a busy machine?): "
        "rerun, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `prefect server start` "
        "and set PREFECT_API_URL"
    )


def is_user_error(exc: BaseException | None) -> bool:
    """Whether a failure is one the CLI explains in a line (no traceback helps the user)."""
    return isinstance(exc, (UserError, FileNotFoundError))


class HideUserErrorFailures(logging.Filter):
    """Console-only filter: drops Prefect's failure records of a run that failed on a user error.

    Prefect's task and flow engines log a failure twice: "...failed with exception" with the
    traceback, then "Finished in state Failed(...)". Both also go to the run's log in Prefect's API
    (a separate handler, untouched), so the UI keeps the full traceback; on screen the CLI prints the
    ``path:line: reason`` lines instead. Any other failure is shown as Prefect logs it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failed_runs: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        run = str(getattr(record, "task_run_id", None) or getattr(record, "flow_run_id", None))
        if record.exc_info and is_user_error(record.exc_info[1]):
            self.failed_runs.add(run)
            return False
        return not (run in self.failed_runs and record.getMessage().startswith("Finished in state"))


@contextmanager
def quiet_user_errors() -> Iterator[None]:
    """While running flows from the CLI, keep user-error tracebacks off Prefect's console handler."""
    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    quiet = HideUserErrorFailures()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def dotted(**kwargs: Any) -> dict[str, Any]:
    """``dotted(data__seed=1)`` -> ``{"data.seed": 1}``: CLI flag names to settings paths."""
    return {k.replace("__", "."): v for k, v in kwargs.items()}


Command = Callable[..., Any]


def print_table(table: Any) -> None:
    """A rich table on stdout; piped or redirected, it takes the width it needs, so ids and model
    names are never cut to 80 columns ("comple…")."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.console import Console
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update_width(100_000), table).maximum
    Console(highlight=False, width=max(console.width, needed), file=console.file).print(table)


def print_json(data: Any) -> None:
    """``data`` as JSON on stdout for scripts: plain text, no colours, never wrapped."""
    import json

    print(json.dumps(data, indent=2, default=str))
