"""The ``genrerank`` command line. Heavy modules are imported inside commands for a fast start."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
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


def _validation_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--no-validate``: skip the full check of a data set on read (trusted data only)."""

    def callback(_: click.Context, __: click.Parameter, no_validate: bool) -> None:
        if no_validate:
            from genrerank.data.schema import set_validate_on_read

            set_validate_on_read(False)

    return click.option(
        "--no-validate", is_flag=True, expose_value=False, callback=callback,
        help="Trusted data: skip checking every request on read (types and the spec still are).",
    )(fn)


_CONSTRAINTS_HELP = ("Business constraints every list must satisfy (JSON or TOML: quotas, "
                     "max_per_creator, required, forbidden, spacing; README 'Constraints').")


def _load_constraints(path: Path | None) -> Any:
    """The ConstraintSet of ``--constraints FILE`` (None without one)."""
    if path is None:
        return None
    from genrerank.constraints import load_constraints

    return load_constraints(path)


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


class _NamesOption(click.Option):
    """An option whose help lists a registry's names (``{names}`` in its help), read when the
    help is shown: a new model, decoder, loader or preset appears without editing this file,
    and a command that shows no help imports no registry."""

    def __init__(self, *args: Any, names: Callable[[], Iterable[str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._names = names
        self._help_template = self.help or ""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self._help_template.format(names=", ".join(sorted(self._names())))
        return super().get_help_record(ctx)


def _model_names() -> Iterable[str]:
    from genrerank.registry_names import MODEL_NAMES  # the models import torch; see there

    return MODEL_NAMES


def _decoder_names() -> Iterable[str]:
    from genrerank.registry_names import DECODER_NAMES

    return DECODER_NAMES


def _loader_names() -> Iterable[str]:
    from genrerank.data.loaders import LOADERS

    return LOADERS


def _preset_names() -> Iterable[str]:
    from genrerank.data.simulator.presets import PRESETS

    return PRESETS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="genrerank")
def main() -> None:
    """genrerank: generative re-ranking for recommender systems."""


@main.command()
@click.option("--preset", default="kuaishou", show_default=True, cls=_NamesOption,
              names=_preset_names, help="Simulator preset: {names}.")
@click.option("--requests", "n_requests", type=click.IntRange(1), default=10_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--shard-requests", type=click.IntRange(1), default=None,
              help="Write shards of this many requests (OUT/requests/part-*.parquet), chunk by "
                   "chunk with bounded memory, for data larger than memory.")
@_user_errors
def simulate(preset: str, n_requests: int, seed: int, out_dir: Path, overwrite: bool,
             shard_requests: int | None) -> None:
    """Generate logged requests from the ground-truth simulator."""
    from genrerank.data.simulator import simulate_to_dir

    path = simulate_to_dir(preset, n_requests, seed, out_dir, overwrite=overwrite,
                           shard_requests=shard_requests)
    shards = f" in shards of {shard_requests}" if shard_requests else ""
    click.echo(f"wrote {n_requests} {preset} requests to {path}{shards}")


@main.group()
def data() -> None:
    """Convert real logs and inspect data sets."""


@data.command("convert")
@click.option("--format", "fmt", required=True, cls=_NamesOption, names=_loader_names,
              help="Public log format: {names}.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--option", "options", multiple=True, help="Loader option key=value (repeatable).")
@click.option("--max-candidates", type=click.IntRange(1), default=500, show_default=True,
              help="Refuse requests with more candidates (or drop them: --drop-oversized).")
@click.option("--drop-oversized", is_flag=True,
              help="Drop requests above --max-candidates instead of failing (count reported).")
@_user_errors
def convert_cmd(
    fmt: str, input_path: Path, out_dir: Path, overwrite: bool, options: tuple[str, ...],
    max_candidates: int, drop_oversized: bool,
) -> None:
    """Convert a public log format into a genrerank data set folder."""
    from genrerank.data.loaders import convert
    from genrerank.data.schema import FeatureSpec

    path = convert(fmt, input_path, out_dir, overwrite=overwrite, candidate_cap=max_candidates,
                   drop_oversized=drop_oversized, **_parse_options(options))
    dropped = FeatureSpec.load(path / "feature_spec.json").extra.get("dropped_oversized_requests")
    if dropped:
        click.echo(f"dropped {dropped} request(s) with more than {max_candidates} candidates")
    click.echo(f"wrote {path}")


@data.command("import")
@click.option("--input", "table", type=click.Path(path_type=Path), required=True,
              help="Impressions: a CSV, TSV or Parquet file, or a folder of them.")
@click.option("--mapping", "mapping", type=click.Path(path_type=Path), required=True,
              help="TOML mapping: which column is which, feature kinds, signals, split.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--candidates", "candidates", type=click.Path(path_type=Path), default=None,
              help="Long table of candidates that were not shown (request id, item id, ...).")
@click.option("--format", "fmt", type=click.Choice(["csv", "tsv", "parquet"]), default=None,
              help="Table format; default: from the file extension.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--max-candidates", type=click.IntRange(1), default=500, show_default=True,
              help="Refuse requests with more candidates (or drop them: --drop-oversized).")
@click.option("--drop-oversized", is_flag=True,
              help="Drop requests above --max-candidates instead of failing (count reported).")
@click.option("--allow-missing-splits", is_flag=True,
              help="Write a data set without train or valid requests (evaluation only).")
@click.option("--vocabularies", "vocab_file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="Encode categoricals with an earlier import's vocabularies.json "
                                 "(new logs for a model trained on that import).")
@_user_errors
def import_cmd(
    table: Path, mapping: Path, out_dir: Path, candidates: Path | None, fmt: str | None,
    overwrite: bool, max_candidates: int, drop_oversized: bool, allow_missing_splits: bool,
    vocab_file: Path | None,
) -> None:
    """Import your impression logs as a data set, as described by a TOML mapping.

    Mapping format and every rule: README "Your own logs" and genrerank.data.importer."""
    from genrerank.data.importer import import_result, summary_lines

    vocabularies = None
    if vocab_file is not None:
        import json

        try:
            vocabularies = json.loads(vocab_file.read_text())
        except (OSError, ValueError) as exc:
            raise click.ClickException(
                f"{vocab_file}: not a readable vocabularies.json ({exc})") from exc
    result = import_result(table, mapping, out_dir, overwrite, candidates, fmt=fmt,
                           max_candidates=max_candidates, drop_oversized=drop_oversized,
                           vocabularies=vocabularies)
    path = result.write(out_dir, overwrite=overwrite, allow_missing_splits=allow_missing_splits)
    for line in summary_lines(result.report):
        click.echo(line)
    click.echo(f"wrote {path}")


@data.command("stats")
@click.argument("data_dir", type=click.Path(path_type=Path))
@_validation_option
@_user_errors
def stats_cmd(data_dir: Path) -> None:
    """Print requests, candidates, list lengths and label rates of a data set."""
    from genrerank.data.stats import dataset_stats, format_stats

    click.echo(format_stats(dataset_stats(data_dir)))


@data.command("example")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--requests", "n_requests", type=click.IntRange(1), default=5_000,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def example_cmd(out_dir: Path, n_requests: int, seed: int) -> None:
    """Write a synthetic impressions CSV (OUT/impressions.csv, 10 rows per request) and the
    mapping that imports it (OUT/mapping.toml): a stand-in for your own logs."""
    from genrerank.data.importer.example import EXAMPLE_MAPPING, write_example_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    write_example_csv(out_dir / "impressions.csv", n_requests, seed)
    (out_dir / "mapping.toml").write_text(EXAMPLE_MAPPING)
    click.echo(f"wrote {out_dir / 'impressions.csv'} ({n_requests} requests) and "
               f"{out_dir / 'mapping.toml'}")


@data.command("request")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--split", default="test", show_default=True, help="train, valid or test.")
@click.option("--index", type=click.IntRange(0), default=0, show_default=True,
              help="Which request of the split.")
@click.option("--m", "list_length", type=click.IntRange(1), default=None,
              help="List length to ask for [default: the logged one].")
@_validation_option
@_user_errors
def request_cmd(data_dir: Path, split: str, index: int, list_length: int | None) -> None:
    """Print one request of a data set as the JSON body of POST /v1/rerank (to try a server)."""
    import json

    from genrerank.data.dataset import RerankDataset
    from genrerank.serving.schema import payload_from_dataset

    dataset = RerankDataset(data_dir, split=split)
    if index >= len(dataset):
        raise click.ClickException(f"{data_dir}: split {split!r} has {len(dataset)} requests; "
                                   f"--index {index} is out of range")
    click.echo(json.dumps(payload_from_dataset(dataset, index, m=list_length)))


def _nproc_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--nproc", type=click.IntRange(1), default=1, show_default=True,
        help="Data-parallel processes: runs this command under `torchrun --standalone "
             "--nproc_per_node NPROC` (gloo on CPU, NCCL on GPU); train.batch_size is then "
             "per process.")(fn)


def _relaunch_under_torchrun(nproc: int) -> None:
    """``--nproc N`` outside torchrun: run this same command under it, and exit with its
    status (inside, torchrun's variables are set and the command joins the group)."""
    from genrerank.utils import distributed

    if nproc > 1 and not distributed.launched_by_torchrun():
        from genrerank.training.launch import relaunch

        raise SystemExit(relaunch(nproc))


@main.command()
@click.option("--model", "model_name", required=True, cls=_NamesOption, names=_model_names,
              help="Model: {names}.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="JSON or TOML run config, layered over the model's defaults.")
@click.option("--set", "overrides", multiple=True, help="Override: key=value, e.g. train.lr=3e-4.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last/.")
@click.option("--overwrite", is_flag=True, help="Start over in an existing OUT.")
@click.option("--stream", "streaming", is_flag=True,
              help="Stream the training split by Parquet row groups (bounded memory, for data "
                   "larger than memory; statistics from its first 200,000 requests).")
@_nproc_option
@_validation_option
@_user_errors
def train(model_name: str, data_dir: Path, out_dir: Path, config_path: Path | None,
          overrides: tuple[str, ...], resume: bool, overwrite: bool, streaming: bool,
          nproc: int) -> None:
    """Train a model (train split; early stopping and selection on valid)."""
    from genrerank.utils import distributed

    _relaunch_under_torchrun(nproc)
    from genrerank.experiment import train_run

    try:
        best = train_run(model_name, data_dir, out_dir, config_path, overrides, resume,
                         overwrite, streaming=streaming)
        ctx = distributed.context()
    finally:
        distributed.shutdown()
    if ctx.is_main:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in best.items())
        procs = f" ({ctx.world_size} processes)" if ctx.distributed else ""
        click.echo(f"best (valid): {shown}\nrun saved in {out_dir}{procs}")


@main.command()
@click.option("--generator", "generator_run", type=click.Path(path_type=Path), required=True,
              help="A trained generator run (its lists are sampled and beamed).")
@click.option("--evaluator", "evaluator_run", type=click.Path(path_type=Path), required=True,
              help="A trained list evaluator run (the reward model).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_file", type=click.Path(path_type=Path), required=True,
              help="The pairs Parquet file to write.")
@click.option("--split", "splits", default="train,valid", show_default=True,
              help="Comma-separated splits to pair (train, valid).")
@click.option("--samples", type=click.IntRange(0), default=9, show_default=True,
              help="Distinct policy samples per request.")
@click.option("--beams", type=click.IntRange(0), default=4, show_default=True,
              help="Beam-search lists per request (matrix models: their decoded list).")
@click.option("--mmr", type=click.IntRange(0), default=2, show_default=True,
              help="MMR lists per request (the upstream order is always added).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True)
@click.option("--delta", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Minimum reward gap of a pair.")
@click.option("--max-pairs", type=click.IntRange(1), default=4, show_default=True,
              help="Pairs per request at most.")
@click.option("--min-diff", type=click.IntRange(1), default=2, show_default=True,
              help="Slots in which winner and loser must differ.")
@click.option("--set", "overrides", multiple=True,
              help="Reward: reward.weights.diversity=0.1, reward.terms.engagement.scroll=dcg.")
@click.option("--max-requests", type=click.IntRange(1), default=None,
              help="Pair only the first N requests of each split.")
@click.option("--teacher", "teachers", type=click.Path(path_type=Path), multiple=True,
              help="Also propose this run's own decoded list (repeatable), e.g. a structured "
                   "model's beam search: pairs can then reach lists the generator never "
                   "proposes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_validation_option
@_user_errors
def nearline(generator_run: Path, evaluator_run: Path, data_dir: Path, out_file: Path,
             splits: str, samples: int, beams: int, mmr: int, temperature: float, delta: float,
             max_pairs: int, min_diff: int, overrides: tuple[str, ...],
             max_requests: int | None, teachers: tuple[Path, ...], seed: int,
             overwrite: bool) -> None:
    """Near-line job: K lists per request, scored by the evaluator's list reward, written as
    preference pairs (Parquet) for `genrerank finetune --method dpo`."""
    import copy

    from genrerank.data.pairs import PairRule
    from genrerank.preference.nearline import run_nearline
    from genrerank.rewards import DEFAULT_REWARD
    from genrerank.training.config import apply_override

    config = {"reward": copy.deepcopy(DEFAULT_REWARD)}
    for item in overrides:
        if not item.startswith("reward."):
            raise click.BadParameter(f"{item!r}: nearline takes reward.* settings only",
                                     param_hint="--set")
        apply_override(config, item)
    summary = run_nearline(
        generator_run, evaluator_run, data_dir, out_file, reward_config=config["reward"],
        splits=tuple(s.strip() for s in splits.split(",") if s.strip()), samples=samples,
        beams=beams, mmr=mmr, temperature=temperature,
        rule=PairRule(delta=delta, max_pairs=max_pairs, min_diff=min_diff), seed=seed,
        max_requests=max_requests, teachers=teachers, overwrite=overwrite)
    click.echo(f"{summary['requests']} requests, {summary['lists_per_request']:.1f} distinct "
               f"lists each, {summary['pairs']} pairs ({summary['requests_with_pairs']:.0%} of "
               f"requests have one; mean reward gap {summary['mean_reward_gap']:.3f}) in "
               f"{summary['seconds']:.0f} s -> {summary['out']}")
    shares = ", ".join(f"{g} {v:.0%}" for g, v in summary["winner_share"].items() if v >= 0.005)
    if shares:
        click.echo(f"winners by proposer: {shares}")


@main.command()
@click.option("--init", "init_run", type=click.Path(path_type=Path), required=True,
              help="The trained generator run to start from (and the frozen reference).")
@click.option("--method", type=click.Choice(["dpo", "ppo"]), required=True)
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--pairs", type=click.Path(path_type=Path), default=None,
              help="dpo: the pairs file `genrerank nearline` wrote.")
@click.option("--evaluator", type=click.Path(path_type=Path), default=None,
              help="The reward model run (ppo: required; dpo: default the pairs' evaluator).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="JSON or TOML config layered over configs/finetune/<method>.json.")
@click.option("--set", "overrides", multiple=True,
              help="Override: loss.0.beta=0.2, train.lr=5e-5, reward.weights.diversity=0.1.")
@click.option("--reward-source", type=click.Choice(["evaluator", "simulated_feedback"]),
              default="evaluator", show_default=True,
              help="ppo: simulated_feedback samples the simulated users' feedback (an "
                   "online-learning stand-in, labelled as such; simulator data only).")
@click.option("--resume", is_flag=True, help="Continue from OUT/last/.")
@click.option("--overwrite", is_flag=True, help="Start over in an existing OUT.")
@_validation_option
@_nproc_option
@_user_errors
def finetune(init_run: Path, method: str, data_dir: Path, out_dir: Path, pairs: Path | None,
             evaluator: Path | None, config_path: Path | None, overrides: tuple[str, ...],
             reward_source: str, resume: bool, overwrite: bool, nproc: int) -> None:
    """Fine-tune a generator against a frozen copy of itself: DPO on pairs, or PPO on its own
    samples scored by the evaluator (selection on the validation reward)."""
    from genrerank.utils import distributed

    _relaunch_under_torchrun(nproc)
    from genrerank.preference.finetune import finetune_run

    try:
        best = finetune_run(init_run, data_dir, out_dir, method, pairs=pairs,
                            evaluator=evaluator, config_path=config_path, overrides=overrides,
                            resume=resume, overwrite=overwrite, reward_source=reward_source)
        main_rank = distributed.context().is_main
    finally:
        distributed.shutdown()
    if not main_rank:
        return
    if reward_source == "simulated_feedback":
        click.echo("reward: simulated users' sampled feedback (online-learning stand-in)")
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in best.items() if "/" not in k or k.startswith("reward/"))
    click.echo(f"best (valid): {shown}\nrun saved in {out_dir}")


@main.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="A trained run (generator or evaluator).")
@click.option("--pipeline", "pipeline_config", type=click.Path(path_type=Path), default=None,
              help="A generator-evaluator pipeline config (JSON) instead of a run.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None)
@click.option("--decoder", default=None, cls=_NamesOption, names=_decoder_names,
              help="Instead of the run's own decoder: {names}.")
@click.option("--decoder-param", "decoder_params", multiple=True, help="key=value, e.g. alpha=0.6")
@click.option("--constraints", "constraints_file", type=click.Path(path_type=Path), default=None,
              help=_CONSTRAINTS_HELP)
@click.option("--list-ceiling", is_flag=True,
              help="Simulated data: add the best list the true list model finds on this model's "
                   "own appeal (an oracle diagnostic: the list-level value left to learn).")
@_validation_option
@_user_errors
def evaluate(run_dir: Path | None, pipeline_config: Path | None, data_dir: Path,
             out_file: Path | None, decoder: str | None, decoder_params: tuple[str, ...],
             constraints_file: Path | None, list_ceiling: bool) -> None:
    """Evaluate a run's selected model, or a pipeline, on the test split (offline; online on
    simulator data). With --constraints the result reports constraint_violations (0)."""
    import json

    if (run_dir is None) == (pipeline_config is None):
        raise click.UsageError("give exactly one of --run and --pipeline")
    constraints = _load_constraints(constraints_file)
    if pipeline_config is not None:
        if decoder or decoder_params:
            raise click.UsageError("--decoder applies to --run; a pipeline config names its own")
        if constraints is not None:
            raise click.UsageError("--constraints applies to --run; a pipeline decodes under none")
        if list_ceiling:
            raise click.UsageError("--list-ceiling applies to --run")
        from genrerank.evaluation.generator_evaluator import evaluate_pipeline_config

        result = evaluate_pipeline_config(pipeline_config, data_dir, out_file)
    else:
        from genrerank.experiment import evaluate_run

        result = evaluate_run(run_dir, data_dir, out_file, decoder,
                              _parse_options(decoder_params), constraints=constraints,
                              list_ceiling=list_ceiling)
    click.echo(json.dumps(result, indent=2))


@main.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="A trained generator run.")
@click.option("--pipeline", "pipeline_config", type=click.Path(path_type=Path), default=None,
              help="A generator-evaluator pipeline config (JSON) instead of a run.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_file", type=click.Path(path_type=Path), required=True,
              help="The Parquet file to write (one row per request).")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["train", "valid", "test", "all"]),
              help="Which requests to re-rank ('all': every request).")
