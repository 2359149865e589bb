"""The ``dipgo`` command line: search, bench, report, export.

User mistakes (a config typo, an unknown model, a plan that does not fit) end with one sentence
on stderr and exit code 2; only genuine bugs show a traceback. Heavy imports (torch, diffusers,
Lightning) happen inside the subcommands so ``dipgo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dipgo.errors import one_line, user_errors

EXIT_USAGE = 2

SEARCH_EPILOG_HEAD = """\
overrides are Hydra syntax: group=option (recipe=digits_unet_reuse, model=digits_dit)
or key=value (search.target=0.3 trainer.max_steps=100 supernet.num_steps=25).
resume=<run dir> continues an interrupted search from its last checkpoint.
-m/--multirun sweeps comma lists (search.target=0.2,0.3 seed=0,1) into <runs_root>/<recipe>/sweep-<time>/<i>/;
hydra/launcher=submitit_local|submitit_slurm|dipgo_slurm runs the points as jobs (pip install hydra-submitit-launcher).
"""


def _search_epilog() -> str:
    from dipgo.search.compose import GROUPS, list_options

    lines = [SEARCH_EPILOG_HEAD, "recipes:"]
    lines += [f"  {name}" for name in list_options("recipe")]
    lines.append("config groups (group=option):")
    for group in GROUPS:
        if group != "recipe":
            lines.append(f"  {group:<9} {', '.join(list_options(group))}")
    lines.append("show the composed config without running: dipgo search --cfg recipe=...")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dipgo",
        description="Make trained PyTorch models fast without retraining: gated SuperNet, learned pruner, real SubNet.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `dipgo <command> --help` for the options of each command",
    )
    sub = parser.add_subparsers(dest="command", metavar="{search,bench,report,export}")

    p = sub.add_parser(
        "search",
        help="search a SubNet: a recipe from configs/ plus Hydra overrides",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_search_epilog(),
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. recipe=digits_unet_reuse search.target=0.3")
    p.add_argument("--cfg", action="store_true", help="print the composed config (with -m: the points) and exit")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="Hydra multirun: one search per point of the sweep (comma lists, range(), choice())")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="time a saved SubNet (a run directory) against its full model")
    p.add_argument("run_dir", help="a run directory written by `dipgo search` (or an exported SubNet folder)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="samples per call")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the result JSON here (default: <run_dir>/bench.json)")
    p.add_argument("--compile", action="store_true",
                   help="reuse plans: also time both under regional torch.compile (inductor) and print graph breaks")

    p = sub.add_parser("report", help="summarise and plot a run, or a folder of runs (table + Pareto plot)")
    p.add_argument("path", help="a run directory, or a folder containing run directories")
    p.add_argument("--out", default=None, help="folder for the aggregate table/plot (default: the folder itself)")

    p = sub.add_parser("export", help="export a run's SubNet to a self-contained folder that reloads")
    p.add_argument("run_dir", help="a run directory written by `dipgo search`")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before or after flags (`dipgo search --quiet a=1 b=2` or `... a=1 --quiet b=2`)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "search" and not any(e.startswith("-") and "=" not in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _quiet_library_noise()
    from dipgo import commands

    try:
        return getattr(commands, f"cmd_{args.command}")(args)
    except user_errors() as exc:
        print(f"dipgo {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dipgo {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_library_noise() -> None:
    """Silence deprecation chatter from dependencies; our own warnings still show."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage() and "TPU available" not in record.getMessage()
    )


if __name__ == "__main__":
    sys.exit(main())
