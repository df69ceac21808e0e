"""The Python API as another project uses it: `from rlhf_recipes import train` is the function,
and the README's Python examples run as written, from another directory, against a regular
(non-editable) install in a venv of its own."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    """The python code block that follows `<!-- marker -->` in the README."""
    found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert found, f"README.md has no python block after <!-- {marker} -->"
    return found[1]


def test_every_public_name_is_what_it_says_whatever_was_imported_first():
    code = ("import types, rlhf_recipes.run, rlhf_recipes.loops.training\n"
            "import rlhf_recipes\n"
            "from rlhf_recipes import train\n"
            "assert callable(train) and not isinstance(train, types.ModuleType), train\n"
            "for name in rlhf_recipes.__all__:\n"
            "    value = getattr(rlhf_recipes, name)\n"
            "    assert not isinstance(value, types.ModuleType), name\n")
    fresh = "import rlhf_recipes, sys\nassert 'torch' not in sys.modules and 'trl' not in sys.modules\n"
    for program in (code, fresh):
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what git would commit: setuptools builds through ROOT/build/lib and never clears
    it, so modules deleted or moved since an earlier build would ship as well."""
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    return source


def test_installing_beside_a_trl_1_x_keeps_it_and_everything_else(source, tmp_path):
    """pip's own resolver, asked to install this checkout where TRL 1.x and the rest already are
    (this test environment): it would install rlhf_recipes alone, and downgrade nothing."""
    import trl

    assert int(trl.__version__.split(".")[0]) == 1
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation",
                    "--report", str(report), str(source)], check=True, timeout=300, cwd=tmp_path)
    assert [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]] == ["rlhf_recipes"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory, source):
    """A venv whose only rlhf_recipes is a regular install of this checkout (built as a wheel
    would be), with the test environment's other packages visible through a .pth file."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, timeout=300, cwd=root)
    # the dependencies, from this environment; a .pth line adds a directory but runs none of its
    # .pth files, so the editable install of this checkout stays out
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_the_readme_python_examples_run_from_another_directory(installed, tmp_path):
    work = tmp_path / "my_project"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = subprocess.run([str(installed), "-c", "import rlhf_recipes; print(rlhf_recipes.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env, check=True).stdout
    assert str(ROOT) not in where  # the regular install, not this checkout
    subprocess.run([str(installed), "-m", "rlhf_recipes.tiny", "tiny"], cwd=work, env=env, check=True,
                   capture_output=True, timeout=300)
    (work / "train_positive.py").write_text(readme_block("api-example"))
    done = subprocess.run([str(installed), "train_positive.py"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "runs" / "my_positive" / "model" / "adapter_model.safetensors").exists()

    elsewhere = tmp_path / "elsewhere"  # the saved adapter names its base by an absolute path
    elsewhere.mkdir()
    load = readme_block("load-example").replace('"runs/my_positive', f'"{work}/runs/my_positive')
    done = subprocess.run([str(installed), "-c", load], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()  # it printed a sample
    card = (work / "runs" / "my_positive" / "model" / "README.md").read_text()
    assert "Held-out evaluation" in card and "AutoPeftModelForCausalLM" in card


def test_the_flat_layouts_module_names_still_import_as_the_same_modules_with_a_warning():
    import importlib

    import rlhf_recipes
    from rlhf_recipes.components import policy

    # as in a fresh process, whatever ran before: the alias and the package attribute not yet made
    sys.modules.pop("rlhf_recipes.policy", None)
    vars(rlhf_recipes).pop("distributed", None)
    with pytest.warns(DeprecationWarning, match=r"rlhf_recipes\.policy is now rlhf_recipes\.components\.policy"):
        assert importlib.import_module("rlhf_recipes.policy") is policy
    assert policy.__spec__.name == "rlhf_recipes.components.policy"  # its own spec, not the alias's
    with pytest.warns(DeprecationWarning, match="rlhf_recipes.runtime.distributed"):
        from rlhf_recipes import distributed
    assert distributed is importlib.import_module("rlhf_recipes.runtime.distributed")
    assert all(importlib.import_module(f"rlhf_recipes.{new}") for new in rlhf_recipes.MOVED.values())
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        rlhf_recipes.nothing  # noqa: B018