@click.option("--decoder", default=None, cls=_NamesOption, names=_decoder_names,
              help="Instead of the run's own decoder: {names}.")
@click.option("--decoder-param", "decoder_params", multiple=True, help="key=value, e.g. alpha=0.6")
@click.option("--list-length", type=click.IntRange(1), default=None,
              help="Items per list, at most n [default: each request's logged length].")
@click.option("--constraints", "constraints_file", type=click.Path(path_type=Path), default=None,
              help=_CONSTRAINTS_HELP)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_validation_option
@_user_errors
def rerank(run_dir: Path | None, pipeline_config: Path | None, data_dir: Path, out_file: Path,
           split: str, decoder: str | None, decoder_params: tuple[str, ...],
           list_length: int | None, constraints_file: Path | None, overwrite: bool) -> None:
    """Re-rank every request of a split with a run or a pipeline; write the lists (Parquet)."""
    if (run_dir is None) == (pipeline_config is None):
        raise click.UsageError("give exactly one of --run and --pipeline")
    if pipeline_config is not None and (decoder or decoder_params):
        raise click.UsageError("--decoder applies to --run; a pipeline config names its own")
    constraints = _load_constraints(constraints_file)
    if pipeline_config is not None and constraints is not None:
        raise click.UsageError("--constraints applies to --run; a pipeline decodes under none")
    from genrerank.evaluation.rerank import rerank_dataset

    summary = rerank_dataset(data_dir, out_file, run_dir=run_dir, pipeline=pipeline_config,
                             split=split, decoder=decoder,
                             decoder_params=_parse_options(decoder_params),
                             list_length=list_length, overwrite=overwrite,
                             constraints=constraints)
    click.echo(summary.line())


