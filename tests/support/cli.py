"""Checks of command lines written outside Python (systemd units, compose files, scripts)
against the real `fedclip-edge` commands, so a renamed flag breaks a test, not a fleet."""

from __future__ import annotations


def command_options() -> dict[str, set[str]]:
    """Every `fedclip-edge` command (and sub-command) -> the option names it accepts."""
    import typer

    from fedclip_edge.cli import _register_parts, app

    _register_parts()
    out: dict[str, set[str]] = {}

    def walk(cmd, prefix: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            path = f"{prefix} {name}".strip()
            out[path] = {o for p in sub.params for o in (*p.opts, *p.secondary_opts)}
            walk(sub, path)

    walk(typer.main.get_command(app), "")
    return out


def check_invocation(args: list[str], where: str) -> None:
    """`args` = [command words..., options...] as given to `fedclip-edge`: each option exists."""
    options = command_options()
    words = []
    for a in args:
        if a.startswith("-"):
            break
        words.append(a)
    command = " ".join(words)
    assert command in options, f"{where}: no `fedclip-edge {command}` command"
    for a in args[len(words) :]:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            assert flag in options[command], f"{where}: `fedclip-edge {command}` has no {flag}"


