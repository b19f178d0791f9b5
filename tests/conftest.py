import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# The tests never touch the user's amnesia-sd cache: one of their own for the session, as CI has.
os.environ["AMNESIA_SD_CACHE"] = tempfile.mkdtemp(prefix="amnesia-sd-test-cache-")
atexit.register(shutil.rmtree, os.environ["AMNESIA_SD_CACHE"], True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tiny import build_tiny_pipeline

torch.set_num_threads(1)  # tiny models run fastest single-threaded on 2 cores


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="also run tests marked gpu")


def pytest_collection_modifyitems(config, items):
    for marker, option in (("slow", "--run-slow"), ("gpu", "--run-gpu")):
        if not config.getoption(option):
            skip = pytest.mark.skip(reason=f"needs {option}")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-v") / "sd", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """A fresh amnesia-sd cache for one test module (the shipped digits model is still used)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv("AMNESIA_SD_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    from tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-xl") / "sdxl")


@pytest.fixture
def early_python():
    """`start(CODE, *args)` starts `python -c CODE ARGS` in a fresh interpreter now, before the test
    makes what CODE checks, so that its start and imports (torch, diffusers: ~5 s) run on the second
    core beside the test's own work. CODE reads a line from stdin after its imports and before it
    reads anything the test makes; `start` returns `finish()`, which sends that line and returns the
    finished process (returncode, stdout, stderr). A process not finished is killed after the test."""
    import subprocess
    import sys

    from helpers import ENV

    started = []

    def start(code: str, *args):
        process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=ENV, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)

        def finish(timeout: float = 300) -> subprocess.CompletedProcess:
            stdout, stderr = process.communicate("go\n", timeout=timeout)
            return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

        return finish

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory):
    from tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "sd3")


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory):
    from tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell_model(tmp_path_factory):
    from tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-schnell") / "schnell", guidance=False)