@main.command("export")
@click.option("--run", "run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True, help="Run folder (its best/ checkpoint is exported).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--quantize", is_flag=True, help="Also write int8 (dynamic quantization) graphs.")
@click.option("--no-check", is_flag=True, help="Skip the PyTorch parity check.")
@click.option("--triton", "triton_repo", type=click.Path(path_type=Path), default=None,
              help="Also write the item tower and per-request graph to this Triton model "
                   "repository (validated offline; other models there are left alone).")
@click.option("--triton-name", default=None, help="Model name prefix in the repository "
                                                  "(default: the model's name).")
@click.option("--triton-gpu", is_flag=True,
              help="GPU instances (KIND_GPU) with a GPU execution accelerator.")
@click.option("--triton-accelerator", type=click.Choice(["tensorrt", "cuda"]),
              default="tensorrt", show_default=True,
              help="With --triton-gpu: TensorRT (CUDA for what it cannot run) or CUDA alone.")
@click.option("--triton-backend", type=click.Choice(["onnxruntime", "python"]),
              default="onnxruntime", show_default=True,
              help="python: the CPU stand-in (Python backend running the same model.onnx), "
                   "for a tritonserver without the ONNX Runtime backend.")
@click.option("--triton-max-batch", type=click.IntRange(1), default=64, show_default=True,
              help="max_batch_size of the per-request model (requests per batch).")
@click.option("--triton-queue-delay-us", type=click.IntRange(0), default=200,
              show_default=True, help="Dynamic batching: longest wait to fill a batch.")
@_user_errors
def export_cmd(run_dir: Path, out_dir: Path, quantize: bool, no_check: bool,
               triton_repo: Path | None, triton_name: str | None, triton_gpu: bool,
               triton_accelerator: str, triton_backend: str, triton_max_batch: int,
               triton_queue_delay_us: int) -> None:
    """Export a run to ONNX (dynamic batch, n and m) and check parity with PyTorch;
    --triton also writes a Triton Inference Server model repository."""
    from genrerank.serving.export import ExportError, export_run

    if triton_repo is not None and triton_name is not None:  # before the export's minutes
        from genrerank.serving.triton.repository import check_model_name

        check_model_name(triton_name)
    try:
        manifest = export_run(run_dir, out_dir, quantize=quantize, check=not no_check)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    graphs = ", ".join(g["file"] for g in manifest["graphs"].values())
    click.echo(f"exported {manifest['model_version']} ({manifest['kind']}) to {out_dir}: "
               f"{graphs} in {manifest['export_seconds']:.1f} s")
    if "int8_graphs" in manifest:
        line = "int8 graphs: " + ", ".join(manifest["int8_graphs"].values())
        int8 = manifest.get("parity_int8")
        if int8:
            worst = max(v for v in int8["max_abs_diff"].values() if isinstance(v, float))
            line += (f" (not required to match: max |int8 - torch| {worst:.2g}, lists identical "
                     f"on the parity set: {int8['lists_identical']})")
        click.echo(line)
    parity = manifest.get("parity")
    if parity:
        diffs = ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in parity["max_abs_diff"].items())
        click.echo(f"parity on {len(parity['sizes'])} requests (n = "
                   f"{'/'.join(map(str, parity['sizes']))}, m = {parity['list_length']}): "
                   f"max |onnx - torch| {diffs}; decoded lists identical: "
                   f"{parity['lists_identical']}")
    if triton_repo is not None:
        from genrerank.serving.triton.repository import write_repository

        models = write_repository(
            out_dir, triton_repo, name=triton_name, backend=triton_backend, gpu=triton_gpu,
            accelerator=triton_accelerator, max_batch_size={"model": triton_max_batch},
            queue_delay_us=triton_queue_delay_us)
        for name, info in models.items():
            where = "GPU, " + "+".join(info["accelerators"]) if triton_gpu else "CPU"
            click.echo(f"triton: {triton_repo / name}/config.pbtxt + 1/model.onnx "
                       f"({info['backend']}, {where}, max_batch_size {info['max_batch_size']}, "
                       f"{len(info['inputs'])} inputs / {len(info['outputs'])} outputs checked "
                       "against the graph)")


