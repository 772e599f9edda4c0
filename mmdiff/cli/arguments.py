"""argparse value types and flags the ``mmdiff`` commands share: ranged numbers, output folders,
one-line parser errors, config overrides in three spellings, and one flag per sampling option (from
:class:`SamplingOptions`)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, NoReturn, Optional, Sequence, Tuple

from mmdiff.diffusion.options import SamplingOptions, option_fields, option_names, option_problem
from mmdiff.errors import UsageError


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None


def _boolean(text: str) -> bool:
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"must be true or false, got '{text}'")
    return value


def _finite_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _ranged(name: str, parse: Callable[[str], Any], ok: Callable[[Any], bool], requirement: str,
            doc: str) -> Callable[[str], Any]:
    """An argparse type: ``parse`` the text, then refuse values outside the range ``ok`` accepts."""
    def convert(text: str) -> Any:
        value = parse(text)
        if not ok(value):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {shown}")
        return value

    convert.__name__, convert.__doc__ = name, doc
    return convert


positive_int = _ranged("positive_int", _whole_number, lambda v: v > 0, "a positive number",
                       "argparse type for counts (images, steps, batch sizes): an integer of at least 1.")
non_negative_int = _ranged("non_negative_int", _whole_number, lambda v: v >= 0, "zero or more",
                           "argparse type for counts that may be zero (warm-up steps): an integer of at least 0.")
non_negative_float = _ranged("non_negative_float", _finite_number, lambda v: v >= 0, "zero or more",
                             "argparse type for scales and temperatures (guidance, eta): a number >= 0.")
positive_float = _ranged("positive_float", _finite_number, lambda v: v > 0, "more than zero",
                         "argparse type for rates and capacities (peak TFLOP/s): a number > 0.")
finite_float = _ranged("finite_float", _finite_number, lambda v: True, "finite",
                      "argparse type for a scale that may be negative (the LoRA scale): any finite number.")
unit_fraction = _ranged("unit_fraction", _finite_number, lambda v: 0 < v <= 1, "in (0, 1]",
                        "argparse type for shares (top-p mass, re-masked share): a number in (0, 1].")


def output_folder(text: str) -> str:
    """argparse type for an output folder: absent (it is created later) or an existing folder.

    Checked before any work starts, without creating anything: a path naming a file, or under a
    file, would otherwise fail only when the first result is written.
    """
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a file, not a folder; pass a folder path")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if not path.exists() and parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' cannot be created: '{parent}' is a file")
    return text


# ------------------------------------------------------------------------- config overrides
OVERRIDES_DEST = "overrides"
OVERRIDES_HELP = ("config overrides, each as key=value, --key=value or --key value (the form `wandb agent` "
                  "passes), anywhere among the flags; a flag of this command wins over a config key of the "
                  "same spelling")


def add_overrides(p: argparse.ArgumentParser, example: str) -> None:
    """The trailing ``key=value`` overrides of a config-taking command; its parser then also reads
    ``--key=value`` and ``--key value`` (see :func:`overrides_from_flags`)."""
    p.add_argument(OVERRIDES_DEST, nargs="*", metavar="KEY=VALUE", help=f"{OVERRIDES_HELP}; e.g. {example}")


def _is_option(text: str) -> bool:
    """``text`` is spelled as an option (``--x``, ``-x``), not a value; ``-1`` and ``-1e-05`` are values."""
    if text.startswith("--"):
        return True
    if not text.startswith("-") or len(text) == 1:
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False


def overrides_from_flags(arg_strings: Sequence[str], flags: Collection[str], prog: str) -> List[str]:
    """``--a.b=c`` and ``--a.b c`` as ``a.b=c``; the command's own ``flags`` and everything else as given.

    Any ``--name`` that is not exactly one of ``flags`` is read as a config key, so a misspelt key
    meets the config's did-you-mean error, and a flag always wins over a key of its spelling (which
    also turns off argparse's flag abbreviations for these commands: ``--res`` would be ambiguous).
    Values are kept as text: the config loader types them as it types ``a.b=c``.
    """
    out: List[str] = []
    i = 0
    while i < len(arg_strings):
        token = arg_strings[i]
        i += 1
        if token == "--":  # the user's end of options: the rest is positional, untouched
            out.extend(arg_strings[i - 1:])
            break
        if not token.startswith("--") or len(token) == 2:
            out.append(token)
            continue
        name, equals, value = token[2:].partition("=")
        if f"--{name}" in flags:
            out.append(token)
            continue
        if not equals:
            if i >= len(arg_strings) or _is_option(arg_strings[i]):
                raise UsageError(f"{prog}: --{name} needs a value (--{name}=VALUE or --{name} VALUE), or is not "
                                 f"a flag of this command (see {prog} --help).")
            value = arg_strings[i]
            i += 1
        out.append(f"{name}={value}")
    return out


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line UsageErrors, like every other mmdiff error
    (argparse's own prints the whole usage block and exits from inside parse_args).

    A parser with config overrides (:func:`add_overrides`) also reads them as ``--key=value`` and
    ``--key value`` and lets them stand anywhere among its flags (``fit C a=1 --resume last b=2``).
    """

    _parsing_intermixed = False

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help).")

    def _takes_overrides(self) -> bool:
        return any(action.dest == OVERRIDES_DEST for action in self._get_positional_actions())

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> Tuple[argparse.Namespace, List[str]]:
        if self._parsing_intermixed or not self._takes_overrides():
            return super().parse_known_args(args, namespace)
        rewritten = overrides_from_flags(list(sys.argv[1:] if args is None else args),
                                         self._option_string_actions, self.prog)
        # Intermixed: plain argparse stops filling a nargs="*" positional at the first flag, and a
        # sweep agent puts its overrides after the command's flags.
        self._parsing_intermixed = True
        try:
            return super().parse_known_intermixed_args(rewritten, namespace)
        finally:
            self._parsing_intermixed = False


