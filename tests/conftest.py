"""Shared fixtures: one tiny random Qwen2-VL per test session, and a way to run the scripts as a user does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_FORMULAS = ROOT.parent / "shared" / "data" / "latex_ocr_val_formulas.txt"


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    """Every test, and every script a test starts, shares one model cache and never reaches a network."""
    os.environ["LATEXOCR_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      SWANLAB_ROOT=str(tmp_path_factory.mktemp("swanlab_home")))
    os.environ.pop("SWANLAB_API_KEY", None)


@pytest.fixture(scope="session")
def tiny_model_dir(offline_cache):
    from latexocr import modeling
    return modeling.resolve_model(modeling.TINY_MODEL_ID)


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(tiny_model_dir)


def run_script(script: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the four scripts from `cwd`, as a user would; fail with its output if it fails."""
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                    f"\n--- stderr\n{result.stderr[-4000:]}")
    return result
