"""``vila-infer``: parse flags, call the Python API, print the answer.

The answer alone goes to stdout; logs, progress bars and errors go to stderr. Errors are one line and a
documented exit code (see ``EXIT_CODES``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .errors import UsageError, VilaError
from .media import build_prompt, has_video_file

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


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage block is in --help), like every other vila-infer error."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class StoreOnce(argparse.Action):
    """argparse's ``store``, except that a flag given twice with different values is an error: keeping the last
    one silently would drop what the user typed first (``--text`` twice, ``-nf 8 ... --num-video-frames 16``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        given = namespace.__dict__.setdefault("_given_flags", {})
        if self.dest in given and given[self.dest][1] != values:
            before, first = given[self.dest]
            parser.error(f"{option} given twice ({before} {first!r}, then {option} {values!r}); give it once")
        given[self.dest] = (option, values)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="vila-infer",
        description="Answer a question about images and videos with a VILA / NVILA checkpoint.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.register("action", None, StoreOnce)  # every single-value flag, in every group
    p.register("action", "store", StoreOnce)
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
        action="extend",  # --media a.png --media b.png: both, in order
        default=[],
        metavar="PATH_OR_URL",
        help="images, videos (files, URLs) or directories of video frames, in prompt order "
        "(repeat --media or list several)",
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
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode with a static KV cache and a torch.compile-d step (CUDA graphs on CUDA): auto (default) = on "
        "CUDA only; on = also on CPU/MPS; off = always eager. The first request of each new shape compiles",
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
    scale = p.add_argument_group("many GPUs and nodes (--batch with Ray Data, or one shard per process)")
    scale.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="--batch: answer on a Ray cluster (auto, host:6379 or ray://host:10001; bare --ray: RAY_ADDRESS or a "
        "local cluster); needs vila[ray]",
    )
    scale.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="--ray: model copies (actors) answering in parallel"
    )
    scale.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        metavar="G",
        help="--ray: GPUs per replica (default: 1 when the cluster has GPUs, else 0)",
    )
    scale.add_argument(
        "--shard-index",
        type=int,
        default=None,
        metavar="I",
        help="--batch: answer rows I, I+K, ... into OUTPUT.part-0000I-of-0000K (default: RANK or SLURM_PROCID)",
    )
    scale.add_argument(
        "--num-shards",
        type=int,
        default=None,
        metavar="K",
        help="--batch: the number of shards K (default: WORLD_SIZE or SLURM_NTASKS)",
    )
    scale.add_argument(
        "--merge",
        action="store_true",
        help="--batch: write --output from its part files, in input order (no model is loaded)",
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
    # -- the OpenAI-compatible HTTP server (vila.serve)
    srv = p.add_argument_group(
        "HTTP server (--serve; needs vila[serve])",
        "an OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models, GET /health",
    )
    srv.add_argument(
        "--serve",
        action="store_true",
        help="load the model once and answer OpenAI chat-completions requests over HTTP (see the README's Serve)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every request (default: $VILA_API_KEY; unset: no key)",
    )
    srv.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model id clients send and /v1/models lists (default: the last part of --model-path)",
    )
    srv.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests that may wait; beyond that the server answers 503 with Retry-After (default: 64)",
    )
    srv.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        metavar="N",
        help="greedy requests with equal settings decoded together (default: 8; 1 = one at a time)",
    )
    srv.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="also fetch image/video URLs on loopback, link-local and private addresses (refused by default)",
    )
    srv.add_argument(
        "--media-root",
        default=None,
        metavar="DIR",
        help="let requests name local files under DIR as image/video URLs (default: no local files)",
    )
    srv.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        metavar="N",
        help="most completion tokens per request, and the default max_tokens (default: the model's context)",
    )
    srv.add_argument("--max-body-mb", type=float, default=64, metavar="MB", help="largest request body (default: 64)")
    srv.add_argument(
        "--max-media-mb",
        type=float,
        default=32,
        metavar="MB",
        help="largest image or video, decoded or downloaded (default: 32)",
    )
    srv.add_argument(
        "--max-image-pixels",
        type=int,
        default=40_000_000,
        metavar="N",
        help="largest image, width x height (default: 40000000)",
    )
    srv.add_argument(
        "--max-video-frames",
        type=int,
        default=256,
        metavar="N",
        help="most frames a request may sample from one video (default: 256)",
    )
    srv.add_argument(
        "--url-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds allowed to download one media URL (default: 10)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="full tracebacks, and the decisions behind an answer on stderr: template and why, device, dtype, "
        "tiles per image, frames decoded per video, visual tokens per media item",
    )
    p.add_argument("--version", action="version", version=f"vila {__version__}")
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (tests and callers may swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"vila-infer: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def cli_logging(debug: bool) -> Any:
    """Only our own messages on stderr: the ``vila`` loggers (with ``--debug``, every decision behind an answer:
    template, device, dtype, tiles, frames, visual tokens) and Python warnings as one line each. Other libraries'
    debug output (PIL prints every PNG chunk) would bury those lines, so the root logger is left alone."""
    import warnings

    log = logging.getLogger("vila")
    saved = (log.level, log.propagate, warnings.showwarning)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s") if debug else _OneLineFormatter())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.WARNING)
    log.propagate = False
    if not debug:
        warnings.showwarning = lambda message, *_args, **_kw: print(f"vila-infer: warning: {message}", file=sys.stderr)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        warnings.showwarning = saved[2]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the --resume command after Ctrl-C
    if not args.debug:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # library warnings are not the user's business
    with cli_logging(args.debug):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
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
    """The VILA-HD settings from the flags, else the environment variables the reference CLI reads
    (NVlabs/VILA ``llava/cli/infer.py``, ``configure_ps3_and_context_length``).

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
    """Announce the settings and raise the context length as the reference CLI does: its
    ``configure_ps3_and_context_length`` runs for every model, so the PS3 variables raise the default
    ``max_length`` even of non-PS3 models. Returns the keyword arguments for ``generate`` (VILA-HD models only)."""
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
    serving = check_serve_flags(args) if args.serve else None
    if not args.media and not (args.text or "").strip() and not (args.chat or args.batch or args.serve):
        raise UsageError("nothing to answer: give --text and/or --media (or --chat, --batch)")
    prompt = build_prompt(args.text, args.media)  # checks media kinds before the (slow) model load
    check_media(prompt, quiet=not args.debug)
    from .engine import validate_generation_args

    validate_generation_args(args.max_new_tokens, args.temperature, args.top_p, None, args.num_video_frames, args.fps)
    hd_settings, hd_from_flags = ps3_settings(args)
    if args.merge:
        return run_merge(args)
    if args.ray is not None:  # the actors load the model; the driver only reads and writes rows
        return run_batch_mode(None, args, flag_settings(args, response_format), 0.0)
    if args.batch and args.device in (None, "auto") and os.environ.get("LOCAL_RANK", "").isdigit():
        import torch

        if torch.cuda.device_count() > 1:  # torchrun starts one process per GPU without hiding the others
            args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"

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
        compile=args.compile,
    )
    load_s = time.perf_counter() - t_load
    hd_kwargs = apply_ps3_settings(model, hd_settings, hd_from_flags)
    sampling = args.temperature is not None and args.temperature > 0
    gen = dict(flag_settings(args, response_format), do_sample=sampling, **hd_kwargs)
    if serving is not None:
        return run_serve(model, serving)
    if args.batch:
        return run_batch_mode(model, args, gen, load_s)
    if args.chat:
        return run_chat_mode(model, args, prompt, gen)
    return answer_once(model, args, prompt, gen, load_s)


def flag_settings(args: argparse.Namespace, response_format: Any) -> dict[str, Any]:
    """The generation settings given by flags (the defaults of --batch rows)."""
    sampling = args.temperature is not None and args.temperature > 0
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature if sampling else None,
        top_p=args.top_p,
        seed=args.seed,
        num_video_frames=args.num_video_frames,
        fps=args.fps,
        video_max_tiles=args.video_max_tiles,
        response_format=response_format,
    )


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
        sharded = args.shard_index is not None or args.num_shards is not None
        if (
            os.path.exists(args.output)
            and os.path.getsize(args.output) > 0
            and not (args.resume or sharded or args.merge)
        ):
            raise UsageError(
                f"--output {args.output} already exists; pass --resume to continue it, or choose a new file"
            )
        if args.ray is not None and (sharded or args.merge):
            raise UsageError("--ray spreads the rows itself; remove --shard-index, --num-shards and --merge")
        if args.replicas < 1:
            raise UsageError(f"--replicas must be a positive integer, got {args.replicas}")
        if args.gpus_per_replica is not None and args.gpus_per_replica < 0:
            raise UsageError(f"--gpus-per-replica must be 0 or more, got {args.gpus_per_replica}")
    elif args.output or args.resume:
        raise UsageError("--output and --resume only apply to --batch")
    elif args.ray is not None or args.merge or args.shard_index is not None or args.num_shards is not None:
        raise UsageError("--ray, --merge, --shard-index and --num-shards only apply to --batch")
    if args.output_format == "json" and (args.chat or args.batch):
        raise UsageError(
            "--output-format json is for single answers; --batch always writes JSON lines, --chat prints text"
        )
    from .structured import load_schema_file, require_llguidance

    if args.json_schema:
        return load_schema_file(args.json_schema)
    if args.json_mode:
        require_llguidance()
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


def answer_once(model: Any, args: argparse.Namespace, prompt: list[Any], gen: dict[str, Any], load_s: float) -> int:
    """One answer: streamed to a terminal, else printed whole (text or --output-format json)."""
    from .streaming import Progress, TokenClock

    rewrite = has_video_file(prompt) and model.config.num_time_tokens is not None
    if not args.no_stream and args.output_format == "text" and not rewrite and sys.stdout.isatty():
        # Closing the stream (also on Ctrl-C) stops the generation within a token.
        with model.stream_content(prompt, **gen) as pieces:
            try:
                with Progress(lambda: pieces.num_tokens) as progress:
                    for piece in pieces:
                        progress.write(sys.stdout, piece)
            finally:
                sys.stdout.write("\n")  # a message after Ctrl-C goes on its own line
                sys.stdout.flush()
        result, text = pieces.result, pieces.result.text
    else:
        counter = TokenClock()
        with Progress(lambda: counter.steps):
            result = model.generate(prompt, streamer=counter, **gen)
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
    """--batch on this process's model, on one shard of the rows, or (model None) on Ray actors."""
    from .batch import SETTINGS, part_path, run_batch, shard_from_env

    defaults = {k: gen.get(k) for k in SETTINGS}
    progress = sys.stderr.isatty()  # a bar in a log file is one endless line of carriage returns
    shard, source = (None, None) if args.ray is not None else shard_from_env(args.shard_index, args.num_shards)
    output = args.output if shard is None else str(part_path(args.output, *shard))
    if shard is not None:
        print(f"vila-infer: shard {shard[0]} of {shard[1]} (from {source}) -> {output}", file=sys.stderr)
    try:
        if args.ray is not None:
            from .ray import run_ray_batch

            quantization = "8bit" if args.load_8bit else "4bit" if args.load_4bit else None
            load_kwargs = dict(dtype=args.dtype, conv_mode=args.conv_mode, revision=args.revision)
            load_kwargs.update(cache_dir=args.cache_dir, lora=args.lora_path, quantization=quantization)
            load_kwargs["compile"] = args.compile
            if args.device not in (None, "auto"):
                load_kwargs["device"] = args.device
            summary = run_ray_batch(
                args.model_path,
                args.batch,
                args.output,
                load_kwargs=load_kwargs,
                resume=args.resume,
                batch_size=args.batch_size,
                defaults=defaults,
                address=args.ray or None,
                replicas=args.replicas,
                gpus_per_replica=args.gpus_per_replica,
                progress=progress,
            )
        else:
            summary = run_batch(
                model,
                args.batch,
                output,
                resume=args.resume,
                batch_size=args.batch_size,
                defaults=defaults,
                progress=progress,
                shard=shard or (0, 1),
            )
    except KeyboardInterrupt:
        print(
            f"vila-infer: interrupted; the finished answers are in {output}; to continue, run: " + resume_command(args),
            file=sys.stderr,
        )
        return 130
    args.output = output
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


def run_merge(args: argparse.Namespace) -> int:
    from .batch import merge_parts

    summary = merge_parts(args.batch, args.output, args.num_shards)
    print(f"vila-infer: merged {summary.total} rows into {args.output} ({summary.failed} error rows)", file=sys.stderr)
    return 7 if summary.failed else 0


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues an interrupted ``--batch`` run: this one, with ``--resume``, shell-quoted."""
    import shlex

    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    if "--resume" not in argv:
        argv.append("--resume")
    program = sys.argv[0]
    if os.path.basename(program) in ("vila-infer", "vila-infer.exe"):
        # The bare name when the shell finds this very script, else its path.
        found = shutil.which("vila-infer")
        prefix = ["vila-infer"] if found and os.path.realpath(found) == os.path.realpath(program) else [program]
    else:  # python -m vila.cli, or main() called from Python
        prefix = [sys.executable, "-m", "vila.cli"]
    return shlex.join(prefix + argv)


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


# -- --serve ----------------------------------------------------------------------------------------------


def check_serve_flags(args: argparse.Namespace, environ: Any = None) -> dict[str, Any]:
    """Check the server flags before the (slow) model load; returns ``host``, ``port`` and the settings."""
    import importlib.util

    from .openai_protocol import Limits

    environ = os.environ if environ is None else environ
    if args.chat or args.batch or args.text or args.media:
        raise UsageError("--serve answers HTTP requests; remove --chat, --batch, --text and --media")
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UsageError("--serve needs FastAPI and uvicorn: pip install 'vila[serve]'")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    for flag in ("max_queue", "max_batch_size", "max_image_pixels", "max_video_frames"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    for flag in ("max_body_mb", "max_media_mb", "url_timeout"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise UsageError(f"--max-tokens-limit must be a positive integer, got {args.max_tokens_limit}")
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise UsageError(f"--media-root {args.media_root} is not a directory")
    api_key = args.api_key if args.api_key is not None else environ.get("VILA_API_KEY") or None
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_media_bytes=int(args.max_media_mb * (1 << 20)),
        max_image_pixels=args.max_image_pixels,
        max_video_frames=args.max_video_frames,
        max_tokens=args.max_tokens_limit,
        url_timeout_s=args.url_timeout,
        allow_private_urls=args.allow_private_urls,
        media_root=os.path.abspath(args.media_root) if args.media_root else None,
    )
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_path)) or args.model_path
    return {
        "host": args.host,
        "port": args.port,
        "settings": dict(
            model_name=name,
            aliases=(args.model_path,),
            api_key=api_key,
            max_queue=args.max_queue,
            max_batch_size=args.max_batch_size,
            limits=limits,
        ),
    }


def run_serve(model: Any, serving: dict[str, Any]) -> int:
    from .serve import ServeSettings, serve

    serve(model, ServeSettings(**serving["settings"]), host=serving["host"], port=serving["port"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
