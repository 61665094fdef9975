"""The library's commands of the `zoo` CLI: `zoo list | load | export | publish`.

    zoo list [PATTERN] [--task-family F] [--all-versions]
    zoo load NAME[@VERSION] [--version V] [--device D] [--dtype T]
    zoo export NAME[@VERSION]|CHECKPOINT_DIR --format hf|llava --out DIR [--overwrite]
    zoo publish DIR --repo org/name [--revision R] [--private] [--message M] [--dry-run]
    zoo quantize NAME[@VERSION]|CHECKPOINT_DIR --bits 8|4 [--group-size G | --adaptive] --out DIR [--overwrite]

The installed `zoo` command (`zoo.pipelines.cli`) adds the training side's `build`, `train` and
`eval` to these; the library never imports training code, so they live there. Every command exits
0 on success, 2 on a usage error, and 1 with one `zoo: error: ...` line naming the cause (an
unknown model, a version no release satisfies, a model not built yet with the command that builds
it, a corrupted file, a bad config key, ...).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zoo.catalog.cards import Catalog, CatalogError
from zoo.catalog.install import LoadError, is_installed, render_card
from zoo.catalog.load import load_card, load_directory
from zoo.errors import check_device, report_errors
from zoo.io.checkpoint import CheckpointError, verify_checkpoint
from zoo.io.export import FORMATS, ExportError
from zoo.io.hub import HubError
from zoo.progress import quiet_while

# What bad input raises (a name no card has, a corrupt file, a config key no entry accepts, ...).
ERRORS = (CatalogError, LoadError, CheckpointError, HubError, ExportError, ValueError, TypeError, FileNotFoundError)
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _status(card) -> str:
    if is_installed(card):
        return "installed"
    if card.uri is not None:
        return "remote"
    return "not built"


def cmd_list(args: argparse.Namespace) -> int:
    cards = Catalog.from_dir(args.cards_dir).list(args.pattern, args.task_family, all_versions=args.all_versions)
    if not cards:
        what = " and ".join(x for x in (args.pattern and f"pattern {args.pattern!r}",
                                        args.task_family and f"task family {args.task_family!r}") if x)
        print(f"no registered model matches {what or 'anything'}", file=sys.stderr)
        return 0
    rows = [("NAME", "VERSION", "TASK FAMILY", "STATUS", "DESCRIPTION")]
    rows += [(c.name, str(c.version), c.task_family, _status(c), c.description) for c in cards]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return 0


def local_dir(target: str, version: str | None, cards_dir) -> Path | None:
    """The checkpoint directory `target` names, or None when it names a card.

    A bare name (no path separator) that is both a directory here and a card name is ambiguous:
    the directory must not silently shadow the card, so it is refused with the two spellings
    that choose (`./NAME` for the directory, `NAME@VERSION` for the card).

    Raises:
        LoadError: the name is both.
    """
    path = Path(target)
    if version is not None or not path.is_dir():
        return None
    bare = os.sep not in target and (os.altsep is None or os.altsep not in target) and target not in (".", "..")
    if bare and "@" not in target:
        catalog = Catalog.from_dir(cards_dir)
        if target in catalog.names():
            raise LoadError(f"{target!r} is both a directory here and a model card name; write ./{target} for the "
                            f"directory or {target}@{catalog.get(target).version} for the card")
    return path


def check_out(out: str, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse an existing output directory before any work, naming the flag that replaces it."""
    if Path(out).exists() and not overwrite:
        raise LoadError(f"{str(out)!r} already exists; pass {flag} to replace it")


def _resolve_model(target: str, version: str | None, cards_dir, device: str = "cpu", dtype=None):
    """(model, processor, config, checkpoint dir, card or None) for a name or a checkpoint directory."""
    path = local_dir(target, version, cards_dir)
    if path is not None:
        model, processor, cfg = load_directory(path, device=device, dtype=dtype)
        return model, processor, cfg, path, None
    card = Catalog.from_dir(cards_dir).get(target, version)
    model, processor, cfg, directory = load_card(card, device=device, dtype=dtype)
    return model, processor, cfg, directory, card


