"""The server's media policy: where a client's picture may come from, and how big it may be.

A picture arrives as an `image_url` string. Like vLLM, the server reads its own disk only inside a folder the operator
allowed (`--allowed-local-media-path`, checked after resolving symlinks); otherwise paths and `file://` URLs are
refused without touching the disk, so neither content nor existence of a server file leaks. `http(s)` pictures are
downloaded with a total time limit and a byte cap, from `--allowed-media-domains` only when given, every redirect
checked again. Pictures are refused by their header's size before any pixel is decoded (a few hundred KB of PNG can
declare 40,000 x 40,000 pixels), and only common picture formats are parsed. Every refusal is a `RequestError` that
names the picture (`param`) and the problem.
"""

import base64
import binascii
import io
import re
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from ..image_processing_dimple import load_image
from .errors import RequestError
from .options import Limits

# Formats PIL may parse for a client: the ones browsers and phones produce (a phone's MPO opens as JPEG).
PICTURE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<payload>.*)", re.DOTALL)
CHUNK_BYTES = 1 << 16


def fetch_picture(url: str, limits: Limits, param: str) -> Image.Image:
    """The upright RGB picture `url` names, read under the media policy."""
    return decoded_picture(picture_bytes(url, limits, param), limits, param)


def picture_bytes(url: str, limits: Limits, param: str) -> bytes:
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string.", param)
    if url.startswith("data:"):
        return data_url_bytes(url, limits, param)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return downloaded_bytes(url, limits, param)
    if scheme == "file" or url.startswith("/"):
        return local_bytes(url, limits, param)
    raise RequestError(
        f"The image URL {url[:80]!r} is not a data:image/...;base64 URL, an http(s) URL or an absolute server path; "
        "send the picture as a data URL.", param,
    )


def data_url_bytes(url: str, limits: Limits, param: str) -> bytes:
    match = DATA_URL.fullmatch(url)
    if match is None or ";base64" not in match["params"].lower():
        raise RequestError("A data URL image must read data:image/<type>;base64,<payload>.", param)
    if not match["mime"].lower().startswith("image/"):
        raise RequestError(f"The data URL holds {match['mime'] or 'no media type'!r}, not an image/* type.", param)
    payload = re.sub(r"\s+", "", match["payload"])
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(too_many_bytes_message(len(payload) * 3 // 4, limits), param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"The image's data URL payload is not valid base64 ({error}).", param) from error


def too_many_bytes_message(size: int | str, limits: Limits) -> str:
    return (
        f"The picture is {size} bytes, above the server's limit of {limits.max_image_bytes:,} bytes "
        "(--max-image-bytes); send a smaller file."
    )


def check_host(url: str, limits: Limits, param: str) -> None:
    """Only http(s), and only the allowed hosts when the operator named some (also for every redirect)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise RequestError(f"The image URL {url!r} is not an http(s) URL with a host.", param)
    if limits.allowed_media_domains and parts.hostname.lower() not in limits.allowed_media_domains:
        raise RequestError(
            f"The image host {parts.hostname!r} is not allowed; this server fetches pictures only from "
            f"{', '.join(limits.allowed_media_domains)} (--allowed-media-domains).", param,
        )


class CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the policy allows, so a redirect cannot leave the allowed hosts."""

    def __init__(self, limits: Limits, param: str):
        self.limits, self.param = limits, param

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_host(newurl, self.limits, self.param)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def downloaded_bytes(url: str, limits: Limits, param: str) -> bytes:
    check_host(url, limits, param)
    opener = urllib.request.build_opener(CheckedRedirects(limits, param))
    deadline = time.monotonic() + limits.media_fetch_timeout
    request = urllib.request.Request(url, headers={"User-Agent": "dimple-serve"})
    try:
        with opener.open(request, timeout=limits.media_fetch_timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                raise RequestError(too_many_bytes_message(declared, limits), param)
            return read_capped(response, deadline, limits, url, param)
    except urllib.error.HTTPError as error:
        message = f"Fetching the image URL {url!r} failed: HTTP {error.code} {error.reason}."
        raise RequestError(message, param) from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RequestError(f"The image URL {url!r} could not be fetched ({reason}).", param) from error


def read_capped(response, deadline: float, limits: Limits, url: str, param: str) -> bytes:
    """The body, refused once it passes the byte cap or the total time limit (a slow drip cannot hold a worker)."""
    body = bytearray()
    while chunk := response.read(CHUNK_BYTES):
        body += chunk
        if len(body) > limits.max_image_bytes:
            raise RequestError(too_many_bytes_message(f"more than {limits.max_image_bytes:,}", limits), param)
        if time.monotonic() > deadline:
            raise RequestError(
                f"Downloading the image URL {url!r} took longer than {limits.media_fetch_timeout:g} s "
                "(--media-fetch-timeout).", param,
            )
    return bytes(body)


def local_bytes(url: str, limits: Limits, param: str) -> bytes:
    """A server file, only inside the allowed folder; refused before any disk access when no folder is allowed."""
    if limits.allowed_local_media_path is None:
        raise RequestError(
            "Server-local pictures (paths and file:// URLs) are refused: this server allows no local folder "
            "(its operator can pass --allowed-local-media-path DIR). Send the picture as a data URL instead.", param,
        )
    parts = urlsplit(url)
    if parts.scheme.lower() == "file" and parts.netloc not in ("", "localhost"):
        raise RequestError(f"The file URL {url!r} names another host; only local files can be allowed.", param)
    path = Path(unquote(parts.path) if parts.scheme.lower() == "file" else url)
    folder = limits.allowed_local_media_path
    resolved = path.resolve()
    if not resolved.is_relative_to(folder):
        raise RequestError(f"The picture {url!r} is outside the folder this server allows ({folder}).", param)
    if not resolved.is_file():
        raise RequestError(f"No picture file at {url!r} in the allowed folder.", param)
    with open(resolved, "rb") as file:
        data = file.read(limits.max_image_bytes + 1)
    if len(data) > limits.max_image_bytes:
        raise RequestError(too_many_bytes_message(f"more than {limits.max_image_bytes:,}", limits), param)
    return data


def decoded_picture(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Check the header's size against the pixel limit, then decode. Any decoding failure is the data's fault."""
    Image.init()  # registers every format plugin, so that `formats` can name them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data), formats=PICTURE_FORMATS)
    except Image.DecompressionBombError as error:  # PIL's own limit, where the launcher did not replace it
        raise RequestError(f"{error} Send a smaller picture (--max-image-pixels).", param) from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise RequestError(
            f"The picture is not an image this server reads ({', '.join(PICTURE_FORMATS)}).", param
        ) from error
    width, height = picture.size
    if width * height > limits.max_image_pixels:
        raise RequestError(
            f"The picture is {width} x {height} = {width * height:,} pixels, above the server's limit of "
            f"{limits.max_image_pixels:,} (--max-image-pixels); send a smaller picture.", param,
        )
    try:
        picture.load()
        return load_image(picture)
    except Exception as error:  # PIL raises many types for corrupt data (OSError, SyntaxError, struct.error, ...)
        raise RequestError(f"The picture could not be decoded ({error}); it is corrupt or truncated.", param) from error