@main.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None, help="Serve a run folder with PyTorch.")
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path, exists=True,
                                                    file_okay=False),
              default=None, help="Serve an export folder with ONNX Runtime.")
@click.option("--int8", is_flag=True, help="Use the export's int8 graphs (--onnx only).")
@click.option("--model-server", default=None, metavar="HOST:PORT",
              help="Run the model on this Triton server (gRPC; a repository written by "
                   "export --triton); validation, item cache and decoding stay here.")
@click.option("--model-name", default=None,
              help="With --model-server: the per-request model (<name>_model) when the "
                   "server has several.")
@click.option("--model-workers", type=click.IntRange(1), default=None,
              help="Model calls in flight at once [default: 1; 4 with --model-server, so "
                   "that its dynamic batcher has concurrent requests to stack].")
@click.option("--pipeline", "pipeline_config", type=click.Path(path_type=Path, exists=True,
                                                               dir_okay=False),
              default=None, help="Also offer strategy 'pipeline' (generator-evaluator).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="Intra-op threads of the model.")
@click.option("--cache-size", type=click.IntRange(0), default=100_000, show_default=True,
              help="Items in the item-embedding cache (0: no cache).")
@click.option("--cache-bytes", type=click.IntRange(0), default=64 * 2**20, show_default=True,
              help="Bytes the item-embedding cache may hold, ids and overhead included "
                   "(0: no cache).")
@click.option("--max-item-id-length", type=click.IntRange(1), default=256, show_default=True,
              help="Longest item id accepted, in characters (longer: 422).")
@click.option("--max-candidates", type=click.IntRange(1), default=500, show_default=True)
@click.option("--timeout-ms", type=click.FloatRange(1), default=1000.0, show_default=True,
              help="Per-request deadline, model queue included (504 past it; a request still "
                   "queued then is dropped without running).")
@click.option("--max-queue", type=click.IntRange(1), default=8, show_default=True,
              help="Requests that may wait for the model behind the running one; more are "
                   "answered 503 with Retry-After at once.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=20.0, show_default=True,
              help="Also 503 when the requests ahead would take longer than this (their number "
                   "times the recent mean model time; 0: no such bound).")
@click.option("--header-timeout-s", type=click.FloatRange(0, min_open=True), default=5.0,
              show_default=True, help="Seconds to receive a request head (408 and closed past "
                                      "it; a connection that sends nothing is closed).")
@click.option("--body-timeout-s", type=click.FloatRange(0, min_open=True), default=10.0,
              show_default=True, help="Seconds to receive a request body after its head "
                                      "(408 and closed past it).")
@click.option("--drain-s", type=click.FloatRange(0), default=5.0, show_default=True,
              help="On SIGTERM: /readyz answers 503 and requests are still served this long, "
                   "then the server stops listening and finishes the requests in flight.")
@click.option("--log-level", default="warning", show_default=True)
@_user_errors
def serve(run_dir: Path | None, onnx_dir: Path | None, int8: bool,
          model_server: str | None, model_name: str | None, model_workers: int | None,
          pipeline_config: Path | None, host: str, port: int, threads: int, cache_size: int,
          cache_bytes: int, max_item_id_length: int, max_candidates: int, timeout_ms: float,
          max_queue: int, max_wait_ms: float, header_timeout_s: float, body_timeout_s: float,
          drain_s: float, log_level: str) -> None:
    """Serve POST /v1/rerank (+ /healthz, /readyz, /metrics, /docs) over HTTP."""
    from genrerank.serving.server import bind_socket, run_server

    # Bound before torch and the model load: a busy port fails in one line, at once.
    sock = bind_socket(host, port)
    try:
        from genrerank.serving.app import create_app
        from genrerank.serving.runtime import load_reranker

        service = load_reranker(run_dir, onnx_dir, threads=threads, int8=int8,
                                cache_size=cache_size, cache_bytes=cache_bytes,
                                max_candidates=max_candidates,
                                max_item_id_length=max_item_id_length,
                                pipeline_config=pipeline_config, model_server=model_server,
                                model_name=model_name, timeout_s=timeout_ms / 1000.0)
        app = create_app(service, timeout_s=timeout_ms / 1000.0, max_queue=max_queue,
                         max_wait_s=max_wait_ms / 1000.0 if max_wait_ms else None,
                         body_timeout_s=body_timeout_s,
                         model_workers=model_workers or (4 if model_server else 1))
        backend = service.backend.name

        def announce(bound_host: str, bound_port: int) -> None:
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host  # IPv6
            click.echo(f"serving {service.model_version} ({backend}, {threads} thread(s), "
                       f"strategies {', '.join(service.strategies)}) on "
                       f"http://{shown}:{bound_port} (docs: /docs)")

        run_server(app, sock, header_timeout_s=header_timeout_s, drain_s=drain_s,
                   log_level=log_level, on_listening=announce)
    finally:
        sock.close()


@main.group()
def bench() -> None:
    """Benchmarks; results go to benchmarks/results/ as JSON, Markdown and a plot."""


@bench.command("quality")
@click.option("--quick", is_flag=True, help="Smaller data and budget (< 15 min on 2 cores).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--shared-data", type=click.Path(path_type=Path), default=None,
              help="Folder with the real logs (default: $GENRERANK_SHARED_DATA or ../shared/data).")
@click.option("--models", default=None,
              help="Comma-separated models to train (default: all); a subset skips the "
                   "generator-evaluator unless it has nar4rec and autoregressive.")
@click.option("--datasets", default=None,
              help="Comma-separated data sets (default: avito, kuaishou, mind, ebnerd).")
@click.option("--no-ablations", is_flag=True, help="Skip the ablations on kuaishou.")
@click.option("--merge", is_flag=True,
              help="Add the rows measured now to the existing result file (same seeds).")
@_user_errors
def bench_quality(quick: bool, out_dir: Path, seeds: str, shared_data: Path | None,
                  models: str | None, datasets: str | None, no_ablations: bool,
                  merge: bool) -> None:
    """Every model on simulated avito and kuaishou, MIND and EB-NeRD; ablations; decoding."""
    import dataclasses

    from genrerank.bench.quality import QualitySettings, run_quality_benchmark

    seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    settings = QualitySettings.quick() if quick else QualitySettings.full()
    if models:
        settings.models = tuple(m.strip() for m in models.split(",") if m.strip())
    if datasets:
        names = [d.strip() for d in datasets.split(",") if d.strip()]
        known = [*settings.simulated, *settings.real]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"unknown data set(s) {unknown}; known: {known}")
        settings = dataclasses.replace(
            settings, simulated={k: v for k, v in settings.simulated.items() if k in names},
            real=tuple(r for r in settings.real if r in names))
    if no_ablations:
        settings.ablations = False
    run_quality_benchmark(quick=quick, out_dir=out_dir, seeds=seed_list, shared_data=shared_data,
                          settings=settings, merge=merge)


