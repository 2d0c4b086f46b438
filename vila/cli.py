"""``vila-infer``: parse flags, call the Python API, print the answer.

The answer alone goes to stdout; logs, progress bars and errors go to stderr. Errors are one line and a
documented exit code (see ``EXIT_CODES``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
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
  7  --batch finished, but some requests failed (their rows in --output carry "error")
  130 interrupted (Ctrl-C)"""

EXAMPLES = """examples:
  vila-infer -m Efficient-Large-Model/NVILA-8B --media demo_images/astronaut.png --text "Please describe the image"
  vila-infer -m Efficient-Large-Model/NVILA-8B-Video --media clip.mp4 --text "What happens?" --num-video-frames 32
  vila-infer -m Efficient-Large-Model/NVILA-8B --media a.png b.png --text "Compare <image> with <image>."
  vila-infer -m tests/fixtures/tiny/nvila-tiny --media demo_images/astronaut.png --text "Describe" --max-new-tokens 16
  vila-infer -m Efficient-Large-Model/NVILA-8B --chat                      # then: /image cat.jpg, What is this?
  vila-infer -m Efficient-Large-Model/NVILA-8B --batch requests.jsonl --output answers.jsonl [--resume]
      requests.jsonl lines: {"id": "q1", "text": "Describe.", "media": ["a.jpg"], "max_new_tokens": 64}
  vila-infer -m Efficient-Large-Model/NVILA-8B --media a.jpg --text "List the objects" --json-schema objects.json
  vila-infer -m Efficient-Large-Model/NVILA-8B --media a.jpg --text "Describe" --output-format json --stats --no-stream
"""

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage block is in --help), like every other vila-infer error."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="vila-infer",
        description="Answer a question about images and videos with a VILA / NVILA checkpoint.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model-path",
        "-m",
        required=True,
        help="checkpoint folder or Hugging Face hub id, e.g. Efficient-Large-Model/NVILA-8B",
    )
    p.add_argument(
        "--conv-mode",
        "-c",
        default="auto",
        help="conversation template: auto (default: the one the checkpoint was trained with), vicuna_v1, llama_3, hermes-2, plain",
    )
    p.add_argument(
        "--text",
        default=None,
        help="the question; <image> / <video> placeholders put the media there, otherwise media come first",
    )
    p.add_argument(
        "--media",
        nargs="+",
        default=[],
        metavar="PATH_OR_URL",
        help="images, videos (files, URLs) or directories of video frames, in prompt order",
    )
    p.add_argument(
        "--num-video-frames",
        "-nf",
        "--num_video_frames",
        type=int,
        default=None,
        help="frames sampled per video (default: the checkpoint's num_video_frames)",
    )
    p.add_argument(
        "--fps",
        type=float,
        default=None,
        help="sample videos at this many frames per second, at most --num-video-frames frames (0 = uniform; default: the checkpoint's fps)",
    )
    p.add_argument(
        "--video-max-tiles",
        "-vm",
        "--video_max_tiles",
        type=int,
        default=None,
        help="tiles per video frame for dynamic-resolution models (default: the checkpoint's video_max_tiles)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="stop after this many new tokens (default: until a stop token or the context is full, as the reference)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature; 0 or unset = greedy decoding (the reference's default)",
    )
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (only with --temperature > 0)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling, for reproducible samples")
    p.add_argument("--device", default=None, help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--dtype", default=None, help="auto (default: bf16/fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16"
    )
    p.add_argument("--revision", default=None, help="hub branch, tag or commit to download (default: main)")
    p.add_argument("--cache-dir", default=None, help="where hub downloads are cached (default: the Hugging Face cache)")
    # -- adapters, quantisation, several GPUs (vila.lora, vila.quantization, vila.device.plan_placement)
    p.add_argument(
        "--lora-path",
        "-l",
        default=None,
        help="a LoRA adapter (folder or hub id) trained on --model-path; merged at load (needs vila[lora])",
    )
    bits = p.add_mutually_exclusive_group()
    bits.add_argument(
        "--load-8bit",
        action="store_true",
        help="load the LLM in 8-bit through bitsandbytes (CUDA only; needs vila[quant])",
    )
    bits.add_argument(
        "--load-4bit",
        action="store_true",
        help="load the LLM in 4-bit NF4 through bitsandbytes (CUDA only; needs vila[quant])",
    )
    p.add_argument(
        "--devices",
        default=None,
        metavar="0,1",
        help="shard the LLM over these GPUs (vision tower and projector on the first)",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="0=20GiB,1=20GiB",
        help="cap the memory accelerate may use per device when sharding (cpu=... offloads)",
    )
    # -- VILA-HD (PS3) patch selection; unset flags fall back to the reference's environment variables
    hd = p.add_argument_group(
        "VILA-HD (PS3) patch selection",
        "default: the checkpoint's settings; env NUM_LOOK_CLOSE, NUM_TOKEN_LOOK_CLOSE, SELECT_NUM_EACH_SCALE, "
        "LOOK_CLOSE_MODE, SMOOTH_SELECTION_PROB apply when the flag is not given",
    )
    hd.add_argument(
        "--num-look-close",
        type=int,
        default=None,
        metavar="N",
        help="high-res passes; each encodes the next most relevant patches",
    )
    hd.add_argument(
        "--num-token-look-close",
        type=int,
        default=None,
        metavar="N",
        help="encode N high-res patches in all (wins over --num-look-close)",
    )
    hd.add_argument(
        "--select-num-each-scale",
        default=None,
        metavar="A+B[+C]",
        help="patches per pass at each high-res scale, e.g. 512+2048 (1.5K)",
    )
    hd.add_argument(
        "--look-close-mode",
        choices=("after_prompt", "after_image"),
        default=None,
        help="select patches for the question (after_prompt) or by image saliency",
    )
    hd.add_argument(
        "--smooth-selection-prob",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="select larger regions (probabilities averaged on a 6x6 grid)",
    )
    # -- streaming, chat, batch, JSON output, timings (vila.chat, vila.batch, vila.structured)
    use = p.add_argument_group("streaming, chat, batch, JSON output and timings")
    use.add_argument(
        "--no-stream",
        action="store_true",
        help="print the answer when it is complete (default: stream it token by token when stdout is a terminal)",
    )
    use.add_argument(
        "--chat",
        action="store_true",
        help="interactive multi-turn chat: /image PATH, /video PATH, /reset, /help, /quit (--media / --text start it)",
    )
    use.add_argument(
        "--batch",
        default=None,
        metavar="REQUESTS.jsonl",
        help='answer every line {"id", "text", "media": [...], optional settings} of a JSON-lines file, one model load',
    )
    use.add_argument(
        "--output",
        default=None,
        metavar="ANSWERS.jsonl",
        help="--batch: append one JSON line per request here (id and answer, or id and error)",
    )
    use.add_argument(
        "--resume",
        action="store_true",
        help="--batch: continue an existing --output, skipping the requests it already has a line for",
    )
    use.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="--batch: requests encoded and generated together (default: 8)",
    )
    use.add_argument(
        "--json-mode", action="store_true", help="constrain the answer to a JSON object (needs vila[json])"
    )
    use.add_argument(
        "--json-schema",
        default=None,
        metavar="SCHEMA.json",
        help="constrain the answer to this JSON Schema, a .json file (implies --json-mode; needs vila[json])",
    )
    use.add_argument(
        "--output-format",
        choices=("text", "json"),
        default="text",
        help="text (default): the answer; json: one JSON object with the answer, token counts and timings",
    )
    use.add_argument(
        "--stats",
        action="store_true",
        help="print to stderr: load, media decode and vision encode time, time to first token, decode tokens/s, peak RSS and CUDA memory, visual tokens per media item",
    )
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
        raise UsageError(
            f"--text has {len(holes)} media placeholder(s) but {len(items)} --media item(s) were given; make them match"
        )
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
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # library warnings are not the user's business
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
        print(
            f"vila-infer: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


PS3_ENV = {
    "num_look_close": "NUM_LOOK_CLOSE",
    "num_token_look_close": "NUM_TOKEN_LOOK_CLOSE",
    "select_num_each_scale": "SELECT_NUM_EACH_SCALE",
    "look_close_mode": "LOOK_CLOSE_MODE",
    "smooth_selection_prob": "SMOOTH_SELECTION_PROB",
}


def ps3_settings(args: argparse.Namespace, environ: Any = None) -> tuple[dict[str, Any], bool]:
    """The VILA-HD settings from the flags, else the reference's environment variables (spec cli_api.md §9.2).

    Returns the ``generate`` keyword arguments and whether any came from a flag. Checked before loading.
    """
    environ = os.environ if environ is None else environ
    settings: dict[str, Any] = {}
    from_flags = False
    for key, env in PS3_ENV.items():
        flag = "--" + key.replace("_", "-")
        value = getattr(args, key, None)
        if value is not None:
            from_flags = True
            name = flag
        elif environ.get(env) is not None:
            value, name = environ[env], env
        else:
            continue
        if key in ("num_look_close", "num_token_look_close"):
            try:
                value = int(value)
            except ValueError:
                raise UsageError(f"{name} must be an integer, got {value!r}") from None
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        elif key == "select_num_each_scale":
            try:
                value = [int(x) for x in str(value).split("+")]
            except ValueError:
                raise UsageError(f"{name} must be '+'-separated integers such as 512+2048, got {value!r}") from None
            if min(value) < 0 or sum(value) < 1:
                raise UsageError(f"{name} needs non-negative patch counts with at least one patch, got {value}")
        elif key == "look_close_mode" and value not in ("after_prompt", "after_image"):
            raise UsageError(f"{name} must be after_prompt or after_image, got {value!r}")
        elif key == "smooth_selection_prob" and not isinstance(value, bool):
            if str(value).lower() not in ("true", "false"):
                raise UsageError(f"{name} must be true or false, got {value!r}")
            value = str(value).lower() == "true"
        settings[key] = value
    return settings, from_flags


def apply_ps3_settings(model: Any, settings: dict[str, Any], from_flags: bool) -> dict[str, Any]:
    """Announce the settings and raise the context length as the reference CLI does, for every model (quirk #28);
    returns the keyword arguments for ``generate`` (VILA-HD models only)."""
    from .model.vila_hd import VilaHDModel, context_floor

    for key, value in settings.items():
        shown = "+".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key.replace('_', ' ').capitalize()}: {shown}", file=sys.stderr)  # the reference prints these
    tok = model.tokenizer
    floor = context_floor(settings.get("num_look_close"), settings.get("num_token_look_close"))
    if floor and (getattr(tok, "model_max_length", None) or 0) < floor:
        tok.model_max_length = floor
    if isinstance(model, VilaHDModel):
        return settings
    if from_flags:
        raise UsageError("the VILA-HD flags (--num-look-close, ...) only apply to VILA-HD checkpoints; remove them")
    return {}


def run(args: argparse.Namespace) -> int:
    # Cheap checks first (no torch import), so that typos and bad files fail in a fraction of a second.
    if args.video_max_tiles is not None and args.video_max_tiles < 1:
        raise UsageError(f"--video-max-tiles must be a positive integer, got {args.video_max_tiles}")
    response_format = check_use_flags(args)
    if not args.media and not (args.text or "").strip() and not (args.chat or args.batch):
        raise UsageError("nothing to answer: give --text and/or --media (or --chat, --batch)")
    prompt = build_prompt(args.text, args.media)  # checks media kinds before the (slow) model load
    check_media(prompt, quiet=not args.debug)
    from .model.vila import validate_generation_args

    validate_generation_args(args.max_new_tokens, args.temperature, args.top_p, None, args.num_video_frames, args.fps)
    hd_settings, hd_from_flags = ps3_settings(args)

    import time

    import vila

    t_load = time.perf_counter()
    model = vila.load(
        args.model_path,
        device=args.device,
        dtype=args.dtype,
        conv_mode=args.conv_mode,
        revision=args.revision,
        cache_dir=args.cache_dir,
        lora=args.lora_path,
        quantization="8bit" if args.load_8bit else "4bit" if args.load_4bit else None,
        devices=args.devices,
        max_memory=args.max_memory,
    )
    load_s = time.perf_counter() - t_load
    hd_kwargs = apply_ps3_settings(model, hd_settings, hd_from_flags)
    sampling = args.temperature is not None and args.temperature > 0
    gen = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        temperature=args.temperature if sampling else None,
        top_p=args.top_p,
        seed=args.seed,
        num_video_frames=args.num_video_frames,
        fps=args.fps,
        video_max_tiles=args.video_max_tiles,
        response_format=response_format,
        **hd_kwargs,
    )
    if args.batch:
        return run_batch_mode(model, args, gen, load_s)
    if args.chat:
        return run_chat_mode(model, args, prompt, gen)
    return answer_once(model, args, prompt, gen, load_s)


