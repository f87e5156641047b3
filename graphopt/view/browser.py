"""Open an HTML report in headless Chromium: its DOM after the page's script ran, a screenshot,
the time the page takes to load. Used by the report's browser test and its benchmark.

Chromium runs with a fresh profile folder, no network features and no sandbox (it may run as
root in CI containers); ``--virtual-time-budget`` lets the page's script finish before the dump.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

from graphopt.errors import ReportError

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars", "--virtual-time-budget=10000"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(page: Path, *flags: str, fragment: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    binary = chromium_path()
    if binary is None:
        raise ReportError("headless Chromium is not installed (Debian: apt-get install chromium)")
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="graphopt-chromium-") as profile:
        done = subprocess.run([binary, *_FLAGS, f"--user-data-dir={profile}", *flags, url],
                              capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ReportError(f"chromium exited with {done.returncode}: {done.stderr.strip()[-400:]}")
    return done


def dump_dom(page: Path, fragment: str | None = None) -> str:
    """The page's DOM, serialized after its script ran; ``fragment`` is given to the page as its
    URL's ``#fragment`` (the report's ``#all`` fills every picture of a large report)."""
    return _run(page, "--dump-dom", fragment=fragment).stdout


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 1800) -> Path:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(page, f"--screenshot={png.resolve()}", f"--window-size={width},{height}")
    if not png.is_file():
        raise ReportError(f"chromium wrote no screenshot to {png}")
    return png


def load_seconds(page: Path) -> float:
    """Wall time of opening ``page`` and dumping its DOM, less that of an empty page: what the
    report itself costs the browser (parsing, layout, its script)."""
    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.html"
        empty.write_text("<!DOCTYPE html><html><body></body></html>")
        t0 = time.perf_counter()
        dump_dom(empty)
        base = time.perf_counter() - t0
    t0 = time.perf_counter()
    dump_dom(page)
    return max(time.perf_counter() - t0 - base, 0.0)


def png_pixels(png: Path) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(width, height, RGB pixels row by row) of an 8-bit, non-interlaced RGB or RGBA PNG,
    as Chromium writes its screenshots."""
    data = Path(png).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ReportError(f"{png}: not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ReportError(f"{png}: PNG of depth {depth}, colour type {colour}, interlace {interlace}: not read here")
    channels = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    pixels: list[tuple[int, int, int]] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        pixels.extend(tuple(line[x:x + 3]) for x in range(0, stride, channels))
        previous = line
    return width, height, pixels
