"""The ``safesteer`` command: the main typer app, which registers the commands of the other
``safesteer.cli`` modules (one module per command group) and is the console-script entry point.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from safesteer import __version__
from safesteer.cli.analyze import analyze
from safesteer.cli.calibrate import calibrate_command
from safesteer.cli.combined_gate import fit_combined_gate_command
from safesteer.cli.common import err, quiet_libraries
from safesteer.cli.datasets import datasets_app
from safesteer.cli.eval import compare, demo, eval_command, report
from safesteer.cli.export import export_app, import_app
from safesteer.cli.models import models_app
from safesteer.cli.organism import organism_app
from safesteer.cli.run import fit_scans_command, generate, run
from safesteer.cli.safeswitch import chat_command, fit_safeswitch_command
from safesteer.cli.serve import serve_command
from safesteer.cli.stage1_threshold import fit_safeswitch_threshold_command

app = typer.Typer(
    help="Make chat models refuse what they should and answer what they should.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
fit_app = typer.Typer(help="Fit a method and write its artifact.", no_args_is_help=True)
app.add_typer(fit_app, name="fit")
app.add_typer(datasets_app, name="datasets")
app.add_typer(models_app, name="models")
app.add_typer(organism_app, name="organism")
app.add_typer(export_app, name="export")
app.add_typer(import_app, name="import")
fit_app.command("safeswitch")(fit_safeswitch_command)
app.command("chat")(chat_command)
app.command("calibrate")(calibrate_command)
app.command("serve")(serve_command)
app.command()(run)
fit_app.command("scans")(fit_scans_command)
fit_app.command("combined-gate")(fit_combined_gate_command)
fit_app.command("safeswitch-threshold")(fit_safeswitch_threshold_command)
app.command()(generate)
app.command("eval")(eval_command)
app.command()(demo)
app.command()(report)
app.command()(compare)
app.command()(analyze)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()
    quiet_libraries()


def main() -> None:
    """Entry point of the ``safesteer`` command."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; finished rows are kept and the run resumes when started again")
        sys.exit(130)