@bench.command("preference")
@click.option("--quick", is_flag=True, help="Small data and budget (about 15 min on 2 cores).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--datasets", default=None, help="Comma-separated presets (default kuaishou,avito).")
@click.option("--merge", is_flag=True,
              help="Keep the other seeds and data sets already in the result file (to run "
                   "invocations side by side).")
@click.option("--policies", default=None,
              help="Comma-separated rows to run (default all; the reference always): "
                   "dpo, ppo, ge_k16, ppo_feedback, teacher, ge_k16_teacher, dpo_teacher, "
                   "ppo_teacher.")
@click.option("--out-stem", default="",
              help="Result file name (default preference / preference_quick).")
@click.option("--dpo-set", "dpo_overrides", multiple=True,
              help="Override the DPO fine-tuning config (every DPO row): loss.0.nll_weight=1.")
@click.option("--ppo-set", "ppo_overrides", multiple=True,
              help="Override the PPO fine-tuning config (every PPO row): train.lr=1e-4.")
@_user_errors
def bench_preference(quick: bool, out_dir: Path, seeds: str, datasets: str | None,
                     merge: bool, policies: str | None, out_stem: str,
                     dpo_overrides: tuple[str, ...], ppo_overrides: tuple[str, ...]) -> None:
    """Reference vs DPO vs PPO vs G-E under the oracle, with the list evaluator or the
    structured model (teacher) as the reward model; Pareto sweep of reward weights."""
    import dataclasses
    import sys

    from genrerank.bench.preference import PreferenceSettings, run_preference_benchmark

    seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    names = [d.strip() for d in datasets.split(",")] if datasets else None
    settings = PreferenceSettings.quick() if quick else PreferenceSettings()
    if policies:
        settings = dataclasses.replace(
            settings, policies=tuple(p.strip() for p in policies.split(",") if p.strip()))
    settings = dataclasses.replace(
        settings, out_stem=out_stem,
        dpo_overrides=(*settings.dpo_overrides, *dpo_overrides),
        ppo_overrides=(*settings.ppo_overrides, *ppo_overrides))
    run_preference_benchmark(quick, out_dir, seed_list, names, merge, settings=settings,
                             command="genrerank " + " ".join(sys.argv[1:]))


