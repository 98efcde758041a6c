"""The install paths: setup.cfg (plain pip) and requirements.lock (`make install`) agree with each other."""

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


def requirements(text: str) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


def locked() -> dict[str, Version]:
    pins = requirements((REPO / "requirements.lock").read_text())
    return {pin.name.lower().replace("_", "-"): Version(next(iter(pin.specifier)).version) for pin in pins}


def test_python_floor_is_the_one_the_code_needs():
    # `blueberry sweep` starts trials with Popen(process_group=...), new in Python 3.11
    assert setup_cfg()["options"]["python_requires"].strip() == ">=3.11"


def test_the_lock_pins_every_dependency_within_setup_cfg_and_leaves_torch_to_the_user():
    config = setup_cfg()
    wanted = requirements(config["options"]["install_requires"])
    for extra in ("dev", "publish"):
        wanted += requirements(config["options.extras_require"][extra])
    pins = locked()
    assert "torch" not in pins  # installed first, the build that fits the machine
    for requirement in wanted:
        if requirement.name == "torch":
            continue
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
        if requirement.name != "numpy":  # numpy: see the override below
            assert pins[name] in requirement.specifier, f"{name}=={pins[name]} does not satisfy {requirement}"


def test_sweep_engine_is_a_dependency_and_the_lock_overrides_its_numpy_cap():
    config = setup_cfg()
    names = {r.name for r in requirements(config["options"]["install_requires"])}
    assert "sweeps" in names and "wandb-workspaces" not in names  # report --publish only: the `publish` extra
    (override,) = requirements((REPO / "requirements/overrides.txt").read_text())
    assert override.name == "numpy" and locked()["numpy"] in override.specifier
