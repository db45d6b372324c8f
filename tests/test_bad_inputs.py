"""The bad-input catalogue: each case ends in a coded refusal or a counted skip, never a
traceback, a hang or a finished-looking wrong answer. One table, driven through the tools in
process and through the command line (exit 2 and the code in --json, or exit 0 and the skip)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import write_image
from deft_mine.engine.images import decode_rgb
from deft_mine.errors import DeftError
from deft_mine.tools import embed, run

BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- images

def _zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_png(path: Path) -> None:
    write_image(path, seed=1, size=(64, 64))
    path.write_bytes(path.read_bytes()[:200])


def _text_as_jpg(path: Path) -> None:
    path.write_text("certainly not a JPEG")


def _directory(path: Path) -> None:
    path.mkdir()


def _symlink_loop(path: Path) -> None:
    os.symlink(path.name, path)


def _fifo(path: Path) -> None:
    os.mkfifo(path)  # reading it would wait for a writer forever


def _device(path: Path) -> None:
    os.symlink("/dev/zero", path)  # endless bytes


def _bomb(path: Path) -> None:
    Image.new("1", (10000, 10000)).save(path)  # 100 MP, over PIL's limit: 12 kB on disk


def _save(mode: str, fmt: str, **kwargs: object) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        rgb = Image.fromarray(np.random.default_rng(7).integers(0, 255, (40, 48, 3), dtype=np.uint8))
        image = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
        image.save(path, format=fmt, **kwargs)
    return make


def _sixteen_bit(path: Path) -> None:
    Image.fromarray((np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)).save(path)


def _animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def _multipage_tiff(path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), (0, i * 60, 0)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


@dataclass
class ImageCase:
    name: str  # the file name in the listing (spaces and unicode on purpose)
    make: Callable[[Path], None] | None  # None: listed but never created
    skipped: str | None  # the skip reason, or None: embedded


IMAGE_CASES = [
    ImageCase("zero byte.png", _zero_byte, "not an image"),
    ImageCase("truncated.png", _truncated_png, "unreadable"),
    ImageCase("text.jpg", _text_as_jpg, "not an image"),
    ImageCase("a folder.png", _directory, "is a directory"),
    ImageCase("loop.png", _symlink_loop, "unreadable"),
    ImageCase("gone.png", None, "missing"),
    ImageCase("bomb.png", _bomb, "too_large"),
    ImageCase("pipe.png", _fifo, "not a regular file"),
    ImageCase("device.png", _device, "not a regular file"),
    ImageCase("cmyk.jpg", _save("CMYK", "JPEG"), None),
    ImageCase("palette.png", _save("P", "PNG"), None),
    ImageCase("alpha.png", _save("RGBA", "PNG"), None),
    ImageCase("grey.png", _save("L", "PNG"), None),
    ImageCase("webp.webp", _save("RGB", "WEBP"), None),
    ImageCase("16 bit.png", _sixteen_bit, None),
    ImageCase("animated.gif", _animated_gif, None),
    ImageCase("pages.tiff", _multipage_tiff, None),
    ImageCase("ünïcødé 画像.png", _save("RGB", "PNG"), None),
]


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("odd")
    (folder / "imgs").mkdir()
    for case in IMAGE_CASES:
        if case.make is not None:
            case.make(folder / "imgs" / case.name)
    pq.write_table(pa.table({"filepath": [f"imgs/{c.name}" for c in IMAGE_CASES],
                             "case": [c.name for c in IMAGE_CASES]}), folder / "odd.parquet")
    return folder


def _expected_skips() -> dict[str, int]:
    out: dict[str, int] = {}
    for case in IMAGE_CASES:
        if case.skipped:
            out[case.skipped] = out.get(case.skipped, 0) + 1
    return out


def test_every_odd_image_is_embedded_or_skipped_with_its_reason(odd_images: Path) -> None:
    result = embed(odd_images / "odd.parquet", odd_images / "odd_emb.parquet", overrides={"model": "thumbnail"},
                   no_store=True)
    assert result.skipped_by_reason == _expected_skips()
    embedded = pq.read_table(odd_images / "odd_emb.parquet").column("case").to_pylist()
    assert embedded == [c.name for c in IMAGE_CASES if c.skipped is None]
    assert [w.code for w in result.warnings] == ["images_skipped"]


@pytest.mark.e2e
def test_the_command_line_says_the_same(odd_images: Path) -> None:
    proc = subprocess.run([str(BIN / "deft-mine"), "embed", "--json", "--no-store", "model=thumbnail",
                           f"input_parquet={odd_images / 'odd.parquet'}",
                           f"output_parquet={odd_images / 'odd_cli.parquet'}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["skipped_by_reason"] == _expected_skips()
    assert "images_skipped" in proc.stderr and "Traceback" not in proc.stderr


def test_a_16_bit_png_keeps_its_content(tmp_path: Path) -> None:
    """PIL's own conversion clips 16-bit grey to white; ours scales it to 8 bits."""
    _sixteen_bit(tmp_path / "deep.png")
    decoded = np.asarray(decode_rgb((tmp_path / "deep.png").read_bytes(), "deep.png"))
    source = np.asarray(Image.open(tmp_path / "deep.png"), dtype=np.float64)
    assert decoded.shape == (40, 48, 3) and decoded.min() == 0 and 200 < decoded.max() < 255
    assert np.abs(decoded[..., 0] - source / 257.0).max() <= 0.5