@bench.command("hierarchical")
@click.option("--quick", is_flag=True, help="Small data and budget (a few minutes).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--datasets", default=None,
              help="Comma-separated PRESET=REQUESTS (default kuaishou=20000,large=1000).")
@click.option("--merge", is_flag=True,
              help="Keep the other data sets of an existing result file.")
@_user_errors
def bench_hierarchical(quick: bool, out_dir: Path, seeds: str, datasets: str | None,
                       merge: bool) -> None:
    """Hierarchical vs autoregressive vs nar4rec: oracle gain, headroom, entropy, latency."""
    from genrerank.bench.hierarchical import HierarchicalSettings, run_hierarchical_benchmark

    settings = HierarchicalSettings.quick() if quick else HierarchicalSettings()
    if datasets:
        try:
            sizes = {k.strip(): int(v) for k, v in (d.split("=") for d in datasets.split(","))}
        except ValueError:
            raise click.BadParameter(f"{datasets!r}: expected PRESET=REQUESTS[,...]",
                                     param_hint="--datasets") from None
        settings.simulated = sizes
    seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    run_hierarchical_benchmark(quick, out_dir, seed_list, settings=settings, merge=merge)


@bench.command("ddp")
@click.option("--requests", "n_requests", type=click.IntRange(100), default=20_000,
              show_default=True, help="Simulated kuaishou requests (about 80 % train).")
