"""`dimple demo [MODEL] [--host H] [--port P]`: the browser demo on the bundled tiny checkpoint or a named one.

cli.py registers the subcommand with `add_arguments` and calls `run`; gradio is imported only when the demo starts,
so `dimple --help` works without the `demo` extra.
"""

import argparse

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="local folder or Hub id (default: the bundled tiny checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument(
        "--concurrency", type=int, default=1,
        help="answers decoded at the same time (above 1: together, on the batching engine); further visitors wait in "
        "Gradio's queue",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where to decode (auto: the GPU when there is one, in bfloat16; else the CPU in float32)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="let a checkpoint whose model_type is not 'dimple' run the Python files its auto_map names",
    )
    parser.add_argument(
        "--write-space", metavar="FOLDER",
        help="instead of serving, write a Hugging Face Space folder (app.py, README.md, requirements.txt, the package) "
        "that runs this demo on MODEL",
    )


def load_for_demo(name: str | None, trust_remote_code: bool = False, device: str = "auto"):
    """Model and processor as `dimple generate` loads them, moved to the GPU (bfloat16, as released) when asked
    for or, with "auto", when one is present."""
    from ..cli import UserError, load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no GPU here; use --device cpu")
    model, processor = load_model(name, trust_remote_code)
    if device == "cuda":
        model = model.to(device="cuda", dtype=torch.bfloat16)
    return model, processor


def run(args: argparse.Namespace) -> str:
    from ..cli import UserError

    if args.write_space:
        from .space import write_space

        try:
            folder = write_space(args.write_space, args.model)
        except (ValueError, OSError) as error:
            raise UserError(str(error)) from error
        return f"wrote a Space in {folder}; upload it with: hf upload --repo-type space YOUR/SPACE {folder} ."
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must lie in 1..65535, got {args.port}")
    if args.concurrency < 1:
        raise UserError(f"--concurrency must be a positive integer, got {args.concurrency}")
    try:
        from .app import build_app, launch
    except ImportError as error:
        raise UserError(f"the demo needs gradio ({error}); install it with: pip install 'dimple-hf[demo]'") from error
    model, processor = load_for_demo(args.model, args.trust_remote_code, args.device)
    engine = None
    if args.concurrency > 1:  # several visitors' turns at once: decoded together, sharing each step's passes
        from ..engine import DiffusionEngine

        try:
            engine = DiffusionEngine(model, max_batch_size=args.concurrency)
        except TypeError as error:  # a model without this package's decoding seam (another folder's remote code)
            raise UserError(f"--concurrency above 1 needs the batching engine: {error}") from error
    try:
        launch(build_app(model, processor, title=args.model or "Dimple (bundled tiny checkpoint)", engine=engine),
               args.host, args.port, args.concurrency)
    finally:
        if engine is not None:
            engine.shutdown(cancel_pending=True)
    return "demo stopped"