# ----------------------------------------------------------------------------- sampler flags
SIZE_OPTIONS = ("original_size", "crop_top_left", "target_size")


def add_size_options(p: argparse.ArgumentParser) -> None:
    """SDXL micro-conditioning flags (``--original-size H W`` ...) of ``mmdiff sample``."""
    sizes = (("--original-size", "SDXL: the original image size the U-Net is told (default: the image size)"),
             ("--crop-top-left", "SDXL: the crop offset the U-Net is told (default 0 0)"),
             ("--target-size", "SDXL: the target size the U-Net is told (default: the image size)"))
    for flag, text in sizes:
        p.add_argument(flag, nargs=2, type=non_negative_int, metavar=("H", "W"), default=None, help=text)


def add_picture_size(p: argparse.ArgumentParser) -> None:
    """``--width W --height H`` of the sampled images (each defaults to the checkpoint's data.image_size)."""
    for side in ("width", "height"):
        p.add_argument(f"--{side}", type=positive_int, default=None, metavar=side[0].upper(),
                       help=f"image {side} in pixels, a multiple of the VAE's × the U-Net's down-sampling "
                            "(default: the checkpoint's data.image_size)")


def picture_size(args: argparse.Namespace) -> Dict[str, int]:
    """``--width`` / ``--height`` as given, keyed like ``sample()``'s arguments."""
    return {k: v for k in ("width", "height") if (v := getattr(args, k, None)) is not None}


def size_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The SDXL size/crop flags given, as ``(h, w)`` tuples keyed like ``sample()``'s arguments."""
    return {k: tuple(v) for k in SIZE_OPTIONS if (v := getattr(args, k, None)) is not None}


def sampling_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The sampling options given on the command line (the others keep the checkpoint config's)."""
    return {name: getattr(args, name) for name in option_names() if getattr(args, name) is not None}


def _option_type(f: dataclasses.Field) -> Callable[[str], Any]:
    """argparse type of a sampling option: parsed by its field type, checked as the config checks it."""
    kind = typing.get_type_hints(SamplingOptions)[f.name]
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
    parse = {int: _whole_number, float: _finite_number, bool: _boolean}.get(kind, str)

    def convert(text: str) -> Any:
        value = parse(text)
        problem = option_problem(f.name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem.rstrip("."))  # argparse adds its own ending
        return value

    convert.__name__ = f.name
    return convert


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`SamplingOptions` field (``--guidance-scale`` for ``guidance_scale``)."""
    for f in option_fields():
        meta = f.metadata
        default = meta["cli_default"]
        shown = f"default {default}" if default is not None else "default: the config's"
        listed = f": {', '.join(meta['choices'])}" if meta["choices"] else ""
        p.add_argument(f"--{f.name.replace('_', '-')}", *meta["flags"], dest=f.name, type=_option_type(f),
                       default=default, metavar="NAME" if meta["choices"] else None,
                       help=f"{meta['help']}{listed} ({shown})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--no-ema", action="store_true", help="use raw weights even if EMA weights exist")