class _DeleteOnFirstBatch:
    """Events that delete an image once the first batch is done: it was listed, then it went."""

    def __init__(self, victim: Path) -> None:
        self.victim = victim

    def progress(self, stage: str, done: int, total: int | None, note: str = "") -> None:
        if done and self.victim.exists():
            self.victim.unlink()

    def log(self, level: str, message: str) -> None:
        pass


def test_an_image_that_disappears_mid_run_is_skipped_as_missing(tmp_path: Path) -> None:
    names = [f"imgs/{i}.png" for i in range(8)]
    for i, name in enumerate(names):
        write_image(tmp_path / name, seed=i)
    pq.write_table(pa.table({"filepath": names}), tmp_path / "pool.parquet")
    # batch_size 1 and the last row: well past the two batches decoded ahead of the encoder
    result = embed(tmp_path / "pool.parquet", tmp_path / "emb.parquet", no_store=True,
                   overrides={"model": "thumbnail", "batch_size": 1}, events=_DeleteOnFirstBatch(tmp_path / names[-1]))
    assert result.skipped_by_reason == {"missing": 1} and result.rows == 7
    assert pq.read_table(tmp_path / "emb.parquet").column("filepath").to_pylist() == names[:-1]


# ----------------------------------------------------------------------------- specs, tables, faults

