"""`golf` command line: a thin typer layer over the library, one section per pipeline stage.

Every `GolfError` (bad shard, corrupt artifact, wrong tokenizer, bad config value) becomes one
line on stderr and a non-zero exit; nothing here holds logic the library does not.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from golf.config import GolfError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter Golf toolkit: data → train → quantize → pack → eval → submit.")
data_app = typer.Typer(no_args_is_help=True, help="Shards: inspect, build, download.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="SentencePiece tokenizers with the official settings.")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")

PresetOpt = typer.Option("tiny", "--preset", "-p", help="tiny | baseline | record")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: key=value (repeatable).")
ConfigFileOpt = typer.Option(None, "--config", help="A saved config.json instead of a preset.")


def config_from_cli(preset: str, overrides: Optional[List[str]], config_file: Optional[str] = None):
    return load_config(preset, overrides or [], config_file=config_file)


@app.command("config")
def config_cmd(preset: str = PresetOpt, overrides: Optional[List[str]] = SetOpt,
               config_file: Optional[str] = ConfigFileOpt) -> None:
    """Print the resolved config (preset → env vars → --set) as JSON."""
    typer.echo(config_from_cli(preset, overrides, config_file).to_json())


# ---- data commands ----

# ---- train commands ----

# ---- quant and pack commands ----

# ---- eval commands ----

# ---- submit commands ----


def main() -> None:
    try:
        app()
    except GolfError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
