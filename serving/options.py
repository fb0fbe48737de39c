"""The operator's limits for `dimple serve`: one dataclass with the defaults README's Serving table documents."""

import argparse
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server. Every limit is checked before any work it bounds is done."""

    max_tokens: int = 1024  # answer canvas (max_tokens / max_new_tokens); the canvas is allocated at once
    max_images: int = 8  # pictures in one request
    max_image_pixels: int = 25_000_000  # width x height, read from the header before decoding
    max_image_bytes: int = 20 * 2**20  # one encoded picture (data URL payload or downloaded body)
    max_request_bytes: int = 64 * 2**20  # one HTTP request body
    media_fetch_timeout: float = 10.0  # seconds for one http(s) image download, all of it
    allowed_local_media_path: Path | None = None  # server files readable by clients: none unless a folder is given
    allowed_media_domains: tuple[str, ...] = field(default=())  # empty: any host for http(s) images


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def existing_folder(text: str) -> Path:
    folder = Path(text).resolve()
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not an existing folder")
    return folder


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    add = parser.add_argument
    add("--max-tokens-cap", type=positive_int, default=defaults.max_tokens, dest="max_tokens", metavar="N",
        help=f"largest max_tokens / max_new_tokens a request may ask for (default {defaults.max_tokens})")
    add("--max-images", type=positive_int, default=defaults.max_images,
        help=f"most pictures in one request (default {defaults.max_images})")
    add("--max-image-pixels", type=positive_int, default=defaults.max_image_pixels,
        help=f"largest width x height of a picture, checked before decoding (default {defaults.max_image_pixels:,})")
    add("--max-image-bytes", type=positive_int, default=defaults.max_image_bytes,
        help=f"largest encoded picture in bytes (default {defaults.max_image_bytes:,})")
    add("--max-request-bytes", type=positive_int, default=defaults.max_request_bytes,
        help=f"largest request body in bytes (default {defaults.max_request_bytes:,})")
    add("--media-fetch-timeout", type=positive_float, default=defaults.media_fetch_timeout,
        help=f"seconds allowed for downloading one http(s) picture (default {defaults.media_fetch_timeout:g})")
    add("--allowed-local-media-path", type=existing_folder, default=None,
        help="folder whose pictures clients may name by path or file:// URL (default: none; local files refused)")
    add("--allowed-media-domains", nargs="+", default=[],
        help="host names http(s) pictures may come from (default: any host)")


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(
        max_tokens=args.max_tokens, max_images=args.max_images, max_image_pixels=args.max_image_pixels,
        max_image_bytes=args.max_image_bytes, max_request_bytes=args.max_request_bytes,
        media_fetch_timeout=args.media_fetch_timeout, allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=tuple(domain.lower() for domain in args.allowed_media_domains),
    )
