"""`dimple serve [MODEL] [options]`: load a Dimple checkpoint (default: the bundled tiny one) and serve it over HTTP.

The server is our own small FastAPI app (`app.py`) rather than a patched `transformers serve`: facing careless and
hostile clients needs request checks, a media policy, limits and cancellation at every step, which would mean
monkeypatching transformers' server internals that change between releases. uvicorn runs the app; SIGTERM (or
Ctrl-C) stops accepting connections, lets in-flight requests finish for `--shutdown-timeout` seconds, cancels the
rest at their next decoding step (they answer 503, or an error event when streamed) and exits with status 0.
"""

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from ..tiny.bundled import BUNDLED_CHECKPOINT
from .options import add_limit_arguments, limits_from, positive_int

SERVE_EXTRA_HINT = 'install the server with `pip install "dimple-hf[serve]"` (FastAPI, uvicorn and openai)'
log = logging.getLogger("dimple.serve")
QUANTIZATIONS = {"bnb-4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bnb-8bit": {"load_in_8bit": True}}


def parser() -> argparse.ArgumentParser:
    serve = argparse.ArgumentParser(
        prog="dimple serve", description="Serve a Dimple checkpoint with an OpenAI-compatible chat API."
    )
    add = serve.add_argument
    add("model", nargs="?", default=str(BUNDLED_CHECKPOINT),
        help="checkpoint folder or Hub id (default: the bundled tiny checkpoint); also the served model name")
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    add("--port", type=int, default=8000, help="port to listen on (default 8000)")
    add("--device", default="cpu", help="device for the model: cpu, cuda, cuda:1, ... (default cpu)")
    add("--dtype", default="auto", help="weights dtype: auto (the checkpoint's), bfloat16, float16, float32")
    add("--attn-implementation", default=None, help="sdpa, eager, flash_attention_2, ... (default: transformers')")
    add("--quantization", choices=sorted(QUANTIZATIONS), default=None,
        help="load the weights quantized with bitsandbytes (README, Quantization)")
    add("--served-model-name", default=None, help="name clients use in `model` (default: MODEL as given)")
    add("--max-batch-size", type=positive_int, default=8,
        help="most requests decoded together by the batching engine (default 8)")
    add("--no-batching", action="store_true",
        help="decode requests one at a time with generate() instead of batching concurrent ones")
    add("--shutdown-timeout", type=float, default=10.0,
        help="seconds in-flight requests may finish after SIGTERM before they are cancelled (default 10)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_limit_arguments(serve)
    return serve


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Model and processor with this package's classes (a folder's own Python files never run here)."""
    from transformers import AutoConfig

    from ..modeling_dimple import DimpleModel
    from ..processing_dimple import DimpleProcessor

    if not Path(args.model).exists() and args.model.count("/") != 1:
        raise ValueError(f"model not found: {args.model} is neither a folder nor a Hub id (owner/name)")
    config = AutoConfig.from_pretrained(args.model)
    if config.model_type != DimpleModel.config_class.model_type:
        raise ValueError(f"{args.model} holds a {config.model_type!r} checkpoint, not a Dimple one")
    options = {"dtype": args.dtype}
    if args.device != "cpu":
        options["device_map"] = args.device
    if args.attn_implementation:
        options["attn_implementation"] = args.attn_implementation
    if args.quantization:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(**QUANTIZATIONS[args.quantization])
    model = DimpleModel.from_pretrained(args.model, config=config, **options).eval()
    return model, DimpleProcessor.from_pretrained(args.model)


def build_decoder(args: argparse.Namespace, model: Any, processor: Any) -> Any:
    """The seam where decoding plugs in (see decoding.py): the batching engine, or generate() one by one."""
    from .decoding import EngineDecoder, SequentialDecoder

    if args.no_batching:
        log.info("decoding one request at a time (--no-batching)")
        return SequentialDecoder(model, processor.tokenizer)
    log.info("decoding concurrent requests together (batching engine, at most %d at once)", args.max_batch_size)
    return EngineDecoder(model, processor.tokenizer, args.max_batch_size)


def serve(argv: list[str]) -> int:
    """Entry point of `dimple serve`; 2 for a user mistake (one line on stderr), 0 after a clean stop."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        sys.stderr.write(f"dimple: error: dimple serve needs FastAPI and uvicorn ({error}); {SERVE_EXTRA_HINT}\n")
        return 2
    from .app import Served, build_app

    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        model, processor = load(args)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"dimple: error: cannot load model {args.model}: {str(error).splitlines()[0]}\n")
        return 2
    served = Served(
        model, processor, args.served_model_name or args.model, build_decoder(args, model, processor),
        limits_from(args), int(time.time()),
    )
    # The server's own --max-image-pixels, checked from the header before decoding, replaces PIL's global limit.
    Image.MAX_IMAGE_PIXELS = None
    config = uvicorn.Config(build_app(served), host=args.host, port=args.port, log_level=args.log_level)
    stopped_by = record_stop_signals()
    graceful_server(uvicorn.Server, served.decoder, args.shutdown_timeout)(config).run()
    log.info("dimple serve stopped%s", f" ({', '.join(stopped_by)})" if stopped_by else "")
    return 0


def graceful_server(server_class: type, decoder: Any, grace: float) -> type:
    """uvicorn's server whose shutdown gives in-flight requests `grace` seconds, then cancels their decoding, so each
    ends with its own answer (503, or an error event when streamed) instead of a task killed mid-response."""

    class GracefulServer(server_class):
        async def shutdown(self, sockets=None) -> None:
            cancel = asyncio.get_running_loop().call_later(grace, decoder.cancel_all)
            try:
                await super().shutdown(sockets=sockets)
            finally:
                cancel.cancel()

    return GracefulServer


def record_stop_signals() -> list[str]:
    """uvicorn handles SIGTERM/SIGINT while it runs, then raises the signal again to the handler it found: these
    handlers note it, so a signalled server ends with status 0 instead of dying of its own signal afterwards."""
    received: list[str] = []
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda signum, frame: received.append(signal.Signals(signum).name))
    return received
