"""`unpaired translate`: apply a trained generator to image files, folders and globs.

    unpaired translate CHECKPOINT INPUT... --out DIR [--direction AtoB|BtoA] [--size N [--keep-size]]
                       [--batch-size N] [--device auto|cpu|cuda|cuda:N|mps]

Inputs are expanded (`expand_inputs`: folders searched recursively, globs, dead links skipped and
named), given unique output names (`out_names`), grouped into same-shape batches under a pixel budget
(`batches`) and run through the generator with reflect padding to a multiple of 4 (`pad_crop_forward`,
which the ONNX export in unpaired/export.py traces too). The argument parsing is unpaired/cli.py's.
"""

# torch is imported inside the functions that need it, so that `unpaired --help` answers at once.
from __future__ import annotations

import errno
import fnmatch
import glob
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from unpaired.errors import UserError
from unpaired.images import IMAGE_SUFFIXES

if TYPE_CHECKING:
    import torch

# The CLI's defaults for the pipeline's paths (dvc.yaml's cmds pass the stages theirs).
PACKED = Path("data/prepared.tar")  # prepare's packed dataset (the DVC output)
PREPARED = Path("data/prepared")  # its browsable view

# The smallest side, in pixels, that the ResnetGenerator takes. An input is reflect-padded to a
# multiple of 4; its two stride-2 convolutions bring that to 1/4, where each residual block
# reflection-pads by 1, which needs >= 2 px: so the padded side must be >= 8, i.e. the image's side
# >= 5 (5 is padded by 3 to 8, and reflect padding by 3 needs a side > 3). A 4 px side stays 4 and
# reaches the blocks as 1 px. Measured, not only argued: tests/test_cli.py runs a generator at
# 4 px (fails) and 5 px (works) per side, square and strip.
MIN_SIDE = 5
# --batch-size N means at most N images and at most N × 256×256 pixels per forward pass (256² is the
# reference CycleGAN's training size), so that large photos go one at a time.
BATCH_PIXELS_PER_IMAGE = 256 * 256