@pytest.fixture
def small(tmp_path: Path) -> Path:
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    pq.write_table(pa.table({"filepath": [f"imgs/{i}.png" for i in range(3)]}), tmp_path / "pool.parquet")
    pq.write_table(pa.table({"filepath": ["imgs/absent.png", "imgs/gone.png"]}), tmp_path / "unreadable.parquet")
    pq.write_table(pa.table({"path": ["imgs/0.png"]}), tmp_path / "nofilepath.parquet")
    (tmp_path / "truncated.parquet").write_bytes((tmp_path / "pool.parquet").read_bytes()[:40])
    (tmp_path / "csv_really.parquet").write_text("filepath\nimgs/0.png\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    return tmp_path


def _run(folder: Path, source: str = "pool.parquet", **args: object) -> list[str]:
    return ["run", "--targets", str(folder / "pool.parquet"), "--source", str(folder / source),
            *[f"{k}={v}" for k, v in args.items()]]


# name → (command line words given the folder, expected error code, expected field or None)
REFUSALS: dict[str, tuple[Callable[[Path], list[str]], str, str | None]] = {
    "unknown key with a close one": (lambda f: _run(f, "pool.parquet", top_n=3) + ["--run-dir", str(f / "r")],
                                     "spec_unknown_key", "top_n"),
    "topn=0": (lambda f: _run(f, topn=0) + ["--run-dir", str(f / "r")], "spec_invalid", "topn"),
    "topn not an integer": (lambda f: _run(f, topn=2.5) + ["--run-dir", str(f / "r")], "spec_invalid", "topn"),
    "filter_by_label=on": (lambda f: _run(f, filter_by_label="on") + ["--run-dir", str(f / "r")],
                            "spec_invalid", "filter_by_label"),
    "unresolved ???": (lambda f: _run(f, model_path="???") + ["--run-dir", str(f / "r")],
                       "spec_missing_value", "model_path"),
    "no filepath column": (lambda f: _run(f, "nofilepath.parquet", model="thumbnail") + ["--run-dir", str(f / "r")],
                           "column_missing", None),
    "truncated parquet": (lambda f: _run(f, "truncated.parquet", model="thumbnail") + ["--run-dir", str(f / "r")],
                          "parquet_invalid", None),
    "a CSV named .parquet": (lambda f: _run(f, "csv_really.parquet", model="thumbnail") + ["--run-dir", str(f / "r")],
                             "parquet_invalid", None),
    "device=cuda:7 that torch cannot see": (lambda f: _run(f, model="thumbnail", device="cuda:7")
                                            + ["--run-dir", str(f / "r")], "no_gpu", "device"),
    "device=gpu": (lambda f: _run(f, model="thumbnail", device="gpu") + ["--run-dir", str(f / "r")],
                   "spec_invalid", "device"),
    "run folder already used": (lambda f: _run(f, model="thumbnail") + ["--run-dir", str(f / "taken")],
                                "run_dir_exists", "run_dir"),
    "image_root not a folder": (lambda f: _run(f, model="thumbnail", image_root=f / "nope") + ["--run-dir", str(f / "r")],
                                "file_not_found", "image_root"),
    "no readable image in the pool": (lambda f: _run(f, "unreadable.parquet", model="thumbnail")
                                      + ["--run-dir", str(f / "r")], "no_readable_images", "source"),
    "output equal to an input": (lambda f: ["embed", "model=thumbnail", f"input_parquet={f / 'pool.parquet'}",
                                            f"output_parquet={f / 'pool.parquet'}"], "output_is_input", "output_parquet"),
    "an output folder that cannot be written": (lambda f: ["embed", "model=thumbnail", f"input_parquet={f / 'pool.parquet'}",
                                                           "output_parquet=/proc/deft-mine/emb.parquet"],
                                                "output_not_writable", None),
}


def _arguments(words: list[str]) -> tuple[str, dict[str, object]]:
    """The tool and the arguments the command line would give it (key=value words parsed)."""
    from deft_mine.cli import build_parser

    args = build_parser().parse_args(words)
    tool = args.tool
    return tool.name, {name: getattr(args, name) for name in tool.input.model_fields
                       if hasattr(args, name) and getattr(args, name) is not None}


def _in_process(words: list[str]) -> None:
    """The same words through the tools (the command line's own parsing of key=value aside)."""
    from deft_mine.tools import TOOLS

    name, given = _arguments(words)
    TOOLS[name](**given)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_by_code_naming_the_field(small: Path, case: str) -> None:
    words, code, field = REFUSALS[case]
    with pytest.raises(DeftError) as exc:
        _in_process(words(small))
    assert exc.value.code == code
    if field is not None:
        assert exc.value.details.get("field") == field
    assert exc.value.fix
    assert not (small / "r" / "Mining_Report.md").exists()  # never a finished-looking run folder


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(REFUSALS))
def test_the_command_line_refuses_with_exit_2(small: Path, case: str) -> None:
    words, code, _ = REFUSALS[case]
    argv = words(small)
    proc = subprocess.run([str(BIN / "deft-mine"), argv[0], "--json", *argv[1:]], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert json.loads(proc.stdout)["code"] == code and "Traceback" not in proc.stderr


def test_a_failed_run_says_so_instead_of_looking_finished(small: Path) -> None:
    with pytest.raises(DeftError):
        run(small / "pool.parquet", small / "unreadable.parquet", run_dir=small / "r", overrides={"model": "thumbnail"})
    manifest = json.loads((small / "r" / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["code"] == "no_readable_images"
    assert not (small / "r" / "mined.parquet").exists()


# ----------------------------------------------------------------------------- through the MCP server

#: Where the MCP server answers differently, and why: its roots close the door earlier.
MCP_CODES = {"an output folder that cannot be written": "path_outside_roots"}


@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module, rooted at pytest's base temp folder, which holds every case's folder."""
    from mcp_helpers import SyncClient, stdio_params

    with SyncClient(stdio_params(tmp_path_factory.getbasetemp())) as client:
        yield client


def _wire(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


@pytest.mark.e2e
def test_the_mcp_server_skips_the_same_images(mcp_server, odd_images: Path) -> None:
    """Except the one that points outside the roots: /dev/zero is refused at the door, by row."""
    from mcp_helpers import ok, refused, warning

    outside = refused(mcp_server.call("embed", {"input_parquet": str(odd_images / "odd.parquet"),
                                                "output_parquet": str(odd_images / "odd_mcp.parquet"),
                                                "overrides": {"model": "thumbnail"}}), "path_outside_roots")
    device_row = [c.name for c in IMAGE_CASES].index("device.png")
    assert f"row {device_row} names the image imgs/device.png" in outside["message"]
    assert not (odd_images / "odd_mcp.parquet").exists()

    inside = pq.read_table(odd_images / "odd.parquet").filter(pa.compute.field("case") != "device.png")
    pq.write_table(inside, odd_images / "odd_inside.parquet")
    done = ok(mcp_server.call("embed", {"input_parquet": str(odd_images / "odd_inside.parquet"),
                                        "output_parquet": str(odd_images / "odd_mcp.parquet"),
                                        "overrides": {"model": "thumbnail"}, "no_store": True}))
    expected = _expected_skips()
    expected["not a regular file"] -= 1
    assert done["skipped_by_reason"] == expected
    assert warning(done, "images_skipped")


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(REFUSALS))
def test_the_mcp_server_refuses_with_the_same_code(mcp_server, small: Path, case: str) -> None:
    from mcp_helpers import refused

    words, code, field = REFUSALS[case]
    name, given = _arguments(words(small))
    error = refused(mcp_server.call(name, {k: _wire(v) for k, v in given.items()}), MCP_CODES.get(case, code))
    if field is not None and case not in MCP_CODES:
        assert error.get("field") == field
    assert not (small / "r" / "Mining_Report.md").exists()
