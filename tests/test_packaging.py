"""An installed copy holds every module and data file the source tree has (not only an editable install)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data", "models", "trm")


def test_the_wheel_carries_every_module_and_packaged_file(tmp_path):
    source = tmp_path / "source"  # a clean copy: a stale build/ folder in the checkout cannot hide a missing package
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--quiet", "--wheel-dir", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").glob("trm-*.whl"))
    packed = set(zipfile.ZipFile(wheel).namelist())
    expected = {path.relative_to(source).as_posix() for package in PACKAGES for path in (source / package).rglob("*")
                if path.is_file() and (path.suffix == ".py" or "gpt2_tokenizer" in path.parts or "samples" in path.parts
                                       or path.name == "chat_page.html")}
    assert {"trm/metrics/squad/squad.py", "trm/reading/grounded.py", "trm/sharing/chat_page.html"} <= expected
    assert expected - packed == set()
