"""`medcli plugins`: what can be passed to ``--loss``, where each name comes from, and whether it works.

``plugins list`` reads installed metadata only (no plugin code runs); ``--check`` imports each plugin in
isolation, builds it and runs a forward/backward smoke test, and exits 7 if anything is broken.
"""

from __future__ import annotations

import typer

from medcli.cli import console

_STYLE = {
    "builtin": "dim",
    "unchecked": "cyan",
    "ok": "green",
    "error": "red",
    "invalid": "red",
    "shadowed": "yellow",
    "conflict": "red",
}


def list_plugins(
    check: bool = typer.Option(
        False, "--check", help="Import every plugin, build it and smoke-test it; exit 7 if any is broken."
    ),
    builtins: bool = typer.Option(
        True, "--builtins/--no-builtins", help="Also list the built-in losses (every name --loss accepts)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
) -> None:
    """List loss plugins (entry-point group medcli.losses) and built-in losses, with their status."""
    from medcli import plugins
    from medcli.errors import PluginError
    from medcli.losses import PLUGIN_GROUP, list_losses

    if plugins.plugins_disabled():
        console.info(f"plugin discovery is off ({plugins.ENV_DISABLE} is set); listing built-ins only")
    records = list_losses(check=check, builtins=builtins)
    broken = [r for r in records if r.broken]

    if as_json:
        console.print_json([r.to_dict() for r in records])
    else:
        _print_table(records, PLUGIN_GROUP)
        if not check and any(r.status == "unchecked" for r in records):
            console.info("a plain list does not import plugins; `medcli plugins list --check` tests them")

    if check and broken:
        names = ", ".join(f"{r.name} ({r.distribution}: {r.status})" for r in broken)
        raise PluginError(
            f"{len(broken)} loss plugin{'s' if len(broken) != 1 else ''} broken: {names}",
            hint="see the table for each error; reinstall, upgrade or uninstall the distribution",
        )


def _print_table(records, group: str) -> None:

    table = console.table(f"{group} (use with --loss NAME)")
    table.add_column("name", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("distribution")
    table.add_column("details", overflow="fold")
    for r in records:
        style = _STYLE.get(r.status, "")
        # Plugin code and metadata are not ours: printed as they are (the console takes no markup).
        table.add_row(r.name, console.styled(r.status, style), r.source, r.error or r.summary)
    if not records:
        table.caption = "no losses found"
    console.out.print(table)


def register(root: typer.Typer) -> None:
    """Add the `plugins` group to the root app."""
    sub = typer.Typer(
        help="Installed plugins (loss functions) and their status (`medcli plugins` alone: the list).",
        invoke_without_command=True,
        rich_markup_mode="rich",
    )

    @sub.callback()
    def default(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:  # `medcli plugins`: what it holds, rather than its help
            ctx.invoke(list_plugins, check=False, builtins=True, as_json=False)

    sub.command("list")(list_plugins)
    root.add_typer(sub, name="plugins")
