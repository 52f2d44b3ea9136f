"""A small command-line parser that answers like pueue's (clap): usage errors exit with 2.

Only what the project relies on is modelled: flag/value/greedy-list options, clusters of
short flags, `--opt=value`, a trailing command that swallows everything after its first
word, and `--color` accepted only before the subcommand.
"""

from __future__ import annotations

import sys

USAGE_EXIT = 2


class UsageError(Exception):
    pass


class Option:
    # Plain classes, not dataclasses: importing dataclasses costs ~15 ms per client call.
    def __init__(self, dest, short, long, kind="flag", number=False, signed=False):
        self.dest = dest
        self.short = short
        self.long = long
        self.kind = kind  # "flag", "value" (one value) or "values" (greedy list)
        self.number = number  # values must be non-negative integers (ids, counts)
        self.signed = signed  # an integer that may be negative (priority)

    @property
    def display(self) -> str:
        if self.kind == "flag":
            return f"--{self.long}"
        placeholder = f"<{self.long.upper().replace('-', '_')}>"
        return f"--{self.long} {placeholder}" + ("..." if self.kind == "values" else "")


class Command:
    def __init__(
        self,
        name,
        options=(),
        positional=None,
        positional_kind="ids",
        positional_required=False,
        subcommands=None,
    ):
        self.name = name
        self.options = options
        self.positional = positional  # dest of positional values
        self.positional_kind = positional_kind  # "ids", "words" (trailing command), "one" or "number"
        self.positional_required = positional_required
        self.subcommands = subcommands or {}

    def usage(self, prefix: str) -> str:
        tail = " [OPTIONS]"
        if self.subcommands:
            tail += " [COMMAND]"
        if self.positional:
            name = f"<{self.positional.upper()}>"
            if self.positional_kind in ("ids", "words"):
                name += "..."
            tail += f" {name}" if self.positional_required else f" [{name}]"
        return f"{prefix} {self.name}{tail}"


def _opt(dest, short, long=None, kind="flag", **flags) -> Option:
    return Option(dest, short, long or dest.replace("_", "-"), kind, **flags)


GROUP_OPTION = _opt("group", "g", kind="value")
JSON_OPTION = _opt("json", "j")

COMMANDS = {
    command.name: command
    for command in (
        Command(
            "add",
            (
                GROUP_OPTION,
                _opt("label", "l", kind="value"),
                _opt("print_task_id", "p"),
                _opt("working_directory", "w", kind="value"),
                _opt("escape", "e"),
                _opt("immediate", "i"),
                _opt("stashed", "s"),
                _opt("priority", "o", kind="value", signed=True),
                _opt("after", "a", kind="values", number=True),
            ),
            positional="command",
            positional_kind="words",
            positional_required=True,
        ),
        Command("status", (JSON_OPTION, GROUP_OPTION)),
        Command(
            "log",
            (JSON_OPTION, _opt("lines", "l", kind="value", number=True), _opt("full", "f")),
            positional="task_ids",
        ),
        Command("kill", (GROUP_OPTION, _opt("all", "a")), positional="task_ids"),
        Command(
            "group",
            (JSON_OPTION,),
            subcommands={
                "add": Command(
                    "add",
                    (_opt("parallel", "p", kind="value", number=True),),
                    positional="name",
                    positional_kind="one",
                    positional_required=True,
                ),
                "remove": Command(
                    "remove", positional="name", positional_kind="one", positional_required=True
                ),
            },
        ),
        Command(
            "parallel",
            (GROUP_OPTION,),
            positional="parallel_tasks",
            positional_kind="number",
            positional_required=True,
        ),
        Command("clean", (_opt("successful_only", "s"), GROUP_OPTION)),
        Command("remove", positional="task_ids", positional_required=True),
        Command("start", (GROUP_OPTION, _opt("all", "a")), positional="task_ids"),
        Command("pause", (GROUP_OPTION, _opt("all", "a"), _opt("wait", "w")), positional="task_ids"),
        Command("reset", (_opt("force", "f"),)),
        Command("shutdown"),
    )
}

COLOR_CHOICES = ("auto", "always", "never")


def parse_client_args(argv: list[str]) -> tuple[list[str], dict]:
    """(subcommand path, options) for a pueue command line, or raise UsageError."""
    args = list(argv)
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("-V", "--version"):
            return ["version"], {}
        if flag == "--color" or flag.startswith("--color="):
            value = flag.partition("=")[2] if "=" in flag else (args.pop(0) if args else "")
            if value not in COLOR_CHOICES:
                raise UsageError(
                    f"invalid value '{value}' for '--color <COLOR>'\n"
                    f"  [possible values: {', '.join(COLOR_CHOICES)}]"
                )
            continue
        if flag == "-v":
            continue
        raise UsageError(f"unexpected argument '{flag}' found")
    if not args:
        return ["status"], {"json": False, "group": None}
    name = args.pop(0)
    command = COMMANDS.get(name)
    if command is None:
        raise UsageError(f"unrecognized subcommand '{name}'")
    return _parse_command(command, args, [name], "pueue")


