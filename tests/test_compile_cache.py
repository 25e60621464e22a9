"""JAX's persistent compilation cache: off unless asked, on by one call or one variable.

The cache is process-wide JAX state, so every test that turns it on does so in a fresh
subprocess or into ``tmp_path`` with the settings restored afterwards (``restored_cache``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import nlsq_stream
from nlsq_stream import _compile_cache
from nlsq_stream.benchmarks.cold import first_fit_in_new_process
from nlsq_stream.benchmarks.common import child_env

_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_enable_compilation_cache",
)


@pytest.fixture
def restored_cache():
    """JAX's cache settings as they were before the test, and the cache reset after it."""
    before = {k: jax.config.values[k] for k in _SETTINGS}
    enabled = list(_compile_cache._enabled)
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    _compile_cache._enabled[:] = enabled


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        env=env if env is not None else child_env(),
    )
    return run.stdout.strip().splitlines()[-1]


_SETTINGS_CHILD = """
import json, jax, nlsq_stream
print(json.dumps({k: jax.config.values[k] for k in
    ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}))
"""


_FIT = """
from nlsq_stream.benchmarks.common import P0, exp_data, exp_model
x, y = exp_data(50)
nlsq_stream.curve_fit(exp_model(), x, y, p0=P0)
print(json.dumps({k: jax.config.values[k] for k in
    ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}))
"""


def test_the_cache_is_off_in_this_test_run_and_after_a_plain_import():
    assert jax.config.values["jax_compilation_cache_dir"] is None
    assert json.loads(_python(_SETTINGS_CHILD))["jax_compilation_cache_dir"] is None


def test_enable_writes_entries_and_a_second_process_reads_them(tmp_path):
    first = first_fit_in_new_process(str(tmp_path))
    entries = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert entries, "the first process wrote nothing to the cache folder"
    assert first["hits"] == 0 and first["loaded"] == 0
    second = first_fit_in_new_process(str(tmp_path))
    # the solver's program is loaded whole (solver.program_cache), not compiled
    assert second["loaded"] == 1, "the second process compiled instead of reading the cache"


def test_without_the_cache_a_new_process_gets_no_hit(tmp_path):
    plain = first_fit_in_new_process("")
    assert plain["hits"] == 0 and plain["loaded"] == 0
    assert not any(tmp_path.iterdir())


def test_the_environment_variable_names_the_folder(tmp_path):
    env = child_env()
    env[_compile_cache.ENV_VAR] = str(tmp_path / "cache")
    settings = json.loads(_python(_SETTINGS_CHILD + _FIT, env=env))
    assert settings["jax_compilation_cache_dir"] == str(tmp_path / "cache")
    assert settings["jax_persistent_cache_min_compile_time_secs"] == 0
    assert any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("value", ["1", "true", "ON"])
def test_the_environment_variable_on_uses_the_default_folder(tmp_path, value):
    env = child_env()
    env[_compile_cache.ENV_VAR] = value
    env["XDG_CACHE_HOME"] = str(tmp_path)
    settings = json.loads(_python(_SETTINGS_CHILD, env=env))
    if sys.platform.startswith("linux"):
        assert settings["jax_compilation_cache_dir"] == str(tmp_path / "nlsq_stream" / "jax")
    assert (tmp_path / "nlsq_stream" / "jax").is_dir() or not sys.platform.startswith("linux")


@pytest.mark.parametrize("value", ["0", "false", "", "off"])
def test_the_environment_variable_off_leaves_it_off(value):
    env = child_env()
    env[_compile_cache.ENV_VAR] = value
    assert json.loads(_python(_SETTINGS_CHILD, env=env))["jax_compilation_cache_dir"] is None


def test_a_bad_environment_variable_warns_and_leaves_the_cache_off(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    env = child_env()
    env[_compile_cache.ENV_VAR] = str(a_file)
    run = subprocess.run(
        [sys.executable, "-c", _SETTINGS_CHILD], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0
    assert "RuntimeWarning" in run.stderr and _compile_cache.ENV_VAR in run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["jax_compilation_cache_dir"] is None


def test_enable_in_process_sets_the_folder_and_returns_it(tmp_path, restored_cache):
    folder = nlsq_stream.enable_compile_cache(tmp_path / "new" / "nested")
    assert folder == (tmp_path / "new" / "nested").absolute() and folder.is_dir()
    assert jax.config.values["jax_compilation_cache_dir"] == str(folder)
    assert jax.config.values["jax_persistent_cache_min_compile_time_secs"] == 0


def test_enable_in_process_caches_a_fit(tmp_path, restored_cache):
    nlsq_stream.enable_compile_cache(str(tmp_path))

    def fresh_model(x, a, b):  # a new function: its solver compiles now, into the cache
        return a * x + b * x**2

    x = np.linspace(0.0, 1.0, 37)
    nlsq_stream.curve_fit(fresh_model, x, 2.0 * x + 0.5 * x**2, p0=[1.0, 1.0])
    assert any(p.is_file() for p in tmp_path.rglob("*"))


def test_default_folder_is_in_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = _compile_cache.default_cache_dir()
    assert folder.parts[-2:] == ("nlsq_stream", "jax")
    if sys.platform.startswith("linux"):
        assert folder == tmp_path / "nlsq_stream" / "jax"


def test_bad_path_is_a_clear_error_naming_the_argument(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    before = jax.config.values["jax_compilation_cache_dir"]
    with pytest.raises(TypeError, match="`path`"):
        nlsq_stream.enable_compile_cache(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`path`.*is a file"):
        nlsq_stream.enable_compile_cache(a_file)
    with pytest.raises(ValueError, match="`path`"):
        nlsq_stream.enable_compile_cache(a_file / "below")  # cannot be created
    with pytest.raises(ValueError, match="`path`"):
        nlsq_stream.enable_compile_cache("  ")
    assert jax.config.values["jax_compilation_cache_dir"] == before  # nothing changed