# -- streaming, chat, batch, JSON output, --stats ----------------------------------------------------------


def check_use_flags(args: argparse.Namespace) -> Any:
    """Check the mode flags before the (slow) model load; returns the ``response_format`` to use."""
    if args.chat and args.batch:
        raise UsageError("--chat and --batch cannot be combined; choose one")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.batch:
        if args.text is not None or args.media:
            raise UsageError("--batch reads text and media from the requests file; remove --text and --media")
        if not os.path.isfile(args.batch):
            raise UsageError(f"batch file not found: {args.batch}; pass a JSONL file with one request per line")
        if not args.output:
            raise UsageError("--batch needs --output FILE, where the answers are appended as JSON lines")
        if os.path.abspath(args.output) == os.path.abspath(args.batch):
            raise UsageError("--output must not be the --batch requests file")
        if os.path.isdir(args.output):
            raise UsageError(f"--output {args.output} is a directory; pass a file name")
        if os.path.exists(args.output) and os.path.getsize(args.output) > 0 and not args.resume:
            raise UsageError(
                f"--output {args.output} already exists; pass --resume to continue it, or choose a new file"
            )
    elif args.output or args.resume:
        raise UsageError("--output and --resume only apply to --batch")
    if args.output_format == "json" and (args.chat or args.batch):
        raise UsageError(
            "--output-format json is for single answers; --batch always writes JSON lines, --chat prints text"
        )
    from .structured import load_schema_file, require_xgrammar

    if args.json_schema:
        return load_schema_file(args.json_schema)
    if args.json_mode:
        require_xgrammar()
        return {"type": "json_object"}
    return None


