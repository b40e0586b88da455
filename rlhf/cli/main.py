"""The `rlhf` command: validate a recipe, plan its placement, train, evaluate a checkpoint, or write a
KubeRay RayJob.

Exit codes: 0 ok, 2 bad config or command line, 3 the roles do not fit the cluster, 4 the run stopped
(a learner rank died, the final checkpoint could not be written), 5 the run directory's storage is
unreachable (a missing bucket, no access, the server down).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rlhf.actor_group import RunStopped
from rlhf.config.loader import ConfigError, load_config, to_yaml
from rlhf.placement import PlacementError
from rlhf.production.storage import StorageError

EXIT_CONFIG = 2
EXIT_PLACEMENT = 3
EXIT_RUN_STOPPED = 4
EXIT_STORAGE = 5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="RL post-training for LLMs on Ray. Overrides look like trainer.lr=1e-5 "
        "placement.colocate=[[rollout,learner]] (values are YAML).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="recipe YAML (or a run directory to resume)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides; resume=RUN_DIR continues a run")
        return p

    validate = command(
        "validate", "load and validate a recipe (and its placement, given a cluster), print the resolved YAML"
    )
    validate.add_argument(
        "--inventory",
        help="also check the placement against this cluster description YAML (default: placement.inventory, "
        "else this machine's GPUs if it has any)",
    )
    plan = command("plan", "show where every role runs (node, GPU, estimated memory)")
    plan.add_argument(
        "--inventory", help="cluster description YAML (default: $RAY_ADDRESS cluster, else this machine)"
    )
    plan.add_argument(
        "--propose", action="store_true", help="propose placement overrides for the cluster first"
    )
    command("train", "run training")
    lin = sub.add_parser(
        "lineage",
        help="show what produced a checkpoint, back to its base model",
        description="show what produced a checkpoint (config, code, data, rewards, parent), back to its base model",
    )
    lin.add_argument(
        "path",
        help="a checkpoint directory (RUN_DIR/checkpoints/step_N) or its policy/hf export; a storage URI "
        "(s3://bucket/run/checkpoints/step_N) too",
    )
    lin.add_argument("--verify", action="store_true", help="recompute the hashes and say what changed")
    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint or model on a config's eval sets",
        description="evaluate a checkpoint, its policy/hf export, an HF model directory or a run directory "
        "(its latest checkpoint) on the config's eval sets (evaluation.sets, else its held-out prompts)",
    )
    ev.add_argument("path", help="CHECKPOINT_OR_MODEL directory, or its storage URI (s3://..., gs://...)")
    ev.add_argument("--config", required=True, help="recipe YAML whose eval sets to use")
    ev.add_argument("--out", help="write the JSON report here")
    ev.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    k8s = command("k8s", "write a KubeRay RayJob manifest for the recipe")
    k8s.add_argument("--image", default="rlhf:latest", help="container image with this repo installed")
    k8s.add_argument("--inventory", help="cluster description YAML to size the worker groups")
    k8s.add_argument("-o", "--output", help="write the manifest here instead of stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    stray = [e for e in extra if "=" not in e or e.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return _COMMANDS[args.command](args, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PlacementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PLACEMENT
    except RunStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUN_STOPPED
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STORAGE


def _validate(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlhf.cli.preflight import check_run_inputs
    from rlhf.config.loader import resolve_device
    from rlhf.placement import local_inventory, make_plan

    cfg = load_config(args.config, overrides)
    # The placement too, where a cluster is known: more replicas than GPUs, a tensor-parallel engine
    # wider than its GPUs, memory that does not fit, all fail here with one line, before anything starts.
    if args.inventory or cfg.placement.inventory:
        make_plan(cfg, _inventory(cfg, args.inventory))
    elif local_inventory().total_gpus > 0:
        make_plan(cfg, local_inventory())
    # What the run will read: the data file's columns, the model's config and tokenizer, and whether
    # vLLM here runs its head size and dtype (rlhf/cli/preflight.py); one line each, to stderr.
    for line in check_run_inputs(cfg, resolve_device(cfg)):
        print(f"checked: {line}", file=sys.stderr)
    print(to_yaml(cfg), end="")
    return 0


def _inventory(cfg, inventory_file: str | None):
    from rlhf.placement import inventory_from_ray, load_inventory, local_inventory

    if inventory_file:
        return load_inventory(inventory_file)
    if os.environ.get("RAY_ADDRESS"):
        return inventory_from_ray()
    if cfg.placement.inventory:
        return load_inventory(cfg.placement.inventory)
    return local_inventory()


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlhf.placement import make_plan, overrides_to_args, propose_plan

    cfg = load_config(args.config, overrides)
    inventory = _inventory(cfg, args.inventory)
    if args.propose:
        proposed = overrides_to_args(propose_plan(cfg, inventory))
        print("proposed overrides:")
        for line in proposed:
            print(f"  {line}")
        print()
        cfg = load_config(args.config, [*overrides, *proposed])
    print(make_plan(cfg, inventory).describe())
    return 0


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    from rlhf.loop.driver import train

    train(cfg)
    return 0


def _lineage(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlhf.production import lineage

    try:
        entries = lineage.chain(args.path)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(lineage.describe(entries))
    if not args.verify:
        return 0
    problems = lineage.verify(entries)
    for line in problems:
        print(f"changed: {line}")
    if not problems:
        print("verified: config, base model, dataset and reward functions match their hashes")
    return 1 if problems else 0


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlhf.cli import eval as eval_command

    cfg = load_config(args.config, overrides)
    try:
        report = eval_command.run(args.path, cfg, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(eval_command.describe(report))
    if args.out:
        print(f"report: {args.out}", file=sys.stderr)
    return 0


def _k8s(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlhf.placement import load_inventory
    from rlhf.placement.k8s import manifest_yaml, rayjob_manifest

    cfg = load_config(args.config, overrides)
    inventory_file = args.inventory or cfg.placement.inventory
    inventory = load_inventory(inventory_file) if inventory_file else None
    text = manifest_yaml(rayjob_manifest(cfg, args.image, inventory=inventory, overrides=overrides))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


_COMMANDS = {
    "validate": _validate,
    "plan": _plan,
    "train": _train,
    "k8s": _k8s,
    "lineage": _lineage,
    "eval": _eval,
}


if __name__ == "__main__":
    raise SystemExit(main())
