"""The ``genrerank`` command line. Heavy modules are imported inside commands for a fast start."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad-input exceptions into a one-line error and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from genrerank.data.schema import DataValidationError

        try:
            return fn(*args, **kwargs)
        except (DataValidationError, FileNotFoundError, FileExistsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as int, float or bool when they look like one."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--option")
        key, raw = pair.split("=", 1)
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out[key.strip()] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="genrerank")
def main() -> None:
    """genrerank: generative re-ranking for recommender systems."""


@main.command()
@click.option("--preset", default="kuaishou", show_default=True, help="avito, kuaishou or large.")
@click.option("--requests", "n_requests", type=click.IntRange(1), default=10_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_user_errors
def simulate(preset: str, n_requests: int, seed: int, out_dir: Path, overwrite: bool) -> None:
    """Generate logged requests from the ground-truth simulator."""
    from genrerank.data.simulator import simulate_to_dir

    path = simulate_to_dir(preset, n_requests, seed, out_dir, overwrite=overwrite)
    click.echo(f"wrote {n_requests} {preset} requests to {path}")


@main.group()
def data() -> None:
    """Convert real logs and inspect data sets."""


@data.command("convert")
@click.option("--format", "fmt", required=True, help="mind, ebnerd, avito or kuairand.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--option", "options", multiple=True, help="Loader option key=value (repeatable).")
@_user_errors
def convert_cmd(
    fmt: str, input_path: Path, out_dir: Path, overwrite: bool, options: tuple[str, ...]
) -> None:
    """Convert a public log format into a genrerank data set folder."""
    from genrerank.data.loaders import convert

    path = convert(fmt, input_path, out_dir, overwrite=overwrite, **_parse_options(options))
    click.echo(f"wrote {path}")


@data.command("stats")
@click.argument("data_dir", type=click.Path(path_type=Path))
@_user_errors
def stats_cmd(data_dir: Path) -> None:
    """Print requests, candidates, list lengths and label rates of a data set."""
    from genrerank.data.stats import dataset_stats, format_stats

    click.echo(format_stats(dataset_stats(data_dir)))


@main.command()
@click.option("--preset", default="kuaishou", show_default=True)
@click.option(
    "--requests", "n_requests", type=click.IntRange(100), default=5_000, show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/demo"),
              show_default=True)
@_user_errors
def demo(preset: str, n_requests: int, seed: int, out_dir: Path) -> None:
    """Simulate logs, evaluate every available re-ranker, print a comparison table."""
    from genrerank.demo import run_demo

    run_demo(preset=preset, n_requests=n_requests, seed=seed, out_dir=out_dir)


if __name__ == "__main__":
    main()
