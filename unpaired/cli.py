"""The `unpaired` command: apply or export a trained generator.

    unpaired translate CHECKPOINT INPUT... --out DIR [--direction AtoB|BtoA] [--size N]
                       [--batch-size N] [--device auto|cpu|cuda|mps]
    unpaired export CHECKPOINT --direction AtoB --format onnx --out FILE
    unpaired remote-status [--remote NAME] [--repair]   # which outputs a DVC remote is missing
    unpaired unpack                   # rebuild the browsable data/prepared/ from data/prepared.tar

CHECKPOINT is any epoch_NNN.pt, last.pt or models/best/generators.pt. Inputs are files, folders
(searched recursively) or glob patterns. Images of any size work: each is reflect-padded to a
multiple of 4 and cropped back after translation; `--size N` resizes the shorter side to N first.
"""
from __future__ import annotations

import argparse
import glob
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from unpaired.errors import UserError, main_guard
from unpaired.images import IMAGE_SUFFIXES, to_float, to_uint8



def expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"{item}: no such file, folder or matching glob")
            files += matches
    return list(dict.fromkeys(files))


def _out_names(files: list[Path]) -> list[str]:
    """Output file names: the input's stem + .png, with a suffix where two inputs share a stem."""
    seen: dict[str, int] = defaultdict(int)
    names = []
    for f in files:
        seen[f.stem] += 1
        names.append(f"{f.stem}.png" if seen[f.stem] == 1 else f"{f.stem}_{seen[f.stem] - 1}.png")
    return names


def translate_files(checkpoint_path: str, inputs: list[str], out: str, direction: str = "AtoB",
                    size: int | None = None, batch_size: int = 8, device: str = "auto") -> tuple[int, list[str]]:
    """Translate every readable input into `out`; returns (written, skipped descriptions)."""
    from unpaired.devices import resolve_device
    from unpaired.checkpoint import load_generator
    from unpaired.images import Skip, read_uint8

    if size is not None and size < 4:
        raise UserError(f"--size must be >= 4, got {size}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device, "--device")
    net, _ = load_generator(checkpoint_path, direction, dev)
    from stages.prepare import PACKED, PREPARED
    from unpaired.files import refresh_view_for
    refresh_view_for(inputs, PACKED, PREPARED)     # data/prepared/ is a view of the tar: never a stale one
    files = expand_inputs(inputs)
    if not files:
        raise UserError("no input images found")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _out_names(files)
    images, skipped = {}, []
    for f, name in zip(files, names):
        try:
            img = read_uint8(f)
        except (Skip, OSError) as err:
            skipped.append(f"{f} ({getattr(err, 'reason', type(err).__name__)})")
            continue
        if size is not None:
            h, w = img.shape[-2:]
            scale = size / min(h, w)
            img = F.interpolate(img[None].float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                mode="bilinear", antialias=True, align_corners=False)[0].round().clamp(0, 255).byte()
        images[name] = img
    by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, img in images.items():
        by_shape[tuple(img.shape[-2:])].append(name)
    bar = tqdm(total=len(images), desc=f"translate {direction}", unit="img", disable=None)
    with torch.no_grad():
        for (h, w), group in by_shape.items():
            ph, pw = (-h) % 4, (-w) % 4
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                x = to_float(torch.stack([images[n] for n in chunk])).to(dev)
                if ph or pw:   # reflect needs pad < size: tiny inputs fall back to replicate
                    mode = "reflect" if ph < h and pw < w else "replicate"
                    x = F.pad(x, (0, pw, 0, ph), mode=mode)
                y = net(x)[..., :h, :w]
                y = to_uint8(y).permute(0, 2, 3, 1).cpu().numpy()
                for n, arr in zip(chunk, y):
                    tmp = out_dir / f".{n}.tmp"
                    Image.fromarray(arr).save(tmp, format="PNG")
                    tmp.replace(out_dir / n)
                bar.update(len(chunk))
    bar.close()
    return len(images), skipped


def export_onnx(checkpoint_path: str, out: str, direction: str = "AtoB", opset: int = 17) -> Path:
    """The generator as ONNX with dynamic batch, height and width (multiples of 4)."""
    from unpaired.checkpoint import load_generator
    from unpaired.files import atomic_write_bytes
    import io

    net, _ = load_generator(checkpoint_path, direction, "cpu")
    dummy = torch.zeros(1, 3, 64, 64)
    buf = io.BytesIO()
    torch.onnx.export(net, (dummy,), buf, input_names=["image"], output_names=["translated"], opset_version=opset,
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                    "translated": {0: "batch", 2: "height", 3: "width"}}, dynamo=False)
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="unpaired", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("translate", help="translate images with a trained generator")
    t.add_argument("checkpoint")
    t.add_argument("inputs", nargs="+", metavar="INPUT")
    t.add_argument("--out", required=True)
    t.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB")
    t.add_argument("--size", type=int, default=None, help="resize the shorter side to N first")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--device", default="auto")
    e = sub.add_parser("export", help="export a generator (ONNX)")
    e.add_argument("checkpoint")
    e.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB")
    e.add_argument("--format", choices=("onnx",), default="onnx")
    e.add_argument("--out", required=True)
    r = sub.add_parser("remote-status", help="name the pipeline outputs a DVC remote is missing")
    r.add_argument("--remote", default=None, help="remote name (default: the default remote)")
    r.add_argument("--repair", action="store_true", help="re-upload the missing parts from this clone")
    sub.add_parser("unpack", help="rebuild the browsable data/prepared/ from data/prepared.tar "
                                  "(after a dvc pull)")
    args = ap.parse_args(argv)

    def run() -> None:
        if args.command == "translate":
            written, skipped = translate_files(args.checkpoint, args.inputs, args.out, args.direction,
                                               args.size, args.batch_size, args.device)
            print(f"translated {written} image(s) {args.direction} -> {args.out}")
            if skipped:
                print(f"skipped {len(skipped)} unreadable file(s):")
                for s in skipped:
                    print(f"  {s}")
            if not written:
                raise UserError("no image could be read; nothing written")
        elif args.command == "export":
            path = export_onnx(args.checkpoint, args.out, args.direction)
            print(f"exported {args.direction} generator -> {path}")
        elif args.command == "unpack":
            from stages.prepare import PACKED, PREPARED
            from unpaired.files import unpack_view
            if not PACKED.is_file():
                raise UserError(f"{PACKED}: not here; run `uv run dvc pull` (or `make repro`) first")
            done = unpack_view(PACKED, PREPARED)
            print(f"{PREPARED}/: {'unpacked from' if done else 'already matches'} {PACKED}")
        else:
            from unpaired.remote import report
            raise SystemExit(report(".", args.remote, args.repair))
    main_guard(run)
