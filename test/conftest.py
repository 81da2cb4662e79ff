"""Shared fixtures: offline hub, the tiny checkpoint of every model family on disk (the tiny LLaVA-NeXT as
``tiny_model_dir`` / ``tiny_adapter``), one family's adapter and its encoded sample for the modules of that
family (``FAMILY``) or of every family (``family`` parametrized indirectly), the bundled sample image."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "PYTEST_XDIST_WORKER" in os.environ:  # .ci/run's workers: in-process nodes outside a `ros` fixture, one domain each
    _worker = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
    os.environ["ROS_DOMAIN_ID"] = str((int(os.environ.get("ROS_DOMAIN_ID") or 0) % 45) * 2 + _worker % 2)
    # one torch thread per worker, and for the nodes and tools it starts: two workers on two cores, each with
    # a thread per core (torch's default), would run four busy threads on two cores, where torch slows to a crawl
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_threads, "1")

from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "ptp_ros" / "data"


#: The request the family fixtures ``prepared``/``visual`` encode.
INSTRUCTION = "what colour is the circle?"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(model_type)``: that family's tiny random-weight checkpoint saved to disk, as a user's
    would be (built once a session, with its fixture's ``test_overrides``)."""
    from ptp_ros.testing.common import FIXTURES

    built: dict[str, Path] = {}

    def checkpoint(model_type: str) -> Path:
        if model_type not in built:
            fixture = FIXTURES[model_type]
            built[model_type] = fixture.build(
                tmp_path_factory.mktemp("models") / f"tiny-{model_type}", **fixture.test_overrides
            )
        return built[model_type]

    return checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint) -> Path:
    """The tiny random-weight LLaVA-NeXT on disk."""
    return tiny_checkpoint("llava_next")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir):
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    return load_adapter(tiny_model_dir, LoadOptions(device="cpu"))


@pytest.fixture(scope="module")
def family(request) -> str:
    """The model family a module's tests run on: its ``FAMILY``, or each registered one in turn where the module
    parametrizes this fixture (``pytest.mark.parametrize("family", FAMILIES, indirect=True)``)."""
    return getattr(request, "param", None) or request.module.FAMILY


@pytest.fixture(scope="module")
def model_dir(family, tiny_checkpoint) -> Path:
    return tiny_checkpoint(family)


@pytest.fixture(scope="module")
def adapter(request, family, model_dir):
    """The family's tiny checkpoint through ``load_adapter`` (LLaVA-NeXT's is the session's ``tiny_adapter``)."""
    if family == "llava_next":
        return request.getfixturevalue("tiny_adapter")
    from ptp_ros.vlm.loading import LoadOptions, load_adapter

    return load_adapter(model_dir, LoadOptions(device="cpu"))


@pytest.fixture(scope="module")
def prepared(adapter, sample_image):
    return adapter.prepare(sample_image, INSTRUCTION)


@pytest.fixture(scope="module")
def visual(adapter, prepared):
    return adapter.encode(prepared)


@pytest.fixture(scope="module")
def eager_model(family, model_dir):
    """The same checkpoint with eager attention everywhere: the reference the probes must match."""
    from ptp_ros.vlm.families import ADAPTERS

    return ADAPTERS[family].model_class.from_pretrained(model_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    """The bundled 1920×1080 scene, RGB uint8."""
    return cv2.cvtColor(cv2.imread(str(DATA / "sample_scene.jpg")), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def ros(tmp_path_factory):
    """One isolated ROS domain for a test module, also applied to the test process."""
    from ros_helpers import apply_env, ros_env

    saved = dict(os.environ)
    env = ros_env(tmp_path_factory.mktemp("ros_log"))
    apply_env(env)
    yield env
    os.environ.clear()
    os.environ.update(saved)


INTERFACES = Path(__file__).resolve().parents[1] / "ptp_ros_interfaces"


def _interface_files() -> list[Path]:
    return sorted([*INTERFACES.glob("action/*.action"), *INTERFACES.glob("msg/*.msg")])


def _installed_interface_is_current() -> bool:
    """Whether the importable ptp_ros_interfaces (if any) was built from this checkout's interface files;
    looked up without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("ptp_ros_interfaces")
    if spec is None or spec.origin is None:
        return False
    share = Path(spec.origin).parents[4] / "share" / "ptp_ros_interfaces"  # <prefix>/lib/pythonX.Y/site-packages/...
    return all(
        (share / f.relative_to(INTERFACES)).is_file()
        and (share / f.relative_to(INTERFACES)).read_bytes() == f.read_bytes()
        for f in _interface_files()
    )


@pytest.fixture(scope="session")
def ask_interface(tmp_path_factory):
    """The ``Ask`` action type, importable here and in the processes the tests start.

    The one installed in this environment (``bash ptp_ros_interfaces/install.sh``, which the README and CI
    run) when it was built from this checkout's interface files; else the same script builds it once into a
    temporary prefix (20-30 s on 2 cores) that is put on the Python and loader paths.  Skipped without cmake or
    the ROS 2 build wheels."""
    import ctypes
    import importlib
    import shutil
    import subprocess
    import sys

    pytest.importorskip("rclpy", reason="ROS 2 rclpy is not installed (pip install -e .[ros])")
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    if not _installed_interface_is_current():
        if "ptp_ros_interfaces" in sys.modules:
            pytest.skip("an out-of-date ptp_ros_interfaces is already imported: run bash ptp_ros_interfaces/install.sh")
        if shutil.which("cmake") is None:
            pytest.skip("cmake is not installed: cannot build ptp_ros_interfaces")
        if not (Path(sys.prefix) / "share" / "rosidl_default_generators").is_dir():
            pytest.skip(
                "the ROS 2 build wheels are not installed (pip install -e .[ros]): cannot build ptp_ros_interfaces"
            )
        prefix = tmp_path_factory.mktemp("ptp_ros_interfaces")
        done = subprocess.run(
            ["bash", str(INTERFACES / "install.sh"), str(prefix / "install")],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHON": sys.executable, "PTP_INTERFACES_BUILD": str(prefix / "build")},
        )
        assert done.returncode == 0, f"building ptp_ros_interfaces failed:\n{done.stdout}\n{done.stderr}"
        lib = prefix / "install" / "lib"
        site = lib / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        sys.path.insert(0, str(site))
        for key, path in (("PYTHONPATH", site), ("LD_LIBRARY_PATH", lib)):  # for the processes tests start
            os.environ[key] = os.pathsep.join(p for p in (str(path), os.environ.get(key)) if p)
        for library in sorted(lib.glob("*.so")):  # this process read LD_LIBRARY_PATH at start: load them by path,
            ctypes.CDLL(str(library))  # then rcl finds them by name among the loaded ones
        importlib.invalidate_caches()
    from ptp_ros.ros.ask_action import interface

    Ask = interface()
    assert Ask is not None, "ptp_ros_interfaces was built but does not import"
    yield Ask
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
