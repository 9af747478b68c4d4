"""`ssl-em`: one console script; each subcommand lives in its own module.

A subcommand module exposes `configure(parser)` (adds its arguments) and `run(args)`
(returns an exit code). Modules are imported only when their subcommand runs, so
`ssl-em --help` stays fast. Subcommands built on LightningCLI (pretrain, finetune)
instead expose `run_argv(argv)` and receive their arguments untouched; their `--help` is
a short page from `ssl_em.cli_flags`, and `--help-all` is LightningCLI's full help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help). Order is the order `--help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ssl_em.demo", "run the whole story on the built-in synthetic volume"),
    "ingest": ("ssl_em.data.ingest", "turn EM sources into one curated OME-Zarr archive"),
    "inspect": ("ssl_em.data.inspect", "show what an archive holds; write a contact sheet of curation"),
    "sample": ("ssl_em.data.sample", "write a grid of tiles as the pretraining stream yields them"),
    "synth": ("ssl_em.synthetic", "write the built-in synthetic EM volume and its labels"),
    "pretrain": ("ssl_em.pretrain.cli", "self-supervised pretraining (LightningCLI)"),
    "export": ("ssl_em.export", "export a backbone as a timm-loadable checkpoint"),
    "finetune": ("ssl_em.finetune.cli", "fine-tune a backbone and a segmentation head on a few labeled slices (LightningCLI)"),
    "predict": ("ssl_em.inference.predict", "sliding-window inference over a whole volume"),
    "evaluate": ("ssl_em.inference.evaluate", "score a prediction against ground truth"),
    "measure": ("ssl_em.measure", "measure the objects of a prediction in nm: a CSV of objects and a per-class summary"),
    "export-model": ("ssl_em.inference.bioimageio", "export a fine-tuned model for other tools (bioimage.io)"),
    "benchmark": ("ssl_em.finetune.benchmark", "label-efficiency benchmark: pretrained vs random init"),
}

#: LightningCLI commands whose short help (ssl_em.cli_flags) prints without importing them.
SHORT_HELP = ("pretrain", "finetune")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input (a `ssl_em.errors.UserError`, an OSError, a corrupt
    JSON or safetensors file) ends as one line `ssl-em COMMAND: error: ...` on stderr and
    exit code 2; `--debug` anywhere on the line (or SSL_EM_DEBUG=1) re-raises it instead,
    traceback included. argparse's own errors also exit with 2."""
    from ssl_em.errors import debug_enabled, find_user_error, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_enabled()
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="ssl-em", description="Self-supervised foundation models for electron microscopy.",
                                     epilog="--debug (anywhere) or SSL_EM_DEBUG=1: show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.error(f"unknown command {argv[0]!r}")
        return 0
    name, rest = argv[0], argv[1:]
    try:
        return _dispatch(name, rest)
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs just below
        cause = find_user_error(err)
        if cause is None or debug:
            raise
        print(f"ssl-em {name}: error: {one_line(cause)}", file=sys.stderr)
        return 2


def _dispatch(name: str, rest: list[str]) -> int:
    if name in SHORT_HELP and any(a in ("-h", "--help") for a in rest):
        from ssl_em.cli_flags import help_text  # no torch, no Lightning: help prints at once

        print(help_text(name), end="")
        return 0
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "run_argv"):
        return int(module.run_argv(rest) or 0)
    cmd_parser = argparse.ArgumentParser(prog=f"ssl-em {name}", description=COMMANDS[name][1])
    module.configure(cmd_parser)
    args = cmd_parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