def _parse_command(command: Command, args: list[str], path: list[str], prefix: str):
    values: dict = {option.dest: _empty(option) for option in command.options}
    positionals: list[str] = []
    index = 0
    try:
        while index < len(args):
            arg = args[index]
            index += 1
            if arg == "--":
                positionals.extend(args[index:])
                break
            if command.positional_kind == "words" and positionals:
                positionals.append(arg)  # the command swallows everything after its first word
            elif arg.startswith("--"):
                index = _take_long(command, arg, args, index, values)
            elif arg.startswith("-") and len(arg) > 1:
                index = _take_shorts(command, arg, args, index, values)
            elif command.subcommands and not positionals and arg in command.subcommands:
                sub_path, sub_values = _parse_command(
                    command.subcommands[arg], args[index:], path + [arg], f"{prefix} {command.name}"
                )
                return sub_path, {**values, **sub_values}
            else:
                positionals.append(arg)
        values.update(_positional_values(command, positionals))
    except UsageError as error:
        raise UsageError(f"{error}\n\nUsage: {command.usage(prefix)}") from None
    return path, values


def _empty(option: Option):
    return {"flag": False, "value": None, "values": []}[option.kind]


def _find(command: Command, *, short: str | None = None, long: str | None = None) -> Option:
    for option in command.options:
        if (short and option.short == short) or (long and option.long == long):
            return option
    raise UsageError(f"unexpected argument '{'-' + short if short else '--' + long}' found")


def _take_long(command: Command, arg: str, args: list[str], index: int, values: dict) -> int:
    name, has_value, inline = arg[2:].partition("=")
    option = _find(command, long=name)
    if option.kind == "flag":
        if has_value:
            raise UsageError(f"unexpected value '{inline}' for '{arg}' found; no more were expected")
        values[option.dest] = True
        return index
    return _take_values(option, inline if has_value else None, args, index, values)


def _take_shorts(command: Command, arg: str, args: list[str], index: int, values: dict) -> int:
    letters = arg[1:]
    for position, letter in enumerate(letters):
        option = _find(command, short=letter)
        if option.kind == "flag":
            values[option.dest] = True
            continue
        rest = letters[position + 1 :].removeprefix("=")
        return _take_values(option, rest or None, args, index, values)
    return index


def _take_values(option: Option, inline: str | None, args: list[str], index: int, values: dict) -> int:
    taken = [] if inline is None else [inline]
    if inline is None or option.kind == "values":
        while index < len(args) and not args[index].startswith("-"):
            taken.append(args[index])
            index += 1
            if option.kind == "value":
                break
    if not taken:
        raise UsageError(f"a value is required for '{option.display}' but none was supplied")
    converted = [_convert(option, value) for value in taken]
    values[option.dest] = converted if option.kind == "values" else converted[0]
    return index


def _convert(option: Option, value: str):
    if not (option.number or option.signed):
        return value
    digits = value[1:] if option.signed and value.startswith("-") else value
    if not digits.isdigit():
        raise UsageError(
            f"invalid value '{value}' for '{option.display}': invalid digit found in string"
        )
    return int(value)


def _positional_values(command: Command, positionals: list[str]) -> dict:
    if not command.positional:
        if positionals:
            raise UsageError(f"unexpected argument '{positionals[0]}' found")
        return {}
    placeholder = f"<{command.positional.upper()}>"
    if command.positional_required and not positionals:
        raise UsageError(f"the following required arguments were not provided:\n  {placeholder}")
    kind = command.positional_kind
    if kind in ("one", "number") and len(positionals) > 1:
        raise UsageError(f"unexpected argument '{positionals[1]}' found")
    if kind in ("ids", "number"):
        for value in positionals:
            if not value.isdigit():
                raise UsageError(
                    f"invalid value '{value}' for '[{placeholder}...]': invalid digit found in string"
                )
        numbers = [int(value) for value in positionals]
        return {command.positional: numbers[0] if kind == "number" else numbers}
    if kind == "one":
        return {command.positional: positionals[0] if positionals else None}
    return {command.positional: positionals}


def print_usage_error(error: UsageError) -> int:
    sys.stderr.write(f"error: {error}\n\nFor more information, try '--help'.\n")
    return USAGE_EXIT
