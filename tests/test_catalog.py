"""The catalog (what the command line lists without torch) is the code's own account."""

from __future__ import annotations

import json
import subprocess
import sys

from retain import catalog


def test_catalog_json_is_what_the_code_says():
    """Fails after a method, backbone or dataset changed until `python -m retain.catalog`
    regenerates retain/catalog.json (until then the CLI reads the code: slower, still right)."""
    shipped = json.loads(catalog.FILE.read_text())
    code = "import json; from retain import catalog; print(json.dumps(catalog.build()))"
    # a fresh interpreter: names the tests register (tiny_synthetic) are not the code's
    built = json.loads(subprocess.run([sys.executable, "-c", code], check=True,
                                      capture_output=True, text=True).stdout)
    for part in ("sources", "methods", "backbones", "datasets"):
        assert shipped[part] == built[part], (
            f"retain/catalog.json is out of date ({part}); run: python -m retain.catalog")


def test_every_registered_backbone_has_a_spec():
    from retain.backbones import BACKBONES, SPECS

    assert sorted(SPECS) == BACKBONES.names()


def test_every_hyper_parameter_has_a_meaning():
    missing = [f"{m}.{p['name']}" for m, e in catalog.build()["methods"].items()
               for p in e["params"] if not p["help"]]
    assert not missing, f"add a comment on `self.NAME = NAME  # ...` for {missing}"


def test_the_command_line_answers_without_torch(tmp_path):
    """--help, list, info, show and an input error import neither torch nor numpy's heavy
    users: they answer in a fraction of a second."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({  # format 1: no checkpoint hashes to check
        "format": 1, "num_tasks": 5,
        "config": {"method": "simplecil", "dataset": "mnist5k", "scenario": "B0Inc2",
                   "seed": 1993}, "backbone": {"name": "efficientnet_lite0", "sha256": "0" * 64},
        "stages": [{"task": 0, "num_classes": 2, "correct": [9], "total": [10],
                    "seconds_learn": 1.0, "seconds_eval": 0.5}]}))
    script = f"""
import sys
from retain.cli import main
for argv in (["list", "methods"], ["list", "presets"], ["list", "backbones"],
             ["list", "datasets"], ["list", "params", "aper"], ["info", "l2p"],
             ["show", {str(run)!r}], ["run", "--set", "sead=1"], ["run", "--method", "aper"]):
    main(argv)
heavy = sorted(m for m in ("torch", "timm", "matplotlib", "retain.methods") if m in sys.modules)
assert not heavy, heavy
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "note:" not in p.stderr  # the shipped catalog was used, not the code
    assert "last accuracy (A_B)" in p.stdout and "aper's peft=adapter" in p.stderr


def test_help_imports_no_command():
    p = subprocess.run([sys.executable, "-c", "import sys; from retain.cli import main; "
                        "main(['--help'])"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "COMMAND" in p.stdout


def test_catalog_types_read_back_as_the_annotations():
    """The command line validates hyper-parameters from the catalog: the same types."""
    from retain.methods import METHODS, method_params

    for name in METHODS.names():
        table = catalog.param_table(name)
        for key, (annotation, default) in method_params(name).items():
            assert table[key][0] == annotation, (name, key)
            assert table[key][1] == (list(default) if isinstance(default, tuple) else default)