def _dead_link(path: Path) -> str | None:
    """`symlink_loop` or `broken_link` for a symlink that leads to no file (a loop, or a target that
    does not exist), None for anything else."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as err:
        return "symlink_loop" if err.errno == errno.ELOOP else "broken_link"
    return None


def _walk(root: Path, dead: list[str]) -> Iterator[Path]:
    """Every file and dead link under the folder `root`, following linked folders, but never into a
    folder that is its own ancestor: such a link is a loop, named once in `dead` (glob's `**` would
    follow it 40 deep, and two of them for minutes; rglob would drop it without a word)."""

    def visit(folder: Path, ancestors: frozenset[tuple[int, int]]) -> Iterator[Path]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            dead.append(f"{folder} (unreadable: {err.strerror})")
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                st = path.stat() if entry.is_dir() else None
            except OSError:
                st = None
            if st is None:
                yield path
            elif (st.st_dev, st.st_ino) in ancestors:
                dead.append(f"{path} (symlink_loop)")
            else:
                yield from visit(path, ancestors | {(st.st_dev, st.st_ino)})

    st = root.stat()
    yield from visit(root, frozenset({(st.st_dev, st.st_ino)}))


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """glob's rules for the path components `parts` against `pattern`: `**` is any number of
    folders, a `*` does not match a leading dot."""
    if not pattern:
        return not parts
    if not parts:
        return all(p == "**" for p in pattern)
    hidden = parts[0].startswith(".")
    if pattern[0] == "**":
        return _glob_match(parts, pattern[1:]) or (not hidden and _glob_match(parts[1:], pattern))
    return (
        (not hidden or pattern[0].startswith("."))
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _glob_match(parts[1:], pattern[1:])
    )


def _recursive_glob(item: str, dead: list[str]) -> list[Path]:
    """glob.glob(item, recursive=True) for a pattern with `**`, walked with `_walk`."""
    parts = Path(item).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    if not root.is_dir():
        return []
    return [p for p in _walk(root, dead) if _glob_match(p.relative_to(root).parts, parts[fixed:])]


def expand_inputs(inputs: list[str], skipped: list[str] | None = None) -> list[Path]:
    """The image files of `inputs` (files, folders searched recursively, globs), in order, each once.
    Linked folders are followed. A symlink that leads nowhere (a loop, a missing target) or back to a
    folder above it is not an input: it is appended to `skipped` as `path (symlink_loop)` or `path
    (broken_link)`, like unreadable files."""
    files: list[Path] = []
    dead: list[str] = []

    def keep(candidates: Iterable[Path], suffixes: Iterable[str] | None) -> None:
        """Files among `candidates` (with one of `suffixes`, if given) and dead links (with one of
        them, or none: a dead link's kind is unknown)."""
        for p in candidates:
            fits = suffixes is None or p.suffix.lower() in suffixes
            if p.is_file():
                if fits:
                    files.append(p)
            elif (fits or not p.suffix) and (why := _dead_link(p)):
                dead.append(f"{p} ({why})")

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            keep(sorted(_walk(path, dead)), IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        elif why := _dead_link(path):
            dead.append(f"{path} ({why})")
        else:
            if "**" in item:
                matches = sorted(_recursive_glob(item, dead))
            else:
                matches = sorted(Path(m) for m in glob.glob(item))
            if not any(m.is_file() or _dead_link(m) for m in matches):
                raise UserError(f"{item}: no such file, folder or matching glob")
            keep(matches, None)
    if skipped is not None:
        skipped.extend(dict.fromkeys(dead))
    return list(dict.fromkeys(files))


def out_names(files: list[Path]) -> list[str]:
    """One output file name per input, unique by construction (compared case-insensitively, as on
    macOS and Windows file systems).

    An input is written as its stem + `.png` (`x.jpg` -> `x.png`) when no other input has that name.
    Where several do (`x.jpg`, `x.png`, `a/x.png`), the first `.png` among them keeps `x.png`; the
    others keep their extension (`x.jpg.png`) or, if that too is taken, get the first free number
    (`x_2.png`, `x_3.png`). Every name is checked against all names given out or kept, so no output
    overwrites another whatever the inputs are called."""
    natural = [f"{f.stem}.png" for f in files]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(natural):
        groups[n.casefold()].append(i)
    keeps = set()
    for members in groups.values():
        pngs = [i for i in members if files[i].suffix.lower() == ".png"]
        if len(members) == 1 or pngs:
            keeps.add(members[0] if len(members) == 1 else pngs[0])
    taken = {natural[i].casefold() for i in keeps}
    names = []
    for i, f in enumerate(files):
        if i in keeps:
            names.append(natural[i])
            continue
        candidates = [f"{f.name}.png"] if f.suffix.lower() != ".png" else []
        k = 2
        while not candidates or candidates[-1].casefold() in taken:
            candidates.append(f"{f.stem}_{k}.png")
            k += 1
        name = next(c for c in candidates if c.casefold() not in taken)
        taken.add(name.casefold())
        names.append(name)
    return names


def _check_out(out_dir: Path, inputs: list[str], files: list[Path]) -> None:
    """Refuse an --out that is, is inside or contains an input folder, or holds an input file:
    translating there would overwrite inputs or read the outputs back as inputs next time."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(
            f"--out: {out_dir} exists and is not a folder; give a folder for the outputs"
        )
    out = out_dir.resolve()
    for item in inputs:
        folder = Path(item)
        if folder.is_dir():
            inp = folder.resolve()
            if out == inp or inp in out.parents or out in inp.parents:
                how = "is" if out == inp else "is inside" if inp in out.parents else "contains"
                raise UserError(
                    f"--out: {out_dir} {how} the input folder {item}; outputs would overwrite or "
                    f"mix with the inputs; choose a folder outside the inputs"
                )
    for f in files:
        if out in f.resolve().parents:
            raise UserError(
                f"--out: {out_dir} contains the input {f}; outputs could overwrite inputs; "
                f"choose a folder outside the inputs"
            )


def pad_crop_forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """net(x) for any H, W >= MIN_SIDE: x (N×3×H×W float in [-1, 1]) is reflect-padded at the bottom
    and right to multiples of 4 (the generator downsamples twice), and the output cropped back to
    H×W. h and w are read from x.shape, so the ONNX export (a trace) records this arithmetic and the
    exported graph pads and crops for every H and W, not only the traced one."""
    import torch.nn.functional as F

    h, w = x.shape[-2], x.shape[-1]
    ph, pw = (4 - h % 4) % 4, (4 - w % 4) % 4
    return net(F.pad(x, (0, pw, 0, ph), mode="reflect"))[..., :h, :w]


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError)
        and any(
            s in str(err).lower()
            for s in ("out of memory", "not enough memory", "can't allocate memory")
        )
    )


class _Item(NamedTuple):
    path: Path
    name: str  # output file name
    image: Any  # uint8 tensor 3×h×w, after --size
    original: tuple[int, int]  # (H, W) of the decoded file


def batches(items: Iterable[_Item], batch_size: int) -> Iterator[list[_Item]]:
    """Group same-shape images into batches of at most `batch_size` images and at most
    `batch_size × BATCH_PIXELS_PER_IMAGE` pixels; an image larger than that goes alone. Images waiting
    for a batch hold at most that many pixels in all (then every waiting group is sent), so memory
    stays bounded whatever the number of inputs."""
    budget = batch_size * BATCH_PIXELS_PER_IMAGE
    waiting: dict[tuple[int, int], list[_Item]] = {}
    held = 0
    for item in items:
        h, w = item.image.shape[-2:]
        group = waiting.setdefault((h, w), [])
        if group and (len(group) >= batch_size or (len(group) + 1) * h * w > budget):
            held -= len(group) * h * w
            yield waiting.pop((h, w))
            group = waiting.setdefault((h, w), [])
        group.append(item)
        held += h * w
        if held > budget:
            yield from waiting.values()
            waiting, held = {}, 0
    yield from waiting.values()


class Translated(NamedTuple):
    written: int
    skipped: list[str]  # "path (reason)": not read, or not written
    renamed: list[str]  # "path -> name" for outputs written under another name than <stem>.png,
    # where input names collide (in input order; never a file not written)


def _folder_takes(folder: Path, size: int) -> bool:
    """Whether `folder` takes `size` bytes in a file of its own naming (an unnamed temporary file,
    gone when closed, even after a kill): when it does, a write that failed there was that file's
    own fault (its name, a folder in its way), not the folder's (read-only, full, gone)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(bytes(size))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return False
    return True


def translate_files(
    checkpoint_path: str,
    inputs: list[str],
    out: str,
    direction: str = "AtoB",
    size: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    keep_size: bool = False,
) -> Translated:
    """Translate every readable input image into the folder `out` (created when the first output is
    written), one `<name>.png` per input (names: `out_names`).

    Skipped and listed, not fatal: unreadable files (images.SKIP_REASONS), images with a side below
    MIN_SIDE px (after `size`), and outputs that this file alone cannot be written as (a name the
    filesystem refuses, a folder in the way): the others are written. `size`: resize the shorter side
    to this many px first (>= MIN_SIDE);
    `keep_size`: write outputs back at the input's size. Raises UserError (one line) for a bad
    flag, an --out that is or overlaps an input folder, an --out folder that takes no file (read-only,
    full), or running out of memory on an image (naming it)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from tqdm import tqdm

    from unpaired.checkpoint import load_generator
    from unpaired.devices import resolve_device
    from unpaired.files import atomic_write_bytes, make_dirs, remove_stale_temporaries
    from unpaired.images import Skip, png_bytes, read_uint8, to_float, to_uint8

    if size is not None and size < MIN_SIDE:
        raise UserError(
            f"--size: must be >= {MIN_SIDE} (the generator needs >= {MIN_SIDE} px per side), got {size}"
        )
    if batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
    dev = resolve_device(device, "--device")
    from unpaired.files import refresh_view_for

    refresh_view_for(
        inputs, PACKED, PREPARED
    )  # data/prepared/ is a view of the tar: never a stale one
    skipped: list[str] = []
    files = expand_inputs(inputs, skipped)
    if not files:
        raise UserError(
            "no input images found"
            + (
                f"; skipped {len(skipped)}: {', '.join(skipped[:3])}"
                f"{', ...' if len(skipped) > 3 else ''}"
                if skipped
                else ""
            )
        )
    out_dir = Path(out)
    _check_out(out_dir, inputs, files)
    net, _ = load_generator(checkpoint_path, direction, dev)
    names = out_names(files)

    def resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:  # float N×C×H×W
        return F.interpolate(img, size=(h, w), mode="bilinear", antialias=True, align_corners=False)

    def readable() -> Iterator[_Item]:
        for f, name in zip(files, names):
            try:
                img = read_uint8(f)
                h, w = img.shape[-2:]
                if size is not None:
                    scale = size / min(h, w)
                    img = resize(
                        img[None].float(), max(1, round(h * scale)), max(1, round(w * scale))
                    )[0]
                    img = img.round().clamp(0, 255).byte()
            except (Skip, OSError) as err:
                skipped.append(f"{f} ({getattr(err, 'reason', type(err).__name__)})")
                bar.update(1)
                continue
            except (RuntimeError, MemoryError) as err:
                if not _is_oom(err):
                    raise
                raise UserError(
                    f"{f}: out of memory reading this image; use an image editor to scale it "
                    f"down first"
                ) from None
            if min(img.shape[-2:]) < MIN_SIDE:
                skipped.append(
                    f"{f} (too_small: {w}x{h} px; the generator needs >= {MIN_SIDE} px per side, "
                    f"or use --size)"
                )
                bar.update(1)
                continue
            yield _Item(f, name, img, (h, w))

    started = False

    def write(it: _Item, arr: Any) -> str | None:
        """PNG through files.atomic_write_bytes (a temporary that never outlives an error, the mode
        open() gives); a killed earlier run's temporaries are removed before the first write. None
        when written; when this file alone cannot be written (a name the filesystem refuses, a
        folder in its way: the folder itself takes a file of that size, _folder_takes), the skip
        entry naming it; a folder that takes nothing (read-only, full) stops the run with one line."""
        nonlocal started
        if not started:
            make_dirs(out_dir)
            remove_stale_temporaries(out_dir)
            started = True
        final = out_dir / it.name
        data = png_bytes(Image.fromarray(arr))
        try:
            atomic_write_bytes(final, data)
        except (OSError, UserError) as err:
            if not _folder_takes(out_dir, len(data)):
                if isinstance(err, UserError):
                    raise
                raise UserError(
                    f"{final}: cannot write ({err.strerror or err}); check the --out folder "
                    f"and free space"
                ) from None
            cause = (
                err if isinstance(err, OSError) else err.__context__
            )  # files' UserError wraps it
            why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(err)
            return f"{it.path} (not written: {final}: {why})"
        return None

    def run(batch: list[_Item]) -> tuple[list[_Item], list[str]]:
        """The batch through the generator and written: (the items written, skip entries of the
        others); nothing of a batch that fails (out of memory) is counted, so its retry counts once."""
        x = to_float(torch.stack([it.image for it in batch])).to(dev)
        y = pad_crop_forward(net, x)
        done, failed = [], []
        for it, one in zip(batch, y):
            if keep_size and tuple(one.shape[-2:]) != it.original:
                one = resize(one[None].float(), *it.original)[0]
            why = write(it, to_uint8(one).permute(1, 2, 0).cpu().numpy())
            if why is None:
                done.append(it)
            else:
                failed.append(why)
        return done, failed

    written: set[Path] = set()
    bar = tqdm(total=len(files), desc=f"translate {direction}", unit="img", disable=None)
    with torch.no_grad():
        for batch in batches(readable(), batch_size):
            todo = [batch]
            while todo:
                chunk = todo.pop()
                try:
                    done, failed = run(chunk)
                except (RuntimeError, MemoryError) as err:
                    if not _is_oom(err):
                        raise
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    if len(chunk) > 1:  # retry one by one before giving up
                        todo += [[it] for it in reversed(chunk)]
                        continue
                    it = chunk[0]
                    h, w = it.image.shape[-2:]
                    raise UserError(
                        f"{it.path}: out of memory translating this {w}x{h} image on {dev} "
                        f"({len(written)} written before it); use --size N (e.g. --size 512) to scale "
                        f"inputs down, or --batch-size 1"
                    ) from None
                written.update(it.path for it in done)
                skipped.extend(failed)
                bar.update(len(chunk))
    bar.close()
    renamed = [f"{f} -> {n}" for f, n in zip(files, names) if f in written and n != f"{f.stem}.png"]
    return Translated(len(written), skipped, renamed)


def translate_command(
    checkpoint_path: str,
    inputs: list[str],
    out: str,
    direction: str,
    size: int | None,
    batch_size: int,
    device: str,
    keep_size: bool,
) -> None:
    """`unpaired translate ...`: check the flags, translate_files, and print what was written,
    renamed and skipped. Raises UserError (one line) for a bad flag, or when nothing was written."""
    from unpaired.devices import check_device

    check_device(device, "--device")
    if keep_size and size is None:
        raise UserError(
            "--keep-size: only with --size N (without --size, outputs already have the "
            "inputs' size)"
        )
    done = translate_files(
        checkpoint_path, inputs, out, direction, size, batch_size, device, keep_size
    )
    if done.written:
        print(f"translated {done.written} image(s) {direction} -> {out}")
    if done.renamed:
        print(f"{len(done.renamed)} output(s) renamed where input names collide:")
        for s in done.renamed:
            print(f"  {s}")
    if done.skipped:
        print(f"skipped {len(done.skipped)} file(s):")
        for s in done.skipped:
            print(f"  {s}")
    if not done.written:
        raise UserError("no image could be translated; nothing written")
