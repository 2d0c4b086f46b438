"""``vila-infer``: parse flags, call the Python API, print the answer.

The answer alone goes to stdout; logs, progress bars and errors go to stderr. Errors are one line and a
documented exit code (see ``EXIT_CODES``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import MediaError, UsageError, VilaError

EXIT_CODES = """exit codes:
  0  success
  1  unexpected internal error (rerun with --debug and report it)
  2  bad arguments or prompt (unknown flag value, empty prompt, unknown --conv-mode)
  3  model not found, not a VILA checkpoint, incomplete or unsupported checkpoint, hub errors
  4  media not found, unreadable, corrupt or unsupported
  5  prompt longer than the model's context
  6  requested device or dtype not available
  130 interrupted (Ctrl-C)"""

EXAMPLES = """examples:
  vila-infer -m Efficient-Large-Model/NVILA-8B --media demo_images/astronaut.png --text "Please describe the image"
  vila-infer -m Efficient-Large-Model/NVILA-8B-Video --media clip.mp4 --text "What happens?" --num-video-frames 32
  vila-infer -m Efficient-Large-Model/NVILA-8B --media a.png b.png --text "Compare <image> with <image>."
  vila-infer -m tests/fixtures/tiny/nvila-tiny --media demo_images/astronaut.png --text "Describe" --max-new-tokens 16
"""

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vila-infer",
        description="Answer a question about images and videos with a VILA / NVILA checkpoint.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-path", "-m", required=True, help="checkpoint folder or Hugging Face hub id, e.g. Efficient-Large-Model/NVILA-8B")
    p.add_argument(
        "--conv-mode",
        "-c",
        default="auto",
        help="conversation template: auto (default: the one the checkpoint was trained with), vicuna_v1, llama_3, hermes-2, plain",
    )
    p.add_argument("--text", default=None, help="the question; <image> / <video> placeholders put the media there, otherwise media come first")
    p.add_argument("--media", nargs="+", default=[], metavar="PATH_OR_URL", help="images, videos (files, URLs) or directories of video frames, in prompt order")
    p.add_argument("--num-video-frames", "-nf", "--num_video_frames", type=int, default=None, help="frames sampled per video (default: the checkpoint's num_video_frames)")
    p.add_argument("--fps", type=float, default=None, help="sample videos at this many frames per second, at most --num-video-frames frames (0 = uniform; default: the checkpoint's fps)")
    p.add_argument("--video-max-tiles", "-vm", "--video_max_tiles", type=int, default=None, help="tiles per video frame for dynamic-resolution models (default: the checkpoint's video_max_tiles)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="stop after this many new tokens (default: until a stop token or the context is full, as the reference)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 or unset = greedy decoding (the reference's default)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (only with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling, for reproducible samples")
    p.add_argument("--device", default=None, help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, help="auto (default: bf16/fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit to download (default: main)")
    p.add_argument("--cache-dir", default=None, help="where hub downloads are cached (default: the Hugging Face cache)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.add_argument("--version", action="version", version=f"vila {__version__}")
    return p


def media_kind(item: str) -> str:
    """ "image" or "video", by extension (case-insensitive), then by content."""
    from .media import is_url

    path = item.split("?")[0] if is_url(item) else item
    ext = os.path.splitext(path)[1].lower()
    if not is_url(item):
        if "://" in item:
            raise MediaError(f"unsupported URL scheme in {item!r}; use http(s):// or a local path")
        if not os.path.exists(item):
            raise MediaError(f"media not found: {item}; check the path")
    if os.path.isdir(item):
        return "video"  # a directory of frames
    if os.path.isfile(item) and ext not in VIDEO_EXTENSIONS:
        return sniff_kind(item, ext)
    return "video" if ext in VIDEO_EXTENSIONS else "image"


def sniff_kind(path: str, ext: str) -> str:
    """Content detection for files whose extension is missing or lies (a .png that is really an mp4)."""
    import PIL.Image

    try:
        with PIL.Image.open(path):
            return "image"
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is examined further
        pass
    with open(path, "rb") as f:
        head = f.read(16)
    is_video = head[4:8] == b"ftyp" or head[:4] == b"\x1aE\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
    if is_video or ext not in IMAGE_EXTENSIONS:
        return "video"
    return "image"  # a corrupt image: loading it gives the precise error


def build_prompt(text: str | None, media: Sequence[str]) -> list[Any]:
    """Media first, then the text (the reference's order), unless the text places them with placeholders."""
    from .media import Image, Video

    items = [Image(m) if media_kind(m) == "image" else Video(m) for m in media]
    if text is None:
        return items
    pieces = re.split(r"(<image>|<video>)", text)
    holes = [p for p in pieces if p in ("<image>", "<video>")]
    if not holes:
        return [*items, text]
    if len(holes) != len(items):
        raise UsageError(f"--text has {len(holes)} media placeholder(s) but {len(items)} --media item(s) were given; make them match")
    prompt: list[Any] = []
    it = iter(items)
    for piece in pieces:
        if piece in ("<image>", "<video>"):
            prompt.append(next(it))
        elif piece:
            prompt.append(piece)
    return prompt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("vila-infer: interrupted", file=sys.stderr)
        return 130
    except VilaError as e:
        if args.debug:
            raise
        print(f"vila-infer: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, for anything unexpected
        if args.debug:
            raise
        print(f"vila-infer: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    from .model.vila import validate_generation_args

    validate_generation_args(args.max_new_tokens, args.temperature, args.top_p, None, args.num_video_frames, args.fps)
    if args.video_max_tiles is not None and args.video_max_tiles < 1:
        raise UsageError(f"--video-max-tiles must be a positive integer, got {args.video_max_tiles}")
    if not args.media and not (args.text or "").strip():
        raise UsageError("nothing to answer: give --text and/or --media")
    prompt = build_prompt(args.text, args.media)  # checks media kinds before the (slow) model load

    import vila
    from .media import Video

    model = vila.load(
        args.model_path, device=args.device, dtype=args.dtype, conv_mode=args.conv_mode, revision=args.revision, cache_dir=args.cache_dir
    )
    sampling = args.temperature is not None and args.temperature > 0
    result = model.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        temperature=args.temperature if sampling else None,
        top_p=args.top_p,
        seed=args.seed,
        num_video_frames=args.num_video_frames,
        fps=args.fps,
        video_max_tiles=args.video_max_tiles,
    )
    text = result.text
    if any(isinstance(part, Video) and not os.path.isdir(part.source) for part in prompt):
        # Like the reference CLI: time tokens of answers about a video file become seconds (spec §7.6).
        text = model.decode_time_tokens(text, result.video_durations)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