def cmd_load(args: argparse.Namespace) -> int:
    import torch

    check_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, processor, cfg, directory, card = _resolve_model(args.name, args.version, args.cards_dir, args.device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    lm = type(model.language_model).__name__
    print(f"{card.ref if card else args.name}: {cfg.name}, {n_params:,} parameters, LM {lm}, "
          f"media {sorted(model.encoders) or 'none'}, from {directory}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from zoo.io.export import export_multimodal

    check_out(args.out, args.overwrite)
    model, processor, cfg, directory, card = _resolve_model(args.name, args.version, args.cards_dir)
    text = render_card(card) if card is not None else None
    if card is not None and (directory / "README.md").is_file():
        text = (directory / "README.md").read_text(encoding="utf-8")  # the installed card, with metrics
    out = export_multimodal(model, processor, cfg, args.out, format=args.format,
                            name=card.name if card else cfg.name, card_text=text, overwrite=args.overwrite)
    print(f"exported {card.ref if card else args.name} to {out} (see {out / 'README.md'})")
    return 0


def upload_folder(**kwargs):
    """`huggingface_hub.upload_folder` (a seam for tests)."""
    import huggingface_hub

    return huggingface_hub.upload_folder(**kwargs)


def create_repo(**kwargs):
    """`huggingface_hub.create_repo` (a seam for tests)."""
    import huggingface_hub

    return huggingface_hub.create_repo(**kwargs)


def cmd_publish(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise LoadError(f"publish: {str(folder)!r} is not a directory (give a checkpoint or `zoo export` directory)")
    if (folder / "manifest.json").is_file():
        verify_checkpoint(folder)  # never upload a corrupted directory
    else:
        raise LoadError(f"publish: {str(folder)!r} has no manifest.json; publish a zoo checkpoint or a `zoo export` output")
    owner, _, repo = args.repo.partition("/")
    if not owner or not repo or "/" in repo:
        raise LoadError(f"publish: --repo must be 'org/name', got {args.repo!r}")
    upload = {"repo_id": args.repo, "folder_path": str(folder), "repo_type": "model",
              "commit_message": args.message or f"Upload {folder.name} with moe-zoo", "revision": args.revision}
    if args.dry_run:
        print(f"would upload {folder} to https://huggingface.co/{args.repo}" + (f" at {args.revision}" if args.revision else ""))
        return 0
    create_repo(repo_id=args.repo, repo_type="model", private=args.private, exist_ok=True)
    info = upload_folder(**upload)
    print(f"uploaded {folder} to https://huggingface.co/{args.repo}: {getattr(info, 'commit_url', info)}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from zoo.catalog.install import locate
    from zoo.io.quantize import quantize_model_dir

    check_out(args.out, args.overwrite)
    path = local_dir(args.name, args.version, args.cards_dir)
    src = path if path is not None else locate(Catalog.from_dir(args.cards_dir).get(args.name, args.version))
    out, qcfg, before, after = quantize_model_dir(src, args.out, bits=args.bits, group_size=args.group_size,
                                                  adaptive=args.adaptive, overwrite=args.overwrite)
    sizes = sorted({tuple(g) for g in qcfg.group_sizes.values()})
    print(f"quantized {len(qcfg.group_sizes)} experts modules of {src} to int{qcfg.bits} (group sizes in/out {sizes}): "
          f"expert weights {before['float32']:,} -> {after['codes'] + after['scales']:,} bytes "
          f"(codes {after['codes']:,} + scales {after['scales']:,}); wrote {out}")
    return 0


def make_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `zoo` parser with the library's subcommands; returns `(parser, subparsers)` to add more to."""
    p = argparse.ArgumentParser(prog="zoo", description="moe-zoo: list, load, build, train, evaluate, export and publish models.")
    p.add_argument("--cards-dir", default=os.environ.get("ZOO_MODEL_CARDS"),
                   help="model cards directory (default: $ZOO_MODEL_CARDS or the cards shipped with moe-zoo)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="catalogued models, their versions and whether they are installed")
    s.add_argument("pattern", nargs="?", help="glob over names, e.g. 'tiny-zoo-*'")
    s.add_argument("--task-family", help="only this task family")
    s.add_argument("--all-versions", action="store_true", help="every version, not only the newest")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("load", help="load a model (checks every file) and print a summary")
    s.add_argument("name", help="NAME or NAME@VERSION (e.g. tiny-zoo-vqa@^1.0), or a checkpoint directory")
    s.add_argument("--version", help="exact version or range (^1.0, ~1.2)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", choices=_DTYPES)
    s.add_argument("--quiet", action="store_true", help="no download progress bar (also ZOO_QUIET=1)")
    s.set_defaults(func=cmd_load)

    s = sub.add_parser("export", help="write a model as transformers-native files")
    s.add_argument("name", help="NAME, NAME@VERSION, or a checkpoint directory")
    s.add_argument("--version", help="exact version or range")
    s.add_argument("--format", required=True, choices=FORMATS,
                   help="hf: the LM as MixtralForCausalLM/Qwen2MoeForCausalLM (or its dense class) + encoder and "
                        "connector safetensors; llava: one LlavaForConditionalGeneration + LlavaProcessor directory "
                        "(or the parts LLaVA cannot hold, named)")
    s.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("publish", help="upload a checkpoint or export directory to the Hugging Face Hub")
    s.add_argument("dir", help="a directory with a manifest.json (checked before upload)")
    s.add_argument("--repo", required=True, help="org/name on the Hub")
    s.add_argument("--revision", help="branch to commit to")
    s.add_argument("--private", action="store_true", help="create the repository as private")
    s.add_argument("--message", help="commit message")
    s.add_argument("--dry-run", action="store_true", help="check and print what would be uploaded")
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("quantize", help="weight-only int8/int4 quantization of a model's experts (FineQuant) into a new checkpoint")
    s.add_argument("name", help="NAME, NAME@VERSION, or a checkpoint directory")
    s.add_argument("--version", help="exact version or range")
    s.add_argument("--bits", type=int, required=True, help="8 or 4")
    s.add_argument("--group-size", type=int, help="inputs per scale (must divide d and the expert width); default: per channel")
    s.add_argument("--adaptive", action="store_true", help="FineQuant's adaptive granularity chooses each matrix's group size")
    s.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_quantize)
    return p, sub


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None, errors: tuple[type[BaseException], ...]) -> int:
    """Parse `argv` and run the chosen subcommand; returns the exit status (0 ok, 1 error, 2 usage).

    A subcommand's `--quiet` sets `ZOO_QUIET=1` while it runs, so no progress bar (`zoo.progress`)
    shows in the work it starts, worker processes included.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    with quiet_while(getattr(args, "quiet", False)):
        command = f"{parser.prog} {args.command}" if getattr(args, "command", None) else parser.prog
        return report_errors(parser.prog, lambda: args.func(args), errors, command)


def main(argv: list[str] | None = None) -> int:
    """The library-only CLI (`python -m zoo.cli`): list, load, export, publish."""
    return run_cli(make_parser()[0], argv, ERRORS)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ERRORS", "check_out", "local_dir", "main", "make_parser", "report_errors", "run_cli"]