@click.option("--nproc", "processes", type=click.IntRange(2), default=2, show_default=True,
              help="Data-parallel processes to compare with one.")
@click.option("--models", default=",".join(("pointwise", "nar4rec")), show_default=True,
              help="Comma-separated models (packaged configs).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@_user_errors
def bench_ddp(n_requests: int, processes: int, models: str, device: str,
              out_dir: Path) -> None:
    """Training throughput (requests/s) of 1 and N data-parallel processes under torchrun."""
    from genrerank.bench.distributed import run_ddp_benchmark

    names = tuple(m.strip() for m in models.split(",") if m.strip())
    run_ddp_benchmark(out_dir, n_requests, processes, names, device,
                      name="ddp" if device == "cpu" else f"ddp_{device}")


@bench.command("import")
@click.option("--rows", type=click.IntRange(10), default=1_000_000, show_default=True,
              help="Impression rows of the synthetic CSV (10 per request).")
@click.option("--skip-walkthrough", is_flag=True, help="Only the import timing.")
@click.option("--skip-import", is_flag=True, help="Only the README walk-through.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@_user_errors
def bench_import(rows: int, skip_walkthrough: bool, skip_import: bool, out_dir: Path) -> None:
    """Import time and peak memory of a CSV of impressions; the README walk-through, timed."""
    from genrerank.bench.importing import run_import_benchmark

    run_import_benchmark(rows, out_dir, walkthrough=not skip_walkthrough,
                         import_rows=not skip_import)


@bench.command("large-data")
@click.option("--quick", is_flag=True, help="40,000 requests in shards of 10,000: a smoke check.")
@click.option("--requests", "n_requests", type=click.IntRange(1), default=None,
              help="Simulated kuaishou requests [default: 5,000,000; 40,000 with --quick].")
@click.option("--shard-requests", type=click.IntRange(1), default=None,
              help="Requests per shard [default: 200,000; 10,000 with --quick].")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
              help="DataLoader workers of the training phase.")
@click.option("--max-train-seconds", type=click.FloatRange(min=1), default=None,
              help="Stop the training phase after this long (reported as a partial epoch).")
@click.option("--work-dir", type=click.Path(path_type=Path),
              default=Path("/tmp/genrerank-large-data"), show_default=True,
              help="Where the data set is written (about 1.1 kB a request).")
@click.option("--keep-data", is_flag=True, help="Keep the data set after the benchmark.")
@click.option("--trainer", "use_trainer", is_flag=True,
              help="Train with the shared Trainer (whole epoch, validation on a sample) instead "
                   "of the benchmark's own loop.")
@click.option("--skip-write", is_flag=True,
              help="Reuse the data set (and write figures) of a previous --keep-data run.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@_user_errors
def bench_large_data(quick: bool, n_requests: int | None, shard_requests: int | None,
                     batch_size: int, workers: int, max_train_seconds: float | None,
                     work_dir: Path, keep_data: bool, use_trainer: bool, skip_write: bool,
                     out_dir: Path) -> None:
    """Write millions of simulated requests in shards, then train one epoch streaming them:
    time and peak RSS of each phase."""
    from genrerank.bench import large_data as ld

    n = n_requests or (ld.QUICK_REQUESTS if quick else ld.DEFAULT_REQUESTS)
    shard = shard_requests or (ld.QUICK_SHARD_REQUESTS if quick else ld.DEFAULT_SHARD_REQUESTS)
    ld.run_large_data_benchmark(n, shard, out_dir, work_dir, quick=quick, batch_size=batch_size,
                                workers=workers, max_train_seconds=max_train_seconds,
                                keep_data=keep_data, skip_write=skip_write,
                                trainer=use_trainer)


@bench.command("latency")
@click.option("--quick", is_flag=True, help="30 runs per cell, short caps: a smoke check.")
@click.option("--runs", type=click.IntRange(1), default=None,
              help="Timed runs per cell [default: 200; 30 with --quick].")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True,
              help="torch.set_num_threads for every timed call.")
@click.option("--cell-budget", type=click.FloatRange(0, min_open=True), default=None,
              help="Seconds of timed runs per cell before its run count is cut (recorded) "
                   "[default: 1200; 60 with --quick].")
@click.option("--max-discard", type=click.FloatRange(0), default=None,
              help="Seconds per cell that may go to timed rounds thrown away because other "
                   "processes were busy, and to waiting for quiet; 0 keeps every round "
                   "[default: 1800; 60 with --quick].")
@click.option("--presets", default=None, help="Comma-separated subset of avito,kuaishou,large "
              "(the multi-token prediction section: kuaishou and large only).")
@click.option("--batch-sizes", default=None, help="Comma-separated [default: 1,256].")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory child processes.")
@click.option("--variants", default=None,
              help="Comma-separated subset of the variants: pointwise, prm, nar4rec_greedy, "
                   "nar4rec, autoregressive, autoregressive_no_cache, evaluator (the grid of "
                   "random-weight models) and autoregressive_mtp, autoregressive_mtp_unverified "
                   "(the multi-token prediction section, trained models, batch 1) [default: "
                   "all]; e.g. autoregressive_mtp,autoregressive_mtp_unverified runs only that "
                   "section.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@_user_errors
def bench_latency(quick: bool, runs: int | None, threads: int, cell_budget: float | None,
                  max_discard: float | None, presets: str | None, batch_sizes: str | None,
                  no_memory: bool, variants: str | None, out_dir: Path) -> None:
    """Forward + decoding latency (p50 / p99) and peak memory of every model, side by side."""
    from genrerank.bench.latency import LatencySettings, run_latency_benchmark, settings_with
    from genrerank.bench.latency_mtp import MTP_PRESETS, MTP_VARIANTS

    def split(text: str | None, cast: Callable[[str], Any]) -> tuple[Any, ...] | None:
        return None if text is None else tuple(cast(s) for s in text.split(",") if s.strip())

    chosen = split(variants, str.strip)
    grid = split(presets, str.strip)
    base = LatencySettings.quick() if quick else LatencySettings.full()
    settings = settings_with(
        base, runs=runs, threads=threads, cell_budget_s=cell_budget, max_discard_s=max_discard,
        presets=grid, batch_sizes=split(batch_sizes, int),
        memory=False if no_memory else None,
        mtp_presets=None if grid is None else tuple(p for p in grid if p in MTP_PRESETS),
        variants=None if chosen is None else tuple(v for v in chosen if v not in MTP_VARIANTS),
        mtp_variants=None if chosen is None else tuple(v for v in chosen if v in MTP_VARIANTS),
    )
    run_latency_benchmark(quick=quick, out_dir=out_dir, settings=settings)


@bench.command("serving")
@click.option("--quick", is_flag=True, help="Fewer rates, shorter steps and runs: a smoke check.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=Path("benchmarks/results"), show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Keep (and reuse) simulated data, runs and exports here [default: temporary].")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Model intra-op threads, in-process and in the server [default: 1].")
@click.option("--rates", default=None, help="Comma-separated offered requests/s, rising.")
@click.option("--presets", default=None, help="Comma-separated subset of kuaishou,large.")
@click.option("--skip-load", is_flag=True, help="Only the in-process model-time part.")
@click.option("--skip-model-time", is_flag=True, help="Only the HTTP load part.")
@click.option("--backends", default=None,
              help="Comma-separated HTTP load backends: torch, onnx, triton (the model on a "
                   "real tritonserver) [default: torch,onnx].")
@click.option("--out-stem", default=None,
              help="Name of the HTTP load result files [default: serving / serving_quick].")
@_user_errors
def bench_serving(quick: bool, out_dir: Path, work_dir: Path | None, threads: int | None,
                  rates: str | None, presets: str | None, skip_load: bool,
                  skip_model_time: bool, backends: str | None, out_stem: str | None) -> None:
    """ONNX Runtime vs PyTorch model time, int8, item cache; then HTTP load at rising rates."""
    import dataclasses
    import tempfile

    from genrerank.bench.inference import (
        InferenceSettings,
        inference_markdown,
        run_inference_benchmark,
    )
    from genrerank.bench.latency import _json_safe
    from genrerank.bench.serving import ServingSettings, run_serving_benchmark
    from genrerank.utils.io import atomic_write_json, atomic_write_text

    chosen = None if presets is None else tuple(p.strip() for p in presets.split(",") if p)
    if not skip_model_time:
        settings = InferenceSettings.quick() if quick else InferenceSettings()
        if threads is not None:
            settings = dataclasses.replace(settings, threads=threads)
        if chosen:
            settings = dataclasses.replace(settings, presets=chosen)
        with tempfile.TemporaryDirectory(prefix="genrerank-inference-") as tmp:
            work = (work_dir / "inference") if work_dir else Path(tmp)
            result = _json_safe(run_inference_benchmark(settings, work))
        stem = "serving_model_quick" if quick else "serving_model"
        atomic_write_json(out_dir / f"{stem}.json", result)
        atomic_write_text(out_dir / f"{stem}.md", inference_markdown(result))
        click.echo(inference_markdown(result))
        click.echo(f"wrote {out_dir / stem}.json and .md")
    if not skip_load:
        load = ServingSettings.quick() if quick else ServingSettings.full()
        changes: dict[str, Any] = {}
        if threads is not None:
            changes["threads"] = threads
        if chosen:
            changes["presets"] = chosen
        if rates:
            changes["rates"] = tuple(float(r) for r in rates.split(",") if r.strip())
        if work_dir is not None:
            changes["work_dir"] = str(work_dir / "load")
        if backends:
            changes["backends"] = tuple(b.strip() for b in backends.split(",") if b.strip())
        if out_stem:
            changes["out_stem"] = out_stem
        run_serving_benchmark(dataclasses.replace(load, **changes), out_dir)


@main.command()
@click.option("--preset", default="kuaishou", show_default=True, cls=_NamesOption,
              names=_preset_names, help="Simulator preset: {names}.")
@click.option(
    "--requests", "n_requests", type=click.IntRange(100), default=5_000, show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/demo"),
              show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=6, show_default=True,
              help="Maximum training epochs per model.")
@_user_errors
def demo(preset: str, n_requests: int, seed: int, out_dir: Path, epochs: int) -> None:
    """Simulate logs, train the models, evaluate every re-ranker, print a comparison table."""
    from genrerank.demo import run_demo

    run_demo(preset=preset, n_requests=n_requests, seed=seed, out_dir=out_dir, epochs=epochs)


if __name__ == "__main__":
    main()