def check_media(prompt: Sequence[Any], quiet: bool = True) -> None:
    """Decode local images and the first frame of local videos before the model loads: a corrupt file then
    fails in milliseconds, not after minutes of loading. (URLs are fetched once, when answering.) ``quiet``
    hides what FFmpeg / OpenCV / decord print on their own while probing a broken video: the MediaError says it."""
    from .media import Image, Video, is_url, load_image

    for part in prompt:
        source = getattr(part, "source", None)
        if not isinstance(source, str) or is_url(source):
            continue
        if isinstance(part, Image):
            load_image(part)
        elif isinstance(part, Video):
            from .video import load_video

            with native_stderr_silenced(quiet):
                load_video(part, num_frames=1, progress=False)


@contextlib.contextmanager
def native_stderr_silenced(enabled: bool = True) -> Any:
    """Point file descriptor 2 at /dev/null for the block (native libraries write there directly)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def has_video_file(prompt: Sequence[Any]) -> bool:
    """Whether a prompt holds a video file (time tokens in its answer become seconds, as in the reference CLI)."""
    from .media import Video

    return any(
        isinstance(part, Video) and isinstance(part.source, (str, os.PathLike)) and not os.path.isdir(part.source)
        for part in prompt
    )


def answer_once(model: Any, args: argparse.Namespace, prompt: list[Any], gen: dict[str, Any], load_s: float) -> int:
    """One answer: streamed to a terminal, else printed whole (text or --output-format json)."""
    rewrite = has_video_file(prompt) and model.config.num_time_tokens is not None
    if not args.no_stream and args.output_format == "text" and not rewrite and sys.stdout.isatty():
        pieces = model.stream_content(prompt, **gen)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        result, text = pieces.result, pieces.result.text
    else:
        result = model.generate(prompt, **gen)
        text = model.decode_time_tokens(result.text, result.video_durations) if has_video_file(prompt) else result.text
        if args.output_format == "json":
            import json

            row = {
                "answer": text,
                "num_prompt_tokens": result.num_prompt_tokens,
                "num_generated_tokens": len(result.token_ids),
                "media_tokens": result.media_tokens,
                "video_durations": result.video_durations,
                "timings": {"load_s": load_s, **result.timings},
                "peak_memory": peak_memory(),
            }
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            print(text, flush=True)
    if args.stats:
        print_stats(result, load_s)
    return 0


def run_chat_mode(model: Any, args: argparse.Namespace, prompt: list[Any], gen: dict[str, Any]) -> int:
    from .chat import run_chat

    session = model.chat(decode_time_tokens=True, **gen)
    stream = not args.no_stream and sys.stdout.isatty() and model.config.num_time_tokens is None
    return run_chat(session, stream=stream, first=prompt or None)


def run_batch_mode(model: Any, args: argparse.Namespace, gen: dict[str, Any], load_s: float) -> int:
    from .batch import SETTINGS, run_batch

    defaults = {k: gen.get(k) for k in SETTINGS}
    summary = run_batch(
        model, args.batch, args.output, resume=args.resume, batch_size=args.batch_size, defaults=defaults
    )
    rate = (summary.answered + summary.failed) / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"vila-infer: batch: {summary.answered} answered, {summary.failed} failed, {summary.skipped} already in "
        f"{args.output}; {summary.seconds:.1f} s ({rate:.2f} requests/s)",
        file=sys.stderr,
    )
    if args.stats:
        mem = peak_memory()
        print(
            f"  load {load_s:.2f} s, peak RSS {_gib(mem['rss_bytes'])}"
            + (f", CUDA {_gib(mem['cuda_bytes'])}" if mem.get("cuda_bytes") else ""),
            file=sys.stderr,
        )
    if summary.failed:
        print(
            f'vila-infer: {summary.failed} request(s) failed; their rows in {args.output} carry "error"',
            file=sys.stderr,
        )
        return 7
    return 0


def peak_memory() -> dict[str, int]:
    """Peak resident memory of this process and, when CUDA was used, peak CUDA memory allocated by torch."""
    import resource

    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_bytes": int(peak if sys.platform == "darwin" else peak * 1024)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_bytes"] = int(max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())))
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_stats(result: Any, load_s: float) -> None:
    """``--stats``: where the time and memory went, on stderr."""
    t = result.timings
    mem = peak_memory()
    lines = [
        f"load                 {load_s:8.3f} s",
        f"media decode         {t.get('media_decode_s', 0.0):8.3f} s",
        f"preprocess           {t.get('preprocess_s', 0.0):8.3f} s",
        f"vision encode        {t.get('vision_encode_s', 0.0):8.3f} s",
    ]
    if "time_to_first_token_s" in t:
        lines.append(f"time to first token  {t['time_to_first_token_s']:8.3f} s  (LLM prefill {t['prefill_s']:.3f} s)")
    speed = t.get("decode_tokens_per_s")
    lines.append(f"decode               {speed:8.1f} tokens/s" if speed else "decode                    n/a")
    lines.append(f"tokens               {result.num_prompt_tokens} prompt positions, {len(result.token_ids)} generated")
    lines.append(
        "visual tokens        "
        + (", ".join(map(str, result.media_tokens)) + " (per media item)" if result.media_tokens else "none")
    )
    lines.append(
        f"peak memory          RSS {_gib(mem['rss_bytes'])}"
        + (f", CUDA {_gib(mem['cuda_bytes'])}" if "cuda_bytes" in mem else ", CUDA n/a")
    )
    print("vila-infer stats:\n  " + "\n  ".join(lines), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
